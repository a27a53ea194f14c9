// CPU implementations of channel_gate_forward / channel_gate_backward (backend "cpp"): y = x * g
// and, in one pass over the activations, grad_x = grad_y * g together with the per-channel
// reduction sum(grad_y * x). x is read in memory order as the (outer, C, inner) view of
// bise_checks::gate_layout (csrc/checks.h). Reductions accumulate in fp64 per (chunk, channel)
// over chunks fixed by the shape and are summed in chunk order, so results do not depend on thread
// scheduling or on the number of threads.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "../checks.h"
#include "masked_common.h"

namespace bise_cpu {
namespace {

using bise_checks::GateLayout;

constexpr int64_t kGrain = 32768;
constexpr int64_t kMaxTasks = 256;  // gate_reduce's most tasks: 4 per thread of a 64-thread machine

// The 0/1 gate per channel. check_finite: the forward's value check of the scores and thr, fused
// into the loop that reads them (a ValueError naming the argument, as bise_kernels/_checks.py's
// check_finite, which the API then skips); the backward reads the same scores and skips it.
template <typename X, typename S>
std::vector<X> gate_values(const at::Tensor& scores, const at::Tensor& thr, const at::Tensor& cut,
                           bool check_finite) {
  const Keep<S> keep = keep_rule<S>(thr, cut);
  if (check_finite && non_finite(keep.thr)) bise_checks::fail_non_finite(thr, "threshold");
  const S* sp = scores.data_ptr<S>();
  std::vector<X> gate(scores.numel());
  decltype(non_finite(keep.thr)) bad = 0;
  for (int64_t c = 0; c < scores.numel(); ++c) {
    gate[c] = X(keep(sp[c], c) ? 1.0f : 0.0f);
    bad |= non_finite(static_cast<acc_t<S>>(sp[c]));
  }
  if (check_finite && bad) bise_checks::fail_non_finite(scores, "scores");
  return gate;
}

// out[r, i] = in[r, i] * gate[r % C] over the (outer * C, inner) rows.
template <typename X>
void scale_rows(const X* in, X* out, const std::vector<X>& gate, const GateLayout& L) {
  const int64_t C = L.channels, inner = L.inner;
  at::parallel_for(0, L.outer * C, std::max<int64_t>(1, kGrain / inner), [&](int64_t begin, int64_t end) {
    int64_t c = begin % C;
    for (int64_t r = begin; r < end; ++r) {
      const X g = gate[c];
      for (int64_t i = r * inner; i < (r + 1) * inner; ++i) out[i] = in[i] * g;
      if (++c == C) c = 0;
    }
  });
}

at::Tensor channel_gate_forward_cpu(const at::Tensor& x, const at::Tensor& scores, const at::Tensor& thr,
                                    const at::Tensor& cut, int64_t dim) {
  dim = bise_checks::check_gate(x, scores, thr, cut, dim, "bise_kernels_ext::channel_gate_forward", at::kCPU);
  const GateLayout L = bise_checks::gate_layout(x, dim);
  at::Tensor y = at::empty_like(L.x, L.format);
  if (x.numel() == 0) return y;
  const at::Tensor s = scores.contiguous();
  dispatch_value_and_scores(x.scalar_type(), s.scalar_type(), [&](auto x_type, auto s_type) {
    using X = typename decltype(x_type)::type;
    using S = typename decltype(s_type)::type;
    scale_rows<X>(L.x.data_ptr<X>(), y.data_ptr<X>(), gate_values<X, S>(s, thr, cut, true), L);
  });
  return y;
}

// sums[c] = sum over (outer, inner) of gy * x; also writes gx = gy * gate when gx is non-null.
template <typename X>
std::vector<double> gate_reduce(const X* gy, const X* x, X* gx, const std::vector<X>& gate, const GateLayout& L) {
  using A = acc_t<X>;
  const int64_t C = L.channels, inner = L.inner, outer = L.outer;
  // About one task per kGrain elements: the chunks depend on the shape only. They were 4 tasks per
  // thread, and the fp64 sums of float64 data (rounded per chunk) then changed with the thread count.
  const int64_t tasks = std::clamp<int64_t>(outer * C * inner / kGrain, 1, kMaxTasks);
  // Long contiguous runs: one task per (outer chunk, channel); short runs: per outer chunk, all channels.
  const bool per_channel = inner >= 16;
  const int64_t chunks = std::min(outer, per_channel ? std::max<int64_t>(1, (tasks + C - 1) / C) : tasks);
  std::vector<double> partial(chunks * C, 0.0);
  auto run = [&](int64_t k, int64_t c_begin, int64_t c_end) {
    for (int64_t o = k * outer / chunks; o < (k + 1) * outer / chunks; ++o) {
      for (int64_t c = c_begin; c < c_end; ++c) {
        const X g = gate[c];
        A sum = 0;
        for (int64_t i = (o * C + c) * inner; i < (o * C + c + 1) * inner; ++i) {
          sum += static_cast<A>(gy[i]) * static_cast<A>(x[i]);
          if (gx != nullptr) gx[i] = gy[i] * g;
        }
        partial[k * C + c] += static_cast<double>(sum);
      }
    }
  };
  if (per_channel) {
    at::parallel_for(0, chunks * C, 1, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) run(t / C, t % C, t % C + 1);
    });
  } else {
    at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t k = begin; k < end; ++k) run(k, 0, C);
    });
  }
  std::vector<double> sums(C, 0.0);
  for (int64_t k = 0; k < chunks; ++k)
    for (int64_t c = 0; c < C; ++c) sums[c] += partial[k * C + c];
  return sums;
}

