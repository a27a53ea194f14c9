// Runs the CUDA selects (csrc/cuda/select*.cu, compiled for the CPU with emu.h) on the problems of
// a file and writes their results: tests/kernels/test_select_cuda_emulated.py writes the input,
// compares the output with the reference backend. The chunk table and the workspaces are laid out
// as in csrc/cuda/select_binding.cpp.
//
// Input (int64 words): runs; per run: key_bits (16, 32, 64), algorithm (0 radix, 1 bracket,
// 2 bracket-miss, 3 bracket-overflow), the bits of +inf in the dtype, shift (each tensor starts
// that many elements into its allocation: 1 makes it unaligned for 128-bit loads), masks (1:
// topk_keep_mask's masks, bracket algorithms only), problems; per problem: k, has_hint, hint bits,
// tensors; per tensor: numel, then numel words of raw bits. Output per run and problem: threshold
// bits, cut, path (bracket algorithms: 0 missed, 1 single value, 2 buffered, 3 overflowed; radix:
// -1), of the keep_mask kernel run on each of its tensors with that selection: the entries kept
// and the sum of (flat index + 1)^2 over them, and the run's failed device-side checks (the
// finiteness check: BISE_DEVICE_CHECK, counted by emu.h); then, with masks, numel words (0 / 1) per
// tensor. On stdout: the message of each run whose checks failed, one a line. "keep" before the
// files: the keep_mask kernel alone, with its finiteness check (run_keep).
#include <cstdio>
#include <cstring>
#include <fstream>
#include <limits>
#include <memory>
#include <vector>

#include "emu.h"
#include "device_check.cuh"
#include "select.h"
#include "select_bracket.h"

using namespace bise_select;

extern "C" {
int emu_failed_checks = 0;
const char* emu_last_message = "";
}

