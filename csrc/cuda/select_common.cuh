// Device code shared by the CUDA radix select (select.cu) and the CUDA bracket select
// (select_bracket.cu): keys of raw float bits, the chunk table, warp-aggregated histogram counts,
// the block-wide digit pick and the tie cut from per-chunk tie counts.
#pragma once

#include <cub/block/block_scan.cuh>

#include <type_traits>

#include "../select_bracket.h"
#include "device_check.cuh"
#include "select.h"

namespace bise_select {
namespace {

template <int KB>
struct Raw;
template <>
struct Raw<32> {
  using type = uint32_t;
};
template <>
struct Raw<16> {
  using type = uint16_t;
};
template <>
struct Raw<64> {
  using type = uint64_t;
};

// The key of a KB-bit float: a 32-bit word for 16- and 32-bit floats (their code is as before
// float64), a 64-bit one for float64; and the threshold's raw bits as the binding views them.
template <int KB>
using Key = std::conditional_t<KB == 64, uint64_t, uint32_t>;
template <int KB>
using Bits = std::conditional_t<KB == 64, int64_t, int32_t>;

// The workspace's arrays of keys (select.h: void*) as Key<KB>.
template <int KB>
__device__ __forceinline__ Key<KB>* keys(void* p) {
  return static_cast<Key<KB>*>(p);
}

// MSB-first digits of kRadixBits of a KB-bit key: level l covers bits [level_shift, level_hi).
template <int KB>
__host__ __device__ constexpr int levels() {
  return (KB + kRadixBits - 1) / kRadixBits;
}

__host__ __device__ constexpr int level_hi(int kb, int l) { return kb - kRadixBits * l; }
__host__ __device__ constexpr int level_shift(int kb, int l) {
  return level_hi(kb, l) > kRadixBits ? level_hi(kb, l) - kRadixBits : 0;
}

template <typename K>
__device__ __forceinline__ uint32_t digit_of(K key, int kb, int l) {
  const int hi = level_hi(kb, l), shift = level_shift(kb, l);
  return static_cast<uint32_t>(key >> shift) & ((1u << (hi - shift)) - 1u);
}

// Whether key and prefix agree on their bits from bit `hi` up.
template <typename K>
__device__ __forceinline__ bool matches(K key, K prefix, int hi) {
  return hi >= static_cast<int>(8 * sizeof(K)) || (key >> hi) == (prefix >> hi);
}

// Raw float bits -> unsigned key with the float's order (-0.0 as +0.0): csrc/select_bracket.h.
template <int KB>
__device__ __forceinline__ Key<KB> to_key(Key<KB> bits) {
  return bise_bracket::to_key(static_cast<typename Raw<KB>::type>(bits));
}

// Inverse of to_key, as Bits<KB> (16-bit floats sign-extended, as the binding expects).
template <int KB>
__device__ __forceinline__ Bits<KB> key_to_bits(Key<KB> key) {
  const auto bits = bise_bracket::from_key(static_cast<typename Raw<KB>::type>(key));
  return KB == 16 ? static_cast<Bits<KB>>(static_cast<int16_t>(bits)) : static_cast<Bits<KB>>(bits);
}

// The largest key of KB bits (no finite float has it: it is a NaN's).
template <int KB>
__device__ __forceinline__ Key<KB> max_key() {
  return static_cast<typename Raw<KB>::type>(~typename Raw<KB>::type(0));
}

// Whether a key is a NaN's or an infinity's (the finiteness check; SelectArgs::finite_lo).
template <typename K>
__device__ __forceinline__ bool non_finite(const SelectArgs& a, K key) {
  return static_cast<K>(key - static_cast<K>(a.finite_lo)) > static_cast<K>(a.finite_span);
}

// The finiteness check of a first pass over the scores: each thread ORs non_finite of its keys
// into `bad` and calls this once after its loop (no store or branch per key beyond the OR).
__device__ __forceinline__ void check_finite_scores(bool bad) { BISE_DEVICE_CHECK(!bad, BISE_SCORES_NOT_FINITE); }

struct Chunk {
  const void* src;
  int64_t start, end, base;  // [start, end) of its tensor; base: the tensor's flat offset in its problem
  int prob;
};

__device__ __forceinline__ Chunk load_chunk(const SelectArgs& a, int64_t c) {
  const int64_t C = a.num_chunks;
  Chunk k;
  k.src = reinterpret_cast<const void*>(a.table[c]);
  k.start = a.table[C + c];
  const int64_t numel = a.table[2 * C + c];
  k.end = k.start + kChunk < numel ? k.start + kChunk : numel;
  k.base = a.table[3 * C + c];
  k.prob = static_cast<int>(a.table[4 * C + c]);
  return k;
}

template <int KB>
__device__ __forceinline__ Key<KB> key_at(const void* src, int64_t i) {
  return to_key<KB>(static_cast<const typename Raw<KB>::type*>(src)[i]);
}

// Whole warp calls; lanes with the same bin add once (ties, e.g. all-equal scores, stay cheap).
template <typename T>
__device__ __forceinline__ void count_bin(T* hist, bool cand, uint32_t bin) {
  const unsigned want = __ballot_sync(0xffffffffu, cand);
  if (!cand) return;
  const unsigned peers = __match_any_sync(want, bin);
  if ((threadIdx.x & 31) == __ffs(peers) - 1) atomicAdd(hist + bin, static_cast<T>(__popc(peers)));
}

struct Pick {
  uint32_t digit;
  int64_t above, count;
};

// Whole block calls, after writing its share of a result that `blocks` blocks build together:
// publishes the writes and takes a ticket from *ticket. True, in every thread, only in the block
// that takes the last ticket, which then sees every block's writes; the others should return.
__device__ __forceinline__ bool last_block(int32_t* ticket, int64_t blocks) {
  __shared__ bool last;
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) last = atomicAdd(ticket, 1) == blocks - 1;
  __syncthreads();
  if (last) __threadfence();
  return last;
}

// Whole block (kThreads) calls: the digit holding rank krem (1-based, descending) of a histogram
// row of kBins counts. GLOBAL: the row is in global memory, filled by other blocks' atomics (read
// through L2); else in shared memory.
template <bool GLOBAL, typename T>
__device__ Pick pick_digit(const T* row, int64_t krem) {
  using Scan = cub::BlockScan<int64_t, kThreads>;
  __shared__ typename Scan::TempStorage tmp;
  __shared__ Pick result;
  constexpr int per = kBins / kThreads;
  int64_t v[per];
  int64_t sum = 0;
#pragma unroll
  for (int j = 0; j < per; ++j) {
    const T* at = row + (kBins - 1 - (threadIdx.x * per + j));
    v[j] = GLOBAL ? static_cast<int64_t>(__ldcg(at)) : static_cast<int64_t>(*at);
    sum += v[j];
  }
  if (threadIdx.x == 0) result = Pick{0, 0, 0};
  __syncthreads();
  int64_t run;
  Scan(tmp).ExclusiveSum(sum, run);
#pragma unroll
  for (int j = 0; j < per; ++j) {
    if (run < krem && run + v[j] >= krem) result = Pick{kBins - 1u - (threadIdx.x * per + j), run, v[j]};
    run += v[j];
  }
  __syncthreads();
  const Pick p = result;
  __syncthreads();
  return p;
}

// Whole block calls: the flat index + 1 of the need-th (1-based) key equal to thr of problem prob,
// from per-chunk tie counts (complete for the problem's chunks): a prefix over the counts finds
// the chunk, a scan of that chunk finds the tie.
template <int KB>
__device__ int64_t cut_from_chunks(const SelectArgs& a, const int32_t* tie_count, int prob, Key<KB> thr,
                                   int64_t need) {
  using Scan = cub::BlockScan<int64_t, kThreads>;
  __shared__ typename Scan::TempStorage tmp;
  __shared__ int64_t target, rank, found;
  const int64_t first = a.chunk_first[prob], last = a.chunk_first[prob + 1];
  if (threadIdx.x == 0) {
    found = 0;
    target = first;
    rank = 0;
  }
  __syncthreads();
  int64_t before = 0;
  for (int64_t j0 = first; j0 < last; j0 += kThreads) {
    const int64_t j = j0 + threadIdx.x;
    const int64_t n = j < last ? __ldcg(tie_count + j) : 0;
    int64_t excl, total;
    Scan(tmp).ExclusiveSum(n, excl, total);
    excl += before;
    if (j < last && excl < need && excl + n >= need) {
      target = j;
      rank = need - excl;
    }
    before += total;
    __syncthreads();
  }
  const Chunk ch = load_chunk(a, target);
  const int64_t r = rank;
  constexpr int per = kChunk / kThreads;
  const int64_t lo = ch.start + static_cast<int64_t>(threadIdx.x) * per;
  const int64_t hi = lo + per < ch.end ? lo + per : ch.end;
  int64_t mine = 0;
  for (int64_t i = lo; i < hi; ++i) mine += key_at<KB>(ch.src, i) == thr;
  int64_t excl;
  Scan(tmp).ExclusiveSum(mine, excl);
  if (excl < r && excl + mine >= r) {
    int64_t seen = excl;
    for (int64_t i = lo; i < hi; ++i) {
      if (key_at<KB>(ch.src, i) == thr && ++seen == r) found = ch.base + i + 1;
    }
  }
  __syncthreads();
  return found;
}

}  // namespace
}  // namespace bise_select
