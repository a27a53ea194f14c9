// CUDA implementations of topk_select, batched_topk_select and keep_mask (backend "cuda"; schemas
// in csrc/library.cpp) over the radix select of select.cu or the bracket select of
// select_bracket.cu: validates with the checks shared with the CPU implementations
// (csrc/checks.h), builds the chunk table, takes the workspace from torch's caching allocator and
// launches on the current stream. The chunk table, ks and buffer offsets reach the device once per
// distinct set of tensors (cached_plan); otherwise nothing waits for the device.
//
// The kernels' first pass over the scores asserts on NaN / inf on the device (BISE_DEVICE_CHECK,
// csrc/cuda/device_check.cuh): the op's finiteness check, with no extra read of the scores, no
// extra launch and no host synchronisation.
//
// The environment variable BISE_SELECT_CUDA, read at every call, picks the algorithm: "radix"
// (the default, also when unset or empty), "bracket", and for tests "bracket-miss" (every bracket
// misses) and "bracket-overflow" (no buffer), which force the bracket select's radix fallback.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <mutex>
#include <vector>

#include "../checks.h"
#include "../select_bracket.h"
#include "plan_cache.h"
#include "select.h"

namespace {

using bise_select::kBins;
using bise_select::kCapacity;
using bise_select::kChunk;

// Validated by the shared checks: float64, float32, float16 or bfloat16.
int key_bits_of(at::ScalarType dtype) { return 8 * static_cast<int>(c10::elementSize(dtype)); }

// The keys of finite scores of `dtype`, for the kernels' finiteness check (SelectArgs::finite_lo).
void set_finite_keys(bise_select::SelectArgs& a, at::ScalarType dtype) {
  const uint64_t inf = bise_checks::inf_bits(dtype);
  auto set = [&](auto bits) {
    const auto f = bise_bracket::finite_keys(bits);
    a.finite_lo = f.lo;
    a.finite_span = f.span;
  };
  const int kb = key_bits_of(dtype);
  kb == 64 ? set(inf) : kb == 32 ? set(static_cast<uint32_t>(inf)) : set(static_cast<uint16_t>(inf));
}

at::Tensor to_device(const std::vector<int64_t>& values, const at::Device& device) {
  auto host = at::empty({static_cast<int64_t>(values.size())}, at::TensorOptions().dtype(at::kLong).pinned_memory(true));
  std::copy(values.begin(), values.end(), host.data_ptr<int64_t>());
  return host.to(device, /*non_blocking=*/true);
}

enum class Algo { kRadix, kBracket, kBracketMiss, kBracketOverflow };

Algo algo_from_env() {
  const char* v = std::getenv("BISE_SELECT_CUDA");
  if (v == nullptr || *v == '\0' || std::strcmp(v, "radix") == 0) return Algo::kRadix;
  if (std::strcmp(v, "bracket") == 0) return Algo::kBracket;
  if (std::strcmp(v, "bracket-miss") == 0) return Algo::kBracketMiss;
  if (std::strcmp(v, "bracket-overflow") == 0) return Algo::kBracketOverflow;
  TORCH_CHECK_VALUE(false, "BISE_SELECT_CUDA must be radix, bracket, bracket-miss or bracket-overflow, got '", v, "'");
}

// Per-problem offsets of the bracket select's candidate buffers (csrc/select_bracket.h sizes them).
std::vector<int64_t> buffer_offsets(const std::vector<int64_t>& total, at::IntArrayRef ks) {
  std::vector<int64_t> first(total.size() + 1, 0);
  for (size_t p = 0; p < total.size(); ++p) {
    first[p + 1] = first[p] + bise_bracket::buffer_capacity(total[p], ks[p], bise_select::kSample);
  }
  return first;
}

// The device copies of a chunk table, its per-problem chunk ranges, ks and buffer offsets.
struct Plan {
  at::Tensor table, first, ks, buffers;
};

// A cached Plan and the streams that have read it: its memory was allocated on the first, and is
// recorded for each other one (Tensor::record_stream), so that once evicted it is not reused while
// a kernel on another stream may still read it.
struct CachedPlan {
  Plan plan;
  std::vector<cudaStream_t> streams;
};

// A Plan depends only on the tensors' addresses and sizes, ks and the device, which is the key of
// this cache (plan_cache.h: least recently used out first, room for kMaxPlans layers and kMaxPlanBytes,
// never a Plan read under a CUDA graph capture): a training loop selects the same parameters every step,
// so from the second step on no host-to-device copy is made. That saves four small copies per call and
// lets a CUDA graph capture the selection after one warm-up step (a copy from a pinned host buffer
// would be replayed from an address the host allocator has since reused). A new Plan is copied with
// a blocking copy, so every stream may read it at once. The cache is never destroyed (no CUDA memory
// is freed during process exit).
Plan cached_plan(const std::vector<int64_t>& table, const std::vector<int64_t>& first, at::IntArrayRef ks,
                 const std::vector<int64_t>& buffers, const at::Device& device, const c10::cuda::CUDAStream& stream) {
  static std::mutex mutex;
  static auto* plans = new bise_select::PlanCache<std::vector<int64_t>, CachedPlan>();
  std::vector<int64_t> key = table;
  key.insert(key.end(), first.begin(), first.end());
  key.insert(key.end(), ks.begin(), ks.end());
  key.push_back(device.index());
  const bool capturing = c10::cuda::currentStreamCaptureStatusMayInitCtx() != c10::cuda::CaptureStatus::None;
  const std::lock_guard<std::mutex> lock(mutex);
  const std::size_t bytes = sizeof(int64_t) * (table.size() + first.size() + ks.size() + buffers.size());
  CachedPlan& cached = plans->get(key, capturing, bytes, [&] {
    auto blocking = [&](at::ArrayRef<int64_t> values) { return at::tensor(values, at::kLong).to(device); };
    return CachedPlan{{blocking(table), blocking(first), blocking(ks), blocking(buffers)}, {stream.stream()}};
  });
  if (std::find(cached.streams.begin(), cached.streams.end(), stream.stream()) == cached.streams.end()) {
    for (const at::Tensor* t : {&cached.plan.table, &cached.plan.first, &cached.plan.ks, &cached.plan.buffers}) {
      t->record_stream(stream);
    }
    cached.streams.push_back(stream.stream());
  }
  return cached.plan;
}

void check_cuda(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, what, " failed: ", cudaGetErrorString(err));
}

