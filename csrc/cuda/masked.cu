// Fused CUDA passes of the masked layers (backend "cuda"); the dense GEMM/conv stays in ATen
// (cuBLAS/cuDNN). Torch-free: launched through the extern "C" functions of launchers.h.
//
// masked_weight: W_eff = W * keep(scores), reading scores directly (no mask, no indices); a
//   device-side assert on a NaN/inf score or thr (BISE_DEVICE_CHECK): the API's value check for
//   the "cuda" backend, with no pass or launch of its own (bise_kernels/functional.py).
// score_grad: grad_scores = grad_W_eff * W * slope (a block-reduced row sum for per-unit scores)
//   and, if asked, grad_W_eff *= keep in place, in one pass over grad_W_eff.
// keep_weight / keep_score_grad: the same passes reading a bool keep mask (the selection packed
// once per step) instead of evaluating the rule on the scores. Each kernel takes its keep source
// (ScoreKeep or MaskKeep) as a template argument, so both rules share one kernel body.
#include "masked_common.cuh"

namespace bise_cuda {
namespace {

// Keep sources: load() (on the device, once per thread) gives a functor keep(i) of flat index i
// (for per-unit sources, i is the unit); keep.check(i) asserts that the value deciding keep(i) is
// finite when the source was made with check_finite (the weight kernels call it: the scores' value
// check, fused into the pass that reads them).
template <typename S>
struct ScoreKeep {  // the selection rule on scores[i]
  const S* scores;
  const S* thr;
  const int64_t* cut;
  int check_finite;
  struct Loaded {
    const S* scores;
    Keep<S> rule;
    int check_finite;
    __device__ bool operator()(int64_t i) const { return rule(scores[i], i); }
    __device__ void check(int64_t i) const {
      if (check_finite) BISE_DEVICE_CHECK(isfinite(to_acc(scores[i])), BISE_SCORES_NOT_FINITE);
    }
  };
  __device__ Loaded load() const {
    if (check_finite) BISE_DEVICE_CHECK(isfinite(to_acc(*thr)), BISE_THRESHOLD_NOT_FINITE);
    return {scores, Keep<S>(thr, cut), check_finite};
  }
};

struct MaskKeep {  // a packed bool mask
  const bool* keep;
  __device__ MaskKeep load() const { return *this; }
  __device__ bool operator()(int64_t i) const { return keep[i]; }
  __device__ void check(int64_t) const {}
};

// Weight-shaped keep: one thread per weight (grid-stride).
template <typename W, typename Source>
__global__ void masked_weight_kernel(const W* __restrict__ weight, W* __restrict__ out, int64_t n, Source source) {
  const auto keep = source.load();
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    keep.check(i);
    out[i] = from_acc<W>(to_acc(weight[i]) * acc_t<W>(keep(i) ? 1 : 0));
  }
}

// Per-unit keep: one block per row (grid-stride over rows), threads along the row, so the
// unit's keep is evaluated once per row and no thread divides by the row length.
template <typename W, typename Source>
__global__ void masked_weight_rows_kernel(const W* __restrict__ weight, W* __restrict__ out, int64_t rows,
                                          int64_t row_len, Source source) {
  const auto keep = source.load();
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    if (threadIdx.x == 0) keep.check(r);
    const acc_t<W> k = keep(r) ? 1 : 0;
    for (int64_t j = r * row_len + threadIdx.x; j < (r + 1) * row_len; j += blockDim.x)
      out[j] = from_acc<W>(to_acc(weight[j]) * k);
  }
}

template <typename W, typename S, typename Source>
__global__ void score_grad_kernel(W* __restrict__ grad, const W* __restrict__ weight, const S* __restrict__ scores,
                                  S* __restrict__ grad_scores, int64_t n, Source source, int sigmoid,
                                  acc_t<S> temperature, int need_scores, int need_weight) {
  const auto keep = source.load();
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const acc_t<W> g = to_acc(grad[i]);
    if (need_scores) {
      const acc_t<W> gw = g * to_acc(weight[i]);
      grad_scores[i] = from_acc<S>(acc_t<S>(gw) * slope(scores[i], sigmoid, temperature));
    }
    if (need_weight) grad[i] = from_acc<W>(g * acc_t<W>(keep(i) ? 1 : 0));
  }
}

// One block per row (grid-stride over rows): the row sum of grad * weight, and the row masked in place.
template <typename W, typename S, typename Source>
__global__ void score_grad_rows_kernel(W* __restrict__ grad, const W* __restrict__ weight,
                                       const S* __restrict__ scores, S* __restrict__ grad_scores, int64_t rows,
                                       int64_t row_len, Source source, int sigmoid, acc_t<S> temperature,
                                       int need_scores, int need_weight) {
  const auto keep = source.load();
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const acc_t<W> k = keep(r) ? 1 : 0;
    acc_t<W> sum = 0;
    for (int64_t j = r * row_len + threadIdx.x; j < (r + 1) * row_len; j += blockDim.x) {
      const acc_t<W> g = to_acc(grad[j]);
      sum += g * to_acc(weight[j]);
      if (need_weight) grad[j] = from_acc<W>(g * k);
    }
    sum = block_sum(sum);
    if (need_scores && threadIdx.x == 0)
      grad_scores[r] = from_acc<S>(acc_t<S>(sum) * slope(scores[r], sigmoid, temperature));
  }
}

