"""Structural rules of the Triton kernels (docs/kernels.md): no @triton.jit function takes more
than 30 parameters, and one op family's kernels use no other family's private names (what
BatchNorm and l_p share lives in the shared modules)."""

from __future__ import annotations

import ast
import importlib
import pathlib

import pytest

triton = pytest.importorskip("triton")
from triton.runtime.jit import JITFunction  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1] / "bnkernels" / "backends" / "triton"
# every module defining jit functions, and every op family (a folder with kernels.py): a new
# family is checked without an edit here
MODULES = [".".join(p.relative_to(ROOT).with_suffix("").parts)
           for p in sorted(ROOT.glob("*.py")) + sorted(ROOT.glob("*/kernels.py"))
           if p.name != "__init__.py" and "@triton.jit" in p.read_text()]
FAMILIES = sorted(p.parent.name for p in ROOT.glob("*/kernels.py"))
MAX_PARAMS = 30


def _jit_functions():
    for mod in MODULES:
        m = importlib.import_module(f"bnkernels.backends.triton.{mod}")
        for name, obj in vars(m).items():
            fn = getattr(obj, "fn", obj)  # the interpreter wraps the JITFunction
            if (isinstance(obj, JITFunction) or hasattr(obj, "arg_names")) and \
                    getattr(fn, "__module__", None) == m.__name__:
                yield f"{mod}.{name}", obj


def test_no_jit_function_takes_more_than_30_parameters():
    assert {"affine", "common", "noise", "batch_norm.kernels", "lp_norm.kernels"} <= set(MODULES)
    found = dict(_jit_functions())
    kernels = [n for n in found if n.endswith("_kernel")]
    assert len(kernels) >= 10, sorted(found)  # the modules' kernels were found
    wide = {n: len(f.arg_names) for n, f in found.items() if len(f.arg_names) > MAX_PARAMS}
    assert not wide, f"more than {MAX_PARAMS} parameters (constexprs included): {wide}"


@pytest.mark.parametrize("family", FAMILIES)
def test_a_family_uses_no_other_familys_private_names(family):
    others = [f for f in FAMILIES if f != family]
    bad = []
    for path in sorted((ROOT / family).glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and any(
                    (node.module or "").split(".")[0] == other for other in others):
                bad += [f"{path.name}: {node.module}.{a.name}" for a in node.names
                        if a.name.startswith("_")]
    assert not bad, bad
