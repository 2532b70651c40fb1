"""The command line's package edges: ``--version``, ``bnkernels env``, the install hint for a
missing extra, and the ``bnkernels`` logger's messages. In-process, well under a second each."""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

import pytest

import bnkernels
from bnkernels import cli, envinfo


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"bnkernels {bnkernels.__version__}"


def test_env_reports_backends_with_reasons_and_the_environment(capsys, monkeypatch):
    monkeypatch.setenv("BNKERNELS_CUDA_PERSISTENT", "0")
    assert cli.main(["env", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["bnkernels"]["version"] == bnkernels.__version__
    assert Path(info["bnkernels"]["location"]) == Path(bnkernels.__file__).parent
    assert info["backends"] == bnkernels.available_backends()
    assert info["backends"]["reference"] == []
    assert info["environment"]["BNKERNELS_CUDA_PERSISTENT"] == "0"
    assert set(info["optional"]) >= {"ninja", "matplotlib", "tqdm", "sklearn"}
    assert cli.main(["env"]) == 0
    text = capsys.readouterr().out
    for name, reasons in info["backends"].items():
        assert name in text
        assert all(r in text for r in reasons)
    lines = {line.split()[0]: line.split()[1:] for line in text.splitlines() if line.strip()}
    assert lines["BNKERNELS_CUDA_PERSISTENT"] == ["0"]
    assert lines["BNKERNELS_BACKEND"] == [os.environ.get("BNKERNELS_BACKEND", "(unset)")]


def test_env_lists_every_variable_the_library_reads():
    """Every ``BNKERNELS_*`` variable in the package's sources is in ENV_VARS or documented
    as build-, tool- or test-only in docs/environment.md."""
    import re

    root = Path(bnkernels.__file__).parent
    found = set()
    for path in root.rglob("*.py"):
        found |= set(re.findall(r"BNKERNELS_[A-Z_]+[A-Z]", path.read_text()))
    doc = (root.parent / "docs" / "environment.md").read_text()
    for var in found:
        assert var in envinfo.ENV_VARS or f"`{var}`" in doc, var
    for var in envinfo.ENV_VARS:
        assert f"`{var}`" in doc, var


def test_missing_extra_names_the_install_command(capsys, monkeypatch, tmp_path):
    """``reproduce`` without matplotlib: exit 2 and ``pip install 'bnkernels[experiments]'``,
    not a traceback."""
    for mod in [m for m in sys.modules if m.startswith(("bnkernels.experiments.report",
                                                        "bnkernels.experiments.plots"))]:
        monkeypatch.delitem(sys.modules, mod)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib fails
    assert cli.main(["reproduce", "--mode", "tiny", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "needs matplotlib" in err and "pip install 'bnkernels[experiments]'" in err
    assert envinfo.install_hint("sklearn.datasets") == "pip install 'bnkernels[experiments]'"
    assert envinfo.install_hint("ninja") == "pip install 'bnkernels[cuda]'"
    assert envinfo.install_hint("numpy") is None


def test_philox_fallback_is_logged(caplog, monkeypatch):
    from bnkernels.backends.reference import formulas

    def no_compiler():
        raise FileNotFoundError("cc")

    monkeypatch.setattr(formulas, "_PHILOX_FN", None)
    monkeypatch.setattr(formulas, "_build_philox_c", no_compiler)
    with caplog.at_level(logging.WARNING, logger="bnkernels"):
        assert formulas._philox_c() is False
    (rec,) = [r for r in caplog.records if r.name.startswith("bnkernels.")]
    assert rec.levelno == logging.WARNING and "numpy" in rec.getMessage()
    assert "FileNotFoundError: cc" in rec.getMessage()


def test_cuda_first_use_build_is_logged(caplog, monkeypatch, tmp_path):
    from bnkernels.backends.cuda import loader

    built = object()

    def fake_build(verbose=False):
        monkeypatch.setattr(loader, "_ext", built)
        return tmp_path / "ext.so"

    monkeypatch.setattr(loader, "_ext", None)
    monkeypatch.setattr(loader, "_build_error", None)
    monkeypatch.setattr(loader, "_prebuilt", lambda: None)
    monkeypatch.setattr(loader, "library_path", lambda: tmp_path / "missing.so")
    if hasattr(loader, "library_complete"):
        monkeypatch.setattr(loader, "library_complete", lambda: False)
    monkeypatch.setattr(loader, "_jit_directory", lambda: tmp_path)
    monkeypatch.setattr(loader, "build", fake_build)
    with caplog.at_level(logging.INFO, logger="bnkernels"):
        assert loader.load() is built
    messages = [r.getMessage() for r in caplog.records if r.name.startswith("bnkernels.")]
    assert any("building the CUDA extension" in m and str(tmp_path) in m for m in messages)
    assert any(m.startswith("built the CUDA extension in") for m in messages)
