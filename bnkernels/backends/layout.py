"""How a normalization input is laid out for the kernels of every compiled backend: (N, C, S)
contiguous ("ncs") or (N*S, C) contiguous ("mc": channels last, or 2-D); decided once per
input signature (shape and strides), with no tensor at hand (a meta tensor answers)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

_INT32_MAX = 2**31 - 1


@dataclass(frozen=True)
class Layout:
    """How the kernels see an input of one signature: a row-major ``[rows, cols]`` matrix.

    kind "ncs": (N, C, S) contiguous, rows = N*C, cols = S, channel = row % C.
    kind "mc":  (M, C) contiguous (channels last, or 2-D), rows = M, cols = C, channel = col.

    Inputs whose strides are neither are copied to a contiguous layout explicitly (``copy``),
    never misread; their outputs then get the strides ``torch.empty_like`` gives the input
    (``restore``), as PyTorch's own ops and the registered ops' fake implementations have them.
    """

    kind: str
    N: int
    C: int
    S: int
    device: torch.device
    copy: bool = False  # the input must be made contiguous first
    restore_strides: bool = False  # outputs are copied to empty_like(input)'s strides

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
    def numel(self) -> int:
        return self.N * self.C * self.S

    @property
    def int64(self) -> bool:
        return self.numel > _INT32_MAX

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` in the memory layout the kernels read (a copy only for exotic strides)."""
        return x.contiguous() if self.copy else x

    def like(self, t: torch.Tensor, xc: torch.Tensor) -> torch.Tensor:
        """``t`` (x's shape, e.g. dy) strided exactly as ``xc``, copied only if it is not."""
        if t.stride() == xc.stride():
            return t
        return torch.empty_like(xc, dtype=t.dtype).copy_(t)

    def kernel_view(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` (strided as a prepared input) as the (N, C, S) or (N*S, C) matrix the
        kernels read: a view, never a copy."""
        if self.kind == "ncs":
            return t.view(self.N, self.C, self.S)
        if t.is_contiguous():
            return t.view(self.N * self.S, self.C)
        return t.permute(0, *range(2, t.dim()), 1).reshape(self.N * self.S, self.C)

    def restore(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``out`` (allocated like the kernels' input) with empty_like(x)'s strides."""
        if not self.restore_strides:
            return out
        return torch.empty_like(x).copy_(out)


def _channels_last_format(t: torch.Tensor):
    return {4: torch.channels_last, 5: torch.channels_last_3d}.get(t.dim())


def layout_of(shape, stride, device: torch.device) -> Layout:
    """The kernel layout for inputs of this shape and these strides."""
    t = torch.empty_strided(tuple(shape), tuple(stride), device="meta")
    N, C = t.shape[0], t.shape[1]
    S = math.prod(t.shape[2:])
    if t.dim() > 2 and t.is_contiguous() and S > 1:
        return Layout("ncs", N, C, S, device)
    fmt = _channels_last_format(t)
    if t.is_contiguous() or (fmt is not None and t.is_contiguous(memory_format=fmt)):
        return Layout("mc", N, C, S, device)  # (N, C), (N, C, 1..), or channels last
    restore = torch.empty_like(t).stride() != t.contiguous().stride()
    return Layout("ncs" if S > 1 else "mc", N, C, S, device, copy=True,
                  restore_strides=restore)


def view_layout(x: torch.Tensor) -> Layout:
    """The kernel layout of ``x`` (N, C, *spatial)."""
    return layout_of(x.shape, x.stride(), x.device)
