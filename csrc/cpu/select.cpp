// Exact top-k threshold selection on CPU (backend "cpp"): the k-th largest value of a tensor,
// of the virtual concatenation of several tensors, or of each tensor of a batch, plus the tie cut
// and the keep mask of the contract in bise_kernels/backends/reference.py.
//
// Values become order-preserving unsigned keys (-0.0 first canonicalised to +0.0). A selection
// keeps a known state: the k-th largest key lies in [lo, hi], `gt` entries lie above hi and `c`
// inside. Large inputs first try a bracket from a random sample (around rank k, or tightly
// around the warm-start hint): ONE fused pass counts entries above the bracket and compacts the
// few inside into per-chunk buffers; the selection then finishes inside the buffers, which are
// themselves a source for the same code. A bracket that misses still narrows the state; when
// the candidates are too many to compact, radix histogram passes (11-bit digits of key - lo)
// narrow [lo, hi] until they are few, or one value. Per-block counts recorded by the compacting
// pass locate the tie needed for `cut` by scanning a single block. The first fused pass also
// checks every key against the keys of finite scores: NaN / inf raise a ValueError (no extra read).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/Version.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "../checks.h"
#include "../select_bracket.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define BISE_SELECT_X86 1
#endif

namespace {

constexpr int64_t kBlock = 4096;       // tie location granularity (elements)
constexpr int64_t kSmall = 1 << 15;    // below this, compact everything, no sample
constexpr int64_t kSample = 1 << 16;   // sample size of large inputs

// ----------------------------------------------------------------------------- keys

// Keys, bracket ranks and narrowing: csrc/select_bracket.h (shared with the CUDA bracket select).
using bise_bracket::FiniteKeys;
using bise_bracket::from_key;
using bise_bracket::non_finite;
using bise_bracket::to_key;

// ----------------------------------------------------------------------------- sources

// A run of elements in flat order: raw float bits (keys computed on the fly) or keys.
template <typename U>
struct Seg {
  const U* p;
  int64_t n;
  int64_t off;  // flat index of p[0]
};

// Every bracket pass over a raw source also checks its keys against `finite` and records a NaN
// or inf in `nonfinite`: the finiteness check of the op, fused with a read the selection makes
// anyway. The first pass over the scores of every selection is a bracket pass (select(): the
// first attempt's, or finish()'s compacting pass of a small input), so every score is checked.
template <typename U>
struct Source {
  std::vector<Seg<U>> segs;
  int64_t n = 0;
  bool raw = true;
  FiniteKeys<U> finite{U(0), U(~U(0))};  // the raw scores' finite keys (default: all)
  mutable bool nonfinite = false;       // set (serially, after a pass) when a pass met one
  std::vector<uint8_t*> outs;           // per segment: its keep mask, where one is wanted (topk_keep_mask)

  void add(const U* p, int64_t len, uint8_t* out = nullptr) {
    if (len > 0) {
      segs.push_back({p, len, n});
      outs.push_back(out);
    }
    n += len;
  }
  // The keep mask entry of flat index `a` in segment s (a mask source only).
  uint8_t* out_at(size_t s, int64_t a) const { return outs[s] + (a - segs[s].off); }
  bool has_mask() const { return !outs.empty() && outs[0] != nullptr; }
  // Calls fn(ptr, len, flat) for the pieces of flat range [a, b); `s` is a segment cursor.
  template <typename F>
  void pieces(int64_t a, int64_t b, size_t& s, F&& fn) const {
    while (a < b) {
      while (segs[s].off + segs[s].n <= a) ++s;
      int64_t e = std::min(b, segs[s].off + segs[s].n);
      fn(segs[s].p + (a - segs[s].off), e - a, a);
      a = e;
    }
  }
  size_t seg_of(int64_t a) const {
    size_t lo = 0, hi = segs.size();
    while (hi - lo > 1) {
      size_t mid = (lo + hi) / 2;
      if (segs[mid].off <= a) lo = mid; else hi = mid;
    }
    return lo;
  }
};

// Contiguous block ranges [first[c], first[c + 1]) processed by chunk c.
struct Chunks {
  int64_t nblocks;
  std::vector<int64_t> first;
  explicit Chunks(int64_t n) {
    nblocks = (n + kBlock - 1) / kBlock;
    // >= 512k elements per thread: on a shared machine a parallel region can cost a scheduler
    // tick (~4 ms) when a worker must be woken, so smaller work (the buffers) stays serial.
    int64_t by_size = std::max<int64_t>(1, n / (128 * kBlock));
    int64_t nc = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), std::min(nblocks, by_size)));
    for (int64_t c = 0; c <= nc; ++c) first.push_back(c * nblocks / nc);
  }
  int64_t count() const { return int64_t(first.size()) - 1; }
};

template <typename F>
void for_chunks(const Chunks& ch, F&& fn) {
  at::parallel_for(0, ch.count(), 1, [&](int64_t b, int64_t e) {
    for (int64_t c = b; c < e; ++c) fn(c);
  });
}

// ----------------------------------------------------------------------------- fused bracket pass

// Counts entries above hi and inside [lo, hi] of one run; STORE also appends the keys inside.
// RAW (scores, not buffered keys): `bad` becomes true if a key is not in `fin` (NaN, +-inf).
// MASK (with RAW and STORE): out[i] = key > hi, and idx[m] = base + i beside each stored key.
template <bool RAW, bool STORE, bool MASK = false, typename U>
inline void scan_run_generic(const U* x, int64_t n, U lo, U hi, int64_t& gt, int64_t& m_out, U* buf,
                             FiniteKeys<U> fin, bool& bad, uint8_t* out = nullptr, uint32_t* idx = nullptr,
                             uint32_t base = 0) {
  int64_t m = m_out;  // a local: `out` (bytes) may alias the caller's count
  const U span = U(hi - lo);
  constexpr int V = 64 / sizeof(U) < 16 ? 16 : 64 / sizeof(U);
  int64_t i = 0, g = 0;
  U nf = 0;
  for (; i + V <= n; i += V) {
    // Lane-width flags and counts keep this group loop vectorisable for every key width.
    U k[V], above = 0, inside = 0;
    for (int j = 0; j < V; ++j) {
      k[j] = RAW ? to_key(x[i + j]) : x[i + j];
      above = U(above + U(k[j] > hi));
      inside = U(inside | U(U(k[j] - lo) <= span));
      if (RAW) nf = U(nf | U(non_finite(k[j], fin)));
      if (MASK) out[i + j] = k[j] > hi;
    }
    g += above;
    if (!inside) continue;
    for (int j = 0; j < V; ++j) {
      if (STORE) buf[m] = k[j];
      if (MASK) idx[m] = base + uint32_t(i + j);
      m += U(k[j] - lo) <= span;
    }
  }
  for (; i < n; ++i) {
    U k = RAW ? to_key(x[i]) : x[i];
    g += k > hi;
    if (STORE) buf[m] = k;
    if (MASK) {
      out[i] = k > hi;
      idx[m] = base + uint32_t(i);
    }
    m += U(k - lo) <= span;
    if (RAW) nf = U(nf | U(non_finite(k, fin)));
  }
  gt += g;
  m_out = m;
  bad = bad || nf != 0;
}

// scan_run_generic with its flags from run-time values: the portable scan_run, and the tail of the
// intrinsics ones. out != nullptr (a raw source, store): also the keep mask and offsets (MASK).
template <typename U>
void scan_run_portable(const U* x, int64_t n, bool raw, bool store, U lo, U hi, int64_t& gt, int64_t& m, U* buf,
                       FiniteKeys<U> fin, bool& bad, uint8_t* out, uint32_t* idx, uint32_t base) {
  if (out != nullptr) {
    scan_run_generic<true, true, true>(x, n, lo, hi, gt, m, buf, fin, bad, out, idx, base);
  } else if (raw) {
    store ? scan_run_generic<true, true>(x, n, lo, hi, gt, m, buf, fin, bad)
          : scan_run_generic<true, false>(x, n, lo, hi, gt, m, buf, fin, bad);
  } else {
    store ? scan_run_generic<false, true>(x, n, lo, hi, gt, m, buf, fin, bad)
          : scan_run_generic<false, false>(x, n, lo, hi, gt, m, buf, fin, bad);
  }
}

