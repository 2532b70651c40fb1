"""Layouts and launch heuristics shared by the Triton kernels of every op family."""

from __future__ import annotations

import contextlib
import functools
import math
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ..layout import Layout, view_layout  # noqa: F401  (view_layout: re-exported)
from ..plan import overriding

# Read once, when the kernels are first imported: this is when @triton.jit decides between the
# compiler and the interpreter.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


# Launch-parameter overrides, for tests that need e.g. many splits on a tiny tensor.
_OVERRIDES: dict[str, int] = {}


_STRATEGIES = ("fused", "split")


@contextlib.contextmanager
def override_config(**kwargs):
    """Force launch parameters (``strategy`` = "fused" | "split", ``split``, ``block_m``,
    ``block_c``, ``block_r``, ``block_k``).

    Only for tests and experiments with the heuristics; values are still clamped to what the
    shape allows. Plans made before or inside the block are forgotten on entry and exit.
    """
    if kwargs.get("strategy", "fused") not in _STRATEGIES:
        raise ValueError(f"strategy must be one of {_STRATEGIES}, got {kwargs['strategy']!r}")
    with overriding(_OVERRIDES, kwargs):
        yield


# A channel (or group of channels, channels last) of at most this many values per channel is
# reduced and normalized by one program in one launch per direction ("fused": one program per
# channel reads its values, finalizes the statistics and writes the output, re-reading its
# values from cache); larger ones split each channel over many programs ("split": a reduction
# launch whose last program per channel finalizes, then an elementwise launch). Fused also
# needs enough programs to fill a GPU, unless the whole tensor is small (then launches, not
# bandwidth, are the cost). Not tuned on a GPU yet.
FUSED_MAX_VALUES = 8192
FUSED_MIN_PROGRAMS = 64
FUSED_ANY_NUMEL = 2**18


def strategy(lay: Layout) -> str:
    """"fused" (one launch per direction) or "split" (two) for ``lay``."""
    forced = _OVERRIDES.get("strategy")
    if forced is not None:
        return forced
    if lay.M > FUSED_MAX_VALUES:
        return "split"
    if lay.numel <= FUSED_ANY_NUMEL or reduce_config(lay, fused=True).groups >= FUSED_MIN_PROGRAMS:
        return "fused"
    return "split"


def tl_dtype(dtype: torch.dtype):
    return {torch.float32: tl.float32, torch.float64: tl.float64}[dtype]


@functools.cache
def _num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _target_programs(device: torch.device) -> int:
    if INTERPRET or device.type != "cuda":
        return 2  # the interpreter runs programs one after another: few, large ones
    return 4 * _num_sms(device.index if device.index is not None else torch.cuda.current_device())


def pick_block(extent: int, cap: int, floor: int = 32) -> int:
    """The power-of-two block (between ``floor`` and ``cap``) that wastes the fewest masked
    lanes covering ``extent``; the largest among equals (longer contiguous runs)."""
    best, best_waste = None, None
    b = min(triton.next_power_of_2(extent), cap)
    while True:
        waste = triton.cdiv(extent, b) * b - extent
        if best is None or waste < best_waste:
            best, best_waste = b, waste
        if b <= floor or waste == 0:
            return best
        b //= 2


