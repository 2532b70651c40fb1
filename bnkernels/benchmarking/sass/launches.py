"""Which kernels a benchmark case launches on an H200, recorded without a GPU.

:func:`launches_of` is the only code in :mod:`bnkernels.benchmarking.sass` that knows the plans
(their constructors and call signatures); everything else sees the :class:`LaunchSpec` list it
returns. It runs the real plan call under :func:`gpu_host`: tensors are fake CUDA tensors
(``FakeTensorMode``: shapes, strides, dtypes, no storage), ``torch.cuda`` answers for an H200
(132 SMs), so the plans' GPU heuristics (tiles, split counts) run as on the GPU, and
``JITFunction.run`` records each launch instead of launching.
"""

from __future__ import annotations

import contextlib
import math
import sys
import types
from dataclasses import dataclass

import torch

from .. import shapes as S

PASSES = ("fwd-train", "bwd", "fwd-eval", "bwd-eval")
OPS = ("batch_norm", "noisy_batch_norm", "lp_norm", "batch_norm_add_relu")
# batch_norm_add_relu: relu(batch_norm(x) + residual), bnkernels.batch_norm(..., residual=z,
# activation="relu") (the residual strided as x)
DIRECTION = {"fwd-train": "forward", "bwd": "backward", "fwd-eval": "forward",
             "bwd-eval": "backward"}
TRAINING = {"fwd-train": True, "bwd": True, "fwd-eval": False, "bwd-eval": False}
LP_PS = {"1": 1.0, "2": 2.0, "inf": math.inf}
SMS = 132  # the H200's streaming multiprocessors


@dataclass(frozen=True)
class Case:
    """One benchmark row: op (and p), pass, input shape, dtype, layout."""

    op: str
    p: str | None
    pass_: str
    dims: tuple[int, ...]
    dtype: str
    layout: str  # NCHW | channels_last | NC

    @property
    def name(self) -> str:
        op = self.op + (f"(p={self.p})" if self.p else "")
        return (f"{op} {self.pass_} {'x'.join(map(str, self.dims))} {self.dtype} "
                f"{self.layout}")

    def example(self, device="meta") -> torch.Tensor:
        """An (uninitialized) input of this case's shape, dtype and memory format."""
        fmt = torch.channels_last if self.layout == "channels_last" else torch.contiguous_format
        return torch.empty(self.dims, device=device, dtype=S.DTYPES[self.dtype],
                           memory_format=fmt)


def cases(shapes, dtypes, layouts, ops=OPS, passes=PASSES, lp_ps=("2",)) -> list[Case]:
    """The product, in the suite's order; noisy BatchNorm has no eval passes (in eval mode it
    runs BatchNorm's kernels with the noise's expected affine)."""
    out = []
    for shape in shapes:
        dims = tuple(getattr(shape, "dims", shape))
        for dtype in dtypes:
            for layout in layouts:
                label = S.layout_name(dims, layout)
                if label is None:
                    continue
                for op in ops:
                    for p in (lp_ps if op == "lp_norm" else (None,)):
                        for pass_ in passes:
                            if op == "noisy_batch_norm" and not TRAINING[pass_]:
                                continue
                            out.append(Case(op, p, pass_, dims, dtype, label))
    return out


@dataclass
class LaunchSpec:
    """One kernel launch as a plan makes it: ``kernel[grid](*args, **kwargs)``."""

    kernel: object  # the @triton.jit function (triton.runtime.jit.JITFunction)
    grid: tuple[int, ...]
    args: tuple  # positional arguments (tensors are fake CUDA tensors)
    kwargs: dict  # keyword arguments: named arguments, constexprs, num_warps, num_stages


