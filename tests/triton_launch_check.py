"""Check the direct launch path (bnkernels.backends.triton.launch) against Triton's own JIT
launch, without a GPU: run as a script with the interpreter off (tests/test_triton_launch.py).

A fake Triton driver (current device 0, target sm_90, a launcher that records its arguments
instead of launching) lets Triton's real JIT compile every kernel for sm_90 and "launch" it.
Each plan call is made twice on the same inputs: the first call goes through ``kernel[grid]``
(the JIT binds, specializes and launches), the second through the direct path bound after it.
Both launches must reach the launcher with the same grid, stream, function, metadata and
arguments (tensors: the same objects where the caller passed them, the same dtype and shape
where the plan allocated them; scalars: equal). Then the guards: a 16-byte-misaligned input, a
seed that changes Triton's integer type, and an installed launch hook must each take the JIT
path again, as must every call inside ``jit_only()``. Prints "ok <n>" with the number of
launches compared.
"""

# ruff: noqa: B023  (every closure below runs before its loop moves on)
from __future__ import annotations

import os
import sys

assert os.environ.get("TRITON_INTERPRET", "0") != "1", "run with the interpreter off"

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime.driver import driver  # noqa: E402

CALLS: list[tuple] = []


class _Launcher:
    def __init__(self, src, metadata):
        self.src, self.metadata = src, metadata

    def __call__(self, *args):
        CALLS.append(args)


class _Utils:
    def load_binary(self, name, kernel, shared, device):
        return ("module", f"function:{name}", 32, 0, 1024)

    def get_device_properties(self, device):
        return {"max_shared_mem": 232448, "multiprocessor_count": 132, "max_num_regs": 65536,
                "warpSize": 32}

    def unload_module(self, module):
        pass


class _Driver:
    utils = _Utils()
    launcher_cls = _Launcher

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 777

    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

    def get_active_torch_device(self):
        return torch.device("cpu")

    def is_active(self):
        return True


