"""Triton kernels (CUDA), one op per file. Importing this package never requires Triton."""
