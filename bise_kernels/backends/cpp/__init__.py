"""C++ CPU kernels (csrc/cpu), thin wrappers over torch.ops.bise_kernels_ext."""
