"""Compile every Triton kernel of bnkernels for a real GPU target (sm_90), without a GPU.

The CPU test run executes the kernels in the Triton interpreter, which accepts some code the
compiler rejects; this script runs Triton's real compiler (to PTX and cubin) on each kernel with
every boolean flag on and every optional tensor given, then every flag off and every optional
tensor None (the kernels read a tensor's presence from its pointer), so such code fails the
tests here rather than on a GPU.
Run as a script (the interpreter must be off): tests/test_triton_gpu_compile.py does.
"""

from __future__ import annotations

import importlib
import os
import pathlib
import sys
import time

assert os.environ.get("TRITON_INTERPRET", "0") != "1", "run with the interpreter off"

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

_TRITON = pathlib.Path(__file__).resolve().parents[1] / "bnkernels" / "backends" / "triton"


def kernel_modules() -> list[str]:
    """Every module of the Triton backend that defines @triton.jit functions: the shared ones
    beside launch.py and each op family's ``<family>/kernels.py`` (a new family is found
    without an edit here)."""
    paths = sorted(_TRITON.glob("*.py")) + sorted(_TRITON.glob("*/kernels.py"))
    return [".".join(p.relative_to(_TRITON).with_suffix("").parts) for p in paths
            if p.name != "__init__.py" and "@triton.jit" in p.read_text()]


MODULES = kernel_modules()


def kernels():
    """Every ``*_kernel`` JITFunction the modules define (not those they import)."""
    for mod in MODULES:
        m = importlib.import_module(f"bnkernels.backends.triton.{mod}")
        yield from (obj for name, obj in vars(m).items()
                    if isinstance(obj, JITFunction) and name.endswith("_kernel")
                    and obj.__module__ == m.__name__)


DATA_PTRS = {"x_ptr", "y_ptr", "dy_ptr", "dx_ptr", "res_ptr", "out_ptr", "dres_ptr"}  # fp16 here
FLOATS = {"eps", "momentum", "n_mu", "n_sigma", "r_mu", "r_sigma", "inv_m", "M_F"}
WIDE_INTS = {"seed"}
INT64_PTRS = {"used_ptr", "nbt_ptr"}
BLOCKS = {"BLOCK": 256, "BLOCK_M": 32, "BLOCK_C": 16, "BLOCK_R": 4, "BLOCK_K": 64, "BLOCK_N": 4,
          "BLOCK_S": 64, "BLOCK_A": 32, "BLOCK_B": 16,  # the reductions' tile, either layout (CL)
          "ALIGN": 4}  # ALIGN: a power of two dividing the rows


def _arg_type(kernel, name, step_ptr):
    if name == "step":  # the noise step: an int, or a 1-element int tensor (read on device)
        return "*i64" if step_ptr else "i64"
    if name.endswith("_ptr"):
        return "*fp16" if name in DATA_PTRS else "*i64" if name in INT64_PTRS else "*fp32"
    if name in FLOATS or (name == "M" and "finalize" in kernel.__name__):
        return "fp32"
    return "i64" if name in WIDE_INTS else "i32"


ENUMS = ("P", "SCALE_FROM", "PHASE")  # integer constexprs taking 0, 1 and 2
# Tensors a kernel takes as None when absent (a constexpr None: the variant without them).
OPTIONAL_PTRS = {"res_ptr", "lo_ptr", "w_ptr", "b_ptr", "save_mean_ptr", "save_invstd_ptr",
                 "used_ptr", "nbt_ptr", "rmean_ptr", "rvar_ptr", "rscale_ptr", "out_ptr",
                 "dres_ptr", "dw_ptr", "db_ptr"}
# ... and those optional in some kernels only: dx in a backward reduction (asked for dweight
# and dbias alone), the coefficients in the shared dx kernel (eval)
OPTIONAL_IN = {"bwd_kernel": {"dx_ptr"}, "affine_dx_kernel": {"coef_ptr"}}
# The one-pass BatchNorm kernels take the noise optionally: a plain plan passes the noise
# tensor, seed and step as None (the variant without noise).
NOISE_OPTIONAL = {"_bn_fused_fwd_kernel", "_bn_fused_bwd_kernel"}
NOISE_ARGS = ("noise_ptr", "seed", "step")


def absent(kernel, values, flag_value):
    """``values`` with every optional tensor of ``kernel`` None when ``flag_value`` is False."""
    if not flag_value:
        optional = OPTIONAL_PTRS.union(*(v for k, v in OPTIONAL_IN.items()
                                         if kernel.__name__.endswith(k)))
        if kernel.__name__ in NOISE_OPTIONAL:
            optional = optional.union(NOISE_ARGS)
        values.update({n: None for n in kernel.arg_names if n in optional})
    return values


def _variants(kernel):
    names = [p.name for p in kernel.params if p.is_constexpr]
    flags = [n for n in names if n not in BLOCKS and n not in ("ACC", *ENUMS)]
    enums = [n for n in names if n in ENUMS]
    for flag_value in (True, False):
        for e in ([0, 1, 2] if enums else [None]):
            values = {n: BLOCKS[n] for n in names if n in BLOCKS}
            values.update({n: flag_value for n in flags})
            if "ACC" in names:
                values["ACC"] = tl.float32
            values.update({n: e for n in enums})
            values = absent(kernel, values, flag_value)
            # the step as an int and as a tensor, where the variant reads one
            for step_ptr in ((0, 1) if "step" in kernel.arg_names and "step" not in values
                             else (0,)):
                yield values, step_ptr


def main() -> int:
    target = GPUTarget("cuda", 90, 32)
    count, start = 0, time.time()
    for kernel in kernels():
        mod = kernel.__module__.removeprefix("bnkernels.backends.triton.")
        for values, step_ptr in _variants(kernel):
            signature = {n: ("constexpr" if n in values else _arg_type(kernel, n, step_ptr))
                         for n in kernel.arg_names}
            constexprs = {(kernel.arg_names.index(n),): v for n, v in values.items()}
            try:
                triton.compile(ASTSource(fn=kernel, signature=signature,
                                         constexprs=constexprs), target=target)
            except Exception as err:  # report which kernel and flags, then fail
                print(f"FAILED {mod}.{kernel.__name__} {values}: {err}", file=sys.stderr)
                return 1
            count += 1
    print(f"compiled {count} kernel variants for sm_90 in {time.time() - start:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
