"""The files of a run folder that must survive a kill: atomic writes, checkpoints, locks.

- Every file a run writes whole (config.json, versions.json, done.json, checkpoints) is written
  to a temporary file beside it, flushed to disk (fsync) and renamed over the old one, so a
  reader sees the old file or the new one, never half of one (:func:`atomic_write`).
- A checkpoint holds only tensors, numbers, strings, booleans, None, lists and dicts (model
  and optimizer state_dicts, RNG states as uint8 tensors, the run config as a dict), so it is
  read with ``torch.load(weights_only=True)``, whose unpickler builds nothing else: a crafted
  file cannot run code (:func:`load_checkpoint`). A file that cannot be read, or is not a
  checkpoint of this run, raises :class:`CheckpointError` naming the file and why. Each
  checkpoint carries a SHA-256 of its contents (:func:`state_digest`: every tensor's dtype,
  shape and bytes, every other value's repr), checked at load: a changed byte of tensor data
  that still unpickles is caught like any other corrupt file.
- :func:`folder_lock` holds an exclusive lock (``flock``) on a folder's ``.lock`` file while a
  process writes there, so a second process asking for the same folder is refused instead of
  racing the first; the lock dies with its process, so a killed run never leaves a stale one.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import re
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

CHECKPOINT_KEYS = {"step": int, "model": dict, "optimizer": dict, "metrics_bytes": int,
                   "torch_rng": torch.Tensor, "config": dict, "checksum": str}
"""What every checkpoint holds (besides elapsed times and CUDA RNG states), and its type."""


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used; the message names the file and why."""


class FolderLockedError(FileExistsError):
    """Another process holds the folder (see :func:`folder_lock`)."""


# ----------------------------------------------------------------------------- atomic writes


def _fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (POSIX; a no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[io.BufferedWriter], None]) -> None:
    """Write ``path`` through ``write(file)`` into ``<path>.tmp``, fsync it and rename it over
    ``path``: a crash leaves the old file or the new one, and at worst a stray ``.tmp``."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


# ----------------------------------------------------------------------------- checkpoints


def checkpoint_step(path: Path) -> int | None:
    """N for a file named ``step_N.pt``, else None."""
    m = re.fullmatch(r"step_(\d+)\.pt", path.name)
    return int(m.group(1)) if m else None


def _feed(h, obj) -> None:
    if isinstance(obj, torch.Tensor):
        t = obj.detach().to("cpu").contiguous().reshape(-1)
        h.update(f"T{t.dtype}{tuple(obj.shape)}:".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    elif isinstance(obj, dict):
        h.update(f"D{len(obj)}:".encode())
        for k in sorted(obj, key=repr):
            _feed(h, k)
            _feed(h, obj[k])
    elif isinstance(obj, (list, tuple)):
        h.update(f"L{len(obj)}:".encode())
        for x in obj:
            _feed(h, x)
    else:
        h.update(f"V{obj!r}:".encode())


def state_digest(state: dict) -> str:
    """SHA-256 (hex) of a checkpoint's contents except its ``checksum``: every tensor's dtype,
    shape and bytes (wherever it lives), every other value's repr, dict keys in a fixed order."""
    h = hashlib.sha256()
    _feed(h, {k: v for k, v in state.items() if k != "checksum"})
    return h.hexdigest()


def save_checkpoint(path: str | os.PathLike, state: dict) -> None:
    """``torch.save(state)`` with its :func:`state_digest` as ``checksum`` to ``path``,
    atomically (see :func:`atomic_write`)."""
    state = {**state, "checksum": state_digest(state)}
    atomic_write(path, lambda f: torch.save(state, f))


def _refused_global(e: BaseException) -> str | None:
    """The Python object (a "GLOBAL": a class or function to call) that torch's weights-only
    unpickler refused to build, as its message names it; None when it refused something
    else (bytes that are no pickle at all)."""
    m = re.search(r"(unsupported GLOBAL [\w.]+|Unsupported global: \S+)", str(e),
                  re.IGNORECASE)
    return m.group(1) if m else None


