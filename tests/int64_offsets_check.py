"""No 32-bit product of a program id in the 64-bit-offset (INT64=True) kernel variants.

The kernels' INT64 variants serve tensors of 2^31 elements or more; their offsets are 64-bit,
but a product like ``program_id * CHUNK`` computed in 32 bits before the widening wraps at
2^31 and the wrapped rows then pass the mask. This script lowers every kernel's INT64 variants
(channels last and not, every boolean flag on, then off) to Triton IR for sm_90 with Triton's
real front end (no GPU needed) and follows each program id through the IR: every value
computed from one in i32 (or a tensor of i32) is tainted, a widening to i64 ends the taint, and
an i32 ``arith.muli`` or ``arith.shli`` of a tainted value is an error.

Run as a script (the interpreter must be off): tests/test_triton_gpu_compile.py does. Prints
one line per offending kernel variant (and exits 1), or a summary.
"""

from __future__ import annotations

import os
import re
import sys
import time

assert os.environ.get("TRITON_INTERPRET", "0") != "1", "run with the interpreter off"

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from compile_for_gpu import BLOCKS, ENUMS, _arg_type, absent, kernels  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
_OP = re.compile(r"^\s*(?P<res>(?:%[\w#.]+(?::\d+)?(?:,\s*)?)+)\s*=\s*(?P<op>[\w.]+)"
                 r"(?P<rest>.*)$")
_FOR = re.compile(r"scf\.for\s+(?P<iv>%[\w#.]+)\s*=\s*(?P<lb>%[\w#.]+)\s+to\s+(?P<ub>%[\w#.]+)"
                  r"\s+step\s+(?P<st>%[\w#.]+)(?P<rest>.*)$")
_VAL = re.compile(r"%[\w#.]+")


def ttir(kernel, signature, constexprs) -> str:
    """The Triton IR (after Triton's TTIR passes: inlined, canonicalized) of one variant."""
    src = ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
    try:  # the front end alone (make_ir, then the "ttir" stage): no LLVM, no ptxas
        from triton._C.libtriton import ir
        from triton.compiler.compiler import make_backend

        backend = make_backend(TARGET)
        options = backend.parse_options(dict(src.parse_options()))
        stages: dict = {}
        backend.add_stages(stages, options, src.language)
        context = ir.context()
        ir.load_dialects(context)
        backend.load_dialects(context)
        module = src.make_ir(TARGET, options, backend.get_codegen_implementation(options),
                             backend.get_module_map(), context)
        metadata = {"hash": "0", "target": TARGET, **options.__dict__}
        return str(stages["ttir"](module, metadata))
    except (ImportError, AttributeError, TypeError):  # another Triton: compile it all
        return triton.compile(src, target=TARGET).asm["ttir"]


def _is_i32(type_text: str) -> bool:
    """An i32 scalar or a tensor of i32 (the result type at the end of an op's line)."""
    t = type_text.strip()
    return t == "i32" or bool(re.search(r"tensor<[\dx]*xi32(,|>)", t))


# Philox4x32's round multipliers (0xD2511F53, 0xCD9E8D57) as i32: its rounds multiply 32-bit
# counter words modulo 2^32 by design, and a channel index (the noise's counter, < 2^31) may
# come straight from a program id. Such a product is no offset.
_PHILOX_MULTIPLIERS = {"-766435501", "-845247145"}
_NAME = re.compile(r"%[\w#.-]+")  # an SSA name whole (a constant's may hold a minus sign)
_CONST = re.compile(r"^\s*(?P<res>%[\w#.-]+)\s*=\s*arith\.constant\s+(?:dense<)?"
                    r"(?P<v>-?\d+)>?\s*:")


def narrow_pid_products(ir_text: str) -> list[str]:
    """The i32 multiplies (and left shifts) of values computed from a program id in i32, other
    than Philox's round multiplies."""
    tainted: set[str] = set()
    philox: set[str] = set()  # the constants holding a Philox multiplier
    bad = []
    for line in ir_text.splitlines():
        code = line.split(" loc(")[0]
        m = _FOR.search(code)
        if m:  # a loop from a tainted i32 start has a tainted induction variable
            if m["lb"] in tainted and code.rstrip().endswith(": i32"):
                tainted.add(m["iv"])
            continue
        c = _CONST.match(code)
        if c and c["v"] in _PHILOX_MULTIPLIERS:
            philox.add(c["res"])
        m = _OP.match(code)
        if not m:
            continue
        results = [r.split(":")[0].strip() for r in m["res"].split(",")]
        op, rest = m["op"], m["rest"]
        result_type = rest.rsplit(":", 1)[-1] if ":" in rest else ""
        if op == "tt.get_program_id":
            tainted.update(results)
            continue
        if op in ("arith.extsi", "arith.extui") or not _is_i32(result_type.split("->")[-1]):
            continue  # widened (or not an i32 result): the taint ends here
        operands = _VAL.findall(rest)
        if any(v in tainted for v in operands):
            if op in ("arith.muli", "arith.shli") and not (
                    op == "arith.muli" and any(v in philox for v in _NAME.findall(rest))):
                bad.append(code.strip())
            tainted.update(results)
    return bad


def _int64_variants(kernel):
    """INT64=True with every other boolean flag on (every optional tensor given), then off
    (every optional tensor None); one value of each enum (0)."""
    names = [p.name for p in kernel.params if p.is_constexpr]
    flags = [n for n in names if n not in BLOCKS and n not in ("ACC", *ENUMS)]
    for flag_value in (True, False):
        values = {n: BLOCKS[n] for n in names if n in BLOCKS}
        values.update({n: flag_value for n in flags})
        values["INT64"] = True
        if "ACC" in names:
            values["ACC"] = tl.float32
        values.update({n: 0 for n in names if n in ENUMS})
        yield absent(kernel, values, flag_value)


def main() -> int:
    count, failures, start = 0, [], time.time()
    for kernel in kernels():
        mod = kernel.__module__.removeprefix("bnkernels.backends.triton.")
        if "INT64" not in kernel.arg_names:
            continue
        for values in _int64_variants(kernel):
            signature = {n: ("constexpr" if n in values else _arg_type(kernel, n, 0))
                         for n in kernel.arg_names}
            constexprs = {(kernel.arg_names.index(n),): v for n, v in values.items()}
            bad = narrow_pid_products(ttir(kernel, signature, constexprs))
            count += 1
            if bad:
                on = sorted(k for k, v in values.items() if v is True)
                failures.append(f"{mod}.{kernel.__name__} ({', '.join(on) or 'INT64'}): "
                                f"{len(bad)} i32 product(s) of a program id, e.g. {bad[0]}")
    for f in failures:
        print(f"FAILED {f}", file=sys.stderr)
    print(f"checked {count} INT64 kernel variants in {time.time() - start:.1f}s: "
          f"{len(failures)} with 32-bit program-id products")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
