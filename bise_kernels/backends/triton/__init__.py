"""Triton kernels, each file a kernel and its launcher side by side."""
