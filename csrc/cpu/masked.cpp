// CPU implementations of the fused passes of masked_linear and masked_conv2d (backend "cpp",
// composed with the dense ATen GEMM/conv in bise_kernels/backends/native.py).
//
// masked_weight_cpu: W_eff = W * keep(scores) in one parallel pass, reading scores directly (no
//   bool mask, no indices), for weight-shaped or per-output-unit scores. With check_finite, the
//   same pass checks the scores (and thr) are finite: a ValueError after it if not (the API's
//   check for the native backends, bise_kernels/functional.py; no separate pass over the scores).
//   Without it the OR is computed all the same and ignored (one code path; the backward's recompute).
// masked_score_grad_cpu: one parallel pass over grad_W_eff producing grad_scores = grad_W_eff * W * slope
//   (summed per row for per-unit scores) and, if asked, masking grad_W_eff in place into the
//   weight gradient, so no weight-sized temporary exists beyond grad_W_eff itself.
// keep_weight_cpu / keep_score_grad_cpu: the same two passes reading a bool keep mask (the
//   selection packed once per step) instead of evaluating the rule on the scores.
// Both rules go through one "keep source" per pass (selection_ranges / mask_ranges): for the
// selection, element ranges are split at the tie cut (split_at_cut) so the inner loops are branch-free.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <atomic>
#include <type_traits>

#include "../checks.h"
#include "masked_common.h"