#ifdef BISE_SELECT_X86
// AVX-512 version for 32-bit raw floats: key transform, counts and compaction 16 lanes at a time.
// The compressed vector is always stored (unaligned, 16 lanes of slack) to avoid a branch.
__attribute__((target("avx512f,popcnt"))) int64_t scan_run_f32_avx512(
    const uint32_t* x, int64_t n, uint32_t lo, uint32_t hi, int64_t& gt, int64_t& m_out, uint32_t* buf, bool store,
    FiniteKeys<uint32_t> fin, bool& bad, uint8_t* out, uint32_t* idx, uint32_t base) {
  int64_t m = m_out;  // a local: `out` (bytes) may alias the caller's count
  const __m512i vlo = _mm512_set1_epi32(int(lo)), vspan = _mm512_set1_epi32(int(hi - lo));
  const __m512i vhi = _mm512_set1_epi32(int(hi)), sign = _mm512_set1_epi32(int(0x80000000u));
  const __m512i negz = _mm512_set1_epi32(0x7fffffff), one = _mm512_set1_epi32(1);
  const __m512i vflo = _mm512_set1_epi32(int(fin.lo)), vfspan = _mm512_set1_epi32(int(fin.span));
  const __m512i iota = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
  __m512i acc = _mm512_setzero_si512();
  __mmask16 nf = 0;
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    __m512i b = _mm512_loadu_si512(x + i);
    __m512i k = _mm512_xor_si512(b, _mm512_or_si512(_mm512_srai_epi32(b, 31), sign));
    k = _mm512_mask_add_epi32(k, _mm512_cmpeq_epi32_mask(k, negz), k, one);
    const __mmask16 above = _mm512_cmpgt_epu32_mask(k, vhi);
    acc = _mm512_mask_add_epi32(acc, above, acc, one);
    __mmask16 in = _mm512_cmple_epu32_mask(_mm512_sub_epi32(k, vlo), vspan);
    nf |= _mm512_cmpgt_epu32_mask(_mm512_sub_epi32(k, vflo), vfspan);
    if (store) _mm512_storeu_si512(buf + m, _mm512_maskz_compress_epi32(in, k));
    if (out != nullptr) {  // the keep mask (key > hi) and the flat offsets of the stored keys
      _mm_storeu_si128(reinterpret_cast<__m128i*>(out + i), _mm512_cvtepi32_epi8(_mm512_maskz_mov_epi32(above, one)));
      const __m512i at = _mm512_add_epi32(_mm512_set1_epi32(int(base + uint32_t(i))), iota);
      _mm512_storeu_si512(idx + m, _mm512_maskz_compress_epi32(in, at));
    }
    m += _mm_popcnt_u32(in);
  }
  gt += _mm512_reduce_add_epi32(acc);
  bad = bad || nf != 0;
  m_out = m;
  return i;
}

// The same for 16-bit raw floats (float16, bfloat16), 32 lanes at a time (needs VBMI2's vpcompressw).
__attribute__((target("avx512f,avx512bw,avx512vbmi2,popcnt"))) int64_t scan_run_f16_avx512(
    const uint16_t* x, int64_t n, uint16_t lo, uint16_t hi, int64_t& gt, int64_t& m_out, uint16_t* buf, bool store,
    FiniteKeys<uint16_t> fin, bool& bad, uint8_t* out, uint32_t* idx, uint32_t base) {
  int64_t m = m_out;  // a local: `out` (bytes) may alias the caller's count
  const __m512i vlo = _mm512_set1_epi16(short(lo)), vspan = _mm512_set1_epi16(short(uint16_t(hi - lo)));
  const __m512i vhi = _mm512_set1_epi16(short(hi)), sign = _mm512_set1_epi16(short(0x8000));
  const __m512i negz = _mm512_set1_epi16(0x7fff), one = _mm512_set1_epi16(1);
  const __m512i vflo = _mm512_set1_epi16(short(fin.lo)), vfspan = _mm512_set1_epi16(short(fin.span));
  const __m512i iota = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
  const __m512i sixteen = _mm512_set1_epi32(16);
  __mmask32 nf = 0;
  int64_t i = 0, g = 0;
  for (; i + 32 <= n; i += 32) {
    __m512i b = _mm512_loadu_si512(x + i);
    __m512i k = _mm512_xor_si512(b, _mm512_or_si512(_mm512_srai_epi16(b, 15), sign));
    k = _mm512_mask_add_epi16(k, _mm512_cmpeq_epi16_mask(k, negz), k, one);
    const __mmask32 above = _mm512_cmpgt_epu16_mask(k, vhi);
    g += _mm_popcnt_u32(above);
    __mmask32 in = _mm512_cmple_epu16_mask(_mm512_sub_epi16(k, vlo), vspan);
    nf |= _mm512_cmpgt_epu16_mask(_mm512_sub_epi16(k, vflo), vfspan);
    if (store) _mm512_storeu_si512(buf + m, _mm512_maskz_compress_epi16(in, k));
    if (out != nullptr) {  // the keep mask (key > hi) and the flat offsets of the stored keys
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + i), _mm512_cvtepi16_epi8(_mm512_maskz_mov_epi16(above, one)));
      const __m512i at = _mm512_add_epi32(_mm512_set1_epi32(int(base + uint32_t(i))), iota);
      const __mmask16 in_lo = __mmask16(in), in_hi = __mmask16(in >> 16);
      _mm512_storeu_si512(idx + m, _mm512_maskz_compress_epi32(in_lo, at));
      _mm512_storeu_si512(idx + m + _mm_popcnt_u32(in_lo),
                          _mm512_maskz_compress_epi32(in_hi, _mm512_add_epi32(at, sixteen)));
    }
    m += _mm_popcnt_u32(in);
  }
  gt += g;
  bad = bad || nf != 0;
  m_out = m;
  return i;
}

// The same for 64-bit raw floats (float64), 8 lanes at a time (vpcompressq; the offsets' vpcompressd
// reads the low 8 of 16 lanes).
__attribute__((target("avx512f,popcnt"))) int64_t scan_run_f64_avx512(
    const uint64_t* x, int64_t n, uint64_t lo, uint64_t hi, int64_t& gt, int64_t& m_out, uint64_t* buf, bool store,
    FiniteKeys<uint64_t> fin, bool& bad, uint8_t* out, uint32_t* idx, uint32_t base) {
  int64_t m = m_out;  // a local: `out` (bytes) may alias the caller's count
  const __m512i vlo = _mm512_set1_epi64(int64_t(lo)), vspan = _mm512_set1_epi64(int64_t(hi - lo));
  const __m512i vhi = _mm512_set1_epi64(int64_t(hi)), sign = _mm512_set1_epi64(INT64_MIN);
  const __m512i negz = _mm512_set1_epi64(INT64_MAX), one = _mm512_set1_epi64(1);
  const __m512i vflo = _mm512_set1_epi64(int64_t(fin.lo)), vfspan = _mm512_set1_epi64(int64_t(fin.span));
  const __m512i iota = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
  __m512i acc = _mm512_setzero_si512();
  __mmask8 nf = 0;
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    __m512i b = _mm512_loadu_si512(x + i);
    __m512i k = _mm512_xor_si512(b, _mm512_or_si512(_mm512_srai_epi64(b, 63), sign));
    k = _mm512_mask_add_epi64(k, _mm512_cmpeq_epi64_mask(k, negz), k, one);
    const __mmask8 above = _mm512_cmpgt_epu64_mask(k, vhi);
    acc = _mm512_mask_add_epi64(acc, above, acc, one);
    const __mmask8 in = _mm512_cmple_epu64_mask(_mm512_sub_epi64(k, vlo), vspan);
    nf |= _mm512_cmpgt_epu64_mask(_mm512_sub_epi64(k, vflo), vfspan);
    if (store) _mm512_storeu_si512(buf + m, _mm512_maskz_compress_epi64(in, k));
    if (out != nullptr) {  // the keep mask (key > hi) and the flat offsets of the stored keys
      _mm_storel_epi64(reinterpret_cast<__m128i*>(out + i), _mm512_cvtepi64_epi8(_mm512_maskz_mov_epi64(above, one)));
      const __m512i at = _mm512_add_epi32(_mm512_set1_epi32(int(base + uint32_t(i))), iota);
      _mm512_storeu_si512(idx + m, _mm512_maskz_compress_epi32(__mmask16(in), at));
    }
    m += _mm_popcnt_u32(in);
  }
  gt += _mm512_reduce_add_epi64(acc);
  bad = bad || nf != 0;
  m_out = m;
  return i;
}

