"""Triton's real compiler accepts every kernel (see tests/compile_for_gpu.py)."""

import pytest
from helpers import run_compiler_script

triton = pytest.importorskip("triton")


@pytest.mark.skipif(not hasattr(triton.compiler, "ASTSource"),
                    reason="this Triton has no ASTSource to compile without a GPU")
def test_kernels_compile_for_sm90():
    assert "compiled" in run_compiler_script("compile_for_gpu.py")


@pytest.mark.skipif(not hasattr(triton.compiler, "ASTSource"),
                    reason="this Triton has no ASTSource to compile without a GPU")
def test_int64_variants_widen_program_ids_before_products():
    """No i32 product of a program id feeds the INT64 variants' offsets (see
    tests/int64_offsets_check.py): it would wrap at 2^31 rows."""
    out = run_compiler_script("int64_offsets_check.py")
    assert ": 0 with 32-bit program-id products" in out, out
