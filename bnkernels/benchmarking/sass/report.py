"""The SASS report: tables (text and markdown), result files and the command line
(``bnkernels bench --sass``, ``python -m bnkernels.benchmarking.sass``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from .. import shapes as S
from . import bytes_model
from .launches import LP_PS, OPS, PASSES, cases
from .tables import access_widths as _widths
from .tables import fmt_table, md_table

# ----------------------------------------------------------------------------- tables


_SHOWN = ("BLOCK_N", "BLOCK_S", "BLOCK_M", "BLOCK_C", "BLOCK_R", "BLOCK_K", "FUSED", "TRAINING",
          "NOISY", "P", "PHASE", "SCALE_FROM", "WRITE_DX")


def kernel_table(doc: dict, rows=None) -> list[dict]:
    """One line per kernel and specialization used by ``rows`` (default: all): its numbers,
    the tile access widths of the big tensors against what alignment allows, and one case that
    launches it."""
    used: dict[str, list] = {}
    for r in doc["rows"] if rows is None else rows:
        for lau in r["launches"]:
            used.setdefault(lau["key"], []).append((r, lau))
    out = []
    for key, where in used.items():
        k = doc["kernels"][key]
        big = sorted({n for _, lau in where for n, a in lau["args"].items() if a["big"]})
        tile_ld, tile_st = {}, {}
        for n in big:
            acc = k["params"].get(n, {})
            for b, c in acc.get("tile_load_bits", {}).items():
                tile_ld[b] = tile_ld.get(b, 0) + c
            for b, c in acc.get("tile_store_bits", {}).items():
                tile_st[b] = tile_st.get(b, 0) + c
        allowed = min((a["allowed_bits"] for _, lau in where for a in lau["args"].values()
                       if a["big"]), default=None)
        first = where[0][0]
        occ = k["occupancy"]
        out.append({
            "kernel": k["kernel"].strip("_").replace("_kernel", ""), "key": key,
            "warps": k["num_warps"], "regs": k["regs"],
            "spills": k["spill_stores"] + k["spill_loads"], "frame": k["stack_frame"],
            "smem": k["smem"], "insts": k["sass"]["instructions"],
            "ldg": _widths(k["sass"]["LDG"]),
            "stg": _widths(k["sass"]["STG"]), "tile_ld": _widths(tile_ld),
            "tile_st": _widths(tile_st), "allowed": allowed,
            "blocks_sm": occ["blocks_per_sm"], "occupancy": occ["occupancy"],
            "inflight_kb": k.get("inflight_per_sm", 0) / 1024,
            "limiter": occ["limiter"], "uses": len(where),
            "example": f"{first['op']}{'(p=' + first['p'] + ')' if first['p'] else ''} "
                       f"{first['pass']} {first['shape_name']} {first['dtype']} "
                       f"{first['layout']}",
            "constexprs": " ".join(f"{a}={v}" for a, v in k["constexprs"].items()
                                   if a in _SHOWN),
            "problems": sorted({p for _, lau in where for p in lau["problems"]})})
    out.sort(key=lambda r: (r["kernel"], r["example"]))
    return out


KERNEL_COLUMNS = [("kernel", "{}"), ("warps", "{}"), ("regs", "{}"), ("spills", "{}"),
                  ("frame", "{}"), ("smem", "{}"), ("insts", "{}"), ("ldg", "{}"),
                  ("stg", "{}"),
                  ("tile_ld", "{}"), ("tile_st", "{}"), ("allowed", "{}"), ("blocks_sm", "{}"),
                  ("occupancy", "{:.0%}"), ("inflight_kb", "{:.0f}"), ("limiter", "{}"),
                  ("uses", "{}"),
                  ("example", "{}")]


def summary(doc: dict) -> dict:
    """The requirements over every kernel: how many spill, how many use tile accesses
    narrower than alignment allows."""
    table = kernel_table(doc)
    spills = [r for r in table if r["spills"]]
    narrow = [r for r in table if any("alignment allows" in p for p in r["problems"])]
    # A target, reported (not yet required): 32 KB of tile loads in flight per SM.
    low = [r for r in table if r["inflight_kb"] < INFLIGHT_TARGET_KB]
    return {"kernels": len(table), "with_spills": len(spills),
            "narrower_than_alignment": len(narrow),
            f"below_{INFLIGHT_TARGET_KB}kb_in_flight": len(low),
            "met": not spills and not narrow}


INFLIGHT_TARGET_KB = 32


def text_report(doc: dict) -> str:
    s = summary(doc)
    lines = [f"{doc['label']}.",
             f"target {doc['target']}; triton {doc['versions']['triton']}, ptxas "
             f"{doc['versions']['ptxas']}; {doc['cases']} cases, {doc['unique_kernels']} "
             f"distinct kernels ({doc['compiled']} compiled now; enumerate "
             f"{doc['elapsed_s']['enumerate']} s, compile {doc['elapsed_s']['compile']} s)", ""]
    table = kernel_table(doc)
    lines += fmt_table(table, KERNEL_COLUMNS)
    lines += ["", f"requirements: {s['with_spills']} of {s['kernels']} kernels spill; "
                  f"{s['narrower_than_alignment']} have tile accesses narrower than alignment "
                  f"allows -> {'MET' if s['met'] else 'NOT MET'}",
              f"target: {s[f'below_{INFLIGHT_TARGET_KB}kb_in_flight']} of {s['kernels']} "
              f"kernels keep under {INFLIGHT_TARGET_KB} KB of tile loads in flight per SM "
              "(inflight_kb: tile bytes a thread loads per loop iteration x threads x "
              "resident blocks)"]
    for r in table:
        for p in r["problems"]:
            lines.append(f"  {r['kernel']} ({r['example']}): {p}")
    lines += ["", "bytes moved (model):"] + bytes_model.text_table(doc)
    return "\n".join(lines)


def markdown(doc: dict) -> str:
    s = summary(doc)
    lines = [f"# Kernel quality on {doc['device_model']['name']}: static analysis", "",
             f"> **{doc['label']}.** Registers, spills, shared memory and access widths are "
             "read from the compiled code; occupancy and bytes moved are models.", "",
             f"{doc['date']}; target {doc['target']}; torch {doc['versions']['torch']}, "
             f"triton {doc['versions']['triton']}, ptxas {doc['versions']['ptxas']}. "
             f"{doc['cases']} cases, {doc['unique_kernels']} distinct kernels.", "",
             "## Requirements", "",
             f"- no spills: {s['kernels'] - s['with_spills']} of {s['kernels']} kernels",
             f"- tile accesses of x, y, dy, dx as wide as alignment allows: "
             f"{s['kernels'] - s['narrower_than_alignment']} of {s['kernels']} kernels",
             f"- (target) at least {INFLIGHT_TARGET_KB} KB of tile loads in flight per SM "
             "(`inflight_kb`: tile bytes a thread loads per loop iteration x threads x "
             f"resident blocks): {s['kernels'] - s[f'below_{INFLIGHT_TARGET_KB}kb_in_flight']}"
             f" of {s['kernels']} kernels",
             f"- **{'met' if s['met'] else 'not met'}**", ""]
    table = kernel_table(doc)
    problems = [(r, p) for r in table for p in r["problems"]]
    if problems:
        lines += ["Shortfalls:", ""] + [f"- `{r['kernel']}` ({r['example']}): {p}"
                                        for r, p in problems] + [""]
    lines += ["## Kernels", "",
              "One row per kernel and specialization. `spills`: bytes ptxas spills (stores + "
              "loads); `frame`: stack frame bytes per thread; `smem`: bytes per block (static "
              "+ dynamic); `insts`: SASS instructions (static; an elementwise kernel runs "
              "each about once per program); `ldg`/`stg`: SASS global loads/stores as bits x "
              "static count; "
              "`tile_ld`/`tile_st`: those of the big tensors' tiles (x, y, dy, dx); "
              "`allowed`: the widest access alignment allows on them; `blocks_sm`, "
              "`occupancy`: resident blocks per SM and warps / 64; `uses`: cases launching it; "
              "`example`: one of them.", ""]
    lines += md_table(table, KERNEL_COLUMNS)
    lines += ["", "## Bytes moved", ""] + bytes_model.markdown(doc)
    lines += ["", "## Assumptions", ""] + [f"- {a}" for a in doc["assumptions"]]
    return "\n".join(lines) + "\n"


def write(doc: dict, out: Path) -> dict[str, Path]:
    """``<out>/sm90-static/<date>.json`` and ``.md`` (never overwriting an earlier run's)."""
    folder = Path(out) / f"sm{doc['device_model']['capability']}-static"
    folder.mkdir(parents=True, exist_ok=True)
    day = doc["date"][:10]
    stem, n = day, 1
    while (folder / f"{stem}.json").exists():
        n += 1
        stem = f"{day}-{n}"
    paths = {"json": folder / f"{stem}.json", "markdown": folder / f"{stem}.md"}
    paths["json"].write_text(json.dumps(doc, indent=1, default=str) + "\n")
    paths["markdown"].write_text(markdown(doc))
    return paths


# ----------------------------------------------------------------------------- command line


def _csv(text: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in text.split(",") if v.strip())


def add_arguments(p) -> None:
    """The options of ``python -m bnkernels.benchmarking.sass`` (``bnkernels bench --sass``
    takes the bench's own)."""
    p.add_argument("--quick", action="store_true", help="the quick suite (default: full)")
    p.add_argument("--shapes", type=_csv, default=None,
                   help="suites (full, quick), networks, 'edge', or dims like 64x256x56x56")
    p.add_argument("--dtypes", type=_csv, default=None, help="fp32, fp16, bf16")
    p.add_argument("--layouts", type=_csv, default=None, help="NCHW, channels_last")
    p.add_argument("--ops", type=_csv, default=None, help=", ".join(OPS))
    p.add_argument("--passes", type=_csv, default=None, help=", ".join(PASSES))
    p.add_argument("--p", dest="lp_ps", type=_csv, default=None, help="l_p norms: 1, 2, inf")
    p.add_argument("--jobs", type=int, default=None,
                   help="compiling processes (default: the CPUs, at most 8)")
    p.add_argument("--out", default="benchmarks/results",
                   help="results folder: files go to <out>/sm90-static/<date>.*")


def _choose(given, allowed, what):
    return S.choose(given, allowed, what, "bnkernels bench --sass")


def case_list(args) -> list:
    """The cases the parsed arguments ask for (bench's --passes fwd+bwd: fwd-train and bwd)."""
    suite = S.suites()["quick" if getattr(args, "quick", False) else "full"]
    try:
        shapes = S.resolve_shapes(list(args.shapes)) if args.shapes else suite.shapes
    except ValueError as e:
        raise SystemExit(f"bnkernels bench --sass: {e}") from None
    passes = []
    for p in args.passes or PASSES:
        passes += ["fwd-train", "bwd"] if p == "fwd+bwd" else [p]
    return cases(shapes, _choose(args.dtypes or suite.dtypes, S.DTYPES, "dtypes"),
                 _choose(args.layouts or suite.layouts, S.LAYOUTS, "layouts"),
                 _choose(args.ops or OPS, OPS, "ops"),
                 _choose(tuple(dict.fromkeys(passes)), PASSES, "passes"),
                 _choose(getattr(args, "lp_ps", None) or suite.lp_ps, LP_PS, "l_p norms"))


def in_clean_process() -> bool:
    """True when this process can compile the kernels: the Triton interpreter off, and the
    kernels not loaded interpreted."""
    common = sys.modules.get("bnkernels.backends.triton.common")
    if common is not None:
        return not common.INTERPRET
    return os.environ.get("TRITON_INTERPRET", "0") != "1"


def execute(args) -> int:
    """Print the report, write its files; 0 when every requirement holds, else 1. Runs in a
    fresh process when this one cannot compile (the interpreter is on)."""
    todo = case_list(args)
    if not in_clean_process():
        return run_in_subprocess(_argv_of(args))
    from . import default_jobs, run

    def progress(i, n, kernel):
        if i == n or i % 25 == 0:
            print(f"  compiled {i}/{n} kernels", file=sys.stderr, flush=True)

    jobs = getattr(args, "jobs", None) or default_jobs()
    print(f"{len(todo)} cases: recording launches and specializations ...", file=sys.stderr,
          flush=True)
    doc = run(todo, jobs=jobs, progress=progress)
    print(text_report(doc))
    for kind, path in write(doc, Path(args.out)).items():
        print(f"{kind}: {path}")
    return 0 if summary(doc)["met"] else 1


def _argv_of(args) -> list[str]:
    argv = []
    for name in ("shapes", "dtypes", "layouts", "ops", "passes", "lp_ps"):
        v = getattr(args, name, None)
        if v:
            argv += [f"--{'p' if name == 'lp_ps' else name}", ",".join(v)]
    if getattr(args, "quick", False):
        argv.append("--quick")
    if getattr(args, "jobs", None):
        argv += ["--jobs", str(args.jobs)]
    return argv + ["--out", str(args.out)]


def run_in_subprocess(argv: list[str]) -> int:
    """``python -m bnkernels.benchmarking.sass argv`` with the Triton interpreter off."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = str(Path(__file__).resolve().parents[3])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return subprocess.call([sys.executable, "-m", "bnkernels.benchmarking.sass", *argv],
                           env=env)


def main(argv: list[str] | None = None) -> int:
    """``python -m bnkernels.benchmarking.sass``."""
    import argparse

    from . import __doc__ as doc

    parser = argparse.ArgumentParser(prog="python -m bnkernels.benchmarking.sass",
                                     description=doc.split("\n\n")[0])
    add_arguments(parser)
    return execute(parser.parse_args(argv))