def main() -> int:
    if getattr(triton, "knobs", None) is None:
        print("skip: this Triton (< 3.3) has no direct launch path")
        return 0
    driver.set_active(_Driver())
    torch.cuda.current_device = lambda: 0  # the plans' device index (no GPU here)

    from bnkernels.backends.plan import Signature
    from bnkernels.backends.triton import launch
    from bnkernels.backends.triton.batch_norm.plan import BatchNormPlan
    from bnkernels.backends.triton.common import override_config
    from bnkernels.backends.triton.lp_norm.plan import LpNormPlan
    from bnkernels.noise import NoiseConfig

    assert launch.DIRECT, "the direct path is off"
    launch._raw_stream_getter = lambda: (lambda index: 777)
    compared = 0

    def same(jit_call, direct_call, inputs):
        assert len(jit_call) == len(direct_call), (len(jit_call), len(direct_call))
        assert jit_call[:6] == direct_call[:6], (jit_call[:6], direct_call[:6])
        assert direct_call[6:9] == (None, None, None)
        for i, (a, b) in enumerate(zip(jit_call[9:], direct_call[9:])):
            if isinstance(a, torch.Tensor):
                assert isinstance(b, torch.Tensor), i
                if any(a is t for t in inputs):
                    assert b is a, f"argument {i}: a different input tensor"
                else:  # allocated by the plan in each call
                    assert (a.dtype, a.shape, a.stride()) == (b.dtype, b.shape, b.stride()), i
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
            assert a[6] is not None, "the first call did not go through the JIT"
            same(a, b, inputs)
            compared += 1
        return second

    def new_inputs(shape, channels_last=False, dtype=torch.float32):
        g = torch.Generator().manual_seed(0)
        x = torch.randn(shape, generator=g).to(dtype)
        if channels_last:
            x = x.to(memory_format=torch.channels_last)
        C = shape[1]
        return dict(x=x, dy=torch.randn_like(x), w=torch.ones(C), b=torch.zeros(C),
                    rm=torch.zeros(C), rv=torch.ones(C), nbt=torch.zeros((), dtype=torch.long))

    cfg = NoiseConfig()
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
                            out = plan.forward(t["x"], t["rm"], t["rv"], t["w"], t["b"], 0.1,
                                               1e-5, None, True, t["nbt"] if training else None)
                            saved["a"], saved["b"] = out[1], out[2]

                        twice(fwd, ins)
                        twice(lambda: plan.backward(t["dy"], t["x"], saved["a"], saved["b"],
                                                    t["w"], t["b"], 1e-5, (True, True, True),
                                                    None),
                              ins + [saved["a"], saved["b"]])
                    # a residual add and ReLU: forward, then the backward reading the output
                    for training in (True, False):
                        rsig = Signature.of("batch_norm", t["x"], training, activation="relu",
                                            weight=t["w"], bias=t["b"], running_mean=t["rm"],
                                            running_var=t["rv"], residual=t["dy"])
                        rplan = BatchNormPlan(rsig)
                        rsaved = {}

                        def rfwd():
                            out = rplan.forward(t["x"], t["rm"], t["rv"], t["w"], t["b"], 0.1,
                                                1e-5, None, True, None, t["dy"])
                            rsaved["y"], rsaved["a"], rsaved["b"] = out[0], out[1], out[2]

                        twice(rfwd, ins)
                        twice(lambda: rplan.backward(t["dy"], t["x"], rsaved["a"], rsaved["b"],
                                                     t["w"], t["b"], 1e-5, (True,) * 4, None,
                                                     rsaved["y"]),
                              ins + [rsaved["y"], rsaved["a"], rsaved["b"]])
                    # noisy, with a tensor step and with an int step
                    for step in (torch.zeros(1, dtype=torch.long), 5):
                        noise = (cfg, 3, step)
                        nsig = Signature.of("batch_norm", t["x"], True, activation="relu",
                                            noise=noise, weight=t["w"], bias=t["b"])
                        nplan = BatchNormPlan(nsig)
                        twice(lambda: nplan.forward(t["x"], None, None, t["w"], t["b"], 0.1,
                                                    1e-5, noise, True, None),
                              ins + ([step] if isinstance(step, torch.Tensor) else []))
                    # l_p
                    for training in (True, False):
                        lsig = Signature.of("lp_norm", t["x"], training, p=1, centered=True,
                                            weight=t["w"], bias=t["b"], running_mean=t["rm"],
                                            running_var=t["rv"])
                        lplan = LpNormPlan(lsig)
                        twice(lambda: lplan.forward(t["x"], t["rm"], t["rv"], t["w"], t["b"],
                                                    0.1, 1e-5, None, True, None), ins)

    # The guards: each takes the JIT path (launch metadata not None) and the results agree.
    t = new_inputs((4, 3, 5, 6))
    sig = Signature.of("batch_norm", t["x"], True, weight=t["w"], bias=t["b"])
    plan = BatchNormPlan(sig)

    def fwd(x):
        del CALLS[:]
        plan.forward(x, None, None, t["w"], t["b"], 0.1, 1e-5, None, True, None)
        return CALLS[-1]

    fwd(t["x"])
    assert fwd(t["x"])[6] is None, "not direct"
    odd = torch.empty(t["x"].numel() + 1)[1:].view(t["x"].shape).copy_(t["x"])
    assert odd.data_ptr() % 16 != 0
    assert fwd(odd)[6] is not None, "a misaligned input took the direct path"
    assert fwd(t["x"])[6] is None
    hook = launch._KNOBS.runtime.launch_enter_hook
    if hasattr(hook, "add"):
        def probe(metadata):
            return None

        hook.add(probe)
        try:
            assert fwd(t["x"])[6] is not None, "a launch hook was skipped"
        finally:
            hook.remove(probe)
        assert fwd(t["x"])[6] is None
    with launch.jit_only():  # every call through the JIT, until the block ends
        assert fwd(t["x"])[6] is not None and fwd(t["x"])[6] is not None
    assert fwd(t["x"])[6] is not None  # binds again ...
    assert fwd(t["x"])[6] is None  # ... and goes direct
    noise = (cfg, 3, 5)
    nplan = BatchNormPlan(Signature.of("batch_norm", t["x"], True, noise=noise))

    def noisy(seed):
        del CALLS[:]
        nplan.forward(t["x"], None, None, None, None, 0.1, 1e-5, (cfg, seed, 5), True, None)
        return CALLS[-1]

    noisy(3)
    assert noisy(4)[6] is None
    assert noisy(2**40)[6] is not None, "an i64 seed took the i32 kernel's direct path"
    print(f"ok {compared}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