def load_checkpoint(path: str | os.PathLike, map_location=None,
                    config: dict | None = None) -> dict:
    """The checkpoint in ``path``, read with ``torch.load(weights_only=True)`` (nothing in the
    file is run) and checked: every key of :data:`CHECKPOINT_KEYS` with its type, the step
    its name says, and (given ``config``, a ``RunConfig.to_dict()``) the run config.

    Raises :class:`CheckpointError` naming the file for an empty, truncated, corrupt or
    foreign file."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as e:
        raise CheckpointError(f"checkpoint {path} cannot be read: {e}") from e
    if size == 0:
        raise CheckpointError(f"checkpoint {path} is empty (a write cut short?)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's notes on pickle protocols of odd files
            state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001  (torch raises many types for a bad file)
        refused = _refused_global(e)
        if refused:
            raise CheckpointError(
                f"checkpoint {path} was refused: it asks to build Python objects a bnkernels "
                f"checkpoint never holds ({refused}), and nothing in it was run. It was not "
                "written by bnkernels: delete it, or move it out of the run folder") from e
        text = str(e).strip()
        op = re.search(r"Unsupported operand \d+", text)
        detail = (op.group(0) if op else "no pickle it can read"
                  if "weights only load failed" in text.lower()
                  else text.splitlines()[0][:160] if text else "no detail")
        raise CheckpointError(f"checkpoint {path} is not a readable torch checkpoint "
                              f"(truncated or corrupt?): {type(e).__name__}: {detail}") from e
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(state).__name__}, not a "
                              "bnkernels run checkpoint (a dict)")
    missing = [k for k in CHECKPOINT_KEYS if k not in state]
    if missing:
        raise CheckpointError(f"checkpoint {path} is not a bnkernels run checkpoint: it has no "
                              f"{', '.join(missing)}")
    wrong = [f"{k} is a {type(state[k]).__name__}, not a {kind.__name__}"
             for k, kind in CHECKPOINT_KEYS.items()
             if not isinstance(state[k], kind) or isinstance(state[k], bool)]
    if wrong:
        raise CheckpointError(f"checkpoint {path} is not a bnkernels run checkpoint: "
                              + "; ".join(wrong))
    named = checkpoint_step(path)
    if named is not None and named != state["step"]:
        raise CheckpointError(f"checkpoint {path} holds step {state['step']}, not the step "
                              f"{named} its name says")
    if state["step"] < 0 or state["metrics_bytes"] < 0:
        raise CheckpointError(f"checkpoint {path} holds a negative step or metrics length")
    if config is not None and state["config"] != config:
        diff = sorted(k for k in set(config) | set(state["config"])
                      if config.get(k) != state["config"].get(k))
        raise CheckpointError(f"checkpoint {path} belongs to another run config (differs in "
                              f"{', '.join(diff)})")
    if state_digest(state) != state["checksum"]:
        raise CheckpointError(f"checkpoint {path} fails its checksum: its contents changed "
                              "after it was written (corrupt)")
    return state


# ----------------------------------------------------------------------------- locks


try:
    import fcntl
except ImportError:  # Windows: no flock; folders are not locked there
    fcntl = None


def _try_lock(f) -> bool:
    if fcntl is None:
        return True
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike, what: str = "run folder") -> Iterator[Path]:
    """Hold ``folder``/.lock exclusively (created with the folder if needed) for the block.

    Raises :class:`FolderLockedError` at once, with the holder's pid, when another process
    holds it. The lock is released when the block ends or the process dies (the file stays;
    only the lock on it matters). Where ``fcntl`` is missing (Windows) nothing is locked."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / ".lock"
    f = open(path, "a+", encoding="utf-8")  # noqa: SIM115  (held open for the block)
    try:
        if not _try_lock(f):
            f.seek(0)
            holder = f.read().strip() or "unknown"
            raise FolderLockedError(
                f"{folder} is in use by another bnkernels process (pid {holder}): a second "
                f"process writing this {what} would race it for the same files. Wait for it to "
                "finish, or stop it (Ctrl-C, or kill its pid) and run again: stopped runs "
                "resume from their last checkpoint")
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
        yield path
    finally:
        f.close()
