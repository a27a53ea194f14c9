// extern "C" launchers of the torch-free CUDA kernels (masked.cu, gate.cu), called by
// masked_binding.cpp. Pointers are device pointers; thr and cut are read on the device (no host
// sync). dtype codes: BISE_F32, BISE_F64, BISE_F16, BISE_BF16. Each returns the launch status.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

enum { BISE_F32 = 0, BISE_F64 = 1, BISE_F16 = 2, BISE_BF16 = 3 };

extern "C" {

// out = weight * keep(scores); per_unit: scores has one entry per row of row_len weights.
// check_finite: a device-side assert on a NaN/inf score or thr (reported at the next sync).
cudaError_t bise_masked_weight(const void* weight, const void* scores, void* out, int64_t n, int64_t row_len,
                               int per_unit, int w_dtype, int s_dtype, const void* thr, const int64_t* cut,
                               int check_finite, cudaStream_t stream);

// grad_scores = grad_w_eff * weight * slope (summed per row when per_unit); if need_weight,
// grad_w_eff *= keep in place. sigmoid: 0 for "ste", 1 for "sigmoid".
cudaError_t bise_score_grad(void* grad_w_eff, const void* weight, const void* scores, void* grad_scores, int64_t n,
                            int64_t row_len, int per_unit, int w_dtype, int s_dtype, const void* thr,
                            const int64_t* cut, int sigmoid, double temperature, int need_scores, int need_weight,
                            cudaStream_t stream);

// The two passes above with a bool keep mask (of weight's shape, or one per row when per_unit)
// in place of the selection; scores only give the slope of keep_score_grad.
cudaError_t bise_keep_weight(const void* weight, const bool* keep, void* out, int64_t n, int64_t row_len,
                             int per_unit, int w_dtype, cudaStream_t stream);
cudaError_t bise_keep_score_grad(void* grad_w_eff, const void* weight, const void* scores, const bool* keep,
                                 void* grad_scores, int64_t n, int64_t row_len, int per_unit, int w_dtype,
                                 int s_dtype, int sigmoid, double temperature, int need_scores, int need_weight,
                                 cudaStream_t stream);

// y = x * keep(scores[c]) over x viewed as (outer, channels, inner) in memory order.
cudaError_t bise_gate_forward(const void* x, void* y, const void* scores, int64_t outer, int64_t channels,
                              int64_t inner, int x_dtype, int s_dtype, const void* thr, const int64_t* cut,
                              cudaStream_t stream);

// Number of partial sums (fp32, fp64 for fp64 x) bise_gate_backward needs as workspace.
int64_t bise_gate_workspace(int64_t outer, int64_t channels, int64_t inner);

// grad_x = grad_y * gate (skipped when grad_x is null) and grad_scores[c] = slope * sum(grad_y * x)
// over (outer, inner), in one pass plus a per-channel finishing pass over the workspace.
cudaError_t bise_gate_backward(const void* grad_y, const void* x, void* grad_x, void* grad_scores, void* workspace,
                               const void* scores, int64_t outer, int64_t channels, int64_t inner, int x_dtype,
                               int s_dtype, const void* thr, const int64_t* cut, int sigmoid, double temperature,
                               cudaStream_t stream);
}
