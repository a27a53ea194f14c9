// Shared by the fused CPU kernels (masked.cpp, gate.cpp): the keep rule of the selection
// (thr, cut), the score slope of the estimators and the two-dtype dispatch. Argument checks:
// csrc/checks.h (shared with the CUDA implementations).
// Semantics are those of bise_kernels/backends/reference.py.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <type_traits>

#define BISE_DISPATCH_FLOAT(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, TYPE, NAME, __VA_ARGS__)

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

// CPU only: reads thr and cut on the host, through their data pointers (checked one-element CPU
// tensors of dtype S and int64, csrc/checks.h): `item()` is a dispatcher call each, ~0.5 us, and a
// masked layer's step reads (thr, cut) three times.
template <typename S>
Keep<S> keep_rule(const at::Tensor& thr, const at::Tensor& cut) {
  return {static_cast<acc_t<S>>(*thr.const_data_ptr<S>()), *cut.const_data_ptr<int64_t>()};
}

// Whether a value (of a math type, acc_t: fp16/bf16 convert exactly, inf and NaN included) is NaN
// or +-inf (all exponent bits set), as an unsigned integer of its size: all ones if so, else 0.
// The fused finiteness check of the mask pass ORs these: an integer compare and OR vectorise with
// SSE2, where a float compare (|v| <= max) made the pass 35% slower and an integer max (SSE4.1)
// 75% (64 K fp32, one thread, a standalone loop: 10.6 us alone, 12.8 with this check, 14.3 and 18.7
// with those).
template <typename A>
struct ExponentBits;
template <>
struct ExponentBits<float> {
  using U = uint32_t;
  static constexpr U kAll = 0x7F800000u;
};
template <>
struct ExponentBits<double> {
  using U = uint64_t;
  static constexpr U kAll = 0x7FF0000000000000ull;
};

template <typename A>
inline typename ExponentBits<A>::U non_finite(A v) {
  using U = typename ExponentBits<A>::U;
  U u;
  static_assert(sizeof(u) == sizeof(v));
  std::memcpy(&u, &v, sizeof(u));
  return (~u & ExponentBits<A>::kAll) == 0 ? static_cast<U>(~U(0)) : U(0);
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
Slope<S> slope_rule(const std::string& estimator, double temperature) {
  return {estimator == "sigmoid", static_cast<acc_t<S>>(temperature)};
}

// body(type_identity<W>, type_identity<S>) for the dtypes of a weight-like tensor and its scores:
// the one dtype dispatch of the masked-layer and gate kernels (dtypes validated by csrc/checks.h).
template <typename F>
void dispatch_value_and_scores(at::ScalarType value, at::ScalarType scores, F&& body) {
  BISE_DISPATCH_FLOAT(value, "bise_kernels_ext", [&] {
    using V = scalar_t;
    BISE_DISPATCH_FLOAT(scores, "bise_kernels_ext",
                        [&] { body(std::type_identity<V>{}, std::type_identity<scalar_t>{}); });
  });
}

}  // namespace bise_cpu
