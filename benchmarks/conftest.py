"""pytest-benchmark suite: ``pytest benchmarks/ [--benchmark-json=out.json] [--bench-* ...]``.

Not part of the default ``pytest`` run (``testpaths = ["tests"]``). Every case is one (op, pass,
provider, shape, dtype, layout[, p]) of the suite runner (``bnkernels bench``), built from the
same pieces (:mod:`bnkernels.benchmarking`): shapes, providers, passes, traffic model. Timing:
pytest-benchmark's ``pedantic`` with the L2 flush as untimed setup; on CUDA each round is also
bracketed by CUDA events, and ``extra_info`` carries the event median (``median_us``, the
number the runner reports), GB/s, the fraction of the copy bandwidth measured in this session
and, in the JSON, the speedups over cuDNN and torch.compile.

Without a GPU the Triton kernels run in the interpreter on tiny shapes (no performance claims).
"""

from __future__ import annotations

import os
import statistics
import time

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before bnkernels loads its kernels
    torch.set_num_threads(1)  # as the runner on the CPU: tiny tensors, no thread wake-ups

import pytest  # noqa: E402

from bnkernels.benchmarking import providers as P  # noqa: E402
from bnkernels.benchmarking import shapes as S  # noqa: E402
from bnkernels.benchmarking.suite import add_speedups, device_name  # noqa: E402
from bnkernels.benchmarking.timing import Timer, capture_graph, copy_bandwidth  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def pytest_addoption(parser):
    g = parser.getgroup("bnkernels benchmarks")
    cpu = DEVICE.type == "cpu"
    g.addoption("--bench-shapes", default="cpu-quick" if cpu else "quick",
                help="comma-separated suites/networks/shapes (see benchmarks/shapes.py)")
    g.addoption("--bench-dtypes", default=None, help="fp32,fp16,bf16 (default: the suite's)")
    g.addoption("--bench-layouts", default=None, help="NCHW,channels_last")
    g.addoption("--bench-passes", default=",".join(P.PASSES))
    g.addoption("--bench-providers", default=",".join(P.default_providers(DEVICE)))
    g.addoption("--bench-p", default=None, help="l_p norms: 1,2,inf (default: the suite's)")
    g.addoption("--bench-reps", type=int, default=3 if cpu else 50)
    g.addoption("--bench-warmup", type=int, default=1 if cpu else 10)
    g.addoption("--bench-cuda-graph", action="store_true", help="time CUDA-graph replays")


def _csv(text):
    return [v.strip() for v in text.split(",") if v.strip()]


def pytest_generate_tests(metafunc):
    if "bench_case" not in metafunc.fixturenames:
        return
    op = metafunc.module.OP
    opt = metafunc.config.getoption
    names = _csv(opt("--bench-shapes"))
    suite = S.suites().get(names[0]) if len(names) == 1 else None
    default = suite or S.suites()["full"]
    dtypes = _csv(opt("--bench-dtypes") or ",".join(default.dtypes))
    layouts = _csv(opt("--bench-layouts") or ",".join(default.layouts))
    ps = _csv(opt("--bench-p") or ",".join(default.lp_ps)) if op == "lp_norm" else [None]
    cases = []
    for shape in S.resolve_shapes(names):
        for dtype in dtypes:
            for layout in layouts:
                label = S.layout_name(shape.dims, layout)
                if label is None:
                    continue
                for p in ps:
                    for provider in _csv(opt("--bench-providers")):
                        if op not in P.PROVIDERS[provider].ops:
                            continue
                        for pass_ in _csv(opt("--bench-passes")):
                            if op == "noisy_batch_norm" and pass_ == "fwd-eval":
                                continue  # no noise in eval: it is batch_norm's fwd-eval
                            pid = "-".join(v for v in (pass_, provider, shape.name, dtype,
                                                       label, p and f"p{p}") if v)
                            cases.append(pytest.param(
                                dict(op=op, p=p, pass_=pass_, provider=provider, shape=shape,
                                     dtype=dtype, layout=layout, label=label), id=pid))
    metafunc.parametrize("bench_case", cases)


