"""Triton kernels (one file per op: the @triton.jit kernel, then its launcher)."""
