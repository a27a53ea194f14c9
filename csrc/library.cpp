// The bise_kernels_ext op namespace. Each kernel file adds its schemas with
// TORCH_LIBRARY_FRAGMENT(bise_kernels_ext, m) and its implementations with TORCH_LIBRARY_IMPL.
#include <torch/library.h>

TORCH_LIBRARY(bise_kernels_ext, m) {}