class BenchEnv:
    """Session state: the device, the L2 flush, the copy bandwidth, and the inputs of the
    current (shape, dtype, layout) (cases come grouped by it; one set of inputs is alive)."""

    def __init__(self, config):
        self.device = DEVICE
        self.reps = config.getoption("--bench-reps")
        self.warmup = config.getoption("--bench-warmup")
        self.cuda_graph = config.getoption("--bench-cuda-graph")
        self.timer = Timer(DEVICE, reps=self.reps, warmup=self.warmup,
                           flush=DEVICE.type == "cuda")
        cuda = DEVICE.type == "cuda"
        # The baseline is timed the same way with or without --bench-cuda-graph (eagerly).
        self.copy_bw = (copy_bandwidth(DEVICE, 2**30) if cuda else
                        copy_bandwidth(DEVICE, 2**24, reps=3, warmup=1, flush=False))
        self._key = self._inputs = None

    def inputs(self, shape, dtype, layout):
        key = (shape.dims, dtype, layout)
        if key != self._key:
            self._inputs = None
            if DEVICE.type == "cuda":
                torch.cuda.empty_cache()
            torch._dynamo.reset()  # one compiled graph per input, never a recompile limit
            self._inputs = P.make_inputs(shape.dims, S.DTYPES[dtype], S.memory_format(layout),
                                         DEVICE)
            self._key = key
        return self._inputs

    def flush(self):
        self.timer.flush_cache()


@pytest.fixture(scope="session")
def bench_env(request):
    return BenchEnv(request.config)


def _run_case(benchmark, case: dict, env: BenchEnv) -> None:
    """Time one case with pytest-benchmark and record the runner's numbers in extra_info."""
    op, p, pass_ = case["op"], case["p"], case["pass_"]
    prov = P.PROVIDERS[case["provider"]]
    why = prov.unavailable(env.device, op)
    if why:
        pytest.skip(why)
    inp = env.inputs(case["shape"], case["dtype"], case["layout"])
    cuda = env.device.type == "cuda"
    times: list[float] = []
    with prov.context():
        build = P.pass_builder(pass_, prov.forward(op, p), inp)
        if env.cuda_graph and cuda:
            fn = capture_graph(build, env.warmup)
        else:
            fn = build()
            for _ in range(env.warmup):
                fn()
        if cuda:
            torch.cuda.synchronize()

            def target():
                start, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end) * 1e3)
        else:
            def target():
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e6)
        benchmark.pedantic(target, setup=env.flush, rounds=env.reps, iterations=1)
    shape = case["shape"]
    x_bytes = shape.numel * inp.x.element_size()
    model, ideal = P.TRAFFIC[pass_]
    median = statistics.median(times)
    gbps = model * x_bytes / (median * 1e3)
    benchmark.extra_info.update(
        op=op, p=p, **{"pass": pass_}, provider=prov.name, shape=list(shape.dims),
        shape_name=shape.name, dtype=case["dtype"], layout=case["label"], median_us=median,
        timer="cuda-events" if cuda else "cpu-perf_counter", bytes=model * x_bytes,
        bytes_ideal=ideal * x_bytes, gbps=gbps, gbps_ideal=ideal * x_bytes / (median * 1e3),
        frac_copy_bw=gbps / env.copy_bw, copy_bw_gbps=env.copy_bw)


@pytest.fixture(scope="session")
def run_case():
    return _run_case


def pytest_benchmark_update_json(config, benchmarks, output_json):
    """Add the speedup columns (as the runner's rows) and the versions to the JSON."""
    rows = [b["extra_info"] for b in output_json.get("benchmarks", [])
            if "median_us" in b.get("extra_info", {})]
    add_speedups(rows)
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    output_json["bnkernels"] = {
        "device": device_name(DEVICE), "torch": torch.__version__, "triton": triton_version,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "performance_claims": DEVICE.type == "cuda"}