// Left-pack tables for AVX2, which has no compress instruction: for an 8-bit lane mask, the lanes it
// selects in order (the slots after them repeat lane 0; stores have slack), as a vpermd control for 32-bit
// lanes (bytes, widened with vpmovzxbd) and as a pshufb control for the 16-bit lanes of a 128-bit half.
struct PackTables {
  alignas(64) uint8_t lanes32[256][8];
  alignas(64) uint8_t bytes16[256][16];
  constexpr PackTables() : lanes32{}, bytes16{} {
    for (int mk = 0; mk < 256; ++mk) {
      int j = 0;
      for (int l = 0; l < 8; ++l) {
        if ((mk >> l & 1) == 0) continue;
        lanes32[mk][j] = uint8_t(l);
        bytes16[mk][2 * j] = uint8_t(2 * l);
        bytes16[mk][2 * j + 1] = uint8_t(2 * l + 1);
        ++j;
      }
    }
  }
};
constexpr PackTables kPack{};

__attribute__((target("avx2"))) inline __m256i pack_control32(int mk) {
  return _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(kPack.lanes32[mk])));
}

// AVX2 version for 32-bit raw floats (CPUs without AVX-512, e.g. AMD before Zen 4, Intel client cores):
// 8 lanes at a time, the inside keys left-packed by a table-driven vpermd. AVX2 compares signed only, so
// the lanes hold s = key ^ sign (bits ^ ((bits >> 31) & 0x7fffffff)), whose signed order is the key order:
// above is s > hi ^ sign, inside is neither above nor below lo ^ sign, and the scores are finite when the
// least and the greatest s of the run lie within the finite keys (min / max: two ops a vector).
__attribute__((target("avx2,popcnt"))) int64_t scan_run_f32_avx2(
    const uint32_t* x, int64_t n, uint32_t lo, uint32_t hi, int64_t& gt, int64_t& m_out, uint32_t* buf, bool store,
    FiniteKeys<uint32_t> fin, bool& bad, uint8_t* out, uint32_t* idx, uint32_t base) {
  int64_t m = m_out;  // a local: `out` (bytes) may alias the caller's count
  constexpr uint32_t kSign = 0x80000000u;
  const __m256i sign = _mm256_set1_epi32(int(kSign)), low31 = _mm256_set1_epi32(0x7fffffff);
  const __m256i ones = _mm256_set1_epi32(-1), one = _mm256_set1_epi32(1);
  const __m256i vhi = _mm256_set1_epi32(int(hi ^ kSign)), vlo = _mm256_set1_epi32(int(lo ^ kSign));
  const __m256i iota = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i byte_of_lane = _mm256_setr_epi32(0, 4, 0, 0, 0, 0, 0, 0);  // after the packs below
  __m256i acc = _mm256_setzero_si256(), least = _mm256_set1_epi32(INT32_MAX), greatest = _mm256_set1_epi32(INT32_MIN);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + i));
    __m256i s = _mm256_xor_si256(b, _mm256_and_si256(_mm256_srai_epi32(b, 31), low31));
    s = _mm256_andnot_si256(_mm256_cmpeq_epi32(s, ones), s);  // -0.0 (s == -1) is +0.0 (s == 0)
    least = _mm256_min_epi32(least, s);
    greatest = _mm256_max_epi32(greatest, s);
    const __m256i above = _mm256_cmpgt_epi32(s, vhi);
    acc = _mm256_sub_epi32(acc, above);
    const __m256i outside = _mm256_or_si256(above, _mm256_cmpgt_epi32(vlo, s));
    const int mk = ~_mm256_movemask_ps(_mm256_castsi256_ps(outside)) & 0xff;
    const __m256i perm = pack_control32(mk);
    if (store) {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(buf + m), _mm256_permutevar8x32_epi32(_mm256_xor_si256(s, sign), perm));
    }
    if (out != nullptr) {  // the keep mask (key > hi) and the flat offsets of the stored keys
      __m256i a8 = _mm256_and_si256(above, one);
      a8 = _mm256_packs_epi16(_mm256_packs_epi32(a8, a8), a8);  // lane l's byte: byte l % 4 of 128-bit half l / 4
      _mm_storel_epi64(reinterpret_cast<__m128i*>(out + i),
                       _mm256_castsi256_si128(_mm256_permutevar8x32_epi32(a8, byte_of_lane)));
      const __m256i at = _mm256_add_epi32(_mm256_set1_epi32(int(base + uint32_t(i))), iota);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(idx + m), _mm256_permutevar8x32_epi32(at, perm));
    }
    m += _mm_popcnt_u32(unsigned(mk));
  }
  __m128i a4 = _mm_add_epi32(_mm256_castsi256_si128(acc), _mm256_extracti128_si256(acc, 1));
  a4 = _mm_add_epi32(a4, _mm_shuffle_epi32(a4, _MM_SHUFFLE(1, 0, 3, 2)));
  a4 = _mm_add_epi32(a4, _mm_shuffle_epi32(a4, _MM_SHUFFLE(2, 3, 0, 1)));
  gt += uint32_t(_mm_cvtsi128_si32(a4));
  const __m256i flo = _mm256_set1_epi32(int(fin.lo ^ kSign)), fhi = _mm256_set1_epi32(int((fin.lo + fin.span) ^ kSign));
  bad = bad || !_mm256_testz_si256(_mm256_or_si256(_mm256_cmpgt_epi32(flo, least), _mm256_cmpgt_epi32(greatest, fhi)), ones);
  m_out = m;
  return i;
}

// The same for 16-bit raw floats (float16, bfloat16), 16 lanes at a time, each 128-bit half left-packed
// by a table-driven pshufb. The count above hi gathers in 16-bit lanes, summed every 32767 vectors.
__attribute__((target("avx2,popcnt"))) int64_t scan_run_f16_avx2(
    const uint16_t* x, int64_t n, uint16_t lo, uint16_t hi, int64_t& gt, int64_t& m_out, uint16_t* buf, bool store,
    FiniteKeys<uint16_t> fin, bool& bad, uint8_t* out, uint32_t* idx, uint32_t base) {
  int64_t m = m_out;  // a local: `out` (bytes) may alias the caller's count
  constexpr uint16_t kSign = 0x8000u;
  const __m256i sign = _mm256_set1_epi16(short(kSign)), low15 = _mm256_set1_epi16(0x7fff);
  const __m256i ones = _mm256_set1_epi16(-1), one = _mm256_set1_epi16(1), zero = _mm256_setzero_si256();
  const __m256i vhi = _mm256_set1_epi16(short(hi ^ kSign)), vlo = _mm256_set1_epi16(short(lo ^ kSign));
  const __m256i iota = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), eight = _mm256_set1_epi32(8);
  __m256i least = _mm256_set1_epi16(INT16_MAX), greatest = _mm256_set1_epi16(INT16_MIN);
  int64_t i = 0, g = 0;
  while (i + 16 <= n) {
    __m256i acc = zero;  // at most 32767 per lane
    const int64_t stop = std::min(n - 15, i + 16 * int64_t(INT16_MAX));
    for (; i < stop; i += 16) {
      const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + i));
      __m256i s = _mm256_xor_si256(b, _mm256_and_si256(_mm256_srai_epi16(b, 15), low15));
      s = _mm256_andnot_si256(_mm256_cmpeq_epi16(s, ones), s);  // -0.0 is +0.0
      least = _mm256_min_epi16(least, s);
      greatest = _mm256_max_epi16(greatest, s);
      const __m256i above = _mm256_cmpgt_epi16(s, vhi);
      acc = _mm256_sub_epi16(acc, above);
      const __m256i outside = _mm256_or_si256(above, _mm256_cmpgt_epi16(vlo, s));
      const unsigned both = ~unsigned(_mm256_movemask_epi8(_mm256_packs_epi16(outside, zero)));
      const int mlo = int(both & 0xff), mhi = int(both >> 16 & 0xff);
      const int64_t m_hi = m + _mm_popcnt_u32(unsigned(mlo));
      if (store) {
        const __m256i k = _mm256_xor_si256(s, sign);
        _mm_storeu_si128(reinterpret_cast<__m128i*>(buf + m),
                         _mm_shuffle_epi8(_mm256_castsi256_si128(k), _mm_load_si128(reinterpret_cast<const __m128i*>(kPack.bytes16[mlo]))));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(buf + m_hi),
                         _mm_shuffle_epi8(_mm256_extracti128_si256(k, 1), _mm_load_si128(reinterpret_cast<const __m128i*>(kPack.bytes16[mhi]))));
      }
      if (out != nullptr) {  // the keep mask (key > hi) and the flat offsets of the stored keys
        const __m256i a8 = _mm256_packs_epi16(_mm256_and_si256(above, one), zero);  // bytes: half 0 | 0 | half 1 | 0
        _mm_storeu_si128(reinterpret_cast<__m128i*>(out + i),
                         _mm256_castsi256_si128(_mm256_permute4x64_epi64(a8, _MM_SHUFFLE(3, 1, 2, 0))));
        const __m256i at = _mm256_add_epi32(_mm256_set1_epi32(int(base + uint32_t(i))), iota);
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(idx + m), _mm256_permutevar8x32_epi32(at, pack_control32(mlo)));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(idx + m_hi),
                            _mm256_permutevar8x32_epi32(_mm256_add_epi32(at, eight), pack_control32(mhi)));
      }
      m = m_hi + _mm_popcnt_u32(unsigned(mhi));
    }
    const __m256i pairs = _mm256_madd_epi16(acc, _mm256_set1_epi16(1));  // 32-bit sums of lane pairs
    __m128i a4 = _mm_add_epi32(_mm256_castsi256_si128(pairs), _mm256_extracti128_si256(pairs, 1));
    a4 = _mm_add_epi32(a4, _mm_shuffle_epi32(a4, _MM_SHUFFLE(1, 0, 3, 2)));
    a4 = _mm_add_epi32(a4, _mm_shuffle_epi32(a4, _MM_SHUFFLE(2, 3, 0, 1)));
    g += _mm_cvtsi128_si32(a4);
  }
  gt += g;
  const __m256i flo = _mm256_set1_epi16(short(fin.lo ^ kSign)), fhi = _mm256_set1_epi16(short(uint16_t(fin.lo + fin.span) ^ kSign));
  bad = bad || !_mm256_testz_si256(_mm256_or_si256(_mm256_cmpgt_epi16(flo, least), _mm256_cmpgt_epi16(greatest, fhi)), ones);
  m_out = m;
  return i;
}

// The same for 64-bit raw floats (float64), 4 lanes at a time. AVX2 has no 64-bit shift right arithmetic
// or min / max: the sign comes from a compare, finiteness from two compares a vector. movemask_ps of a
// 64-bit lane mask sets both bits of each lane, so the 32-bit table packs whole 64-bit lanes.
__attribute__((target("avx2,popcnt"))) int64_t scan_run_f64_avx2(
    const uint64_t* x, int64_t n, uint64_t lo, uint64_t hi, int64_t& gt, int64_t& m_out, uint64_t* buf, bool store,
    FiniteKeys<uint64_t> fin, bool& bad, uint8_t* out, uint32_t* idx, uint32_t base) {
  int64_t m = m_out;  // a local: `out` (bytes) may alias the caller's count
  constexpr uint64_t kSign = uint64_t(1) << 63;
  const __m256i sign = _mm256_set1_epi64x(INT64_MIN), low63 = _mm256_set1_epi64x(INT64_MAX);
  const __m256i ones = _mm256_set1_epi64x(-1), zero = _mm256_setzero_si256();
  const __m256i vhi = _mm256_set1_epi64x(int64_t(hi ^ kSign)), vlo = _mm256_set1_epi64x(int64_t(lo ^ kSign));
  const __m256i flo = _mm256_set1_epi64x(int64_t(fin.lo ^ kSign));
  const __m256i fhi = _mm256_set1_epi64x(int64_t((fin.lo + fin.span) ^ kSign));
  const __m256i iota = _mm256_setr_epi32(0, 1, 2, 3, 0, 0, 0, 0);
  __m256i acc = zero, nonfinite = zero;
  int64_t i = 0;
  for (; i + 4 <= n; i += 4) {
    const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + i));
    __m256i s = _mm256_xor_si256(b, _mm256_and_si256(_mm256_cmpgt_epi64(zero, b), low63));
    s = _mm256_andnot_si256(_mm256_cmpeq_epi64(s, ones), s);  // -0.0 is +0.0
    nonfinite = _mm256_or_si256(nonfinite, _mm256_or_si256(_mm256_cmpgt_epi64(flo, s), _mm256_cmpgt_epi64(s, fhi)));
    const __m256i above = _mm256_cmpgt_epi64(s, vhi);
    acc = _mm256_sub_epi64(acc, above);
    const __m256i outside = _mm256_or_si256(above, _mm256_cmpgt_epi64(vlo, s));
    const int mk = ~_mm256_movemask_ps(_mm256_castsi256_ps(outside)) & 0xff;  // two bits a lane
    if (store) {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(buf + m),
                          _mm256_permutevar8x32_epi32(_mm256_xor_si256(s, sign), pack_control32(mk)));
    }
    if (out != nullptr) {  // the keep mask (key > hi) and the flat offsets of the stored keys
      const uint32_t bits = uint32_t(_mm256_movemask_pd(_mm256_castsi256_pd(above)));
      const uint32_t bytes = (bits * 0x204081u) & 0x01010101u;  // bit l to byte l (no carries: 7 apart)
      std::memcpy(out + i, &bytes, 4);
      const int lanes = ~_mm256_movemask_pd(_mm256_castsi256_pd(outside)) & 0xf;
      const __m256i at = _mm256_add_epi32(_mm256_set1_epi32(int(base + uint32_t(i))), iota);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(idx + m), _mm256_permutevar8x32_epi32(at, pack_control32(lanes)));
    }
    m += _mm_popcnt_u32(unsigned(mk)) / 2;
  }
  const __m128i a2 = _mm_add_epi64(_mm256_castsi256_si128(acc), _mm256_extracti128_si256(acc, 1));
  gt += _mm_cvtsi128_si64(a2) + _mm_extract_epi64(a2, 1);
  bad = bad || !_mm256_testz_si256(nonfinite, nonfinite);
  m_out = m;
  return i;
}

// Where ATen's CPU kernels use AVX-512: the CPU has it (F and BW: ATen's level needs both) and
// ATEN_CPU_CAPABILITY does not hold torch below it (=avx2 or =default runs the AVX2 or portable scan, as on a
// CPU without AVX-512; the results are the same bits).
bool has_avx512() {
  static const bool yes = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") != 0 && __builtin_cpu_supports("avx512bw") != 0 &&
           at::get_cpu_capability() == "AVX512";
  }();
  return yes;
}

// AVX2: the CPU has it and ATen's kernels use AVX2 or AVX-512 (ATEN_CPU_CAPABILITY=default runs the portable scan).
bool has_avx2() {
  static const bool yes = [] {
    __builtin_cpu_init();
    const std::string cap = at::get_cpu_capability();
    return __builtin_cpu_supports("avx2") != 0 && (cap == "AVX2" || cap == "AVX512");
  }();
  return yes;
}

bool has_avx512_vbmi2() {
  static const bool yes = [] {
    __builtin_cpu_init();
    return has_avx512() && __builtin_cpu_supports("avx512vbmi2");
  }();
  return yes;
}
#endif