namespace bise_cpu {
namespace {

constexpr int64_t kGrain = 32768;

// 1 or 0 as a weight: a select of two constants, which gcc 12 turns into a vector blend when
// FP compares may not trap (-fno-trapping-math, setup.py); a bool-to-float conversion kept every
// compare-then-multiply loop here scalar (-fopt-info-vec): W_eff of 256x256 fp32 took 42 us on one
// thread where `weight * grad` takes 10 us (benchmarks/bench_masked_overhead.py, docs/masked.md).
template <typename W>
inline W as_weight(bool keep) {
  return static_cast<W>(keep ? 1.0f : 0.0f);
}

// A keep source over flat weight indices: ranges(begin, end, body) calls body(lo, hi, keep_at,
// non_finite_at) on sub-ranges of [begin, end), keep_at(i) being whether weight i is kept and
// non_finite_at(i) whether the value deciding it is NaN or inf (non_finite of a score as acc_t; 0 for a mask).
template <typename S>
auto selection_ranges(const S* sp, const Keep<S>& keep) {
  const acc_t<S> thr = keep.thr;
  const int64_t cut = keep.cut;
  return [=](int64_t begin, int64_t end, auto&& body) {
    split_at_cut(begin, end, cut, [&](int64_t lo, int64_t hi, bool ties) {
      body(
          lo, hi, [=](int64_t i) { return kept(static_cast<acc_t<S>>(sp[i]), thr, ties); },
          [=](int64_t i) { return non_finite(static_cast<acc_t<S>>(sp[i])); });
    });
  };
}

// Read as bytes: gcc vectorises no loop loading a bool (a bool tensor holds 0 or 1 in each byte).
inline auto mask_ranges(const bool* kp) {
  const auto* bytes = reinterpret_cast<const uint8_t*>(kp);
  return [=](int64_t begin, int64_t end, auto&& body) {
    body(begin, end, [=](int64_t i) { return bytes[i] != 0; }, [](int64_t) { return uint8_t{0}; });
  };
}

int64_t rows_grain(int64_t row_len) { return std::max<int64_t>(1, kGrain / std::max<int64_t>(row_len, 1)); }

// out = W * keep; unit_keep(r): the keep of row r (per-unit), ranges: the keep source otherwise.
// Returns whether every value deciding a keep is finite (unit_non_finite(r) per unit, else the
// source's non_finite_at, ORed): the scores' finiteness check, fused into the pass that reads them.
template <typename W, typename UnitKeep, typename UnitNonFinite, typename Ranges>
bool weight_pass(const W* wp, W* outp, const bise_checks::LayerOperands& L, UnitKeep unit_keep,
                 UnitNonFinite unit_non_finite, Ranges ranges) {
  std::atomic<bool> all_finite{true};
  if (L.per_unit) {
    at::parallel_for(0, L.rows, rows_grain(L.row_len), [&](int64_t begin, int64_t end) {
      decltype(unit_non_finite(begin)) bad = 0;
      for (int64_t r = begin; r < end; ++r) {
        bad |= unit_non_finite(r);
        const W k = as_weight<W>(unit_keep(r));
        for (int64_t j = r * L.row_len; j < (r + 1) * L.row_len; ++j) outp[j] = wp[j] * k;
      }
      if (bad) all_finite.store(false, std::memory_order_relaxed);
    });
    return all_finite.load();
  }
  at::parallel_for(0, L.n, kGrain, [&](int64_t begin, int64_t end) {
    ranges(begin, end, [&](int64_t lo, int64_t hi, auto keep_at, auto non_finite_at) {
      decltype(non_finite_at(lo)) bad = 0;
      for (int64_t i = lo; i < hi; ++i) {
        outp[i] = wp[i] * as_weight<W>(keep_at(i));
        bad |= non_finite_at(i);
      }
      if (bad) all_finite.store(false, std::memory_order_relaxed);
    });
  });
  return all_finite.load();
}

at::Tensor masked_weight_cpu(const at::Tensor& weight, const at::Tensor& scores, const at::Tensor& thr,
                             const at::Tensor& cut, bool check_finite) {
  const auto L = bise_checks::layer_operands(
      weight, scores, bise_checks::check_layer(weight, scores, thr, cut, "bise_kernels_ext::masked_weight", at::kCPU));
  at::Tensor out = at::empty_like(L.weight, at::MemoryFormat::Contiguous);
  dispatch_value_and_scores(L.weight.scalar_type(), L.scores.scalar_type(), [&](auto w_type, auto s_type) {
    using W = typename decltype(w_type)::type;
    using S = typename decltype(s_type)::type;
    const Keep<S> keep = keep_rule<S>(thr, cut);
    if (check_finite && non_finite(keep.thr)) bise_checks::fail_non_finite(thr, "threshold");
    const S* sp = L.scores.data_ptr<S>();
    const bool finite = weight_pass(
        L.weight.data_ptr<W>(), out.data_ptr<W>(), L, [&](int64_t r) { return keep(sp[r], r); },
        [&](int64_t r) { return non_finite(static_cast<acc_t<S>>(sp[r])); }, selection_ranges(sp, keep));
    if (check_finite && !finite) bise_checks::fail_non_finite(L.scores, "scores");
  });
  return out;
}

at::Tensor keep_weight_cpu(const at::Tensor& weight, const at::Tensor& keep) {
  const auto L = bise_checks::layer_operands(
      weight, keep, bise_checks::check_keep_layer(weight, keep, "bise_kernels_ext::keep_weight", at::kCPU));
  at::Tensor out = at::empty_like(L.weight, at::MemoryFormat::Contiguous);
  BISE_DISPATCH_FLOAT(L.weight.scalar_type(), "bise_kernels_ext::keep_weight", [&] {
    const bool* kp = L.scores.data_ptr<bool>();
    weight_pass(L.weight.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), L, [&](int64_t r) { return kp[r]; },
                [](int64_t) { return uint8_t{0}; }, mask_ranges(kp));
  });
  return out;
}

// One element range of the weight-shaped score gradient; the flags are compile-time so that each
// combination is a straight loop.
template <bool NeedScores, bool NeedWeight, bool Sigmoid, typename W, typename S, typename KeepAt>
void score_grad_range(W* g, const W* w, const S* s, S* gs, int64_t lo, int64_t hi, acc_t<S> temperature,
                      KeepAt keep_at) {
  for (int64_t i = lo; i < hi; ++i) {
    const W gi = g[i];
    if constexpr (NeedScores) {
      const acc_t<S> gw = static_cast<acc_t<S>>(static_cast<acc_t<W>>(gi) * static_cast<acc_t<W>>(w[i]));
      if constexpr (Sigmoid) {
        gs[i] = static_cast<S>(gw * sigmoid_slope(static_cast<acc_t<S>>(s[i]), temperature));
      } else {
        gs[i] = static_cast<S>(gw);
      }
    }
    if constexpr (NeedWeight) g[i] = gi * as_weight<W>(keep_at(i));
  }
}

// grad_scores (returned) and grad_w_eff masked in place, for one keep source (see weight_pass).
template <typename W, typename S, typename UnitKeep, typename Ranges>
void score_grad_pass(W* gp, const W* wp, const S* sp, S* gsp, const bise_checks::LayerOperands& L,
                     const Slope<S>& slope, bool need_scores, bool need_weight, UnitKeep unit_keep, Ranges ranges) {
  if (L.per_unit) {
    at::parallel_for(0, L.rows, rows_grain(L.row_len), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const W k = as_weight<W>(unit_keep(r));
        double sum = 0;
        for (int64_t j = r * L.row_len; j < (r + 1) * L.row_len; ++j) {
          const W g = gp[j];
          sum += static_cast<double>(static_cast<acc_t<W>>(g) * static_cast<acc_t<W>>(wp[j]));
          if (need_weight) gp[j] = g * k;
        }
        if (need_scores) gsp[r] = static_cast<S>(static_cast<acc_t<S>>(sum) * slope(sp[r]));
      }
    });
    return;
  }
  auto run = [&](auto need_s, auto need_w, auto sigmoid) {
    at::parallel_for(0, L.n, kGrain, [&](int64_t begin, int64_t end) {
      ranges(begin, end, [&](int64_t lo, int64_t hi, auto keep_at, auto) {
        score_grad_range<decltype(need_s)::value, decltype(need_w)::value, decltype(sigmoid)::value>(
            gp, wp, sp, gsp, lo, hi, slope.temperature, keep_at);
      });
    });
  };
  using T = std::true_type;
  using F = std::false_type;
  if (!need_scores) {
    if (need_weight) run(F{}, T{}, F{});
  } else if (slope.sigmoid) {
    need_weight ? run(T{}, T{}, T{}) : run(T{}, F{}, T{});
  } else {
    need_weight ? run(T{}, T{}, F{}) : run(T{}, F{}, F{});
  }
}