def _fill(total: int, rows: int) -> int:
    """The narrowest block along a row that still fills a tile of ``total`` values with
    ``rows`` rows (at least 32: one warp's lanes)."""
    return min(total, max(32, total // triton.next_power_of_2(max(rows, 1))))


# What a GPU launches: at most 2^31 - 1 programs on grid x, 65535 on y and z. The reductions'
# grid is (channel groups, SPLIT), SPLIT clamped to 65535; the elementwise grid puts its
# larger side on x (:func:`ew_grid`).
GRID_X_MAX = 2**31 - 1
GRID_YZ_MAX = 65535


def check_grid(grid: tuple, what: str) -> tuple:
    """``grid``, after checking it is within a GPU's limits (a clear error instead of the
    driver's "invalid argument")."""
    limits = (GRID_X_MAX, GRID_YZ_MAX, GRID_YZ_MAX)
    if len(grid) > 3 or any(not 1 <= g <= lim for g, lim in zip(grid, limits)):
        raise ValueError(f"{what}: grid {grid} exceeds a GPU's launch limits (x < 2^31, "
                         f"y, z <= 65535): the input is too large for these kernels")
    return grid


@dataclass(frozen=True)
class ReduceConfig:
    """Launch of a per-channel split reduction: each of ``split`` programs per channel (or
    channel group) takes ``chunk`` of its ``units``, in [block_a, block_b] tiles (the kernels'
    loops: ``range(p * CHUNK, .., BLOCK_A if CL else 1)``, see ``unit``).

    "ncs": units are the [block_n, block_s] tiles of (n, s) of one channel (s_blocks position
    blocks per row block). "mc": units are the M rows of the (M, C) matrix, a tile the
    [block_m, block_c] from one of them: chunk is in rows, a multiple of block_m (a loop over
    tiles numbered by their first row compiles as the rows it was written with: no register
    more than the kernels written for "mc" alone)."""

    split: int
    chunk: int  # units per program ("mc": rows, a multiple of block_m)
    block_a: int  # "ncs": block_n; "mc": block_m (rows per tile)
    block_b: int  # "ncs": block_s; "mc": block_c (channels per program)
    num_warps: int
    s_blocks: int = 1
    units: int = 1
    groups: int = 1  # programs along the channel axis: C ("ncs") or cdiv(C, block_c) ("mc")


def _num_warps(tile: int, itemsize: int, most: int) -> int:
    """``most`` warps, fewer where a thread's share of the tile would be under 16 bytes: each
    thread must hold a full 128-bit access (4 fp32 or 8 fp16/bf16 values) for the loads and
    stores to be vectorized that wide."""
    return max(1, min(most, tile * itemsize // (16 * 32)))


def reduce_config(lay: Layout, fused: bool = False, itemsize: int = 4) -> ReduceConfig:
    """Tiles and split count of a per-channel reduction over ``lay`` (one program per channel
    or channel group if ``fused``), for elements of ``itemsize`` bytes."""
    big = INTERPRET or lay.device.type != "cuda"
    # On a GPU, tiles of 4 KB: 8 warps of threads holding 16 bytes (one 128-bit access) each.
    gpu_total = max(1024, 4096 // itemsize)
    groups = lay.C
    if lay.kind == "ncs":
        total = _OVERRIDES.get("block_m", 4096 if big else gpu_total)
        # Fewest masked lanes on a GPU; in the interpreter, fewest (largest) tiles.
        block_s = pick_block(lay.S, total, floor=total if big else _fill(total, lay.N))
        block_n = max(1, min(triton.next_power_of_2(lay.N), total // block_s))
        s_blocks = triton.cdiv(lay.S, block_s)
        units = triton.cdiv(lay.N, block_n) * s_blocks
        split = _OVERRIDES.get("split", triton.cdiv(_target_programs(lay.device), groups))
        split = 1 if fused else max(1, min(split, units, GRID_YZ_MAX))
        chunk = triton.cdiv(units, split)
        split = triton.cdiv(units, chunk)
        num_warps = _num_warps(block_n * block_s, itemsize, 4 if block_n * block_s <= 512 else 8)
        return ReduceConfig(split, chunk, block_n, block_s, num_warps, s_blocks, units, lay.C)
    # 32 channels a program on a GPU; more when there are few rows (M < 32), so that a tile
    # still holds gpu_total values (else a 2-D (2, 2^24) input runs 2^19 one-warp programs).
    block_c = _OVERRIDES.get("block_c", min(triton.next_power_of_2(lay.C),
                                            256 if big else _fill(gpu_total, lay.M)))
    block_m = min(triton.next_power_of_2(lay.M), max(1, (8192 if big else gpu_total) // block_c))
    block_m = _OVERRIDES.get("block_m", block_m)
    groups = triton.cdiv(lay.C, block_c)
    tiles = triton.cdiv(lay.M, block_m)
    split = _OVERRIDES.get("split", triton.cdiv(_target_programs(lay.device), groups))
    split = 1 if fused else max(1, min(split, tiles, GRID_YZ_MAX))
    chunk = triton.cdiv(tiles, split)
    split = triton.cdiv(tiles, chunk)
    num_warps = _num_warps(block_m * block_c, itemsize, 4 if block_m * block_c <= 512 else 8)
    return ReduceConfig(split, chunk * block_m, block_m, block_c, num_warps, 1, lay.M, groups)


def reduce_shape(lay: Layout, cfg: ReduceConfig) -> dict:
    """The shape arguments of the reduction kernels (both layouts: constexpr CL)."""
    return dict(C=lay.C, S=lay.S, N=lay.N, S_BLOCKS=cfg.s_blocks, UNITS=cfg.units,
                CHUNK=cfg.chunk, SPLIT=cfg.split, BLOCK_A=cfg.block_a, BLOCK_B=cfg.block_b,
                CL=lay.kind != "ncs")


def row_align(n: int) -> int:
    """The largest power of two, up to 16, dividing ``n``: what the kernels may assume of a row
    length (their constexpr ALIGN; see :func:`aligned`)."""
    return math.gcd(n, 16)


@dataclass(frozen=True)
class ApplyConfig:
    block_r: int
    block_k: int
    num_warps: int


def apply_config(lay: Layout, itemsize: int = 4, heavy: bool = False) -> ApplyConfig:
    """Tile of an elementwise pass over the ``[rows, cols]`` matrix of ``itemsize``-byte
    elements. ``heavy``: per-element work dominates (noisy BatchNorm's Philox and Box-Muller):
    one 16-byte vector per thread (4 KB tiles of 8 warps) keeps registers low, where plain
    passes take 8 KB tiles (2048 fp32 or 4096 fp16/bf16 values: two 16-byte vectors a thread,
    for bytes in flight) where rows are 16-byte aligned."""
    big = INTERPRET or lay.device.type != "cuda"
    # 8 KB tiles where rows allow 16-byte accesses (two a thread); else 2048 values, whose
    # narrow accesses each take a register for their address.
    wide = lay.cols * itemsize % 16 == 0
    total = 16384 if big else (max(256, 4096 // itemsize) if heavy else
                               max(2048, 8192 // itemsize) if wide else 2048)
    if lay.kind == "ncs":  # cols = S: the block that wastes fewest lanes at the row ends ...
        # ... among those that still fill a tile of `total` values when there are few rows
        # (N*C): else an odd S gives 32-wide blocks, and a long row of a small batch becomes
        # tens of thousands of one-warp programs.
        block_k = pick_block(lay.cols, total, floor=total if big else _fill(total, lay.rows))
    else:
        # 128 channels a tile; more when there are few rows (a 2-D input with a small batch)
        block_k = min(triton.next_power_of_2(lay.cols),
                      128 if big else max(128, _fill(total, lay.rows)))
    block_k = _OVERRIDES.get("block_k", block_k)
    block_r = max(1, min(triton.next_power_of_2(lay.rows), total // block_k))
    block_r = _OVERRIDES.get("block_r", block_r)
    most = 8 if heavy or block_r * block_k > 1024 else 4
    num_warps = _num_warps(block_r * block_k, itemsize, most)
    return ApplyConfig(block_r, block_k, num_warps)


def ew_grid(lay: Layout, cfg: ApplyConfig) -> tuple[tuple, bool]:
    """(grid, COLS_ON_X) of an elementwise launch: (row blocks, column blocks), or, when there
    are more than 65535 column blocks (a long row: S above 65535 * BLOCK_K), (column blocks,
    row blocks) with the kernels' COLS_ON_X (see ``tile_ids``). Both over 65535 would take
    over 2^32 tiles: not a tensor that fits a GPU."""
    n_r = triton.cdiv(lay.rows, cfg.block_r)
    n_k = triton.cdiv(lay.cols, cfg.block_k)
    cols_on_x = n_k > GRID_YZ_MAX
    grid = (n_k, n_r) if cols_on_x else (n_r, n_k)
    return check_grid(grid, "elementwise launch"), cols_on_x


# ----------------------------------------------------------------------------- jit helpers


@triton.jit
def div_rn(a, b, ACC: tl.constexpr):
    """a / b correctly rounded: Triton's fp32 ``/`` is approximate on NVIDIA GPUs (fp64's is
    IEEE), while the interpreter's and PyTorch's are exact. For results feeding statistics."""
    if ACC == tl.float64:
        out = a / b
    else:
        out = tl.math.div_rn(a, b)
    return out


@triton.jit
def sqrt_rn(a, ACC: tl.constexpr):
    """sqrt(a) correctly rounded (Triton's fp32 tl.sqrt is approximate on NVIDIA GPUs)."""
    if ACC == tl.float64:
        out = tl.sqrt(a)
    else:
        out = tl.math.sqrt_rn(a)
    return out


@triton.jit
def two_sum_err(a, b, s):
    """The rounding error of s = fl(a + b), exactly: a + b = s + err (Knuth's TwoSum)."""
    bb = s - a
    return (a - (s - bb)) + (b - bb)


@triton.jit
def last_of_group(ticket_ptr, group, n):
    """Count this program in; True for the last of the ``n`` programs of ``group`` to arrive
    (it then sees every other program's stores, and resets the ticket for the next launch).

    The barrier orders this program's stores before the release of the ticket; the
    acquire-release atomic makes the others' stores visible to the last program."""
    tl.debug_barrier()
    ticket = tl.atomic_add(ticket_ptr + group, 1, sem="acq_rel")
    return ticket == n - 1
@triton.jit
def aligned(n, ALIGN: tl.constexpr):
    """``n``, a multiple of ALIGN, written as n // ALIGN * ALIGN so the compiler knows it. The
    JIT only specializes an integer argument's divisibility by 16: without this hint a row of
    196 values (14x14) or 4 (2x2) is read one value at a time although every row starts 16
    bytes aligned in fp32 (8 in bf16)."""
    if ALIGN > 1:
        n = n // ALIGN * ALIGN
    return n


# Shared by the elementwise kernels of every op family: a program's tile of the [ROWS, COLS]
# matrix, and per-channel values broadcast against it.


@triton.jit
def program(axis: tl.constexpr, INT64: tl.constexpr):
    """``tl.program_id(axis)``, widened to 64 bits in the INT64 variants *before* any
    arithmetic: a product such as ``program_id * CHUNK`` made in 32 bits wraps at 2^31, and
    the wrapped offsets pass the masks (tests/int64_offsets_check.py checks the IR)."""
    pid = tl.program_id(axis)
    if INT64:
        pid = pid.to(tl.int64)
    return pid


@triton.jit
def tile_ids(INT64: tl.constexpr, COLS_ON_X: tl.constexpr = False):
    """(row block, column block) of this program of an elementwise launch: the grid is
    (row blocks, column blocks), or (column blocks, row blocks) when COLS_ON_X (a GPU allows
    2^31 - 1 programs on grid x but only 65535 on y; see :func:`ew_grid`)."""
    if COLS_ON_X:
        pr = program(1, INT64)
        pk = program(0, INT64)
    else:
        pr = program(0, INT64)
        pk = program(1, INT64)
    return pr, pk


@triton.jit
def tile(ROWS, COLS, C, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
         CHAN_ON_ROWS: tl.constexpr, INT64: tl.constexpr, ALIGN: tl.constexpr = 1,
         COLS_ON_X: tl.constexpr = False):
    """This program's tile: (rows, cols, channel per row or column, its mask, element offsets,
    tile mask). Channel = row % C in the "ncs" layout (CHAN_ON_ROWS), = column in "mc".
    ALIGN: a power of two dividing COLS (see :func:`aligned`). INT64: rows and columns are
    64-bit from the program id on (see :func:`program`)."""
    COLS = aligned(COLS, ALIGN)
    pr, pk = tile_ids(INT64, COLS_ON_X)
    rows = pr * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = pk * BLOCK_K + tl.arange(0, BLOCK_K)
    rmask = rows < ROWS
    kmask = cols < COLS
    if CHAN_ON_ROWS:
        ch = rows % C
        cm = rmask
    else:
        ch = cols
        cm = kmask
    offs = rows[:, None] * COLS + cols[None, :]
    mask = rmask[:, None] & kmask[None, :]
    return rows, cols, ch, cm, offs, mask


@triton.jit
def bcast(v, CHAN_ON_ROWS: tl.constexpr):
    """A per-channel vector (one value per row or per column) broadcast against the tile."""
    if CHAN_ON_ROWS:
        out = v[:, None]
    else:
        out = v[None, :]
    return out


@triton.jit
def chan_load(ptr, ch, cm, other, CHAN_ON_ROWS: tl.constexpr, ACC: tl.constexpr,
              PRESENT: tl.constexpr = True):
    """ptr[ch] in ACC, broadcast against the tile; ``other`` everywhere if not PRESENT (an
    absent weight or bias)."""
    if PRESENT:
        v = tl.load(ptr + ch, mask=cm, other=other).to(ACC)
    else:
        v = tl.full(ch.shape, other, ACC)
    return bcast(v, CHAN_ON_ROWS)


@triton.jit
def ncs_unit(c, u, N, C, S, S_BLOCKS, BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr,
             INT64: tl.constexpr):
    """Offsets and mask of work unit ``u`` of channel ``c`` of an (N, C, S)-contiguous tensor:
    a [BLOCK_N, BLOCK_S] tile of batch rows n and positions s (unit u covers row block
    u // S_BLOCKS and position block u % S_BLOCKS; no per-element division). A unit number
    is below UNITS < 2^31 (tiles, not elements): the INT64 variants, whose ``u`` is 64-bit
    (from a widened program id), divide it in 32 bits and widen the rows n."""
    if INT64:
        u = tl.cast(u, tl.int32)  # (u: a Python int in the interpreter's fused loops)
    nb = u // S_BLOCKS
    n = nb * BLOCK_N + tl.arange(0, BLOCK_N)
    s = (u - nb * S_BLOCKS) * BLOCK_S + tl.arange(0, BLOCK_S)
    if INT64:
        n = n.to(tl.int64)
    offs = (n[:, None] * C + c) * S + s[None, :]
    mask = (n < N)[:, None] & (s < S)[None, :]
    return offs, mask


@triton.jit
def sum_all(a):
    """Sum of a 2-D tile."""
    return tl.sum(tl.sum(a, 1), 0)


# Shared by the reduction kernels of every op family, which take both layouts through a
# constexpr CL (channels last): "ncs" (CL False) gives each program one channel, a scalar, and
# tiles [BLOCK_A, BLOCK_B] = [BLOCK_N, BLOCK_S] of its (n, s) values; "mc" (CL True) gives it a
# group of BLOCK_C = BLOCK_B channels, a vector, and tiles [BLOCK_A, BLOCK_B] = [BLOCK_M,
# BLOCK_C] of the (M, C) matrix. Per-channel values are then scalars or [BLOCK_C] vectors.


@triton.jit
def group(pid, C, BLOCK_C: tl.constexpr, CL: tl.constexpr):
    """The channels of program ``pid`` and their mask: ``pid`` itself, a channel of the
    grid's C, so a constant true mask that the compiler drops ("ncs"), or the BLOCK_C channels
    from pid * BLOCK_C, those below C ("mc")."""
    if CL:
        ch = pid * BLOCK_C + tl.arange(0, BLOCK_C)
        cm = ch < C
    else:
        ch = pid
        cm = tl.full([], 1, tl.int1)
    return ch, cm


@triton.jit
def unit(u, ch, cm, N, C, S, S_BLOCKS, UNITS, BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr,
         CL: tl.constexpr, INT64: tl.constexpr):
    """Offsets and mask of work unit ``u`` of channels ``ch``: tile u of one channel, a
    [BLOCK_N, BLOCK_S] tile of its (n, s) values ("ncs", :func:`ncs_unit`), or rows
    u .. u + BLOCK_M - 1 of the (M, C) matrix in the group's columns, masked at M = UNITS
    (channels last: a unit is named by its first row)."""
    if CL:
        rows = unit_rows(u, BLOCK_A, INT64)
        offs = rows[:, None] * C + ch[None, :]
        mask = (rows < UNITS)[:, None] & cm[None, :]
    else:
        offs, mask = ncs_unit(ch, u, N, C, S, S_BLOCKS, BLOCK_A, BLOCK_B, INT64)
    return offs, mask


@triton.jit
def unit_ptrs(ptr, u, ch, cm, N, C, S, S_BLOCKS, UNITS, BLOCK_A: tl.constexpr,
              BLOCK_B: tl.constexpr, CL: tl.constexpr, INT64: tl.constexpr):
    """``ptr`` + the offsets of :func:`unit`, and its mask, for a loop that reads one tensor:
    channels last, a pointer per row, then its columns (ptxas then keeps fewer registers than
    for ``ptr + offs``)."""
    if CL:
        rows = unit_rows(u, BLOCK_A, INT64)
        mask = (rows < UNITS)[:, None] & cm[None, :]
        ptrs = ptr + rows[:, None] * C + ch[None, :]
    else:
        offs, mask = ncs_unit(ch, u, N, C, S, S_BLOCKS, BLOCK_A, BLOCK_B, INT64)
        ptrs = ptr + offs
    return ptrs, mask


@triton.jit
def unit_rows(u, BLOCK_A: tl.constexpr, INT64: tl.constexpr):
    """The rows of the (M, C) matrix unit ``u`` covers (channels last; see :func:`unit`)."""
    rows = u + tl.arange(0, BLOCK_A)
    if INT64:
        rows = rows.to(tl.int64)
    return rows


@triton.jit
def unit_end(start, CHUNK, UNITS, CL: tl.constexpr):
    """Where a program's units from ``start`` end: CHUNK on, but at most UNITS ("ncs"; units
    past UNITS are masked channels last, where loops step BLOCK_M rows as
    ``range(start, end, BLOCK_A if CL else 1)``)."""
    if CL:
        end = start + CHUNK
    else:
        end = tl.minimum(start + CHUNK, UNITS)
    return end


@triton.jit
def chan_sum(t, CL: tl.constexpr):
    """Per-channel sum of a tile: all of it ("ncs"), or its columns ("mc")."""
    if CL:
        out = tl.sum(t, 0)
    else:
        out = sum_all(t)
    return out


@triton.jit
def chan_bcast(v, CL: tl.constexpr):
    """A per-channel value broadcast against a reduction tile: a scalar as it is ("ncs"), a
    [BLOCK_C] vector over the rows ("mc")."""
    if CL:
        out = v[None, :]
    else:
        out = v
    return out


@triton.jit
def chan_get(ptr, off, cm, other, CL: tl.constexpr, ACC: tl.constexpr,
             PRESENT: tl.constexpr = True, CG: tl.constexpr = False):
    """ptr[off] in ACC per channel (not broadcast), ``off`` the channels' offsets (``ch``, or
    e.g. ``ch * SPLIT + q`` for partials): the program's channel, which exists, read unmasked
    ("ncs"), or its group's, ``other`` past C ("mc"); ``other`` if not PRESENT. CG: bypass L1
    (values other programs wrote)."""
    if PRESENT:
        if CL:
            if CG:
                v = tl.load(ptr + off, mask=cm, other=other, cache_modifier=".cg")
            else:
                v = tl.load(ptr + off, mask=cm, other=other)
        else:
            if CG:
                v = tl.load(ptr + off, cache_modifier=".cg")
            else:
                v = tl.load(ptr + off)
        v = v.to(ACC)
    else:
        v = tl.full(cm.shape, other, ACC)
    return v


@triton.jit
def chan_put(ptr, off, cm, v, CL: tl.constexpr):
    """ptr[off] = v per channel (see :func:`chan_get`; unmasked for the one channel of an
    "ncs" program)."""
    if CL:
        tl.store(ptr + off, v, mask=cm)
    else:
        tl.store(ptr + off, v)


@triton.jit
def reduce_ids(C, S, ALIGN: tl.constexpr, CL: tl.constexpr, INT64: tl.constexpr):
    """The start of a reduction kernel: (C, S) with the row length a known multiple of ALIGN
    (C channels last, S in "ncs"; see :func:`aligned`), and this program's channel group and
    split index (64-bit in the INT64 variants, see :func:`program`)."""
    if CL:
        C = aligned(C, ALIGN)
    else:
        S = aligned(S, ALIGN)
    return C, S, program(0, INT64), program(1, INT64)


@triton.jit
def unit_loads(x_ptr, u, end, ch, cm, N, C, S, S_BLOCKS, UNITS, BLOCK_A: tl.constexpr,
               BLOCK_B: tl.constexpr, CL: tl.constexpr, ACC: tl.constexpr, INT64: tl.constexpr,
               PAIR: tl.constexpr):
    """(x, mask, x2, mask2): x at unit ``u`` (:func:`unit_ptrs`) in ACC and, with PAIR, the
    next unit's (masked from ``end`` on), both loads issued before either value is used: twice
    the bytes in flight for no more accumulators (x2: unused without PAIR)."""
    ptrs, mask = unit_ptrs(x_ptr, u, ch, cm, N, C, S, S_BLOCKS, UNITS, BLOCK_A, BLOCK_B, CL, INT64)
    x = tl.load(ptrs, mask=mask, other=0.0)
    x2 = x
    mask2 = mask
    if PAIR:
        u2 = u + (BLOCK_A if CL else 1)
        ptrs2, mask2 = unit_ptrs(x_ptr, u2, ch, cm, N, C, S, S_BLOCKS, UNITS, BLOCK_A, BLOCK_B,
                                 CL, INT64)
        mask2 = mask2 & (u2 < end)
        x2 = tl.load(ptrs2, mask=mask2, other=0.0).to(ACC)
    return x.to(ACC), mask, x2, mask2


@triton.jit
def put_partials(ws_ptr, ch, cm, p, C, SPLIT, CL: tl.constexpr, a, b, c=None, d=None):
    """Program ``p``'s partials of channels ``ch`` (split reductions): ``a``, ``b`` (and ``c``,
    ``d`` where given) into rows 0, 1 (2, 3) of the [rows, C, SPLIT] workspace at ws_ptr."""
    part = ws_ptr + ch * SPLIT + p
    chan_put(part, 0, cm, a, CL)
    chan_put(part, C * SPLIT, cm, b, CL)
    if c is not None:
        chan_put(part, 2 * C * SPLIT, cm, c, CL)
    if d is not None:
        chan_put(part, 3 * C * SPLIT, cm, d, CL)
