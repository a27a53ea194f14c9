// Shared by the fused CPU kernels (masked.cpp, gate.cpp): the keep rule of the selection
// (thr, cut), the score slope of the estimators, argument checks (also used by the CUDA binding,
// csrc/cuda/masked_binding.cpp) and the two-dtype dispatch.
// Semantics are those of bise_kernels/backends/reference.py.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <string>
#include <type_traits>

namespace bise_cpu {

// Math type: fp64 stays fp64; fp16/bf16/fp32 compute in fp32 (exact for their values).
template <typename T>
using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

// Flat index i with score s is kept iff s > thr or (s == thr and i < cut).
template <typename S>
struct Keep {
  acc_t<S> thr;
  int64_t cut;
  bool operator()(S s, int64_t i) const {
    const acc_t<S> v = static_cast<acc_t<S>>(s);
    return v > thr || (v == thr && i < cut);
  }
};

inline void check_float(const at::Tensor& t, const char* name, const char* op, at::DeviceType device) {
  TORCH_CHECK(t.device().type() == device, op, ": ", name, " must be a ", at::DeviceTypeName(device),
              " tensor, got one on ", t.device());
  const auto type = t.scalar_type();
  TORCH_CHECK(type == at::kFloat || type == at::kDouble || type == at::kHalf || type == at::kBFloat16, op, ": ",
              name, " must be float32/float64/float16/bfloat16, got ", type);
}

// thr (scores' dtype) and cut (int64): one element each, on the scores' device.
inline void check_selection(const at::Tensor& scores, const at::Tensor& thr, const at::Tensor& cut,
                            const char* op) {
  TORCH_CHECK(thr.numel() == 1, op, ": thr must be a one-element tensor, got shape ", thr.sizes());
  TORCH_CHECK(cut.numel() == 1, op, ": cut must be a one-element tensor, got shape ", cut.sizes());
  TORCH_CHECK(thr.scalar_type() == scores.scalar_type(), op, ": thr must have the scores' dtype ",
              scores.scalar_type(), ", got ", thr.scalar_type());
  TORCH_CHECK(cut.scalar_type() == at::kLong, op, ": cut must be int64, got ", cut.scalar_type());
  TORCH_CHECK(thr.device() == scores.device() && cut.device() == scores.device(), op,
              ": thr and cut must be on the scores' device ", scores.device(), ", got ", thr.device(), " and ",
              cut.device());
}

// A masked layer's operands; returns whether the scores are per output unit ((out,)).
inline bool check_layer(const at::Tensor& weight, const at::Tensor& scores, const at::Tensor& thr,
                        const at::Tensor& cut, const char* op, at::DeviceType device) {
  check_float(weight, "weight", op, device);
  check_float(scores, "scores", op, device);
  TORCH_CHECK(scores.device() == weight.device(), op, ": scores are on ", scores.device(), " but weight on ",
              weight.device());
  check_selection(scores, thr, cut, op);
  TORCH_CHECK(weight.dim() >= 1, op, ": weight must have at least one dimension, got shape ", weight.sizes());
  const bool per_unit = scores.dim() == 1 && weight.dim() > 1 && scores.size(0) == weight.size(0);
  TORCH_CHECK(per_unit || scores.sizes() == weight.sizes(), op, ": scores must have weight's shape ",
              weight.sizes(), " or (", weight.size(0), ",), got ", scores.sizes());
  return per_unit;
}

// grad_W_eff of score_grad: like weight and contiguous, since it is masked in place.
inline void check_grad_w_eff(const at::Tensor& grad_w_eff, const at::Tensor& weight, const char* op) {
  TORCH_CHECK(grad_w_eff.sizes() == weight.sizes() && grad_w_eff.scalar_type() == weight.scalar_type() &&
                  grad_w_eff.device() == weight.device(),
              op, ": grad_w_eff must be like weight ", weight.sizes(), " ", weight.scalar_type(), " on ",
              weight.device(), ", got ", grad_w_eff.sizes(), " ", grad_w_eff.scalar_type(), " on ",
              grad_w_eff.device());
  TORCH_CHECK(grad_w_eff.is_contiguous(), op, ": grad_w_eff must be contiguous (it is masked in place)");
}

// A channel gate's operands; returns dim wrapped to [0, x.dim()).
inline int64_t check_gate(const at::Tensor& x, const at::Tensor& scores, const at::Tensor& thr,
                          const at::Tensor& cut, int64_t dim, const char* op, at::DeviceType device) {
  check_float(x, "x", op, device);
  check_float(scores, "scores", op, device);
  TORCH_CHECK(scores.device() == x.device(), op, ": scores are on ", scores.device(), " but x on ", x.device());
  check_selection(scores, thr, cut, op);
  TORCH_CHECK(x.dim() >= 1, op, ": x must have at least one dimension");
  dim = at::maybe_wrap_dim(dim, x.dim());
  TORCH_CHECK(scores.dim() == 1 && scores.size(0) == x.size(dim), op, ": scores must have shape (", x.size(dim),
              ",) (x.shape[", dim, "]), got ", scores.sizes());
  return dim;
}

inline void check_grad_y(const at::Tensor& grad_y, const at::Tensor& x, const char* op) {
  TORCH_CHECK(grad_y.sizes() == x.sizes() && grad_y.scalar_type() == x.scalar_type() && grad_y.device() == x.device(),
              op, ": grad_y must be like x ", x.sizes(), " ", x.scalar_type(), " on ", x.device(), ", got ",
              grad_y.sizes(), " ", grad_y.scalar_type(), " on ", grad_y.device());
}

// CPU only: reads thr and cut on the host.
template <typename S>
Keep<S> keep_rule(const at::Tensor& thr, const at::Tensor& cut) {
  return {static_cast<acc_t<S>>(thr.item<S>()), cut.item<int64_t>()};
}

template <typename A>
inline A sigmoid_slope(A v, A temperature) {
  const A sig = A(1) / (A(1) + std::exp(-(v / temperature)));
  return sig * (A(1) - sig) / temperature;
}

// d gate / d score: 1 for "ste", sigmoid'(s/T)/T for "sigmoid" (the reference's formula).
template <typename S>
struct Slope {
  bool sigmoid;
  acc_t<S> temperature;
  acc_t<S> operator()(S s) const {
    return sigmoid ? sigmoid_slope(static_cast<acc_t<S>>(s), temperature) : acc_t<S>(1);
  }
};

// The keep rule on a sub-range of flat indices all below cut (ties kept) or all from cut on (ties
// dropped): a plain comparison, so loops over such a range vectorise.
template <typename A>
inline bool kept(A v, A thr, bool ties) {
  return (v > thr) | (ties & (v == thr));
}

// body(lo, hi, ties) over [begin, end) split at cut.
template <typename F>
inline void split_at_cut(int64_t begin, int64_t end, int64_t cut, F&& body) {
  const int64_t split = std::clamp(cut, begin, end);
  if (begin < split) body(begin, split, true);
  if (split < end) body(split, end, false);
}

template <typename S>
Slope<S> slope_rule(const std::string& estimator, double temperature, const char* op) {
  TORCH_CHECK(estimator == "ste" || estimator == "sigmoid", op,
              ": estimator must be 'ste' or 'sigmoid', got '", estimator, "'");
  TORCH_CHECK(temperature > 0 && std::isfinite(temperature), op,
              ": temperature must be a positive finite float, got ", temperature);
  return {estimator == "sigmoid", static_cast<acc_t<S>>(temperature)};
}

// x of a channel gate viewed in memory order as (outer, C, inner): contiguous for any dim, or
// channels_last for dim 1 (inner = 1); any other layout is made contiguous first.
struct GateLayout {
  at::Tensor x;  // x itself, or a contiguous copy
  at::MemoryFormat format;
  int64_t outer, channels, inner;
};

inline GateLayout gate_layout(const at::Tensor& x, int64_t dim) {
  const int64_t channels = x.size(dim);
  if (dim == 1 && !x.is_contiguous()) {
    if (x.dim() == 4 && x.is_contiguous(at::MemoryFormat::ChannelsLast))
      return {x, at::MemoryFormat::ChannelsLast, x.numel() / std::max<int64_t>(channels, 1), channels, 1};
    if (x.dim() == 5 && x.is_contiguous(at::MemoryFormat::ChannelsLast3d))
      return {x, at::MemoryFormat::ChannelsLast3d, x.numel() / std::max<int64_t>(channels, 1), channels, 1};
  }
  int64_t outer = 1, inner = 1;
  for (int64_t d = 0; d < dim; ++d) outer *= x.size(d);
  for (int64_t d = dim + 1; d < x.dim(); ++d) inner *= x.size(d);
  return {x.contiguous(), at::MemoryFormat::Contiguous, outer, channels, inner};
}

}  // namespace bise_cpu

#define BISE_DISPATCH_FLOAT(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, TYPE, NAME, __VA_ARGS__)
