// The scheduler behind the emulated CUDA runtime (cuda_runtime.h): every CUDA thread of a launch
// is a coroutine (ucontext) with its own stack, all run by the calling OS thread. A thread runs
// until it reaches a barrier -- __syncthreads (its block), a warp shuffle (its warp), or the
// cooperative grid barrier -- and the barrier opens when every live thread of the group has
// arrived, as on a GPU. Blocks of an ordinary launch run one after another; a cooperative
// launch runs all its blocks together (at most num_sms() * blocks_per_sm() of them, like the
// residency limit a real cooperative launch has). A barrier that can never open is reported as
// a deadlock instead of hanging. Deterministic: the schedule is a fixed round robin.
#pragma once

#include <ucontext.h>

#include <array>
#include <cstdlib>
#include <functional>
#include <map>
#include <stdexcept>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

namespace emu {

enum Kind : int { kNone = 0, kWarp = 1, kBlock = 2, kGrid = 3 };

inline int env_int(const char* name, int fallback) {
  const char* v = std::getenv(name);
  return v != nullptr ? std::atoi(v) : fallback;
}
inline int num_sms() { return env_int("BNK_EMU_SMS", 4); }
inline int blocks_per_sm() { return env_int("BNK_EMU_BLOCKS_PER_SM", 2); }

constexpr size_t kStackBytes = 64 * 1024;

// Kernel launches since the library was loaded (ordinary and cooperative): what the tests read
// to count the launches of one call.
inline long long& launch_count() {
  static long long n = 0;
  return n;
}

struct Thread {
  ucontext_t ctx;
  dim3 tid, bid;
  int block = 0;  // index of its block among the blocks being scheduled
  int lane = 0;
  int wait = kNone;
  bool done = false;
};

struct Run {
  dim3 grid, block;
  std::function<void()> body;
  int per_block = 0;                          // threads per block
  std::vector<Thread> threads;                // the blocks being scheduled, block-major
  std::vector<int> arrived_warp, alive_warp;  // per warp
  std::vector<int> arrived_block, alive_block;
  int arrived_grid = 0, alive_grid = 0;
  std::vector<std::array<uint64_t, 32>> shfl;  // per warp: the values being exchanged
  std::vector<std::map<std::string, std::vector<unsigned char>>> shared;  // per block
  ucontext_t sched;
};

inline thread_local Run* g_run = nullptr;
inline thread_local Thread* g_self = nullptr;
inline thread_local std::vector<void*> g_stacks;

inline Run& run() { return *g_run; }
inline Thread& self() { return *g_self; }

inline int warp_of(const Run& r, const Thread& t) {
  return t.block * (r.per_block / 32) + static_cast<int>(t.tid.x) / 32;
}

// Open the barrier `kind` of t's group if every live thread of the group waits at it.
inline void maybe_release(Run& r, int kind, const Thread& t) {
  int* arrived;
  int alive;
  size_t begin, end;
  if (kind == kWarp) {
    const int w = warp_of(r, t);
    arrived = &r.arrived_warp[w];
    alive = r.alive_warp[w];
    begin = static_cast<size_t>(t.block) * r.per_block + (t.tid.x / 32) * 32;
    end = begin + 32;
  } else if (kind == kBlock) {
    arrived = &r.arrived_block[t.block];
    alive = r.alive_block[t.block];
    begin = static_cast<size_t>(t.block) * r.per_block;
    end = begin + r.per_block;
  } else {
    arrived = &r.arrived_grid;
    alive = r.alive_grid;
    begin = 0;
    end = r.threads.size();
  }
  if (*arrived == 0 || *arrived < alive) return;
  *arrived = 0;
  for (size_t i = begin; i < end; ++i) {
    if (r.threads[i].wait == kind) r.threads[i].wait = kNone;
  }
}

inline void barrier(int kind) {
  Run& r = run();
  Thread& t = self();
  if (kind == kWarp) {
    ++r.arrived_warp[warp_of(r, t)];
  } else if (kind == kBlock) {
    ++r.arrived_block[t.block];
  } else {
    ++r.arrived_grid;
  }
  t.wait = kind;
  maybe_release(r, kind, t);
  if (t.wait != kNone) swapcontext(&t.ctx, &r.sched);
}

template <class T> T shfl_down(T v, int offset) {
  static_assert(sizeof(T) <= 8, "emulated shuffles move at most 8 bytes");
  Run& r = run();
  Thread& t = self();
  std::array<uint64_t, 32>& slots = r.shfl[warp_of(r, t)];
  uint64_t raw = 0;
  std::memcpy(&raw, &v, sizeof(T));
  slots[t.lane] = raw;
  barrier(kWarp);
  T out = v;  // out of range: the caller's own value, as __shfl_down_sync
  if (t.lane + offset < 32) std::memcpy(&out, &slots[t.lane + offset], sizeof(T));
  barrier(kWarp);
  return out;
}

// The block's shared array `tag` (allocated by its first user, filled with 0xff bytes so that
// reading what no thread wrote shows up as NaN).
template <class T> T* shared(const char* tag, size_t n) {
  auto& arrays = run().shared[self().block];
  auto it = arrays.find(tag);
  if (it == arrays.end()) {
    it = arrays.emplace(tag, std::vector<unsigned char>(n * sizeof(T) + 16, 0xff)).first;
  }
  auto p = reinterpret_cast<uintptr_t>(it->second.data());
  return reinterpret_cast<T*>((p + 15) & ~static_cast<uintptr_t>(15));
}

inline void thread_exit() {
  Run& r = run();
  Thread& t = self();
  t.done = true;
  --r.alive_warp[warp_of(r, t)];
  --r.alive_block[t.block];
  --r.alive_grid;
  maybe_release(r, kWarp, t);
  maybe_release(r, kBlock, t);
  maybe_release(r, kGrid, t);
}

inline void trampoline() {
  run().body();
  thread_exit();
}  // returns to uc_link: the scheduler

// Run blocks [first, first + count) of r's grid together until every thread has finished.
inline void run_blocks(Run& r, unsigned first, unsigned count) {
  const int per = r.per_block;
  const size_t n = static_cast<size_t>(count) * per;
  r.threads.assign(n, Thread{});
  r.arrived_warp.assign(n / 32, 0);
  r.alive_warp.assign(n / 32, 32);
  r.arrived_block.assign(count, 0);
  r.alive_block.assign(count, per);
  r.arrived_grid = 0;
  r.alive_grid = static_cast<int>(n);
  r.shfl.assign(n / 32, {});
  r.shared.assign(count, {});
  while (g_stacks.size() < n) g_stacks.push_back(std::malloc(kStackBytes));
  for (unsigned b = 0; b < count; ++b) {
    const unsigned lin = first + b;
    const dim3 bid(lin % r.grid.x, (lin / r.grid.x) % r.grid.y, lin / (r.grid.x * r.grid.y));
    for (int i = 0; i < per; ++i) {
      const size_t k = static_cast<size_t>(b) * per + i;
      Thread& t = r.threads[k];
      t.tid = dim3(i);
      t.bid = bid;
      t.block = static_cast<int>(b);
      t.lane = i % 32;
      getcontext(&t.ctx);
      t.ctx.uc_stack.ss_sp = g_stacks[k];
      t.ctx.uc_stack.ss_size = kStackBytes;
      t.ctx.uc_link = &r.sched;
      makecontext(&t.ctx, trampoline, 0);
    }
  }
  size_t remaining = n;
  while (remaining > 0) {
    bool progressed = false;
    for (Thread& t : r.threads) {
      if (t.done || t.wait != kNone) continue;
      g_self = &t;
      swapcontext(&r.sched, &t.ctx);
      progressed = true;
      if (t.done) --remaining;
    }
    if (!progressed) {
      throw std::runtime_error(
          "emulated kernel deadlock: threads wait at a barrier that the rest of their warp, "
          "block or grid never reaches");
    }
  }
}

// The order in which the blocks of an ordinary launch run, one after another: block index
// order, or (BNK_EMU_BLOCK_ORDER) "reverse", or "shuffle" (a fixed pseudo-random permutation):
// a GPU runs them in any order, which code such as a last-block finalize must not depend on.
inline unsigned block_order(unsigned i, unsigned n) {
  const char* order = std::getenv("BNK_EMU_BLOCK_ORDER");
  if (order == nullptr) return i;
  const std::string o(order);
  if (o == "reverse") return n - 1 - i;
  if (o != "shuffle") return i;
  // i -> (a i + c) mod n with a coprime to n: a permutation of 0..n-1.
  unsigned long long a = 2654435761ull % n;
  auto gcd = [](unsigned long long x, unsigned long long y) {
    while (y != 0) {
      const unsigned long long t = x % y;
      x = y;
      y = t;
    }
    return x;
  };
  while (a == 0 || gcd(a, n) != 1) ++a;
  return static_cast<unsigned>((a * i + 7ull) % n);
}

inline void execute(dim3 grid, dim3 block, std::function<void()> body, bool cooperative) {
  if (block.y != 1 || block.z != 1 || block.x % 32 != 0) {
    throw std::runtime_error("emulator: blocks must be 1-D with a multiple of 32 threads");
  }
  Run r;
  r.grid = grid;
  r.block = block;
  r.body = std::move(body);
  r.per_block = static_cast<int>(block.x);
  Run* const outer = g_run;
  Thread* const outer_self = g_self;
  g_run = &r;
  const unsigned blocks = grid.x * grid.y * grid.z;
  try {
    if (cooperative) {
      run_blocks(r, 0, blocks);
    } else {
      for (unsigned b = 0; b < blocks; ++b) run_blocks(r, block_order(b, blocks), 1);
    }
  } catch (...) {
    g_run = outer;
    g_self = outer_self;
    throw;
  }
  g_run = outer;
  g_self = outer_self;
}

// kernel<<<grid, block>>>(args...): each thread gets its own copy of the parameters.
template <class... P, class... Args>
void launch(void (*kernel)(P...), dim3 grid, dim3 block, Args&&... args) {
  std::tuple<std::decay_t<P>...> params(std::forward<Args>(args)...);
  ++launch_count();
  execute(grid, block, [&params, kernel] { std::apply(kernel, params); }, false);
}

template <class P>
cudaError_t launch_cooperative(void (*kernel)(P), dim3 grid, dim3 block, P params) {
  if (grid.x * grid.y * grid.z > static_cast<unsigned>(num_sms() * blocks_per_sm())) {
    return cudaErrorLaunchFailure;  // more blocks than can be resident at once
  }
  // BNK_EMU_COOP_FAIL=1: the driver refuses every cooperative launch, as for an MPS client
  // or an SM-limited context (tests of the multi-pass fallback).
  const char* refuse = std::getenv("BNK_EMU_COOP_FAIL");
  if (refuse != nullptr && refuse[0] == '1') return cudaErrorCooperativeLaunchTooLarge;
  ++launch_count();
  execute(grid, block, [&params, kernel] { kernel(params); }, true);
  return cudaSuccess;
}

}  // namespace emu
