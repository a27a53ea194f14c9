// The arithmetic of the sampling-bracket select shared by the CPU select (csrc/cpu/select.cpp) and
// the CUDA bracket select (csrc/cuda/select_bracket.cu): order-preserving keys, the sample ranks of
// the cold and warm brackets, the outcome of the fused pass, the radix narrowing of [lo, hi] and the
// key range of finite scores.
// Host and device code alike; torch-free. The CPU select's tests (tests/kernels/test_select_cpp.py)
// cover every function here through the cpp build.
#pragma once

#include <cmath>
#include <cstdint>
#include <type_traits>

#if defined(__CUDACC__)
#define BISE_HD __host__ __device__ __forceinline__
#else
#define BISE_HD inline
#endif

namespace bise_bracket {

constexpr double kSigmas = 5.0;      // cold bracket half-width, in sample standard deviations
constexpr int64_t kWarmShare = 512;  // warm bracket half-width: 1/512 of the sample (>= 16 entries)
constexpr int kDigitBits = 11;       // radix digit of the narrowing passes

template <typename U>
BISE_HD constexpr U sign_bit() {
  return U(U(1) << (sizeof(U) * 8 - 1));
}

// Order-preserving key of a float's bits: larger value -> larger key; -0.0 maps to +0.0's key.
template <typename U>
BISE_HD U to_key(U bits) {
  using S = std::make_signed_t<U>;
  const U mask = U(U(S(bits) >> (sizeof(U) * 8 - 1)) | sign_bit<U>());
  const U key = U(bits ^ mask);
  return U(key + U(key == U(sign_bit<U>() - 1)));
}

template <typename U>
BISE_HD U from_key(U key) {
  return (key & sign_bit<U>()) ? U(key ^ sign_bit<U>()) : U(~key);
}

// The keys of finite scores: key - lo <= span; NaN and +-inf keys lie outside (above the key of
// +inf or at most that of -inf). One subtraction and one compare, as the bracket's "inside" test,
// so the passes that read every score check finiteness on the way. inf_bits: the bits of +inf.
template <typename U>
struct FiniteKeys {
  U lo, span;
};

template <typename U>
BISE_HD FiniteKeys<U> finite_keys(U inf_bits) {
  const U lo = U(to_key(U(inf_bits | sign_bit<U>())) + 1), hi = U(to_key(inf_bits) - 1);
  return {lo, U(hi - lo)};
}

template <typename U>
BISE_HD bool non_finite(U key, FiniteKeys<U> f) {
  return U(key - f.lo) > f.span;
}

// A bracket end as a descending rank (1-based) in a sample of `size` keys, or one of these.
constexpr int64_t kUnbounded = 0;  // no sample key: the extreme key (0 for lo, all ones for hi)
constexpr int64_t kAtHint = -1;    // the hint's own key

struct Ranks {
  int64_t lo, hi;  // lo: rank of the lower end (the larger rank), hi: of the upper end
};

// Cold bracket: the sample order statistics `sigmas` standard deviations either side of rank k
// (of n), plus 4 entries; an end beyond the sample is unbounded.
BISE_HD Ranks cold_ranks(int64_t n, int64_t k, int64_t size, double sigmas) {
  const double p = double(k) / double(n);
  const double q = p * double(size);
  const double margin = sigmas * sqrt(double(size) * p * (1 - p)) + 4;
  const int64_t lo = int64_t(ceil(q + margin)), hi = int64_t(floor(q - margin));
  return {lo <= size ? lo : kUnbounded, hi >= 1 ? hi : kUnbounded};
}

BISE_HD int64_t warm_width(int64_t size) { return size / kWarmShare > 16 ? size / kWarmShare : 16; }

// Warm bracket from the sample keys above (`above`) and below (`below`) the hint: the w-th
// nearest either side; fewer on a side: the extreme sample key there, none: the hint itself.
BISE_HD Ranks warm_ranks(int64_t size, int64_t above, int64_t below) {
  const int64_t w = warm_width(size);
  const int64_t hi = above >= w ? above - w + 1 : (above >= 1 ? 1 : kAtHint);
  const int64_t lo = below >= w ? size - below + w : (below >= 1 ? size : kAtHint);
  return {lo, hi};
}

// Whether the hint lies inside the cold bracket `cold` (sample terms, counts as in warm_ranks).
BISE_HD bool hint_in(Ranks cold, int64_t size, int64_t above, int64_t below) {
  return (cold.lo == kUnbounded || above < cold.lo) && (cold.hi == kUnbounded || below <= size - cold.hi);
}

// Whether a fused pass that found `above` keys over the bracket and `inside` keys in it holds
// rank k (1-based, descending).
BISE_HD bool hits(int64_t above, int64_t inside, int64_t k) { return above < k && k <= above + inside; }

// Candidate buffer entries to reserve for a bracket of a sample of `size` keys over n: 1.5x the
// expected count of the wider of the cold and warm brackets, plus 1024, at most n.
BISE_HD int64_t buffer_capacity(int64_t n, int64_t k, int64_t size) {
  const Ranks cold = cold_ranks(n, k, size, kSigmas);
  const int64_t lo = cold.lo == kUnbounded ? size : cold.lo, hi = cold.hi == kUnbounded ? 1 : cold.hi;
  const int64_t width = lo - hi + 1 > 2 * warm_width(size) + 2 ? lo - hi + 1 : 2 * warm_width(size) + 2;
  const double want = 1.5 * double(n) * double(width) / double(size) + 1024;
  return want < double(n) ? int64_t(want) : n;
}

// One radix narrowing step of [lo, hi] (lo < hi): the shift of the digit (key - lo) >> shift,
// which has at most 2^kDigitBits values, and the sub-range of digit d.
template <typename U>
BISE_HD int digit_shift(U lo, U hi) {
  const U span = U(hi - lo);
  int width = 0;
  for (U s = span; s != 0; s = U(s >> 1)) ++width;
  return width > kDigitBits ? width - kDigitBits : 0;
}

template <typename U>
BISE_HD void narrow(U& lo, U& hi, uint64_t digit, int shift) {
  const U a = U(lo + U(U(digit) << shift));
  const U w = U((U(1) << shift) - 1);
  hi = U(hi - a) <= w ? hi : U(a + w);
  lo = a;
}

}  // namespace bise_bracket
