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
trace, at step t), "act" (activation summaries at step t, at the normalization's output),
"act_in" (the same units at the normalization's input, where it differs).

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
import json
import os
import platform
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

import bnkernels as bnk

from . import ics, landscape, noisy, stopping
from .activations import ActivationSampler
from .config import (  # noqa: F401  (re-exported: the run configurations live in .config)
    CONFIGS,
    LOSSES,
    PAPER_DLN,
    PAPER_VGG,
    RunConfig,
    config_with,
    half_sum_squared_loss,
    make_loss,
    pick_device,
    run_id,
    sum_squared_loss,
)
from .data import Dataset, DigitsConfig, DLNDataConfig, batch_indices, load_dataset
from .distributed import _DDP, DIST_BACKENDS, DistBackendError, _Dist, choose_dist_backend  # noqa: F401
from .models import NormOptions, build_model
from .runfiles import (
    CheckpointError,
    atomic_write_text,
    checkpoint_step,
    folder_lock,
    load_checkpoint,
    save_checkpoint,
)


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
    sampler = (ActivationSampler(base, cfg.act_layers, cfg.act_units, cfg.seed, inputs=True)
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
           "max_eigenvalue": top.largest, "min_eigenvalue": top.smallest,
           "converged": top.converged, "iterations": top.iterations,
           "max_iterations": cfg.hessian_iters}
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