namespace {

constexpr int32_t kUnwritten32 = std::numeric_limits<int32_t>::max();
constexpr int64_t kUnwritten64 = std::numeric_limits<int64_t>::max();

struct Problem {
  int64_t k, has_hint, hint;
  std::vector<std::vector<uint64_t>> tensors;
};

// The low kb bits of each of `words`, packed as kb-bit floats (x86-64 is little-endian).
std::vector<char> packed(const std::vector<uint64_t>& words, int kb) {
  std::vector<char> out(words.size() * kb / 8);
  for (size_t i = 0; i < words.size(); ++i) std::memcpy(out.data() + i * kb / 8, &words[i], kb / 8);
  return out;
}

// Entry p of an array of keys or of threshold bits of width kb (select.h: key_words).
uint64_t word_at(const void* array, int64_t p, int kb) {
  return kb == 64 ? static_cast<const uint64_t*>(array)[p] : static_cast<const uint32_t*>(array)[p];
}

// Guard zones around every array the kernels index (the scores, the masks, the workspaces and
// candidate buffers): kGuard entries either side, a multiple of 16 bytes (alignment as without
// them). The scores' hold NaN (all ones in any width): a first pass reading one fails its
// finiteness check; the others hold a sentinel, checked after the run: a write past either end of
// an array shows as "GUARD <array>" on stdout (which the test accepts only as NOT_FINITE lines).
constexpr int64_t kGuard = 16;
constexpr uint64_t kGuardNaN = ~uint64_t{0};

template <typename T>
struct Guarded {
  std::vector<T> store;
  T sentinel;
  Guarded(size_t n, T fill, T guard) : store(n + 2 * kGuard, guard), sentinel(guard) {
    std::fill(store.begin() + kGuard, store.end() - kGuard, fill);
  }
  T* data() { return store.data() + kGuard; }
  bool intact() const {
    for (int64_t i = 0; i < kGuard; ++i) {
      if (!(store[i] == sentinel) || !(store[store.size() - 1 - i] == sentinel)) return false;
    }
    return true;
  }
};

void check_guard(bool intact, const char* what) {
  if (!intact) std::printf("GUARD %s\n", what);
}

std::vector<int64_t> words;
size_t pos = 0;
int64_t next() { return words.at(pos++); }

void run(int kb, int algo, uint64_t inf, int64_t shift, bool with_masks, const std::vector<Problem>& probs,
         std::vector<int64_t>& out) {
  const int64_t P = static_cast<int64_t>(probs.size());
  std::vector<std::vector<char>> copies;  // the tensors at width kb, kGuard + `shift` elements in
  std::vector<std::unique_ptr<Guarded<unsigned char>>> masks;  // per tensor (topk_keep_mask)
  std::vector<int64_t> numels, mask_rows;       // per tensor; per chunk
  std::vector<std::pair<int64_t, int64_t>> placed;  // per copy: its problem and flat offset there
  std::vector<int64_t> rows[5], first(P + 1, 0), total(P, 0), ks;
  for (int64_t p = 0; p < P; ++p) {
    for (const auto& t : probs[p].tensors) {
      std::vector<uint64_t> shifted(kGuard + shift, kGuardNaN);
      shifted.insert(shifted.end(), t.begin(), t.end());
      shifted.insert(shifted.end(), kGuard, kGuardNaN);
      copies.push_back(packed(shifted, kb));
      placed.emplace_back(p, total[p]);
      const int64_t n = static_cast<int64_t>(t.size());
      masks.emplace_back(new Guarded<unsigned char>(n, 0, 0xA5));
      numels.push_back(n);
      const int64_t addr = reinterpret_cast<int64_t>(copies.back().data() + (kGuard + shift) * kb / 8);
      for (int64_t start = 0; start < n; start += kChunk) {
        for (auto [row, value] : {std::pair{0, addr}, {1, start}, {2, n}, {3, total[p]}, {4, p}}) rows[row].push_back(value);
        mask_rows.push_back(reinterpret_cast<int64_t>(masks.back()->data()));
      }
      total[p] += n;
      first[p + 1] = static_cast<int64_t>(rows[0].size());
    }
    ks.push_back(probs[p].k);
  }
  const int64_t C = static_cast<int64_t>(rows[0].size());
  std::vector<int64_t> table;
  for (auto& row : rows) table.insert(table.end(), row.begin(), row.end());
  std::vector<int64_t> krem = ks, cut(P, -1);
  const RadixWorkspace radix_layout = radix_workspace(P, C, kb);
  Guarded<int32_t> ws(radix_layout.words, 0, 0x5A5A5A5A);
  // What the binding takes from at::empty holds what torch's deterministic mode fills it with (an
  // integer's max: torch.utils.deterministic.fill_uninitialized_memory), so a read before a write shows.
  Guarded<int32_t> buffer_key(P * kCapacity * radix_layout.key_words, kUnwritten32, 0x5A5A5A5A);
  Guarded<int64_t> buffer_index(P * kCapacity, kUnwritten64, 0x5A5A5A5A);
  std::vector<uint64_t> hint_words(P);
  bool hinted = false;
  for (int64_t p = 0; p < P; ++p) {
    hint_words[p] = static_cast<uint64_t>(probs[p].hint);
    hinted |= probs[p].has_hint != 0;
  }
  const std::vector<char> hints = packed(hint_words, kb);
  SelectArgs a{};
  a.table = table.data();
  a.num_chunks = C;
  a.chunk_first = first.data();
  a.num_problems = static_cast<int32_t>(P);
  a.key_bits = kb;
  a.hints = hinted ? hints.data() : nullptr;
  carve_radix_workspace(a, ws.data(), radix_layout, P);
  std::vector<int64_t> threshold_bits(P, kUnwritten64);  // as the binding: an output of its own (room for int64 bits)
  a.threshold_bits = threshold_bits.data();
  a.krem = krem.data();
  a.buffer_key = buffer_key.data();
  a.buffer_index = buffer_index.data();
  a.cut = cut.data();
  a.solved = nullptr;
  auto set_finite = [&](auto bits) {
    const auto f = bise_bracket::finite_keys(bits);
    a.finite_lo = f.lo;
    a.finite_span = f.span;
  };
  kb == 64 ? set_finite(inf) : kb == 32 ? set_finite(static_cast<uint32_t>(inf)) : set_finite(static_cast<uint16_t>(inf));

  std::vector<int64_t> buffers(P + 1, 0), no_buffers(P + 1, 0);
  for (int64_t p = 0; p < P; ++p) buffers[p + 1] = buffers[p] + bise_bracket::buffer_capacity(total[p], ks[p], kSample);
  const bool overflow = algo == 3;
  int64_t largest = 0;
  for (int64_t p = 0; p < P; ++p) largest = std::max(largest, buffers[p + 1] - buffers[p]);
  const BracketWorkspace bracket_layout = bracket_workspace(P, C, kb);
  Guarded<int64_t> ws64(bracket_layout.words64, 0, 0x5A5A5A5A);
  Guarded<int32_t> ws32(bracket_layout.words32, 0, 0x5A5A5A5A);
  Guarded<int32_t> keys(overflow ? 0 : buffers[P] * bracket_layout.key_words, kUnwritten32, 0x5A5A5A5A);
  Guarded<uint32_t> index(overflow ? 0 : buffers[P], kUnwritten32, 0x5A5A5A5A);
  BracketArgs b{};
  b.radix = a;
  b.ks = ks.data();
  b.buffer_first = overflow ? no_buffers.data() : buffers.data();
  b.finish_blocks = static_cast<int32_t>(std::max<int64_t>(1, (overflow ? 0 : largest + kFinishPerBlock - 1) / kFinishPerBlock));
  b.force_miss = algo == 2;
  b.buffer_key = keys.data();
  b.buffer_index = index.data();
  b.mask = with_masks && masks.size() == 1 ? reinterpret_cast<bool*>(masks[0]->data()) : nullptr;  // as the binding: one tensor's as an argument
  b.mask_addr = with_masks && masks.size() > 1 ? mask_rows.data() : nullptr;
  carve_bracket_workspace(b, ws64.data(), ws32.data(), bracket_layout, P, C);
  emu_failed_checks = 0;
  if (algo == 0) {
    bise_radix_select_launch(&a, nullptr);
  } else {
    bise_bracket_select_launch(&b, nullptr);
  }
  std::vector<uint64_t> thr(P);
  for (int64_t p = 0; p < P; ++p) thr[p] = word_at(a.threshold_bits, p, kb) & (~uint64_t{0} >> (64 - kb));
  const std::vector<char> thr_bits = packed(thr, kb);
  std::vector<int64_t> kept(P, 0), index_sum(P, 0);
  for (size_t c = 0; c < copies.size(); ++c) {
    const auto [p, base] = placed[c];
    const int64_t n = numels[c];
    Guarded<unsigned char> guarded(n, 2, 0xA5);  // 2: an entry the kernel leaves unwritten shows in the sums
    const unsigned char* mask = guarded.data();
    static_assert(sizeof(bool) == 1, "the mask is read as bytes");
    bise_keep_mask_launch(copies[c].data() + (kGuard + shift) * kb / 8, thr_bits.data() + p * kb / 8, &cut[p],
                          reinterpret_cast<bool*>(guarded.data()), n, base, kb, inf, /*check_finite=*/0, nullptr);  // as the binding after a select
    check_guard(guarded.intact(), "keep_mask");
    for (int64_t i = 0; i < n; ++i) {
      kept[p] += mask[i];
      index_sum[p] += mask[i] * (base + i + 1) * (base + i + 1);
    }
  }
  for (int64_t p = 0; p < P; ++p) {
    int64_t path = -1;
    if (algo != 0) {
      const auto above = static_cast<int64_t>(b.above[p]), inside = static_cast<int64_t>(b.inside[p]);
      path = !bise_bracket::hits(above, inside, ks[p]) ? 0
             : word_at(b.lo, p, kb) == word_at(b.hi, p, kb) ? 1
             : b.buffer_count[p] <= b.buffer_first[p + 1] - b.buffer_first[p] ? 2 : 3;
      const bool solved = path == 1 || path == 2;
      if ((b.solved[p] != 0) != solved) path = 100;  // the radix fallback must run exactly for the others
    }
    out.insert(out.end(), {static_cast<int64_t>(thr[p]), cut[p], path, kept[p], index_sum[p], emu_failed_checks});
  }
  if (emu_failed_checks != 0) std::printf("%s\n", emu_last_message);
  check_guard(ws.intact(), "radix workspace");
  check_guard(buffer_key.intact() && buffer_index.intact(), "radix buffer");
  check_guard(ws64.intact() && ws32.intact(), "bracket workspace");
  check_guard(keys.intact() && index.intact(), "bracket buffer");
  for (size_t t = 0; t < masks.size(); ++t) check_guard(masks[t]->intact(), "topk_keep_mask mask");
  for (size_t t = 0; with_masks && t < masks.size(); ++t) {
    for (int64_t i = 0; i < numels[t]; ++i) out.push_back(masks[t]->data()[i] ? 1 : 0);
  }
}

// "keep" mode: the keep_mask kernel alone. Input: cases; per case: key_bits, the bits of +inf,
// check_finite, thr bits, cut, offset, numel, numel words of raw bits. Output per case: the failed
// device-side checks, the last failure's message (0 none, 1 BISE_SCORES_NOT_FINITE, 2
// BISE_THRESHOLD_NOT_FINITE), then numel words (0 / 1) of the mask.
void run_keep(std::vector<int64_t>& out) {
  for (int64_t c = 0, cases = next(); c < cases; ++c) {
    const int kb = static_cast<int>(next());
    const auto inf = static_cast<uint64_t>(next());
    const int check = static_cast<int>(next());
    const std::vector<char> thr = packed({static_cast<uint64_t>(next())}, kb);
    const int64_t cut = next(), offset = next(), n = next();
    std::vector<uint64_t> raw(static_cast<size_t>(n));
    for (auto& v : raw) v = static_cast<uint64_t>(next());
    const std::vector<char> bits = packed(raw, kb);
    Guarded<unsigned char> mask(n, 2, 0xA5);
    emu_failed_checks = 0;
    emu_last_message = "";
    bise_keep_mask_launch(bits.data(), thr.data(), &cut, reinterpret_cast<bool*>(mask.data()), n, offset, kb, inf,
                          check, nullptr);
    check_guard(mask.intact(), "keep_mask");
    const int64_t message = std::strcmp(emu_last_message, BISE_SCORES_NOT_FINITE) == 0      ? 1
                            : std::strcmp(emu_last_message, BISE_THRESHOLD_NOT_FINITE) == 0 ? 2
                                                                                            : 0;
    out.insert(out.end(), {static_cast<int64_t>(emu_failed_checks), message});
    out.insert(out.end(), mask.data(), mask.data() + n);
  }
}

}  // namespace

