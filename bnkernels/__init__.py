"""bnkernels: fused normalization kernels for PyTorch (BatchNorm and its variants) and the
toolkit reproducing "How Does Batch Normalization Help Optimization?" (Santurkar et al., 2018).
"""

from ._version import __version__ as __version__
from .backends import available_backends, get_backend, set_backend
from .functional import batch_norm, lp_norm, noisy_batch_norm, noisy_batch_norm_noise
from .fuse import fuse
from .nn import (
    BatchNorm1d,
    BatchNorm2d,
    BatchNorm3d,
    LpNorm1d,
    LpNorm2d,
    LpNorm3d,
    NoisyBatchNorm1d,
    NoisyBatchNorm2d,
    NoisyBatchNorm3d,
    SyncBatchNorm,
    convert,
)
from .noise import NoiseConfig

__all__ = [
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "LpNorm1d",
    "LpNorm2d",
    "LpNorm3d",
    "NoiseConfig",
    "NoisyBatchNorm1d",
    "NoisyBatchNorm2d",
    "NoisyBatchNorm3d",
    "SyncBatchNorm",
    "available_backends",
    "batch_norm",
    "convert",
    "fuse",
    "get_backend",
    "lp_norm",
    "noisy_batch_norm",
    "noisy_batch_norm_noise",
    "set_backend",
]
