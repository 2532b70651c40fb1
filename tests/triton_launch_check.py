"""Check the direct launch path (bnkernels.backends.triton.launch) against Triton's own JIT
launch, without a GPU: run as a script with the interpreter off (tests/test_triton_launch.py).

A fake Triton driver (two devices, target sm_90; Triton's own ``CudaLauncher`` whose C entry
records its arguments instead of launching) lets Triton's real JIT compile every kernel for
sm_90 and "launch" it, and asserts at every launch, on the JIT and the direct path alike, what
a GPU would refuse or fault on (``check_launch``):

* every pointer the chosen specialization assumes 16-divisible is 16-aligned at that call
  (else a 128-bit access faults: misaligned address);
* the function was loaded on the current device, the stream is that device's and the tensors
  live there (else: invalid handle, or a kernel of one context reading another's memory);
* the module behind the function handle is still loaded (Triton unloads it when its
  CompiledKernel goes);
* the argument count and each argument's type match the kernel's signature;
* the grid is within the GPU's limits (x < 2^31, y and z <= 65535).

1. Each plan call is made twice on the same inputs: the first goes through ``kernel[grid]``,
   the second through the direct path bound after it; both launches must agree (grid, stream,
   function, metadata, arguments: the caller's tensors at the same addresses, scalars equal).
2. The fuzz harness's draws (tests/test_fuzz.py), forward and backward, each bound with
   aligned tensors and then called with every tensor argument in turn (x, dy, weight, bias,
   running buffers, the noise step) at an odd offset, with the tensors on device 0 or 1 and
   the other device current.
3. A bound launch survives Triton dropping its CompiledKernel (device caches cleared).
4. The guards: a misaligned input, a seed that changes Triton's integer type, an installed
   launch hook and ``jit_only()`` each take the JIT path.

Prints "ok <compared> <checked>": launches compared in 1, launches made in 2.
"""

# ruff: noqa: B023  (every closure below runs before its loop moves on)
from __future__ import annotations

import os
import sys

assert os.environ.get("TRITON_INTERPRET", "0") != "1", "run with the interpreter off"

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.backends.nvidia import driver as nvidia_driver  # noqa: E402
from triton.backends.nvidia.driver import CudaLauncher  # noqa: E402
from triton.runtime.driver import driver  # noqa: E402

CALLS: list[tuple] = []
# The fake machine: two devices; CURRENT[0] is the current one, TENSORS[0] the device the
# tensors of the case at hand stand for (their storage is on the CPU).
CURRENT, TENSORS = [0], [0]
N_DEVICES = 2
_FUNCS: dict = {}  # function handle -> (src, device, module)
_LIVE: set = set()  # loaded modules
_PENDING: list = []  # the src of the launcher made just before load_binary (CompiledKernel)
I32 = (-(2**31), 2**31 - 1)


def stream_of(device: int) -> int:
    return 7000 + device


def _address(value) -> int | None:
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        return value.data_ptr()
    assert isinstance(value, int) and not isinstance(value, bool), f"pointer {value!r}"
    return value


