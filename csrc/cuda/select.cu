// Exact top-k selection on CUDA: multi-tensor radix select with warm start and the tie cut.
//
// The algorithm is the Triton one (bise_kernels/backends/triton/select.py), after RAFT's AIR top-k:
// order-preserving keys (-0.0 -> +0.0), MSB-first 11-bit digit passes, one block per chunk of
// kChunk elements of any tensor (chunk table: no concatenation), shared-memory histograms with
// warp-aggregated atomics merged into a per-problem global histogram, the last block of a
// problem (ticket counter) picks the digit, a pass whose candidates fit compacts them into a
// small buffer that later passes read instead of the scores, a hint supplies speculative
// prefixes for every level in the first pass, and the tie cut (index of the needed tie in flat
// order) comes from the buffer or from per-chunk tie counts.
// Torch-free: the ATen binding (select_binding.cpp) allocates the workspace.
#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>

#include "select_common.cuh"

namespace bise_select {
namespace {

// Levels of a hinted first pass: one shared histogram each, 8 KB. Every level of 16- and 32-bit
// keys; 5 of float64's 6, as 6 would pass the 48 KB of static shared memory of a block.
template <int KB>
__host__ __device__ constexpr int spec_levels() {
  return levels<KB>() < 5 ? levels<KB>() : 5;
}

// Whole warp calls; appends the candidates (key, flat index) while the buffer has room.
template <int KB>
__device__ __forceinline__ void append(const SelectArgs& a, int prob, bool cand, Key<KB> key, int64_t index) {
  const unsigned want = __ballot_sync(0xffffffffu, cand);
  if (want == 0) return;
  const int lane = threadIdx.x & 31, leader = __ffs(want) - 1;
  int slot0 = 0;
  if (lane == leader) {
    const int seen = *reinterpret_cast<volatile int32_t*>(a.buffer_count + prob);
    slot0 = seen <= kCapacity ? atomicAdd(a.buffer_count + prob, __popc(want)) : kCapacity;
  }
  slot0 = __shfl_sync(0xffffffffu, slot0, leader);
  const int slot = slot0 + __popc(want & ((1u << lane) - 1u));
  if (cand && slot < kCapacity) {
    keys<KB>(a.buffer_key)[static_cast<int64_t>(prob) * kCapacity + slot] = key;
    a.buffer_index[static_cast<int64_t>(prob) * kCapacity + slot] = index;
  }
}

// After a pass: keep a filled buffer, mark one just filled, else arm (0) or disarm (kCapacity + 1)
// compaction in the next pass. A pass compacts iff it finds buffer_count <= kCapacity.
__device__ __forceinline__ void next_buffer(const SelectArgs& a, int prob, int level, int64_t candidates) {
  if (a.buffer_level[prob] != 0) return;
  if (level >= 1 && __ldcg(a.buffer_count + prob) <= kCapacity) {
    a.buffer_level[prob] = level;
  } else {
    a.buffer_count[prob] = candidates <= kCapacity ? 0 : kCapacity + 1;
  }
}

template <int KB>
__device__ void level_scan(const SelectArgs& a, int prob, const int32_t* row, int level, Key<KB> prefix) {
  constexpr int L = levels<KB>();
  const int64_t krem = a.krem[prob];
  const Pick p = pick_digit<true>(row, krem);
  if (threadIdx.x != 0) return;
  prefix |= static_cast<Key<KB>>(p.digit) << level_shift(KB, level);
  keys<KB>(a.prefix)[prob] = prefix;
  a.krem[prob] = krem - p.above;
  a.level[prob] = level + 1;
  if (level + 1 == L) {
    static_cast<Bits<KB>*>(a.threshold_bits)[prob] = key_to_bits<KB>(prefix);
  } else {
    next_buffer(a, prob, level, p.count);
  }
}

// Levels resolve while the hint's digits match: level l's histogram is valid iff digits < l did.
// The buffer filled under the hint's first S - 1 digits holds every later candidate once all S
// levels resolved: the ties of a resolved threshold (S = L), or the candidates of level S (S < L,
// unless it overflowed); otherwise the next pass compacts its candidates if they fit.
template <int KB>
__device__ void spec_scan(const SelectArgs& a, int prob, const int32_t* rows, Key<KB> hint_key) {
  constexpr int L = levels<KB>(), S = spec_levels<KB>();
  int64_t krem = a.krem[prob], count = 0;
  Key<KB> prefix = 0;
  int level = 0;
  for (int l = 0; l < S; ++l) {
    const Pick p = pick_digit<true>(rows + l * kBins, krem);
    prefix |= static_cast<Key<KB>>(p.digit) << level_shift(KB, l);
    krem -= p.above;
    count = p.count;
    level = l + 1;
    if (p.digit != digit_of(hint_key, KB, l)) break;
  }
  if (threadIdx.x != 0) return;
  keys<KB>(a.prefix)[prob] = prefix;
  a.krem[prob] = krem;
  a.level[prob] = level;
  if (level == L) {
    static_cast<Bits<KB>*>(a.threshold_bits)[prob] = key_to_bits<KB>(prefix);
  } else if (level == S && __ldcg(a.buffer_count + prob) <= kCapacity) {
    a.buffer_level[prob] = level;
  } else {
    a.buffer_count[prob] = count <= kCapacity ? 0 : kCapacity + 1;
  }
}

// A problem whose candidates are compacted: one block histograms the buffer and picks the digit.
template <int KB>
__device__ void buffer_pass(const SelectArgs& a, int prob, int level, Key<KB> prefix, uint32_t* hist) {
  for (int i = threadIdx.x; i < kBins; i += kThreads) hist[i] = 0;
  __syncthreads();
  const int n = min(__ldcg(a.buffer_count + prob), kCapacity);
  const Key<KB>* buffer = keys<KB>(a.buffer_key) + static_cast<int64_t>(prob) * kCapacity;
  for (int i = threadIdx.x; i < n; i += kThreads) {
    const Key<KB> key = __ldcg(buffer + i);
    if (matches(key, prefix, level_hi(KB, level))) atomicAdd(hist + digit_of(key, KB, level), 1u);
  }
  __syncthreads();
  int32_t* row = a.hist + static_cast<int64_t>(prob) * 2 * levels<KB>() * kBins + level * kBins;
  for (int i = threadIdx.x; i < kBins; i += kThreads) row[i] = static_cast<int32_t>(hist[i]);
  __threadfence();
  __syncthreads();
  level_scan<KB>(a, prob, row, level, prefix);
}

template <int KB, bool SPEC>
__global__ void __launch_bounds__(kThreads) digit_pass_kernel(SelectArgs a, int level) {
  constexpr int L = levels<KB>();
  constexpr int H = SPEC ? spec_levels<KB>() : 1;
  __shared__ uint32_t hist[H * kBins];
  const Chunk ch = load_chunk(a, blockIdx.x);
  if (a.solved != nullptr && a.solved[ch.prob] != 0) return;
  Key<KB> prefix;
  if (SPEC) {
    prefix = to_key<KB>(static_cast<const typename Raw<KB>::type*>(a.hints)[ch.prob]);
  } else {
    if (a.level[ch.prob] != level) return;  // resolved already (e.g. by the warm start): nothing to read
    prefix = keys<KB>(a.prefix)[ch.prob];
    if (a.buffer_level[ch.prob] != 0) {  // candidates compacted: only the buffer is read
      if (blockIdx.x == a.chunk_first[ch.prob]) buffer_pass<KB>(a, ch.prob, level, prefix, hist);
      return;
    }
  }
  for (int i = threadIdx.x; i < H * kBins; i += kThreads) hist[i] = 0;
  __syncthreads();
  const bool compact = SPEC || level >= 1;
  const int compact_hi = level_hi(KB, SPEC ? H - 1 : level);
  const bool first = SPEC || level == 0;  // the first pass reads every score: checks finiteness
  bool bad = false;
#pragma unroll 4
  for (int64_t i0 = ch.start; i0 < ch.end; i0 += kThreads) {
    const int64_t i = i0 + threadIdx.x;
    const bool valid = i < ch.end;
    const Key<KB> key = valid ? key_at<KB>(ch.src, i) : 0u;
    if (SPEC) {
#pragma unroll
      for (int l = 0; l < H; ++l) {
        count_bin(hist + l * kBins, valid && matches(key, prefix, level_hi(KB, l)), digit_of(key, KB, l));
      }
    } else {
      count_bin(hist, valid && matches(key, prefix, level_hi(KB, level)), digit_of(key, KB, level));
    }
    if (compact) append<KB>(a, ch.prob, valid && matches(key, prefix, compact_hi), key, ch.base + i);
    bad |= first && valid && non_finite(a, key);
  }
  check_finite_scores(bad);
  __syncthreads();
  int32_t* rows = a.hist + static_cast<int64_t>(ch.prob) * 2 * L * kBins + (SPEC ? L : level) * kBins;
  for (int i = threadIdx.x; i < H * kBins; i += kThreads) {
    if (hist[i]) atomicAdd(rows + i, static_cast<int32_t>(hist[i]));
  }
  if (!last_block(a.tickets + ch.prob * (L + 1) + (SPEC ? 0 : level),
                  a.chunk_first[ch.prob + 1] - a.chunk_first[ch.prob])) {
    return;
  }
  if (SPEC) {
    spec_scan<KB>(a, ch.prob, rows, prefix);
  } else {
    level_scan<KB>(a, ch.prob, rows, level, prefix);
  }
}

// All ties are in the buffer (unordered, distinct indices): the one with need - 1 smaller ones.
template <int KB>
__device__ int64_t cut_from_buffer(const SelectArgs& a, int prob, Key<KB> thr, int64_t need) {
  __shared__ int64_t ties[kCapacity];
  __shared__ int num_ties;
  __shared__ int64_t found;
  if (threadIdx.x == 0) {
    num_ties = 0;
    found = 0;
  }
  __syncthreads();
  const int n = min(__ldcg(a.buffer_count + prob), kCapacity);
  const int64_t row = static_cast<int64_t>(prob) * kCapacity;
  for (int i = threadIdx.x; i < n; i += kThreads) {
    if (__ldcg(keys<KB>(a.buffer_key) + row + i) == thr) {
      ties[atomicAdd(&num_ties, 1)] = __ldcg(reinterpret_cast<const long long*>(a.buffer_index) + row + i);
    }
  }
  __syncthreads();
  for (int i = threadIdx.x; i < num_ties; i += kThreads) {
    int64_t rank = 0;
    for (int j = 0; j < num_ties; ++j) rank += ties[j] < ties[i];
    if (rank == need - 1) found = ties[i] + 1;
  }
  __syncthreads();
  return found;
}

template <int KB>
__global__ void __launch_bounds__(kThreads) tie_kernel(SelectArgs a) {
  constexpr int L = levels<KB>();
  using Reduce = cub::BlockReduce<int, kThreads>;
  __shared__ typename Reduce::TempStorage tmp;
  const Chunk ch = load_chunk(a, blockIdx.x);
  if (a.solved != nullptr && a.solved[ch.prob] != 0) return;
  const Key<KB> thr = keys<KB>(a.prefix)[ch.prob];
  const bool overflow = a.buffer_count[ch.prob] > kCapacity;
  if (overflow) {  // the buffer missed candidates: count this chunk's ties
    int n = 0;
    for (int64_t i = ch.start + threadIdx.x; i < ch.end; i += kThreads) n += key_at<KB>(ch.src, i) == thr;
    const int total = Reduce(tmp).Sum(n);
    if (threadIdx.x == 0) a.tie_count[blockIdx.x] = total;
  }
  if (!last_block(a.tickets + ch.prob * (L + 1) + L, a.chunk_first[ch.prob + 1] - a.chunk_first[ch.prob])) return;
  const int64_t need = a.krem[ch.prob];
  const int64_t cut = overflow ? cut_from_chunks<KB>(a, a.tie_count, ch.prob, thr, need)
                                : cut_from_buffer<KB>(a, ch.prob, thr, need);
  if (threadIdx.x == 0) a.cut[ch.prob] = cut;
}

// check_finite: the finiteness check of the scores and thr (keep_mask's, for a selection its caller
// left unchecked): each thread asserts thr finite and ORs non_finite of its keys, asserted once
// after its loop, as the selects' first pass does (no launch, no flag).
template <int KB>
__global__ void keep_mask_kernel(const typename Raw<KB>::type* bits, const typename Raw<KB>::type* thr_bits,
                                 const int64_t* cut_ptr, bool* out, int64_t n, int64_t offset,
                                 typename Raw<KB>::type inf_bits, int check_finite) {
  using R = typename Raw<KB>::type;
  const R thr = bise_bracket::to_key(*thr_bits);
  const int64_t cut = *cut_ptr;
  const bise_bracket::FiniteKeys<R> fin = bise_bracket::finite_keys(inf_bits);
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  bool bad = false;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    const R key = bise_bracket::to_key(bits[i]);
    out[i] = key > thr || (key == thr && offset + i < cut);
    if (check_finite) bad |= bise_bracket::non_finite(key, fin);  // uniform: unchecked masks skip it
  }
  if (check_finite) {
    BISE_DEVICE_CHECK(!bise_bracket::non_finite(thr, fin), BISE_THRESHOLD_NOT_FINITE);
    check_finite_scores(bad);
  }
}

template <int KB>
cudaError_t launch_select(const SelectArgs& a, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(a.num_chunks));
  for (int l = 0; l < levels<KB>(); ++l) {
    if (l == 0 && a.hints != nullptr) {
      digit_pass_kernel<KB, true><<<grid, kThreads, 0, stream>>>(a, 0);
    } else {
      digit_pass_kernel<KB, false><<<grid, kThreads, 0, stream>>>(a, l);
    }
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  tie_kernel<KB><<<grid, kThreads, 0, stream>>>(a);
  return cudaGetLastError();
}

template <int KB>
cudaError_t launch_keep_mask(const void* bits, const void* thr, const int64_t* cut, bool* out, int64_t n,
                             int64_t offset, uint64_t inf_bits, int check_finite, cudaStream_t stream) {
  using T = typename Raw<KB>::type;
  constexpr int threads = 256;
  const int64_t wanted = (n + threads - 1) / threads;
  const unsigned blocks = static_cast<unsigned>(wanted < 65536 ? (wanted > 0 ? wanted : 1) : 65536);
  keep_mask_kernel<KB><<<blocks, threads, 0, stream>>>(static_cast<const T*>(bits), static_cast<const T*>(thr), cut,
                                                       out, n, offset, static_cast<T>(inf_bits), check_finite);
  return cudaGetLastError();
}

}  // namespace
}  // namespace bise_select

extern "C" cudaError_t bise_radix_select_launch(const bise_select::SelectArgs* args, cudaStream_t stream) {
  if (args->num_chunks == 0) return cudaSuccess;
  return args->key_bits == 64   ? bise_select::launch_select<64>(*args, stream)
         : args->key_bits == 32 ? bise_select::launch_select<32>(*args, stream)
                                : bise_select::launch_select<16>(*args, stream);
}

extern "C" cudaError_t bise_keep_mask_launch(const void* bits, const void* thr_bits, const int64_t* cut, bool* out,
                                             int64_t n, int64_t offset, int key_bits, uint64_t inf_bits,
                                             int check_finite, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  auto launch = [&](auto kb) {
    return bise_select::launch_keep_mask<decltype(kb)::value>(bits, thr_bits, cut, out, n, offset, inf_bits,
                                                               check_finite, stream);
  };
  return key_bits == 64   ? launch(std::integral_constant<int, 64>{})
         : key_bits == 32 ? launch(std::integral_constant<int, 32>{})
                          : launch(std::integral_constant<int, 16>{});
}