// The bracket select over the radix select's arguments `a` (its fallback): zeroed workspace and
// candidate buffers ("bracket-overflow": none, so every non-trivial bracket overflows).
void launch_bracket(const bise_select::SelectArgs& a, const Plan& plan, const std::vector<int64_t>& buffers,
                    Algo algo, const at::Device& device, cudaStream_t stream, const char* op,
                    bool* mask, const int64_t* mask_addr) {
  const int64_t P = a.num_problems, C = a.num_chunks;
  const bise_select::BracketWorkspace layout = bise_select::bracket_workspace(P, C, a.key_bits);
  const bool overflow = algo == Algo::kBracketOverflow;
  int64_t capacity = 0, largest = 0;
  for (int64_t p = 0; p < P && !overflow; ++p) {
    largest = std::max(largest, buffers[p + 1] - buffers[p]);
    capacity = buffers[p + 1];
  }
  const int64_t finish_blocks = std::max<int64_t>(1, (largest + bise_select::kFinishPerBlock - 1) / bise_select::kFinishPerBlock);
  TORCH_CHECK_VALUE(finish_blocks * P <= std::numeric_limits<int32_t>::max(), op, ": too many problems for one launch");
  auto ws64 = at::zeros({layout.words64}, at::TensorOptions().dtype(at::kLong).device(device));
  auto ws32 = at::zeros({layout.words32}, at::TensorOptions().dtype(at::kInt).device(device));
  auto keys = at::empty({capacity * layout.key_words}, at::TensorOptions().dtype(at::kInt).device(device));
  auto index = at::empty({capacity}, at::TensorOptions().dtype(at::kInt).device(device));
  auto offsets = overflow ? at::zeros({P + 1}, at::TensorOptions().dtype(at::kLong).device(device)) : plan.buffers;
  int64_t* w64 = ws64.data_ptr<int64_t>();
  int32_t* w32 = ws32.data_ptr<int32_t>();
  bise_select::BracketArgs b{};
  b.radix = a;
  b.ks = plan.ks.const_data_ptr<int64_t>();
  b.buffer_first = offsets.const_data_ptr<int64_t>();
  b.finish_blocks = static_cast<int32_t>(finish_blocks);
  b.force_miss = algo == Algo::kBracketMiss;
  b.buffer_key = keys.data_ptr<int32_t>();
  b.buffer_index = reinterpret_cast<uint32_t*>(index.data_ptr<int32_t>());
  b.mask = mask;
  b.mask_addr = mask_addr;
  bise_select::carve_bracket_workspace(b, w64, w32, layout, P, C);
  check_cuda(bise_bracket_select_launch(&b, stream), op);
}