@contextlib.contextmanager
def gpu_host(sms: int = SMS):
    """Run host code as on an H200 without one: tensors made inside are fake CUDA tensors,
    torch.cuda answers for the device, and Triton launches are recorded (yields the list they
    are appended to, as :class:`LaunchSpec`)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from triton.runtime.jit import JITFunction

    common = sys.modules.get("bnkernels.backends.triton.common")
    if common is not None and common.INTERPRET:
        raise RuntimeError("bnkernels' Triton kernels were loaded with TRITON_INTERPRET=1; "
                           "the SASS report needs a process with the interpreter off "
                           "(bnkernels bench --sass starts one)")
    props = types.SimpleNamespace(
        name="NVIDIA H200", major=9, minor=0, multi_processor_count=sms,
        total_memory=141 * 10**9, L2_cache_size=50 * 2**20,
        max_threads_per_multi_processor=2048, regs_per_multiprocessor=65536, warp_size=32)
    recorded: list[LaunchSpec] = []

    def record(self, *args, grid, warmup, **kwargs):
        if warmup:
            raise RuntimeError("gpu_host: a warmup call inside a recorded plan call")
        grid = grid(kwargs) if callable(grid) else grid
        recorded.append(LaunchSpec(self, tuple(int(g) for g in grid), args, dict(kwargs)))

    patches = [(torch.cuda, "get_device_properties", lambda *a, **k: props),
               (torch.cuda, "current_device", lambda: 0),
               (torch.cuda, "device_count", lambda: 1),
               (torch.cuda, "is_current_stream_capturing", lambda: False),
               (JITFunction, "run", record)]
    if hasattr(torch._C, "_cuda_getCurrentRawStream"):
        patches.append((torch._C, "_cuda_getCurrentRawStream", lambda index: 0))
    from ...backends.triton import launch as triton_launch  # its device guard asks the driver

    if hasattr(triton_launch, "_get_device"):
        patches.append((triton_launch, "_get_device", lambda: 0))
    saved = [(obj, name, getattr(obj, name)) for obj, name, _ in patches]
    try:
        for obj, name, value in patches:
            setattr(obj, name, value)
        with FakeTensorMode(allow_non_fake_inputs=True):
            yield recorded
    finally:
        for obj, name, value in saved:
            setattr(obj, name, value)
        if "bnkernels.backends" in sys.modules:  # plans made for the fake device must not
            sys.modules["bnkernels.backends"].clear_plans()  # serve real calls later


# ----------------------------------------------------------------------------- the adapter
# What follows knows the plans; a change of the plans' interface is answered here alone.


def case_signature(case: Case):
    """The plans' :class:`~bnkernels.backends.plan.Signature` of ``case`` on a CUDA device, as
    the benchmark's calls make it: fp32 weight, bias and running statistics (contiguous), no
    activation (ReLU and a residual of x's shape and dtype for batch_norm_add_relu), no step
    counter, an integer noise step (the paper's NoiseConfig), l_p uncentered."""
    from ...backends.plan import Signature
    from ...noise import NoiseConfig

    x = case.example("meta")
    device = torch.device("cuda", 0)
    channel = (torch.float32, device, case.dims[1], True)
    lp = case.op == "lp_norm"
    noisy = (NoiseConfig(), None) if case.op == "noisy_batch_norm" else None  # an int step
    res = case.op == "batch_norm_add_relu"
    return Signature("lp_norm" if lp else "batch_norm", tuple(x.shape), tuple(x.stride()),
                     x.dtype, device, TRAINING[case.pass_], "relu" if res else None, noisy,
                     LP_PS[case.p] if lp else None, False if lp else None, False,
                     (channel,) * 4, (x.dtype, device, x.shape) if res else None, None)


def launches_of(op: str, sig, direction: str) -> list[LaunchSpec]:
    """The kernel launches the Triton plan of ``sig`` makes for ``op`` ("batch_norm",
    "noisy_batch_norm", "lp_norm") in ``direction`` ("forward", "backward"; training or eval as
    ``sig.training`` says), as the benchmark calls it: a training forward as autograd makes it,
    an eval forward under no_grad, a backward wanting dx, dweight and dbias (after the forward
    that saved its statistics). ``sig.device`` is a CUDA device; the plan runs under
    :func:`gpu_host`, which records the launches (a plan's pre-bound launches go through
    ``kernel[grid](...)`` on their first call, which is what is recorded)."""
    from ...backends.plan import Call, Saved
    from ...backends.triton import TritonBackend

    with gpu_host() as recorded:
        x = torch.empty_strided(sig.shape, sig.stride, dtype=sig.dtype, device=sig.device)
        rm, rv, w, b = (torch.empty(c[2], device=c[1], dtype=c[0]) for c in sig.channels)
        plan = TritonBackend().plan(sig)
        noise = (sig.noisy[0], 0, 0) if op == "noisy_batch_norm" else None
        backward = direction == "backward"
        res = None if sig.residual is None else torch.empty_like(x)
        y, a, s, used = plan.forward(x, w, b, Call(rm, rv, plan, 0.1, 1e-5, noise, None),
                                     backward or sig.training, res)
        if not backward:
            return list(recorded)
        recorded.clear()
        if used is not None:
            noise = (noise[0], noise[1], used)
        # with a residual: d(residual) too, the ReLU's mask read from the output
        plan.backward(torch.empty_like(x), x, w, b,
                      Saved(a, s, 1e-5, noise, None if res is None else y),
                      (True,) * (3 if res is None else 4))
        return list(recorded)


def case_launches(case: Case) -> list[LaunchSpec]:
    """:func:`launches_of` for a benchmark case."""
    return launches_of(case.op, case_signature(case), DIRECTION[case.pass_])
