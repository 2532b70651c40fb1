"""The ``bnkernels`` command line (also ``python -m bnkernels``).

    bnkernels train       one run in runs/<id>/ (--resume continues a killed one; under
                          torchrun: DistributedDataParallel with SyncBatchNorm)
    bnkernels ics         runs with internal-covariate-shift measurements, and their plot
    bnkernels landscape   runs with landscape probes (loss, gradient predictiveness, beta)
    bnkernels lr-sweep    the same network at several learning rates
    bnkernels lp          BatchNorm against l1 / l2 / l_inf normalization and none
    bnkernels reproduce   every run behind Figs. 1-4 and 7-14 over several seeds, the figures
                          and report.md (--quick: the 2-core-CPU version on bundled data,
                          minutes; --mode gpu: VGG-16 at full width, ~10 min on one GPU)
    bnkernels demo        bnkernels' BatchNorm against torch's, side by side
    bnkernels bench       kernel benchmarks (bnkernels.benchmarking)
    bnkernels env         versions, GPUs, backends and why one cannot run, the CUDA
                          extension, optional modules, environment variables
    bnkernels --version   the version

Every option of a run's config (``RunConfig``) can be overridden: ``--steps 500 --width 0.5``.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path

from .experiments.batch import default_jobs
from .experiments.config import CONFIGS, RunConfig
from .experiments.models import NORMS


def _csv(kind):
    def parse(text: str):
        return tuple(kind(v) for v in text.split(",") if v.strip())
    parse.__name__ = f"comma-separated {kind.__name__}s"
    return parse


def _bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


_TUPLE_TYPES = {"ics_layers": int, "act_layers": int, "landscape_steps": float,
                "landscape_directions": str}


def add_config_options(p: argparse.ArgumentParser, exclude: tuple[str, ...] = ()) -> None:
    """One ``--field`` per RunConfig field (but ``exclude``), to override the chosen config."""
    g = p.add_argument_group("run config overrides (default: the chosen config's value)")
    for f in dataclasses.fields(RunConfig):
        if f.name in exclude:
            continue
        default = f.default
        if f.name in _TUPLE_TYPES:
            kind = _csv(_TUPLE_TYPES[f.name])
        elif isinstance(default, bool):
            kind = _bool
        elif isinstance(default, int):
            kind = int
        elif isinstance(default, float):
            kind = float
        else:
            kind = str
        choices = NORMS if f.name == "norm" else None
        g.add_argument("--" + f.name.replace("_", "-"), dest="cfg_" + f.name, type=kind,
                       default=None, choices=choices, metavar=f.name.upper())


def config_overrides(args: argparse.Namespace) -> dict:
    return {k[4:]: v for k, v in vars(args).items() if k.startswith("cfg_") and v is not None}


def _download_if_asked(cfg: RunConfig, args) -> None:
    if getattr(args, "download", False) and cfg.dataset == "cifar10":
        from .experiments.data import load_cifar10

        load_cifar10(cfg.data_dir, download=True)


# ----------------------------------------------------------------------------- commands


def cmd_train(args) -> int:
    from .experiments.train import DistBackendError, read_metrics, run_id, train

    cfg = dataclasses.replace(CONFIGS[args.config], **config_overrides(args))
    _download_if_asked(cfg, args)
    run_dir = Path(args.run_dir) if args.run_dir else Path(args.runs_root) / run_id(args.config,
                                                                                     cfg)
    try:
        train(cfg, run_dir, resume=args.resume, stop_after=args.stop_after, device=args.device,
              progress=not args.no_progress, dist_backend=args.dist_backend)
    except DistBackendError as e:
        print(f"bnkernels train: error: {e}", file=sys.stderr)
        return 2
    if int(os.environ.get("RANK", "0")) == 0:
        tr, te = read_metrics(run_dir, "train"), read_metrics(run_dir, "test")
        msg = f"{run_dir}: {len(tr)} training records"
        if tr:
            last = tr[-1]
            msg += f"; step {last['step']}: loss {last['loss']:.4g}"
            msg += f", acc {last['acc']:.3f}" if "acc" in last else ""
        if te:
            msg += f"; test acc {te[-1]['acc']:.3f}"
        print(msg)
    return 0


SWEEP_MEASURE = {
    "ics": dict(landscape_every=0, act_every=0),
    "landscape": dict(ics_every=0, act_every=0),
    "lr-sweep": dict(ics_every=0, landscape_every=0, act_every=0),
    "lp": dict(ics_every=0),
}
SWEEP_NORMS = {"ics": "none,batchnorm", "landscape": "none,batchnorm",
               "lr-sweep": "none,batchnorm", "lp": "none,batchnorm,l1,l2,linf"}


def cmd_sweep(args) -> int:
    """ics / landscape / lr-sweep / lp: a grid of norms x learning rates, then a plot."""
    from .experiments.batch import run_many
    from .experiments.plots import Run, plot_runs
    from .experiments.report import final_test_acc, final_train, ics_mean, landscape_median

    name = f"{args.model}-quick" if args.quick else args.model
    base = dataclasses.replace(CONFIGS[name], **SWEEP_MEASURE[args.command])
    base = dataclasses.replace(base, **config_overrides(args))
    _download_if_asked(base, args)
    lrs = args.lrs or (base.lr,)
    out = Path(args.out or f"runs/{args.command}-{name}")
    grid = [(dataclasses.replace(base, norm=n, lr=lr), out / f"{n}-lr{lr:g}")
            for n in args.norms for lr in lrs]
    from .experiments.runfiles import folder_lock

    with folder_lock(out, "sweep"):  # one sweep per folder at a time
        run_many(grid, jobs=args.jobs or default_jobs(args.device), device=args.device,
                 progress=not args.no_progress, gpu_jobs=args.gpu_jobs,
                 dln_device=args.dln_device)
    runs = [Run.load(d) for _, d in grid]
    png = plot_runs(runs, out / f"{args.command}.png", f"{args.command}: {name}")
    classify = base.model == "vgg"
    print(f"{'run':<24} {'train ' + ('acc' if classify else 'loss'):>11} {'test acc':>9} "
          f"{'ICS cos':>8} {'beta':>10}")
    for run in runs:
        tr = final_train(run, "acc" if classify else "loss")
        te = final_test_acc(run) if classify else float("nan")
        print(f"{run.dir.name:<24} {tr:>11.4g} {te:>9.3f} {ics_mean(run, 'cosine'):>8.3f} "
              f"{landscape_median(run, 'beta_smoothness'):>10.4g}")
    print(f"plot: {png}")
    return 0


def _assignments(items, cfg: RunConfig, flag: str) -> dict:
    """``KEY=VALUE`` strings -> RunConfig field overrides, each value parsed by the field's
    type (tuples from comma-separated lists)."""
    fields = {f.name: f for f in dataclasses.fields(RunConfig)}
    out = {}
    for item in items or ():
        key, sep, text = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or key not in fields:
            raise ValueError(f"{flag} {item!r}: expected FIELD=VALUE with FIELD a run config "
                             f"field ({', '.join(sorted(fields))})")
        default = getattr(cfg, key)
        if key in _TUPLE_TYPES:
            value = _csv(_TUPLE_TYPES[key])(text)
        elif isinstance(default, bool):
            value = _bool(text)
        elif isinstance(default, int):
            value = int(text)
        elif isinstance(default, float):
            value = float(text)
        else:
            value = None if text.lower() == "none" else text
        out[key] = value
    return out


def _has_cifar10(data_dir: str | None) -> bool:
    from .experiments.data import CIFAR10_TEST, _cifar_root

    return data_dir is not None and (_cifar_root(data_dir) / CIFAR10_TEST).is_file()


def cmd_reproduce(args) -> int:
    from .experiments.report import SUITES, claims_table_text, reproduce, write_report

    mode = "quick" if args.quick else args.mode
    out = Path(args.out or ("runs/reproduce" if mode == "full" else f"runs/reproduce-{mode}"))
    dataset = args.dataset
    if dataset is None and mode == "gpu" and (_has_cifar10(args.data_dir) or args.download):
        dataset = "cifar10"  # the gpu mode: CIFAR-10 when --data-dir has it, else digits
    overrides = {k: v for k, v in (("dataset", dataset), ("data_dir", args.data_dir))
                 if v is not None}
    if args.download and (dataset or SUITES[mode].vgg.dataset) == "cifar10":
        from .experiments.data import load_cifar10

        load_cifar10(args.data_dir or "data", download=True)
        overrides.setdefault("data_dir", args.data_dir or "data")
    if args.report_only:
        from .experiments.runfiles import folder_lock

        if not (out / "suite.json").is_file():
            raise FileNotFoundError(f"{out / 'suite.json'} not found: no reproduction to report "
                                    "on there (run `bnkernels reproduce` first)")
        with folder_lock(out, "reproduction"):  # not while a reproduction writes there
            report = write_report(out, figures=not args.no_figures)
    else:
        try:
            overrides.update(_assignments(args.set, SUITES[mode].vgg, "--set"))
            dln_overrides = _assignments(args.dln_set, SUITES[mode].dln, "--dln-set")
        except ValueError as e:
            print(f"bnkernels reproduce: error: {e}", file=sys.stderr)
            return 2
        report = reproduce(out, mode=mode, jobs=args.jobs, device=args.device,
                           overrides=overrides, progress=not args.no_progress,
                           dln_overrides=dln_overrides, seeds=args.seeds, steps=args.steps,
                           dln_steps=args.dln_steps, gpu_jobs=args.gpu_jobs,
                           dln_device=args.dln_device, figures=not args.no_figures)
    print(claims_table_text(out))
    print(f"report: {report}")
    return 0


def cmd_env(args) -> int:
    from .envinfo import collect, format_report

    info = collect()
    if args.json:
        import json

        print(json.dumps(info, indent=2))
    else:
        print(format_report(info))
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo

    return run_demo(steps=args.steps, seed=args.seed, lr=args.lr, backend=args.backend)


# ----------------------------------------------------------------------------- parser


def add_bench_parser(sub) -> bool:
    """The ``bench`` subcommand, when :mod:`bnkernels.benchmarking.cli` can be imported: its
    ``add_parser(sub)`` adds the parser and ``main(args)`` runs it. Otherwise there is none."""
    try:
        from .benchmarking import cli as bench
    except ImportError:
        return False
    bench.add_parser(sub)
    parser = sub.choices.get("bench")
    if parser is None:
        return False
    parser.set_defaults(func=bench.main)
    return True


def _common(p, jobs: bool = True) -> None:
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, ...")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    if jobs:
        p.add_argument("--jobs", type=int, default=None,
                       help="CPU runs trained at once in separate processes (default: one per "
                            "core, less the GPU workers)")
        p.add_argument("--gpu-jobs", type=int, default=None,
                       help="GPU runs trained at once, sharing the device(s) (default 4 per "
                            "GPU)")
        p.add_argument("--dln-device", default="cpu",
                       help="where deep-linear-network runs train: cpu (default: the 10x10 "
                            "layers are pure per-call overhead on a GPU), or 'same' as "
                            "--device")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bnkernels", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    from ._version import __version__

    parser.add_argument("--version", action="version", version=f"bnkernels {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train one run in runs/<id>/")
    p.add_argument("--config", default="vgg", choices=sorted(CONFIGS),
                   help="named config (vgg, dln: the paper's; *-quick: CPU-sized; tiny)")
    p.add_argument("--run-dir", help="the run folder (default: <runs-root>/<config>-<norm>-"
                                     "lr<lr>-seed<seed>)")
    p.add_argument("--runs-root", default="runs")
    p.add_argument("--resume", action="store_true",
                   help="continue an unfinished run from its last checkpoint")
    p.add_argument("--stop-after", type=int, default=None,
                   help="stop before this step without a final checkpoint (simulates a kill)")
    p.add_argument("--download", action="store_true",
                   help="download CIFAR-10 into --data-dir if missing (checksum verified)")
    p.add_argument("--dist-backend", default="auto", choices=("auto", "nccl", "gloo"),
                   help="under torchrun: the process-group backend (auto: NCCL when every "
                        "process has its own GPU, else gloo on the CPU)")
    _common(p, jobs=False)
    add_config_options(p)
    p.set_defaults(func=cmd_train)

    helps = {"ics": "internal covariate shift (Definition 2.1, Fig. 3)",
             "landscape": "loss / gradient-predictiveness / beta-smoothness probes (Fig. 4)",
             "lr-sweep": "several learning rates (Figs. 1, 10)",
             "lp": "l_p normalizations against BatchNorm and none (Figs. 11-14)"}
    for cmd, text in helps.items():
        p = sub.add_parser(cmd, help=text)
        p.add_argument("--model", default="vgg", choices=("vgg", "dln"))
        p.add_argument("--quick", action="store_true",
                       help="the CPU-sized config (vgg-quick / dln-quick)")
        p.add_argument("--norms", type=_csv(str), default=_csv(str)(SWEEP_NORMS[cmd]),
                       help=f"comma-separated, from {', '.join(NORMS)}")
        p.add_argument("--lrs", type=_csv(float), default=(0.1, 0.5) if cmd == "lr-sweep"
                       else None, help="comma-separated learning rates (default: the config's)")
        p.add_argument("--out", help=f"folder for the runs and the plot (default runs/{cmd}-"
                                     "<config>)")
        p.add_argument("--download", action="store_true")
        _common(p)
        add_config_options(p, exclude=("model", "norm", "lr"))
        p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("reproduce", help="all runs behind Figs. 1-4 and 7-14, figures and "
                                         "report.md with the claims table")
    p.add_argument("--quick", action="store_true",
                   help="the 2-core-CPU version (bundled digits, short runs; minutes)")
    p.add_argument("--mode", choices=("full", "gpu", "quick", "tiny"), default="full",
                   help="full: the paper's step counts, 5 seeds (GPU, hours); gpu: VGG-16 at "
                        "full width for 3,000 steps and the DLN for 10,000, 3 seeds (about "
                        "10 minutes on one H100/H200; digits, or CIFAR-10 when --data-dir has "
                        "it); quick: as --quick; tiny: a seconds-long smoke test")
    p.add_argument("--seeds", type=_csv(int), default=None,
                   help="comma-separated seeds (default: the mode's)")
    p.add_argument("--steps", type=int, default=None,
                   help="VGG steps (measurement schedules scaled in proportion)")
    p.add_argument("--dln-steps", type=int, default=None,
                   help="DLN steps (measurement schedules scaled in proportion)")
    p.add_argument("--set", action="append", metavar="FIELD=VALUE",
                   help="override a field of the base VGG config, e.g. --set width=0.5 "
                        "(repeatable)")
    p.add_argument("--dln-set", action="append", metavar="FIELD=VALUE",
                   help="override a field of the base DLN config (repeatable)")
    p.add_argument("--out", help="suite folder (default runs/reproduce-quick or runs/reproduce)")
    p.add_argument("--dataset", choices=("cifar10", "digits"), default=None,
                   help="VGG dataset (default: cifar10 full, digits quick)")
    p.add_argument("--data-dir", default=None, help="CIFAR-10 folder")
    p.add_argument("--download", action="store_true", help="download CIFAR-10 if missing")
    p.add_argument("--report-only", action="store_true",
                   help="only redraw figures and report.md from the saved runs")
    p.add_argument("--no-figures", action="store_true",
                   help="write report.md and claims.json without (re)drawing the figures")
    _common(p)
    p.set_defaults(func=cmd_reproduce)

    p = sub.add_parser("demo", help="train a small CNN with bnkernels BatchNorm and with "
                                    "torch's, side by side, and report how they match")
    p.add_argument("--steps", type=int, default=20, help="SGD steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr", type=float, default=0.1, help="SGD step size")
    p.add_argument("--backend", choices=("auto", "triton", "cpu", "reference"), default="auto",
                   help="auto: bnkernels' choice (without a GPU its cpu backend, the CPU "
                        "path; reference: the eager oracle); triton: the Triton kernels "
                        "(without a GPU in the interpreter, slow: about 1.5 s a step on a "
                        "2-core CPU)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("env", help="versions, GPUs, backends (and why one cannot run), the "
                                   "CUDA extension, optional modules, environment variables")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=cmd_env)

    add_bench_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status: 0, 1 (the demo did not match), 2 (bad
    input, missing data, a folder in use or holding another run), 128 + the signal number
    when SIGINT (one Ctrl-C) or SIGTERM stopped it (130, 143)."""
    from .experiments.stopping import Interrupted, stop_on_signals

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        with stop_on_signals():
            return int(args.func(args) or 0)
    except ModuleNotFoundError as e:  # an optional module: name the extra that installs it
        from .envinfo import install_hint

        hint = install_hint(e.name or "")
        if hint is None:
            raise
        print(f"bnkernels {args.command}: error: this command needs {e.name}, which is not "
              f"installed: {hint}", file=sys.stderr)
        return 2
    except (FileNotFoundError, FileExistsError) as e:  # missing data, occupied run folder
        print(f"bnkernels {args.command}: error: {e}", file=sys.stderr)
        return 2
    except Interrupted as e:
        how = {"demo": "", "bench": "",
               "train": " The run folder holds the run up to its last checkpoint; the same "
                        "command with --resume continues it."}.get(
            args.command, " Every run folder holds its run up to its last checkpoint; the "
                          "same command resumes them.")
        print(f"bnkernels {args.command}: stopped ({e}).{how}", file=sys.stderr)
        return e.exit_code


if __name__ == "__main__":
    sys.exit(main())
