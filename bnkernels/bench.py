"""``bnkernels bench``: the kernel benchmark suite runner (also ``python -m bnkernels bench``).

Times batch_norm, noisy_batch_norm and lp_norm (forward-train, forward-eval, backward,
forward+backward) for every provider (cuDNN, PyTorch native, torch.compile, eager composites,
bnkernels' backends) over shapes from real networks, and writes ``<out>/<gpu>/<date>.json``
with a markdown table and two PNGs (speedup by shape, bandwidth roofline) beside it.

    bnkernels bench                    # the full suite on the GPU
    bnkernels bench --quick            # a representative subset, minutes
    bnkernels bench --device cpu --quick --out /tmp/b   # CPU smoke test (no perf claims)

The command line module calls :func:`add_parser` and :func:`main`.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

DEFAULT_OUT = "benchmarks/results"


def _csv(text: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in text.split(",") if v.strip())


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``bench`` subcommand (and its options) to ``subparsers``; returns its parser."""
    p = subparsers.add_parser(
        "bench", help="kernel benchmarks against cuDNN and torch.compile (results/<gpu>/)",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto",
                   help="cuda, cuda:N or cpu (default: cuda if available, else cpu). On cpu: "
                        "tiny shapes, the reference and interpreted Triton providers, "
                        "perf_counter timing - a smoke test, no performance claims")
    p.add_argument("--quick", action="store_true",
                   help="a short run: the 'quick' suite (GPU) or 'cpu-quick' (CPU), fewer "
                        "repetitions, l_2 only")
    p.add_argument("--out", default=DEFAULT_OUT,
                   help=f"results folder; files go to <out>/<gpu>/<date>.* (default "
                        f"{DEFAULT_OUT})")
    g = p.add_argument_group("what to run (comma-separated; default: the suite's)")
    g.add_argument("--shapes", type=_csv, default=None,
                   help="suites (full, quick, cpu, cpu-quick), networks (vgg16-cifar-b128, "
                        "resnet50-imagenet-b64, ...), 'edge', or dims like 64x256x56x56")
    g.add_argument("--dtypes", type=_csv, default=None, help="fp32, fp16, bf16")
    g.add_argument("--layouts", type=_csv, default=None, help="NCHW, channels_last")
    g.add_argument("--ops", type=_csv, default=None,
                   help="batch_norm, noisy_batch_norm, lp_norm (default: all)")
    g.add_argument("--passes", type=_csv, default=None,
                   help="fwd-train, fwd-eval, bwd, fwd+bwd (default: all)")
    g.add_argument("--providers", type=_csv, default=None,
                   help="cudnn, torch-native, torch-compile, eager, eager-compile, "
                        "bnkernels-triton, bnkernels-cuda, bnkernels-reference (default: all "
                        "that fit the device; unavailable ones are skipped with the reason)")
    g.add_argument("--p", dest="lp_ps", type=_csv, default=None,
                   help="l_p norms: 1, 2, inf (default: all; --quick: 2)")
    t = p.add_argument_group("timing")
    t.add_argument("--reps", type=int, default=None,
                   help="timed repetitions, median reported (default 100 GPU, 30 --quick; "
                        "CPU 5, 3 --quick)")
    t.add_argument("--warmup", type=int, default=None, help="untimed calls first (default 10; "
                                                            "--quick 5; CPU 1)")
    t.add_argument("--flush", action=argparse.BooleanOptionalAction, default=None,
                   help="write a >= 256 MiB buffer between repetitions to flush L2 (default: "
                        "on for CUDA, off on the CPU)")
    t.add_argument("--cuda-graph", action="store_true",
                   help="time CUDA-graph replays (no launch overhead)")
    t.add_argument("--compile-mode", default=None,
                   help="torch.compile mode for the compiled providers (default: 'default')")
    t.add_argument("--time-limit", type=float, default=None, metavar="SECONDS",
                   help="start no new input after this long; the results written so far are "
                        "kept and the file says it was truncated")
    t.add_argument("--no-check", dest="check", action="store_false",
                   help="skip the forward-output check against an fp64 oracle")
    p.add_argument("--list", action="store_true",
                   help="list suites, shape groups and providers (with availability); run "
                        "nothing")
    return p


def _device(text: str):
    import torch

    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(text)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bnkernels bench: --device cuda, but torch sees no CUDA device")
    if device.type not in ("cuda", "cpu"):
        raise SystemExit(f"bnkernels bench: unsupported device {text!r} (cuda or cpu)")
    return device


def _interpret_triton_on_cpu() -> None:
    """On the CPU the Triton kernels run interpreted; the switch is read when they are first
    imported, so it is set here unless they are loaded already (then the triton provider is
    skipped with the backend's reason)."""
    if "bnkernels.backends.triton.common" not in sys.modules:
        os.environ.setdefault("TRITON_INTERPRET", "1")


