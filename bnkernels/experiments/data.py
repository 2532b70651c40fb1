"""Data: CIFAR-10 (the paper's), scikit-learn's digits (the embedded offline default) and the
synthetic Gaussian regression of the deep linear network.

Every dataset is a :class:`Dataset` of in-memory tensors. Minibatches are drawn by
:func:`batch_indices`, a pure function of (seed, step): a resumed run sees exactly the batches
an uninterrupted one would, with no sampler state to save.
"""

from __future__ import annotations

import functools
import hashlib
import os
import pickle
import tarfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"  # of the python tarball
CIFAR10_DIR = "cifar-10-batches-py"
CIFAR10_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR10_TEST = "test_batch"


@dataclass(frozen=True)
class DLNDataConfig:
    """The deep linear network's regression task (EXPERIMENTS.md, "Deep linear network")."""

    num_samples: int = 1000  # inputs x ~ N(0, I_dim)
    dim: int = 10  # input and output dimension
    seed: int = 0  # draws the inputs and the target matrix A (entries i.i.d. N(0, 1))


@dataclass(frozen=True)
class DigitsConfig:
    """scikit-learn's bundled 8x8 digits, made CIFAR-shaped (offline stand-in for CIFAR-10)."""

    size: int = 32  # upsampled to size x size (bilinear), replicated to 3 channels
    test_fraction: float = 0.2  # held out for test accuracy, by a fixed seeded split
    split_seed: int = 0  # the train/test split


@dataclass
class Dataset:
    """In-memory tensors: inputs (N, ...) float32, targets (N,) int64 or (N, d) float32."""

    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor | None = None
    test_y: torch.Tensor | None = None
    num_classes: int | None = None  # None: regression

    @property
    def num_train(self) -> int:
        return int(self.train_x.shape[0])


def _standardize(train_x: torch.Tensor, *others: torch.Tensor | None):
    """Per-channel mean 0, std 1 with the training set's statistics (no augmentation)."""
    dims = [0, *range(2, train_x.dim())]
    mean = train_x.mean(dim=dims, keepdim=True)
    std = train_x.std(dim=dims, keepdim=True).clamp_min(1e-8)
    return [(t - mean) / std if t is not None else None for t in (train_x, *others)]


# ----------------------------------------------------------------------------- CIFAR-10


def _cifar_root(data_dir: str | os.PathLike) -> Path:
    """``data_dir`` itself if it holds the batch files, else ``data_dir/cifar-10-batches-py``."""
    d = Path(data_dir)
    return d if (d / CIFAR10_TEST).is_file() else d / CIFAR10_DIR


def _md5(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def download_cifar10(data_dir: str | os.PathLike, url: str = CIFAR10_URL,
                     md5: str = CIFAR10_MD5) -> Path:
    """Download the CIFAR-10 python tarball into ``data_dir``, verify its md5 and extract it.

    Only called when asked (``--download``); raises if the checksum does not match."""
    d = Path(data_dir)
    d.mkdir(parents=True, exist_ok=True)
    tarball = d / Path(url).name
    if not (tarball.is_file() and _md5(tarball) == md5):
        tmp = tarball.with_suffix(".part")
        print(f"downloading {url} -> {tarball}")
        urllib.request.urlretrieve(url, tmp)  # noqa: S310 (a fixed https URL)
        os.replace(tmp, tarball)
    got = _md5(tarball)
    if got != md5:
        raise RuntimeError(f"CIFAR-10 download {tarball} has md5 {got}, expected {md5}; "
                           "delete it and retry")
    with tarfile.open(tarball, "r:gz") as tar:
        members = [m for m in tar.getmembers()
                   if m.name.startswith(CIFAR10_DIR + "/") and ".." not in m.name
                   and (m.isfile() or m.isdir())]
        tar.extractall(d, members=members)  # noqa: S202 (members filtered above)
    return d / CIFAR10_DIR


def _read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with open(path, "rb") as f:
        entry = pickle.load(f, encoding="bytes")
    data = entry.get(b"data", entry.get("data"))
    labels = entry.get(b"labels", entry.get("labels"))
    if data is None or labels is None:
        raise ValueError(f"{path}: not a CIFAR-10 python batch (no 'data'/'labels')")
    data = np.asarray(data, dtype=np.uint8)
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise ValueError(f"{path}: 'data' has shape {data.shape}, expected (N, 3072)")
    return data.reshape(-1, 3, 32, 32), np.asarray(labels, dtype=np.int64)


def load_cifar10(data_dir: str | os.PathLike | None, download: bool = False) -> Dataset:
    """CIFAR-10 from the standard python-pickle directory (``cifar-10-batches-py``), with
    per-channel standardization and no augmentation (the paper's setup)."""
    if data_dir is None:
        raise FileNotFoundError("CIFAR-10 needs --data-dir (the folder holding "
                                f"{CIFAR10_DIR}/); add --download to fetch it")
    root = _cifar_root(data_dir)
    needed = [*CIFAR10_TRAIN, CIFAR10_TEST]
    missing = [n for n in needed if not (root / n).is_file()]
    if missing and download:
        root = download_cifar10(data_dir)
        missing = [n for n in needed if not (root / n).is_file()]
    if missing:
        raise FileNotFoundError(
            f"CIFAR-10 not found: {root} lacks {', '.join(missing)}. Either pass --download "
            f"(needs network; fetches {CIFAR10_URL}, md5 {CIFAR10_MD5}) or download and "
            f"extract that tarball yourself so that {Path(data_dir) / CIFAR10_DIR} exists. "
            "Without CIFAR-10, use --dataset digits (bundled, offline).")
    return _load_cifar10_root(str(root.resolve()))


@functools.lru_cache(maxsize=2)
def _load_cifar10_root(root: str) -> Dataset:
    """The standardized dataset from a folder of batch files; cached (a process training
    many runs reads it once): treat the tensors as read-only."""
    parts = [_read_batch(Path(root) / n) for n in CIFAR10_TRAIN]
    train_x = torch.from_numpy(np.concatenate([p[0] for p in parts])).float() / 255
    train_y = torch.from_numpy(np.concatenate([p[1] for p in parts]))
    tx, ty = _read_batch(Path(root) / CIFAR10_TEST)
    test_x = torch.from_numpy(tx).float() / 255
    train_x, test_x = _standardize(train_x, test_x)
    return Dataset("cifar10", train_x, train_y, test_x, torch.from_numpy(ty), 10)


def write_cifar10_fixture(root: str | os.PathLike, per_batch: int = 10, seed: int = 0) -> Path:
    """Write a tiny dataset in CIFAR-10's python-pickle format (for tests): ``per_batch``
    random images in each of the five training batches and the test batch."""
    d = Path(root) / CIFAR10_DIR
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for name in (*CIFAR10_TRAIN, CIFAR10_TEST):
        entry = {b"batch_label": name.encode(),
                 b"labels": [int(v) for v in rng.integers(0, 10, per_batch)],
                 b"data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
                 b"filenames": [f"{name}_{i}.png".encode() for i in range(per_batch)]}
        with open(d / name, "wb") as f:
            pickle.dump(entry, f)
    with open(d / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [f"class{i}".encode() for i in range(10)]}, f)
    return d


