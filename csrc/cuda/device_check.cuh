// The device side of the value checks, one definition for the masked layers (masked.cu, gate.cu
// through masked_common.cuh) and the selects (select*.cu through select_common.cuh): as torch's
// CUDA_KERNEL_ASSERT (this code is torch-free), an assert that NDEBUG does not remove. A failing
// thread stops the kernel; the host gets "device-side assert triggered" (cudaErrorAssert) at its
// next synchronisation, and the message names the bad argument. No flag, no extra launch, no host
// sync. (The CPU emulation of the kernels defines it first, to count failures:
// tests/kernels/select_cuda_emu/emu.h.)
#pragma once

#ifndef BISE_DEVICE_CHECK
extern "C" __host__ __device__ void __assert_fail(const char* assertion, const char* file, unsigned int line,
                                                  const char* function) noexcept;
#define BISE_DEVICE_CHECK(cond, message)                                                          \
  do {                                                                                            \
    if (!(cond)) __assert_fail(message, __FILE__, static_cast<unsigned int>(__LINE__), __func__); \
  } while (0)
#endif

// The one wording of a failed finiteness check of the scores and of a threshold (masked pass,
// gate and selects alike).
#define BISE_SCORES_NOT_FINITE "scores contains non-finite values (NaN or inf)"
#define BISE_THRESHOLD_NOT_FINITE "threshold contains non-finite values (NaN or inf)"
