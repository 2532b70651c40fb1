"""Shared test helpers: one tolerance table, a two-sided assert_close that reports the worst
element, and input builders. Imported by the test modules (tests/ is on sys.path via rootdir)."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

import bnkernels as bnk

# Elementwise bound |actual - expected| <= atol * scale + rtol * |expected|, where scale is
# max(1, max|expected|) so sums over many values (weight and bias gradients) are judged relative
# to their size. Low-precision rows follow one unit of rounding of the output dtype.
TOLERANCES = {
    torch.float64: dict(atol=1e-10, rtol=1e-9),
    torch.float32: dict(atol=2e-5, rtol=2e-5),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
    torch.bfloat16: dict(atol=1.6e-2, rtol=1.6e-2),
}


def tolerance(dtype: torch.dtype) -> dict:
    return TOLERANCES[dtype]


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype | None = None,
                 name: str = "tensor", scale: float | None = None) -> None:
    """Two-sided elementwise check against ``expected`` (typically an fp64 reference).

    NaNs must sit at the same places. On failure the message gives the worst element, its index,
    and the fraction of elements outside the bound.
    """
    dtype = dtype or actual.dtype
    tol = TOLERANCES[dtype]
    assert actual.shape == expected.shape, f"{name}: shape {actual.shape} != {expected.shape}"
    a = actual.detach().to(torch.float64).cpu()
    e = expected.detach().to(torch.float64).cpu()
    nan_a, nan_e = torch.isnan(a), torch.isnan(e)
    assert torch.equal(nan_a, nan_e), (
        f"{name}: NaN at different places ({int(nan_a.sum())} actual vs {int(nan_e.sum())})")
    a, e = a[~nan_e], e[~nan_e]
    if e.numel() == 0:
        return
    if scale is None:
        scale = max(1.0, float(e.abs().max()))
    bound = tol["atol"] * scale + tol["rtol"] * e.abs()
    err = (a - e).abs()
    bad = err > bound
    if bool(bad.any()):
        i = int(torch.argmax(err - bound))
        raise AssertionError(
            f"{name} ({dtype}): {int(bad.sum())}/{e.numel()} elements "
            f"({100.0 * float(bad.float().mean()):.2f}%) outside atol={tol['atol']}*{scale:.3g} "
            f"+ rtol={tol['rtol']}; worst at flat index {i}: actual {float(a[i]):.8g}, "
            f"expected {float(e[i]):.8g}, |diff| {float(err[i]):.3g} > {float(bound[i]):.3g}")


def assert_no_worse_than_torch(ours: torch.Tensor, theirs: torch.Tensor, exact: torch.Tensor,
                               dtype: torch.dtype, name: str = "tensor", factor: float = 2.0):
    """flash-attention's rule for low precision: our max error against the fp64 result is at
    most ``factor`` x PyTorch's own max error at this dtype (plus one tolerance unit, so an
    exact PyTorch result does not demand an exact one from us)."""
    e = exact.detach().double().cpu()
    scale = max(1.0, float(e.abs().max()))
    ours_err = float((ours.detach().double().cpu() - e).abs().nan_to_num(0).max())
    torch_err = float((theirs.detach().double().cpu() - e).abs().nan_to_num(0).max())
    allowed = factor * torch_err + TOLERANCES[dtype]["atol"] * scale
    assert ours_err <= allowed, (
        f"{name} ({dtype}): max error {ours_err:.3g} vs fp64 exceeds {factor} x PyTorch's own "
        f"{torch_err:.3g} (+ {TOLERANCES[dtype]['atol'] * scale:.3g})")


@dataclass(frozen=True)
class Case:
    """A normalization input: shape, memory layout and dtypes."""

    shape: tuple
    channels_last: bool = False
    dtype: torch.dtype = torch.float32
    param_dtype: torch.dtype | None = None  # weight/bias/running stats; None: same as x

    @property
    def pdtype(self) -> torch.dtype:
        return self.param_dtype or self.dtype

    def __str__(self) -> str:
        s = "x".join(map(str, self.shape)) + ("-cl" if self.channels_last else "")
        s += "-" + str(self.dtype).replace("torch.", "")
        return s + (f"-p{str(self.param_dtype).replace('torch.', '')}"
                    if self.param_dtype else "")


def to_layout(t: torch.Tensor, channels_last: bool) -> torch.Tensor:
    if not channels_last:
        return t.contiguous()
    fmt = {4: torch.channels_last, 5: torch.channels_last_3d}[t.dim()]
    return t.contiguous(memory_format=fmt)


def make_inputs(case: Case, device, seed: int = 0, shift: float = 0.5, spread: float = 2.0):
    """x, weight, bias, running_mean, running_var, dy for ``case`` (fp64 values, rounded to the
    case's dtypes), deterministic in ``seed``."""
    g = torch.Generator().manual_seed(seed)
    C = case.shape[1]
    x = torch.randn(case.shape, generator=g, dtype=torch.float64) * spread + shift
    # Per-channel offsets and scales so channels differ.
    view = (1, C) + (1,) * (len(case.shape) - 2)
    x = x * torch.linspace(0.5, 2.0, C, dtype=torch.float64).view(view)
    x = x + torch.linspace(-1.0, 3.0, C, dtype=torch.float64).view(view)
    w = torch.rand(C, generator=g, dtype=torch.float64) + 0.5
    b = torch.randn(C, generator=g, dtype=torch.float64)
    rm = torch.randn(C, generator=g, dtype=torch.float64) * 0.1
    rv = torch.rand(C, generator=g, dtype=torch.float64) + 0.5
    dy = torch.randn(case.shape, generator=g, dtype=torch.float64)

    def dev(t, dt, layout=False):
        t = t.to(dt).to(device)
        return to_layout(t, case.channels_last) if layout else t

    return dict(
        x=dev(x, case.dtype, True), weight=dev(w, case.pdtype), bias=dev(b, case.pdtype),
        running_mean=dev(rm, case.pdtype), running_var=dev(rv, case.pdtype),
        dy=dev(dy, case.dtype, True),
    )


def numel_per_channel(shape) -> int:
    return shape[0] * math.prod(shape[2:])


def use_backend(name: str) -> None:
    """Select a backend by its test name: "reference", "triton" (its own choice of strategy
    per shape), or "triton-fused" / "triton-split" (that strategy forced: one launch per
    direction, or each channel split over many programs and finalized by the last), or "cpu"
    (the C kernels of CPU tensors: the test is skipped where the tests' device is a GPU)."""
    from bnkernels.backends.triton import common

    if name == "cpu" and torch.cuda.is_available():
        import pytest

        pytest.skip("the cpu backend runs CPU tensors; the tests' device is a GPU")

    backend, _, strategy = name.partition("-")
    common._OVERRIDES.pop("strategy", None)
    if strategy:
        common._OVERRIDES["strategy"] = strategy
    bnk.set_backend(backend)  # forgets every plan made under the previous choice


def run_compiler_script(name: str, *args: str, timeout: float = 900) -> str:
    """Run ``tests/<name>`` in a subprocess with the Triton interpreter off (so Triton's real
    compiler runs, for sm_90, without a GPU); assert it succeeded and give its stdout."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = Path(__file__).with_name(name)
    proc = subprocess.run([sys.executable, str(script), *args], env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout
