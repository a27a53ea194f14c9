// Torch-free interface between the CUDA radix select (select.cu) and its ATen binding
// (select_binding.cpp). All pointers are device pointers; the binding allocates and zeroes the
// workspace with torch's caching allocator and passes the current stream.
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

struct SelectArgs {
  // Chunk table, struct of arrays, 5 rows of num_chunks int64: address, start, numel of its
  // tensor, flat offset of its tensor within its problem, problem id. A problem's chunks are
  // contiguous: chunk_first[p] .. chunk_first[p + 1].
  const int64_t* table;
  int64_t num_chunks;
  const int64_t* chunk_first;
  int32_t num_problems;
  int32_t key_bits;       // 32 (float32) or 16 (float16 / bfloat16): raw bits read as uint32 / uint16
  const void* hints;      // num_problems raw floats (same width) or nullptr: cold start
  // Workspace, zeroed by the caller except krem (= k per problem) and the outputs.
  int32_t* level;         // next digit level per problem
  uint32_t* prefix;       // key bits resolved so far
  int64_t* krem;          // rank still to find within the candidates (ties needed at the end)
  int32_t* buffer_count;  // candidates appended to the buffer (> kCapacity: overflowed)
  int32_t* buffer_level;  // level whose candidates the buffer holds (0: none yet)
  int32_t* hist;          // num_problems x (2 x levels) x kBins: cold rows, then warm-start rows
  int32_t* tickets;       // num_problems x (levels + 1)
  int32_t* tie_count;     // num_chunks
  uint32_t* buffer_key;   // num_problems x kCapacity
  int64_t* buffer_index;  // num_problems x kCapacity
  // Outputs.
  int32_t* threshold_bits;  // num_problems raw bits (16-bit floats sign-extended)
  int64_t* cut;             // num_problems
};

}  // namespace bise_select

extern "C" {
// Enqueues the whole selection on `stream`; returns the first launch error (cudaSuccess if none).
cudaError_t bise_radix_select_launch(const bise_select::SelectArgs* args, cudaStream_t stream);

// out[i] = key(s[i]) > key(thr) || (key(s[i]) == key(thr) && offset + i < *cut), raw bits in.
cudaError_t bise_keep_mask_launch(const void* bits, const void* thr_bits, const int64_t* cut, bool* out,
                                  int64_t n, int64_t offset, int key_bits, cudaStream_t stream);
}
