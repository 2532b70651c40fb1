"""Bytes moved: the DRAM traffic of each launch sequence (as :mod:`.sass` records and compiles
it) against the minimum its op and pass need, and the time each takes at the copy bandwidth.

The model reads the compiled kernels, not a table: a kernel's *tile loads* of a big tensor
(x, y, dy, dx: x's size) are the tt.load operations of 2-D pointer blocks in its Triton IR that
reach the PTX; those of one loop body sweep the tensor once together over the launch's grid (a
loop taking two units an iteration loads half of it with each), and each outside a loop sweeps
it once (every kernel here tiles its big tensors so). Likewise for tile stores. Whether a
sweep after the first comes from DRAM or from L2 is decided by :data:`ASSUMPTIONS`.
"""

from __future__ import annotations

import math

from .tables import fmt_table, md_table

# Compulsory traffic of each pass, in tensors of x's size (read, written): a training forward
# reads x and writes y; the backward (dx, dweight, dbias) reads dy and x and writes dx; eval
# reads x and writes y; the eval backward with dweight reads dy and x (dweight = sum(dy * xhat))
# and writes dx.
MINIMUM = {"fwd-train": (1, 1), "bwd": (2, 1), "fwd-eval": (1, 1), "bwd-eval": (2, 1)}
# relu(bn(x) + residual): the forward reads the residual too; the backward reads what says where
# the ReLU was active (here the output: one tensor; a 1-bit mask would be 1/16 of an fp16 x)
# and writes d(residual) beside dx.
MINIMUM_RESIDUAL = {"fwd-train": (2, 1), "bwd": (3, 2), "fwd-eval": (2, 1), "bwd-eval": (3, 2)}


def minimum_of(case) -> tuple[int, int]:
    """The compulsory (read, written) tensors of x's size of ``case``'s op and pass."""
    table = MINIMUM_RESIDUAL if case.op == "batch_norm_add_relu" else MINIMUM
    return table[case.pass_]

ASSUMPTIONS = [
    "bytes model: the tile loads (stores) of a big tensor (x, y, dy, dx; the residual, the "
    "output read for the ReLU's mask and d(residual) with a residual add) in one loop body of "
    "a kernel's Triton IR sweep that tensor once, as does each outside a loop; the first "
    "sweep of a tensor comes from DRAM, every store goes to "
    "DRAM (write-back), per-channel vectors, workspace partials and tickets count once per "
    "launch that touches them",
    "L2 reuse: a sweep of a tensor already swept in the same launch (a fused kernel re-reading "
    "its channel) hits L2 when the programs resident at once (SMs x blocks/SM from the "
    "occupancy) read at most the L2 size of big tensors before re-reading; a sweep of a tensor "
    "swept by an earlier launch hits when that tensor plus every big-tensor byte moved since "
    "fits in L2 (LRU; optimistic for the H200's two-partition 50 MB L2); 'no reuse' counts "
    "every sweep from DRAM",
    "minimum: training forward and eval read x and write y; backward (dx, dweight, dbias) and "
    "eval backward read dy and x and write dx; time = bytes / 4.2 TB/s (the measured copy "
    "bandwidth); launch latency (a few us per launch) is not in it. A training pass must see "
    "every value before it can normalize any, so where x (and dy) exceed what L2 and the SMs "
    "hold (~50 MB + ~60 MB of registers and shared memory) 3 B forward / 5 B backward is the "
    "floor in practice and vs_min 1.5 / 1.67 is what an optimal kernel shows; with a residual "
    "add and ReLU (batch_norm_add_relu) the minimum reads the residual in the forward and the "
    "output (the ReLU's mask) in the backward and writes d(residual): 3 B forward, 5 B "
    "backward (4 B forward, 8 B backward the floor in practice)",
]


def model(case, launches: list[dict], kernels: dict, device) -> dict:
    """The bytes of one case: ``launches`` as :func:`.sass.run` builds them (kernel key, grid,
    programs, args by name with id, bytes and whether big), ``kernels`` the analyses."""
    numel = math.prod(case.dims)
    x_bytes = numel * _itemsize(case.dtype)
    read = write = small = no_reuse_read = 0
    history: list[tuple[int, int]] = []  # (tensor id, bytes) of each big-tensor sweep, in order
    for lau in launches:
        k = kernels[lau["key"]]
        occ = k["occupancy"]["blocks_per_sm"] * device.sms
        resident = min(1.0, occ / max(lau["programs"], 1))
        # What the resident programs read before they re-read it (the big tensors it loads).
        launch_read = sum(a["bytes"] for n, a in lau["args"].items()
                          if a["big"] and k["params"].get(n, {}).get("tile_loads"))
        seen_here: set = set()
        for name, a in lau["args"].items():
            acc = k["params"].get(name)
            if not acc:
                continue
            if not a["big"]:
                loads = sum(acc["load_bits"].values()) + sum(acc["tile_load_bits"].values())
                stores = sum(acc["store_bits"].values()) + sum(acc["tile_store_bits"].values())
                small += a["bytes"] * ((loads > 0) + (stores > 0) + 2 * (acc["atomics"] > 0))
                continue
            for _ in range(acc["tile_loads"]):
                no_reuse_read += a["bytes"]
                if a["id"] in seen_here:
                    hit = resident * launch_read <= device.l2_bytes
                else:
                    hit = _in_l2(a["id"], a["bytes"], history, device.l2_bytes)
                if not hit:
                    read += a["bytes"]
                seen_here.add(a["id"])
                history.append((a["id"], a["bytes"]))
            for _ in range(acc["tile_stores"]):
                write += a["bytes"]
                seen_here.add(a["id"])
                history.append((a["id"], a["bytes"]))
    r_min, w_min = minimum_of(case)
    minimum = (r_min + w_min) * x_bytes
    total = read + write + small
    worst = no_reuse_read + write + small
    bw = device.bandwidth
    return {"x_bytes": x_bytes, "launches": len(launches),
            "sequence": "+".join(_short(lau["kernel"]) for lau in launches),
            "read": read, "write": write, "small": small, "total": total,
            "no_reuse_total": worst, "minimum": minimum,
            "vs_minimum": total / minimum if minimum else None,
            "no_reuse_vs_minimum": worst / minimum if minimum else None,
            "time_us": 1e6 * total / bw, "minimum_time_us": 1e6 * minimum / bw}


