"""Triton kernels, one file per op family. Importing this package defines the kernels, so set
TRITON_INTERPRET=1 before it to run them on the CPU."""
