"""The measured-speed table that "auto" consults to order the cuda and triton backends.

``cuda_speed.json`` (next to this file) holds entries ``{"device", "op", "max_numel",
"triton_us", "cuda_us", "rows", "source"}``: for inputs of ``op`` on GPU ``device`` with up to
``max_numel`` elements, the summed median times of the two backends in a benchmark run. The
table is data, not a guess: it is empty until measured on a GPU, and then "auto" prefers
triton. Regenerate it from a benchmark results file (``bnkernels bench`` with the
bnkernels-triton and bnkernels-cuda providers)::

    python -m bnkernels.backends.speed results/<run>.json
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

import torch

TABLE = Path(__file__).with_name("cuda_speed.json")
_PROVIDERS = {"bnkernels-triton": "triton_us", "bnkernels-cuda": "cuda_us"}


@functools.cache
def _entries() -> tuple:
    try:
        data = json.loads(TABLE.read_text())
    except (OSError, ValueError):
        return ()
    return tuple(sorted(data.get("entries", []), key=lambda e: (e["device"], e["op"],
                                                                  e["max_numel"])))


@functools.cache
def _device_name(index: int) -> str:
    return torch.cuda.get_device_name(index)


def faster(op: str, x: torch.Tensor) -> str | None:
    """"cuda" or "triton", whichever the table measured faster for ``op`` on x's GPU at x's
    size; None without a measurement."""
    if x.device.type != "cuda":
        return None
    index = x.device.index if x.device.index is not None else torch.cuda.current_device()
    rows = [e for e in _entries() if e["op"] == op and e["device"] == _device_name(index)]
    if not rows:
        return None
    numel = x.numel()
    entry = next((e for e in rows if e["max_numel"] >= numel), rows[-1])
    return "cuda" if entry["cuda_us"] < entry["triton_us"] else "triton"


def table_from_results(results: dict, source: str = "") -> list[dict]:
    """Table entries from a benchmark results dict: per op and numel, the two providers' median
    times summed over the rows (passes, dtypes, layouts) where both were measured. Rows timed
    eagerly (host cost included: what a call costs a user) are used where the run has them,
    else the CUDA-graph rows; the two modes are never mixed."""
    rows = [r for r in results.get("rows", [])
            if r.get("provider") in _PROVIDERS and r.get("median_us") is not None]
    modes = {r.get("mode", "eager") for r in rows}
    mode = "eager" if "eager" in modes else (min(modes) if modes else "eager")
    by_key: dict[tuple, dict[str, float]] = {}
    for r in rows:
        if r.get("mode", "eager") != mode:
            continue
        key = (r["op"], r.get("p"), r["pass"], tuple(r["shape"]), r["dtype"], r["layout"],
               r["numel"])
        by_key.setdefault(key, {})[_PROVIDERS[r["provider"]]] = float(r["median_us"])
    sums: dict[tuple, dict] = {}
    for key, times in by_key.items():
        if len(times) != 2:
            continue
        s = sums.setdefault((key[0], key[6]), {"triton_us": 0.0, "cuda_us": 0.0, "rows": 0})
        s["triton_us"] += times["triton_us"]
        s["cuda_us"] += times["cuda_us"]
        s["rows"] += 1
    return [{"device": results["device"], "op": op, "max_numel": numel,
             "triton_us": round(s["triton_us"], 3), "cuda_us": round(s["cuda_us"], 3),
             "rows": s["rows"], "mode": mode, "source": source}
            for (op, numel), s in sorted(sums.items())]


def main(argv: list[str] | None = None) -> int:
    paths = sys.argv[1:] if argv is None else argv
    if not paths:
        print(__doc__)
        return 2
    data = json.loads(TABLE.read_text())
    for path in paths:
        results = json.loads(Path(path).read_text())
        if results.get("device_type") != "cuda":
            print(f"{path}: not a GPU run ({results.get('device')}); skipped", file=sys.stderr)
            continue
        new = table_from_results(results, source=Path(path).name)
        keep = [e for e in data["entries"]
                if (e["device"], e["op"]) not in {(n["device"], n["op"]) for n in new}]
        data["entries"] = keep + new
        print(f"{path}: {len(new)} entries for {results['device']}")
    TABLE.write_text(json.dumps(data, indent=2) + "\n")
    _entries.cache_clear()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
