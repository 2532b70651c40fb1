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

# Read once, when the kernels are first imported: this is when @triton.jit decides between the
# compiler and the interpreter.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

_INT32_MAX = 2**31 - 1

# Launch-parameter overrides, for tests that need e.g. many splits on a tiny tensor.
_OVERRIDES: dict[str, int] = {}


@contextlib.contextmanager
def override_config(**kwargs: int):
    """Force launch parameters (``split``, ``block_m``, ``block_c``, ``block_r``, ``block_k``).

    Only for tests and experiments with the heuristics; values are still clamped to what the
    shape allows.
    """
    old = dict(_OVERRIDES)
    _OVERRIDES.update(kwargs)
    try:
        yield
    finally:
        _OVERRIDES.clear()
        _OVERRIDES.update(old)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation (and saved-statistics) dtype: fp64 for fp64 input, fp32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def tl_dtype(dtype: torch.dtype):
    return {torch.float32: tl.float32, torch.float64: tl.float64}[dtype]


@dataclass(frozen=True)
class Layout:
    """A normalization input seen as a row-major ``[rows, cols]`` matrix.

    kind "ncs": (N, C, S) contiguous, rows = N*C, cols = S, channel = row % C.
    kind "mc":  (M, C) contiguous (channels last, or 2-D), rows = M, cols = C, channel = col.
    """

    kind: str
    tensor: torch.Tensor  # the input, in the memory layout the kernels read
    N: int
    C: int
    S: int
    source: torch.Tensor | None = None  # the caller's input, when ``tensor`` is a copy of it

    @property
    def M(self) -> int:  # values per channel
        return self.N * self.S

    @property
    def rows(self) -> int:
        return self.N * self.C if self.kind == "ncs" else self.M

    @property
    def cols(self) -> int:
        return self.S if self.kind == "ncs" else self.C

    @property
    def int64(self) -> bool:
        return self.tensor.numel() > _INT32_MAX

    @property
    def device(self) -> torch.device:
        return self.tensor.device

    def restore(self, out: torch.Tensor) -> torch.Tensor:
        """``out`` (allocated like ``tensor``) with the strides ``torch.empty_like`` gives the
        caller's input, as PyTorch's own ops and the ops' fake implementations have them."""
        if self.source is None:
            return out
        like = torch.empty_like(self.source)
        if like.stride() == out.stride():
            return out
        return like.copy_(out)


def _channels_last_format(x: torch.Tensor):
    return {4: torch.channels_last, 5: torch.channels_last_3d}.get(x.dim())


def view_layout(x: torch.Tensor) -> Layout:
    """Choose the kernel layout for ``x`` (N, C, *spatial); copies only for exotic strides."""
    N, C = x.shape[0], x.shape[1]
    S = math.prod(x.shape[2:])
    if x.dim() > 2 and x.is_contiguous() and S > 1:
        return Layout("ncs", x, N, C, S)
    fmt = _channels_last_format(x)
    if x.is_contiguous() or (fmt is not None and x.is_contiguous(memory_format=fmt)):
        return Layout("mc", x, N, C, S)  # (N, C), (N, C, 1..), or channels last
    # Any other strides: make the tensor contiguous explicitly, never read it wrongly.
    xc = x.contiguous()
    return Layout("ncs" if S > 1 else "mc", xc, N, C, S, source=x)


def as_layout(t: torch.Tensor, lay: Layout) -> torch.Tensor:
    """``t`` (same shape as the input) with exactly the strides the kernels read for ``lay``."""
    if t.stride() == lay.tensor.stride():
        return t
    out = torch.empty_like(lay.tensor, dtype=t.dtype)
    out.copy_(t)
    return out


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