int main(int argc, char** argv) {
  const bool keep = argc == 4 && std::strcmp(argv[1], "keep") == 0;
  if (argc != 3 && !keep) {
    std::fprintf(stderr, "usage: %s [keep] INPUT OUTPUT\n", argv[0]);
    return 2;
  }
  argv += keep;
  std::ifstream in(argv[1], std::ios::binary);
  in.seekg(0, std::ios::end);
  words.resize(static_cast<size_t>(in.tellg()) / 8);
  in.seekg(0);
  in.read(reinterpret_cast<char*>(words.data()), static_cast<std::streamsize>(words.size() * 8));
  std::vector<int64_t> out;
  if (keep) run_keep(out);
  for (int64_t r = 0, runs = keep ? 0 : next(); r < runs; ++r) {
    const int kb = static_cast<int>(next()), algo = static_cast<int>(next());
    const auto inf = static_cast<uint64_t>(next());
    const int64_t shift = next();
    const bool with_masks = next() != 0;
    std::vector<Problem> probs(static_cast<size_t>(next()));
    for (auto& pr : probs) {
      pr.k = next();
      pr.has_hint = next();
      pr.hint = next();
      pr.tensors.resize(static_cast<size_t>(next()));
      for (auto& t : pr.tensors) {
        t.resize(static_cast<size_t>(next()));
        for (auto& v : t) v = static_cast<uint64_t>(next());
      }
    }
    run(kb, algo, inf, shift, with_masks, probs, out);
  }
  std::ofstream(argv[2], std::ios::binary).write(reinterpret_cast<const char*>(out.data()),
                                                   static_cast<std::streamsize>(out.size() * 8));
  return 0;
}
