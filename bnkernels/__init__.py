"""bnkernels: fused normalization kernels for PyTorch (BatchNorm and its variants) and the
toolkit reproducing "How Does Batch Normalization Help Optimization?" (Santurkar et al., 2018).
"""

from .backends import available_backends, get_backend, set_backend
from .functional import NoiseConfig, batch_norm, noisy_batch_norm, noisy_batch_norm_noise
from .nn import BatchNorm1d, BatchNorm2d, BatchNorm3d

__version__ = "0.1.0"

__all__ = [
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "NoiseConfig",
    "available_backends",
    "batch_norm",
    "get_backend",
    "noisy_batch_norm",
    "noisy_batch_norm_noise",
    "set_backend",
]
