"""Kernel quality without a GPU (bnkernels.benchmarking.sass): the kernels each plan launches on
an H200, compiled for sm_90 with the JIT's specialization, do not spill and access the big
tensors (x, y, dy, dx) as wide as alignment allows; and the readers the report is built on
(SASS, PTX, Triton IR, ptxas log, occupancy, alignment) give the right answers on fixed inputs.

The compiling tests run tests/sass_check.py in a subprocess with the Triton interpreter off
(this process has it on); ~25 kernels, seconds each, cached on disk across runs
($BNKERNELS_SASS_CACHE, default ~/.cache/bnkernels/sass).
"""

from __future__ import annotations

import json
import struct

import pytest
import torch

triton = pytest.importorskip("triton")

from helpers import run_compiler_script  # noqa: E402

from bnkernels.benchmarking.sass import allowed_bits  # noqa: E402
from bnkernels.benchmarking.sass import parse as P  # noqa: E402
from bnkernels.benchmarking.sass.compile import H200, occupancy  # noqa: E402

# ----------------------------------------------------------------------------- readers

# Ten sm_90 instructions as cuobjdump lists them (both 64-bit words of each).
SASS_LISTING = """
/*01e0*/ @!P1 LDG.E.128 R24, desc[UR4][R42.64] ; /* 0x000000042a189981 */
    /* 0x000ea8000c1e1d00 */
/*0240*/ @P1 LDG.E.U16 R6, desc[UR6][R4.64] ; /* 0x0000000604061981 */
    /* 0x0000e8000c1e1500 */
/*0320*/ @!P2 LDG.E.64 R10, desc[UR8][R26.64] ; /* 0x000000081a0aa981 */
    /* 0x0002a2000c1e1b00 */
/*0170*/ @!P1 LDG.E R4, desc[UR10][R18.64] ; /* 0x0000000a12049981 */
    /* 0x000368000c1e1900 */
/*0780*/ STG.E.128 desc[UR4][R8.64], R4 ; /* 0x0000000408007986 */
    /* 0x000fe2000c101d04 */
/*07a0*/ @P6 STG.E.U16 desc[UR6][R16.64], R29 ; /* 0x0000001d10006986 */
    /* 0x0001e2000c101506 */
/*2990*/ STL [R1+0x18], R39 ; /* 0x0000182701007387 */
    /* 0x0001e20000100800 */
/*2a00*/ LDL R41, [R47+0x18] ; /* 0x000018002f297983 */
    /* 0x000ea80000100800 */
/*4830*/ ATOMG.E.ADD.STRONG.GPU PT, R0, desc[UR10][R6.64], R3 ; /* 0x00000003060079a8 */
    /* 0x0002a800081ee1ca */
/*03d0*/ FFMA R4, R21, R4, R8 ; /* 0x0000000415047223 */
    /* 0x004fe20000000008 */
"""


def _machine_code(listing: str) -> bytes:
    words = [int(w, 16) for w in __import__("re").findall(r"/\* (0x[0-9a-f]{16}) \*/", listing)]
    return b"".join(struct.pack("<Q", w) for w in words)


def test_parse_sass_listing():
    got = P.parse_sass(SASS_LISTING)
    assert got["LDG"] == {128: 1, 16: 1, 64: 1, 32: 1}
    assert got["STG"] == {128: 1, 16: 1}
    assert got["STL"] == {32: 1} and got["LDL"] == {32: 1}
    assert got["atomics"] == 1 and got["instructions"] == 10


def test_decode_sass_machine_code_matches_listing():
    """The decoder reads the same widths from the encoding as cuobjdump prints."""
    got = P.decode_sass(_machine_code(SASS_LISTING))
    listed = P.parse_sass(SASS_LISTING)
    for k in ("LDG", "STG", "LDL", "STL", "atomics", "instructions"):
        assert got[k] == listed[k], k


def test_ptxas_log():
    log = ("ptxas info    : Compiling entry function '_bn_apply_kernel' for 'sm_90a'\n"
           "ptxas info    : Function properties for _bn_apply_kernel\n"
           "    32 bytes stack frame, 8 bytes spill stores, 12 bytes spill loads\n"
           "ptxas info    : Used 79 registers, used 1 barriers, 9216 bytes smem, "
           "680 bytes cmem[0]\n")
    assert P.parse_ptxas_log(log) == {"regs": 79, "stack_frame": 32, "spill_stores": 8,
                                      "spill_loads": 12, "smem": 9216}
    assert P.parse_ptxas_log("no log") is None