at::Tensor masked_score_grad_cpu(const at::Tensor& grad_w_eff, const at::Tensor& weight, const at::Tensor& scores,
                                 const at::Tensor& thr, const at::Tensor& cut, std::string estimator,
                                 double temperature, bool need_scores, bool need_weight) {
  const auto L = bise_checks::layer_operands(
      weight, scores,
      bise_checks::check_score_grad(grad_w_eff, weight, scores, thr, cut, estimator, temperature,
                                    "bise_kernels_ext::masked_score_grad", at::kCPU));
  at::Tensor gs =
      need_scores ? at::empty_like(L.scores, at::MemoryFormat::Contiguous) : at::empty({0}, L.scores.options());
  dispatch_value_and_scores(L.weight.scalar_type(), L.scores.scalar_type(), [&](auto w_type, auto s_type) {
    using W = typename decltype(w_type)::type;
    using S = typename decltype(s_type)::type;
    const Keep<S> keep = keep_rule<S>(thr, cut);
    const S* sp = L.scores.data_ptr<S>();
    score_grad_pass(grad_w_eff.data_ptr<W>(), L.weight.data_ptr<W>(), sp, need_scores ? gs.data_ptr<S>() : nullptr,
                    L, slope_rule<S>(estimator, temperature), need_scores, need_weight,
                    [&](int64_t r) { return keep(sp[r], r); }, selection_ranges(sp, keep));
  });
  return gs;
}

at::Tensor keep_score_grad_cpu(const at::Tensor& grad_w_eff, const at::Tensor& weight, const at::Tensor& scores,
                               const at::Tensor& keep, std::string estimator, double temperature, bool need_scores,
                               bool need_weight) {
  const bool per_unit = bise_checks::check_keep_score_grad(grad_w_eff, weight, scores, keep, estimator, temperature,
                                                           "bise_kernels_ext::keep_score_grad", at::kCPU);
  const auto L = bise_checks::layer_operands(weight, scores, per_unit);
  const at::Tensor k = keep.contiguous();
  at::Tensor gs =
      need_scores ? at::empty_like(L.scores, at::MemoryFormat::Contiguous) : at::empty({0}, L.scores.options());
  dispatch_value_and_scores(L.weight.scalar_type(), L.scores.scalar_type(), [&](auto w_type, auto s_type) {
    using W = typename decltype(w_type)::type;
    using S = typename decltype(s_type)::type;
    const bool* kp = k.data_ptr<bool>();
    score_grad_pass(grad_w_eff.data_ptr<W>(), L.weight.data_ptr<W>(), L.scores.data_ptr<S>(),
                    need_scores ? gs.data_ptr<S>() : nullptr, L, slope_rule<S>(estimator, temperature), need_scores,
                    need_weight, [&](int64_t r) { return kp[r]; }, mask_ranges(kp));
  });
  return gs;
}

}  // namespace
}  // namespace bise_cpu

TORCH_LIBRARY_IMPL(bise_kernels_ext, CPU, m) {
  m.impl("masked_weight", &bise_cpu::masked_weight_cpu);
  m.impl("masked_score_grad", &bise_cpu::masked_score_grad_cpu);
  m.impl("keep_weight", &bise_cpu::keep_weight_cpu);
  m.impl("keep_score_grad", &bise_cpu::keep_score_grad_cpu);
}
