"""The CUDA C++ backend (csrc/ + bnkernels/backends/cuda/).

Three tiers, all collected everywhere:

1. Registration and selection: the backend is listed with its reasons, rejects CPU tensors, and
   "auto" follows the measured-speed table; the launchers' layouts (pure Python).
2. The build check (the CI's): ``python -m bnkernels.backends.cuda build`` compiles the extension
   with nvcc -- no GPU needed -- and the library imports. Skipped, with the reason, only where
   there is no CUDA toolkit.
3. The kernels, through the public API with backend "cuda", against PyTorch in fp64 (the same
   checks and tolerances as test_batch_norm / test_noisy_batch_norm / test_lp_norm), the
   reference, and on a GPU the Triton backend; gradcheck in fp64; determinism; persistent vs
   multi-pass. On a GPU they run the real extension on CUDA tensors. Without one they run the
   very same kernel code built for the CPU emulator (tests/cuda_emulator: every CUDA thread a
   coroutine, real barrier and shuffle semantics) on CPU tensors -- a check of the kernels'
   logic, not of GPU behaviour; the GPU-only tests are skipped there. The emulator also counts
   the launches of each call and can run a launch's blocks in another order (so that a
   last-block finalize is seen to give the same bits whichever block finishes last).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import test_batch_norm as bn_tests
import test_fuzz as fuzz_tests
import test_lp_norm as lp_tests
import test_noisy_batch_norm as noisy_tests
import test_residual as res_tests
import torch
import torch.nn.functional as F
from conftest import toolkit_env
from helpers import Case, assert_close, make_inputs

import bnkernels as bnk
from bnkernels import backends
from bnkernels.backends import reference as R
from bnkernels.backends import speed
from bnkernels.backends.cuda import CudaBackend
from bnkernels.backends.cuda import build_config as cuda_build
from bnkernels.backends.cuda import loader as cuda_loader
from bnkernels.backends.cuda import plans as cuda
from bnkernels.backends.layout import view_layout
from bnkernels.backends.plan import FLOAT_DTYPES, Call, Saved, Signature

GPU = torch.cuda.is_available()
gpu_only = pytest.mark.skipif(not GPU, reason="needs a CUDA device (the emulator is no GPU)")

ENTRY_POINTS = ("bn_forward_train", "bn_stats", "bn_apply", "bn_backward", "bn_bwd_reduce",
                "bn_bwd_dx", "noisy_bn_noise", "lp_forward_train", "lp_backward_train",
                "persistent_plan")
CFG = bnk.NoiseConfig()


# ============================================================================= 1. registration


def test_registered_and_selectable():
    assert "cuda" in bnk.available_backends()
    bnk.set_backend("cuda")
    assert bnk.get_backend() == "cuda"
    assert backends.backend("cuda").name == "cuda"


@pytest.mark.skipif(GPU, reason="checks the reasons given on a machine without a GPU")
def test_unavailable_without_a_gpu_says_why():
    reasons = bnk.available_backends()["cuda"]
    assert any("no CUDA device" in r for r in reasons), reasons


def test_rejects_cpu_tensors_and_other_dtypes():
    be = backends.backend("cuda")
    reasons = be.not_supported_reasons("batch_norm", torch.ones(2, 3))
    assert reasons == ["the cuda backend needs CUDA tensors; x is on cpu"]
    reasons = be.not_supported_reasons("batch_norm", torch.ones(2, 3, dtype=torch.int32))
    assert "dtype torch.int32 is not supported" in reasons
    bnk.set_backend("cuda")
    with pytest.raises(RuntimeError, match="(?s)no backend can run batch_norm.*x is on cpu"):
        bnk.batch_norm(torch.randn(4, 3), None, None, training=True)


def test_plans_follow_the_plan_protocol():
    """The cuda backend's plans have the methods every backend's plans have (the Plan
    protocol, and SyncStages for BatchNorm), with the same parameters."""
    import inspect

    from bnkernels.backends.plan import Plan, SyncStages
    from bnkernels.backends.reference import BatchNormPlan as RefBN
    from bnkernels.backends.reference import LpNormPlan as RefLp

    for ours, ref, protocols in ((cuda.BatchNormPlan, RefBN, (Plan, SyncStages)),
                                 (cuda.LpNormPlan, RefLp, (Plan,))):
        for proto in protocols:
            for name in ("forward", "backward", "stats", "apply", "bwd_reduce", "bwd_dx"):
                if not hasattr(proto, name):
                    continue
                want = inspect.signature(getattr(proto, name)).parameters
                for cls in (ours, ref):
                    got = inspect.signature(getattr(cls, name)).parameters
                    assert len(got) >= len(want), (cls, name, list(got))
                    # the same positions; defaults where the protocol has them
                    for (_, wp), (gn, gp) in zip(want.items(), got.items()):
                        assert (wp.default is wp.empty) or gp.default == wp.default, \
                            (cls, name, gn)


def test_unbuildable_extension_reports_why(monkeypatch):
    """As after `pip install .` on a machine without a toolkit: the reason is listed, and an
    explicit build says what is missing."""
    monkeypatch.setattr(cuda_loader, "_ext", None)
    monkeypatch.setattr(cuda_loader, "is_built", lambda: False)
    monkeypatch.setattr(cuda_loader, "_toolkit_problem", lambda: "no CUDA toolkit (nvcc) found")
    reasons = CudaBackend().unavailable_reasons()
    assert any("not built, and cannot be built here: no CUDA toolkit" in r for r in reasons)
    with pytest.raises(RuntimeError, match="(?s)cannot build the CUDA extension.*no CUDA toolkit"):
        cuda_loader.build()
    monkeypatch.setenv("BNKERNELS_SKIP_CUDA_BUILD", "1")
    assert any("BNKERNELS_SKIP_CUDA_BUILD=1" in r for r in cuda_loader.build_reasons())


def test_loader_ignores_incomplete_or_stale_builds(monkeypatch, tmp_path):
    """A truncated or half-written cached library is not "built" (it is rebuilt, never
    imported); a prebuilt module from other sources is not "built" either, so auto takes
    Triton; a build is installed by atomic renames with its record last; a failed build keeps
    the compiler's whole output."""
    import types

    monkeypatch.setattr(cuda_loader, "_ext", None)
    monkeypatch.setattr(cuda_loader, "_build_error", None)
    lib = tmp_path / "cuda-x" / f"{cuda_build.EXT_NAME}.so"
    lib.parent.mkdir()
    monkeypatch.setattr(cuda_loader, "library_path", lambda: lib)
    monkeypatch.setattr(cuda_loader, "_prebuilt_module", lambda: None)
    built = tmp_path / "built.so"
    built.write_bytes(b"\x7fELF" + bytes(range(256)) * 64)
    assert not cuda_loader.is_built()
    cuda_loader._install(built, lib)
    assert cuda_loader.is_built() and lib.read_bytes() == built.read_bytes()
    assert [p.name for p in lib.parent.iterdir() if p.name.startswith(".")] == []
    lib.write_bytes(built.read_bytes()[:1000])  # truncated (a crash, a half-copied file)
    assert not cuda_loader.is_built()
    lib.write_bytes(built.read_bytes())
    assert cuda_loader.is_built()
    lib.unlink()
    assert not cuda_loader.is_built()
    # A stale prebuilt module: not built, so auto does not pick the cuda backend.
    monkeypatch.undo()
    monkeypatch.setattr(cuda_loader, "_ext", None)
    monkeypatch.setattr(cuda_loader, "library_path", lambda: lib)
    stale = types.ModuleType(cuda_build.PREBUILT)
    stale.SOURCE_HASH = "h-from-other-sources"
    monkeypatch.setitem(sys.modules, cuda_build.PREBUILT, stale)
    real_find = cuda_loader.importlib.util.find_spec
    monkeypatch.setattr(cuda_loader.importlib.util, "find_spec",
                        lambda name, *a: object() if name == cuda_build.PREBUILT
                        else real_find(name, *a))
    cuda_loader._prebuilt_module.cache_clear()
    try:
        with pytest.warns(UserWarning, match="not built from the current csrc"):
            assert not cuda_loader.is_built()
        assert not CudaBackend().is_built()
        x = SimpleNamespace(device=torch.device("cuda", 0), numel=lambda: 1000)
        monkeypatch.setattr(speed, "faster", lambda op, x: "cuda")
        assert backends._auto_order(x, "batch_norm") == ["triton", "reference"]
    finally:
        cuda_loader._prebuilt_module.cache_clear()
    # A failed build: the whole compiler output is kept, its error lines are the reason.
    output = ("[1/3] nvcc -c bindings.cpp\nFAILED: bindings.o\n"
              "bindings.cpp:12:3: error: 'foo' was not declared in this scope\n"
              "ninja: build stopped: subcommand failed.")
    monkeypatch.setattr(cuda_loader, "_build_error", f"RuntimeError: {output}")
    assert "error: 'foo' was not declared" in cuda_loader.build_error()
    (reason,) = cuda_loader.extension_reasons()
    assert "'foo' was not declared" in reason and "ninja: build stopped" not in reason


