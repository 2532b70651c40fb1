"""pytest-benchmark, l_p normalization: bnkernels against the eager l_p formula, its
torch.compile, and plain-BatchNorm baselines.

Cases (pass x provider x shape x dtype x layout) and the harness: benchmarks/conftest.py."""

OP = "lp_norm"


def test_lp_norm(benchmark, bench_case, bench_env, run_case):
    run_case(benchmark, bench_case, bench_env)