// One problem per tensor (batched) or one over all tensors (ks has one entry). `masks` (one
// problem): also their keep masks, one per tensor (topk_keep_mask).
std::tuple<at::Tensor, at::Tensor> radix_select_cuda(at::TensorList scores, at::IntArrayRef ks,
                                                     const std::optional<at::Tensor>& hints, bool batched,
                                                     const char* op, std::vector<at::Tensor>* masks = nullptr) {
  bise_checks::check_select_scores(scores, op, at::kCUDA);
  bise_checks::check_ks(scores, ks, batched, op, /*max_count=*/(int64_t{1} << 31) - 1);  // int32 counters
  bise_checks::check_hints(hints, ks.size(), batched ? "hints" : "hint", op);
  const auto dtype = scores[0].scalar_type();
  const auto device = scores[0].device();
  const int key_bits = key_bits_of(dtype);
  const c10::cuda::CUDAGuard guard(device);
  const int64_t P = static_cast<int64_t>(ks.size());
  std::vector<at::Tensor> flat;
  std::vector<int64_t> rows[5];
  std::vector<int64_t> first(P + 1, 0);
  std::vector<int64_t> total(P, 0);
  std::vector<int64_t> mask_rows;  // per chunk: its tensor's keep mask (masks only)
  for (size_t i = 0; i < scores.size(); ++i) {
    const auto& t = scores[i];
    flat.push_back(t.contiguous());
    if (masks) masks->push_back(at::empty(t.sizes(), t.options().dtype(at::kBool)));
    const int64_t p = batched ? static_cast<int64_t>(i) : 0;
    const auto addr = reinterpret_cast<int64_t>(flat.back().data_ptr());
    for (int64_t start = 0; start < t.numel(); start += kChunk) {
      for (auto [row, value] : {std::pair{0, addr}, {1, start}, {2, t.numel()}, {3, total[p]}, {4, p}}) {
        rows[row].push_back(value);
      }
      if (masks) mask_rows.push_back(reinterpret_cast<int64_t>(masks->back().data_ptr()));
    }
    total[p] += t.numel();
    first[p + 1] = static_cast<int64_t>(rows[0].size());
  }
  const int64_t C = static_cast<int64_t>(rows[0].size());
  std::vector<int64_t> table;
  for (auto& row : rows) table.insert(table.end(), row.begin(), row.end());

  const Algo algo = algo_from_env();
  const std::vector<int64_t> buffers = buffer_offsets(total, ks);
  const auto i32 = at::TensorOptions().dtype(at::kInt).device(device);
  const auto i64 = at::TensorOptions().dtype(at::kLong).device(device);
  // Contiguous inputs (the parameters of a model): a cached Plan. Copies made by contiguous() live
  // for this call only: their Plan travels through pinned memory with non-blocking copies.
  const bool cached = std::all_of(scores.begin(), scores.end(), [](const at::Tensor& t) { return t.is_contiguous(); });
  const c10::cuda::CUDAStream current = at::cuda::getCurrentCUDAStream(device.index());
  const Plan plan = cached ? cached_plan(table, first, ks, buffers, device, current)
                           : Plan{to_device(table, device), to_device(first, device),
                                  to_device(std::vector<int64_t>(ks.begin(), ks.end()), device),
                                  to_device(buffers, device)};
  auto krem = plan.ks.clone();  // the radix kernels count it down
  const bise_select::RadixWorkspace layout = bise_select::radix_workspace(P, C, key_bits);
  auto ws = at::zeros({layout.words}, i32);
  // The results: tensors of their own (no view into ws: nothing to copy them out of, no workspace
  // kept alive by a cached threshold); allocated, not filled (no launch).
  auto threshold_bits = at::empty({P * layout.key_words}, i32);
  auto cut = at::empty({P}, i64);
  auto buffer_key = at::empty({P * kCapacity * layout.key_words}, i32);
  auto buffer_index = at::empty({P * kCapacity}, i64);
  std::optional<at::Tensor> hint_flat;
  if (hints) hint_flat = hints->reshape({-1}).to(device, dtype).contiguous();

  int32_t* w = ws.data_ptr<int32_t>();
  bise_select::SelectArgs a{};
  a.table = plan.table.const_data_ptr<int64_t>();
  a.num_chunks = C;
  a.chunk_first = plan.first.const_data_ptr<int64_t>();
  a.num_problems = static_cast<int32_t>(P);
  a.key_bits = key_bits;
  a.hints = hint_flat ? hint_flat->data_ptr() : nullptr;
  bise_select::carve_radix_workspace(a, w, layout, P);
  a.threshold_bits = threshold_bits.data_ptr<int32_t>();
  a.krem = krem.data_ptr<int64_t>();
  a.buffer_key = buffer_key.data_ptr<int32_t>();
  a.buffer_index = buffer_index.data_ptr<int64_t>();
  a.cut = cut.data_ptr<int64_t>();
  a.solved = nullptr;
  set_finite_keys(a, dtype);
  const cudaStream_t stream = current.stream();
  // topk_keep_mask on the bracket select: one tensor's mask is a kernel argument (a CUDA graph
  // replays it). Several tensors' masks are new on every call, so their addresses travel through
  // pinned memory (as the Plan of non-contiguous inputs does): that case is not for CUDA graphs.
  const bool bracket_masks = masks && algo != Algo::kRadix;
  bool* one_mask = bracket_masks && masks->size() == 1 ? (*masks)[0].data_ptr<bool>() : nullptr;
  const at::Tensor mask_addr = bracket_masks && masks->size() > 1 ? to_device(mask_rows, device) : at::Tensor();
  if (algo == Algo::kRadix) {
    check_cuda(bise_radix_select_launch(&a, stream), op);
  } else {
    launch_bracket(a, plan, buffers, algo, device, stream, op,
                   one_mask, mask_addr.defined() ? mask_addr.const_data_ptr<int64_t>() : nullptr);
  }
  auto thr = key_bits == 16 ? threshold_bits.to(at::kShort).view(dtype) : threshold_bits.view(dtype);
  if (masks && algo == Algo::kRadix) {  // the radix select's passes write no mask: a keep_mask pass
    for (size_t i = 0, offset = 0; i < flat.size(); offset += flat[i].numel(), ++i) {
      check_cuda(bise_keep_mask_launch(flat[i].data_ptr(), thr.data_ptr(), cut.const_data_ptr<int64_t>(),
                                       (*masks)[i].data_ptr<bool>(), flat[i].numel(), static_cast<int64_t>(offset),
                                       key_bits, bise_checks::inf_bits(dtype), /*check_finite=*/0, stream),
                 op);  // the select's first pass checked the scores
    }
  }
  return {thr, cut};
}

