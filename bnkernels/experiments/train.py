"""Run configurations and the training loop.

A run lives in ``runs/<id>/``::

    config.json        the RunConfig (every field), written once
    versions.json      python / torch / numpy / bnkernels versions, git commit, device, backend
    metrics.jsonl      one JSON object per line, each with "kind" and "step" (see below)
    checkpoints/       step_<N>.pt: model, optimizer, metrics.jsonl length, RNG state
    done.json          written when the run has finished all its steps: its wall-clock seconds
                       and the CPU seconds of its process (both summed over resumes)

metrics.jsonl kinds: "train" (per-minibatch loss and accuracy of step t, before its update),
"test" (test loss and accuracy after ``step`` updates; noisy BatchNorm networks add two
consistent evaluations, see :mod:`.noisy`), "ics" (Definition 2.1 at step t, one line per
layer), "landscape" (one probe at step t), "hessian" (top Hessian eigenvalue, optionally the
trace, at step t), "act" (activation summaries at step t).

Resume: a checkpoint holds the byte length metrics.jsonl had when it was written; the file is
cut back to it and the run goes on from the checkpoint's step. RNG states are saved (CPU, and
CUDA when used) and restored as CPU byte tensors whatever device ``torch.load`` put them on, so
a run trained on a GPU resumes too (with cuDNN's deterministic algorithms, so that it resumes
bit for bit). Minibatches are a pure function of (seed, step) and every measurement restores
what it touches, so a resumed run writes exactly the lines an uninterrupted one would (nothing
lost, nothing twice). Checkpoints hold plain data only and are read without running code
(``weights_only``), written atomically; resume takes the newest one that reads, belongs to the
run and is covered by metrics.jsonl, warning about each one passed over (:mod:`.runfiles`).

Stopping: SIGINT (one Ctrl-C) or SIGTERM stops a run within a step and cuts metrics.jsonl back
to its newest checkpoint, so a stopped folder holds nothing a resume writes again; run_many
stops its worker processes the same way (:mod:`.stopping`). A process training in a folder
holds its lock: a second one is refused.

Distributed: under ``torchrun`` (WORLD_SIZE > 1) each process takes its slice of every global
batch, BatchNorm becomes SyncBatchNorm (``bnkernels.convert(..., sync=True)``) and the model is
wrapped in DistributedDataParallel; only rank 0 writes. Measurements (ICS, landscape,
activations) then see rank 0's slice of the batch. The process-group backend is NCCL when
every process of a node has its own GPU, else gloo on the CPU (:func:`choose_dist_backend`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import platform
import subprocess
import sys
import time
import warnings
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

import bnkernels as bnk

from . import ics, landscape, noisy, stopping
from .activations import ActivationSampler
from .data import Dataset, DigitsConfig, DLNDataConfig, batch_indices, load_dataset
from .models import NormOptions, build_model
from .runfiles import (
    CheckpointError,
    atomic_write_text,
    checkpoint_step,
    folder_lock,
    load_checkpoint,
    save_checkpoint,
)

LOSSES = ("cross_entropy", "sum_squared", "half_sum_squared")


@dataclass(frozen=True)
class RunConfig:
    """Everything that defines one training run. Defaults: the paper's VGG on CIFAR-10."""

    # --- the network
    model: str = "vgg"  # "vgg" (image classifier) or "dln" (deep linear network)
    arch: str = "vgg16"  # VGG depth: vgg11 | vgg13 | vgg16 | vgg19 (13 conv layers for vgg16)
    width: float = 1.0  # VGG channel multiplier (1.0: 64..512 channels)
    depth: int = 25  # DLN: number of square linear layers
    dim: int = 10  # DLN: layer width = input = output dimension
    norm: str = "batchnorm"  # none | batchnorm | noisy | l1 | l2 | linf | torch
    centered: bool = False  # l_p norms: scale of x - mean instead of x
    # --- the data
    dataset: str = "cifar10"  # cifar10 | digits (bundled, offline) | gaussian (DLN regression)
    data_dir: str | None = None  # CIFAR-10 folder (holding cifar-10-batches-py/)
    image_size: int = 32  # digits: pixels per side after upsampling the 8x8 images
    num_samples: int = 1000  # gaussian: samples in the (full) batch
    # --- optimization (plain SGD)
    loss: str = "cross_entropy"  # cross_entropy (batch mean) | sum_squared | half_sum_squared
    batch_size: int = 128  # samples per step; >= the dataset size means full-batch GD
    lr: float = 0.1  # SGD step size
    momentum: float = 0.0  # SGD momentum (the paper: none)
    weight_decay: float = 0.0  # L2 penalty (the paper: none)
    steps: int = 15_000  # optimizer steps (15k = ~38 CIFAR-10 epochs at batch 128)
    seed: int = 0  # initialization, data order, noise, probe directions
    # --- logging and measurements (every = 0 turns one off)
    log_every: int = 100  # steps between per-minibatch loss/accuracy records
    test_every: int = 1_000  # steps between test evaluations (also after the last step)
    ics_every: int = 100  # steps between ICS measurements (Definition 2.1)
    ics_layers: tuple[int, ...] = (5, 10)  # weight layers measured (from 1, forward order)
    landscape_every: int = 100  # steps between landscape probes
    landscape_steps: tuple[float, ...] = (0.05, 0.1, 0.2, 0.4)  # step lengths eta (absolute)
    landscape_directions: tuple[str, ...] = ("gradient",)  # each probed: gradient | random
    hessian_every: int = 0  # steps between top-Hessian-eigenvalue measurements (not in paper)
    hessian_iters: int = 20  # Hessian-vector products per power iteration, at most
    hessian_tol: float = 1e-3  # power iteration stops at this relative change (PyHessian's)
    hessian_trace_samples: int = 0  # Hutchinson samples of tr(H) per measurement (0: none)
    act_every: int = 100  # steps t at which activations are sampled (at t and t + 1)
    act_layers: tuple[int, ...] = (2, 7, 12)  # weight layers sampled (early / middle / late)
    act_units: int = 3  # random channels sampled per layer
    checkpoint_every: int = 1_000  # steps between checkpoints (also after the last step)
    keep_checkpoints: int = 2  # most recent checkpoints kept

    def __post_init__(self):
        if self.model not in ("vgg", "dln"):
            raise ValueError(f"RunConfig.model must be 'vgg' or 'dln', got {self.model!r}")
        if self.loss not in LOSSES:
            raise ValueError(f"RunConfig.loss must be one of {LOSSES}, got {self.loss!r}")
        bad = set(self.landscape_directions) - set(landscape.DIRECTIONS)
        if bad:
            raise ValueError("RunConfig.landscape_directions must be among "
                             f"{landscape.DIRECTIONS}, got {sorted(bad)}")
        for name in ("steps", "batch_size", "checkpoint_every", "keep_checkpoints",
                     "image_size", "hessian_iters"):
            if getattr(self, name) < 1:
                raise ValueError(f"RunConfig.{name} must be >= 1")

    @classmethod
    def from_dict(cls, d: dict) -> RunConfig:
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"RunConfig: unknown fields {sorted(unknown)}")
        d = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
        return cls(**d)

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


# The paper's setups (EXPERIMENTS.md) and the small ones used by `--quick` and the tests.
PAPER_VGG = RunConfig()
PAPER_DLN = RunConfig(
    model="dln", norm="none", dataset="gaussian", loss="sum_squared", batch_size=1000,
    lr=1e-6, steps=10_000, log_every=50, test_every=0, ics_every=50, ics_layers=(9, 17),
    landscape_every=50, landscape_steps=(1e-8, 1e-7, 1e-6, 1e-5, 10 ** -4.5), act_every=50,
    act_layers=(9, 17), checkpoint_every=1_000)

CONFIGS: dict[str, RunConfig] = {
    # VGG-16 on CIFAR-10, 15k steps of SGD, batch 128, lr 0.1 (Figs. 1-4, 7, 10, 11, 13, 14).
    "vgg": PAPER_VGG,
    # the 25-layer 10x10 deep linear network, full-batch GD, lr 1e-6, 10k steps (Figs. 3, 9, 12).
    "dln": PAPER_DLN,
    # what `reproduce --quick` runs on a 2-core CPU: VGG-11 at 1/8 width on the bundled digits,
    # batch 64 (the paper: 128; half the cost of a step, so that three seeds fit), lr 0.05:
    # at this scale the standard network is stable at 0.05 and not at 0.1 (it leaves its
    # chance-level plateau and falls back to it), as the paper's is at 0.1 and not at 0.5.
    # VGG-11 rather than VGG-13: its standard network leaves the plateau within ~20-90
    # steps instead of ~50-150, so the landscape probes see it train. ICS at conv layers #3
    # and #6, the relative depths of the paper's #5 and #10 in a 13-conv stack. Landscape
    # probes every 15 steps at the paper's step lengths relative to the lr, [1/2, 4] x lr.
    "vgg-quick": replace(PAPER_VGG, arch="vgg11", width=0.125, dataset="digits",
                         batch_size=64, lr=0.05, steps=300, log_every=10, test_every=50,
                         ics_every=20, ics_layers=(3, 6), landscape_every=15,
                         landscape_steps=(0.025, 0.05, 0.1, 0.2),
                         landscape_directions=("gradient", "random"), hessian_every=100,
                         hessian_tol=1e-2, act_every=10, act_layers=(2, 5, 8),
                         checkpoint_every=100),
    # the full-size DLN for 1,000 steps (the paper: 10,000), probed every 50 steps as the
    # paper does.
    "dln-quick": replace(PAPER_DLN, steps=1_000, log_every=20, ics_every=50,
                         landscape_every=50, hessian_every=250, hessian_tol=1e-2,
                         act_every=50, checkpoint_every=500),
    # seconds-long runs for smoke tests.
    "tiny": replace(PAPER_VGG, arch="vgg11", width=1 / 32, dataset="digits", image_size=16,
                    batch_size=16, steps=6, log_every=1, test_every=3, ics_every=3,
                    ics_layers=(2, 3), landscape_every=3, hessian_every=3, hessian_iters=3,
                    act_every=3, act_layers=(1, 2), checkpoint_every=2),
    "dln-tiny": replace(PAPER_DLN, steps=6, log_every=1, ics_every=3, landscape_every=3,
                        hessian_every=3, hessian_iters=3, act_every=3, checkpoint_every=2),
}


# ----------------------------------------------------------------------------- helpers


