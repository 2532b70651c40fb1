"""Run the SASS report on the cases given as JSON in argv[1] and write the document, plus a
cross-check of the SASS decoder against cuobjdump's listing, to argv[2].

Run as a script with the Triton interpreter off (tests/test_sass.py does): the kernels must be
defined for the compiler, not the interpreter.
"""

from __future__ import annotations

import json
import os
import sys

assert os.environ.get("TRITON_INTERPRET", "0") != "1", "run with the interpreter off"

from bnkernels.benchmarking import sass  # noqa: E402
from bnkernels.benchmarking.sass import compile as C  # noqa: E402
from bnkernels.benchmarking.sass import parse as P  # noqa: E402

CROSS_CHECKS = 3  # kernels disassembled by cuobjdump too (~1 s each)


def main() -> int:
    cases = [sass.Case(op, p, pass_, tuple(dims), dtype, layout)
             for op, p, pass_, dims, dtype, layout in json.loads(sys.argv[1])]
    doc = sass.run(cases, jobs=sass.default_jobs())
    checks = []
    seen = set()
    for case in cases:
        for launch in sass.case_launches(case):
            spec = C.specialize(launch)
            if spec.key in seen or len(checks) >= CROSS_CHECKS:
                continue
            seen.add(spec.key)
            with C._sm90_jit():
                cubin = C._jit_run(launch).asm["cubin"]
            launch.kernel.device_caches.clear()
            try:
                listing = P.parse_sass(C.disassemble(cubin))
            except RuntimeError as e:  # no cuobjdump here: say so, the test skips
                checks.append({"kernel": spec.kernel, "error": str(e)})
                continue
            decoded = P.read_cubin(cubin)["sass"]
            checks.append({"kernel": spec.kernel, "case": case.name,
                           "listing": {k: listing[k] for k in ("LDG", "STG", "LDL", "STL",
                                                                "atomics")},
                           "decoded": {k: decoded[k] for k in ("LDG", "STG", "LDL", "STL",
                                                                "atomics")}})
    with open(sys.argv[2], "w") as f:
        json.dump({"doc": doc, "cross_checks": checks}, f, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
