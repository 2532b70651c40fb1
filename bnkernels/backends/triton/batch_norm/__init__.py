"""BatchNorm (and noisy BatchNorm) in Triton: :mod:`.kernels` (the @triton.jit kernels) and
:mod:`.plan` (one signature's launches)."""