std::tuple<at::Tensor, at::Tensor> channel_gate_backward_cpu(const at::Tensor& grad_y, const at::Tensor& x,
                                                             const at::Tensor& scores, const at::Tensor& thr,
                                                             const at::Tensor& cut, int64_t dim, std::string estimator,
                                                             double temperature, bool need_x, bool need_scores) {
  dim = bise_checks::check_gate_backward(grad_y, x, scores, thr, cut, dim, estimator, temperature,
                                         "bise_kernels_ext::channel_gate_backward", at::kCPU);
  const auto [L, gy, s, gx, gs] = bise_checks::gate_backward_operands(grad_y, x, scores, dim, need_x, need_scores);
  dispatch_value_and_scores(x.scalar_type(), s.scalar_type(), [&](auto x_type, auto s_type) {
    using X = typename decltype(x_type)::type;
    using S = typename decltype(s_type)::type;
    const std::vector<X> gate = gate_values<X, S>(s, thr, cut, false);
    if (!need_scores) {
      if (need_x && x.numel() > 0) scale_rows<X>(gy.data_ptr<X>(), gx.data_ptr<X>(), gate, L);
      return;
    }
    const Slope<S> slope = slope_rule<S>(estimator, temperature);
    const std::vector<double> sums =
        x.numel() > 0 ? gate_reduce<X>(gy.data_ptr<X>(), L.x.data_ptr<X>(), need_x ? gx.data_ptr<X>() : nullptr,
                                       gate, L)
                      : std::vector<double>(L.channels, 0.0);
    const S* sp = s.data_ptr<S>();
    S* gsp = gs.data_ptr<S>();
    for (int64_t c = 0; c < L.channels; ++c) gsp[c] = static_cast<S>(static_cast<acc_t<S>>(sums[c]) * slope(sp[c]));
  });
  return {gx, gs};
}

}  // namespace
}  // namespace bise_cpu

TORCH_LIBRARY_IMPL(bise_kernels_ext, CPU, m) {
  m.impl("channel_gate_forward", &bise_cpu::channel_gate_forward_cpu);
  m.impl("channel_gate_backward", &bise_cpu::channel_gate_backward_cpu);
}