def test_auto_uses_the_measured_speed_table(monkeypatch):
    """CUDA tensors: the faster of cuda/triton per the table; triton where nothing was measured;
    the cuda backend only once built (auto never compiles)."""
    def x(numel):
        return SimpleNamespace(device=torch.device("cuda", 0), numel=lambda: numel)

    entries = ({"device": "GPU-X", "op": "batch_norm", "max_numel": 4096, "triton_us": 9.0,
                "cuda_us": 5.0},
               {"device": "GPU-X", "op": "batch_norm", "max_numel": 2**20, "triton_us": 50.0,
                "cuda_us": 70.0})
    monkeypatch.setattr(speed, "_entries", lambda: entries)
    monkeypatch.setattr(speed, "_device_name", lambda index: "GPU-X")
    monkeypatch.setattr(CudaBackend, "is_built", lambda self: True)
    assert backends._auto_order(x(1000), "batch_norm") == ["cuda", "triton", "reference"]
    assert backends._auto_order(x(10**5), "batch_norm") == ["triton", "cuda", "reference"]
    assert backends._auto_order(x(10**8), "batch_norm") == ["triton", "cuda", "reference"]
    assert backends._auto_order(x(1000), "lp_norm") == ["triton", "cuda", "reference"]
    monkeypatch.setattr(speed, "_device_name", lambda index: "GPU-Y")
    assert backends._auto_order(x(1000), "batch_norm") == ["triton", "cuda", "reference"]
    monkeypatch.setattr(CudaBackend, "is_built", lambda self: False)
    assert backends._auto_order(x(1000), "batch_norm") == ["triton", "reference"]


def test_speed_table_from_benchmark_results():
    def row(provider, us, numel=100, pass_="fwd-train", mode="eager"):
        return {"provider": provider, "median_us": us, "op": "batch_norm", "p": None,
                "pass": pass_, "shape": [1, 1, 10, 10], "dtype": "float32",
                "layout": "nchw", "numel": numel, "mode": mode}

    rows = [row("bnkernels-triton", 10.0), row("bnkernels-cuda", 6.0),
            row("bnkernels-triton", 20.0, pass_="bwd"), row("bnkernels-cuda", 30.0, pass_="bwd"),
            row("bnkernels-triton", 1.0, numel=7), row("cudnn", 1.0)]  # no cuda row for 7
    graph = [dict(r, mode="graph", median_us=r["median_us"] / 10) for r in rows]
    table = speed.table_from_results({"device": "GPU-X", "rows": rows + graph}, "run.json")
    # Eager rows (what a call costs a user) win over the graph replays of the same run.
    assert table == [{"device": "GPU-X", "op": "batch_norm", "max_numel": 100,
                      "triton_us": 30.0, "cuda_us": 36.0, "rows": 2, "mode": "eager",
                      "source": "run.json"}]
    table = speed.table_from_results({"device": "GPU-X", "rows": graph}, "run.json")
    assert table[0]["mode"] == "graph" and table[0]["triton_us"] == 3.0
    shipped = json.loads(speed.TABLE.read_text())
    assert isinstance(shipped["entries"], list) and "doc" in shipped


LAYOUT_CASES = [((2, 3, 4, 5), None), ((2, 3, 4, 5), torch.channels_last), ((6, 3), None),
                ((2, 3, 1, 1), None), ((2, 3, 2, 3, 2), torch.channels_last_3d), ((4, 5, 7), None)]


@pytest.mark.parametrize("shape,fmt", LAYOUT_CASES, ids=str)
def test_layouts_are_views_and_outputs_keep_the_strides(shape, fmt):
    """What the plans hand the extension: x itself as (N, C, S) or (N*S, C), a view."""
    x = torch.randn(shape)
    if fmt is not None:
        x = x.contiguous(memory_format=fmt)
    lay = view_layout(x)
    N, C, S = shape[0], shape[1], math.prod(shape[2:])
    xc = lay.prepare(x)
    t = lay.kernel_view(xc)
    assert t.data_ptr() == x.data_ptr() and t.is_contiguous()  # a view, no copy
    assert t.shape == ((N, C, S) if lay.kind == "ncs" else (N * S, C))
    assert lay.kind == ("ncs" if fmt is None and S > 1 else "mc")
    y = torch.empty_like(xc)
    yk = lay.kernel_view(y)
    assert y.stride() == x.stride() and yk.data_ptr() == y.data_ptr()
    # The kernel view of the output is laid out as x's: element (n, c, s) at the same offset.
    yk.copy_(t)
    assert torch.equal(lay.restore(y, x), x)


def test_layout_of_odd_strides_is_an_explicit_copy():
    base = torch.randn(5, 6, 9, 8)
    x = base[:, ::2, :, 1:7]
    lay = view_layout(x)
    xc = lay.prepare(x)
    t = lay.kernel_view(xc)
    assert lay.kind == "ncs" and t.data_ptr() != x.data_ptr()
    assert torch.equal(t.view(x.shape), x)
    y = torch.empty_like(xc)
    lay.kernel_view(y).copy_(t)
    out = lay.restore(y, x)
    assert torch.equal(out, x) and out.stride() == torch.empty_like(x).stride()
    dy = torch.randn(x.shape).contiguous(memory_format=torch.channels_last)
    assert torch.equal(lay.kernel_view(lay.like(dy, xc)).view(x.shape), dy)


# ============================================================================= 2. the build


_toolkit_env = toolkit_env  # from conftest


def _build(env) -> tuple[subprocess.CompletedProcess, float]:
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "bnkernels.backends.cuda", "build"], env=env,
                          capture_output=True, text=True, timeout=1800)
    return proc, time.monotonic() - t0


