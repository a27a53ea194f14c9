// Exact top-k selection on CUDA in about one read: the sampling bracket of the CPU select
// (csrc/cpu/select.cpp; arithmetic shared through csrc/select_bracket.h), for every problem of a
// chunk table in one launch sequence, without host synchronisation:
//
// 1. sample_kernel (one block per problem): 16384 stratified sample keys (a binary search of the
//    chunk table per thread where a problem spans several tensors); the cold bracket
//    [lo, hi] is the sample order statistics 5 standard deviations either side of rank k; a hint
//    inside it gives the narrower warm bracket (32 sample keys either side of the hint).
// 2. fused_kernel (one block per chunk, 128-bit loads): counts the keys above hi and inside
//    [lo, hi], per problem and per chunk, and appends the keys inside (key, flat index) to the
//    problem's buffer (warp-aggregated atomics). A single-value bracket only counts. It also
//    asserts on a NaN or inf key (check_finite_scores): the op's finiteness check.
// 3. finish_level_kernel (levels<KB>() launches over the buffers): where the bracket holds rank k
//    and the buffer did not overflow, radix narrowing of [lo, hi] by 11-bit digits of key - lo,
//    the last block of a problem (ticket) picking the digit, until lo == hi = the threshold.
// 4. finish_tie_kernel: counts the threshold's ties per chunk from the buffer (or takes the
//    chunk counts of a single-value bracket); the problem's last block finds the cut by scanning
//    one chunk, writes thr and cut and marks the problem solved.
// 5. the radix select (select.cu) runs for the problems not solved (bracket missed, buffer
//    overflowed): its kernels exit at once for solved problems.
// 6. topk_keep_mask only (mask_of): the fused pass also wrote mask = key > hi; mask_inside_kernel
//    sets the buffered entries of buffered problems, mask_rest_kernel every entry of the others.
// Every block of a later kernel decides a problem's path from the counts of the earlier ones
// (outcome()), so no flag needs a host round trip.
#include <cub/block/block_reduce.cuh>

#include "select_common.cuh"

