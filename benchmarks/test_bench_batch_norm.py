"""pytest-benchmark, BatchNorm: cudnn, torch-native, torch-compile and bnkernels' backends.

Cases (pass x provider x shape x dtype x layout) and the harness: benchmarks/conftest.py."""

OP = "batch_norm"


def test_batch_norm(benchmark, bench_case, bench_env, run_case):
    run_case(benchmark, bench_case, bench_env)