def sum_squared_loss(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """sum over samples and outputs of (out - target)^2: the DLN's ||f(x) - A x||^2 summed."""
    return (out - target).square().sum()


def half_sum_squared_loss(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Half of :func:`sum_squared_loss` (TensorFlow's ``l2_loss`` convention; the paper's
    plotted DLN losses start near 3.5e4-5.6e4, about half of E||A x||^2 * 1000 = 1e5)."""
    return 0.5 * (out - target).square().sum()


def make_loss(name: str):
    if name == "cross_entropy":
        return nn.CrossEntropyLoss()
    if name == "sum_squared":
        return sum_squared_loss
    if name == "half_sum_squared":
        return half_sum_squared_loss
    raise ValueError(f"unknown loss {name!r}; choose one of {LOSSES}")


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def versions(device: torch.device) -> dict:
    """What produced a run: library versions, git commit, device and bnkernels backend."""
    root = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"],
                                capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = bool(subprocess.run(["git", "-C", str(root), "status", "--porcelain"],
                                    capture_output=True, text=True, timeout=10).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        commit, dirty = "", False
    return {
        "python": sys.version.split()[0], "platform": platform.platform(),
        "torch": torch.__version__, "numpy": np.__version__, "bnkernels": bnk.__version__,
        "git_commit": commit or None, "git_dirty": dirty,
        "device": (torch.cuda.get_device_name(device) if device.type == "cuda"
                   else platform.processor() or "cpu"),
        "torch_threads": torch.get_num_threads(),
        "bnkernels_backend": bnk.get_backend(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


class MetricsWriter:
    """Appends JSON lines to metrics.jsonl, flushed per line; ``size()`` is the byte length
    a checkpoint records, after ``sync()`` has put the lines on disk. Steps never go back:
    a record whose step is below the last one's raises (records at one step, or a test record
    at step t + 1 before the next step's, are in order). Disabled on ranks other than 0."""

    def __init__(self, path: Path, enabled: bool = True):
        self.path, self.enabled = path, enabled
        self.last_step = _last_step(path) if enabled else 0
        self._f = open(path, "a", encoding="utf-8") if enabled else None  # noqa: SIM115

    def write(self, record: dict) -> None:
        if self._f is not None:
            if record["step"] < self.last_step:
                raise RuntimeError(f"{self.path}: a {record['kind']!r} record of step "
                                   f"{record['step']} after step {self.last_step}: metrics "
                                   "must not go back (is another process writing here?)")
            self._f.write(json.dumps(record) + "\n")
            self._f.flush()
            self.last_step = record["step"]

    def sync(self) -> None:
        """Flush the lines to disk (before a checkpoint records the file's length)."""
        if self._f is not None:
            self._f.flush()
            os.fsync(self._f.fileno())

    def size(self) -> int:
        return self._f.tell() if self._f is not None else 0

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None


def _last_step(path: Path) -> int:
    """The step of the last complete record of ``path`` (0 if none)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 65536))
            lines = f.read().split(b"\n")[:-1]  # complete lines only
    except FileNotFoundError:
        return 0
    for line in reversed(lines):
        with contextlib.suppress(ValueError, KeyError, TypeError):
            return int(json.loads(line)["step"])
    return 0


def read_metrics(run_dir: str | os.PathLike, kind: str | None = None) -> list[dict]:
    """The records of a run's metrics.jsonl (those of one ``kind`` if given). A last line
    without its newline (a write cut short by a hard kill) is not a record."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip() and line.endswith("\n"):
                rec = json.loads(line)
                if kind is None or rec.get("kind") == kind:
                    out.append(rec)
    return out


def _checkpoints(run_dir: Path) -> list[Path]:
    """The run's step_<N>.pt files, oldest first."""
    d = run_dir / "checkpoints"
    if not d.is_dir():
        return []
    found = [(checkpoint_step(p), p) for p in d.glob("step_*.pt")]
    return [p for n, p in sorted((n, p) for n, p in found if n is not None)]


def _atomic_json(path: Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


DIST_BACKENDS = ("auto", "nccl", "gloo")


class DistBackendError(ValueError):
    """No process-group backend fits the processes, GPUs and devices asked for."""


def choose_dist_backend(local_world_size: int, visible_gpus: int, requested: str = "auto",
                        device: str = "auto") -> tuple[str, str]:
    """(process-group backend, device type) for data-parallel training.

    ``local_world_size``: processes on this node; ``visible_gpus``: the GPUs they can see;
    ``requested``: "auto", "nccl" or "gloo"; ``device``: "auto", "cpu" or "cuda". NCCL needs a
    GPU of its own per process (two ranks on one GPU fail). gloo trains on the CPU: it cannot
    all_gather CUDA tensors, which SyncBatchNorm needs. "auto" takes NCCL when every process
    has its own GPU, else gloo on the CPU (with a warning when GPUs are there). Impossible
    combinations raise :class:`DistBackendError`, saying why."""
    if requested not in DIST_BACKENDS:
        raise DistBackendError(f"distributed backend must be one of {DIST_BACKENDS}, got "
                               f"{requested!r}")
    dev = device.split(":")[0]
    if dev not in ("auto", "cpu", "cuda"):
        raise DistBackendError(f"distributed training runs on 'cpu' or 'cuda', got {device!r}")
    enough = visible_gpus >= local_world_size
    why = (f"{local_world_size} processes on this node but {visible_gpus} visible GPU(s); "
           "NCCL needs one GPU per process")
    if requested == "nccl" or (dev == "cuda" and requested == "auto"):
        if dev == "cpu":
            raise DistBackendError("NCCL needs CUDA devices: use --dist-backend gloo with "
                                   "--device cpu")
        if not enough:
            raise DistBackendError(f"cannot train with NCCL on CUDA: {why}. Start at most "
                                   f"{visible_gpus} processes per node, or train on the CPU "
                                   "with --dist-backend gloo (or --device cpu)")
        return "nccl", "cuda"
    if requested == "gloo":
        if dev == "cuda":
            raise DistBackendError("gloo cannot all_gather CUDA tensors (SyncBatchNorm needs "
                                   "it): use --dist-backend nccl on CUDA, or gloo with "
                                   "--device cpu")
        return "gloo", "cpu"
    if dev == "cpu":
        return "gloo", "cpu"
    if visible_gpus > 0 and enough:
        return "nccl", "cuda"
    if visible_gpus > 0:
        warnings.warn(f"training on the CPU with gloo: {why}", stacklevel=3)
    return "gloo", "cpu"


@dataclass
class _Dist:
    world: int = 1
    rank: int = 0
    local_rank: int = 0
    owns_group: bool = False
    device: str = "cpu"  # the device type the processes train on

    @classmethod
    def from_env(cls, backend: str = "auto", device: str = "auto") -> _Dist:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        name, dev = choose_dist_backend(local_world, gpus, backend, device)
        owns = False
        if not dist.is_initialized():
            dist.init_process_group(name)
            owns = True
        return cls(dist.get_world_size(), dist.get_rank(),
                   int(os.environ.get("LOCAL_RANK", "0")), owns, dev)

    def all_sum(self, values: list[float], device) -> list[float]:
        if self.world == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=device)
        dist.all_reduce(t)
        return t.tolist()


class _DDP(nn.parallel.DistributedDataParallel):
    """DistributedDataParallel that lets bnkernels.SyncBatchNorm run on CPU (gloo) processes.

    torch's DDP refuses every nn.SyncBatchNorm in a CPU module, because torch's own is
    CUDA-only; bnkernels' subclass all-gathers with any backend, so only torch's is refused."""

    def _passing_sync_batchnorm_handle(self, module):
        if any(isinstance(m, nn.SyncBatchNorm) and not isinstance(m, bnk.SyncBatchNorm)
               for m in module.modules()):
            super()._passing_sync_batchnorm_handle(module)


def rng_state() -> dict:
    """The RNG states a checkpoint keeps: the CPU generator's, and every CUDA device's when
    CUDA has been initialized."""
    state = {"torch_rng": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda_rng"] = torch.cuda.get_rng_state_all()
    return state


def _byte_state(t) -> torch.Tensor:
    """An RNG state as torch.set_rng_state wants it, a CPU torch.ByteTensor, whatever device
    or dtype ``torch.load``'s map_location gave it (the values are bytes, so a cast back to
    uint8 is exact)."""
    return torch.as_tensor(t).detach().to("cpu").to(torch.uint8).contiguous()


def restore_rng_state(state: dict) -> None:
    """Put back what :func:`rng_state` saved (CUDA states only for devices present here)."""
    torch.set_rng_state(_byte_state(state["torch_rng"]))
    cuda = state.get("cuda_rng")
    if cuda and torch.cuda.is_available():
        for i, s in enumerate(list(cuda)[:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(_byte_state(s), i)


def _check_run_dir(cfg: RunConfig, run_dir: Path, resume: bool) -> str:
    """"new", "resume" or "done" for ``run_dir``; raises if it holds another config, or an
    unfinished run without ``resume``. Only reads, so every process can call it."""
    cfg_path = run_dir / "config.json"
    if not cfg_path.is_file():
        return "new"
    saved = json.loads(cfg_path.read_text())
    if saved != cfg.to_dict():
        diff = {k: (saved.get(k), v) for k, v in cfg.to_dict().items() if saved.get(k) != v}
        raise FileExistsError(f"{run_dir} holds a run with another config (saved, asked): "
                              f"{diff}; choose another --run-dir or delete it")
    if (run_dir / "done.json").is_file():
        return "done"
    if not resume:
        raise FileExistsError(f"{run_dir} holds an unfinished run: pass --resume to continue "
                              "it from its last checkpoint, or delete it to start over")
    return "resume"


# ----------------------------------------------------------------------------- the loop


@contextlib.contextmanager
def _deterministic_cudnn(dev: torch.device):
    """On CUDA, cuDNN's deterministic algorithms (and no autotuning) while a run trains, so a
    resumed run repeats the uninterrupted one bit for bit; flags restored afterwards."""
    if dev.type != "cuda":
        yield
        return
    flags = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        yield
    finally:
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = flags


def train(cfg: RunConfig, run_dir: str | os.PathLike, *, resume: bool = False,
          stop_after: int | None = None, device: str = "auto", progress: bool = True,
          dist_backend: str = "auto") -> Path:
    """Train ``cfg`` in ``run_dir`` (created if needed) and return the folder.

    ``resume``: continue an unfinished run from its last checkpoint (a finished run is left as
    is). ``stop_after``: stop before step ``stop_after`` without a final checkpoint, as if the
    process were killed there (for tests). Under torchrun, runs data-parallel with the
    process-group backend ``dist_backend`` (see :func:`choose_dist_backend`)."""
    run_dir = Path(run_dir)
    ddp = _Dist.from_env(dist_backend, device)
    rank0 = ddp.rank == 0
    dev = pick_device(device)
    if ddp.world > 1:
        dev = torch.device(ddp.device)
        if ddp.device == "cuda":
            dev = torch.device("cuda", ddp.local_rank)
            torch.cuda.set_device(dev)
    try:
        state = _check_run_dir(cfg, run_dir, resume)
        if ddp.world > 1:
            dist.barrier()  # every process has looked before rank 0 writes
        if state == "done":
            if rank0:
                print(f"{run_dir}: already complete")
            return run_dir
        data = load_dataset(cfg.dataset, cfg.data_dir,
                            dln=DLNDataConfig(num_samples=cfg.num_samples, dim=cfg.dim,
                                              seed=cfg.seed),
                            digits=DigitsConfig(size=cfg.image_size))  # fails before the
        #                                                                 folder exists
        # Rank 0 holds the folder while it trains: a second process asking for it is refused.
        with folder_lock(run_dir) if rank0 else contextlib.nullcontext():
            if rank0 and ddp.world == 1:
                state = _check_run_dir(cfg, run_dir, resume)  # again, as the holder
                if state == "done":
                    print(f"{run_dir}: already complete")
                    return run_dir
            if state == "new" and rank0:
                _atomic_json(run_dir / "config.json", cfg.to_dict())
            if ddp.world > 1:
                dist.barrier()
            with _deterministic_cudnn(dev):
                _train(cfg, data, run_dir, ddp, dev, stop_after, progress and rank0)
    finally:
        if ddp.owns_group:
            dist.destroy_process_group()
    return run_dir


def _fits(state: dict, path: Path, model: nn.Module, opt: torch.optim.Optimizer) -> None:
    """Raise CheckpointError unless ``state`` can be loaded into ``model`` and ``opt`` (checked
    before anything is loaded, so a misfit leaves them untouched)."""
    own, saved = model.state_dict(), state["model"]
    bad = sorted(set(own) ^ set(saved))
    bad += [k for k in own if k in saved and (not isinstance(saved[k], torch.Tensor)
                                              or saved[k].shape != own[k].shape)]
    if bad:
        raise CheckpointError(f"checkpoint {path} does not fit this run's model (keys or shapes "
                              f"differ: {', '.join(bad[:5])}{', ...' if len(bad) > 5 else ''})")
    groups = state["optimizer"].get("param_groups")
    if (not isinstance(groups, list) or len(groups) != len(opt.param_groups)
            or any(not isinstance(g, dict) or len(g.get("params", ())) != len(o["params"])
                   for g, o in zip(groups, opt.param_groups))):
        raise CheckpointError(f"checkpoint {path} does not fit this run's optimizer")
    if state["torch_rng"].numel() != torch.get_rng_state().numel():
        raise CheckpointError(f"checkpoint {path} holds no valid RNG state")


def _resume_state(run_dir: Path, cfg: RunConfig, model: nn.Module,
                  opt: torch.optim.Optimizer, dev: torch.device) -> dict | None:
    """The newest checkpoint of ``run_dir`` that loads safely (see
    :func:`~.runfiles.load_checkpoint`), belongs to ``cfg``, fits the model and optimizer and
    whose metrics.jsonl length the file still has; None when there is none (start over).
    Every checkpoint passed over is named in a warning with the reason."""
    metrics = run_dir / "metrics.jsonl"
    size = metrics.stat().st_size if metrics.exists() else 0
    for path in reversed(_checkpoints(run_dir)):
        try:
            state = load_checkpoint(path, map_location=dev, config=cfg.to_dict())
            if state["metrics_bytes"] > size:
                raise CheckpointError(f"checkpoint {path} counts {state['metrics_bytes']} bytes "
                                      f"of metrics.jsonl, which has {size}: records it covers "
                                      "are gone")
            _fits(state, path, model, opt)
        except CheckpointError as e:
            warnings.warn(f"{e}; resuming from the newest valid checkpoint before it, if any",
                          stacklevel=3)
            continue
        return state
    return None


def _train(cfg: RunConfig, data: Dataset, run_dir: Path, ddp: _Dist, dev: torch.device,
           stop_after: int | None, progress: bool) -> None:
    rank0 = ddp.rank == 0
    model = build_model(cfg.model, cfg.norm, arch=cfg.arch, width=cfg.width,
                        num_classes=data.num_classes or 10,
                        in_channels=int(data.train_x.shape[1]), depth=cfg.depth, dim=cfg.dim,
                        seed=cfg.seed,
                        norm_options=NormOptions(centered=cfg.centered)).to(dev)
    if ddp.world > 1:
        if cfg.norm in ("batchnorm", "torch"):
            model = bnk.convert(model, to=cfg.norm, sync=True)
        elif cfg.norm != "none":
            warnings.warn(f"norm {cfg.norm!r} has no synchronized version: each process "
                          "normalizes with its own slice of the batch", stacklevel=2)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                          weight_decay=cfg.weight_decay)
    start = 0
    metrics_path = run_dir / "metrics.jsonl"
    state = _resume_state(run_dir, cfg, model, opt, dev)
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        restore_rng_state(state)
        start = state["step"]
        keep = state["metrics_bytes"]
        elapsed = float(state.get("elapsed", 0.0))
        cpu_elapsed = float(state.get("cpu_elapsed", 0.0))
    else:
        keep, elapsed, cpu_elapsed = 0, 0.0, 0.0
    if rank0:
        if metrics_path.exists():
            os.truncate(metrics_path, min(keep, metrics_path.stat().st_size))
        for stale in (run_dir / "checkpoints").glob("*.tmp"):
            stale.unlink()  # a checkpoint write cut short (the lock keeps others out)
        _atomic_json(run_dir / "versions.json", versions(dev))
    if ddp.world > 1:
        dist.barrier()
        base = model
        model = _DDP(model, device_ids=[dev.index] if dev.type == "cuda" else None)
    else:
        base = model
    if cfg.batch_size % ddp.world and cfg.batch_size < data.num_train:
        raise ValueError(f"batch_size {cfg.batch_size} does not split over {ddp.world} "
                         "processes")
    loss_fn = make_loss(cfg.loss)
    # Each process takes a slice of the batch (full-batch runs: every process the whole batch).
    shard = ddp.world > 1 and cfg.batch_size < data.num_train
    # A summed loss over a slice is 1/world of the global one after DDP's gradient average.
    loss_scale = float(ddp.world) if shard and cfg.loss.endswith("sum_squared") else 1.0
    writer = MetricsWriter(metrics_path, enabled=rank0)
    sampler = (ActivationSampler(base, cfg.act_layers, cfg.act_units, cfg.seed)
               if cfg.act_every else None)
    train_x, train_y = data.train_x, data.train_y
    classify = data.num_classes is not None
    has_noisy = noisy.has_noisy_layers(base)

    def due(every: int, step: int) -> bool:
        return every > 0 and step % every == 0

    # metrics.jsonl's length at the newest checkpoint on disk: what a stop cuts it back to
    committed = keep

    def checkpoint(step: int) -> None:
        nonlocal committed
        if not rank0:
            return
        d = run_dir / "checkpoints"
        d.mkdir(exist_ok=True)
        writer.sync()  # the lines the checkpoint counts are on disk before it is
        size = writer.size()
        with stopping.uninterrupted():  # the file and `committed` change together
            save_checkpoint(d / f"step_{step}.pt", {
                "step": step, "model": base.state_dict(), "optimizer": opt.state_dict(),
                "metrics_bytes": size, **rng_state(), "elapsed": elapsed + time.time() - t0,
                "cpu_elapsed": cpu_elapsed + time.process_time() - c0,
                "config": cfg.to_dict()})
            committed = size
        for old in _checkpoints(run_dir)[:-cfg.keep_checkpoints]:
            old.unlink()

    from tqdm.auto import tqdm

    bar = tqdm(total=cfg.steps, initial=start, desc=run_dir.name, disable=not progress,
               dynamic_ncols=True, leave=False)
    t0, c0 = time.time(), time.process_time()
    try:
        for step in range(start, cfg.steps):
            if stop_after is not None and step >= stop_after:
                return
            stopping.check()
            idx = batch_indices(data.num_train, cfg.batch_size, step, cfg.seed)
            if shard:
                per = len(idx) // ddp.world
                idx = idx[ddp.rank * per:(ddp.rank + 1) * per]
            x, y = train_x[idx].to(dev), train_y[idx].to(dev)
            base.train()
            if due(cfg.ics_every, step):
                for rec in ics.internal_covariate_shift(base, loss_fn, x, y, cfg.lr,
                                                        cfg.ics_layers):
                    writer.write({"kind": "ics", "step": step, **rec})
            if due(cfg.landscape_every, step):
                for direction in cfg.landscape_directions:
                    rec = landscape.probe(base, loss_fn, x, y, cfg.landscape_steps, direction,
                                          seed=cfg.seed * 1_000_003 + step)
                    writer.write({"kind": "landscape", "step": step, **rec})
            if due(cfg.hessian_every, step):
                writer.write(measure_hessian(base, loss_fn, x, y, cfg, step))
            if sampler is not None:
                sampler.armed = cfg.act_every > 0 and step % cfg.act_every in (0, 1)
            opt.zero_grad(set_to_none=True)
            out = model(x)
            loss = loss_fn(out, y)
            (loss * loss_scale if loss_scale != 1.0 else loss).backward()
            opt.step()
            if sampler is not None and sampler.armed:
                sampler.armed = False
                for rec in sampler.collect():
                    writer.write({"kind": "act", "step": step, **rec})
            if due(cfg.log_every, step) or step == cfg.steps - 1:
                n = float(len(y))
                correct = float((out.argmax(1) == y).sum()) if classify else 0.0
                totals = [float(loss.detach()) * (n if classify else 1.0), correct, n]
                tot_loss, tot_correct, tot_n = ddp.all_sum(totals, dev) if shard else totals
                rec = {"kind": "train", "step": step,
                       "loss": tot_loss / tot_n if classify else tot_loss}
                if classify:
                    rec["acc"] = tot_correct / tot_n
                writer.write(rec)
                bar.set_postfix(loss=f"{rec['loss']:.4g}", refresh=False)
            done = step + 1
            if classify and data.test_x is not None and (
                    due(cfg.test_every, done) or done == cfg.steps):
                rec = {"kind": "test", "step": done, **evaluate(base, data, loss_fn, dev)}
                if has_noisy:
                    rec.update(noisy.diagnostics(base, data, loss_fn, dev, cfg.batch_size))
                writer.write(rec)
            if due(cfg.checkpoint_every, done) or done == cfg.steps:
                checkpoint(done)
            bar.update(1)
        if rank0:
            _atomic_json(run_dir / "done.json",
                         {"steps": cfg.steps, "seconds": elapsed + time.time() - t0,
                          "cpu_seconds": cpu_elapsed + time.process_time() - c0})
    except BaseException:
        # Stopped (a signal) or failed: the folder goes back to its newest checkpoint, so it
        # holds no record that a resume would write again.
        writer.close()
        if rank0 and metrics_path.exists():
            os.truncate(metrics_path, min(committed, metrics_path.stat().st_size))
        raise
    finally:
        bar.close()
        writer.close()
        if sampler is not None:
            sampler.remove()


def measure_hessian(model: nn.Module, loss_fn, x, y, cfg: RunConfig, step: int) -> dict:
    """The "hessian" record of step ``step``: the top eigenvalue (and the trace when
    ``cfg.hessian_trace_samples``) on the step's batch, the model left as found."""
    seed = cfg.seed * 1_000_003 + step
    top = landscape.hessian_top_eigenvalue(model, loss_fn, x, y, cfg.hessian_iters,
                                           cfg.hessian_tol, seed=seed)
    rec = {"kind": "hessian", "step": step, "top_eigenvalue": top.value,
           "iterations": top.iterations, "max_iterations": cfg.hessian_iters}
    if cfg.hessian_trace_samples:
        tr = landscape.hessian_trace(model, loss_fn, x, y, cfg.hessian_trace_samples, seed)
        rec.update(trace=tr.value, trace_stderr=tr.stderr)
    return rec


@torch.no_grad()
def evaluate(model: nn.Module, data, loss_fn, device, batch_size: int = 1000) -> dict:
    """Test loss (mean) and accuracy in eval mode (running statistics, no noise)."""
    was = model.training
    model.eval()
    total_loss, correct, n = 0.0, 0, 0
    for i in range(0, len(data.test_y), batch_size):
        x = data.test_x[i:i + batch_size].to(device)
        y = data.test_y[i:i + batch_size].to(device)
        out = model(x)
        total_loss += float(loss_fn(out, y)) * len(y)
        correct += int((out.argmax(1) == y).sum())
        n += len(y)
    model.train(was)
    return {"loss": total_loss / max(n, 1), "acc": correct / max(n, 1)}


def run_id(name: str, cfg: RunConfig) -> str:
    """A readable, deterministic folder name: <config>-<norm>-lr<lr>-seed<seed>."""
    return f"{name}-{cfg.norm}-lr{cfg.lr:g}-seed{cfg.seed}"


def config_with(cfg: RunConfig, **overrides) -> RunConfig:
    """``cfg`` with the non-None ``overrides`` applied (tuples from lists / comma strings)."""
    types = {f.name: f for f in dataclasses.fields(cfg)}
    clean = {}
    for k, v in overrides.items():
        if v is None:
            continue
        if k not in types:
            raise ValueError(f"unknown config field {k!r}")
        if isinstance(getattr(cfg, k), tuple) and not isinstance(v, tuple):
            v = tuple(v) if isinstance(v, list) else v
        clean[k] = v
    return replace(cfg, **clean)


# ----------------------------------------------------------------------------- many runs

RUN_THREADS = 1
"""torch threads per run in :func:`run_many`: fixed, so a run's numbers do not depend on how
many cores the machine has (intra-op reductions split by thread count round differently);
runs are parallel across processes instead."""

PORTABLE_CPU_ENV = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2",
                    "MKL_CBWR": "AVX2", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
"""Environment of :func:`run_many`'s CPU worker processes on x86-64: torch's vectorized
kernels, oneDNN's convolutions and MKL's BLAS all held to AVX2 code paths, which every recent
x86-64 CPU runs, so that two machines (AVX2 or AVX-512, Intel or AMD) take the same
floating-point paths (best effort: the libraries do not promise bit-identical results across
CPU models). Variables already set by the user are kept."""


@contextlib.contextmanager
def _worker_env(env: dict[str, str]):
    """Set ``env`` (where not set already) in this process while worker processes are
    started; this process's own libraries read it only at their import, long before."""
    added = {k: v for k, v in env.items() if k not in os.environ}
    os.environ.update(added)
    try:
        yield
    finally:
        for k in added:
            os.environ.pop(k, None)


def place(cfg: RunConfig, device: str = "auto", dln_device: str = "cpu") -> str:
    """The device a run of a batch trains on. The deep linear network (25 layers of 10x10 on
    1000 samples) is pure per-call overhead on a GPU, so it goes to ``dln_device`` (the CPU
    unless told otherwise; "same" follows ``device``); VGG goes to ``device`` ("auto": the
    GPU when there is one)."""
    if cfg.model == "dln" and dln_device != "same":
        return str(pick_device(dln_device))
    return str(pick_device(device))


def default_jobs(device: str = "auto") -> int:
    """CPU processes training at once: one per core (each run takes :data:`RUN_THREADS`
    threads)."""
    del device  # GPU runs get their own workers (see run_many)
    return max(1, os.cpu_count() or 1)


def default_gpu_jobs() -> int:
    """Processes sharing each GPU: small runs leave a GPU idle between one process's kernel
    launches, so a few processes per device keep it busy."""
    return 4 * max(1, torch.cuda.device_count() if torch.cuda.is_available() else 1)


STOP_SECONDS = 30.0
"""How long :func:`run_many` waits for its workers to stop after a signal or a failed run
(each stops within a step and cuts its run folder back to its last checkpoint) before it
kills the ones left."""


def _run_worker(cfg_dict: dict, run_dir: str, device: str, threads: int) -> tuple[str, float]:
    torch.set_num_threads(threads)
    t0 = time.time()
    try:
        with stopping.armed():  # a signal stops this run (its folder back to a checkpoint)
            train(RunConfig.from_dict(cfg_dict), run_dir, resume=True, device=device,
                  progress=False)
    except stopping.Interrupted as e:
        if not stopping.parent_alive():
            os._exit(e.exit_code)  # nobody is waiting for the result
        raise
    return run_dir, time.time() - t0


def _stop_workers(pools, futures) -> None:
    """Stop every worker process of ``pools`` (concurrent.futures process pools): runs not
    started are cancelled; running ones get SIGTERM, stop within a step, cut their folders
    back to their last checkpoints, report and exit. A run that has not reported after
    :data:`STOP_SECONDS` is killed where it is (its folder is then cut back by the next
    resume). Returns when no worker is left."""
    import concurrent.futures as cf
    import signal

    for f in futures:
        f.cancel()
    # the pool's worker processes (concurrent.futures keeps them in ``_processes``, pid ->
    # multiprocessing.Process, in every CPython 3.x; it has no public way to signal them)
    procs = [p for pool in pools for p in dict(getattr(pool, "_processes", None) or {}).values()]
    for pool in pools:
        pool.shutdown(wait=False, cancel_futures=True)
    for p in procs:
        if p.is_alive():
            with contextlib.suppress(ProcessLookupError, TypeError):
                os.kill(p.pid, signal.SIGTERM)
    cf.wait([f for f in futures if not f.done()], timeout=STOP_SECONDS)
    deadline = time.monotonic() + 5.0  # the workers exit at once (stopping._exit_now...)
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join(10)
    for pool in pools:
        pool.shutdown(wait=True)


def run_many(jobs_list: list[tuple[RunConfig, Path]], jobs: int | None = None,
             device: str = "auto", progress: bool = True, *, gpu_jobs: int | None = None,
             dln_device: str = "cpu", threads: int = RUN_THREADS) -> dict[str, float]:
    """Train (or resume, or skip when finished) every (config, run folder) pair and return the
    seconds each run took in this call.

    Each run is placed by :func:`place` (the DLN on the CPU, VGG on the GPU when there is
    one). CPU runs go to ``jobs`` processes (default: one per core, minus the GPU workers),
    GPU runs to ``gpu_jobs`` processes sharing the device(s) (default 4 per GPU); both pools
    work at the same time, each run with ``threads`` torch threads. With one worker in all
    (``jobs=1`` and no GPU run), runs train in this process, one after another.

    SIGINT (one Ctrl-C) or SIGTERM stops every run within a step or so, each folder cut back
    to its last checkpoint, and raises :class:`~.stopping.Interrupted` once no worker is left;
    so does a run that fails (its error is raised). Called again, the runs resume."""
    from tqdm.auto import tqdm

    placed = [(cfg, Path(run_dir), place(cfg, device, dln_device))
              for cfg, run_dir in jobs_list]
    on_gpu = [j for j in placed if j[2] != "cpu"]
    on_cpu = [j for j in placed if j[2] == "cpu"]
    n_gpu = min(len(on_gpu), gpu_jobs or default_gpu_jobs()) if on_gpu else 0
    n_cpu = min(len(on_cpu), jobs or max(1, default_jobs() - n_gpu)) if on_cpu else 0
    seconds: dict[str, float] = {}
    if n_gpu == 0 and n_cpu <= 1:
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            with stopping.stop_on_signals():
                for cfg, run_dir, dev in placed:
                    t0 = time.time()
                    train(cfg, run_dir, resume=True, device=dev, progress=progress)
                    seconds[str(run_dir)] = time.time() - t0
        finally:
            torch.set_num_threads(before)
        return seconds
    import concurrent.futures as cf
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    portable = PORTABLE_CPU_ENV if platform.machine().lower() in ("x86_64", "amd64") else {}
    pools: list = []
    futures: list = []
    # Workers are spawned as tasks arrive and inherit the environment then; the GPU workers
    # get it too (their CPU work is small).
    with contextlib.ExitStack() as stack:
        stack.enter_context(stopping.stop_on_signals())
        stack.enter_context(_worker_env(portable if n_cpu else {}))
        bar = stack.enter_context(tqdm(total=len(placed), desc="runs", disable=not progress))
        try:
            by_kind = {kind: cf.ProcessPoolExecutor(
                           max_workers=n, mp_context=ctx, initializer=stopping.init_worker,
                           initargs=(os.getpid(),))
                       for kind, n in (("cpu", n_cpu), ("gpu", n_gpu)) if n}
            pools.extend(by_kind.values())
            for cfg, run_dir, dev in placed:
                futures.append(by_kind["gpu" if dev != "cpu" else "cpu"].submit(
                    _run_worker, cfg.to_dict(), str(run_dir), dev, threads))
            pending = set(futures)
            while pending:
                # wake up now and then: a signal that landed on another thread runs its
                # handler only when this one executes Python code
                done, pending = cf.wait(pending, timeout=0.5, return_when=cf.FIRST_COMPLETED)
                for fut in done:
                    run_dir, secs = fut.result()
                    seconds[run_dir] = secs
                    bar.set_postfix_str(f"{Path(run_dir).name} {secs:.0f}s", refresh=False)
                    bar.update(1)
        except BaseException:
            _stop_workers(pools, futures)
            raise
        for pool in pools:
            pool.shutdown(wait=True)
    return seconds