PTX = """
\t.file\t1 "/k/bn.py"
\t.file\t2 "/k/common.py"
\t.loc\t1 816 17
\tadd.s64 \t%rd6, %rd9, %rd17;
\t.loc\t1 816 9
\t// begin inline asm
\t.loc\t1 816 9
\tmov.u32 %r8, %r2;
\t.loc\t1 817 9
\tmov.u32 %r9, %r2;
\t@%p2 ld.global.v4.b32 { %r8, %r9, %r10, %r11 }, [ %rd6 + 0 ];
\t// end inline asm
\t.loc\t2 268 13, function_name $L__info_string0, inlined_at 1 809 12
\t// begin inline asm
\t@%p1 ld.global.b16 { %rs1 }, [ %rd1 + 0 ];
\t// end inline asm
\t.loc\t1 830 5
\tst.global.v2.b32 [ %rd8 + 0 ], { %r16, %r17 };
\tatom.global.gpu.acq_rel.add.u32 %r5, [%rd2], 1;
"""


def test_parse_ptx_widths_and_locations():
    """Widths from the vector count and type; the location is the .loc before an inline-asm
    block (inside it LLVM numbers the asm's own lines), with the inlined-at site."""
    got = P.parse_ptx(PTX)
    assert [(a["kind"], a["bits"]) for a in got] == [("load", 128), ("load", 16),
                                                     ("store", 64), ("atomic", 32)]
    assert got[0]["loc"] == (("/k/bn.py", 816, 9), None)
    assert got[1]["loc"] == (("/k/common.py", 268, 13), ("/k/bn.py", 809, 12))


TTIR = (
    '#loc = loc("/k/bn.py":10:1)\n'
    '#loc1 = loc("/k/bn.py":20:9)\n'
    '#loc2 = loc("/k/common.py":5:13)\n'
    '#loc3 = loc("/k/bn.py":21:12)\n'
    '#loc4 = loc(callsite(#loc2 at #loc3))\n'
    '#loc5 = loc("/k/bn.py":30:9)\n'
    'module {\n'
    '  tt.func public @k(%x_ptr: !tt.ptr<bf16> {tt.divisibility = 16 : i32} loc("x_ptr"(#loc)), '
    '%w_ptr: !tt.ptr<f32> loc("w_ptr"(#loc)), %S: i32 {tt.divisibility = 16 : i32} '
    'loc("S"(#loc))) attributes {noinline = false} {\n'
    '    %c0 = arith.constant 0 : i32 loc(#loc)\n'
    '    %0 = tt.splat %x_ptr : !tt.ptr<bf16> -> tensor<16x64x!tt.ptr<bf16>> loc(#loc1)\n'
    '    %r:2 = scf.for %i = %c0 to %S step %c0 iter_args(%p = %0, %acc = %c0) -> '
    '(tensor<16x64x!tt.ptr<bf16>>, i32) : i32 {\n'
    '      %v = tt.load %p : tensor<16x64x!tt.ptr<bf16>> loc(#loc1)\n'
    '      %q = tt.addptr %p, %S : tensor<16x64x!tt.ptr<bf16>>, i32 loc(#loc1)\n'
    '      scf.yield %q, %acc : tensor<16x64x!tt.ptr<bf16>>, i32 loc(#loc1)\n'
    '    } loc(#loc1)\n'
    '    %w = tt.addptr %w_ptr, %S : !tt.ptr<f32>, i32 loc(#loc4)\n'
    '    %wv = tt.load %w : !tt.ptr<f32> loc(#loc4)\n'
    '    scf.for %j = %c0 to %S step %c0 : i32 {\n'  # a sibling region reusing the name %q
    '      %q = tt.splat %w_ptr : !tt.ptr<f32> -> tensor<4x!tt.ptr<f32>> loc(#loc1)\n'
    '    } loc(#loc1)\n'
    '    tt.store %r#0, %v : tensor<16x64x!tt.ptr<bf16>> loc(#loc5)\n'
    '    tt.return loc(#loc)\n'
    '  } loc(#loc)\n'
    '} loc(#loc)\n'
)