@pytest.mark.skipif(_toolkit_env() is None, reason="no CUDA toolkit (nvcc): set CUDA_HOME to "
                    "check that the extension builds")
def test_extension_builds_and_imports(background_build):
    """The CI's build check: nvcc compiles csrc/ (for sm_80 and sm_90 on a machine without a
    GPU), the library imports (no GPU needed for that), and a second build is a cache hit.
    (Without a GPU the first build started in the background with the session.)"""
    env = _toolkit_env()
    if not GPU and not env.get("TORCH_CUDA_ARCH_LIST"):
        assert cuda_build.arch_list() == "8.0;9.0+PTX"
        assert {"-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90",
                "-gencode=arch=compute_90,code=compute_90"} \
            <= set(cuda_build.nvcc_flags(cuda_build.arch_list()))  # PTX for newer GPUs
    proc = background_build("cuda") or _build(env)[0]
    assert proc.returncode == 0, proc.stderr[-6000:]
    path = Path(proc.stdout.strip().splitlines()[-1])
    assert path.is_file() and path.suffix == ".so", proc.stdout
    assert path.parent.parent == cuda_build.cache_root()
    assert cuda_loader.library_complete(path)  # renamed into place, its record written last
    mod = cuda_loader._import_library(path)
    assert mod.SOURCE_HASH == cuda_build.source_hash()
    for name in ENTRY_POINTS:
        assert callable(getattr(mod, name)), name
    again, seconds = _build(env)  # cached: ninja finds nothing to do
    assert again.returncode == 0 and again.stdout.strip().splitlines()[-1] == str(path)
    assert seconds < 120, f"a cached build took {seconds:.0f} s"


# ============================================================================= 3. the kernels


@pytest.fixture(scope="module")
def _kernel_module(background_build):
    """The extension to test: the real one on a GPU, else the CPU emulation build (started in
    the background with the session: waited for here, then imported from its cache)."""
    if GPU:
        why = [] if cuda_loader.is_built() else cuda_loader.build_reasons()
        if why:
            pytest.skip("the CUDA extension is not built and cannot be built here: " +
                        "; ".join(why))
        return cuda_loader.load(), torch.device("cuda")
    try:
        import cuda_emulator

        background_build("emulator")  # one build of the emulation at a time
        return cuda_emulator.build(), torch.device("cpu")
    except Exception as e:  # e.g. no host compiler: every kernel test would be lost
        why = f"cannot build the CPU emulation of the kernels: {type(e).__name__}: {e}"
        if os.environ.get("BNKERNELS_TESTS_ALLOW_NO_EMULATOR", "0") == "1":
            pytest.skip(f"{why} (BNKERNELS_TESTS_ALLOW_NO_EMULATOR=1)")
        pytest.fail(f"{why}\n(set BNKERNELS_TESTS_ALLOW_NO_EMULATOR=1 to skip the kernel tests "
                    "instead)", pytrace=False)


@pytest.fixture
def dev(_kernel_module, monkeypatch):
    """The device the cuda backend's kernels run on in this test (CPU under the emulator)."""
    module, device = _kernel_module
    if device.type == "cpu":  # route the cuda backend to the emulated kernels, on CPU tensors
        monkeypatch.setattr(cuda_loader, "_ext", module)
        monkeypatch.setattr(CudaBackend, "unavailable_reasons", lambda self: [])
        monkeypatch.setattr(CudaBackend, "not_supported_reasons",
                            lambda self, op, x: [] if x.dtype in FLOAT_DTYPES
                            else [f"dtype {x.dtype} is not supported"])
    return device


@gpu_only
def test_available_on_a_gpu(dev):
    assert bnk.available_backends()["cuda"] == []


# ----------------------------------------------------------------------------- BatchNorm

# Beside test_batch_norm's odd shapes, aligned ones: 128-bit vector accesses in every layout.
ALIGNED = [Case(s, cl, dt) for s, cl in [((4, 8, 8, 8), False), ((4, 16, 4, 4), True),
                                         ((32, 24), False)]
           for dt in (torch.float32, torch.float16, torch.bfloat16)]


@pytest.mark.parametrize("case", bn_tests.CASES + ALIGNED, ids=str)
def test_batch_norm_training_matches_torch(case, dev):
    bn_tests.check_against_torch(case, dev, "cuda", training=True)


@pytest.mark.parametrize("case", bn_tests.CASES[::2] + ALIGNED[::2], ids=str)
def test_batch_norm_eval_matches_torch(case, dev):
    bn_tests.check_against_torch(case, dev, "cuda", training=False)


