// Torch-free interface between the CUDA selects (radix: select.cu, bracket: select_bracket.cu)
// and their ATen binding (select_binding.cpp). All pointers are device pointers; the binding
// allocates and zeroes the workspace with torch's caching allocator and passes the current stream.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

namespace bise_select {

constexpr int kRadixBits = 11;
constexpr int kBins = 1 << kRadixBits;
constexpr int kThreads = 512;
constexpr int kChunk = 16384;     // elements per block (one row of the chunk table)
constexpr int kCapacity = 2048;   // per-problem candidate buffer (compaction once they fit)

inline int num_levels(int key_bits) { return (key_bits + kRadixBits - 1) / kRadixBits; }

// int32 words per key: the keys of 16- and 32-bit floats are 32-bit words, float64's 64-bit ones.
// Arrays of keys (void* below: Key<key_bits> in select_common.cuh) and the threshold bits lie
// first in their workspace, so 64-bit ones are 8-byte aligned.
inline int key_words(int key_bits) { return key_bits == 64 ? 2 : 1; }

struct SelectArgs {
  // Chunk table, struct of arrays, 5 rows of num_chunks int64: address, start, numel of its
  // tensor, flat offset of its tensor within its problem, problem id. A problem's chunks are
  // contiguous: chunk_first[p] .. chunk_first[p + 1].
  const int64_t* table;
  int64_t num_chunks;
  const int64_t* chunk_first;
  int32_t num_problems;
  int32_t key_bits;       // 64 (float64), 32 (float32) or 16 (float16 / bfloat16): width of the raw bits
  const void* hints;      // num_problems raw floats (same width) or nullptr: cold start
  // Workspace, zeroed by the caller except krem (= k per problem) and the outputs.
  int32_t* level;         // next digit level per problem
  void* prefix;           // num_problems keys: the key bits resolved so far
  int64_t* krem;          // rank still to find within the candidates (ties needed at the end)
  int32_t* buffer_count;  // candidates appended to the buffer (> kCapacity: overflowed)
  int32_t* buffer_level;  // level whose candidates the buffer holds (0: none yet)
  int32_t* hist;          // num_problems x (2 x levels) x kBins: cold rows, then warm-start rows
  int32_t* tickets;       // num_problems x (levels + 1)
  int32_t* tie_count;     // num_chunks
  void* buffer_key;       // num_problems x kCapacity keys
  int64_t* buffer_index;  // num_problems x kCapacity
  // Outputs.
  void* threshold_bits;     // num_problems raw bits: int64 (float64) or int32 (16-bit floats sign-extended);
                            // written, never read, by the select (no initial value needed)
  int64_t* cut;             // num_problems
  // Problems already solved (nonzero: skipped), or nullptr: the bracket select's fallback.
  const int32_t* solved;
  // The finiteness check, fused into the first pass over the scores (radix: level 0 or the hinted
  // pass; bracket: the fused pass): a key outside the finite ones (key - finite_lo > finite_span,
  // finite_keys in csrc/select_bracket.h) fails a device-side assert (check_finite_scores).
  uint64_t finite_lo, finite_span;
};

constexpr int kSample = 16384;        // sample keys per problem of the bracket select
constexpr int kFinishPerBlock = 4096;  // buffer entries per block of the bracket select's finish

// The bracket select (select_bracket.cu): a sample bracket per problem, one fused pass over the
// data that counts keys above it and compacts those inside into a buffer, an exact select in the
// buffer; problems whose bracket missed or overflowed its buffer run the radix select (`radix`,
// with radix.solved = solved). Workspace zeroed by the caller except the buffers.
struct BracketArgs {
  SelectArgs radix;             // the chunk table, hints, outputs and the fallback's workspace
  const int64_t* ks;            // k per problem
  const int64_t* buffer_first;  // num_problems + 1 offsets: problem p's buffer capacity is the difference
  int32_t finish_blocks;        // blocks per problem of the finishing kernels (>= 1)
  int32_t force_miss;           // tests: every bracket is empty, so every problem takes the fallback
  void* buffer_key;             // candidates: key
  uint32_t* buffer_index;       // and flat index in the problem
  int32_t* buffer_count;        // num_problems: entries appended (> capacity: overflowed)
  void* lo;                     // num_problems keys: the bracket [lo, hi]
  void* hi;
  unsigned long long* above;    // num_problems: keys above hi
  unsigned long long* inside;   // num_problems: keys in [lo, hi]
  int32_t* inside_chunk;        // num_chunks: keys of the chunk in [lo, hi]
  int32_t* tie_chunk;           // num_chunks: keys of the chunk equal to the threshold
  void* range;                  // num_problems x (levels + 1) x 2 keys: [lo, hi] before each finishing level
  int64_t* rank;                // num_problems x (levels + 1): rank in that range (1-based, descending)
  int32_t* hist;                // num_problems x levels x kBins
  int32_t* tickets;             // num_problems x (levels + 1)
  int32_t* solved;              // num_problems: 1 once the bracket select wrote thr and cut
  // topk_keep_mask: the keep masks (bool, indexed like their tensor), or both nullptr: no masks.
  // One tensor: `mask`, its mask, a kernel argument (a CUDA graph replays it); several: per
  // chunk, the address of its tensor's mask, in device memory (`mask_addr`). The fused pass writes
  // key > hi; after the selection, the buffer's entries of buffered problems and every entry of
  // the others are written.
  bool* mask;
  const int64_t* mask_addr;
};

// Workspace layouts, one definition for the binding and the CPU emulation test
// (tests/kernels/select_cuda_emu): how many words each select needs and where each array lies.
// The outputs (threshold_bits, cut) are not in it: the binding returns them as tensors of their
// own, not views into a workspace (bise_kernels/_ops.py returns them uncopied).
struct RadixWorkspace {
  int64_t key_words, n_hist, n_tickets, words;  // int32 words per key; int32 words in all
};

inline RadixWorkspace radix_workspace(int64_t P, int64_t C, int key_bits) {
  const int64_t levels = num_levels(key_bits), kw = key_words(key_bits);
  const int64_t n_hist = P * 2 * levels * kBins, n_tickets = P * (levels + 1);
  return {kw, n_hist, n_tickets, kw * P + n_hist + n_tickets + 3 * P + C};
}

// Points a's workspace arrays into w (radix_workspace(...).words int32, zeroed; 8-byte aligned).
inline void carve_radix_workspace(SelectArgs& a, int32_t* w, const RadixWorkspace& ws, int64_t P) {
  a.prefix = w;
  a.hist = w + ws.key_words * P;
  a.tickets = a.hist + ws.n_hist;
  a.level = a.tickets + ws.n_tickets;
  a.buffer_count = a.level + P;
  a.buffer_level = a.level + 2 * P;
  a.tie_count = a.level + 3 * P;
}

struct BracketWorkspace {
  int64_t key_words, levels1, n_hist;  // int32 words per key; levels + 1
  int64_t words64, words32;            // int64 and int32 words in all
};

inline BracketWorkspace bracket_workspace(int64_t P, int64_t C, int key_bits) {
  const int64_t kw = key_words(key_bits), L1 = num_levels(key_bits) + 1, n_hist = P * (L1 - 1) * kBins;
  return {kw, L1, n_hist, 2 * P + P * L1, kw * (2 * P + 2 * P * L1) + 2 * P + 2 * C + n_hist + P * L1};
}

// Points b's workspace arrays into w64 / w32 (bracket_workspace(...) words, zeroed; w32 8-byte
// aligned); the fallback radix select shares b.solved.
inline void carve_bracket_workspace(BracketArgs& b, int64_t* w64, int32_t* w32, const BracketWorkspace& ws,
                                    int64_t P, int64_t C) {
  b.above = reinterpret_cast<unsigned long long*>(w64);
  b.inside = reinterpret_cast<unsigned long long*>(w64 + P);
  b.rank = w64 + 2 * P;
  b.lo = w32;
  b.hi = w32 + ws.key_words * P;
  b.range = w32 + 2 * ws.key_words * P;
  b.buffer_count = w32 + ws.key_words * (2 * P + 2 * P * ws.levels1);
  b.solved = b.buffer_count + P;
  b.inside_chunk = b.buffer_count + 2 * P;
  b.tie_chunk = b.inside_chunk + C;
  b.hist = b.tie_chunk + C;
  b.tickets = b.hist + ws.n_hist;
  b.radix.solved = b.solved;
}

}  // namespace bise_select

extern "C" {
// Enqueues the whole selection on `stream`; returns the first launch error (cudaSuccess if none).
cudaError_t bise_radix_select_launch(const bise_select::SelectArgs* args, cudaStream_t stream);

// Enqueues the bracket select, then the radix select for the problems it left.
cudaError_t bise_bracket_select_launch(const bise_select::BracketArgs* args, cudaStream_t stream);

// out[i] = key(s[i]) > key(thr) || (key(s[i]) == key(thr) && offset + i < *cut), raw bits in.
// check_finite: also a device-side assert on a NaN/inf score or thr (inf_bits: the bits of +inf in
// the scores' dtype; csrc/select_bracket.h finite_keys).
cudaError_t bise_keep_mask_launch(const void* bits, const void* thr_bits, const int64_t* cut, bool* out,
                                  int64_t n, int64_t offset, int key_bits, uint64_t inf_bits, int check_finite,
                                  cudaStream_t stream);
}