def test_parse_ttir_data_flow():
    """Pointer data flow through a loop's iter_args and results, tile rank, divisibility,
    and inlined locations."""
    got = P.parse_ttir(TTIR, ["x_ptr", "w_ptr", "S"])
    assert [(a["name"], a["div16"]) for a in got["args"]] == [("x_ptr", True), ("w_ptr", False),
                                                              ("S", True)]
    ops = [(o["kind"], o["params"], o["rank"]) for o in got["ops"]]
    assert ops == [("load", ["x_ptr"], 2), ("load", ["w_ptr"], 0), ("store", ["x_ptr"], 2)]
    assert got["ops"][1]["loc"] == (("/k/common.py", 5, 13), ("/k/bn.py", 21, 12))


def test_access_summary_attributes_ptx_to_arguments():
    ttir = P.parse_ttir(TTIR, ["x_ptr", "w_ptr", "S"])
    ptx = [{"kind": "load", "bits": 128, "loc": (("/k/bn.py", 20, 9), None)},
           {"kind": "load", "bits": 32, "loc": (("/k/common.py", 5, 13), ("/k/bn.py", 21, 12))},
           {"kind": "store", "bits": 64, "loc": (("/k/bn.py", 30, 9), None)},
           {"kind": "load", "bits": 32, "loc": (("/k/other.py", 1, 1), None)}]
    got = P.access_summary(ptx, ttir)
    x = got["params"]["x_ptr"]
    assert x["tile_load_bits"] == {"128": 1} and x["tile_store_bits"] == {"64": 1}
    assert x["tile_loads"] == 1 and x["tile_stores"] == 1
    assert got["params"]["w_ptr"]["load_bits"] == {"32": 1}
    assert got["unmatched_ptx_accesses"] == 1


LOOP_PTX = """
\t.file\t1 "/k/bn.py"
\t.loc\t1 20 9
\tld.global.b32 %r1, [%rd1];
$L__BB0_1:
\t.loc\t1 20 9
\t@%p1 ld.global.v4.b32 { %r8, %r9, %r10, %r11 }, [ %rd6 + 0 ];
\t@%p1 ld.global.v4.b32 { %r12, %r13, %r14, %r15 }, [ %rd7 + 0 ];
\tsetp.lt.s32 %p2, %r3, %r4;
\t@%p2 bra.uni $L__BB0_1;
\t@%p3 bra $L__BB0_2;
$L__BB0_2:
\tret;
"""


def test_ptx_loops_and_tile_bytes_in_flight():
    """A loop is a label and a backward branch to it (a forward branch is not); a thread's
    tile bytes in flight are those of one iteration of the loop that loads most, else (no
    loop loads tiles) the whole kernel's."""
    assert P.ptx_loops(LOOP_PTX) == [(4, 9)]
    got = P.parse_ptx(LOOP_PTX)
    assert [a["loop"] for a in got] == [None, (4, 9), (4, 9)]
    ttir = P.parse_ttir(TTIR, ["x_ptr", "w_ptr", "S"])
    assert P.access_summary(got, ttir)["tile_load_bytes_per_thread"] == 2 * 16
    straight = [dict(a, loop=None) for a in got]  # an elementwise pass: every tile load
    assert P.access_summary(straight, ttir)["tile_load_bytes_per_thread"] == 4 + 2 * 16


def test_tile_loads_of_one_loop_body_are_one_sweep():
    """Two tile loads of x in one loop body (a loop taking two units an iteration) sweep x
    once between them; the bytes model counts sweeps."""
    paired = TTIR.replace(
        "      %v = tt.load %p : tensor<16x64x!tt.ptr<bf16>> loc(#loc1)\n",
        "      %v = tt.load %p : tensor<16x64x!tt.ptr<bf16>> loc(#loc1)\n"
        "      %v2 = tt.load %p : tensor<16x64x!tt.ptr<bf16>> loc(#loc1)\n")
    assert paired != TTIR
    ptx = [{"kind": "load", "bits": 128, "loc": (("/k/bn.py", 20, 9), None), "loop": (1, 3)}]
    for ir in (TTIR, paired):
        got = P.access_summary(ptx, P.parse_ttir(ir, ["x_ptr", "w_ptr", "S"]))
        assert got["params"]["x_ptr"]["tile_loads"] == 1
    ops = P.parse_ttir(paired, ["x_ptr", "w_ptr", "S"])["ops"]
    assert ops[0]["loop"] is not None and ops[0]["loop"] == ops[1]["loop"]
    assert ops[2]["loop"] is None  # w's load, after the loop