// One run of the fused bracket pass: the widest intrinsics scan the CPU and ATen allow over whole vectors
// (each returns how many scores it scanned), then scan_run_portable over the rest (or all of a run).
template <typename U>
void scan_run(const U* x, int64_t n, bool raw, bool store, U lo, U hi, int64_t& gt, int64_t& m, U* buf,
              FiniteKeys<U> fin, bool& bad, uint8_t* out, uint32_t* idx, uint32_t base) {
  int64_t done = 0;
#ifdef BISE_SELECT_X86
  if constexpr (sizeof(U) == 4) {
    if (raw && has_avx512()) {
      done = scan_run_f32_avx512(x, n, lo, hi, gt, m, buf, store, fin, bad, out, idx, base);
    } else if (raw && has_avx2()) {
      done = scan_run_f32_avx2(x, n, lo, hi, gt, m, buf, store, fin, bad, out, idx, base);
    }
  }
  if constexpr (sizeof(U) == 8) {
    if (raw && has_avx512()) {
      done = scan_run_f64_avx512(x, n, lo, hi, gt, m, buf, store, fin, bad, out, idx, base);
    } else if (raw && has_avx2()) {
      done = scan_run_f64_avx2(x, n, lo, hi, gt, m, buf, store, fin, bad, out, idx, base);
    }
  }
  if constexpr (sizeof(U) == 2) {
    if (raw && has_avx512_vbmi2()) {
      done = scan_run_f16_avx512(x, n, lo, hi, gt, m, buf, store, fin, bad, out, idx, base);
    } else if (raw && has_avx2()) {
      done = scan_run_f16_avx2(x, n, lo, hi, gt, m, buf, store, fin, bad, out, idx, base);
    }
  }
#endif
  scan_run_portable(x + done, n - done, raw, store, lo, hi, gt, m, buf, fin, bad, out ? out + done : nullptr, idx,
                    base + uint32_t(done));
}

// Result of one bracket pass: counts, optional compacted keys, per-block positions.
template <typename U>
struct Pass {
  U lo, hi;
  int64_t gt = 0, in = 0;
  bool stored = false;                 // bufs hold every key inside [lo, hi] (in flat order)
  std::vector<std::vector<U>> bufs;    // per chunk
  std::vector<std::vector<uint32_t>> idx;  // mask passes: flat offset of each buffered key in its chunk
  std::vector<int64_t> blk_in;         // per block: chunk-local count inside [lo, hi] before it
  std::vector<int64_t> chunk_in;       // per chunk: count inside before it (prefix), size nchunks + 1
  Chunks chunks;
  explicit Pass(int64_t n) : chunks(n) {}

  Source<U> buffer() const {
    Source<U> s;
    s.raw = false;
    for (const auto& b : bufs) s.add(b.data(), int64_t(b.size()));
    return s;
  }
};

// One fused pass: counts entries above hi and inside [lo, hi]; compacts the inside keys when
// `store` (given up, leaving only counts, if some chunk would exceed `limit` keys). A source with
// keep masks (store) also gets mask = key > hi and the offsets of the compacted keys (fill_inside).
template <typename U>
Pass<U> bracket_pass(const Source<U>& src, U lo, U hi, bool store, int64_t limit, double expect_frac) {
  Pass<U> out(src.n);
  out.lo = lo;
  out.hi = hi;
  const Chunks& ch = out.chunks;
  const int64_t nc = ch.count();
  const bool mask = store && src.has_mask();
  out.blk_in.assign(ch.nblocks, 0);
  out.bufs.resize(nc);
  if (mask) out.idx.resize(nc);
  std::vector<int64_t> gts(nc, 0), ins(nc, 0);
  std::vector<char> overflow(nc, 0), bad(nc, 0);
  for_chunks(ch, [&](int64_t c) {
    const int64_t a = ch.first[c] * kBlock, b = std::min(src.n, ch.first[c + 1] * kBlock);
    auto& buf = out.bufs[c];
    // Offsets are 32-bit: a chunk of 2^32 scores or more (16 GB of float32) leaves the mask to keep_mask.
    bool keep = store && !(mask && b - a > int64_t(UINT32_MAX));
    overflow[c] = keep != store;
    auto grow = [&](int64_t size) {
      buf.resize(size);
      if (mask) out.idx[c].resize(size);
    };
    if (keep) grow(std::min<int64_t>(limit, int64_t(expect_frac * double(b - a)) + 2 * kBlock) + 64);
    int64_t gt = 0, m = 0;
    bool nonfinite = false;
    size_t s = src.seg_of(a);
    for (int64_t blk = ch.first[c]; blk < ch.first[c + 1]; ++blk) {
      out.blk_in[blk] = m;
      const int64_t ba = blk * kBlock, bb = std::min(b, ba + kBlock);
      if (keep && m + (bb - ba) + 64 > int64_t(buf.size())) {
        grow(std::min<int64_t>(limit, 2 * int64_t(buf.size())) + 2 * kBlock + 64);
      }
      src.pieces(ba, bb, s, [&](const U* p, int64_t len, int64_t flat) {
        const bool fill = keep && mask;
        scan_run(p, len, src.raw, keep, lo, hi, gt, m, buf.data(), src.finite, nonfinite,
                 fill ? src.out_at(s, flat) : nullptr, fill ? out.idx[c].data() : nullptr, uint32_t(flat - a));
      });
      if (keep && m > limit) {  // too many to compact: count only from here on
        keep = false;
        overflow[c] = 1;
      }
    }
    if (keep) grow(m); else grow(0);
    gts[c] = gt;
    ins[c] = m;
    bad[c] = nonfinite;
  });
  out.chunk_in.assign(nc + 1, 0);
  for (int64_t c = 0; c < nc; ++c) {
    src.nonfinite = src.nonfinite || bad[c];
    out.gt += gts[c];
    out.in += ins[c];
    out.chunk_in[c + 1] = out.chunk_in[c] + ins[c];
  }
  out.stored = store && std::none_of(overflow.begin(), overflow.end(), [](char o) { return o != 0; });
  return out;
}

// Flat index (in src) of the rank-th (0-based) entry inside the pass's [lo, hi], in flat order.
template <typename U>
int64_t locate(const Source<U>& src, const Pass<U>& pass, int64_t rank) {
  const auto& ci = pass.chunk_in;
  int64_t c = int64_t(std::upper_bound(ci.begin(), ci.end(), rank) - ci.begin()) - 1;
  int64_t local = rank - ci[c];
  auto first = pass.blk_in.begin() + pass.chunks.first[c], last = pass.blk_in.begin() + pass.chunks.first[c + 1];
  int64_t blk = int64_t(std::upper_bound(first, last, local) - pass.blk_in.begin()) - 1;
  int64_t left = local - pass.blk_in[blk];
  const U lo = pass.lo, span = U(pass.hi - pass.lo);
  const int64_t a = blk * kBlock, b = std::min(src.n, a + kBlock);
  size_t s = src.seg_of(a);
  int64_t found = -1;
  src.pieces(a, b, s, [&](const U* p, int64_t len, int64_t flat) {
    for (int64_t i = 0; i < len && found < 0; ++i) {
      U k = src.raw ? to_key(p[i]) : p[i];
      if (U(k - lo) <= span && left-- == 0) found = flat + i;
    }
  });
  TORCH_CHECK(found >= 0, "bise_kernels select: internal error locating a tie");
  return found;
}

// ----------------------------------------------------------------------------- radix refinement

// The selection state: the k-th largest key lies in [lo, hi]; gt keys lie above hi, c inside.
template <typename U>
struct State {
  U lo, hi;
  int64_t gt, c;
};

// One histogram pass of the 11-bit digit of (key - lo) over keys in [lo, hi]; narrows the state.
template <typename U>
State<U> refine(const Source<U>& src, State<U> st, int64_t k) {
  const U span = U(st.hi - st.lo);
  const int shift = bise_bracket::digit_shift(st.lo, st.hi);
  const int64_t nb = int64_t(span >> shift) + 1;
  Chunks ch(src.n);
  std::vector<std::vector<int64_t>> hists(ch.count());
  for_chunks(ch, [&](int64_t c) {
    auto& h = hists[c];
    h.assign(nb + 1, 0);
    const U lo = st.lo;
    const U out_of_range = U(nb);
    const int64_t a = ch.first[c] * kBlock, b = std::min(src.n, ch.first[c + 1] * kBlock);
    size_t s = src.seg_of(a);
    src.pieces(a, b, s, [&](const U* p, int64_t len, int64_t) {
      int64_t* hp = h.data();
      if (src.raw) {
        for (int64_t i = 0; i < len; ++i) {
          U d = U(to_key(p[i]) - lo);
          hp[d <= span ? U(d >> shift) : out_of_range]++;
        }
      } else {
        for (int64_t i = 0; i < len; ++i) {
          U d = U(p[i] - lo);
          hp[d <= span ? U(d >> shift) : out_of_range]++;
        }
      }
    });
  });
  int64_t above = st.gt;
  for (int64_t bkt = nb - 1; bkt >= 0; --bkt) {
    int64_t cnt = 0;
    for (const auto& h : hists) cnt += h[bkt];
    if (above + cnt >= k) {
      U lo = st.lo, hi = st.hi;
      bise_bracket::narrow(lo, hi, uint64_t(bkt), shift);
      return {lo, hi, above, cnt};
    }
    above += cnt;
  }
  TORCH_CHECK(false, "bise_kernels select: internal error in radix refinement");
}