@dataclass(frozen=True)
class ReduceConfig:
    """Launch of a per-channel split reduction.

    "ncs": the (N, S) values of a channel are ``units`` tiles of [block_n, block_s] (s_blocks
    per row block); each of ``split`` programs per channel takes ``chunk`` consecutive units.
    "mc": each of ``split`` programs per channel group takes ``chunk`` rows of the (M, C)
    matrix, in [block_m, block_c] tiles."""

    split: int
    chunk: int
    block_m: int  # "mc": rows per tile; "ncs": block_n * block_s
    block_c: int
    num_warps: int
    block_n: int = 1
    block_s: int = 1
    s_blocks: int = 1
    units: int = 1


def reduce_config(lay: Layout) -> ReduceConfig:
    """Tiles and split count of a per-channel reduction over ``lay``."""
    big = INTERPRET or lay.device.type != "cuda"
    groups = lay.C
    if lay.kind == "ncs":
        total = _OVERRIDES.get("block_m", 4096 if big else 1024)
        # Fewest masked lanes on a GPU; in the interpreter, fewest (largest) tiles.
        block_s = pick_block(lay.S, total, floor=total if big else min(32, total))
        block_n = max(1, min(triton.next_power_of_2(lay.N), total // block_s))
        s_blocks = triton.cdiv(lay.S, block_s)
        units = triton.cdiv(lay.N, block_n) * s_blocks
        split = _OVERRIDES.get("split", triton.cdiv(_target_programs(lay.device), groups))
        split = max(1, min(split, units))
        chunk = triton.cdiv(units, split)
        split = triton.cdiv(units, chunk)
        num_warps = 4 if block_n * block_s <= 512 else 8
        return ReduceConfig(split, chunk, block_n * block_s, 1, num_warps, block_n, block_s,
                            s_blocks, units)
    block_c = _OVERRIDES.get("block_c", min(triton.next_power_of_2(lay.C), 256 if big else 32))
    block_m = min(triton.next_power_of_2(lay.M), max(1, (8192 if big else 1024) // block_c))
    block_m = _OVERRIDES.get("block_m", block_m)
    groups = triton.cdiv(lay.C, block_c)
    max_split = triton.cdiv(lay.M, block_m)
    split = _OVERRIDES.get("split", triton.cdiv(_target_programs(lay.device), groups))
    split = max(1, min(split, max_split))
    chunk = triton.cdiv(triton.cdiv(lay.M, split), block_m) * block_m
    split = triton.cdiv(lay.M, chunk)
    num_warps = 4 if block_m * block_c <= 512 else 8
    return ReduceConfig(split, chunk, block_m, block_c, num_warps)


@dataclass(frozen=True)
class ApplyConfig:
    block_r: int
    block_k: int
    num_warps: int


def apply_config(lay: Layout) -> ApplyConfig:
    """Tile of an elementwise pass over the ``[rows, cols]`` matrix."""
    big = INTERPRET or lay.device.type != "cuda"
    total = 16384 if big else 2048
    if lay.kind == "ncs":  # cols = S: the block that wastes fewest lanes at the row ends
        block_k = pick_block(lay.cols, total, floor=total if big else 32)
    else:
        block_k = min(triton.next_power_of_2(lay.cols), 128)
    block_k = _OVERRIDES.get("block_k", block_k)
    block_r = max(1, min(triton.next_power_of_2(lay.rows), total // block_k))
    block_r = _OVERRIDES.get("block_r", block_r)
    num_warps = 4 if block_r * block_k <= 1024 else 8
    return ApplyConfig(block_r, block_k, num_warps)


# ----------------------------------------------------------------------------- jit helpers
# Shared by the elementwise kernels of every op family: a program's tile of the [ROWS, COLS]
# matrix, and per-channel values broadcast against it.


@triton.jit
def tile(ROWS, COLS, C, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
         CHAN_ON_ROWS: tl.constexpr, INT64: tl.constexpr):
    """This program's tile: (rows, cols, channel per row or column, its mask, element offsets,
    tile mask). Channel = row % C in the "ncs" layout (CHAN_ON_ROWS), = column in "mc"."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    if INT64:
        rows = rows.to(tl.int64)
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
    u // S_BLOCKS and position block u % S_BLOCKS; no per-element division)."""
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
