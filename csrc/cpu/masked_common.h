// Shared by the fused CPU kernels (masked.cpp, gate.cpp): the keep rule of the selection
// (thr, cut), the score slope of the estimators, argument checks and the two-dtype dispatch.
// Semantics are those of bise_kernels/backends/reference.py.
#pragma once

#include <ATen/ATen.h>

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

inline void check_selection(const at::Tensor& scores, const at::Tensor& thr, const at::Tensor& cut,
                            const char* op) {
  TORCH_CHECK(thr.numel() == 1, op, ": thr must be a one-element tensor, got shape ", thr.sizes());
  TORCH_CHECK(cut.numel() == 1, op, ": cut must be a one-element tensor, got shape ", cut.sizes());
  TORCH_CHECK(thr.scalar_type() == scores.scalar_type(), op, ": thr must have the scores' dtype ",
              scores.scalar_type(), ", got ", thr.scalar_type());
  TORCH_CHECK(cut.scalar_type() == at::kLong, op, ": cut must be int64, got ", cut.scalar_type());
  TORCH_CHECK(scores.device().is_cpu() && thr.device().is_cpu() && cut.device().is_cpu(), op,
              ": scores, thr and cut must be CPU tensors");
}

template <typename S>
Keep<S> keep_rule(const at::Tensor& thr, const at::Tensor& cut) {
  return {static_cast<acc_t<S>>(thr.item<S>()), cut.item<int64_t>()};
}

// d gate / d score: 1 for "ste", sigmoid'(s/T)/T for "sigmoid" (the reference's formula).
template <typename S>
struct Slope {
  bool sigmoid;
  acc_t<S> temperature;
  acc_t<S> operator()(S s) const {
    if (!sigmoid) return acc_t<S>(1);
    const acc_t<S> sig = acc_t<S>(1) / (acc_t<S>(1) + std::exp(-(static_cast<acc_t<S>>(s) / temperature)));
    return sig * (acc_t<S>(1) - sig) / temperature;
  }
};

template <typename S>
Slope<S> slope_rule(const std::string& estimator, double temperature, const char* op) {
  TORCH_CHECK(estimator == "ste" || estimator == "sigmoid", op,
              ": estimator must be 'ste' or 'sigmoid', got '", estimator, "'");
  TORCH_CHECK(temperature > 0 && std::isfinite(temperature), op,
              ": temperature must be a positive finite float, got ", temperature);
  return {estimator == "sigmoid", static_cast<acc_t<S>>(temperature)};
}

inline void check_float_cpu(const at::Tensor& t, const char* name, const char* op) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got ", t.device());
  const auto type = t.scalar_type();
  TORCH_CHECK(type == at::kFloat || type == at::kDouble || type == at::kHalf || type == at::kBFloat16, op, ": ",
              name, " must be float32/float64/float16/bfloat16, got ", type);
}

}  // namespace bise_cpu

#define BISE_DISPATCH_FLOAT(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, TYPE, NAME, __VA_ARGS__)