// (threshold key, flat index in src of the tie that must be kept last).
template <typename U>
struct Pick {
  U thr;
  int64_t index;
};

template <typename U>
Pick<U> finish(const Source<U>& src, State<U> st, int64_t k) {
  for (;;) {
    if (st.lo == st.hi) {
      Pass<U> pass = bracket_pass(src, st.lo, st.hi, false, 0, 0.0);
      return {st.lo, locate(src, pass, k - st.gt - 1)};
    }
    const bool compact = src.raw ? st.c <= std::max(src.n / 8, kSmall) : st.c <= src.n / 8;
    if (compact) {
      double frac = double(st.c) / double(src.n);
      Pass<U> pass = bracket_pass(src, st.lo, st.hi, true, st.c + 64, frac);
      TORCH_CHECK(pass.stored && pass.in == st.c && pass.gt == st.gt, "bise_kernels select: internal error");
      // The buffer holds exactly the c keys of [lo, hi]: ranks restart there.
      Pick<U> inner = finish(pass.buffer(), State<U>{st.lo, st.hi, 0, st.c}, k - st.gt);
      return {inner.thr, locate(src, pass, inner.index)};
    }
    st = refine(src, st, k);
  }
}

// ----------------------------------------------------------------------------- sample brackets

uint64_t splitmix(uint64_t& s) {
  uint64_t z = (s += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

// Keys of random runs of 256 bytes each (deterministic seed): about min(n^(2/3), kSample) keys.
template <typename U>
std::vector<U> sample_keys(const Source<U>& src, int64_t k) {
  // About n^(2/3) entries balances the sample's selection cost against the bracket's width.
  const int64_t run = 256 / int64_t(sizeof(U));
  const int64_t size = std::min<int64_t>(kSample, int64_t(std::cbrt(double(src.n)) * std::cbrt(double(src.n))));
  const int64_t runs = std::max<int64_t>(1, std::min(size, src.n / 8) / run);
  std::vector<U> keys(runs * run);
  // Serial: a few hundred microseconds at most, not worth a thread synchronisation.
  uint64_t seed = uint64_t(src.n) * 31 + uint64_t(k);
  std::vector<int64_t> starts(runs);
  std::vector<size_t> segs(runs);
  for (int64_t r = 0; r < runs; ++r) {
    starts[r] = int64_t(splitmix(seed) % uint64_t(src.n - run + 1));
    segs[r] = src.seg_of(starts[r]);
  }
  constexpr int64_t ahead = 8;  // prefetch distance: the runs are independent cache misses
  for (int64_t r = 0; r < runs; ++r) {
    if (r + ahead < runs) {
      const Seg<U>& sg = src.segs[segs[r + ahead]];
      __builtin_prefetch(sg.p + (starts[r + ahead] - sg.off));
    }
    size_t s = segs[r];
    U* out = keys.data() + r * run;
    src.pieces(starts[r], starts[r] + run, s, [&](const U* p, int64_t len, int64_t) {
      for (int64_t i = 0; i < len; ++i) *out++ = to_key(p[i]);
    });
  }
  return keys;
}

// Exact sample order statistics at descending ranks (1-based, within [1, size]): a histogram of
// key - min with about one bucket per key finds each rank's bucket, nth_element finishes among
// that bucket's few keys.
template <typename U>
std::vector<U> order_stats(const std::vector<U>& keys, const std::vector<int64_t>& ranks) {
  const auto [mn, mx] = std::minmax_element(keys.begin(), keys.end());
  const U base = *mn, span = U(*mx - *mn);
  const int bits = std::clamp(int(std::bit_width(keys.size())) - 1, 8, 16);
  const int shift = std::max(0, int(std::bit_width(span)) - bits);
  std::vector<int32_t> hist(int64_t(span >> shift) + 1, 0);
  for (U key : keys) hist[U(key - base) >> shift]++;
  std::vector<U> out;
  for (int64_t rank : ranks) {
    int64_t bkt = int64_t(hist.size()) - 1, above = 0;
    while (above + hist[bkt] < rank) above += hist[bkt--];
    std::vector<U> inside;
    for (U key : keys)
      if ((U(key - base) >> shift) == U(bkt)) inside.push_back(key);
    auto it = inside.end() - (rank - above);
    std::nth_element(inside.begin(), it, inside.end());
    out.push_back(*it);
  }
  return out;
}

// The bracket [lo, hi] of sample ranks (csrc/select_bracket.h) over the sample `keys`.
template <typename U>
std::pair<U, U> bracket_of(const std::vector<U>& keys, bise_bracket::Ranks r, U hint) {
  std::vector<int64_t> ranks;
  for (int64_t rank : {r.lo, r.hi})
    if (rank >= 1) ranks.push_back(rank);
  const std::vector<U> ends = order_stats(keys, ranks);
  auto end = [&](int64_t rank, U unbounded, size_t at) {
    return rank == bise_bracket::kUnbounded ? unbounded : rank == bise_bracket::kAtHint ? hint : ends[at];
  };
  return {end(r.lo, U(0), 0), end(r.hi, U(~U(0)), ends.size() - 1)};
}

// Cold bracket: sample order statistics `sigmas` standard deviations either side of rank k.
template <typename U>
std::pair<U, U> cold_bracket(const std::vector<U>& keys, int64_t n, int64_t k, double sigmas) {
  return bracket_of(keys, bise_bracket::cold_ranks(n, k, int64_t(keys.size()), sigmas), U(0));
}

// Warm bracket: a few sample entries either side of the hint's key (about 0.2% of the data each
// side for a full sample), so a hint that moved by less than that costs one pass.
template <typename U>
std::pair<U, U> warm_bracket(const std::vector<U>& keys, U hint) {
  int64_t above = 0, below = 0;
  for (U key : keys) {
    above += key > hint;
    below += key < hint;
  }
  return bracket_of(keys, bise_bracket::warm_ranks(int64_t(keys.size()), above, below), hint);
}

// ----------------------------------------------------------------------------- one selection

// The keep mask of the entries a mask pass buffered (those inside its bracket), from the pick:
// key > thr, or key == thr up to the kept tie's flat index. The rest of the mask (key > hi) was
// written by the pass.
template <typename U>
void fill_inside(const Source<U>& src, const Pass<U>& pass, Pick<U> pick) {
  for_chunks(pass.chunks, [&](int64_t c) {
    const int64_t a = pass.chunks.first[c] * kBlock;
    const auto& keys = pass.bufs[c];
    const auto& offs = pass.idx[c];
    const U thr = pick.thr;
    const int64_t last = pick.index - a;  // the kept tie's offset from a
    size_t s = src.seg_of(a), j = 0;
    while (j < keys.size()) {  // the keys of one segment at a time, their offsets relative to a
      while (src.segs[s].off + src.segs[s].n <= a + int64_t(offs[j])) ++s;
      const int64_t end = src.segs[s].off + src.segs[s].n - a;
      const size_t stop = size_t(std::lower_bound(offs.begin() + j, offs.end(), uint64_t(end),
                                                  [](uint32_t o, uint64_t e) { return o < e; }) - offs.begin());
      uint8_t* out = src.outs[s];
      const int64_t shift = a - src.segs[s].off;  // out[offset + shift]: the entry at flat index a + offset
      // Branch-free: the keys of a bracket lie either side of thr at random (measured with || and
      // &&: topk_keep_mask of 1 M scores, 53 k in the bracket, 0.84 ms per call; branch-free 0.63).
      // A segment at a time, its offsets found by one search (no segment test per key): 1 M float32,
      // one thread, AMD EPYC (Zen 4), 0.47 -> 0.42 ms with AVX-512, 0.54 -> 0.48 with AVX2.
      for (; j < stop; ++j) {
        const uint32_t o = offs[j];
        out[o + shift] = uint8_t(keys[j] > thr) | uint8_t((keys[j] == thr) & (int64_t(o) <= last));
      }
    }
  });
}

// Exact k-th largest (1-based k) of a raw source: tries the warm then cold brackets, each
// narrowing the state when it misses, then finishes by radix refinement.
//
// A source with keep masks: the bracket pass that holds rank k writes them (key > hi) and stores
// the offsets of its buffered keys; the finish then sets the buffered entries' mask (fill_inside)
// and *masked becomes true. Otherwise (small input, missed or overflowed bracket) the caller
// writes the masks in a keep_mask pass.
template <typename U>
Pick<U> select(const Source<U>& src, int64_t k, const U* hint, bool* masked = nullptr) {
  State<U> st{U(0), U(~U(0)), 0, src.n};
  if (src.n <= kSmall) return finish(src, st, k);
  const std::vector<U> keys = sample_keys(src, k);
  const int64_t limit = std::max(src.n / 8, kSmall);
  // Attempts: the warm bracket, the cold one, then a 4x wider cold one (the sample's runs of
  // 256 bytes are correlated on sorted-like data, so its spread can be underestimated).
  for (int attempt = hint ? 0 : 1; attempt < 3; ++attempt) {
    auto [a, b] = attempt == 0 ? warm_bracket(keys, to_key(*hint)) : cold_bracket(keys, src.n, k, bise_bracket::kSigmas * attempt * attempt);
    a = std::max(a, st.lo);
    b = std::min(b, st.hi);
    if (a > b) continue;
    int64_t in_sample = 0;
    for (U key : keys) in_sample += key >= a && key <= b;
    double frac = double(in_sample) / double(keys.size()) * 1.25;
    Pass<U> pass = bracket_pass(src, a, b, a < b || src.has_mask(), limit, frac);
    if (bise_bracket::hits(pass.gt, pass.in, k)) {
      Pick<U> pick;
      if (a == b) {
        pick = {a, locate(src, pass, k - pass.gt - 1)};
      } else if (!pass.stored) {
        return finish(src, State<U>{a, b, pass.gt, pass.in}, k);
      } else {
        Pick<U> inner = finish(pass.buffer(), State<U>{a, b, 0, pass.in}, k - pass.gt);
        pick = {inner.thr, locate(src, pass, inner.index)};
      }
      if (pass.stored && src.has_mask()) {
        fill_inside(src, pass, pick);
        *masked = true;
      }
      return pick;
    }
    if (k <= pass.gt) {
      st = {U(b + 1), st.hi, st.gt, pass.gt - st.gt};
    } else {
      st = {st.lo, U(a - 1), pass.gt + pass.in, (st.gt + st.c) - (pass.gt + pass.in)};
    }
  }
  return finish(src, st, k);
}

// ----------------------------------------------------------------------------- tensor glue

template <typename U>
U scalar_bits(const at::Tensor& t) {
  U bits;
  std::memcpy(&bits, t.data_ptr(), sizeof(U));
  return bits;
}

template <typename U>
at::Tensor scalar_of_bits(U bits, at::ScalarType dtype) {
  at::Tensor t = at::empty({}, at::TensorOptions().dtype(dtype));
  std::memcpy(t.data_ptr(), &bits, sizeof(U));
  return t;
}

template <typename F>
auto dispatch_bits(at::ScalarType dtype, F&& fn) {
  switch (dtype) {
    case at::kFloat: return fn(uint32_t{});
    case at::kHalf:
    case at::kBFloat16: return fn(uint16_t{});
    case at::kDouble: return fn(uint64_t{});
    default: TORCH_CHECK_TYPE(false, "scores must be float32, float16, bfloat16 or float64, got ", dtype);
  }
}

template <typename U>
Source<U> source_of(const std::vector<at::Tensor>& contiguous) {
  Source<U> src;
  for (const auto& t : contiguous) src.add(reinterpret_cast<const U*>(t.data_ptr()), t.numel());
  src.finite = bise_bracket::finite_keys(U(bise_checks::inf_bits(contiguous[0].scalar_type())));
  return src;
}

// Mask of s > thr or (s == thr and offset + i < cut), compared as keys (so -0.0 == +0.0). CHECK:
// also whether a score is NaN or +-inf (exponent all ones), on its raw bits: (bits & inf) + the
// exponent's low bit reaches the sign bit only then (inf: the bits of +inf), ORed by a second loop
// over each block of 4096 while it is in L1. 1 M fp32 scores, one thread: 452 us unchecked, 526
// checked; the check in the mask loop itself took 878 (an unsigned max of key - lo: 930), and the
// Python check (a sum) adds ~190; a 1024x1024 "keep" MaskedLinear's mask per scores update 773 us
// with this check, 904 with the Python one (256x256: 45.0 / 50.9; /tmp benchmark, load 1.8).
// The loop is also compiled for AVX-512 and AVX2 (the level of the select's scan): 1 M fp32, one
// thread, on the Xeon: 200 / 250 us unchecked, 230 / 290 checked, where the SSE2 build takes 450 / 510
// (4 M: 0.90 / 0.99 ms against 1.92 / 1.53 before; bfloat16 0.52 / 0.58 against 0.72 / 0.66).
template <bool CHECK, typename U>
__attribute__((always_inline)) inline bool keep_mask_loop(const U* x, uint8_t* out, int64_t n, U t, bool ties, U inf) {
  const U low = U(inf & U(~inf + 1));
  U acc = 0;
  for (int64_t b = 0; b < n; b += 4096) {
    const int64_t e = std::min<int64_t>(n, b + 4096);
    if (ties) {
      for (int64_t i = b; i < e; ++i) out[i] = to_key(x[i]) >= t;
    } else {
      for (int64_t i = b; i < e; ++i) out[i] = to_key(x[i]) > t;
    }
    if (CHECK) {
      for (int64_t i = b; i < e; ++i) acc = U(acc | U(U(x[i] & inf) + low));
    }
  }
  return (acc & bise_bracket::sign_bit<U>()) != 0;
}

#ifdef BISE_SELECT_X86  // the same loop, vectorised by the compiler for AVX-512 / AVX2
template <bool CHECK, typename U>
__attribute__((target("avx512f,avx512bw"))) bool keep_mask_loop_avx512(const U* x, uint8_t* out, int64_t n, U t, bool ties, U inf) {
  return keep_mask_loop<CHECK>(x, out, n, t, ties, inf);
}
template <bool CHECK, typename U>
__attribute__((target("avx2"))) bool keep_mask_loop_avx2(const U* x, uint8_t* out, int64_t n, U t, bool ties, U inf) {
  return keep_mask_loop<CHECK>(x, out, n, t, ties, inf);
}
#endif

template <bool CHECK, typename U>
bool keep_mask_run(const U* x, uint8_t* out, int64_t n, U t, bool ties, U inf) {
#ifdef BISE_SELECT_X86
  if (has_avx512()) return keep_mask_loop_avx512<CHECK>(x, out, n, t, ties, inf);
  if (has_avx2()) return keep_mask_loop_avx2<CHECK>(x, out, n, t, ties, inf);
#endif
  return keep_mask_loop<CHECK>(x, out, n, t, ties, inf);
}

// out[i] = x[i] > t or (x[i] == t and i < split), as keys, for i < n: one parallel pass. CHECK:
// returns whether a score is NaN or +-inf (keep_mask's finiteness check, no extra read).
template <bool CHECK, typename U>
bool keep_mask_into(const U* x, uint8_t* out, int64_t n, U t, int64_t split, U inf = 0) {
  split = std::clamp<int64_t>(split, 0, n);
  std::atomic<bool> bad{false};
  at::parallel_for(0, n, 1 << 20, [&](int64_t b, int64_t e) {  // serial below 1 M: see Chunks
    const int64_t m = std::clamp(split, b, e);
    const bool nf = keep_mask_run<CHECK>(x + b, out + b, m - b, t, true, inf) |
                    keep_mask_run<CHECK>(x + m, out + m, e - m, t, false, inf);
    if (nf) bad.store(true, std::memory_order_relaxed);
  });
  return bad.load();
}

std::vector<at::Tensor> contiguous_all(const at::TensorList& scores) {
  std::vector<at::Tensor> out;
  for (const auto& t : scores) out.push_back(t.contiguous());
  return out;
}

// One k over the concatenation of the scores: (thr, cut); with `masks`, also the keep mask of each
// tensor (topk_keep_mask), written by the selection's fused pass where the bracket holds rank k
// (the pass writes key > hi; the finish, the entries inside the bracket), else by a keep_mask pass.
std::tuple<at::Tensor, at::Tensor> select_one_k(at::TensorList scores, int64_t k, const std::optional<at::Tensor>& hint,
                                                const char* op, std::vector<at::Tensor>* masks = nullptr) {
  bise_checks::check_select_scores(scores, op, at::kCPU);
  bise_checks::check_ks(scores, {k}, /*batched=*/false, op);
  bise_checks::check_hints(hint, 1, "hint", op);
  const auto dtype = scores[0].scalar_type();
  const auto tensors = contiguous_all(scores);
  if (masks) {
    for (const auto& t : scores) masks->push_back(at::empty(t.sizes(), t.options().dtype(at::kBool)));
  }
  return dispatch_bits(dtype, [&](auto zero) {
    using U = decltype(zero);
    Source<U> src = source_of<U>(tensors);
    if (masks) {
      for (size_t i = 0; i < masks->size(); ++i) src.outs[i] = reinterpret_cast<uint8_t*>((*masks)[i].data_ptr());
    }
    U hint_bits;
    if (hint) hint_bits = scalar_bits<U>(hint->to(at::kCPU, dtype).contiguous());
    bool masked = false;
    const Pick<U> pick = select(src, k, hint ? &hint_bits : nullptr, masks ? &masked : nullptr);
    if (src.nonfinite) bise_checks::fail_non_finite(scores, op);
    if (masks && !masked) {
      for (size_t s = 0; s < src.segs.size(); ++s) {
        const Seg<U>& sg = src.segs[s];
        keep_mask_into<false>(sg.p, src.outs[s], sg.n, pick.thr, pick.index + 1 - sg.off);  // select checked
      }
    }
    return std::make_tuple(scalar_of_bits(from_key(pick.thr), dtype),
                           at::scalar_tensor(pick.index + 1, at::TensorOptions().dtype(at::kLong)));
  });
}

std::tuple<at::Tensor, at::Tensor> topk_select_cpu(at::TensorList scores, int64_t k,
                                                   const std::optional<at::Tensor>& hint) {
  return select_one_k(scores, k, hint, "bise_kernels_ext::topk_select");
}

// Splits the small tensors into at most `groups` lists of about equal total size (largest first).
std::vector<std::vector<int64_t>> balance(const std::vector<int64_t>& idx, const std::vector<int64_t>& sizes, int groups) {
  std::vector<int64_t> order = idx;
  std::sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return sizes[a] > sizes[b]; });
  std::vector<std::vector<int64_t>> out(groups);
  std::vector<int64_t> load(groups, 0);
  for (int64_t i : order) {
    int g = int(std::min_element(load.begin(), load.end()) - load.begin());
    out[g].push_back(i);
    load[g] += sizes[i];
  }
  return out;
}

