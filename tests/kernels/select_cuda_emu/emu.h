// A minimal CUDA-on-CPU emulation for tests/kernels/test_select_cuda_emulated.py: just enough of
// CUDA, cub::BlockScan and cub::BlockReduce for csrc/cuda/select*.cu (and the 1-d and 2-d grids and
// blocks of masked.cu and gate.cu). Blocks run one after another (x fastest, then y, then z;
// EMU_REVERSE_BLOCKS: in reverse);
// the threads of a block are fibers (started by makecontext, switched by _setjmp/_longjmp) that
// yield at __syncthreads (all live threads must arrive) and at warp intrinsics (all lanes of the
// mask must arrive). Atomics and fences are plain (one OS thread). It checks the kernels' logic,
// indexing and barrier/warp-collective structure, not races between blocks or the memory model.
// __shared__ variables are static: they keep the previous block's values (no uninitialised reads
// are detected). The kernels' device-side check (BISE_DEVICE_CHECK, csrc/cuda/device_check.cuh)
// counts failures and keeps the last message instead of stopping the kernel; the program that
// runs the kernels defines the two variables.
#pragma once
#include <ucontext.h>
#include <setjmp.h>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <vector>

#define __device__
#define __global__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(x)
#define __shared__ static

extern "C" int emu_failed_checks;
extern "C" const char* emu_last_message;
#define BISE_DEVICE_CHECK(cond, message) \
  do { if (!(cond)) { ++emu_failed_checks; emu_last_message = message; } } while (0)

struct dim3 { unsigned x, y, z; dim3(unsigned a = 1, unsigned b = 1, unsigned c = 1) : x(a), y(b), z(c) {} };
struct uint4 { unsigned x, y, z, w; };
inline uint4 make_uint4(unsigned a, unsigned b, unsigned c, unsigned d) { return {a, b, c, d}; }
typedef int cudaError_t;
typedef void* cudaStream_t;
constexpr int cudaSuccess = 0;
inline cudaError_t cudaGetLastError() { return 0; }
inline const char* cudaGetErrorString(int) { return "?"; }

namespace emu {
struct Fiber {
  ucontext_t ctx;
  jmp_buf jb;
  bool started = false;
  std::vector<char> stack;
  dim3 tid;
  bool done = false, at_barrier = false;
  // warp op
  int op_wait = 0;  // 1: waiting in a warp op
  unsigned long long result = 0;
  bool res_ready = false;
};
struct Rendezvous {
  int kind;
  unsigned mask, arrived = 0;
  unsigned long long vals[32];
  int src[32];
  std::vector<int> lanes;
};
inline std::vector<Fiber>& fibers() { static std::vector<Fiber> f; return f; }
inline int& cur() { static int c = -1; return c; }
inline dim3& block_idx() { static dim3 b; return b; }
inline dim3& block_dim() { static dim3 b; return b; }
inline dim3& grid_dim() { static dim3 b; return b; }
inline std::vector<std::vector<Rendezvous*>>& open() { static std::vector<std::vector<Rendezvous*>> o; return o; }
inline std::function<void()>& body() { static std::function<void()> b; return b; }
inline jmp_buf& sched_jb() { static jmp_buf j; return j; }
// Switches by _setjmp/_longjmp (no signal-mask syscalls); makecontext only starts a fiber.
inline void yield() {
  if (!_setjmp(fibers()[cur()].jb)) _longjmp(sched_jb(), 1);
}
inline void entry() { body()(); fibers()[cur()].done = true; _longjmp(sched_jb(), 1); }
inline void resume(int t) {
  Fiber& f = fibers()[t];
  cur() = t;
  if (!_setjmp(sched_jb())) {
    if (!f.started) { f.started = true; setcontext(&f.ctx); }
    _longjmp(f.jb, 1);
  }
}

inline void run_block(unsigned nthreads) {
  auto& fs = fibers();
  fs.resize(nthreads);
  open().assign((nthreads + 31) / 32, {});
  for (unsigned t = 0; t < nthreads; ++t) {
    Fiber& f = fs[t];
    f.stack.resize(256 * 1024);
    const dim3 bd = block_dim();  // thread t as CUDA numbers them: x fastest, then y, then z
    f.tid = dim3(t % bd.x, t / bd.x % bd.y, t / (bd.x * bd.y));
    f.done = f.at_barrier = false;
    f.started = false;
    f.op_wait = 0;
    f.res_ready = false;
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = f.stack.data();
    f.ctx.uc_stack.ss_size = f.stack.size();
    f.ctx.uc_link = nullptr;
    makecontext(&f.ctx, entry, 0);
  }
  for (;;) {
    bool progress = false, all_done = true;
    for (unsigned t = 0; t < nthreads; ++t) {
      Fiber& f = fs[t];
      if (f.done) continue;
      all_done = false;
      if (f.at_barrier) continue;
      if (f.op_wait && !f.res_ready) continue;
      resume(int(t));
      progress = true;
    }
    if (all_done) break;
    // barrier: all live fibers at the barrier
    bool all_bar = true, any_live = false;
    for (auto& f : fs) if (!f.done) { any_live = true; if (!f.at_barrier) all_bar = false; }
    if (any_live && all_bar) { for (auto& f : fs) f.at_barrier = false; progress = true; }
    if (!progress) { std::fprintf(stderr, "EMU DEADLOCK in block %u\n", block_idx().x); std::abort(); }
  }
}

inline void syncthreads() {
  fibers()[cur()].at_barrier = true;
  yield();
}

// kind: 0 ballot, 1 shfl, 2 match_any, 3 any
inline unsigned long long warp_op(int kind, unsigned mask, unsigned long long v, int src) {
  const int t = cur();
  const int warp = t / 32, lane = t % 32;
  if (!(mask >> lane & 1)) { std::fprintf(stderr, "EMU lane not in mask\n"); std::abort(); }
  auto& list = open()[warp];
  Rendezvous* r = nullptr;
  for (auto* x : list) if (x->kind == kind && x->mask == mask && !(x->arrived >> lane & 1)) { r = x; break; }
  if (!r) { r = new Rendezvous{kind, mask}; list.push_back(r); }
  r->arrived |= 1u << lane;
  r->vals[lane] = v;
  r->src[lane] = src;
  r->lanes.push_back(t);
  Fiber& me = fibers()[t];
  me.op_wait = 1;
  me.res_ready = false;
  if (r->arrived == mask) {
    for (int l : r->lanes) {
      const int ln = l % 32;
      unsigned long long res = 0;
      if (kind == 0 || kind == 3) {
        for (int j = 0; j < 32; ++j) if ((mask >> j & 1) && r->vals[j]) res |= 1ull << j;
        if (kind == 3) res = res != 0;
      } else if (kind == 1) {
        const int s = r->src[ln];
        if (!(mask >> s & 1)) { std::fprintf(stderr, "EMU shfl from inactive lane\n"); std::abort(); }
        res = r->vals[s];
      } else {
        for (int j = 0; j < 32; ++j) if ((mask >> j & 1) && r->vals[j] == r->vals[ln]) res |= 1ull << j;
      }
      fibers()[l].result = res;
      fibers()[l].res_ready = true;
    }
    list.erase(std::find(list.begin(), list.end(), r));
    delete r;
  }
  while (!me.res_ready) yield();
  me.op_wait = 0;
  return me.result;
}

template <typename F>
void launch(dim3 grid, dim3 block, F&& f) {
  grid_dim() = grid;
  block_dim() = block;
  // EMU_REVERSE_BLOCKS set: the blocks of every launch in the reverse order, so that a kernel that
  // assumes an order of its blocks (the last ticket taken by the last block, a block that runs
  // before the others of its problem) shows it.
  static const bool reverse = std::getenv("EMU_REVERSE_BLOCKS") != nullptr;
  auto at = [](unsigned i, unsigned n) { return reverse ? n - 1 - i : i; };
  for (unsigned z = 0; z < grid.z; ++z) {
    for (unsigned y = 0; y < grid.y; ++y) {
      for (unsigned b = 0; b < grid.x; ++b) {
        block_idx() = dim3(at(b, grid.x), at(y, grid.y), at(z, grid.z));
        body() = f;
        run_block(block.x * block.y * block.z);
      }
    }
  }
}
}  // namespace emu