@pytest.mark.parametrize("regs,smem,warps,blocks,limiter", [
    (26, 0, 8, 8, "warps"),          # 64 warps resident
    (39, 1152, 8, 6, "registers"),   # 1280 regs/warp: 12 warps per sub-partition
    (48, 0, 8, 5, "registers"),      # 1536: 10 per sub-partition -> 40 warps -> 5 blocks
    (32, 0, 1, 32, "blocks"),        # one-warp blocks: 32 blocks per SM come first
    (255, 0, 8, 1, "registers"),     # 8192 regs/warp: 2 per sub-partition -> 8 warps
    (32, 100 * 1024, 4, 2, "shared memory"),
])
def test_occupancy(regs, smem, warps, blocks, limiter):
    got = occupancy(regs, smem, warps, H200)
    assert (got["blocks_per_sm"], got["limiter"]) == (blocks, limiter)
    assert got["warps_per_sm"] == blocks * warps


@pytest.mark.parametrize("dims,fmt,dtype,bits", [
    ((64, 256, 56, 56), "NCHW", torch.float32, 128),   # S = 3136: 16-byte rows
    ((64, 256, 14, 14), "NCHW", torch.float32, 128),   # S = 196 = 4 * 49: 784-byte rows
    ((64, 256, 14, 14), "NCHW", torch.bfloat16, 64),   # 392-byte rows: 8-byte alignment
    ((64, 2048, 7, 7), "NCHW", torch.float32, 32),     # S = 49: odd
    ((64, 2048, 7, 7), "channels_last", torch.bfloat16, 128),  # C = 2048
    ((16, 2, 512, 512), "channels_last", torch.float32, 64),   # C = 2: 8-byte rows
    ((16, 2, 512, 512), "channels_last", torch.bfloat16, 32),
    ((128, 10), "NCHW", torch.float32, 64),            # (N, C): rows of C = 10
])
def test_allowed_bits(dims, fmt, dtype, bits):
    mf = torch.channels_last if fmt == "channels_last" else torch.contiguous_format
    assert allowed_bits(torch.empty(dims, device="meta", dtype=dtype, memory_format=mf)) == bits


def test_allowed_bits_of_an_offset_view():
    base = torch.empty(4 * 3 + 2, device="meta")
    assert allowed_bits(base[2:]) == 64  # 8 bytes past an aligned base


# ----------------------------------------------------------------------------- compiled kernels

# (op, p, pass, dims, dtype, layout): the fused and split BatchNorm kernels, the elementwise
# kernels, an l_p kernel; NCHW and channels last; fp32 and bf16; spatial sizes whose rows are
# 16-byte multiples (56x56, 16x16), only 8-byte ones in bf16 (14x14), or odd (7x7).
CASES = [
    ("batch_norm", None, "fwd-train", (32, 128, 16, 16), "fp32", "NCHW"),      # fused ncs
    ("batch_norm", None, "bwd", (32, 128, 16, 16), "bf16", "NCHW"),
    ("batch_norm", None, "fwd-train", (8, 2048, 7, 7), "bf16", "channels_last"),  # fused mc
    ("batch_norm", None, "bwd", (8, 2048, 7, 7), "fp32", "channels_last"),
    ("batch_norm", None, "fwd-train", (64, 256, 56, 56), "bf16", "NCHW"),     # split ncs
    ("batch_norm", None, "bwd", (64, 256, 56, 56), "bf16", "NCHW"),
    ("batch_norm", None, "fwd-eval", (64, 256, 56, 56), "bf16", "NCHW"),
    ("batch_norm", None, "fwd-train", (64, 256, 56, 56), "fp32", "channels_last"),  # split mc
    ("batch_norm", None, "bwd", (64, 256, 56, 56), "bf16", "channels_last"),
    ("batch_norm", None, "fwd-train", (64, 256, 14, 14), "fp32", "NCHW"),     # S = 196
    ("batch_norm", None, "bwd", (64, 256, 14, 14), "bf16", "NCHW"),
    ("batch_norm", None, "fwd-eval", (64, 2048, 7, 7), "fp32", "NCHW"),       # S = 49
    ("lp_norm", "2", "fwd-train", (64, 256, 56, 56), "bf16", "channels_last"),
    ("lp_norm", "2", "bwd", (64, 256, 56, 56), "fp32", "NCHW"),
    # relu(bn(x) + residual): the fused forward, the split channels-last backward
    ("batch_norm_add_relu", None, "fwd-train", (32, 128, 16, 16), "bf16", "NCHW"),
    ("batch_norm_add_relu", None, "bwd", (64, 256, 56, 56), "bf16", "channels_last"),
]