std::tuple<at::Tensor, at::Tensor> batched_topk_select_cpu(at::TensorList scores, at::IntArrayRef ks,
                                                           const std::optional<at::Tensor>& hints) {
  constexpr const char* op = "bise_kernels_ext::batched_topk_select";
  bise_checks::check_select_scores(scores, op, at::kCPU);
  const std::vector<int64_t> sizes = bise_checks::check_ks(scores, ks, /*batched=*/true, op);
  bise_checks::check_hints(hints, scores.size(), "hints", op);
  const int64_t L = int64_t(scores.size());
  const auto dtype = scores[0].scalar_type();
  const auto tensors = contiguous_all(scores);
  at::Tensor hint_vals;
  if (hints) hint_vals = hints->to(at::kCPU, dtype).contiguous().reshape({L});
  at::Tensor thrs = at::empty({L}, at::TensorOptions().dtype(dtype));
  at::Tensor cuts = at::empty({L}, at::TensorOptions().dtype(at::kLong));
  dispatch_bits(dtype, [&](auto zero) {
    using U = decltype(zero);
    U* thr_out = reinterpret_cast<U*>(thrs.data_ptr());
    int64_t* cut_out = cuts.data_ptr<int64_t>();
    const U* hint_bits = hints ? reinterpret_cast<const U*>(hint_vals.data_ptr()) : nullptr;
    std::vector<char> nonfinite(L, 0);
    auto one = [&](int64_t i) {
      const Source<U> src = source_of<U>({tensors[i]});
      const Pick<U> pick = select(src, ks[i], hint_bits ? hint_bits + i : nullptr);
      nonfinite[i] = src.nonfinite;
      thr_out[i] = from_key(pick.thr);
      cut_out[i] = pick.index + 1;
    };
    // Tensors too big to balance across threads run one after another, each parallel inside;
    // the others are spread over the threads, one parallel region for all of them.
    const int64_t threads = at::get_num_threads();
    int64_t total = 0;
    for (int64_t size : sizes) total += size;
    std::vector<int64_t> small;
    for (int64_t i = 0; i < L; ++i) {
      if (sizes[i] * 2 * threads > total && sizes[i] >= threads * 16 * kBlock) one(i); else small.push_back(i);
    }
    const auto groups = balance(small, sizes, std::max(1, at::get_num_threads()));
    at::parallel_for(0, int64_t(groups.size()), 1, [&](int64_t b, int64_t e) {
      for (int64_t g = b; g < e; ++g)
        for (int64_t i : groups[g]) one(i);
    });
    if (std::any_of(nonfinite.begin(), nonfinite.end(), [](char b) { return b != 0; })) {
      bise_checks::fail_non_finite(scores, op);
    }
    return 0;
  });
  return {thrs, cuts};
}