namespace bise_select {
namespace {

constexpr int kSamplePer = kSample / kThreads;
static_assert(kSample % kThreads == 0, "sample keys are spread evenly over the threads");

using bise_bracket::kAtHint;
using bise_bracket::kUnbounded;

__device__ __forceinline__ uint64_t mix(uint64_t z) {  // splitmix64's finaliser
  z += 0x9e3779b97f4a7c15ull;
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

// The number of scores of problem p: the flat end of its last chunk.
__device__ __forceinline__ int64_t problem_size(const SelectArgs& a, int p) {
  const Chunk ch = load_chunk(a, a.chunk_first[p + 1] - 1);
  return ch.base + ch.end;
}

// The chunk of problem p holding flat index f (binary search over the chunks' flat starts).
__device__ __forceinline__ int64_t chunk_of(const SelectArgs& a, int p, int64_t f) {
  const int64_t C = a.num_chunks;
  int64_t lo = a.chunk_first[p], hi = a.chunk_first[p + 1];
  while (hi - lo > 1) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (a.table[3 * C + mid] + a.table[C + mid] <= f) {
      lo = mid;
    } else {
      hi = mid;
    }
  }
  return lo;
}

// topk_keep_mask: the keep mask of chunk c's tensor (indexed like the tensor), or nullptr: no masks.
__device__ __forceinline__ bool* mask_of(const BracketArgs& b, int64_t c) {
  if (b.mask != nullptr) return b.mask;  // one tensor
  return b.mask_addr != nullptr ? reinterpret_cast<bool*>(b.mask_addr[c]) : nullptr;
}

enum class Outcome { kMissed, kSingle, kBuffered };

// What the fused pass left for problem p: a bracket that misses rank k or whose buffer overflowed
// goes to the radix select; a single-value bracket is the threshold; else the buffer finishes.
template <int KB>
__device__ __forceinline__ Outcome outcome(const BracketArgs& b, int p) {
  const auto above = static_cast<int64_t>(b.above[p]), inside = static_cast<int64_t>(b.inside[p]);
  if (!bise_bracket::hits(above, inside, b.ks[p])) return Outcome::kMissed;
  if (keys<KB>(b.lo)[p] == keys<KB>(b.hi)[p]) return Outcome::kSingle;
  return b.buffer_count[p] <= b.buffer_first[p + 1] - b.buffer_first[p] ? Outcome::kBuffered : Outcome::kMissed;
}

template <int KB>
__global__ void __launch_bounds__(kThreads) sample_kernel(BracketArgs b) {
  using Reduce = cub::BlockReduce<int64_t, kThreads>;
  __shared__ typename Reduce::TempStorage red;
  __shared__ uint32_t hist[2][kBins];
  __shared__ int64_t counts[2];
  const SelectArgs& a = b.radix;
  const int p = blockIdx.x;
  const int64_t C = a.num_chunks, n = problem_size(a, p), k = b.ks[p];
  const int64_t first = a.chunk_first[p], last = a.chunk_first[p + 1];
  // One tensor (its chunks share the flat offset): flat index = index in the tensor, no search.
  const bool one_tensor = a.table[3 * C + first] == a.table[3 * C + last - 1];
  Key<KB> sample[kSamplePer];
  int64_t c = first;
#pragma unroll
  for (int j = 0; j < kSamplePer; ++j) {
    // Stratified: sample s lies in [s n / kSample, (s + 1) n / kSample). A thread's samples are
    // consecutive strata, so after one binary search its chunk only moves forward.
    const int64_t s = static_cast<int64_t>(threadIdx.x) * kSamplePer + j;
    const int64_t f = (s * n + static_cast<int64_t>(mix(static_cast<uint64_t>(s)) % static_cast<uint64_t>(n))) / kSample;
    if (!one_tensor) {
      if (j == 0) {
        c = chunk_of(a, p, f);
      } else {
        while (c + 1 < last && a.table[3 * C + c + 1] + a.table[C + c + 1] <= f) ++c;
      }
    }
    sample[j] = key_at<KB>(reinterpret_cast<const void*>(a.table[c]), f - a.table[3 * C + c]);
  }
  bise_bracket::Ranks r = bise_bracket::cold_ranks(n, k, kSample, bise_bracket::kSigmas);
  Key<KB> hint_key = 0;
  if (a.hints != nullptr) {
    hint_key = to_key<KB>(static_cast<const typename Raw<KB>::type*>(a.hints)[p]);
    int64_t above = 0, below = 0;
#pragma unroll
    for (int j = 0; j < kSamplePer; ++j) {
      above += sample[j] > hint_key;
      below += sample[j] < hint_key;
    }
    above = Reduce(red).Sum(above);
    __syncthreads();
    below = Reduce(red).Sum(below);
    if (threadIdx.x == 0) {
      counts[0] = above;
      counts[1] = below;
    }
    __syncthreads();
    if (bise_bracket::hint_in(r, kSample, counts[0], counts[1])) r = bise_bracket::warm_ranks(kSample, counts[0], counts[1]);
  }
  // Both ends at once: MSB-first digits, one shared histogram per end (ranks are block-uniform).
  const int64_t ranks[2] = {r.lo, r.hi};
  int64_t want[2] = {r.lo, r.hi};
  Key<KB> prefix[2] = {0, 0};
  for (int l = 0; l < levels<KB>(); ++l) {
    for (int i = threadIdx.x; i < 2 * kBins; i += kThreads) hist[i / kBins][i % kBins] = 0;
    __syncthreads();
#pragma unroll
    for (int j = 0; j < kSamplePer; ++j) {
#pragma unroll
      for (int t = 0; t < 2; ++t) {
        if (ranks[t] >= 1) {
          count_bin(hist[t], matches(sample[j], prefix[t], level_hi(KB, l)), digit_of(sample[j], KB, l));
        }
      }
    }
    __syncthreads();
#pragma unroll
    for (int t = 0; t < 2; ++t) {
      if (ranks[t] >= 1) {
        const Pick pk = pick_digit<false>(hist[t], want[t]);
        prefix[t] |= static_cast<Key<KB>>(pk.digit) << level_shift(KB, l);
        want[t] -= pk.above;
      }
    }
  }
  if (threadIdx.x != 0) return;
  Key<KB> lo = ranks[0] == kUnbounded ? 0u : ranks[0] == kAtHint ? hint_key : prefix[0];
  Key<KB> hi = ranks[1] == kUnbounded ? max_key<KB>() : ranks[1] == kAtHint ? hint_key : prefix[1];
  if (b.force_miss) lo = hi = max_key<KB>();  // holds no finite score: every bracket misses
  keys<KB>(b.lo)[p] = lo;
  keys<KB>(b.hi)[p] = hi;
}

// Whole warp calls; appends the candidates (key, flat index) to the problem's buffer. Slots past
// its capacity are counted, not written: buffer_count > capacity marks the overflow.
template <int KB>
__device__ __forceinline__ void append(const BracketArgs& b, int p, int64_t capacity, bool cand, Key<KB> key,
                                       uint32_t index) {
  const unsigned want = __ballot_sync(0xffffffffu, cand);
  if (want == 0) return;
  const int lane = threadIdx.x & 31, leader = __ffs(want) - 1;
  int slot0 = 0;
  if (lane == leader) slot0 = atomicAdd(b.buffer_count + p, __popc(want));
  slot0 = __shfl_sync(0xffffffffu, slot0, leader);
  const int slot = slot0 + __popc(want & ((1u << lane) - 1u));
  if (cand && slot < capacity) {
    const int64_t at = b.buffer_first[p] + slot;
    keys<KB>(b.buffer_key)[at] = key;
    b.buffer_index[at] = index;
  }
}

// The j-th of the V scores of a 128-bit load (words: its 32-bit words, little-endian).
template <int KB>
__device__ __forceinline__ Key<KB> unpack(const uint32_t (&words)[4], int j) {
  if constexpr (KB == 64) {
    return static_cast<Key<KB>>(words[2 * j]) | static_cast<Key<KB>>(words[2 * j + 1]) << 32;
  } else {
    return KB == 32 ? words[j] : (words[j / 2] >> (16 * (j % 2))) & 0xFFFFu;
  }
}

template <int KB>
__global__ void __launch_bounds__(kThreads) fused_kernel(BracketArgs b) {
  using T = typename Raw<KB>::type;
  using Reduce = cub::BlockReduce<unsigned long long, kThreads>;
  constexpr int V = 16 / sizeof(T);  // scores per 128-bit load
  __shared__ typename Reduce::TempStorage red;
  const Chunk ch = load_chunk(b.radix, blockIdx.x);
  const int p = ch.prob;
  const Key<KB> lo = keys<KB>(b.lo)[p], hi = keys<KB>(b.hi)[p], span = hi - lo;
  const bool store = lo != hi;
  const int64_t capacity = b.buffer_first[p + 1] - b.buffer_first[p];
  const T* src = static_cast<const T*>(ch.src);
  bool* mask = mask_of(b, blockIdx.x);
  unsigned above = 0, inside = 0;
  bool bad = false;  // a NaN or inf met (the finiteness check)
  // V scores per thread (valid ones: ok), the j-th at flat index i + j * step: counts, then
  // appends only where a lane of the warp has a candidate.
  auto visit = [&](const Key<KB>(&bits)[V], const bool(&ok)[V], int64_t i, int64_t step) {
    bool in[V];
    bool any = false;
#pragma unroll
    for (int j = 0; j < V; ++j) {
      const Key<KB> key = to_key<KB>(bits[j]);
      above += ok[j] && key > hi;
      in[j] = ok[j] && key - lo <= span;
      inside += in[j];
      any |= in[j];
      bad |= ok[j] && non_finite(b.radix, key);
      if (mask != nullptr && ok[j]) mask[i + j * step] = key > hi;
    }
    if (store && __any_sync(0xffffffffu, any)) {
#pragma unroll
      for (int j = 0; j < V; ++j) {
        append<KB>(b, p, capacity, in[j], to_key<KB>(bits[j]), static_cast<uint32_t>(ch.base + i + j * step));
      }
    }
  };
  // 128-bit loads where the chunk is 16-byte aligned; the rest (a tail, or an unaligned tensor)
  // V scalar loads per thread. Trip counts are the same in every thread (warp-wide calls inside).
  const int64_t len = ch.end - ch.start;
  const bool aligned = (reinterpret_cast<uintptr_t>(src + ch.start) & 15u) == 0;
  const int64_t groups = aligned ? len / V : 0;
  const uint4* vec = reinterpret_cast<const uint4*>(src + ch.start);
  for (int64_t g0 = 0; g0 < groups; g0 += kThreads) {
    const int64_t g = g0 + threadIdx.x;
    const bool valid = g < groups;
    const uint4 q = valid ? __ldcs(vec + g) : make_uint4(0u, 0u, 0u, 0u);
    const uint32_t words[4] = {q.x, q.y, q.z, q.w};
    Key<KB> bits[V];
    bool ok[V];
#pragma unroll
    for (int j = 0; j < V; ++j) {
      bits[j] = unpack<KB>(words, j);
      ok[j] = valid;
    }
    visit(bits, ok, ch.start + g * V, 1);
  }
  constexpr int64_t kStep = static_cast<int64_t>(kThreads) * V;
  for (int64_t i0 = ch.start + groups * V; i0 < ch.end; i0 += kStep) {
    const int64_t i = i0 + threadIdx.x;
    Key<KB> bits[V];
    bool ok[V];
#pragma unroll
    for (int j = 0; j < V; ++j) {
      ok[j] = i + j * kThreads < ch.end;
      bits[j] = ok[j] ? src[i + j * kThreads] : 0u;
    }
    visit(bits, ok, i, kThreads);
  }
  check_finite_scores(bad);
  const unsigned long long total_above = Reduce(red).Sum(static_cast<unsigned long long>(above));
  __syncthreads();
  const unsigned long long total_inside = Reduce(red).Sum(static_cast<unsigned long long>(inside));
  if (threadIdx.x == 0) {
    if (total_above != 0) atomicAdd(b.above + p, total_above);
    if (total_inside != 0) atomicAdd(b.inside + p, total_inside);
    b.inside_chunk[blockIdx.x] = static_cast<int32_t>(total_inside);
  }
}

// Finishing level `level` of the problems whose buffer holds rank k: the histogram of the digit of
// key - lo over the buffer's keys in [lo, hi]; the problem's last block narrows [lo, hi] to the
// digit holding the rank. range / rank slot l + 1 receive the state after level l (carried over
// unchanged once lo == hi), so slot levels<KB>() holds the threshold.
template <int KB>
__global__ void __launch_bounds__(kThreads) finish_level_kernel(BracketArgs b, int level) {
  constexpr int L = levels<KB>();
  __shared__ uint32_t hist[kBins];
  const int G = b.finish_blocks;
  const int p = static_cast<int>(blockIdx.x / G), g = static_cast<int>(blockIdx.x % G);
  if (outcome<KB>(b, p) != Outcome::kBuffered) return;
  const int64_t slot = static_cast<int64_t>(p) * (L + 1) + level;
  Key<KB>* range = keys<KB>(b.range);
  Key<KB> lo = level == 0 ? keys<KB>(b.lo)[p] : range[2 * slot];
  Key<KB> hi = level == 0 ? keys<KB>(b.hi)[p] : range[2 * slot + 1];
  const int64_t rank = level == 0 ? b.ks[p] - static_cast<int64_t>(b.above[p]) : b.rank[slot];
  if (lo == hi) {  // solved at an earlier level (never at level 0: a buffered bracket has lo < hi)
    if (g == 0 && threadIdx.x == 0) {
      range[2 * slot + 2] = lo;
      range[2 * slot + 3] = hi;
      b.rank[slot + 1] = rank;
    }
    return;
  }
  const int m = b.buffer_count[p];
  const int blocks = (m + kFinishPerBlock - 1) / kFinishPerBlock;
  if (g >= blocks) return;
  const int shift = bise_bracket::digit_shift(lo, hi);
  const Key<KB> span = hi - lo;
  for (int i = threadIdx.x; i < kBins; i += kThreads) hist[i] = 0;
  __syncthreads();
  const Key<KB>* buffer = keys<KB>(b.buffer_key) + b.buffer_first[p];
  const int end = min(m, (g + 1) * kFinishPerBlock);
  for (int i0 = g * kFinishPerBlock; i0 < end; i0 += kThreads) {
    const int i = i0 + threadIdx.x;
    const Key<KB> d = i < end ? buffer[i] - lo : span + 1u;
    count_bin(hist, i < end && d <= span, static_cast<uint32_t>(d >> shift));
  }
  __syncthreads();
  int32_t* row = b.hist + (static_cast<int64_t>(p) * L + level) * kBins;
  for (int i = threadIdx.x; i < kBins; i += kThreads) {
    if (hist[i] != 0) atomicAdd(row + i, static_cast<int32_t>(hist[i]));
  }
  if (!last_block(b.tickets + p * (L + 1) + level, blocks)) return;
  const Pick pk = pick_digit<true>(row, rank);
  if (threadIdx.x != 0) return;
  bise_bracket::narrow(lo, hi, pk.digit, shift);
  range[2 * slot + 2] = lo;
  range[2 * slot + 3] = hi;
  b.rank[slot + 1] = rank - pk.above;
}

// The tie cut of the solved problems: per-chunk tie counts (from the buffer, or the fused pass's
// chunk counts for a single-value bracket), then the problem's last block scans one chunk, writes
// thr and cut and marks the problem solved for the radix select.
template <int KB>
__global__ void __launch_bounds__(kThreads) finish_tie_kernel(BracketArgs b) {
  constexpr int L = levels<KB>();
  const SelectArgs& a = b.radix;
  const int G = b.finish_blocks;
  const int p = static_cast<int>(blockIdx.x / G), g = static_cast<int>(blockIdx.x % G);
  const Outcome o = outcome<KB>(b, p);
  if (o == Outcome::kMissed) return;
  Key<KB> thr;
  int64_t need;
  const int32_t* ties;
  if (o == Outcome::kSingle) {
    if (g != 0) return;
    thr = keys<KB>(b.lo)[p];
    need = b.ks[p] - static_cast<int64_t>(b.above[p]);
    ties = b.inside_chunk;
  } else {
    const int64_t slot = static_cast<int64_t>(p) * (L + 1) + L;
    thr = keys<KB>(b.range)[2 * slot];
    need = b.rank[slot];
    const int m = b.buffer_count[p];
    const int blocks = (m + kFinishPerBlock - 1) / kFinishPerBlock;
    if (g >= blocks) return;
    const int64_t first = b.buffer_first[p];
    const int end = min(m, (g + 1) * kFinishPerBlock);
    for (int i0 = g * kFinishPerBlock; i0 < end; i0 += kThreads) {
      const int i = i0 + threadIdx.x;
      const bool tie = i < end && keys<KB>(b.buffer_key)[first + i] == thr;
      const int64_t c = tie ? chunk_of(a, p, b.buffer_index[first + i]) : 0;
      count_bin(b.tie_chunk, tie, static_cast<uint32_t>(c));
    }
    if (!last_block(b.tickets + p * (L + 1) + L, blocks)) return;
    ties = b.tie_chunk;
  }
  const int64_t cut = cut_from_chunks<KB>(a, ties, p, thr, need);
  if (threadIdx.x != 0) return;
  static_cast<Bits<KB>*>(a.threshold_bits)[p] = key_to_bits<KB>(thr);
  a.cut[p] = cut;
  b.solved[p] = 1;
}

// topk_keep_mask: the keep mask of the buffered entries of problems solved from their buffer
// (the fused pass wrote key > hi for all others of theirs).
template <int KB>
__global__ void __launch_bounds__(kThreads) mask_inside_kernel(BracketArgs b) {
  constexpr int L = levels<KB>();
  const SelectArgs& a = b.radix;
  const int G = b.finish_blocks;
  const int p = static_cast<int>(blockIdx.x / G), g = static_cast<int>(blockIdx.x % G);
  if (outcome<KB>(b, p) != Outcome::kBuffered) return;
  const Key<KB> thr = keys<KB>(b.range)[2 * (static_cast<int64_t>(p) * (L + 1) + L)];
  const int64_t cut = a.cut[p], first = b.buffer_first[p], C = a.num_chunks;
  const int m = b.buffer_count[p];
  for (int i = g * kThreads + threadIdx.x; i < m; i += G * kThreads) {
    const Key<KB> key = keys<KB>(b.buffer_key)[first + i];
    const int64_t flat = b.buffer_index[first + i], c = chunk_of(a, p, flat);
    mask_of(b, c)[flat - a.table[3 * C + c]] = key > thr || (key == thr && flat < cut);
  }
}

// topk_keep_mask: the whole keep mask of the problems not solved from a buffer (single value,
// missed, overflowed), from thr and cut as the selection wrote them.
template <int KB>
__global__ void __launch_bounds__(kThreads) mask_rest_kernel(BracketArgs b) {
  const SelectArgs& a = b.radix;
  const Chunk ch = load_chunk(a, blockIdx.x);
  if (outcome<KB>(b, ch.prob) == Outcome::kBuffered) return;
  const Key<KB> thr = to_key<KB>(static_cast<Key<KB>>(static_cast<const Bits<KB>*>(a.threshold_bits)[ch.prob]));
  const int64_t cut = a.cut[ch.prob];
  bool* mask = mask_of(b, blockIdx.x);
  for (int64_t i = ch.start + threadIdx.x; i < ch.end; i += kThreads) {
    const Key<KB> key = key_at<KB>(ch.src, i);
    mask[i] = key > thr || (key == thr && ch.base + i < cut);
  }
}

template <int KB>
cudaError_t launch_bracket(const BracketArgs& b, cudaStream_t stream) {
  const unsigned problems = static_cast<unsigned>(b.radix.num_problems);
  const unsigned chunks = static_cast<unsigned>(b.radix.num_chunks);
  const unsigned finish = problems * static_cast<unsigned>(b.finish_blocks);
  sample_kernel<KB><<<problems, kThreads, 0, stream>>>(b);
  fused_kernel<KB><<<chunks, kThreads, 0, stream>>>(b);
  for (int l = 0; l < levels<KB>(); ++l) finish_level_kernel<KB><<<finish, kThreads, 0, stream>>>(b, l);
  finish_tie_kernel<KB><<<finish, kThreads, 0, stream>>>(b);
  const cudaError_t err = cudaGetLastError();
  const cudaError_t fallback = err != cudaSuccess ? err : bise_radix_select_launch(&b.radix, stream);
  if (fallback != cudaSuccess || (b.mask == nullptr && b.mask_addr == nullptr)) return fallback;
  mask_inside_kernel<KB><<<finish, kThreads, 0, stream>>>(b);
  mask_rest_kernel<KB><<<chunks, kThreads, 0, stream>>>(b);
  return cudaGetLastError();
}

}  // namespace
}  // namespace bise_select

extern "C" cudaError_t bise_bracket_select_launch(const bise_select::BracketArgs* args, cudaStream_t stream) {
  if (args->radix.num_chunks == 0) return cudaSuccess;
  return args->radix.key_bits == 64   ? bise_select::launch_bracket<64>(*args, stream)
         : args->radix.key_bits == 32 ? bise_select::launch_bracket<32>(*args, stream)
                                      : bise_select::launch_bracket<16>(*args, stream);
}