def _case_id(c):
    return f"{c[0]}{'-p' + c[1] if c[1] else ''}-{c[2]}-{'x'.join(map(str, c[3]))}-{c[4]}-{c[5]}"


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """The report of CASES, made in a subprocess with the Triton interpreter off."""
    out = tmp_path_factory.mktemp("sass") / "report.json"
    run_compiler_script("sass_check.py", json.dumps(CASES), str(out), timeout=1200)
    return json.loads(out.read_text())


def _row(report, case):
    op, p, pass_, dims, dtype, layout = case
    layout = "NC" if len(dims) == 2 else layout
    for r in report["doc"]["rows"]:
        if (r["op"], r["p"], r["pass"], tuple(r["shape"]), r["dtype"], r["layout"]) == \
                (op, p, pass_, tuple(dims), dtype, layout):
            return r
    raise AssertionError(f"no row for {case}")


def test_cases_cover_both_strategies(report):
    """The set exercises what it claims: one-launch (fused) and two-launch (split) training
    forwards in both layouts (if the heuristics move, pick new shapes)."""
    fwd = [r for r in report["doc"]["rows"] if r["pass"] == "fwd-train" and r["op"] ==
           "batch_norm"]
    kinds = {(r["layout"], len(r["launches"])) for r in fwd}
    assert {("NCHW", 1), ("NCHW", 2), ("channels_last", 1), ("channels_last", 2)} <= kinds, kinds


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_no_spills(report, case):
    for lau in _row(report, case)["launches"]:
        k = report["doc"]["kernels"][lau["key"]]
        assert k["spill_stores"] == 0 and k["spill_loads"] == 0, \
            f"{k['kernel']} spills ({k['regs']} registers)"


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_big_tensor_accesses_as_wide_as_alignment_allows(report, case):
    """Every tile load/store of x, y, dy, dx is as wide as the rows allow (128 bits when a row
    -- S in NCHW, C in channels last -- is a multiple of 16 bytes)."""
    row = _row(report, case)
    for lau in row["launches"]:
        k = report["doc"]["kernels"][lau["key"]]
        big = [n for n, a in lau["args"].items() if a["big"]]
        assert any(k["params"].get(n, {}).get("tile_loads") for n in big), \
            f"{k['kernel']}: no tile load of a big tensor found in its IR/PTX"
        assert lau["problems"] == [], f"{k['kernel']}: {lau['problems']}"


@pytest.mark.parametrize("case", [c for c in CASES if c[2] == "fwd-train"
                                  and c[0] != "batch_norm_add_relu"], ids=_case_id)
def test_bytes_model(report, case):
    """Training forward: fused moves 2 B (x read once, its re-read from cache, y written),
    split 3 B when x does not fit in L2 (2 B when it does), 3 B either way without reuse; plus
    the per-channel vectors (a few fp32 values per channel) and the split's partials."""
    b = _row(report, case)["bytes"]
    x, channels = b["x_bytes"], case[3][1]
    expect = 2 * x if b["launches"] == 1 or x <= H200.l2_bytes else 3 * x
    assert b["read"] + b["write"] == expect, b
    assert b["no_reuse_total"] - b["small"] == 3 * x, b
    assert 0 < b["small"] <= 16 * 4 * channels + 0.01 * x, b  # vectors + split partials


def test_sass_decoder_matches_cuobjdump(report):
    checks = report["cross_checks"]
    if checks and all("error" in c for c in checks):
        pytest.skip(checks[0]["error"])
    assert checks
    for c in checks:
        assert c["decoded"] == c["listing"], c


def test_bytes_model_of_the_residual_add(report):
    """relu(bn(x) + residual): the fused forward reads x and the residual once each and
    writes y (3 x-sizes, the minimum); the split backward reads dy, x and the output (the
    ReLU's mask) and writes d(residual) in its first sweep, then reads d(residual) and x and
    writes dx (7 x-sizes; 8 if the dx pass re-read dy and the output)."""
    fwd = _row(report, CASES[-2])["bytes"]
    assert fwd["read"] + fwd["write"] == 3 * fwd["x_bytes"] == fwd["minimum"], fwd
    bwd = _row(report, CASES[-1])["bytes"]
    x = bwd["x_bytes"]
    assert (bwd["read"], bwd["write"]) == (5 * x, 2 * x), bwd
    assert bwd["minimum"] == 5 * x and bwd["launches"] == 2, bwd