// check_finite: the pass also checks the scores (and thr first) finite, a ValueError with the
// message of bise_kernels/_checks.py::check_finite if not: the value check of a selection left
// unchecked by its caller (a module's threshold in "keep" mask mode, bise_kernels/nn/_scored.py).
at::Tensor keep_mask_cpu(const at::Tensor& scores, const at::Tensor& thr, const at::Tensor& cut, int64_t offset,
                         bool check_finite) {
  bise_checks::check_keep_mask(scores, thr, cut, "bise_kernels_ext::keep_mask", at::kCPU);
  const auto dtype = scores.scalar_type();
  const at::Tensor x = scores.contiguous();
  at::Tensor out = at::empty(scores.sizes(), scores.options().dtype(at::kBool));
  const int64_t n = x.numel();
  const int64_t c = cut.item<int64_t>();
  dispatch_bits(dtype, [&](auto zero) {
    using U = decltype(zero);
    const U t = to_key(scalar_bits<U>(thr.contiguous()));
    const auto* xp = reinterpret_cast<const U*>(x.data_ptr());
    auto* op = reinterpret_cast<uint8_t*>(out.data_ptr());
    if (!check_finite) {
      keep_mask_into<false>(xp, op, n, t, c - offset);
      return 0;
    }
    const U inf = U(bise_checks::inf_bits(dtype));
    if (non_finite(t, bise_bracket::finite_keys(inf))) bise_checks::fail_non_finite(thr, "threshold");
    if (keep_mask_into<true>(xp, op, n, t, c - offset, inf)) bise_checks::fail_non_finite(x, "scores");
    return 0;
  });
  return out;
}

// The keep masks of the exact top-k over the concatenation of the scores, one per tensor (of its
// shape): topk_select then keep_mask, in one pass over the scores where it can (select_one_k).
std::vector<at::Tensor> topk_keep_mask_cpu(at::TensorList scores, int64_t k, const std::optional<at::Tensor>& hint) {
  std::vector<at::Tensor> masks;
  select_one_k(scores, k, hint, "bise_kernels_ext::topk_keep_mask", &masks);
  return masks;
}

}  // namespace

TORCH_LIBRARY_IMPL(bise_kernels_ext, CPU, m) {
  m.impl("topk_select", &topk_select_cpu);
  m.impl("batched_topk_select", &batched_topk_select_cpu);
  m.impl("keep_mask", &keep_mask_cpu);
  m.impl("topk_keep_mask", &topk_keep_mask_cpu);
}
