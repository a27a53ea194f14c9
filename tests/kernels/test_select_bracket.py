"""The bracket arithmetic shared by the CPU and CUDA selects (csrc/select_bracket.h), on the host.

The CPU select runs every function of the header (tests/kernels/test_select_cpp.py) except the two
only the CUDA bracket select calls (``hint_in``, ``buffer_capacity``); this compiles a small C++
program against the header and checks the properties both selects rely on, for every function.
Skipped without a C++ compiler.
"""

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CXX = shutil.which("g++") or shutil.which("c++")

PROGRAM = r"""
#include <algorithm>
#include <cstdio>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include "select_bracket.h"

namespace bb = bise_bracket;
static int failures = 0;
#define CHECK(...) do { if (!(__VA_ARGS__)) { std::printf("FAILED line %d: %s\n", __LINE__, #__VA_ARGS__); ++failures; } } while (0)

template <typename F, typename U>
U bits_of(F f) { U u; std::memcpy(&u, &f, sizeof u); return u; }
template <typename U, typename F>
F float_of(U u) { F f; std::memcpy(&f, &u, sizeof f); return f; }

template <typename F, typename U>
void keys_keep_the_order(std::mt19937_64& rng) {
  using L = std::numeric_limits<F>;
  std::vector<F> v = {F(0), -F(0), L::denorm_min(), -L::denorm_min(), L::min(), -L::min(), L::max(), -L::max(),
                      L::infinity(), -L::infinity(), F(1), F(-1)};
  std::normal_distribution<double> normal;
  for (int i = 0; i < 2000; ++i) v.push_back(F(normal(rng) * (i % 7 == 0 ? 1e-30 : 1.0)));
  for (F a : v) {
    const U ka = bb::to_key(bits_of<F, U>(a));
    // -0.0 becomes +0.0; everything else round-trips.
    CHECK(float_of<U, F>(bb::from_key(ka)) == a);
    CHECK(bits_of<F, U>(float_of<U, F>(bb::from_key(ka))) == bits_of<F, U>(a + F(0)));
    for (int j = 0; j < 20; ++j) {
      const F b = v[(size_t(j) * 7919 + size_t(ka)) % v.size()];
      const U kb = bb::to_key(bits_of<F, U>(b));
      CHECK((a < b) == (ka < kb));
      CHECK((a == b) == (ka == kb));
    }
  }
}

int main() {
  std::mt19937_64 rng(1);
  keys_keep_the_order<float, uint32_t>(rng);
  keys_keep_the_order<double, uint64_t>(rng);

  const int64_t S = 16384;
  // A sample of S distinct keys 0, 10, 20, ...: descending rank r is key 10 (S - r).
  auto key_at = [&](int64_t rank) { return uint64_t(10 * (S - rank)); };
  for (int64_t n : {int64_t(1), int64_t(131), int64_t(100003), int64_t(25000000), int64_t(2147483647)}) {
    for (int64_t k : {int64_t(1), n / 3 + 1, n / 2 + 1, n}) {
      if (k < 1 || k > n) continue;
      const bb::Ranks cold = bb::cold_ranks(n, k, S, bb::kSigmas);
      const double q = double(k) / double(n) * double(S);
      CHECK(cold.lo == bb::kUnbounded || (cold.lo >= 1 && cold.lo <= S && double(cold.lo) >= q + 4));
      CHECK(cold.hi == bb::kUnbounded || (cold.hi >= 1 && cold.hi <= S && double(cold.hi) <= q - 4));
      const int64_t cap = bb::buffer_capacity(n, k, S);
      const int64_t lo = cold.lo == bb::kUnbounded ? S : cold.lo, hi = cold.hi == bb::kUnbounded ? 1 : cold.hi;
      CHECK(cap <= n);
      CHECK(cap == n || double(cap) >= 1.5 * double(n) * double(lo - hi + 1) / double(S));
      CHECK(cap == n || double(cap) >= 1.5 * double(n) * double(2 * bb::warm_width(S) + 2) / double(S));
      // hint_in says whether the hint lies in [key(lo), key(hi)], from the sample counts alone.
      for (int64_t h = -5; h <= 10 * S + 5; h += (h % 10 == 0 ? 3 : 37)) {
        const int64_t below = std::clamp<int64_t>((h + 9) / 10 - (h < 0 && h % 10 != 0), 0, S);
        const int64_t above = S - std::clamp<int64_t>(h >= 0 ? h / 10 + 1 : 0, 0, S);
        const bool in = (cold.lo == bb::kUnbounded || h >= int64_t(key_at(cold.lo))) &&
                        (cold.hi == bb::kUnbounded || h <= int64_t(key_at(cold.hi)));
        CHECK(bb::hint_in(cold, S, above, below) == in);
        // The warm bracket straddles the hint with up to warm_width sample keys either side.
        const bb::Ranks warm = bb::warm_ranks(S, above, below);
        const int64_t w = bb::warm_width(S);
        if (warm.hi >= 1) CHECK(int64_t(key_at(warm.hi)) > h && (above >= w ? above - warm.hi + 1 == w : warm.hi == 1));
        if (warm.lo >= 1) CHECK(int64_t(key_at(warm.lo)) < h && (below >= w ? warm.lo - (S - below) == w : warm.lo == S));
        CHECK((warm.hi == bb::kAtHint) == (above == 0));
        CHECK((warm.lo == bb::kAtHint) == (below == 0));
      }
    }
  }
  CHECK(bb::hits(0, 1, 1) && !bb::hits(1, 5, 1) && bb::hits(1, 5, 6) && !bb::hits(1, 5, 7));

  // Radix narrowing: each step keeps the digit's sub-range inside [lo, hi]; 3 steps end 32-bit ranges.
  std::uniform_int_distribution<uint32_t> any;
  for (int t = 0; t < 20000; ++t) {
    uint32_t lo = any(rng), hi = any(rng);
    if (t % 5 == 0) { lo = 0; hi = 0xFFFFFFFFu; }
    if (lo > hi) std::swap(lo, hi);
    if (lo == hi) continue;
    int steps = 0;
    while (lo != hi) {
      const int shift = bb::digit_shift(lo, hi);
      const uint64_t digits = (uint64_t(hi - lo) >> shift) + 1;
      CHECK(digits <= (uint64_t(1) << bb::kDigitBits));
      const uint64_t d = any(rng) % digits;
      const uint32_t a = lo, b = hi;
      bb::narrow(lo, hi, d, shift);
      CHECK(lo >= a && hi <= b && lo <= hi);
      CHECK(lo == a + (uint32_t(d) << shift));
      CHECK(uint64_t(hi - lo) < (uint64_t(1) << shift) || shift == 0);
      ++steps;
    }
    CHECK(steps <= 3);
  }
  std::printf("%d failures\n", failures);
  return failures != 0;
}
"""


@pytest.mark.skipif(CXX is None, reason="needs a C++ compiler")
def test_bracket_arithmetic(tmp_path):
    source = tmp_path / "check.cpp"
    source.write_text(PROGRAM)
    binary = tmp_path / "check"
    build = subprocess.run([CXX, "-std=c++20", "-O1", "-Wall", "-Wextra", "-Werror", f"-I{ROOT / 'csrc'}",
                            str(source), "-o", str(binary)], capture_output=True, text=True)
    assert build.returncode == 0, build.stderr
    run = subprocess.run([str(binary)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
