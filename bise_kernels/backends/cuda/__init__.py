"""CUDA kernels (csrc/cuda), thin wrappers over torch.ops.bise_kernels_ext."""
