"""``bnkernels bench``: the benchmark suite runner (also ``python -m bnkernels bench``).

Three sections: ``overhead`` (host time per call on a small tensor, every provider, against
F.batch_norm), ``e2e`` (VGG-16 and ResNet-50 training steps, torch's BatchNorm against
bnkernels') and ``kernels`` (batch_norm, noisy_batch_norm and lp_norm, forward-train,
forward-eval, backward, forward+backward, for every provider -- cuDNN, PyTorch native,
torch.compile, eager composites, bnkernels' backends -- over shapes from real networks, timed
eagerly and as CUDA-graph replays). Then the project's GPU targets, each with its measured
value, limit and pass/fail. Writes ``<out>/<gpu>/<date>.json`` with a markdown report and PNGs
(speedup by shape, bandwidth roofline, host/e2e ratios) beside it.

    bnkernels bench                    # everything on the GPU (kernels in both timing modes)
    bnkernels bench --quick            # all targets, sized for ~3-4 minutes (graph replays)
    bnkernels bench --device cpu --quick --out /tmp/b   # CPU smoke test (no perf claims)
    bnkernels bench --sass [--quick]   # no GPU needed: the kernels compiled for sm_90 (H200),
                                       # registers, spills, access widths, occupancy, bytes

The command line module calls :func:`add_parser` and :func:`main`.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

DEFAULT_OUT = "benchmarks/results"
SECTIONS = ("overhead", "e2e", "cpu", "kernels")  # as bnkernels.benchmarking.suite.SECTIONS
QUICK_TIME_LIMIT = 180.0  # seconds: sizes --quick on a GPU for ~3-4 minutes (untimed yet)
KERNEL_RESERVE = 60.0  # seconds of a time limit kept for the kernel section


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
                   help="a short run that still measures every target: the 'quick' kernel "
                        "suite (GPU; CUDA-graph mode, fewer repetitions, l_2 only; a "
                        f"{QUICK_TIME_LIMIT:.0f} s time limit) or 'cpu-quick' (CPU)")
    p.add_argument("--smoke", action="store_true",
                   help="tiny sizes on any device (the CPU sizes; the test suite's run on a "
                        "GPU): checks the runner, no performance claims")
    p.add_argument("--sections", type=_csv, default=None,
                   help=f"sections to run, of {','.join(SECTIONS)} (default: all)")
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
                   help="fwd-train, fwd-eval, bwd, fwd+bwd (default: all; --sass also bwd-eval)")
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
    t.add_argument("--modes", type=_csv, default=None,
                   help="kernel timing modes: eager (CUDA events around eager calls: launch "
                        "overhead included where the flush does not hide it), graph "
                        "(CUDA-graph replays: kernel time). Default: eager,graph for the full "
                        "GPU run, graph for --quick, eager on the CPU; every row says its mode")
    t.add_argument("--cuda-graph", action="store_true",
                   help="the same as --modes graph")
    t.add_argument("--compile-mode", default=None,
                   help="torch.compile mode for the compiled providers (default: 'default')")
    t.add_argument("--time-limit", type=float, default=None, metavar="SECONDS",
                   help="the whole run's budget: no new e2e configuration or kernel input "
                        "starts after this long (e2e stops earlier, leaving the kernels "
                        f"{KERNEL_RESERVE:.0f} s or a third); the file says what was cut "
                        f"(default: {QUICK_TIME_LIMIT:.0f} for --quick on a GPU, else none)")
    t.add_argument("--no-check", dest="check", action="store_false",
                   help="skip the forward-output check against an fp64 oracle")
    s = p.add_argument_group("static analysis (no GPU needed)")
    s.add_argument("--sass", action="store_true",
                   help="compile the kernels each plan launches on the suite's inputs for sm_90 "
                        "(H200) with the JIT's specialization, without a GPU, and report "
                        "registers, spills, shared memory, global load/store widths, "
                        "occupancy and a bytes-moved model (full suite; --quick: quick); "
                        "writes <out>/sm90-static/<date>.json and .md; exit 1 if a kernel "
                        "spills or accesses memory narrower than alignment allows")
    s.add_argument("--jobs", type=int, default=None,
                   help="--sass: compiling processes (default: the CPUs, at most 8)")
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


def _list(device) -> int:
    from . import providers as P
    from . import shapes as S

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
    from . import e2e as E2E
    from . import overhead as OVH

    o = OVH.OverheadOptions.for_device(device)
    print(f"overhead section on {device}: {'x'.join(map(str, o.shape))} fp32, providers "
          f"{', '.join(o.providers)}")
    e = E2E.E2EOptions.for_device(device, quick=False)
    print(f"e2e section on {device}: {', '.join(m.name for m in e.models)}; providers "
          f"{', '.join(e.providers)}")
    for s in o.left_out(device) + e.left_out(device):
        print(f"  {s['section']}: {s['provider']} left out: {s['reason']}")
    return 0


def options(args: argparse.Namespace):
    """The :class:`~bnkernels.benchmarking.suite.RunOptions` for parsed arguments."""
    device = _device(args.device)
    if device.type == "cpu":
        _interpret_triton_on_cpu()
    from . import e2e as E2E
    from . import overhead as OVH
    from . import providers as P
    from . import shapes as S
    from . import stack as STACK
    from .suite import MODES, RunOptions

    cpu = device.type == "cpu"
    smoke = bool(getattr(args, "smoke", False))
    tiny = cpu or smoke
    quick = args.quick or smoke
    suite_name = ("cpu-quick" if quick else "cpu") if tiny else ("quick" if quick else "full")
    suite = S.suites()[suite_name]
    try:
        shapes = S.resolve_shapes(list(args.shapes)) if args.shapes else suite.shapes
    except ValueError as e:
        raise SystemExit(f"bnkernels bench: {e}") from None
    known = {**P.PROVIDERS, **{n: None for n in OVH.names() + E2E.names()}}
    requested = S.choose(args.providers or (), known, "providers")
    providers = tuple(n for n in requested if n in P.PROVIDERS) if requested else \
        tuple(n for n in P.default_providers(device)
              if not (smoke and not cpu and P.PROVIDERS[n].compiled))
    if tiny:
        reps, warmup = (3 if quick else 5), 1
    else:
        reps, warmup = (30, 5) if args.quick else (100, 10)
    reps = args.reps or reps
    warmup = warmup if args.warmup is None else args.warmup
    if args.cuda_graph and args.modes and tuple(args.modes) != ("graph",):
        raise SystemExit("bnkernels bench: --cuda-graph means --modes graph; give one of them")
    if args.modes:
        modes = S.choose(args.modes, MODES, "timing modes")
    elif args.cuda_graph:
        modes = ("graph",)
    elif cpu:
        modes = ("eager",)
    else:  # quick: kernel time only (host time has its own section); full and smoke: both
        modes = ("graph",) if args.quick and not smoke else MODES
    time_limit = args.time_limit
    if time_limit is None and args.quick and not tiny:
        time_limit = QUICK_TIME_LIMIT
    overhead = OVH.OverheadOptions.for_device(device, smoke, requested)
    e2e = E2E.E2EOptions.for_device(device, quick=args.quick, smoke=smoke, requested=requested)
    from . import cpu_path as CPU

    cpu_opts = CPU.CpuPathOptions.for_run(quick=quick, smoke=smoke)
    return RunOptions(
        device=device, shapes=tuple(shapes),
        dtypes=S.choose(args.dtypes or suite.dtypes, S.DTYPES, "dtypes"),
        layouts=S.choose(args.layouts or suite.layouts, S.LAYOUTS, "layouts"),
        ops=S.choose(args.ops or P.OPS, P.ops(), "ops"),
        passes=S.choose(args.passes or P.PASSES, P.PASSES, "passes"),
        providers=providers, requested=requested,
        lp_ps=S.choose(args.lp_ps or suite.lp_ps, P.LP_PS, "l_p norms"),
        reps=reps, warmup=warmup,
        flush=(not cpu) if args.flush is None else args.flush,
        modes=modes, compile_mode=args.compile_mode,
        copy_bytes=(16 if quick else 64) * 2**20 if cpu else 2**30,
        copy_reps=3 if tiny else 50, copy_warmup=1 if tiny else 5,
        check=args.check, time_limit_s=time_limit,
        kernel_reserve_s=min(KERNEL_RESERVE, time_limit / 3) if time_limit else KERNEL_RESERVE,
        suite=",".join(args.shapes) if args.shapes else suite_name + (" (smoke)" if smoke
                                                                      else ""),
        sections=S.choose(args.sections or SECTIONS, SECTIONS, "sections"),
        smoke=smoke, overhead=overhead, e2e=e2e, cpu=cpu_opts,
        stack=STACK.StackOptions.for_run(smoke, quick=args.quick))


def main(args: argparse.Namespace) -> int:
    """Run the ``bench`` subcommand; 0 on success, 1 if a provider's output failed its check
    (a kernel row's forward against the fp64 oracle, or an e2e model's first loss against
    torch's). Targets are reported, pass or fail, and never change the exit status."""
    if getattr(args, "sass", False):
        from .sass.report import execute

        return execute(args)
    if args.list:
        device = _device(args.device)
        if device.type == "cpu":
            _interpret_triton_on_cpu()
        return _list(device)
    opts = options(args)
    if "graph" in opts.modes and opts.device.type != "cuda":
        raise SystemExit("bnkernels bench: CUDA-graph timing (--cuda-graph, --modes graph) "
                         "needs a CUDA device")
    from . import providers as P
    from .report import write, write_partial
    from .suite import run

    out = Path(args.out)
    opts.checkpoint = lambda partial: print(f"partial results: {write_partial(partial, out)}")
    result = run(opts)
    if "kernels" in opts.sections:
        for name in P.PROVIDERS:
            if name not in opts.providers:
                if opts.requested:
                    why = "not asked for (--providers)"
                elif opts.smoke and P.PROVIDERS[name].compiled:
                    why = "not run in a smoke run (compiling takes seconds per graph)"
                else:
                    why = P.not_default_reason(name, opts.device)
                result["skipped"].insert(0, {"provider": name, "reason": why})
    paths = write(result, out)
    for kind, path in paths.items():
        print(f"{kind}: {path}")
    for g in result["summary"]["goals"]:
        met = {True: "met", False: "NOT MET", None: "-"}[g["met"]]
        value = "not measured" if g["value"] is None else f"{g['value']:.3f}"
        print(f"goal {g['goal']:<22} target {g['target']:<5} measured {value:<13} {met}")
    print(targets_table(result))
    failed = [r for r in result["rows"] if r["check"] == "FAIL"]
    for r in failed:
        print(f"CHECK FAILED: {r['provider']} {r['op']} {r['pass']} {r['shape_name']} "
              f"{r['dtype']} {r['layout']}: max error {r['max_err']:.3g}")
    e2e_failed = [r for r in result["e2e"] if r["check"] == "FAIL"]
    for r in e2e_failed:
        print(f"CHECK FAILED: e2e {r['model']} {r['dtype']} {r['layout']} {r['provider']}: "
              f"weights kept by convert: {r['weights_kept']}; first loss {r['loss_first']:.6g}"
              f" differs from torch's by {r['loss_rel_diff']:.3g} (relative)")
    return 1 if failed or e2e_failed else 0


def targets_table(result: dict) -> str:
    """The targets as fixed-width text lines, one a target, with PASS / FAIL / '-'."""
    judged = ("judged" if result["performance_claims"]
              else "not judged: no performance claims in this run")
    lines = [f"targets ({judged}):"]
    for t in result["targets"]:
        verdict = {True: "PASS", False: "FAIL", None: "-"}[t["met"]]
        value = "not measured" if t["value"] is None else f"{t['value']:.3f}"
        lines.append(f"  {verdict:<4} {t['name']:<44} {value:>12} {t['compare']} "
                     f"{t['limit']:<5}  {t['where'] or ''}")
    return "\n".join(lines)


def standalone(argv: list[str] | None = None) -> int:
    """``python -m bnkernels.benchmarking [options]``: the bench without the package CLI."""
    parser = argparse.ArgumentParser(prog="bnkernels")
    add_parser(parser.add_subparsers(dest="command", required=True))
    return main(parser.parse_args(["bench", *(sys.argv[1:] if argv is None else argv)]))
