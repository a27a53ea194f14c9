// The cache of the CUDA select's device Plans (csrc/cuda/select_binding.cpp): least recently used
// out first, never an entry pinned by a CUDA graph capture. Host-only and torch-free, so that
// tests/kernels/test_plan_cache.py compiles it with g++ and checks the policy without a GPU.
//
// Why this policy: a Plan's key holds the scores' addresses, so a layerwise selection makes one
// entry per layer and every step looks all of them up in turn. A cache that emptied itself when
// full (the first version, 64 entries) missed on every lookup once a model had more layers than
// that (BERT-base: 73, ResNet-101: 104), and a miss is four blocking host-to-device copies. Least
// recently used with room for kMaxPlans layers (and kMaxPlanBytes of device memory) misses only in
// the first step. A captured graph keeps the raw device addresses of the Plans it read, so those
// are never evicted (freed memory would be reused under a replay).
#pragma once

#include <cstddef>
#include <list>
#include <map>
#include <utility>

namespace bise_select {

// A Plan holds 5 int64 per 16384-element chunk of its scores plus a few per problem: a few hundred bytes
// for a small layer, 40 KB for a 4096 x 4096 weight, 245 KB for one selection over 100M scores. The
// cache keeps at most kMaxPlans of them and kMaxPlanBytes of their device memory, whichever binds first.
constexpr std::size_t kMaxPlans = 4096;
constexpr std::size_t kMaxPlanBytes = std::size_t{64} << 20;

template <class Key, class Value>
class PlanCache {
 public:
  explicit PlanCache(std::size_t capacity = kMaxPlans, std::size_t max_bytes = kMaxPlanBytes)
      : capacity_(capacity), max_bytes_(max_bytes) {}

  // The entry of `key`, made by make() on a miss after evicting the least recently used unpinned
  // entries until it fits (`bytes`: its size) in both bounds (a cache whose entries are all pinned
  // grows past them). pin: this entry is never evicted from now on.
  template <class Make>
  Value& get(const Key& key, bool pin, std::size_t bytes, Make&& make) {
    if (auto found = entries_.find(key); found != entries_.end()) {
      order_.splice(order_.begin(), order_, found->second.age);
      found->second.pinned = found->second.pinned || pin;
      return found->second.value;
    }
    auto full = [&] { return entries_.size() >= capacity_ || bytes_ + bytes > max_bytes_; };
    for (auto age = order_.end(); full() && age != order_.begin();) {
      --age;
      auto entry = entries_.find(*age);
      if (entry->second.pinned) continue;
      bytes_ -= entry->second.bytes;
      entries_.erase(entry);
      age = order_.erase(age);
    }
    Value value = make();
    order_.push_front(key);
    ++made_;
    bytes_ += bytes;
    return entries_.emplace(key, Entry{std::move(value), order_.begin(), bytes, pin}).first->second.value;
  }

  std::size_t size() const { return entries_.size(); }
  std::size_t bytes() const { return bytes_; }
  std::size_t made() const { return made_; }  // misses so far

 private:
  struct Entry {
    Value value;
    typename std::list<Key>::iterator age;  // its place in order_
    std::size_t bytes;
    bool pinned;
  };
  std::size_t capacity_, max_bytes_;
  std::size_t bytes_ = 0;
  std::size_t made_ = 0;
  std::list<Key> order_;  // most recently used first
  std::map<Key, Entry> entries_;
};

}  // namespace bise_select
