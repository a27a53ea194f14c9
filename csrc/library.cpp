// The bise_kernels_ext ops: one schema per native kernel, named like the kernel of
// bise_kernels/backends/reference.py it serves. Each has a CPU implementation <op>_cpu
// (csrc/cpu) and, in a build WITH_CUDA, a CUDA implementation <op>_cuda (csrc/cuda/*_binding.cpp);
// the dispatcher picks one by the tensors' device. Both validate their arguments with the same
// checks (csrc/checks.h). Python callers: bise_kernels/backends/native.py.
#include <torch/library.h>

TORCH_LIBRARY(bise_kernels_ext, m) {
  // Selection (csrc/cpu/select.cpp, csrc/cuda/select.cu): (thr, cut) of the exact top-k over the
  // concatenation of the flattened scores; hint: an optional previous threshold.
  m.def("topk_select(Tensor[] scores, int k, Tensor? hint) -> (Tensor, Tensor)");
  // One independent top-k per tensor: thresholds and cuts of shape (len(scores),).
  m.def("batched_topk_select(Tensor[] scores, int[] ks, Tensor? hints) -> (Tensor, Tensor)");
  // Bool mask of s > thr or (s == thr and offset + flat index < cut); check_finite: the same pass
  // rejects NaN/inf scores and thr as masked_weight does (a threshold selection nobody checked yet;
  // False by default: a select's (thr, cut) was checked by the select).
  m.def("keep_mask(Tensor scores, Tensor thr, Tensor cut, int offset, bool check_finite=False) -> Tensor");
  // topk_select then keep_mask, one mask per tensor (of its shape): the CPU writes the masks in
  // the selection's fused pass where that pass holds rank k (csrc/cpu/select.cpp).
  m.def("topk_keep_mask(Tensor[] scores, int k, Tensor? hint) -> Tensor[]");
  // The fused pass of masked_linear and masked_conv2d (csrc/cpu/masked.cpp, csrc/cuda/masked.cu):
  // W_eff = weight * keep(scores), for weight-shaped or per-output-unit scores; check_finite: the
  // same pass rejects NaN/inf scores and thr (CPU: ValueError; CUDA: device-side assert). The
  // backward's recompute passes False: the forward checked the same (saved) scores.
  m.def("masked_weight(Tensor weight, Tensor scores, Tensor thr, Tensor cut, bool check_finite=True) -> Tensor");
  // The fused score-gradient pass of masked_linear and masked_conv2d: returns
  // grad_scores = grad_w_eff * weight * slope (row sums for per-unit scores) and, if need_weight,
  // masks grad_w_eff in place into the weight gradient.
  m.def(
      "masked_score_grad(Tensor(a!) grad_w_eff, Tensor weight, Tensor scores, Tensor thr, Tensor cut, "
      "str estimator, float temperature, bool need_scores, bool need_weight) -> Tensor");
  // The same two passes with the selection packed once into a bool keep mask (of weight's shape or
  // (out,)) that forward and backward read instead of the scores (csrc/cpu/masked.cpp, csrc/cuda/masked.cu).
  m.def("keep_weight(Tensor weight, Tensor keep) -> Tensor");
  m.def(
      "keep_score_grad(Tensor(a!) grad_w_eff, Tensor weight, Tensor scores, Tensor keep, str estimator, "
      "float temperature, bool need_scores, bool need_weight) -> Tensor");
  // Channel gate (csrc/cpu/gate.cpp, csrc/cuda/gate.cu): y = x * keep(scores[c]) along dim; the
  // forward rejects NaN/inf scores and thr as masked_weight does (the backward does not check).
  m.def("channel_gate_forward(Tensor x, Tensor scores, Tensor thr, Tensor cut, int dim) -> Tensor");
  // (grad_x, grad_scores) in one pass over grad_y and x; an unneeded one comes back empty.
  m.def(
      "channel_gate_backward(Tensor grad_y, Tensor x, Tensor scores, Tensor thr, Tensor cut, int dim, "
      "str estimator, float temperature, bool need_x, bool need_scores) -> (Tensor, Tensor)");
  // The layer ops of bise_kernels/_ops.py (same names and arguments) as one call each with a C++
  // autograd node (csrc/masked_autograd.cpp): the fused passes above composed with the dense ATen
  // op, forward and backward, for every device; the eager path of the "cpp" and "cuda" backends.
  m.def(
      "masked_linear(Tensor x, Tensor weight, Tensor? bias, Tensor scores, Tensor thr, Tensor cut, str estimator, "
      "float temperature) -> Tensor");
  m.def(
      "masked_linear_keep(Tensor x, Tensor weight, Tensor? bias, Tensor scores, Tensor keep, str estimator, "
      "float temperature) -> Tensor");
  m.def(
      "masked_conv2d(Tensor x, Tensor weight, Tensor? bias, Tensor scores, Tensor thr, Tensor cut, int[] stride, "
      "int[] padding, int[] dilation, int groups, str estimator, float temperature) -> Tensor");
  m.def(
      "masked_conv2d_keep(Tensor x, Tensor weight, Tensor? bias, Tensor scores, Tensor keep, int[] stride, "
      "int[] padding, int[] dilation, int groups, str estimator, float temperature) -> Tensor");
  m.def(
      "channel_gate(Tensor x, Tensor scores, Tensor thr, Tensor cut, int dim, str estimator, float temperature) "
      "-> Tensor");
  // The same compositions without the autograd node: the forward and backward kernels of
  // bise_kernels/backends/native.py (named and called like reference.py's), which the Python custom
  // ops run under torch.compile, export and opcheck. A backward returns (grad_x, grad_weight,
  // grad_bias, grad_scores), None where needs says a gradient is not wanted.
  m.def(
      "masked_linear_forward(Tensor x, Tensor weight, Tensor? bias, Tensor scores, Tensor thr, Tensor cut) "
      "-> Tensor");
  m.def(
      "masked_linear_backward(Tensor grad_y, Tensor x, Tensor weight, Tensor scores, Tensor thr, Tensor cut, "
      "str estimator, float temperature, bool[4] needs) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("masked_linear_keep_forward(Tensor x, Tensor weight, Tensor? bias, Tensor keep) -> Tensor");
  m.def(
      "masked_linear_keep_backward(Tensor grad_y, Tensor x, Tensor weight, Tensor scores, Tensor keep, "
      "str estimator, float temperature, bool[4] needs) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "masked_conv2d_forward(Tensor x, Tensor weight, Tensor? bias, Tensor scores, Tensor thr, Tensor cut, "
      "int[] stride, int[] padding, int[] dilation, int groups) -> Tensor");
  m.def(
      "masked_conv2d_backward(Tensor grad_y, Tensor x, Tensor weight, Tensor scores, Tensor thr, Tensor cut, "
      "int[] stride, int[] padding, int[] dilation, int groups, str estimator, float temperature, bool[4] needs) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "masked_conv2d_keep_forward(Tensor x, Tensor weight, Tensor? bias, Tensor keep, int[] stride, "
      "int[] padding, int[] dilation, int groups) -> Tensor");
  m.def(
      "masked_conv2d_keep_backward(Tensor grad_y, Tensor x, Tensor weight, Tensor scores, Tensor keep, "
      "int[] stride, int[] padding, int[] dilation, int groups, str estimator, float temperature, bool[4] needs) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
}