def _choose(given, allowed, what: str) -> tuple[str, ...]:
    unknown = [v for v in given if v not in allowed]
    if unknown:
        raise SystemExit(f"bnkernels bench: unknown {what} {unknown}; choose from "
                         f"{list(allowed)}")
    return tuple(given)


def _list(device) -> int:
    from .benchmarking import providers as P
    from .benchmarking import shapes as S

    print("suites:")
    for name, suite in S.suites().items():
        print(f"  {name:<10} {len(suite.shapes):>3} shapes x {','.join(suite.dtypes)} x "
              f"{','.join(suite.layouts)}, p={','.join(suite.lp_ps)}: {suite.description}")
    print("shape groups (--shapes):")
    for name, shapes in S.shape_groups().items():
        print(f"  {name:<24} {' '.join(s.name for s in shapes)}")
    print(f"providers on {device}:")
    for name, prov in P.PROVIDERS.items():
        why = prov.unavailable(device)
        if not why and name not in P.default_providers(device):
            why = P.not_default_reason(name, device)
        print(f"  {name:<20} {'ok' if not why else 'skipped: ' + why}")
    return 0


def options(args: argparse.Namespace):
    """The :class:`~bnkernels.benchmarking.suite.RunOptions` for parsed arguments."""
    device = _device(args.device)
    if device.type == "cpu":
        _interpret_triton_on_cpu()
    from .benchmarking import providers as P
    from .benchmarking import shapes as S
    from .benchmarking.suite import RunOptions

    cpu = device.type == "cpu"
    suite_name = ("cpu-quick" if args.quick else "cpu") if cpu else \
        ("quick" if args.quick else "full")
    suite = S.suites()[suite_name]
    try:
        shapes = S.resolve_shapes(list(args.shapes)) if args.shapes else suite.shapes
    except ValueError as e:
        raise SystemExit(f"bnkernels bench: {e}") from None
    requested = _choose(args.providers or (), P.PROVIDERS, "providers")
    providers = requested or tuple(P.default_providers(device))
    if cpu:
        reps, warmup = (3 if args.quick else 5), 1
    else:
        reps, warmup = (30, 5) if args.quick else (100, 10)
    reps = args.reps or reps
    warmup = warmup if args.warmup is None else args.warmup
    return RunOptions(
        device=device, shapes=tuple(shapes),
        dtypes=_choose(args.dtypes or suite.dtypes, S.DTYPES, "dtypes"),
        layouts=_choose(args.layouts or suite.layouts, S.LAYOUTS, "layouts"),
        ops=_choose(args.ops or P.OPS, P.OPS, "ops"),
        passes=_choose(args.passes or P.PASSES, P.PASSES, "passes"),
        providers=providers, requested=requested,
        lp_ps=_choose(args.lp_ps or suite.lp_ps, P.LP_PS, "l_p norms"),
        reps=reps, warmup=warmup,
        flush=(not cpu) if args.flush is None else args.flush,
        cuda_graph=args.cuda_graph, compile_mode=args.compile_mode,
        copy_bytes=(16 if args.quick else 64) * 2**20 if cpu else 2**30,
        check=args.check, time_limit_s=args.time_limit,
        suite=",".join(args.shapes) if args.shapes else suite_name)


def main(args: argparse.Namespace) -> int:
    """Run the ``bench`` subcommand; 0 on success, 1 if a provider's output failed its check."""
    if args.list:
        device = _device(args.device)
        if device.type == "cpu":
            _interpret_triton_on_cpu()
        return _list(device)
    opts = options(args)
    if opts.cuda_graph and opts.device.type != "cuda":
        raise SystemExit("bnkernels bench: --cuda-graph needs a CUDA device")
    from .benchmarking import providers as P
    from .benchmarking.report import write
    from .benchmarking.suite import run

    result = run(opts)
    for name in P.PROVIDERS:
        if name not in opts.providers:
            why = ("not asked for (--providers)" if opts.requested
                   else P.not_default_reason(name, opts.device))
            result["skipped"].insert(0, {"provider": name, "reason": why})
    paths = write(result, Path(args.out))
    for kind, path in paths.items():
        print(f"{kind}: {path}")
    for g in result["summary"]["goals"]:
        met = {True: "met", False: "NOT MET", None: "-"}[g["met"]]
        value = "not measured" if g["value"] is None else f"{g['value']:.3f}"
        print(f"goal {g['goal']:<22} target {g['target']:<5} measured {value:<13} {met}")
    failed = [r for r in result["rows"] if r["check"] == "FAIL"]
    for r in failed:
        print(f"CHECK FAILED: {r['provider']} {r['op']} {r['pass']} {r['shape_name']} "
              f"{r['dtype']} {r['layout']}: max error {r['max_err']:.3g}")
    return 1 if failed else 0


if __name__ == "__main__":
    _parser = argparse.ArgumentParser(prog="bnkernels")
    add_parser(_parser.add_subparsers(dest="command", required=True))
    sys.exit(main(_parser.parse_args(["bench", *sys.argv[1:]])))
