"""pytest-benchmark, noisy BatchNorm (Algorithm 1): bnkernels against the eager
composite (F.batch_norm plus torch noise), its torch.compile, and plain-BatchNorm baselines.

Cases (pass x provider x shape x dtype x layout) and the harness: benchmarks/conftest.py."""

OP = "noisy_batch_norm"


def test_noisy_batch_norm(benchmark, bench_case, bench_env, run_case):
    run_case(benchmark, bench_case, bench_env)