def check_launch(grid, stream, function, args) -> list:
    """What a GPU would refuse or fault on, asserted for one launch; returns the arguments
    with pointers as addresses."""
    assert function in _FUNCS, f"unknown function handle {function!r}"
    src, fdev, module = _FUNCS[function]
    name = src.fn.__name__
    assert module in _LIVE, f"{name}: launched through a function whose module was unloaded"
    dev = TENSORS[0]
    assert fdev == dev and CURRENT[0] == dev and stream == stream_of(dev), (
        f"{name}: function loaded on device {fdev}, stream of device {stream - 7000}, current "
        f"device {CURRENT[0]}, tensors on device {dev}")
    gx, gy, gz = grid
    assert 1 <= gx < 2**31 and 1 <= gy <= 65535 and 1 <= gz <= 65535, (
        f"{name}: grid {grid} outside the GPU's limits (x < 2^31, y and z <= 65535)")
    sig = list(src.signature.items())
    assert len(args) == len(sig), f"{name}: {len(args)} arguments for {len(sig)} parameters"
    out = []
    for i, ((pname, ty), value) in enumerate(zip(sig, args)):
        if ty == "constexpr":
            assert value == src.constants.get((i,), value), (name, pname, value)
            out.append(value)
        elif ty.startswith("*"):
            addr = _address(value)
            aligned = ["tt.divisibility", 16] in src.attrs.get((i,), [])
            assert not aligned or addr % 16 == 0, (
                f"{name}: {pname} specialized as 16-aligned, address % 16 = {addr % 16}")
            out.append(("ptr", addr))
        elif ty in ("i32", "i64", "u64", "i1"):
            assert isinstance(value, int), (name, pname, ty, value)
            lo, hi = I32 if ty == "i32" else (-(2**63), 2**64 - 1)
            assert lo <= value <= hi, (name, pname, ty, value)
            out.append(value)
        elif ty in ("fp32", "fp64"):
            assert isinstance(value, float), (name, pname, ty, value)
            out.append(value)
        else:
            raise AssertionError(f"{name}: parameter {pname} of type {ty} not known here")
    return out


class _Launcher(CudaLauncher):
    """Triton's own launcher, its C entry replaced by _Utils.launch."""

    def __init__(self, src, metadata):
        _PENDING[:] = [src]
        super().__init__(src, metadata)


class _Utils:
    def __init__(self):
        self.handles = 0

    def build_signature_metadata(self, kernel_signature):  # the C launcher's (compiled)
        return tuple(kernel_signature)

    def load_binary(self, name, kernel, shared, device):
        assert device == CURRENT[0], "load_binary for a device that is not current"
        self.handles += 1
        module, function = f"module:{self.handles}", f"function:{name}:{self.handles}"
        _FUNCS[function] = (_PENDING.pop(), device, module)
        _LIVE.add(module)
        return module, function, 32, 0, 1024

    def unload_module(self, module):
        _LIVE.discard(module)

    def get_device_properties(self, device):
        return {"max_shared_mem": 232448, "multiprocessor_count": 132, "max_num_regs": 65536,
                "warpSize": 32}

    def launch(self, gx, gy, gz, stream, function, coop, pdl, packed, launch_metadata,
               enter_hook, exit_hook, global_scratch, profile_scratch, annotations, ksig,
               args):
        args = check_launch((gx, gy, gz), stream, function, args)
        CALLS.append(((gx, gy, gz), stream, function, packed, launch_metadata is not None,
                      args))


class _Driver:
    utils = _Utils()
    launcher_cls = _Launcher

    def get_current_device(self):
        return CURRENT[0]

    def set_current_device(self, device):
        CURRENT[0] = device

    def get_current_stream(self, device=None):
        return stream_of(CURRENT[0] if device is None else device)

    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

    def get_active_torch_device(self):
        return torch.device("cpu")

    def is_active(self):
        return True

    def allocate_default_profile_scratch(self, size, align, stream):
        raise AssertionError("no kernel here needs profile scratch")


class _DeviceGuard:
    """torch.cuda.device on the fake machine."""

    def __init__(self, index):
        self.index = index

    def __enter__(self):
        self.prev, CURRENT[0] = CURRENT[0], self.index

    def __exit__(self, *exc):
        CURRENT[0] = self.prev
        return False


def install() -> None:
    """The fake driver in Triton, and the fake machine's device calls where bnkernels and
    torch make them."""
    driver.set_active(_Driver())
    # What CudaLauncher takes from Triton's compiled C utilities (not built here).
    if nvidia_driver.PyKernelArg is None:
        nvidia_driver.PyKernelArg = lambda nested_tuple, type: (type, nested_tuple)
        nvidia_driver.ARG_CONSTEXPR, nvidia_driver.ARG_KERNEL = "constexpr", "kernel"
        nvidia_driver.ARG_TUPLE = "tuple"
    torch.cuda.current_device = lambda: CURRENT[0]
    torch.cuda.device = _DeviceGuard
    from bnkernels.backends import plan as base_plan
    from bnkernels.backends.triton import launch

    base_plan._raw_stream_getter = launch._raw_stream_getter = lambda: stream_of
    launch._get_device = lambda: CURRENT[0]
    launch._device_guard = _DeviceGuard
    # The plans' tensors (CPU storage) stand for tensors on device TENSORS[0].
    launch._index_of = lambda device: TENSORS[0]


