// Fused CUDA channel gate (backend "cuda"), torch-free (launchers.h). x is viewed in memory order
// as (outer, C, inner): contiguous for any dim, channels_last for dim 1 (inner = 1).
//
// forward: y = x * gate[c], with a device-side assert on a NaN/inf score or thr (BISE_DEVICE_CHECK,
// as masked.cu's mask pass: the API's value check for the "cuda" backend, no launch of its own; an
// empty x launches nothing, so the API checks itself then). backward: one pass over grad_y and x writing grad_x = grad_y * gate
// and per-(chunk, channel) partial sums of grad_y * x into a workspace, then a per-channel pass
// summing the chunks in a fixed order (deterministic, no atomics) times the slope.
//   inner >= 32 (NCHW): a block per (channel, outer chunk), threads along the contiguous inner runs.
//   inner < 32 (channels_last, last dim): 32x8 blocks, threadIdx.x along channels (coalesced).
#include "masked_common.cuh"

namespace bise_cuda {
namespace {

constexpr int64_t kRowsInner = 32;  // inner extent from which a block walks one channel's runs
constexpr int kColsX = 32, kColsY = 8;

template <typename X, typename S>
__global__ void gate_forward_kernel(const X* __restrict__ x, X* __restrict__ y, const S* __restrict__ scores,
                                    int64_t n, int64_t channels, int64_t inner, const S* thr, const int64_t* cut) {
  const Keep<S> keep(thr, cut);
  BISE_DEVICE_CHECK(isfinite(to_acc(*thr)), BISE_THRESHOLD_NOT_FINITE);
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t c = (i / inner) % channels;
    const S s = scores[c];
    BISE_DEVICE_CHECK(isfinite(to_acc(s)), BISE_SCORES_NOT_FINITE);
    y[i] = from_acc<X>(to_acc(x[i]) * acc_t<X>(keep(s, c) ? 1 : 0));
  }
}

int64_t rows_chunks(int64_t outer, int64_t channels) {
  const int64_t target = 2048;  // enough blocks to fill an H100 several times over
  int64_t chunks = (target + channels - 1) / channels;
  chunks = chunks > outer ? outer : (chunks > 65535 ? 65535 : chunks);
  return chunks < 1 ? 1 : chunks;
}

int64_t cols_chunks(int64_t outer) {
  const int64_t chunks = (outer + 63) / 64;
  return chunks < 1 ? 1 : (chunks > 1024 ? 1024 : chunks);
}

// grid (channels, chunks): block (c, k) covers outer rows [k*outer/chunks, (k+1)*outer/chunks).
template <typename X, typename S>
__global__ void gate_backward_rows_kernel(const X* __restrict__ gy, const X* __restrict__ x, X* __restrict__ gx,
                                          acc_t<X>* __restrict__ partial, const S* __restrict__ scores,
                                          int64_t outer, int64_t channels, int64_t inner, const S* thr,
                                          const int64_t* cut) {
  const Keep<S> keep(thr, cut);
  const int64_t c = blockIdx.x, k = blockIdx.y, chunks = gridDim.y;
  const int64_t o_begin = k * outer / chunks, o_end = (k + 1) * outer / chunks;
  const acc_t<X> g = keep(scores[c], c) ? 1 : 0;
  acc_t<X> sum = 0;
  for (int64_t e = threadIdx.x; e < (o_end - o_begin) * inner; e += blockDim.x) {
    const int64_t o = o_begin + e / inner, i = ((o * channels) + c) * inner + e % inner;
    const acc_t<X> dy = to_acc(gy[i]);
    sum += dy * to_acc(x[i]);
    if (gx != nullptr) gx[i] = from_acc<X>(dy * g);
  }
  sum = block_sum(sum);
  if (threadIdx.x == 0) partial[k * channels + c] = sum;
}

// grid (ceil(channels / 32), chunks), block (32, 8): thread (tx, ty) of block (bx, k) sums channel
// bx*32+tx over outer rows k*8+ty, k*8+ty + chunks*8, ...
template <typename X, typename S>
__global__ void gate_backward_cols_kernel(const X* __restrict__ gy, const X* __restrict__ x, X* __restrict__ gx,
                                          acc_t<X>* __restrict__ partial, const S* __restrict__ scores,
                                          int64_t outer, int64_t channels, int64_t inner, const S* thr,
                                          const int64_t* cut) {
  __shared__ acc_t<X> buffer[kColsY][kColsX];
  const Keep<S> keep(thr, cut);
  const int64_t c = blockIdx.x * int64_t(kColsX) + threadIdx.x;
  acc_t<X> sum = 0;
  if (c < channels) {
    const acc_t<X> g = keep(scores[c], c) ? 1 : 0;
    for (int64_t o = blockIdx.y * int64_t(kColsY) + threadIdx.y; o < outer; o += int64_t(gridDim.y) * kColsY) {
      for (int64_t i = (o * channels + c) * inner; i < (o * channels + c + 1) * inner; ++i) {
        const acc_t<X> dy = to_acc(gy[i]);
        sum += dy * to_acc(x[i]);
        if (gx != nullptr) gx[i] = from_acc<X>(dy * g);
      }
    }
  }
  buffer[threadIdx.y][threadIdx.x] = sum;
  __syncthreads();
  if (threadIdx.y == 0 && c < channels) {
    for (int r = 1; r < kColsY; ++r) sum += buffer[r][threadIdx.x];
    partial[blockIdx.y * channels + c] = sum;
  }
}

template <typename X, typename S>
__global__ void gate_finish_kernel(const acc_t<X>* __restrict__ partial, int64_t chunks, int64_t channels,
                                   const S* __restrict__ scores, S* __restrict__ grad_scores, int sigmoid,
                                   acc_t<S> temperature) {
  for (int64_t c = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; c < channels;
       c += int64_t(gridDim.x) * blockDim.x) {
    acc_t<X> sum = 0;
    for (int64_t k = 0; k < chunks; ++k) sum += partial[k * channels + c];
    grad_scores[c] = from_acc<S>(acc_t<S>(sum) * slope(scores[c], sigmoid, temperature));
  }
}

}  // namespace
}  // namespace bise_cuda

