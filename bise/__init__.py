"""BISE: unbiased subnetworks inside biased models, on top of bise_kernels."""
