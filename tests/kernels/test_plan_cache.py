"""The CUDA select's Plan cache (csrc/cuda/plan_cache.h) compiled with g++ and driven by a small
program: how many Plans a sequence of lookups makes (each one is four blocking host-to-device copies
on a GPU), which entries it evicts, and that entries read under a CUDA graph capture stay.

No GPU is needed: the header is host-only and torch-free. Skipped without g++.
"""

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CXX = shutil.which("g++")

pytestmark = pytest.mark.skipif(CXX is None, reason="needs g++")

# Reads "capacity max_bytes" (0: the defaults) then lookups "key pin bytes" (one per line) from stdin;
# prints kMaxPlans and kMaxPlanBytes, then after every lookup the number of Plans made so far, the
# cache's size and its bytes.
DRIVER = r"""
#include <iostream>
#include <vector>
#include "plan_cache.h"

int main() {
  std::size_t capacity, max_bytes;
  std::cin >> capacity >> max_bytes;
  bise_select::PlanCache<std::vector<long>, long> cache(capacity ? capacity : bise_select::kMaxPlans,
                                                        max_bytes ? max_bytes : bise_select::kMaxPlanBytes);
  std::cout << bise_select::kMaxPlans << " " << bise_select::kMaxPlanBytes << "\n";
  long key, pin, bytes;
  while (std::cin >> key >> pin >> bytes) {
    const long value = cache.get({key, key + 1}, pin != 0, bytes, [&] { return key * 10; });
    if (value != key * 10) return 1;
    std::cout << cache.made() << " " << cache.size() << " " << cache.bytes() << "\n";
  }
}
"""


@pytest.fixture(scope="module")
def driver(tmp_path_factory):
    build = tmp_path_factory.mktemp("plan_cache")
    (build / "driver.cpp").write_text(DRIVER)
    binary = build / "driver"
    done = subprocess.run([CXX, "-std=c++17", "-O1", f"-I{ROOT / 'csrc' / 'cuda'}", str(build / "driver.cpp"), "-o",
                           str(binary)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-4000:]
    return binary


def run(driver, lookups, capacity=0, max_bytes=0):
    """((kMaxPlans, kMaxPlanBytes), [(made, size) after each lookup]) for ``lookups`` of (key, pinned) or
    (key, pinned, bytes) (default 100 bytes); with ``max_bytes``, (made, size, bytes) after each."""
    lookups = [(*lookup, 100)[:3] for lookup in lookups]
    text = f"{capacity} {max_bytes}\n" + "".join(f"{key} {int(pin)} {size}\n" for key, pin, size in lookups)
    done = subprocess.run([str(driver)], input=text, capture_output=True, text=True, check=True)
    lines = done.stdout.split("\n")
    trace = [tuple(map(int, line.split())) for line in lines[1:] if line]
    return tuple(map(int, lines[0].split())), [t if max_bytes else t[:2] for t in trace]


@pytest.mark.parametrize("layers", [54, 65, 73, 104, 1000])
def test_a_layerwise_step_makes_plans_only_in_its_first_step(driver, layers):
    """Every layer selects its own scores once a step (mask_model's "layerwise" scope): the first step
    makes one Plan per layer, later steps none. The cache that emptied itself at 64 entries made one
    per layer in every step from 65 layers on (BERT-base: 73)."""
    steps = 5
    (capacity, max_bytes), trace = run(driver, [(layer, False, 40_000) for _ in range(steps)
                                                for layer in range(layers)])  # 4096 x 4096 weights' Plans
    assert capacity >= 4096 and max_bytes >= 1000 * 40_000
    assert trace[layers - 1][0] == layers and trace[-1][0] == layers


def test_the_least_recently_used_entry_goes_first(driver):
    # capacity 3: a, b, c, then a again; d evicts b (used longest ago), not a
    _, trace = run(driver, [(1, False), (2, False), (3, False), (1, False), (4, False), (1, False), (3, False),
                            (2, False)], capacity=3)
    made = [m for m, _ in trace]
    assert made == [1, 2, 3, 3, 4, 4, 4, 5]  # 1 and 3 stayed; 2 was made again
    assert max(size for _, size in trace) == 3


def test_entries_read_under_a_capture_are_never_evicted(driver):
    """A captured graph keeps the Plans' device addresses: a pinned entry stays whatever follows,
    and a cache of pinned entries only grows past its capacity rather than free one."""
    lookups = [(1, True), (2, False), (3, False), (4, False), (5, False), (1, False)]
    _, trace = run(driver, lookups, capacity=2)
    assert trace[-1][0] == 5  # 1 was never made again
    _, trace = run(driver, [(1, True), (2, True), (3, True), (1, False), (2, False)], capacity=2)
    assert trace[2] == (3, 3) and trace[-1] == (3, 3)
    # pinning a cached entry later (first seen eagerly, then read in a capture) protects it too
    _, trace = run(driver, [(1, False), (2, False), (1, True), (3, False), (4, False), (1, False)], capacity=2)
    assert trace[-1][0] == 4


def test_the_plans_device_memory_is_bounded_too(driver):
    """Plans of large selections (245 KB over 100M scores) whose keys keep changing (new tensors, another k)
    stay within the byte bound: the oldest go first, pinned ones never."""
    _, trace = run(driver, [(1, True, 400), (2, False, 300), (3, False, 300), (4, False, 500)], max_bytes=1000)
    assert trace[2] == (3, 3, 1000)  # exactly full
    assert trace[3] == (4, 2, 900)  # 2 and 3 went (the oldest unpinned), 1 stayed
    _, trace = run(driver, [(1, True, 800), (2, True, 800)], max_bytes=1000)
    assert trace[-1] == (2, 2, 1600)  # all pinned: past the bound rather than free one
