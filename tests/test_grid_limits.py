"""Every Triton launch of a plan stays within a GPU's grid limits (x < 2^31, y and z <= 65535)
and runs tiles of a useful size, for any shape: checked on plan construction alone, for huge
shapes (meta shapes and strides; nothing is allocated), with the plans' GPU heuristics (as on
an H200 with 132 SMs), without a GPU."""

from __future__ import annotations

import math
import types

import pytest
import torch

from bnkernels.backends.plan import Signature
from bnkernels.backends.triton import common
from bnkernels.backends.triton.batch_norm import plan as bn_plan
from bnkernels.backends.triton.batch_norm.plan import BatchNormPlan
from bnkernels.backends.triton.launch import Launch
from bnkernels.backends.triton.lp_norm.plan import LpNormPlan
from bnkernels.backends.triton.noise import noise_tensor
from bnkernels.noise import NoiseConfig

CUDA = torch.device("cuda", 0)

# (shape, memory format): odd S above 2,097,120 (129^3, 2^21 + 1), S = 2^27, channels last and
# 2-D with 2^31 or more rows, a 2-D input with 2^24 channels, an NCHW input of 2^32 elements.
SHAPES = [
    ((1, 1, 129, 129, 129), None),
    ((2, 3, 2**21 + 1), None),
    ((64, 1, 129, 129, 129), None),
    ((1, 1, 2**27), None),
    ((1, 2, 2**27 + 1), None),
    ((4, 8, 2**27), None),
    ((2**22, 3, 32, 32), torch.channels_last),
    ((2**31 + 3, 2), None),
    ((2, 2**24), None),
    ((3, 2**24 + 1), None),
]


def _sig(op, shape, fmt, dtype, training, noisy=False):
    x = torch.empty(shape, device="meta", dtype=dtype,
                    memory_format=fmt or torch.contiguous_format)
    C = shape[1]
    channel = (torch.float32, CUDA, C, True)
    lp = op == "lp_norm"
    return Signature(op, tuple(x.shape), tuple(x.stride()), dtype, CUDA, training, None,
                     (NoiseConfig(), None) if noisy else None, 2.0 if lp else None,
                     False if lp else None, False, (channel,) * 4, None)


@pytest.fixture
def h200(monkeypatch):
    """The plans' GPU heuristics as on an H200 (132 SMs), the Triton interpreter off for them."""
    props = types.SimpleNamespace(multi_processor_count=132, name="NVIDIA H200")
    monkeypatch.setattr(common, "INTERPRET", False)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda *a, **k: props)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    # a noisy plan's NoiseConfig tensor (4 floats, made with the plan): on the meta device here
    monkeypatch.setattr(bn_plan, "noise_tensor", lambda cfg, device: noise_tensor(cfg, "meta"))
    common._num_sms.cache_clear()
    yield
    common._num_sms.cache_clear()


def _launches(plan) -> list[Launch]:
    """Every launch the plan makes (those made on first use too)."""
    bn = isinstance(plan, BatchNormPlan)
    names = ("k_dx", "k_sync_stats", "k_sync_apply") if bn else \
        ("k_dx",) if plan.training else ("k_eval_dx",)
    for name in names:
        getattr(plan, name)
    if bn or plan.training:
        plan._bwd_launch(True, True, True)
    found = []
    for v in vars(plan).values():
        for item in (v if isinstance(v, list) else v.values() if isinstance(v, dict) else [v]):
            if isinstance(item, Launch):
                found.append(item)
    return found


def _plans(shape, fmt, dtype):
    for training in (True, False):
        yield BatchNormPlan(_sig("batch_norm", shape, fmt, dtype, training))
        yield LpNormPlan(_sig("lp_norm", shape, fmt, dtype, training))
    yield BatchNormPlan(_sig("batch_norm", shape, fmt, dtype, True, noisy=True))


@pytest.mark.parametrize("shape,fmt", SHAPES, ids=lambda v: "x".join(map(str, v))
                         if isinstance(v, tuple) else str(v))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_grids_within_gpu_limits(h200, shape, fmt, dtype):
    numel = math.prod(shape)
    for plan in _plans(shape, fmt, dtype):
        launches = _launches(plan)
        assert launches
        for launch in launches:
            gx, gy, gz = launch.grid
            what = f"{launch.kernel.__name__} {shape} {dtype}: grid {launch.grid}"
            assert 1 <= gx <= 2**31 - 1, what
            assert 1 <= gy <= 65535 and 1 <= gz <= 65535, what
            c = launch.consts
            if "BLOCK_R" in c:  # elementwise: tiles of at least 1024 values (4 KB in fp32)
                assert c["BLOCK_R"] * c["BLOCK_K"] >= 1024, what
                assert gx * gy * gz * c["BLOCK_R"] * c["BLOCK_K"] >= numel, what
            else:  # reductions: tiles of at least 1024 values, at most 4 * 132 programs
                assert c["BLOCK_A"] * c["BLOCK_B"] >= 1024, what
                assert gx * gy * gz <= max(4 * 132, launch.grid[0]), what


def test_too_large_grid_is_a_clear_error():
    with pytest.raises(ValueError, match="exceeds a GPU's launch limits"):
        common.check_grid((2**31,), "elementwise launch")
    with pytest.raises(ValueError, match="exceeds a GPU's launch limits"):
        common.check_grid((4, 65536), "reduction launch")
    assert common.check_grid((2**31 - 1, 65535), "x") == (2**31 - 1, 65535)