def odd(t: torch.Tensor) -> torch.Tensor:
    """A copy of ``t`` (same shape and strides) one element past a 16-byte boundary."""
    buf = torch.empty(t.untyped_storage().nbytes() // t.element_size() + 1, dtype=t.dtype)[1:]
    out = buf.as_strided(t.shape, t.stride(), 1 + t.storage_offset()).copy_(t)
    assert out.data_ptr() % 16 != 0
    return out


def main() -> int:
    if getattr(triton, "knobs", None) is None:
        print("skip: this Triton (< 3.3) has no direct launch path")
        return 0
    install()

    from bnkernels.backends.plan import Call, Saved, Signature
    from bnkernels.backends.triton import launch
    from bnkernels.backends.triton.batch_norm.plan import BatchNormPlan
    from bnkernels.backends.triton.common import override_config
    from bnkernels.backends.triton.lp_norm.plan import LpNormPlan
    from bnkernels.noise import NoiseConfig

    assert launch.DIRECT, "the direct path is off"
    compared = 0
    cfg = NoiseConfig()

    def same(jit_call, direct_call, inputs):
        addresses = {t.data_ptr() for t in inputs if isinstance(t, torch.Tensor)}
        assert jit_call[:4] == direct_call[:4], (jit_call[:4], direct_call[:4])
        assert not direct_call[4], "the second call did not go direct"
        a_args, b_args = jit_call[5], direct_call[5]
        assert len(a_args) == len(b_args)
        for i, (a, b) in enumerate(zip(a_args, b_args)):
            if isinstance(a, tuple):  # a pointer
                assert isinstance(b, tuple) and (a[1] is None) == (b[1] is None), (i, a, b)
                if a[1] in addresses:
                    assert b == a, f"argument {i}: a different input tensor"
            else:
                assert type(a) is type(b) and a == b, (i, a, b)

    def twice(fn, inputs):
        """Call fn twice; the launches of the two calls must agree, the first from the JIT
        (its launch metadata is not None), the second direct."""
        nonlocal compared
        del CALLS[:]
        fn()
        first = list(CALLS)
        del CALLS[:]
        fn()
        second = list(CALLS)
        assert first and len(first) == len(second), (len(first), len(second))
        for a, b in zip(first, second):
            assert a[4], "the first call did not go through the JIT"
            same(a, b, inputs)
            compared += 1
        return second

    def new_inputs(shape, channels_last=False, dtype=torch.float32, pdtype=torch.float32,
                   seed=0):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(shape, generator=g).to(dtype)
        if channels_last:
            x = x.to(memory_format=torch.channels_last if x.dim() == 4
                     else torch.channels_last_3d)
        C = shape[1]
        return dict(x=x, dy=torch.randn_like(x), w=torch.rand(C).to(pdtype) + 0.5,
                    b=torch.randn(C).to(pdtype), rm=torch.randn(C).to(pdtype) * 0.1,
                    rv=torch.rand(C).to(pdtype) + 0.5, nbt=torch.zeros((), dtype=torch.long),
                    step=torch.zeros(1, dtype=torch.long))

    # 1. Each plan call twice: the direct launch is the JIT's.
    for strategy in ("fused", "split"):
        with override_config(strategy=strategy):
            for shape, cl in (((4, 3, 5, 6), False), ((4, 6, 5, 6), True), ((8, 5), False)):
                for dtype in (torch.float32, torch.bfloat16):
                    t = new_inputs(shape, cl, dtype)
                    ins = list(t.values())
                    for training in (True, False):
                        sig = Signature.of("batch_norm", t["x"], training, weight=t["w"],
                                           bias=t["b"], running_mean=t["rm"],
                                           running_var=t["rv"], counter=training)
                        plan = BatchNormPlan(sig)
                        saved = {}

                        def fwd():
                            out = plan.forward(t["x"], t["w"], t["b"], Call(
                                t["rm"], t["rv"], plan, 0.1, 1e-5, None,
                                t["nbt"] if training else None))
                            saved["a"], saved["b"] = out[1], out[2]

                        twice(fwd, ins)
                        twice(lambda: plan.backward(t["dy"], t["x"], t["w"], t["b"],
                                                    Saved(saved["a"], saved["b"], 1e-5, None),
                                                    (True, True, True)),
                              ins + [saved["a"], saved["b"]])
                    # a residual add and ReLU: forward, then the backward reading the output
                    for training in (True, False):
                        rsig = Signature.of("batch_norm", t["x"], training, activation="relu",
                                            weight=t["w"], bias=t["b"], running_mean=t["rm"],
                                            running_var=t["rv"], residual=t["dy"])
                        rplan = BatchNormPlan(rsig)
                        rsaved = {}

                        def rfwd():
                            out = rplan.forward(t["x"], t["w"], t["b"], Call(
                                t["rm"], t["rv"], rplan, 0.1, 1e-5, None, None), True, t["dy"])
                            rsaved["y"], rsaved["a"], rsaved["b"] = out[0], out[1], out[2]

                        twice(rfwd, ins)
                        twice(lambda: rplan.backward(t["dy"], t["x"], t["w"], t["b"], Saved(
                                rsaved["a"], rsaved["b"], 1e-5, None, rsaved["y"]), (True,) * 4),
                              ins + [rsaved["y"], rsaved["a"], rsaved["b"]])
                    # noisy, with a tensor step and with an int step
                    for step in (t["step"], 5):
                        noise = (cfg, 3, step)
                        nsig = Signature.of("batch_norm", t["x"], True, activation="relu",
                                            noise=noise, weight=t["w"], bias=t["b"])
                        nplan = BatchNormPlan(nsig)
                        twice(lambda: nplan.forward(t["x"], t["w"], t["b"], Call(
                            None, None, nplan, 0.1, 1e-5, noise, None)), ins)
                    # l_p
                    for training in (True, False):
                        lsig = Signature.of("lp_norm", t["x"], training, p=1, centered=True,
                                            weight=t["w"], bias=t["b"], running_mean=t["rm"],
                                            running_var=t["rv"])
                        lplan = LpNormPlan(lsig)
                        twice(lambda: lplan.forward(t["x"], t["w"], t["b"], Call(
                            t["rm"], t["rv"], lplan, 0.1, 1e-5, None, None)), ins)

    # 2. The fuzz harness's draws, every launch checked by the fake driver: each draw's calls
    # (forward, backward) with aligned tensors (the direct path binds), then again with each
    # tensor argument in turn at an odd offset, then with its tensors on device 1 while device
    # 0 is current, and the other way round.
    import test_fuzz

    n_draws = int(os.environ.get("BNKERNELS_LAUNCH_CHECK_DRAWS", "6"))
    checked = 0
    for op in ("batch_norm", "lp"):
        for index in range(n_draws):
            d = test_fuzz.draw(op, index)
            cl = d.layout == "channels_last" and len(d.shape) in (4, 5)
            t = new_inputs(d.shape, cl, d.dtype, d.pdtype, seed=index)
            noisy = op == "batch_norm" and index % 3 == 1
            training = d.training
            keep = dict(w=d.affine, b=d.affine, rm=d.track, rv=d.track)
            for k, on in keep.items():
                if not on:
                    t[k] = None
            if not training and t["rm"] is None:
                training = True
            if op == "lp":
                t["rv"] = None if t["rv"] is None else t["rv"].abs() + 0.5
            for devices in ((0, 0), (1, 0), (0, 1)):
                TENSORS[0], CURRENT[0] = devices
                noise = (cfg, 7, t["step"]) if noisy else None
                kw = dict(weight=t["w"], bias=t["b"], running_mean=t["rm"],
                          running_var=t["rv"])
                if op == "lp":
                    sig = Signature.of("lp_norm", t["x"], training, p=d.p, centered=d.centered,
                                       **kw)
                    plan = LpNormPlan(sig)
                else:
                    sig = Signature.of("batch_norm", t["x"], training, noise=noise,
                                       activation=d.activation, **kw)
                    plan = BatchNormPlan(sig)

                def call(u):
                    n = (cfg, 7, u["step"]) if noisy else None
                    y, a, b, _ = plan.forward(u["x"], u["w"], u["b"],
                                              Call(u["rm"], u["rv"], plan, 0.1, d.eps, n, None))
                    plan.backward(u["dy"], u["x"], u["w"], u["b"], Saved(a, b, d.eps, n),
                                  (True, d.affine, d.affine))
                    assert CURRENT[0] == devices[1], "the current device changed"

                for _ in range(2):  # the first call binds, the second goes direct
                    call(t)
                for name, value in t.items():
                    if value is None or name == "nbt" or (name == "step" and not noisy):
                        continue
                    del CALLS[:]
                    call(dict(t, **{name: odd(value)}))
                    checked += len(CALLS)
                    call(t)  # and back
    assert checked > 0

    # 3. The compiled kernel behind a bound launch stays loaded when Triton lets go of it.
    import gc

    TENSORS[0] = CURRENT[0] = 0
    t = new_inputs((4, 3, 5, 6))
    plan = BatchNormPlan(Signature.of("batch_norm", t["x"], True, weight=t["w"], bias=t["b"]))
    for _ in range(2):
        plan.forward(t["x"], t["w"], t["b"], Call(None, None, plan, 0.1, 1e-5, None, None))
    for kernel in {launch_.kernel for launch_ in list(launch._ALL)}:
        kernel.device_caches.clear()
    gc.collect()
    del CALLS[:]
    plan.forward(t["x"], t["w"], t["b"], Call(None, None, plan, 0.1, 1e-5, None, None))
    assert CALLS and not CALLS[-1][4], "not direct"

    # 4. The guards: each takes the JIT path and the results agree.
    sig = Signature.of("batch_norm", t["x"], True, weight=t["w"], bias=t["b"])
    plan = BatchNormPlan(sig)

    def fwd(x):
        del CALLS[:]
        plan.forward(x, t["w"], t["b"], Call(None, None, plan, 0.1, 1e-5, None, None))
        return CALLS[-1][4]  # True: through the JIT

    fwd(t["x"])
    assert not fwd(t["x"]), "not direct"
    assert fwd(odd(t["x"])), "a misaligned input took the direct path"
    assert not fwd(t["x"])
    hook = launch._KNOBS.runtime.launch_enter_hook
    if hasattr(hook, "add"):
        def probe(metadata):
            return None

        hook.add(probe)
        try:
            assert fwd(t["x"]), "a launch hook was skipped"
        finally:
            hook.remove(probe)
        assert not fwd(t["x"])
    with launch.jit_only():  # every call through the JIT, until the block ends
        assert fwd(t["x"]) and fwd(t["x"])
    assert fwd(t["x"])  # binds again ...
    assert not fwd(t["x"])  # ... and goes direct
    noise = (cfg, 3, 5)
    nplan = BatchNormPlan(Signature.of("batch_norm", t["x"], True, noise=noise))

    def noisy_call(seed):
        del CALLS[:]
        nplan.forward(t["x"], None, None, Call(None, None, nplan, 0.1, 1e-5, (cfg, seed, 5),
                                               None))
        return CALLS[-1][4]

    noisy_call(3)
    assert not noisy_call(4)
    assert noisy_call(2**40), "an i64 seed took the i32 kernel's direct path"
    print(f"ok {compared} {checked}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
