// What csrc/cuda/masked_common.cuh takes from cuda_runtime.h, cuda_fp16.h and cuda_bf16.h, for the
// CPU emulation of csrc/cuda/masked.cu (tests/kernels/test_masked_cuda_emulated.py): the 16-bit
// float types with round-to-nearest-even conversions and the bit casts. Included through the
// stub headers of those names, after emu.h.
#pragma once
#include <bit>
#include <cmath>
#include <cstdint>

using std::exp;

constexpr int cudaErrorInvalidValue = 1;

struct __half {
  _Float16 v;
};
inline float __half2float(__half h) { return static_cast<float>(h.v); }
inline __half __float2half_rn(float f) { return {static_cast<_Float16>(f)}; }

struct __nv_bfloat16 {
  uint16_t x;
};
inline float __bfloat162float(__nv_bfloat16 b) { return std::bit_cast<float>(uint32_t(b.x) << 16); }
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  const uint32_t u = std::bit_cast<uint32_t>(f);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return {uint16_t((u >> 16) | 0x40)};  // NaN stays NaN
  return {uint16_t((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16)};
}

inline int __float_as_int(float f) { return std::bit_cast<int>(f); }
inline unsigned __float_as_uint(float f) { return std::bit_cast<unsigned>(f); }
inline long long __double_as_longlong(double d) { return std::bit_cast<long long>(d); }
