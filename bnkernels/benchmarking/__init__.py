"""Kernel benchmarks: shapes as data (:mod:`.shapes`), the implementations compared
(:mod:`.providers`), timing (:mod:`.timing`), the suite runner (:mod:`.suite`) and its result
files (:mod:`.report`). The command line is ``bnkernels bench`` (:mod:`bnkernels.bench`); the
pytest-benchmark suite in ``benchmarks/`` is built on the same pieces.

Nothing here is imported by the kernels or the ops: importing :mod:`bnkernels` does not load it.
"""
