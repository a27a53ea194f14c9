// Device helpers shared by masked.cu and gate.cu: dtype dispatch, fp32 (fp64) math types,
// the keep rule of the selection (thr, cut), the estimator slope and a block sum.
// Semantics are those of bise_kernels/backends/reference.py.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "device_check.cuh"
#include "launchers.h"

namespace bise_cuda {

constexpr int kThreads = 256;

template <typename T>
struct Acc {
  using type = float;
};
template <>
struct Acc<double> {
  using type = double;
};
template <typename T>
using acc_t = typename Acc<T>::type;

__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_acc(acc_t<T> v) {
  return static_cast<T>(v);
}
template <>
__device__ __forceinline__ __half from_acc<__half>(float v) {
  return __float2half_rn(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// Calls f(T{}) with T the C++ type of a dtype code; false for an unknown code.
template <typename F>
bool dispatch(int dtype, F&& f) {
  switch (dtype) {
    case BISE_F32: f(float{}); return true;
    case BISE_F64: f(double{}); return true;
    case BISE_F16: f(__half{}); return true;
    case BISE_BF16: f(__nv_bfloat16{}); return true;
    default: return false;
  }
}

// Calls f(V{}, S{}) with the C++ types of a value (weight, x) and a score dtype code: the one
// dtype dispatch of the masked-layer and gate launchers. False for an unknown code.
template <typename F>
bool dispatch_value_and_scores(int value_dtype, int score_dtype, F&& f) {
  bool known = false;
  dispatch(value_dtype, [&](auto v_tag) { known = dispatch(score_dtype, [&](auto s_tag) { f(v_tag, s_tag); }); });
  return known;
}

// Flat index i with score s is kept iff s > thr or (s == thr and i < cut); thr/cut read on device.
// IEEE compares (+0 == -0): setup.py compiles without --use_fast_math, whose flush of subnormals to
// zero needed integer keys here and made W_eff and the score gradients of subnormal products differ
// from the reference.
template <typename S>
struct Keep {
  acc_t<S> thr;
  int64_t cut;
  __device__ Keep(const S* thr_ptr, const int64_t* cut_ptr) : thr(to_acc(*thr_ptr)), cut(*cut_ptr) {}
  __device__ bool operator()(S s, int64_t i) const {
    const acc_t<S> v = to_acc(s);
    return v > thr || (v == thr && i < cut);
  }
};

// d gate / d score: 1 for "ste", sigmoid'(s/T)/T for "sigmoid".
template <typename S>
__device__ __forceinline__ acc_t<S> slope(S s, int sigmoid, acc_t<S> temperature) {
  if (!sigmoid) return acc_t<S>(1);
  const acc_t<S> sig = acc_t<S>(1) / (acc_t<S>(1) + exp(-(to_acc(s) / temperature)));
  return sig * (acc_t<S>(1) - sig) / temperature;
}

// Sum of v over the kThreads threads of a 1-D block; every thread gets the result.
template <typename A>
__device__ A block_sum(A v) {
  __shared__ A buffer[kThreads];
  buffer[threadIdx.x] = v;
  __syncthreads();
  for (int stride = kThreads / 2; stride > 0; stride >>= 1) {
    if (threadIdx.x < stride) buffer[threadIdx.x] += buffer[threadIdx.x + stride];
    __syncthreads();
  }
  const A result = buffer[0];
  __syncthreads();
  return result;
}

inline unsigned int grid_for(int64_t work, int64_t per_block = kThreads, int64_t cap = 1 << 20) {
  const int64_t blocks = (work + per_block - 1) / per_block;
  return static_cast<unsigned int>(blocks < 1 ? 1 : (blocks > cap ? cap : blocks));
}

}  // namespace bise_cuda