def _in_l2(tid, nbytes, history, l2_bytes) -> bool:
    """Whether tensor ``tid`` (``nbytes``) is still in L2: swept before, and it plus every
    big-tensor byte moved after its last sweep fits."""
    since = 0
    for other, b in reversed(history):
        if other == tid:
            return nbytes + since <= l2_bytes
        since += b
    return False


def _itemsize(dtype: str) -> int:
    return {"fp32": 4, "fp16": 2, "bf16": 2, "fp64": 8}[dtype]


def _short(kernel: str) -> str:
    return kernel.strip("_").replace("_kernel", "")


def strategy_table(doc: dict) -> list[dict]:
    """Per (op, pass, launch sequence): how many cases, and the range of modeled bytes over the
    minimum (with L2 reuse, and without)."""
    groups: dict = {}
    for r in doc["rows"]:
        b = r["bytes"]
        key = (r["op"] + (f"(p={r['p']})" if r["p"] else ""), r["pass"], b["sequence"])
        groups.setdefault(key, []).append(b)
    out = []
    for (op, pass_, seq), bs in groups.items():
        v = [b["vs_minimum"] for b in bs]
        w = [b["no_reuse_vs_minimum"] for b in bs]
        out.append({"op": op, "pass": pass_, "sequence": seq, "cases": len(bs),
                    "vs_min": f"{min(v):.2f}-{max(v):.2f}" if min(v) != max(v)
                    else f"{v[0]:.2f}",
                    "no_reuse_vs_min": f"{min(w):.2f}-{max(w):.2f}" if min(w) != max(w)
                    else f"{w[0]:.2f}"})
    return out


STRATEGY_COLUMNS = [("op", "{}"), ("pass", "{}"), ("sequence", "{}"), ("cases", "{}"),
                    ("vs_min", "{}"), ("no_reuse_vs_min", "{}")]


def row_table(doc: dict, rows=None) -> list[dict]:
    out = []
    for r in rows if rows is not None else doc["rows"]:
        b = r["bytes"]
        out.append({"op": r["op"] + (f"(p={r['p']})" if r["p"] else ""), "pass": r["pass"],
                    "shape": r["shape_name"], "dtype": r["dtype"], "layout": r["layout"],
                    "sequence": b["sequence"], "x_MB": b["x_bytes"] / 1e6,
                    "model_MB": b["total"] / 1e6, "min_MB": b["minimum"] / 1e6,
                    "vs_min": b["vs_minimum"], "no_reuse": b["no_reuse_vs_minimum"],
                    "model_us": b["time_us"], "min_us": b["minimum_time_us"]})
    return out


ROW_COLUMNS = [("op", "{}"), ("pass", "{}"), ("shape", "{}"), ("dtype", "{}"),
               ("layout", "{}"), ("sequence", "{}"), ("x_MB", "{:.2f}"), ("model_MB", "{:.2f}"),
               ("min_MB", "{:.2f}"), ("vs_min", "{:.2f}"), ("no_reuse", "{:.2f}"),
               ("model_us", "{:.1f}"), ("min_us", "{:.1f}")]

TEXT_ROWS_MAX = 160  # the text report lists every row up to this many (files list them all)


def text_table(doc: dict) -> list[str]:
    lines = fmt_table(strategy_table(doc), STRATEGY_COLUMNS)
    rows = row_table(doc)
    if len(rows) <= TEXT_ROWS_MAX:
        lines += [""] + fmt_table(rows, ROW_COLUMNS)
    else:
        lines += ["", f"({len(rows)} rows: every row is in the markdown and JSON files)"]
    return lines


def markdown(doc: dict) -> list[str]:
    lines = ["Per launch sequence (`vs_min`: modeled DRAM bytes over the minimum, with L2 "
             "reuse as assumed below; `no_reuse_vs_min`: every sweep from DRAM):", ""]
    lines += md_table(strategy_table(doc), STRATEGY_COLUMNS)
    lines += ["", "Per case (MB = 1e6 bytes; times at "
              f"{doc['device_model']['bandwidth'] / 1e12:.1f} TB/s):", ""]
    lines += md_table(row_table(doc), ROW_COLUMNS)
    return lines