std::tuple<at::Tensor, at::Tensor> topk_select_cuda(at::TensorList scores, int64_t k,
                                                    const std::optional<at::Tensor>& hint) {
  auto [thr, cut] = radix_select_cuda(scores, {k}, hint, /*batched=*/false, "bise_kernels_ext::topk_select");
  return {thr.reshape({}), cut.reshape({})};
}

std::tuple<at::Tensor, at::Tensor> batched_topk_select_cuda(at::TensorList scores, at::IntArrayRef ks,
                                                            const std::optional<at::Tensor>& hints) {
  return radix_select_cuda(scores, ks, hints, /*batched=*/true, "bise_kernels_ext::batched_topk_select");
}

// topk_select then keep_mask of each tensor; the bracket select writes the masks in its fused
// pass and over its buffer (select_bracket.cu), the radix select in a keep_mask pass after it.
std::vector<at::Tensor> topk_keep_mask_cuda(at::TensorList scores, int64_t k, const std::optional<at::Tensor>& hint) {
  std::vector<at::Tensor> masks;
  radix_select_cuda(scores, {k}, hint, /*batched=*/false, "bise_kernels_ext::topk_keep_mask", &masks);
  return masks;
}

// check_finite: the kernel asserts the scores and thr finite on the device (0 extra launches).
at::Tensor keep_mask_cuda(const at::Tensor& scores, const at::Tensor& thr, const at::Tensor& cut, int64_t offset,
                          bool check_finite) {
  constexpr const char* op = "bise_kernels_ext::keep_mask";
  bise_checks::check_keep_mask(scores, thr, cut, op, at::kCUDA);
  const c10::cuda::CUDAGuard guard(scores.device());
  auto flat = scores.contiguous();
  auto thr_c = thr.reshape({}).contiguous();
  auto cut_c = cut.reshape({}).contiguous();
  if (flat.numel() == 0 && check_finite) bise_checks::check_finite_unlaunched(thr_c, "threshold");  // no kernel runs
  auto out = at::empty(scores.sizes(), scores.options().dtype(at::kBool));
  check_cuda(bise_keep_mask_launch(flat.data_ptr(), thr_c.data_ptr(), cut_c.data_ptr<int64_t>(), out.data_ptr<bool>(),
                                   flat.numel(), offset, key_bits_of(scores.scalar_type()),
                                   bise_checks::inf_bits(scores.scalar_type()), check_finite ? 1 : 0,
                                   at::cuda::getCurrentCUDAStream(scores.device().index()).stream()),
             op);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(bise_kernels_ext, CUDA, m) {
  m.impl("topk_select", &topk_select_cuda);
  m.impl("batched_topk_select", &batched_topk_select_cuda);
  m.impl("keep_mask", &keep_mask_cuda);
  m.impl("topk_keep_mask", &topk_keep_mask_cuda);
}