using namespace bise_cuda;

extern "C" int64_t bise_gate_workspace(int64_t outer, int64_t channels, int64_t inner) {
  return channels * (inner >= kRowsInner ? rows_chunks(outer, channels) : cols_chunks(outer));
}

extern "C" cudaError_t bise_gate_forward(const void* x, void* y, const void* scores, int64_t outer, int64_t channels,
                                         int64_t inner, int x_dtype, int s_dtype, const void* thr, const int64_t* cut,
                                         cudaStream_t stream) {
  const int64_t n = outer * channels * inner;
  if (n <= 0) return cudaSuccess;
  const bool known = dispatch_value_and_scores(x_dtype, s_dtype, [&](auto x_tag, auto s_tag) {
    using X = decltype(x_tag);
    using S = decltype(s_tag);
    gate_forward_kernel<X, S><<<grid_for(n), kThreads, 0, stream>>>(
        static_cast<const X*>(x), static_cast<X*>(y), static_cast<const S*>(scores), n, channels, inner,
        static_cast<const S*>(thr), cut);
  });
  return known ? cudaGetLastError() : cudaErrorInvalidValue;
}

extern "C" cudaError_t bise_gate_backward(const void* grad_y, const void* x, void* grad_x, void* grad_scores,
                                          void* workspace, const void* scores, int64_t outer, int64_t channels,
                                          int64_t inner, int x_dtype, int s_dtype, const void* thr,
                                          const int64_t* cut, int sigmoid, double temperature,
                                          cudaStream_t stream) {
  if (channels <= 0) return cudaSuccess;
  const bool known = dispatch_value_and_scores(x_dtype, s_dtype, [&](auto x_tag, auto s_tag) {
    using X = decltype(x_tag);
    using S = decltype(s_tag);
    const X* dy = static_cast<const X*>(grad_y);
    const X* xp = static_cast<const X*>(x);
    X* dx = static_cast<X*>(grad_x);
    acc_t<X>* partial = static_cast<acc_t<X>*>(workspace);
    const S* s = static_cast<const S*>(scores);
    const S* t = static_cast<const S*>(thr);
    int64_t chunks;
    if (inner >= kRowsInner) {
      chunks = rows_chunks(outer, channels);
      const dim3 grid(static_cast<unsigned int>(channels), static_cast<unsigned int>(chunks));
      gate_backward_rows_kernel<X, S><<<grid, kThreads, 0, stream>>>(dy, xp, dx, partial, s, outer, channels,
                                                                    inner, t, cut);
    } else {
      chunks = cols_chunks(outer);
      const dim3 grid(static_cast<unsigned int>((channels + kColsX - 1) / kColsX),
                      static_cast<unsigned int>(chunks));
      gate_backward_cols_kernel<X, S><<<grid, dim3(kColsX, kColsY), 0, stream>>>(dy, xp, dx, partial, s, outer,
                                                                                channels, inner, t, cut);
    }
    gate_finish_kernel<X, S><<<grid_for(channels), kThreads, 0, stream>>>(
        partial, chunks, channels, s, static_cast<S*>(grad_scores), sigmoid, static_cast<acc_t<S>>(temperature));
  });
  return known ? cudaGetLastError() : cudaErrorInvalidValue;
}
