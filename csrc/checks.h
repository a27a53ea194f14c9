// Argument checks of every bise_kernels_ext op, shared by its CPU (csrc/cpu) and CUDA
// (csrc/cuda/*_binding.cpp) implementations, so the CPU tests exercise the checks the CUDA side
// runs. Each check runs before any data pointer is taken and fails naming the op and the argument,
// with the Python exception bise_kernels/_checks.py raises for the same mistake: TypeError for a
// dtype, layout or missing tensor (TORCH_CHECK_TYPE), ValueError for a device, shape or value
// (TORCH_CHECK_VALUE); a module that leaves its checks to the native kernels raises what the
// reference backend raises. Internal errors stay RuntimeError. Together the checks guarantee what
// the kernels index by: every tensor on the implementation's device (one device for all of them),
// a supported dtype, consistent shapes, and either contiguous memory or a contiguous copy made by
// the caller (the *_operands helpers below make those copies and allocate the outputs, likewise
// shared).
// Semantics: bise_kernels/backends/reference.py.
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <limits>
#include <optional>
#include <string>
#include <utility>
#include <vector>

namespace bise_checks {

// A dense tensor of the implementation's device type ("cpu" or "cuda" in messages).
inline void check_device(const at::Tensor& t, const char* name, const char* op, at::DeviceType device) {
  TORCH_CHECK_TYPE(t.defined(), op, ": ", name, " is an undefined tensor");
  TORCH_CHECK_VALUE(t.device().type() == device, op, ": ", name, " must be a ", at::DeviceTypeName(device, true),
                    " tensor, got one on ", t.device());
  TORCH_CHECK_TYPE(!t.is_nested(), op, ": ", name, " must be a dense (strided) tensor, got a nested tensor; pad it ",
                   "(Tensor.to_padded_tensor)");  // before any sizes(): a nested one has none
  TORCH_CHECK_TYPE(t.layout() == at::kStrided, op, ": ", name, " must be a dense (strided) tensor, got layout ",
                   t.layout());
}

inline bool is_float(at::ScalarType type) {
  return type == at::kFloat || type == at::kDouble || type == at::kHalf || type == at::kBFloat16;
}

// float32/float64/float16/bfloat16 on `device`.
inline void check_float(const at::Tensor& t, const char* name, const char* op, at::DeviceType device) {
  check_device(t, name, op, device);
  TORCH_CHECK_TYPE(is_float(t.scalar_type()), op, ": ", name, " must be float32/float64/float16/bfloat16, got ",
                   t.scalar_type());
}

// `t` on the same device as `ref` (same index too).
inline void check_same_device(const at::Tensor& t, const char* name, const at::Tensor& ref, const char* ref_name,
                              const char* op) {
  TORCH_CHECK_VALUE(t.device() == ref.device(), op, ": ", name, " must be on ", ref_name, "'s device ", ref.device(),
                    ", got ", t.device());
}

// ----------------------------------------------------------------------------- selection

// The scores of a selection: a non-empty list of non-empty tensors of one dtype on one device.
inline void check_select_scores(at::TensorList scores, const char* op, at::DeviceType device) {
  TORCH_CHECK_VALUE(!scores.empty(), op, ": scores is an empty list");
  for (size_t i = 0; i < scores.size(); ++i) {
    const std::string name = "scores[" + std::to_string(i) + "]";
    check_float(scores[i], name.c_str(), op, device);
    check_same_device(scores[i], name.c_str(), scores[0], "scores[0]", op);
    TORCH_CHECK_TYPE(scores[i].scalar_type() == scores[0].scalar_type(), op, ": ", name, " has dtype ",
                     scores[i].scalar_type(), " but scores[0] has ", scores[0].scalar_type());
    TORCH_CHECK_VALUE(scores[i].numel() > 0, op, ": ", name, " is empty");
  }
}

// Element count of each problem: one over all tensors, or one per tensor when batched; each k in
// [1, count] and each count at most max_count.
inline std::vector<int64_t> check_ks(at::TensorList scores, at::IntArrayRef ks, bool batched, const char* op,
                                     int64_t max_count = std::numeric_limits<int64_t>::max()) {
  const size_t problems = batched ? scores.size() : 1;
  TORCH_CHECK_VALUE(ks.size() == problems, op, ": ks has ", ks.size(), " entries for ", problems, " problem(s)");
  std::vector<int64_t> count(problems, 0);
  for (size_t i = 0; i < scores.size(); ++i) count[batched ? i : 0] += scores[i].numel();
  for (size_t p = 0; p < problems; ++p) {
    const char* name = batched ? "ks" : "k";
    TORCH_CHECK_VALUE(ks[p] >= 1 && ks[p] <= count[p], op, ": ", name, batched ? "[" + std::to_string(p) + "]" : "",
                      " must be in [1, ", count[p], "] (the number of scores), got ", ks[p]);
    TORCH_CHECK_VALUE(count[p] <= max_count, op, ": problem ", p, " has ", count[p], " scores; at most ", max_count,
                      " on this device");
  }
  return count;
}

// hint(s): one value per problem, any float dtype and device (converted; it only steers the search).
inline void check_hints(const std::optional<at::Tensor>& hints, size_t problems, const char* name, const char* op) {
  if (!hints) return;
  TORCH_CHECK_TYPE(hints->defined(), op, ": ", name, " is an undefined tensor");
  TORCH_CHECK_TYPE(is_float(hints->scalar_type()), op, ": ", name, " must be a float tensor, got ",
                   hints->scalar_type());
  TORCH_CHECK_VALUE(hints->numel() == static_cast<int64_t>(problems), op, ": ", name, " must have ", problems,
                    " element(s), got shape ", hints->sizes());
}

// A selection (thr, cut): one value each, thr in the scores' dtype, cut int64, on the scores' device.
inline void check_selection(const at::Tensor& scores, const at::Tensor& thr, const at::Tensor& cut, const char* op) {
  TORCH_CHECK_TYPE(thr.defined() && cut.defined(), op, ": thr and cut must be defined tensors");
  TORCH_CHECK_TYPE(thr.numel() == 1, op, ": thr must be a one-element tensor, got shape ", thr.sizes());
  TORCH_CHECK_TYPE(cut.numel() == 1, op, ": cut must be a one-element tensor, got shape ", cut.sizes());
  TORCH_CHECK_TYPE(thr.scalar_type() == scores.scalar_type(), op, ": thr must have the scores' dtype ",
                   scores.scalar_type(), ", got ", thr.scalar_type());
  TORCH_CHECK_TYPE(cut.scalar_type() == at::kLong, op, ": cut must be int64, got ", cut.scalar_type());
  TORCH_CHECK_VALUE(thr.device() == scores.device() && cut.device() == scores.device(), op,
                    ": thr and cut must be on the scores' device ", scores.device(), ", got ", thr.device(), " and ",
                    cut.device());
}

// keep_mask's operands.
inline void check_keep_mask(const at::Tensor& scores, const at::Tensor& thr, const at::Tensor& cut, const char* op,
                            at::DeviceType device) {
  check_float(scores, "scores", op, device);
  check_selection(scores, thr, cut, op);
}

// Raw bits of +inf in a float dtype, zero-extended: the selects' finiteness check (finite_keys in
// csrc/select_bracket.h) derives the key range of finite scores from it.
inline uint64_t inf_bits(at::ScalarType dtype) {
  switch (dtype) {
    case at::kFloat: return 0x7F800000u;
    case at::kDouble: return 0x7FF0000000000000u;
    case at::kHalf: return 0x7C00u;
    case at::kBFloat16: return 0x7F80u;
    default: TORCH_CHECK(false, "inf_bits: not a float dtype: ", dtype);
  }
}

// A fused pass found a NaN or an inf in `t` (scores or thr): a ValueError with
// bise_kernels/_checks.py::check_finite's message, naming a bad value as it does (NaN if any, else
// -inf if any, else inf). Only on the error path, so its extra reads cost nothing.
[[noreturn]] inline void fail_non_finite(const at::Tensor& t, const char* name) {
  const double inf = std::numeric_limits<double>::infinity();
  const double bad = at::isnan(t).any().item<bool>() ? std::numeric_limits<double>::quiet_NaN()
                     : at::eq(t, -inf).any().item<bool>() ? -inf
                                                          : inf;
  C10_THROW_ERROR(ValueError, c10::str(name, " contains non-finite values (e.g. ", bad,
                                       "); NaN and inf are not allowed"));
}

// The finiteness check of a pass that does not run because it has nothing to write (an empty
// weight or keep mask: its kernel is not launched), made here so that the op fails as its CPU
// implementation does. Reads the device value (a host sync), only in that degenerate case.
inline void check_finite_unlaunched(const at::Tensor& t, const char* name) {
  if (t.numel() > 0 && !at::isfinite(t).all().item<bool>()) fail_non_finite(t, name);
}

// The same for the selects, whose pass over a list found one: names the op and the first tensor
// holding one ("scores" for a single tensor, else "scores[i]").
[[noreturn]] inline void fail_non_finite(at::TensorList scores, const char* op) {
  for (size_t i = 0; i < scores.size(); ++i) {
    if (scores[i].isfinite().all().item<bool>()) continue;
    const std::string name = scores.size() == 1 ? "scores" : "scores[" + std::to_string(i) + "]";
    fail_non_finite(scores[i], c10::str(op, ": ", name).c_str());
  }
  TORCH_CHECK(false, op, ": internal error: a non-finite key flagged in finite scores");
}

// ----------------------------------------------------------------------------- masked layers

// `t` (scores or a keep mask) of weight's shape or one per output unit ((out,)); returns the latter.
inline bool check_weight_shaped(const at::Tensor& weight, const at::Tensor& t, const char* name, const char* op) {
  TORCH_CHECK_VALUE(weight.dim() >= 1, op, ": weight must have at least one dimension, got shape ", weight.sizes());
  const bool per_unit = t.dim() == 1 && weight.dim() > 1 && t.size(0) == weight.size(0);
  TORCH_CHECK_VALUE(per_unit || t.sizes() == weight.sizes(), op, ": ", name, " must have weight's shape ",
                    weight.sizes(), " or (", weight.size(0), ",), got ", t.sizes());
  return per_unit;
}

// A masked layer's operands; returns whether the scores are per output unit ((out,)).
inline bool check_layer(const at::Tensor& weight, const at::Tensor& scores, const at::Tensor& thr,
                        const at::Tensor& cut, const char* op, at::DeviceType device) {
  check_float(weight, "weight", op, device);
  check_float(scores, "scores", op, device);
  check_same_device(scores, "scores", weight, "weight", op);
  check_selection(scores, thr, cut, op);
  return check_weight_shaped(weight, scores, "scores", op);
}

// grad_w_eff of masked_score_grad: like weight and contiguous, since it is masked in place.
inline void check_grad_w_eff(const at::Tensor& grad_w_eff, const at::Tensor& weight, const char* op,
                             at::DeviceType device) {
  check_device(grad_w_eff, "grad_w_eff", op, device);
  check_same_device(grad_w_eff, "grad_w_eff", weight, "weight", op);
  TORCH_CHECK_TYPE(grad_w_eff.scalar_type() == weight.scalar_type(), op, ": grad_w_eff has dtype ",
                   grad_w_eff.scalar_type(), " but weight has ", weight.scalar_type());
  TORCH_CHECK_VALUE(grad_w_eff.sizes() == weight.sizes(), op, ": grad_w_eff must have weight's shape ",
                    weight.sizes(), ", got ", grad_w_eff.sizes());
  TORCH_CHECK_VALUE(grad_w_eff.is_contiguous(), op,
                    ": grad_w_eff must be contiguous (it is masked in place), got strides ", grad_w_eff.strides());
}

// The estimator of the score gradient: "ste" or "sigmoid" with a positive finite temperature.
inline void check_estimator(const std::string& estimator, double temperature, const char* op) {
  TORCH_CHECK_VALUE(estimator == "ste" || estimator == "sigmoid", op, ": estimator must be 'ste' or 'sigmoid', got '",
                    estimator, "'");
  TORCH_CHECK_VALUE(temperature > 0 && std::isfinite(temperature), op,
                    ": temperature must be a positive finite float, got ", temperature);
}

// masked_score_grad's operands: the layer, grad_w_eff and the estimator; returns per_unit.
inline bool check_score_grad(const at::Tensor& grad_w_eff, const at::Tensor& weight, const at::Tensor& scores,
                             const at::Tensor& thr, const at::Tensor& cut, const std::string& estimator,
                             double temperature, const char* op, at::DeviceType device) {
  const bool per_unit = check_layer(weight, scores, thr, cut, op, device);
  check_grad_w_eff(grad_w_eff, weight, op, device);
  check_estimator(estimator, temperature, op);
  return per_unit;
}

// A keep mask of a masked layer (the selection packed once; keep_weight / keep_score_grad in
// csrc/cpu/masked.cpp, csrc/cuda/masked.cu): bool, of weight's shape or (out,), on weight's device;
// returns whether it is per output unit.
inline bool check_keep_layer(const at::Tensor& weight, const at::Tensor& keep, const char* op,
                             at::DeviceType device) {
  check_float(weight, "weight", op, device);
  check_device(keep, "keep", op, device);
  check_same_device(keep, "keep", weight, "weight", op);
  TORCH_CHECK_TYPE(keep.scalar_type() == at::kBool, op, ": keep must be a bool tensor, got ", keep.scalar_type());
  return check_weight_shaped(weight, keep, "keep", op);
}

// keep_score_grad's operands: the layer and its keep mask, scores of keep's shape, grad_w_eff and
// the estimator; returns per_unit.
inline bool check_keep_score_grad(const at::Tensor& grad_w_eff, const at::Tensor& weight, const at::Tensor& scores,
                                  const at::Tensor& keep, const std::string& estimator, double temperature,
                                  const char* op, at::DeviceType device) {
  const bool per_unit = check_keep_layer(weight, keep, op, device);
  check_float(scores, "scores", op, device);
  check_same_device(scores, "scores", weight, "weight", op);
  TORCH_CHECK_VALUE(scores.sizes() == keep.sizes(), op, ": scores must have keep's shape ", keep.sizes(), ", got ",
                    scores.sizes());
  check_grad_w_eff(grad_w_eff, weight, op, device);
  check_estimator(estimator, temperature, op);
  return per_unit;
}

// A checked masked layer as the kernels index it: weight and scores contiguous, `rows` rows of
// `row_len` weights (n in all), per_unit when the scores are one per row.
struct LayerOperands {
  at::Tensor weight, scores;
  bool per_unit;
  int64_t n, rows, row_len;
};

inline LayerOperands layer_operands(const at::Tensor& weight, const at::Tensor& scores, bool per_unit) {
  const at::Tensor w = weight.contiguous();
  const int64_t n = w.numel(), rows = w.size(0);
  return {w, scores.contiguous(), per_unit, n, rows, rows > 0 ? n / rows : 0};
}

// ----------------------------------------------------------------------------- channel gate

// A channel gate's operands; returns dim wrapped to [0, x.dim()).
inline int64_t check_gate(const at::Tensor& x, const at::Tensor& scores, const at::Tensor& thr, const at::Tensor& cut,
                          int64_t dim, const char* op, at::DeviceType device) {
  check_float(x, "x", op, device);
  check_float(scores, "scores", op, device);
  check_same_device(scores, "scores", x, "x", op);
  check_selection(scores, thr, cut, op);
  TORCH_CHECK_VALUE(x.dim() >= 1, op, ": x must have at least one dimension, got shape ", x.sizes());
  TORCH_CHECK_VALUE(dim >= -x.dim() && dim < x.dim(), op, ": dim must be in [", -x.dim(), ", ", x.dim() - 1,
                    "], got ", dim);
  dim = dim < 0 ? dim + x.dim() : dim;
  TORCH_CHECK_VALUE(scores.dim() == 1 && scores.size(0) == x.size(dim), op, ": scores must have shape (", x.size(dim),
                    ",) (x.shape[", dim, "]), got ", scores.sizes());
  return dim;
}

// The output gradient of a backward: on x's device, of x's dtype, of `shape` (`what` names it).
inline void check_grad_y(const at::Tensor& grad_y, const at::Tensor& x, at::IntArrayRef shape, const char* what,
                         const char* op) {
  check_same_device(grad_y, "grad_y", x, "x", op);
  TORCH_CHECK_TYPE(grad_y.scalar_type() == x.scalar_type(), op, ": grad_y has dtype ", grad_y.scalar_type(),
                   " but x has ", x.scalar_type());
  TORCH_CHECK_VALUE(grad_y.sizes() == shape, op, ": grad_y must have ", what, " ", shape, ", got ", grad_y.sizes());
}

// The channel gate's: x's shape, on this implementation's device.
inline void check_grad_y(const at::Tensor& grad_y, const at::Tensor& x, const char* op, at::DeviceType device) {
  check_device(grad_y, "grad_y", op, device);
  check_grad_y(grad_y, x, x.sizes(), "x's shape", op);
}

// channel_gate_backward's operands: the gate, grad_y and the estimator; returns dim wrapped.
inline int64_t check_gate_backward(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& scores,
                                   const at::Tensor& thr, const at::Tensor& cut, int64_t dim,
                                   const std::string& estimator, double temperature, const char* op,
                                   at::DeviceType device) {
  dim = check_gate(x, scores, thr, cut, dim, op, device);
  check_grad_y(grad_y, x, op, device);
  check_estimator(estimator, temperature, op);
  return dim;
}

// x of a channel gate viewed in memory order as (outer, C, inner): contiguous for any dim, or
// channels_last for dim 1 (inner = 1); any other layout is made contiguous first. The kernels
// index x, grad_y, y and grad_x of this view only through these extents.
struct GateLayout {
  at::Tensor x;  // x itself, or a contiguous copy
  at::MemoryFormat format;
  int64_t outer, channels, inner;
};

inline GateLayout gate_layout(const at::Tensor& x, int64_t dim) {
  const int64_t channels = x.size(dim);
  if (dim == 1 && !x.is_contiguous()) {
    for (auto format : {at::MemoryFormat::ChannelsLast, at::MemoryFormat::ChannelsLast3d}) {
      const int64_t rank = format == at::MemoryFormat::ChannelsLast ? 4 : 5;
      if (x.dim() == rank && x.is_contiguous(format) && x.is_non_overlapping_and_dense())
        return {x, format, channels > 0 ? x.numel() / channels : 0, channels, 1};
    }
  }
  int64_t outer = 1, inner = 1;
  for (int64_t d = 0; d < dim; ++d) outer *= x.size(d);
  for (int64_t d = dim + 1; d < x.dim(); ++d) inner *= x.size(d);
  return {x.contiguous(), at::MemoryFormat::Contiguous, outer, channels, inner};
}

// A checked channel_gate_backward as the kernels index it: x's layout, grad_y in that layout,
// scores contiguous, and the outputs allocated (one not needed comes back empty).
struct GateBackwardOperands {
  GateLayout layout;
  at::Tensor grad_y, scores, grad_x, grad_scores;
};

inline GateBackwardOperands gate_backward_operands(const at::Tensor& grad_y, const at::Tensor& x,
                                                   const at::Tensor& scores, int64_t dim, bool need_x,
                                                   bool need_scores) {
  GateLayout L = gate_layout(x, dim);
  const at::Tensor gy = grad_y.contiguous(L.format), s = scores.contiguous();
  at::Tensor gx = need_x ? at::empty_like(L.x, L.format) : at::empty({0}, x.options());
  at::Tensor gs = need_scores ? at::empty_like(s) : at::empty({0}, s.options());
  return {std::move(L), gy, s, gx, gs};
}

}  // namespace bise_checks
