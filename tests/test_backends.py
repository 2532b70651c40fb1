"""Backend registry: selection by name and environment, and errors that list every reason."""

from __future__ import annotations

import pytest
import torch

import bnkernels as bnk
from bnkernels import backends
from bnkernels.backends.triton import TritonBackend


def test_available_backends_lists_every_backend_with_reasons():
    avail = bnk.available_backends()
    assert set(avail) == {"triton", "cuda", "cpu", "reference"}
    assert avail["reference"] == []
    assert avail["cpu"] == []  # a C compiler is on every test machine
    assert all(isinstance(r, list) for r in avail.values())
    if not torch.cuda.is_available():  # conftest switched the interpreter on
        assert avail["triton"] == []
        assert any("no CUDA device" in r for r in avail["cuda"])


def test_set_backend_rejects_unknown_names():
    with pytest.raises(ValueError,
                       match="unknown backend 'cudnn'.*auto.*triton.*cuda.*reference"):
        bnk.set_backend("cudnn")


def test_environment_variable_selects_backend(monkeypatch):
    monkeypatch.setattr(backends, "_selected", None)
    monkeypatch.setenv("BNKERNELS_BACKEND", "reference")
    assert bnk.get_backend() == "reference"
    assert backends.select("batch_norm", torch.randn(4, 3)).name == "reference"
    monkeypatch.setenv("BNKERNELS_BACKEND", "fast")
    with pytest.raises(ValueError, match="BNKERNELS_BACKEND: unknown backend 'fast'"):
        bnk.get_backend()
    bnk.set_backend("triton")  # set_backend wins over the environment
    monkeypatch.setenv("BNKERNELS_BACKEND", "reference")
    assert bnk.get_backend() == "triton"


def test_auto_on_cpu_follows_the_interpreter(monkeypatch):
    x = torch.randn(4, 3)
    if torch.cuda.is_available():
        assert backends.select("batch_norm", x.cuda()).name == "triton"
    monkeypatch.setattr(TritonBackend, "interpreting", lambda self: True)
    assert backends.select("batch_norm", x).name == "triton"
    monkeypatch.setattr(TritonBackend, "interpreting", lambda self: False)
    assert backends.select("batch_norm", x).name == "cpu"
    for op in ("noisy_batch_norm", "lp_norm", "noisy_batch_norm_noise"):
        assert backends.select(op, x).name == "cpu"


def test_auto_falls_back_to_the_reference_without_the_cpu_kernels(monkeypatch):
    """No C compiler (or a failed build): the cpu backend says why, "auto" takes the
    reference; an op it does not run (a later family) falls back the same way."""
    from bnkernels.backends.cpu import CpuBackend, build

    monkeypatch.setattr(TritonBackend, "interpreting", lambda self: False)
    monkeypatch.setattr(build, "_LIB", "no C compiler found (set CC, or install cc/gcc)")
    x = torch.randn(4, 3)
    assert backends.select("batch_norm", x).name == "reference"
    why = bnk.available_backends()["cpu"]
    assert why and "no C compiler found" in why[0]
    monkeypatch.undo()
    monkeypatch.setattr(TritonBackend, "interpreting", lambda self: False)
    assert CpuBackend().not_supported_reasons("batch_norm_add", x) == [
        "op 'batch_norm_add' is not supported by the cpu backend (it runs "
        "('batch_norm', 'noisy_batch_norm', 'noisy_batch_norm_noise', 'lp_norm'))"]
    assert backends.select("batch_norm_add", x).name == "reference"


def test_cpu_tensor_to_triton_without_interpreter_names_the_reason(monkeypatch):
    monkeypatch.setattr(TritonBackend, "interpreting", lambda self: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    bnk.set_backend("triton")
    with pytest.raises(RuntimeError) as info:
        bnk.batch_norm(torch.randn(4, 3), None, None, training=True)
    msg = str(info.value)
    assert "no backend can run batch_norm (backend='triton')" in msg
    assert "x is a CPU tensor" in msg and "no CUDA device" in msg


def test_reasons_for_unsupported_dtype():
    for name in ("triton", "cuda", "cpu", "reference"):
        reasons = backends.backend(name).not_supported_reasons("batch_norm",
                                                               torch.ones(2, 2, dtype=torch.int32))
        assert any("dtype torch.int32" in r for r in reasons), name
    with pytest.raises(ValueError, match="unknown backend 'auto'"):
        backends.backend("auto")


def test_a_residual_call_on_a_cpu_takes_the_reference(monkeypatch):
    """The cpu backend does not run BatchNorm with a residual: "auto" gives it to the
    reference (the same result as the reference by name), and asking for cpu names why."""
    monkeypatch.setattr(TritonBackend, "interpreting", lambda self: False)
    g = torch.Generator().manual_seed(0)
    x, r = torch.randn(4, 3, 5, generator=g), torch.randn(4, 3, 5, generator=g)
    bnk.set_backend("auto")
    y = bnk.batch_norm(x, None, None, training=True, activation="relu", residual=r)
    bnk.set_backend("reference")
    want = bnk.batch_norm(x, None, None, training=True, activation="relu", residual=r)
    assert torch.equal(y, want)
    assert backends.select("batch_norm", x).name == "reference"  # set_backend("reference")
    bnk.set_backend("cpu")
    with pytest.raises(RuntimeError, match=r"cpu: op 'batch_norm\+residual' is not supported"):
        bnk.batch_norm(x, None, None, training=True, residual=r)