template <typename W, typename Source>
void launch_weight(const void* weight, void* out, int64_t n, int64_t row_len, int per_unit, Source source,
                   cudaStream_t stream) {
  const W* w = static_cast<const W*>(weight);
  if (per_unit) {
    const int64_t rows = n / row_len;
    masked_weight_rows_kernel<W><<<grid_for(rows, 1), kThreads, 0, stream>>>(w, static_cast<W*>(out), rows, row_len,
                                                                             source);
  } else {
    masked_weight_kernel<W><<<grid_for(n), kThreads, 0, stream>>>(w, static_cast<W*>(out), n, source);
  }
}

template <typename W, typename S, typename Source>
void launch_score_grad(void* grad_w_eff, const void* weight, const void* scores, void* grad_scores, int64_t n,
                       int64_t row_len, int per_unit, Source source, int sigmoid, double temperature,
                       int need_scores, int need_weight, cudaStream_t stream) {
  W* g = static_cast<W*>(grad_w_eff);
  const W* w = static_cast<const W*>(weight);
  const S* s = static_cast<const S*>(scores);
  S* gs = static_cast<S*>(grad_scores);
  const acc_t<S> temp = static_cast<acc_t<S>>(temperature);
  if (per_unit) {
    const int64_t rows = n / row_len;
    score_grad_rows_kernel<W, S><<<grid_for(rows, 1), kThreads, 0, stream>>>(
        g, w, s, gs, rows, row_len, source, sigmoid, temp, need_scores, need_weight);
  } else {
    score_grad_kernel<W, S><<<grid_for(n), kThreads, 0, stream>>>(g, w, s, gs, n, source, sigmoid, temp,
                                                                 need_scores, need_weight);
  }
}

}  // namespace
}  // namespace bise_cuda

using namespace bise_cuda;

extern "C" cudaError_t bise_masked_weight(const void* weight, const void* scores, void* out, int64_t n,
                                          int64_t row_len, int per_unit, int w_dtype, int s_dtype, const void* thr,
                                          const int64_t* cut, int check_finite, cudaStream_t stream) {
  if (n <= 0) return cudaSuccess;
  if (per_unit && row_len <= 0) return cudaErrorInvalidValue;
  const bool known = dispatch_value_and_scores(w_dtype, s_dtype, [&](auto w_tag, auto s_tag) {
    using W = decltype(w_tag);
    using S = decltype(s_tag);
    const ScoreKeep<S> source{static_cast<const S*>(scores), static_cast<const S*>(thr), cut, check_finite};
    launch_weight<W>(weight, out, n, row_len, per_unit, source, stream);
  });
  return known ? cudaGetLastError() : cudaErrorInvalidValue;
}

extern "C" cudaError_t bise_keep_weight(const void* weight, const bool* keep, void* out, int64_t n, int64_t row_len,
                                        int per_unit, int w_dtype, cudaStream_t stream) {
  if (n <= 0) return cudaSuccess;
  if (per_unit && row_len <= 0) return cudaErrorInvalidValue;
  const bool known = dispatch(w_dtype, [&](auto w_tag) {
    launch_weight<decltype(w_tag)>(weight, out, n, row_len, per_unit, MaskKeep{keep}, stream);
  });
  return known ? cudaGetLastError() : cudaErrorInvalidValue;
}

extern "C" cudaError_t bise_score_grad(void* grad_w_eff, const void* weight, const void* scores, void* grad_scores,
                                       int64_t n, int64_t row_len, int per_unit, int w_dtype, int s_dtype,
                                       const void* thr, const int64_t* cut, int sigmoid, double temperature,
                                       int need_scores, int need_weight, cudaStream_t stream) {
  if (n <= 0 || (!need_scores && !need_weight)) return cudaSuccess;
  if (per_unit && row_len <= 0) return cudaErrorInvalidValue;
  const bool known = dispatch_value_and_scores(w_dtype, s_dtype, [&](auto w_tag, auto s_tag) {
    using S = decltype(s_tag);
    const ScoreKeep<S> source{static_cast<const S*>(scores), static_cast<const S*>(thr), cut, 0};
    launch_score_grad<decltype(w_tag), S>(grad_w_eff, weight, scores, grad_scores, n, row_len, per_unit, source,
                                          sigmoid, temperature, need_scores, need_weight, stream);
  });
  return known ? cudaGetLastError() : cudaErrorInvalidValue;
}

extern "C" cudaError_t bise_keep_score_grad(void* grad_w_eff, const void* weight, const void* scores,
                                            const bool* keep, void* grad_scores, int64_t n, int64_t row_len,
                                            int per_unit, int w_dtype, int s_dtype, int sigmoid, double temperature,
                                            int need_scores, int need_weight, cudaStream_t stream) {
  if (n <= 0 || (!need_scores && !need_weight)) return cudaSuccess;
  if (per_unit && row_len <= 0) return cudaErrorInvalidValue;
  const bool known = dispatch_value_and_scores(w_dtype, s_dtype, [&](auto w_tag, auto s_tag) {
    launch_score_grad<decltype(w_tag), decltype(s_tag)>(grad_w_eff, weight, scores, grad_scores, n, row_len,
                                                        per_unit, MaskKeep{keep}, sigmoid, temperature, need_scores,
                                                        need_weight, stream);
  });
  return known ? cudaGetLastError() : cudaErrorInvalidValue;
}