#define threadIdx (emu::fibers()[emu::cur()].tid)
#define blockIdx (emu::block_idx())
#define blockDim (emu::block_dim())
#define gridDim (emu::grid_dim())
inline void __syncthreads() { emu::syncthreads(); }
inline void __threadfence() {}
inline unsigned __ballot_sync(unsigned m, bool p) { return unsigned(emu::warp_op(0, m, p, 0)); }
inline bool __any_sync(unsigned m, bool p) { return emu::warp_op(3, m, p, 0) != 0; }
inline unsigned __match_any_sync(unsigned m, unsigned v) { return unsigned(emu::warp_op(2, m, v, 0)); }
inline int __shfl_sync(unsigned m, int v, int src) { return int(emu::warp_op(1, m, (unsigned long long)(unsigned)v, src)); }
inline int __popc(unsigned v) { return __builtin_popcount(v); }
inline int __ffs(unsigned v) { return __builtin_ffs(int(v)); }
template <typename T> T atomicAdd(T* p, T v) { T o = *p; *p = o + v; return o; }
template <typename T> T __ldcg(const T* p) { return *p; }
template <typename T> T __ldcs(const T* p) { return *p; }
inline long long __ldcg(const long long* p) { return *p; }
using std::min;
using std::max;
using std::isfinite;  // CUDA device code has the math functions in the global namespace

namespace cub {
template <typename T, int N>
struct BlockScan {
  struct TempStorage { T v[N]; T total; };
  TempStorage& s;
  explicit BlockScan(TempStorage& t) : s(t) {}
  void ExclusiveSum(T in, T& out) { T tot; ExclusiveSum(in, out, tot); }
  void ExclusiveSum(T in, T& out, T& total) {
    s.v[threadIdx.x] = in;
    __syncthreads();
    T acc = T(0), all = T(0);
    for (unsigned i = 0; i < N; ++i) { if (i < threadIdx.x) acc += s.v[i]; all += s.v[i]; }
    out = acc;
    total = all;
  }
};
template <typename T, int N>
struct BlockReduce {
  struct TempStorage { T v[N]; };
  TempStorage& s;
  explicit BlockReduce(TempStorage& t) : s(t) {}
  T Sum(T in) {
    s.v[threadIdx.x] = in;
    __syncthreads();
    T all = T(0);
    for (unsigned i = 0; i < N; ++i) all += s.v[i];
    return threadIdx.x == 0 ? all : T(12345);  // only thread 0's result is defined
  }
};
}  // namespace cub
