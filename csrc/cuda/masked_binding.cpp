// CUDA implementations of masked_weight, masked_score_grad, keep_weight, keep_score_grad,
// channel_gate_forward and channel_gate_backward (backend "cuda"; schemas in csrc/library.cpp): argument checks and
// layouts shared with the CPU implementations (csrc/checks.h), kernels in masked.cu / gate.cu
// through launchers.h, on the current stream, with no host sync. The dense GEMM/conv
// (cuBLAS/cuDNN) is ATen, called by bise_kernels/backends/native.py. Compiled only WITH_CUDA.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../checks.h"
#include "launchers.h"

namespace bise_cuda_binding {
namespace {

using bise_checks::GateLayout;

// Types were validated by the shared checks (float32/float64/float16/bfloat16).
int dtype_code(at::ScalarType type) {
  return type == at::kFloat ? BISE_F32 : type == at::kDouble ? BISE_F64 : type == at::kHalf ? BISE_F16 : BISE_BF16;
}

void check_launch(cudaError_t status, const char* op) {
  TORCH_CHECK(status == cudaSuccess, op, ": CUDA kernel launch failed: ", cudaGetErrorString(status));
}

cudaStream_t stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

at::Tensor masked_weight_cuda(const at::Tensor& weight, const at::Tensor& scores, const at::Tensor& thr,
                              const at::Tensor& cut, bool check_finite) {
  constexpr const char* op = "bise_kernels_ext::masked_weight";
  const auto [w, s, per_unit, n, rows, row_len] =
      bise_checks::layer_operands(weight, scores, bise_checks::check_layer(weight, scores, thr, cut, op, at::kCUDA));
  const c10::cuda::CUDAGuard guard(weight.device());
  if (n == 0 && check_finite) {  // no kernel runs: thr and per-unit scores (of empty rows) as the CPU checks them
    bise_checks::check_finite_unlaunched(thr, "threshold");
    bise_checks::check_finite_unlaunched(s, "scores");
  }
  at::Tensor out = at::empty_like(w, at::MemoryFormat::Contiguous);
  check_launch(bise_masked_weight(w.const_data_ptr(), s.const_data_ptr(), out.data_ptr(), n, row_len, per_unit,
                                  dtype_code(w.scalar_type()), dtype_code(s.scalar_type()), thr.const_data_ptr(),
                                  cut.const_data_ptr<int64_t>(), check_finite, stream()),
               op);
  return out;
}

at::Tensor masked_score_grad_cuda(const at::Tensor& grad_w_eff, const at::Tensor& weight, const at::Tensor& scores,
                                  const at::Tensor& thr, const at::Tensor& cut, std::string estimator,
                                  double temperature, bool need_scores, bool need_weight) {
  constexpr const char* op = "bise_kernels_ext::masked_score_grad";
  const auto [w, s, per_unit, n, rows, row_len] = bise_checks::layer_operands(
      weight, scores,
      bise_checks::check_score_grad(grad_w_eff, weight, scores, thr, cut, estimator, temperature, op, at::kCUDA));
  const c10::cuda::CUDAGuard guard(weight.device());
  // No weights (n == 0): the kernels do not run, and every score gradient is a sum of nothing.
  at::Tensor gs = !need_scores ? at::empty({0}, s.options())
                  : n == 0     ? at::zeros_like(s, at::MemoryFormat::Contiguous)
                               : at::empty_like(s, at::MemoryFormat::Contiguous);
  check_launch(bise_score_grad(grad_w_eff.data_ptr(), w.const_data_ptr(), s.const_data_ptr(),
                               need_scores ? gs.data_ptr() : nullptr, n, row_len, per_unit,
                               dtype_code(w.scalar_type()), dtype_code(s.scalar_type()), thr.const_data_ptr(),
                               cut.const_data_ptr<int64_t>(), estimator == "sigmoid", temperature, need_scores,
                               need_weight, stream()),
               op);
  return gs;
}

at::Tensor keep_weight_cuda(const at::Tensor& weight, const at::Tensor& keep) {
  constexpr const char* op = "bise_kernels_ext::keep_weight";
  const auto [w, k, per_unit, n, rows, row_len] =
      bise_checks::layer_operands(weight, keep, bise_checks::check_keep_layer(weight, keep, op, at::kCUDA));
  const c10::cuda::CUDAGuard guard(weight.device());
  at::Tensor out = at::empty_like(w, at::MemoryFormat::Contiguous);
  check_launch(bise_keep_weight(w.const_data_ptr(), k.const_data_ptr<bool>(), out.data_ptr(), n, row_len, per_unit,
                                dtype_code(w.scalar_type()), stream()),
               op);
  return out;
}

at::Tensor keep_score_grad_cuda(const at::Tensor& grad_w_eff, const at::Tensor& weight, const at::Tensor& scores,
                                const at::Tensor& keep, std::string estimator, double temperature, bool need_scores,
                                bool need_weight) {
  constexpr const char* op = "bise_kernels_ext::keep_score_grad";
  const bool per_unit =
      bise_checks::check_keep_score_grad(grad_w_eff, weight, scores, keep, estimator, temperature, op, at::kCUDA);
  const auto [w, s, unit, n, rows, row_len] = bise_checks::layer_operands(weight, scores, per_unit);
  const at::Tensor k = keep.contiguous();
  const c10::cuda::CUDAGuard guard(weight.device());
  // No weights (n == 0): the kernels do not run, and every score gradient is a sum of nothing.
  at::Tensor gs = !need_scores ? at::empty({0}, s.options())
                  : n == 0     ? at::zeros_like(s, at::MemoryFormat::Contiguous)
                               : at::empty_like(s, at::MemoryFormat::Contiguous);
  check_launch(bise_keep_score_grad(grad_w_eff.data_ptr(), w.const_data_ptr(), s.const_data_ptr(),
                                    k.const_data_ptr<bool>(), need_scores ? gs.data_ptr() : nullptr, n, row_len,
                                    per_unit, dtype_code(w.scalar_type()), dtype_code(s.scalar_type()),
                                    estimator == "sigmoid", temperature, need_scores, need_weight, stream()),
               op);
  return gs;
}

void launch_gate_forward(const at::Tensor& in, at::Tensor& out, const at::Tensor& s, const GateLayout& L,
                         const at::Tensor& thr, const at::Tensor& cut, const char* op) {
  check_launch(bise_gate_forward(in.const_data_ptr(), out.data_ptr(), s.const_data_ptr(), L.outer, L.channels,
                                 L.inner, dtype_code(in.scalar_type()), dtype_code(s.scalar_type()),
                                 thr.const_data_ptr(), cut.const_data_ptr<int64_t>(), stream()),
               op);
}

at::Tensor channel_gate_forward_cuda(const at::Tensor& x, const at::Tensor& scores, const at::Tensor& thr,
                                     const at::Tensor& cut, int64_t dim) {
  constexpr const char* op = "bise_kernels_ext::channel_gate_forward";
  dim = bise_checks::check_gate(x, scores, thr, cut, dim, op, at::kCUDA);
  const c10::cuda::CUDAGuard guard(x.device());
  const GateLayout L = bise_checks::gate_layout(x, dim);
  at::Tensor y = at::empty_like(L.x, L.format);
  launch_gate_forward(L.x, y, scores.contiguous(), L, thr, cut, op);
  return y;
}

std::tuple<at::Tensor, at::Tensor> channel_gate_backward_cuda(const at::Tensor& grad_y, const at::Tensor& x,
                                                              const at::Tensor& scores, const at::Tensor& thr,
                                                              const at::Tensor& cut, int64_t dim, std::string estimator,
                                                              double temperature, bool need_x, bool need_scores) {
  constexpr const char* op = "bise_kernels_ext::channel_gate_backward";
  dim = bise_checks::check_gate_backward(grad_y, x, scores, thr, cut, dim, estimator, temperature, op, at::kCUDA);
  const c10::cuda::CUDAGuard guard(x.device());
  auto [L, gy, s, gx, gs] = bise_checks::gate_backward_operands(grad_y, x, scores, dim, need_x, need_scores);
  if (!need_scores) {
    if (need_x) launch_gate_forward(gy, gx, s, L, thr, cut, op);
    return {gx, gs};
  }
  const auto acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor workspace = at::empty({bise_gate_workspace(L.outer, L.channels, L.inner)}, x.options().dtype(acc));
  check_launch(bise_gate_backward(gy.const_data_ptr(), L.x.const_data_ptr(), need_x ? gx.data_ptr() : nullptr,
                                  gs.data_ptr(), workspace.data_ptr(), s.const_data_ptr(), L.outer, L.channels,
                                  L.inner, dtype_code(x.scalar_type()), dtype_code(s.scalar_type()),
                                  thr.const_data_ptr(), cut.const_data_ptr<int64_t>(), estimator == "sigmoid",
                                  temperature, stream()),
               op);
  return {gx, gs};
}

}  // namespace
}  // namespace bise_cuda_binding

TORCH_LIBRARY_IMPL(bise_kernels_ext, CUDA, m) {
  m.impl("masked_weight", &bise_cuda_binding::masked_weight_cuda);
  m.impl("masked_score_grad", &bise_cuda_binding::masked_score_grad_cuda);
  m.impl("keep_weight", &bise_cuda_binding::keep_weight_cuda);
  m.impl("keep_score_grad", &bise_cuda_binding::keep_score_grad_cuda);
  m.impl("channel_gate_forward", &bise_cuda_binding::channel_gate_forward_cuda);
  m.impl("channel_gate_backward", &bise_cuda_binding::channel_gate_backward_cuda);
}