# ----------------------------------------------------------------------------- digits


@functools.lru_cache(maxsize=4)
def load_digits(cfg: DigitsConfig = DigitsConfig()) -> Dataset:
    """scikit-learn's bundled digits (1797 8x8 images, 10 classes; no download), upsampled to
    ``cfg.size`` x ``cfg.size`` x 3 and standardized: an offline, CIFAR-shaped task.

    Cached per config (a process training many runs builds it once): treat the tensors as
    read-only."""
    from sklearn.datasets import load_digits as sk_digits

    bunch = sk_digits()
    x = torch.from_numpy(bunch.images.astype(np.float32) / 16.0).unsqueeze(1)
    x = F.interpolate(x, size=(cfg.size, cfg.size), mode="bilinear", align_corners=False)
    x = x.expand(-1, 3, -1, -1).contiguous()
    y = torch.from_numpy(bunch.target.astype(np.int64))
    g = torch.Generator().manual_seed(cfg.split_seed)
    perm = torch.randperm(len(y), generator=g)
    n_test = int(round(cfg.test_fraction * len(y)))
    test, train = perm[:n_test], perm[n_test:]
    train_x, test_x = _standardize(x[train], x[test])
    return Dataset("digits", train_x, y[train], test_x, y[test], 10)


# ----------------------------------------------------------------------------- DLN regression


@functools.lru_cache(maxsize=8)
def make_dln_data(cfg: DLNDataConfig = DLNDataConfig()) -> Dataset:
    """x ~ N(0, I_dim) (``num_samples`` of them), targets A x with A_ij ~ N(0, 1). Cached per
    config: treat the tensors as read-only."""
    g = torch.Generator().manual_seed(cfg.seed)
    x = torch.randn(cfg.num_samples, cfg.dim, generator=g)
    a = torch.randn(cfg.dim, cfg.dim, generator=g)
    return Dataset("gaussian", x, x @ a.T)


def load_dataset(name: str, data_dir: str | None = None, download: bool = False,
                 dln: DLNDataConfig = DLNDataConfig(),
                 digits: DigitsConfig = DigitsConfig()) -> Dataset:
    if name == "cifar10":
        return load_cifar10(data_dir, download)
    if name == "digits":
        return load_digits(digits)
    if name == "gaussian":
        return make_dln_data(dln)
    raise ValueError(f"unknown dataset {name!r}; choose cifar10, digits or gaussian")


# ----------------------------------------------------------------------------- batches


def batch_indices(num_samples: int, batch_size: int, step: int, seed: int) -> torch.Tensor:
    """The indices of minibatch ``step``: epochs of a seeded permutation, last partial batch
    dropped (so every BatchNorm batch has the same size). ``batch_size >= num_samples`` gives
    the full batch in order (full-batch gradient descent)."""
    if batch_size >= num_samples:
        return torch.arange(num_samples)
    per_epoch = num_samples // batch_size
    epoch, k = divmod(step, per_epoch)
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    perm = torch.randperm(num_samples, generator=g)
    return perm[k * batch_size:(k + 1) * batch_size]