@pytest.mark.parametrize("case", bn_tests.OPTION_CASES, ids=str)
@pytest.mark.parametrize("options", [
    dict(training=True, activation="relu"), dict(training=False, activation="relu"),
    dict(training=True, affine=False), dict(training=False, affine=False),
    dict(training=True, track=False), dict(training=True, momentum=0.0),
    dict(training=True, momentum=1.0, eps=1e-3)],
    ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_batch_norm_options_match_torch(case, options, dev):
    bn_tests.check_against_torch(case, dev, "cuda", **options)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("activation", [None, "relu"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_batch_norm_gradcheck_fp64(training, activation, channels_last, dev):
    bn_tests.test_gradcheck_fp64("cuda", training, True, activation, channels_last, dev)


@pytest.mark.parametrize("case", [Case((5, 3, 17, 23)), Case((5, 6, 7, 9), True),
                                  Case((37, 11))], ids=str)
@pytest.mark.parametrize("split", [2, 7, 1000 if GPU else 64])  # the emulator is slow
def test_split_reductions_match_torch(case, split, dev):
    """Many programs per channel (forced), merged by Chan's formula in a fixed order."""
    with cuda.override_config(split=split, path="multipass"):
        bn_tests.check_against_torch(case, dev, "cuda", training=True, activation="relu")


def test_numerics_like_the_other_backends(dev):
    """Mean 1e3 and 1e4 / std 1e-2 (stable statistics), a constant channel, NaN and inf."""
    for path in ("multipass", "persistent"):
        with cuda.override_config(path=path):
            for mean in (1e3, 1e4):
                bn_tests.test_large_mean_small_std_is_stable("cuda", mean, dev)
            bn_tests.test_constant_channel("cuda", dev)
            for bad in (float("nan"), float("inf")):
                for cl in (False, True):
                    bn_tests.test_nan_and_inf_propagate_like_torch("cuda", bad, cl, dev)


@pytest.mark.parametrize("mean", [1e3, 1e4])
@pytest.mark.parametrize("path", ["multipass", "persistent"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_large_mean_no_worse_than_torch(mean, path, channels_last, dev):
    """A channel of mean 1e3 or 1e4 and std 1e-2 in fp32: y no worse than PyTorch's own (its CPU
    BatchNorm here, accumulating in fp64; cuDNN on a GPU) against fp64, and far better than
    normalizing around the fp32-rounded mean, which a kernel without the per-channel shift and
    the mean's rounding error (mean_lo) would do. Both paths, both layouts, many splits."""
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(4, 3, 19, 21, generator=g, dtype=torch.float64) * 1e-2 + mean).float()
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x = x.to(dev)
    bnk.set_backend("cuda")
    rm, rv = torch.zeros(3, device=dev), torch.ones(3, device=dev)
    with cuda.override_config(path=path, split=16):
        y = bnk.batch_norm(x, rm, rv, training=True, momentum=1.0)
    x64 = x.double().cpu()
    exact = F.batch_norm(x64, None, None, training=True)
    theirs = F.batch_norm(x.cpu(), None, None, training=True)
    bn_tests.assert_no_worse_than_torch(y, theirs, exact, torch.float32, "y", factor=1.0)
    var, m = torch.var_mean(x64, dim=(0, 2, 3), unbiased=False)
    rounded = (x64 - m.float().double().view(1, -1, 1, 1)) / torch.sqrt(
        var.view(1, -1, 1, 1) + 1e-5)
    ours_err = float((y.double().cpu() - exact).abs().max())
    rounded_err = float((rounded - exact).abs().max())
    assert ours_err < rounded_err / 20, (ours_err, rounded_err)
    assert torch.equal(rm.cpu(), m.float())  # the saved (and running) mean is mean_hi


# ----------------------------------------------------------------------------- launches, workspace

# Aten ops that allocate, view or read metadata: no kernel behind them.
_NO_KERNEL = {"empty", "empty_like", "empty_strided", "new_empty", "view", "_unsafe_view",
              "permute", "reshape", "_reshape_alias", "as_strided", "alias", "detach",
              "t", "expand", "squeeze", "unsqueeze", "contiguous", "lift_fresh", "clone_meta"}


class _TorchOps(torch.utils._python_dispatch.TorchDispatchMode):
    """The aten ops a call runs, from Python or from inside the extension (its at:: calls go
    through the dispatcher too)."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def _launches(module, fn):
    """(kernel launches of the extension, aten ops with a kernel) of ``fn()``."""
    before = module.emu_launch_count()
    with _TorchOps() as mode:
        fn()
    return module.emu_launch_count() - before, [op for op in mode.ops if op not in _NO_KERNEL]


@pytest.mark.skipif(GPU, reason="counts the CPU emulator's launches")
def test_launches_per_call(_kernel_module, dev):
    """Training forward 2 launches (split statistics finalized by their last block, then the
    apply) or 1 (persistent); eval forward 1; backward 2, or 1 (persistent; eval dx alone);
    no other kernel (no torch op) on the way, and no host synchronization (no .item(), no copy
    to the host: the emulator's tensors are host tensors, so that is checked by the ops list)."""
    module = _kernel_module[0]
    inp = make_inputs(Case((4, 3, 5, 6)), dev)
    step = torch.zeros(1, dtype=torch.int64, device=dev)

    def plan(training, **flags):
        sig = Signature.of("batch_norm", inp["x"], training, **flags)
        lp = sig._replace(op="lp_norm", p=flags.get("p", 2.0),
                          centered=flags.get("centered", False))
        return cuda.BatchNormPlan(sig), cuda.LpNormPlan(lp)

    def count(fn, *args, **kwargs):
        fn(*args, **kwargs)  # warm: the workspace is made (zeroed) on the first call
        n, ops = _launches(module, lambda: fn(*args, **kwargs))
        assert ops == [], ops
        return n

    x, dy, w, b = inp["x"], inp["dy"], inp["weight"], inp["bias"]
    rm, rv = inp["running_mean"], inp["running_var"]
    noise = (CFG, 3, step)
    all_grads = (True, True, True)
    for path, n_train in (("multipass", 2), ("persistent", 1)):
        with cuda.override_config(path=path):
            bn, _ = plan(True)
            assert count(bn.forward, x, w, b, Call(rm, rv, bn, 0.1, 1e-5, None, None)) == n_train
            _, mean, invstd, _ = bn.forward(x, w, b, Call(rm, rv, bn, 0.1, 1e-5, None, None))
            assert count(bn.backward, dy, x, w, b, Saved(mean, invstd, 1e-5, None),
                         all_grads) == n_train
    bn, lp = plan(False)
    call = Call(rm, rv, bn, 0.1, 1e-5, None, None)
    assert count(bn.forward, x, w, b, call) == 1
    assert count(bn.forward, x, w, b, call, need_saved=False) == 1
    _, mean, invstd, _ = bn.forward(x, w, b, call)
    saved = Saved(mean, invstd, 1e-5, None)
    assert count(bn.backward, dy, x, w, b, saved, (True, False, False)) == 1
    assert count(bn.backward, dy, x, w, b, saved, all_grads) == 2
    call = Call(rm, rv, lp, 0.1, 1e-5, None, None)
    assert count(lp.forward, x, w, b, call) == 1
    _, mean, inv, _ = lp.forward(x, w, b, call)
    assert count(lp.backward, dy, x, w, b, Saved(mean, inv, 1e-5, None), (True, False, False)) == 1
    # Noisy, with the step as a device tensor (snapshotted for the backward by the apply).
    bn, _ = plan(True, noise=noise)
    call = Call(rm, rv, bn, 0.1, 1e-5, noise, None)
    assert count(bn.forward, x, w, b, call) == 2
    _, mean, invstd, used = bn.forward(x, w, b, call)
    assert torch.equal(used, step)
    assert count(bn.backward, dy, x, w, b, Saved(mean, invstd, 1e-5, noise), all_grads) == 2
    # l_p: 2 launches uncentered, 3 centered (the mean first); backward 2.
    for centered, n_fwd in ((False, 2), (True, 3)):
        for p in (1.0, 2.0, math.inf):
            _, lp = plan(True, p=p, centered=centered)
            call = Call(rm, rv, lp, 0.1, 1e-5, None, None)
            assert count(lp.forward, x, w, b, call) == n_fwd
            _, mean, scale, _ = lp.forward(x, w, b, call)
            assert count(lp.backward, dy, x, w, b, Saved(mean, scale, 1e-5, None), all_grads) == 2
    # SyncBatchNorm's stages: one launch each.
    be, _ = plan(True)
    mean, var = be.stats(x)
    invstd = torch.rsqrt(var + 1e-5)
    sums = be.bwd_reduce(dy, x, mean, invstd, w, b, None)
    assert count(be.stats, x) == 1
    assert count(be.apply, x, mean, invstd, w, b, None) == 1
    assert count(be.bwd_reduce, dy, x, mean, invstd, w, b, None) == 1
    assert count(be.bwd_dx, dy, x, mean, invstd, w, b, sums / 120, None) == 1


@pytest.mark.parametrize("case", [Case((5, 3, 7, 9)), Case((5, 6, 7, 9), True), Case((37, 11)),
                                  Case((4, 16, 2, 4), True, torch.float16)], ids=str)
def test_ticket_finalize_with_many_splits(case, dev, monkeypatch):
    """Many blocks per channel (forced), the last to finish merging the partials (in a fixed
    order) and finalizing: the reference's results, bit-identical run to run and whichever
    block finishes last (the emulator runs the blocks in another order), the cached workspace
    reused and its tickets back at zero after every call (forward, backward, noisy, l_p)."""
    inp = make_inputs(case, dev)
    x = inp["x"]
    with cuda.override_config(split=16, path="multipass"):
        sig = Signature.of("batch_norm", x, True, activation="relu")
        plan = cuda.BatchNormPlan(sig)  # min(16, vectors or rows per channel) blocks each

        def call():
            xr = x.clone().requires_grad_()
            w = inp["weight"].clone().requires_grad_()
            b = inp["bias"].clone().requires_grad_()
            rm, rv = inp["running_mean"].clone(), inp["running_var"].clone()
            y, mean, invstd, _ = plan.forward(xr, w, b, Call(rm, rv, plan, 0.1, 1e-5, None, None))
            dx, dw, db = plan.backward(inp["dy"], xr, w, b, Saved(mean, invstd, 1e-5, None),
                                       (True, True, True))
            return dict(y=y, dx=dx, dweight=dw, dbias=db, running_mean=rm, running_var=rv,
                        mean=mean, invstd=invstd)

        first = call()
        ws, tickets = plan.workspaces.get()
        assert int(tickets.abs().sum()) == 0 and tickets.numel() >= 1
        second = call()
        assert plan.workspaces.get()[0] is ws and int(tickets.abs().sum()) == 0
        for key in first:
            assert torch.equal(first[key], second[key]), key
        for order in ("reverse", "shuffle"):  # another block finishes each channel last
            monkeypatch.setenv("BNK_EMU_BLOCK_ORDER", order)
            other = call()
            for key in first:
                assert torch.equal(first[key], other[key]), (order, key)
        monkeypatch.delenv("BNK_EMU_BLOCK_ORDER")
        ref = bn_tests.run(bn_tests.bnk_bn("reference"), inp, training=True, activation="relu")
        for key in ("y", "dx", "dweight", "dbias", "running_mean", "running_var"):
            dt = case.dtype if key in ("y", "dx") else case.pdtype
            assert_close(first[key], ref[key], dt, name=key)
        # Noisy and l_p through the same kind of workspace.
        noise = (CFG, 5, 9)
        nplan = cuda.BatchNormPlan(Signature.of("batch_norm", x, True, noise=noise))
        ncall = Call(None, None, nplan, 0.1, 1e-5, noise, None)
        y1, m1, i1, _ = nplan.forward(x, None, None, ncall)
        y2, m2, i2, _ = nplan.forward(x, None, None, ncall)
        assert torch.equal(y1, y2) and torch.equal(m1, m2) and torch.equal(i1, i2)
        assert int(nplan.workspaces.get()[1].abs().sum()) == 0
        for centered in (False, True):
            lsig = Signature.of("lp_norm", x, True, p=2.0, centered=centered)
            lplan = cuda.LpNormPlan(lsig)
            lcall = Call(None, None, lplan, 0.1, 1e-5, None, None)
            outs = [lplan.forward(x, None, None, lcall) for _ in range(2)]
            assert all(torch.equal(a, b) for a, b in zip(outs[0][:3], outs[1][:3]))
            dxs = [lplan.backward(inp["dy"], x, None, None,
                                  Saved(outs[0][1], outs[0][2], 1e-5, None),
                                  (True, False, False))[0] for _ in range(2)]
            assert torch.equal(dxs[0], dxs[1])
            assert int(lplan.workspaces.get()[1].abs().sum()) == 0


def test_workspaces_under_emulated_cuda_graphs(dev):
    """Each graph captured with a split plan owns workspaces made (and zero-filled) inside its
    capture: two graphs and the eager calls never share partials or tickets, the graphs keep
    them through PLANS.clear(), and replays (interleaved, one after a ticket was left part-way)
    give the eager call's results bit for bit."""
    import gc

    from cuda_emulator.graphs import EmulatedGraph

    from bnkernels.backends.plan import GRAPH_WORKSPACES, PLANS

    inp = make_inputs(Case((5, 3, 7, 9)), dev)
    x = inp["x"]
    with cuda.override_config(split=16, path="multipass"):
        plan = cuda.BatchNormPlan(Signature.of("batch_norm", x, True))

        def call():
            y, mean, invstd, _ = plan.forward(x, None, None,
                                              Call(None, None, plan, 0.1, 1e-5, None, None))
            dx = plan.backward(inp["dy"], x, None, None, Saved(mean, invstd, 1e-5, None),
                               (True, False, False))[0]
            return y, dx

        eager = call()
        eager_ws = plan.workspaces.get()
        graphs = [EmulatedGraph([plan.workspaces], call) for _ in range(2)]
        for g in graphs:
            g.capture()
        a, b = (g.made for g in graphs)
        assert len(a) == len(b) == 2  # forward and backward: one each
        owned = [id(t) for ws in (*a, *b, eager_ws) for t in ws]
        assert len(set(owned)) == len(owned), "two graphs or eager calls share a workspace"
        PLANS.clear()
        gc.collect()
        assert all(any(ws is held for held in GRAPH_WORKSPACES) for ws in (*a, *b))
        a[0][1].fill_(3)  # a ticket left part-way (an interrupted replay)
        for g in (graphs[0], graphs[1], graphs[0], graphs[1]):
            out = g.replay()
            assert all(torch.equal(o, e) for o, e in zip(out, eager))
        assert plan.workspaces.get() is eager_ws and int(eager_ws[1].abs().sum()) == 0


def test_host_path(dev):
    """test_host_path's checks on this backend: no environment, import or filesystem access on
    the hot path (Python side), and an eval backward with its forward's statistics."""
    import test_host_path

    test_host_path.test_hot_path_touches_no_environment_import_or_filesystem("cuda")
    test_host_path.test_eval_backward_uses_the_statistics_of_its_forward("cuda")


def test_strided_inputs(dev):
    """Permuted and sliced inputs are read correctly; outputs get empty_like's strides. So
    does a contiguous input whose data starts off a 16-byte boundary (scalar accesses)."""
    bnk.set_backend("cuda")
    base = make_inputs(Case((7, 4, 6)), dev)["x"]
    for x in (base.permute(2, 0, 1).contiguous().permute(1, 2, 0),
              make_inputs(Case((5, 6, 9, 8)), dev)["x"][:, ::2, :, 1:7],
              torch.randn(1 + 4 * 8 * 16, device=dev)[1:].view(4, 8, 16)):
        y = bnk.batch_norm(x, None, None, training=True, activation="relu")
        assert y.stride() == torch.empty_like(x).stride()
        exact = F.relu(F.batch_norm(x.double(), None, None, training=True))
        assert_close(y, exact, torch.float32, "y")


@pytest.mark.parametrize("case", [Case((5, 3, 17, 23), False, torch.float16),
                                  Case((3, 5, 7, 9), True), Case((4, 8, 8, 8))], ids=str)
def test_64bit_index_path(case, dev):
    """The 64-bit index arithmetic (used from 2^32 elements on) computes the same result: forced
    here on small tensors, for every kernel family."""
    inp = make_inputs(case, dev)
    narrow = bn_tests.run(bn_tests.bnk_bn("cuda"), inp, training=True, activation="relu")
    for path in ("multipass", "persistent"):
        with cuda.override_config(path=path, index64=True):
            wide = bn_tests.run(bn_tests.bnk_bn("cuda"), inp, training=True, activation="relu")
        for key in narrow:
            assert_close(wide[key], narrow[key], case.dtype if key in ("y", "dx") else
                         case.pdtype, name=f"{path} {key}")
    with cuda.override_config(index64=True):
        noisy_tests.test_matches_fp64_oracle("cuda", case, "relu", dev)
        lp_tests.check(case, dev, "cuda", 2, training=True, centered=True)
        bn_tests.check_against_torch(case, dev, "cuda", training=False)  # eval: elementwise


@pytest.mark.parametrize("case", [Case((5, 3, 17, 23)), Case((5, 6, 7, 9), True)], ids=str)
def test_deterministic(case, dev):
    """Same input, same bits (forward, backward, running statistics), on both paths."""
    inp = make_inputs(case, dev)
    for path in ("multipass", "persistent"):
        with cuda.override_config(split=7, path=path):
            a = bn_tests.run(bn_tests.bnk_bn("cuda"), inp, training=True, activation="relu")
            b = bn_tests.run(bn_tests.bnk_bn("cuda"), inp, training=True, activation="relu")
        for key in a:
            assert torch.equal(a[key], b[key]), (path, key)


# Inputs the persistent kernels take (also within the emulator's 4 SMs x 2 resident blocks),
# several with more than one block per channel, so the grid barrier and the cross-block merge
# are exercised.
PERSISTENT = [Case((16, 2, 32, 32)), Case((8, 3, 16, 16), True), Case((4, 3, 5, 7)),
              Case((4, 3, 5, 7), True, torch.float16), Case((8, 16, 4, 4), True, torch.bfloat16),
              Case((64, 3), False), Case((2, 4, 3, 5, 6), True, torch.float16, torch.float32)]


@pytest.mark.parametrize("case", PERSISTENT, ids=str)
def test_persistent_equals_multipass(case, dev):
    """Both paths, forced, agree with each other (to the rounding of the different merge
    trees) and with PyTorch in fp64."""
    inp = make_inputs(case, dev)
    x = inp["x"]
    assert cuda.persistent_plan(x)["fits"] and cuda.persistent_plan(x, backward=True)["fits"]
    out = {}
    for path in ("multipass", "persistent"):
        with cuda.override_config(path=path):
            bn_tests.check_against_torch(case, dev, "cuda", training=True, activation="relu")
            out[path] = bn_tests.run(bn_tests.bnk_bn("cuda"), inp, training=True,
                                     activation="relu")
    for key, value in out["persistent"].items():
        dt = case.dtype if key in ("y", "dx") else case.pdtype
        assert_close(value, out["multipass"][key], dt, name=f"persistent vs multipass {key}")


@pytest.mark.skipif(GPU, reason="forces the CPU emulator's cooperative launch to fail")
def test_refused_cooperative_launch_falls_back_to_multipass(_kernel_module, dev, monkeypatch):
    """A driver that refuses the cooperative launch ("cooperative launch too large": an MPS
    client, an SM-limited context; forced in the emulator by BNK_EMU_COOP_FAIL=1): the
    persistent path's calls run the multi-pass kernels instead (2 launches, not 1) and give
    the multi-pass results bit for bit, running statistics included."""
    module = _kernel_module[0]
    case = Case((4, 3, 5, 7))
    inp = make_inputs(case, dev)
    out = {}
    for path, refuse in (("multipass", "0"), ("persistent", "1")):
        monkeypatch.setenv("BNK_EMU_COOP_FAIL", refuse)
        with cuda.override_config(path=path):
            assert cuda.persistent_plan(inp["x"])["fits"]
            n, _ = _launches(module, lambda: bn_tests.run(bn_tests.bnk_bn("cuda"), inp,
                                                          training=True))
            out[path] = (n, bn_tests.run(bn_tests.bnk_bn("cuda"), inp, training=True))
    assert out["persistent"][0] == out["multipass"][0] == 4  # forward 2, backward 2
    for key, value in out["multipass"][1].items():
        assert torch.equal(out["persistent"][1][key], value), key


def test_persistent_path_refuses_what_it_cannot_take(dev):
    bnk.set_backend("cuda")
    # More channels (one block each) than blocks can be resident: the emulator's 4 SMs x 2, or
    # any GPU's.
    too_big = torch.randn(2, 20000 if GPU else 9, 2, device=dev)
    plan = cuda.persistent_plan(too_big)
    assert not plan["fits"] and "does not fit" in plan["why"]
    with cuda.override_config(path="persistent"):
        with pytest.raises(RuntimeError, match="persistent path was forced but the tensor "
                                               "does not fit"):
            bnk.batch_norm(too_big, None, None, training=True)
        with pytest.raises(RuntimeError, match="float64"):
            bnk.batch_norm(torch.randn(4, 3, 5, device=dev, dtype=torch.float64), None, None,
                           training=True)
        with pytest.raises(RuntimeError, match="no noisy variant"):
            bnk.noisy_batch_norm(torch.randn(4, 3, 5, device=dev), None, None, training=True)
    # Automatic: falls back to the multi-pass kernels.
    y = bnk.batch_norm(too_big, None, None, training=True)
    assert_close(y, F.batch_norm(too_big.double(), None, None, training=True), torch.float32,
                 "y")


def test_sync_batch_norm_stages_match_the_reference(dev):
    """The SyncBatchNorm stages (statistics, apply, gradient sums, dx)."""
    inp = make_inputs(Case((5, 6, 7, 9), True), dev)
    x, dy, w, b = inp["x"], inp["dy"], inp["weight"], inp["bias"]
    def plans(act):
        sig = Signature.of("batch_norm", x, True, activation=act, weight=w, bias=b)
        return backends.backend("cuda").plan(sig), backends.backend("reference").plan(sig)

    be, ref = plans(None)
    mean, var = be.stats(x)
    rmean, rvar = ref.stats(x)
    assert_close(mean, rmean, torch.float32, "mean")
    assert_close(var, rvar, torch.float32, "var")
    invstd = torch.rsqrt(rvar + 1e-5)
    for act in (None, "relu"):
        be, ref = plans(act)
        assert_close(be.apply(x, rmean, invstd, w, b, None),
                     ref.apply(x, rmean, invstd, w, b, None), torch.float32, "y")
        sums = be.bwd_reduce(dy, x, rmean, invstd, w, b, None)
        rsums = ref.bwd_reduce(dy, x, rmean, invstd, w, b, None)
        assert_close(sums, rsums, torch.float32, "sums")
        m = x.numel() // x.shape[1]
        dx = be.bwd_dx(dy, x, rmean, invstd, w, b, rsums / m, None)
        assert_close(dx, ref.bwd_dx(dy, x, rmean, invstd, w, b, rsums / m, None),
                     torch.float32, "dx")
        assert dx.stride() == x.stride()


def test_opcheck(dev):
    from test_modules import _op_samples

    for _name, op, args in _op_samples(dev):
        torch.library.opcheck(op, (*args, "cuda"))


# ----------------------------------------------------------------------------- noisy BatchNorm


@pytest.mark.parametrize("channels_last", [False, True])
def test_noise_is_the_reference_noise(channels_last, dev):
    """Same Philox counters as the reference: the uniforms (hence m) bit for bit, s to the
    rounding of log/cos; a step tensor gives the same noise as the int."""
    x = make_inputs(Case((3, 5, 6, 7), channels_last), dev)["x"]
    bnk.set_backend("cuda")
    s, m = bnk.noisy_batch_norm_noise(x, seed=2**40 + 17, step=123)
    s_r, m_r = R.noisy_bn_noise_reference(x, (CFG, 2**40 + 17, 123))
    assert torch.equal(m, m_r)
    assert_close(s, s_r, torch.float32, "s")
    s_t, m_t = bnk.noisy_batch_norm_noise(x, seed=2**40 + 17,
                                          step=torch.tensor([123], device=dev))
    assert torch.equal(m_t, m) and torch.equal(s_t, s)


@pytest.mark.parametrize("case", noisy_tests.CASES, ids=str)
@pytest.mark.parametrize("activation", [None, "relu"])
def test_noisy_matches_fp64_oracle(case, activation, dev):
    noisy_tests.test_matches_fp64_oracle("cuda", case, activation, dev)


@pytest.mark.parametrize("activation", [None, "relu"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_noisy_gradcheck_fp64(activation, channels_last, dev):
    noisy_tests.test_gradcheck_fp64("cuda", activation, True, channels_last, dev)


def test_noisy_steps_and_seeds(dev):
    noisy_tests.test_deterministic_by_seed_and_step("cuda", dev)
    noisy_tests.test_step_tensor_is_read_on_device_and_snapshotted("cuda", dev)
    noisy_tests.test_eval_mode_is_the_noise_expectation("cuda", dev)


# ----------------------------------------------------------------------------- l_p norm


@pytest.mark.parametrize("case,p,centered", lp_tests.TRAIN_CASES,
                         ids=[f"{c}-{lp_tests._mode_id(p, k)}" for c, p, k in lp_tests.TRAIN_CASES])
def test_lp_training_matches_oracle(case, p, centered, dev):
    lp_tests.check(case, dev, "cuda", p, training=True, centered=centered)


@pytest.mark.parametrize("case", lp_tests.CASES[::3], ids=str)
@pytest.mark.parametrize("p", lp_tests.PS, ids=lp_tests.P_IDS.get)
def test_lp_eval_matches_oracle(case, p, dev):
    lp_tests.check(case, dev, "cuda", p, training=False, centered=False)


@pytest.mark.parametrize("p", lp_tests.PS, ids=lp_tests.P_IDS.get)
@pytest.mark.parametrize("centered", [False, True], ids=["raw", "centered"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_lp_gradcheck_fp64(p, centered, channels_last, dev):
    lp_tests.test_gradcheck_fp64(p, centered, True, channels_last, "cuda", dev)


@pytest.mark.parametrize("centered", [False, True], ids=["raw", "centered"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_lp_linf_tie_rule(centered, channels_last, dev):
    lp_tests.test_linf_tie_rule_splits_equally("cuda", centered, channels_last, dev)


@pytest.mark.parametrize("split", [1, 7])
def test_lp_split_and_stability(split, dev):
    with cuda.override_config(split=split):
        lp_tests.test_centered_l2_is_stable_for_large_mean_small_spread("cuda", split, dev)
        for p in lp_tests.PS:
            for centered in (False, True):
                lp_tests.check(Case((5, 6, 7, 9), True), dev, "cuda", p, training=True,
                               centered=centered)


# ----------------------------------------------------------------------------- residual

# out = act(bn(x) + z) (noisy: act(s a + m + z)) against torch's composite act(F.batch_norm(x)
# + z) in fp64 (test_residual's check: y, dx, dweight, dbias, d(residual) and the running
# statistics, each within helpers.TOLERANCES of its dtype; test_residual_tolerance_is_two_sided
# shows the nearest wrong fusions fall outside them). Training on each path forced (the
# persistent kernel where x fits on chip, or the split statistics + apply), and eval.
RES_CASES = [Case((4, 3, 5, 6)), Case((4, 3, 5, 6), True), Case((6, 5))]


@pytest.mark.parametrize("case", RES_CASES, ids=str)
@pytest.mark.parametrize("activation", [None, "relu"])
@pytest.mark.parametrize("mode", ["persistent", "multipass", "eval"])
def test_residual_matches_torch_composite(case, activation, mode, dev):
    if mode == "persistent":
        x = torch.empty(case.shape, device=dev)
        assert cuda.persistent_plan(x)["fits"] and cuda.persistent_plan(x, backward=True)["fits"]
    with cuda.override_config(path="multipass" if mode == "eval" else mode):
        res_tests._check(case, dev, "cuda", mode != "eval", activation)


@pytest.mark.parametrize(("dtype", "path"), [(torch.float16, "persistent"),
                                             (torch.bfloat16, "persistent"),
                                             (torch.float16, "multipass"),
                                             (torch.bfloat16, "multipass"),
                                             (torch.float64, "multipass")], ids=str)
def test_residual_dtypes(dtype, path, dev):
    """Channels last; fp16/bf16 with fp32 parameters (the persistent kernels do not take
    fp64)."""
    case = Case((4, 3, 5, 6), True, dtype, torch.float32 if dtype != torch.float64 else None)
    with cuda.override_config(path=path):
        res_tests._check(case, dev, "cuda", True, "relu")
        if path == "multipass":
            res_tests._check(case, dev, "cuda", False, "relu")


@pytest.mark.parametrize("x_cl", [False, True])
def test_residual_with_its_own_strides(x_cl, dev):
    """A residual strided unlike x is read in x's layout; the output keeps x's."""
    res_tests._check(Case((4, 3, 5, 6), x_cl), dev, "cuda", True, "relu",
                     res_channels_last=not x_cl)
    res_tests._check(Case((4, 3, 5, 6), x_cl), dev, "cuda", False, None,
                     res_channels_last=not x_cl)


def test_residual_tolerance_is_two_sided(dev):
    """The comparisons above fail for the nearest wrong fusions: the residual dropped or added
    after the ReLU (y), the ReLU's mask taken from bn(x) alone (d(residual))."""
    bnk.set_backend("cuda")
    inp = make_inputs(Case((4, 3, 5, 6)), dev, seed=5)
    z = torch.randn_like(inp["x"]).requires_grad_()
    y = bnk.batch_norm(inp["x"], None, None, inp["weight"], inp["bias"], True,
                       activation="relu", residual=z)
    (dz,) = torch.autograd.grad(y, (z,), inp["dy"])
    exact = res_tests._composite(inp, z.detach(), True, "relu", None, None)
    assert_close(y, exact, torch.float32, "y")
    assert_close(dz, torch.where(exact > 0, inp["dy"].double(), 0.0), torch.float32, "dz")
    no_res = res_tests._composite(inp, z.detach() * 0, True, "relu", None, None)
    for name, got, wrong in (("y", y, no_res), ("y", y, no_res + z.detach().double()),
                             ("dz", dz, torch.where(no_res > 0, inp["dy"].double(), 0.0))):
        with pytest.raises(AssertionError, match="outside"):
            assert_close(got, wrong, torch.float32, name)


@pytest.mark.parametrize(("case", "training", "activation"), [
    (Case((4, 3, 5, 6), True), True, "relu"), (Case((4, 3, 5, 6)), True, None),
    (Case((6, 5)), True, "relu"), (Case((4, 3, 5, 6), True), False, "relu")], ids=str)
def test_noisy_residual_matches_fp64_oracle(case, training, activation, dev):
    """act(s a + m + z) against torch's BatchNorm composed with the reference backend's noise
    (eval: no random noise, E[s] a + E[m]) and z, in fp64 (noisy BatchNorm has the
    multi-pass kernels only)."""
    inp = make_inputs(case, dev, seed=2)
    z = torch.randn(case.shape, generator=torch.Generator().manual_seed(4),
                    dtype=torch.float64).to(case.dtype).to(dev)
    x64 = inp["x"].double().requires_grad_()
    w64, b64 = (inp[k].double().requires_grad_() for k in ("weight", "bias"))
    z64 = z.double().requires_grad_()
    rm64, rv64 = inp["running_mean"].double(), inp["running_var"].double()
    a = F.batch_norm(x64, rm64, rv64, w64, b64, training, 0.1, 1e-5)
    if training:
        s, m = R.noisy_bn_noise_reference(inp["x"], (CFG, 7, 3))
        a = s.double() * a + m.double()
    else:  # the noise's expectation
        es, em = CFG.expectation()
        a = es * a + em
    yr = a + z64
    yr = yr.relu() if activation == "relu" else yr
    exact = torch.autograd.grad(yr, (x64, w64, b64, z64), inp["dy"].double())
    bnk.set_backend("cuda")
    x, w, b = (inp[k].clone().requires_grad_() for k in ("x", "weight", "bias"))
    zz = z.clone().requires_grad_()
    rm, rv = inp["running_mean"].clone(), inp["running_var"].clone()
    y = bnk.noisy_batch_norm(x, rm, rv, w, b, training, 0.1, 1e-5, CFG, 7, 3, activation,
                             residual=zz)
    got = torch.autograd.grad(y, (x, w, b, zz), inp["dy"])
    assert_close(y, yr, case.dtype, "y")
    for name, g, e in zip(("dx", "dweight", "dbias", "dresidual"), got, exact):
        assert_close(g, e, case.dtype, name)
    assert_close(rm, rm64, case.dtype, "running_mean")
    assert_close(rv, rv64, case.dtype, "running_var")


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("activation", [None, "relu"])
def test_residual_gradcheck_fp64(training, activation, dev):
    bnk.set_backend("cuda")
    inp = make_inputs(Case((3, 2, 3, 2), True, torch.float64), dev, seed=3)
    x = inp["x"].requires_grad_()
    w, b = inp["weight"].requires_grad_(), inp["bias"].requires_grad_()
    z = torch.randn(3, 2, 3, 2, dtype=torch.float64, device=dev).requires_grad_()
    rm, rv = inp["running_mean"], inp["running_var"]

    def f(x, w, b, z):
        return bnk.batch_norm(x, rm.clone(), rv.clone(), w, b, training, 0.1, 1e-5,
                              activation=activation, residual=z)

    # In full in eval; in fast mode (a random projection of the Jacobian) in training, whose
    # full check takes ~10 s under the emulator.
    assert torch.autograd.gradcheck(f, (x, w, b, z), eps=1e-6, atol=1e-6, rtol=1e-5,
                                    fast_mode=training)


@pytest.mark.skipif(GPU, reason="counts the CPU emulator's launches")
def test_residual_launches(_kernel_module, dev):
    """The residual is read by the forward's launches (no launch of its own); d(residual)
    alone is one masking op (threshold_backward's mask), no kernel."""
    module = _kernel_module[0]
    bnk.set_backend("cuda")
    x = torch.randn(4, 3, 5, 6, device=dev)
    z = torch.randn_like(x, requires_grad=True)
    dy = torch.randn_like(x)
    for path, n in (("persistent", 1), ("multipass", 2)):
        with cuda.override_config(path=path):
            count, _ = _launches(module, lambda: bnk.batch_norm(
                x, None, None, training=True, activation="relu", residual=z.detach()))
            assert count == n, (path, count)
    y = bnk.batch_norm(x, None, None, training=True, activation="relu", residual=z)
    count, _ = _launches(module, lambda: torch.autograd.grad(y, (z,), dy, retain_graph=True))
    (dz,) = torch.autograd.grad(y, (z,), dy)
    assert count == 0
    assert torch.equal(dz, torch.where(y > 0, dy, torch.zeros_like(dy)))


# ----------------------------------------------------------------------------- fuzzing

# test_fuzz.py's random cases (special values, layouts, dtypes, routes) on this backend: a few
# per op under the emulator (slow), test_fuzz.EXAMPLES on a GPU. Even examples run on the
# multi-pass kernels with every channel split over 3 blocks (finalized by the last), odd ones
# on the default path (the persistent kernels where the tensor fits).
FUZZ = [(op, i) for op in fuzz_tests.OPS
        for i in range(fuzz_tests.EXAMPLES if GPU else max(4, fuzz_tests.EXAMPLES // 3))]


@pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning")
@pytest.mark.parametrize(("op", "index"), FUZZ, ids=[f"{op}-{i}" for op, i in FUZZ])
def test_fuzz_against_torch(op, index, dev):
    d = fuzz_tests.draw(op, index)
    bnk.set_backend("cuda")
    if index % 2:
        fuzz_tests.check(d, dev)
    else:
        with cuda.override_config(path="multipass", split=3):
            fuzz_tests.check(d, dev)


def test_double_backward_fp64(dev):
    """create_graph=True: the backward as differentiable torch ops (bnkernels.double_backward),
    around this backend's forward."""
    bnk.set_backend("cuda")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 2, 4, generator=g, dtype=torch.float64).to(dev).requires_grad_()
    w = (torch.rand(2, generator=g, dtype=torch.float64) + 0.5).to(dev).requires_grad_()
    b = torch.randn(2, generator=g, dtype=torch.float64).to(dev).requires_grad_()
    assert torch.autograd.gradgradcheck(
        lambda x, w, b: bnk.batch_norm(x, None, None, w, b, True, activation="relu"),
        (x, w, b), fast_mode=True)
    assert torch.autograd.gradgradcheck(
        lambda x, w, b: bnk.noisy_batch_norm(x, None, None, w, b, True, seed=3, step=1),
        (x, w, b), fast_mode=True)
    assert torch.autograd.gradgradcheck(
        lambda x, w, b: bnk.lp_norm(x, 2, None, None, w, b, True, centered=True), (x, w, b),
        fast_mode=True)


# ----------------------------------------------------------------------------- GPU only


@gpu_only
@pytest.mark.parametrize("case", bn_tests.CASES[::5] + ALIGNED, ids=str)
def test_matches_the_triton_backend(case, dev):
    inp = make_inputs(case, dev)
    ours = bn_tests.run(bn_tests.bnk_bn("cuda"), inp, training=True, activation="relu")
    theirs = bn_tests.run(bn_tests.bnk_bn("triton"), inp, training=True, activation="relu")
    for key, value in ours.items():
        dt = case.dtype if key in ("y", "dx") else case.pdtype
        assert_close(value, theirs[key], dt, name=f"cuda vs triton {case} {key}")


@gpu_only
def test_cuda_graph_capture(dev):
    """No host synchronization on the training path: a captured forward + backward replays."""
    bnk.set_backend("cuda")
    x = torch.randn(8, 16, 12, 12, device=dev, requires_grad=True)
    w = torch.ones(16, device=dev, requires_grad=True)
    b = torch.zeros(16, device=dev, requires_grad=True)
    rm, rv = torch.zeros(16, device=dev), torch.ones(16, device=dev)
    step = torch.zeros(1, dtype=torch.int64, device=dev)

    def train_step():
        y = bnk.noisy_batch_norm(x, rm, rv, w, b, training=True, step=step, activation="relu")
        y.square().sum().backward()
        return y

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        train_step()  # warm up outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = train_step()
    graph.replay()
    torch.cuda.synchronize()
    expected = bnk.noisy_batch_norm(x.detach(), None, None, w.detach(), b.detach(),
                                    training=True, step=step, activation="relu")
    assert_close(y, expected, torch.float32, "y")


@gpu_only
def test_torch_compile_fullgraph(dev):
    bnk.set_backend("cuda")
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), bnk.BatchNorm2d(8, activation="relu"),
                                torch.nn.Conv2d(8, 4, 3), bnk.LpNorm2d(4, p=2)).to(dev)
    compiled = torch.compile(model, fullgraph=True)
    x = torch.randn(4, 3, 10, 10, device=dev)
    assert_close(compiled(x), model(x), torch.float32, "y")
