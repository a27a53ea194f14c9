// The cache of the CUDA select's device Plans (csrc/cuda/select_binding.cpp): least recently used
// out first, never an entry pinned by a CUDA graph capture. Host-only and torch-free, so that
// tests/kernels/test_plan_cache.py compiles it with g++ and checks the policy without a GPU.
//
// Why this policy: a Plan's key holds the scores' addresses, so a layerwise selection makes one
// entry per layer and every step looks all of them up in turn. A cache that emptied itself when
// full (the first version, 64 entries) missed on every lookup once a model had more layers than
// that (BERT-base: 73, ResNet-101: 104), and a miss is four blocking host-to-device copies. Least
// recently used with room for kMaxPlans layers misses only in the first step. A captured graph
// keeps the raw device addresses of the Plans it read, so those are never evicted (freed memory
// would be reused under a replay).
#pragma once

#include <cstddef>
#include <list>
#include <map>
#include <utility>

namespace bise_select {

// A Plan is a few hundred bytes of device memory for a layer's tensor (a 512-byte block of the
// caching allocator for each of its four tensors): 4096 of them are 8 MB at most.
constexpr std::size_t kMaxPlans = 4096;

template <class Key, class Value>
class PlanCache {
 public:
  explicit PlanCache(std::size_t capacity = kMaxPlans) : capacity_(capacity) {}

  // The entry of `key`, made by make() on a miss after evicting the least recently used unpinned
  // entries down to room for it (a cache whose entries are all pinned grows past its capacity).
  // pin: this entry is never evicted from now on.
  template <class Make>
  Value& get(const Key& key, bool pin, Make&& make) {
    if (auto found = entries_.find(key); found != entries_.end()) {
      order_.splice(order_.begin(), order_, found->second.age);
      found->second.pinned = found->second.pinned || pin;
      return found->second.value;
    }
    for (auto age = order_.end(); entries_.size() >= capacity_ && age != order_.begin();) {
      --age;
      auto entry = entries_.find(*age);
      if (entry->second.pinned) continue;
      entries_.erase(entry);
      age = order_.erase(age);
    }
    Value value = make();
    order_.push_front(key);
    ++made_;
    return entries_.emplace(key, Entry{std::move(value), order_.begin(), pin}).first->second.value;
  }

  std::size_t size() const { return entries_.size(); }
  std::size_t made() const { return made_; }  // misses so far

 private:
  struct Entry {
    Value value;
    typename std::list<Key>::iterator age;  // its place in order_
    bool pinned;
  };
  std::size_t capacity_;
  std::size_t made_ = 0;
  std::list<Key> order_;  // most recently used first
  std::map<Key, Entry> entries_;
};

}  // namespace bise_select
