// Runs the CUDA selects (csrc/cuda/select*.cu, compiled for the CPU with emu.h) on the problems of
// a file and writes their results: tests/kernels/test_select_cuda_emulated.py writes the input,
// compares the output with the reference backend. The chunk table and the workspaces are laid out
// as in csrc/cuda/select_binding.cpp.
//
// Input (int64 words): runs; per run: key_bits, algorithm (0 radix, 1 bracket, 2 bracket-miss,
// 3 bracket-overflow), the bits of +inf in the dtype, shift (each tensor starts that many elements
// into its allocation: 1 makes it unaligned for 128-bit loads), masks (1: topk_keep_mask's masks,
// bracket algorithms only), problems; per problem: k, has_hint, hint bits, tensors; per tensor:
// numel, then numel words of raw bits. Output per run and problem: threshold bits, cut, path
// (bracket algorithms: 0 missed, 1 single value, 2 buffered, 3 overflowed; radix: -1), the run's
// non-finite flag; then, with masks, numel words (0 / 1) per tensor.
#include <cstdio>
#include <fstream>
#include <memory>
#include <vector>

#include "emu.h"
#include "select.h"
#include "select_bracket.h"

using namespace bise_select;

namespace {

struct Problem {
  int64_t k, has_hint, hint;
  std::vector<std::vector<uint32_t>> tensors;
};

std::vector<int64_t> words;
size_t pos = 0;
int64_t next() { return words.at(pos++); }

void run(int kb, int algo, uint32_t inf, int64_t shift, bool with_masks, const std::vector<Problem>& probs,
         std::vector<int64_t>& out) {
  const int64_t P = static_cast<int64_t>(probs.size());
  std::vector<std::vector<uint32_t>> wide;    // 32-bit copies, `shift` elements in
  std::vector<std::vector<uint16_t>> narrow;  // 16-bit copies
  std::vector<std::unique_ptr<bool[]>> masks;  // per tensor
  std::vector<int64_t> numels, mask_rows;       // per tensor; per chunk
  std::vector<int64_t> rows[5], first(P + 1, 0), total(P, 0), ks;
  for (int64_t p = 0; p < P; ++p) {
    for (const auto& t : probs[p].tensors) {
      wide.emplace_back(shift, 0u);
      wide.back().insert(wide.back().end(), t.begin(), t.end());
      narrow.emplace_back(wide.back().begin(), wide.back().end());
      const int64_t n = static_cast<int64_t>(t.size());
      masks.emplace_back(new bool[n]());
      numels.push_back(n);
      const int64_t addr = kb == 32 ? reinterpret_cast<int64_t>(wide.back().data() + shift)
                                    : reinterpret_cast<int64_t>(narrow.back().data() + shift);
      for (int64_t start = 0; start < n; start += kChunk) {
        for (auto [row, value] : {std::pair{0, addr}, {1, start}, {2, n}, {3, total[p]}, {4, p}}) rows[row].push_back(value);
        mask_rows.push_back(reinterpret_cast<int64_t>(masks.back().get()));
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
  std::vector<int32_t> ws(radix_layout.words, 0);
  std::vector<uint32_t> buffer_key(P * kCapacity);
  std::vector<int64_t> buffer_index(P * kCapacity);
  std::vector<uint32_t> hints32(P);
  std::vector<uint16_t> hints16(P);
  bool hinted = false;
  for (int64_t p = 0; p < P; ++p) {
    hints32[p] = static_cast<uint32_t>(probs[p].hint);
    hints16[p] = static_cast<uint16_t>(probs[p].hint);
    hinted |= probs[p].has_hint != 0;
  }
  SelectArgs a{};
  a.table = table.data();
  a.num_chunks = C;
  a.chunk_first = first.data();
  a.num_problems = static_cast<int32_t>(P);
  a.key_bits = kb;
  a.hints = !hinted ? nullptr : kb == 32 ? static_cast<const void*>(hints32.data()) : hints16.data();
  carve_radix_workspace(a, ws.data(), radix_layout, P);
  a.krem = krem.data();
  a.buffer_key = buffer_key.data();
  a.buffer_index = buffer_index.data();
  a.cut = cut.data();
  a.solved = nullptr;
  if (kb == 32) {
    const auto f = bise_bracket::finite_keys(inf);
    a.finite_lo = f.lo;
    a.finite_span = f.span;
  } else {
    const auto f = bise_bracket::finite_keys(static_cast<uint16_t>(inf));
    a.finite_lo = f.lo;
    a.finite_span = f.span;
  }

  std::vector<int64_t> buffers(P + 1, 0), no_buffers(P + 1, 0);
  for (int64_t p = 0; p < P; ++p) buffers[p + 1] = buffers[p] + bise_bracket::buffer_capacity(total[p], ks[p], kSample);
  const bool overflow = algo == 3;
  int64_t largest = 0;
  for (int64_t p = 0; p < P; ++p) largest = std::max(largest, buffers[p + 1] - buffers[p]);
  const BracketWorkspace bracket_layout = bracket_workspace(P, C, kb);
  std::vector<int64_t> ws64(bracket_layout.words64, 0);
  std::vector<int32_t> ws32(bracket_layout.words32, 0);
  std::vector<uint32_t> keys(overflow ? 0 : buffers[P]), index(overflow ? 0 : buffers[P]);
  BracketArgs b{};
  b.radix = a;
  b.ks = ks.data();
  b.buffer_first = overflow ? no_buffers.data() : buffers.data();
  b.finish_blocks = static_cast<int32_t>(std::max<int64_t>(1, (overflow ? 0 : largest + kFinishPerBlock - 1) / kFinishPerBlock));
  b.force_miss = algo == 2;
  b.buffer_key = keys.data();
  b.buffer_index = index.data();
  b.mask_addr = with_masks ? mask_rows.data() : nullptr;
  carve_bracket_workspace(b, ws64.data(), ws32.data(), bracket_layout, P, C);
  if (algo == 0) {
    bise_radix_select_launch(&a, nullptr);
  } else {
    bise_bracket_select_launch(&b, nullptr);
  }
  for (int64_t p = 0; p < P; ++p) {
    int64_t path = -1;
    if (algo != 0) {
      const auto above = static_cast<int64_t>(b.above[p]), inside = static_cast<int64_t>(b.inside[p]);
      path = !bise_bracket::hits(above, inside, ks[p]) ? 0
             : b.lo[p] == b.hi[p]                    ? 1
             : b.buffer_count[p] <= b.buffer_first[p + 1] - b.buffer_first[p] ? 2 : 3;
      const bool solved = path == 1 || path == 2;
      if ((b.solved[p] != 0) != solved) path = 100;  // the radix fallback must run exactly for the others
    }
    out.push_back(static_cast<int64_t>(static_cast<uint32_t>(a.threshold_bits[p]) & (kb == 32 ? 0xFFFFFFFFu : 0xFFFFu)));
    out.push_back(cut[p]);
    out.push_back(path);
    out.push_back(*a.nonfinite);
  }
  for (size_t t = 0; with_masks && t < masks.size(); ++t) {
    for (int64_t i = 0; i < numels[t]; ++i) out.push_back(masks[t][i] ? 1 : 0);
  }
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 3) {
    std::fprintf(stderr, "usage: %s INPUT OUTPUT\n", argv[0]);
    return 2;
  }
  std::ifstream in(argv[1], std::ios::binary);
  in.seekg(0, std::ios::end);
  words.resize(static_cast<size_t>(in.tellg()) / 8);
  in.seekg(0);
  in.read(reinterpret_cast<char*>(words.data()), static_cast<std::streamsize>(words.size() * 8));
  std::vector<int64_t> out;
  for (int64_t r = 0, runs = next(); r < runs; ++r) {
    const int kb = static_cast<int>(next()), algo = static_cast<int>(next());
    const auto inf = static_cast<uint32_t>(next());
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
        for (auto& v : t) v = static_cast<uint32_t>(next());
      }
    }
    run(kb, algo, inf, shift, with_masks, probs, out);
  }
  std::ofstream(argv[2], std::ios::binary).write(reinterpret_cast<const char*>(out.data()),
                                                   static_cast<std::streamsize>(out.size() * 8));
  return 0;
}
