// Device building blocks shared by every kernel family:
//
//   * element types and their accumulation type (float; double for double),
//   * 128-bit vector loads and stores,
//   * Philox4x32-10 and the noise of noisy BatchNorm,
//   * deterministic warp-shuffle / shared-memory merges of per-thread accumulators,
//   * generic kernels that the op families instantiate with an "Op" functor:
//       reduce_ncs_kernel / reduce_mc_kernel   split per-channel reduction -> partials, merged
//                                              and finalized by the last block of each channel
//                                              (group) to finish (one launch)
//       elementwise_ncs_kernel / _mc_kernel    out = f(x, dy, per-channel constants)
//
// Determinism: every merge happens in an order fixed by the launch configuration alone (never
// by timing): an atomic ticket only decides *which* block merges a channel's partials, never
// the order it merges them in. One input gives bit-identical results run to run.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>

#include "bnkernels.h"

namespace bnk {

// ------------------------------------------------------------------------------ launching
// Kernel launches and shared arrays go through these two macros, so that the CPU emulation the
// tests build on machines without a GPU (tests/cuda_emulator, BNK_CPU_EMULATION) runs exactly
// this kernel code. `kernel` is a pointer to a __global__ function.
#ifndef BNK_CPU_EMULATION
#define BNK_LAUNCH(kernel, grid, block, stream, ...) \
  kernel<<<(grid), (block), 0, (stream)>>>(__VA_ARGS__)
#define BNK_SHARED(T, name, n) __shared__ T name[n]
#else
#define BNK_LAUNCH(kernel, grid, block, stream, ...) \
  ::emu::launch(kernel, (grid), (block), __VA_ARGS__)
#define BNK_SHARED(T, name, n) T* name = ::emu::shared<T>(#name, (n))
#endif

// ------------------------------------------------------------------------------ errors

inline void check_launch(const char* what) {
  const cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess) {
    throw std::runtime_error(std::string("bnkernels cuda: launching ") + what + " failed: " +
                             cudaGetErrorString(e));
  }
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline int next_pow2(int64_t v) {
  int p = 1;
  while (p < v) p *= 2;
  return p;
}

// ------------------------------------------------------------------------------ types
// torch compiles extensions with __CUDA_NO_HALF_CONVERSIONS__: every conversion is explicit.

template <typename T> struct AccOf { using type = float; };
template <> struct AccOf<double> { using type = double; };
template <typename T> using acc_t = typename AccOf<T>::type;

template <typename A> __device__ __forceinline__ A to_acc(float v) { return static_cast<A>(v); }
template <typename A> __device__ __forceinline__ A to_acc(double v) { return static_cast<A>(v); }
template <typename A> __device__ __forceinline__ A to_acc(__half v) {
  return static_cast<A>(__half2float(v));
}
template <typename A> __device__ __forceinline__ A to_acc(__nv_bfloat16 v) {
  return static_cast<A>(__bfloat162float(v));
}

template <typename T> struct FromAcc;
template <> struct FromAcc<float> {
  template <typename A> __device__ static float cvt(A v) { return static_cast<float>(v); }
};
template <> struct FromAcc<double> {
  template <typename A> __device__ static double cvt(A v) { return static_cast<double>(v); }
};
template <> struct FromAcc<__half> {  // round to nearest even, as torch's .to(half)
  template <typename A> __device__ static __half cvt(A v) {
    return __float2half_rn(static_cast<float>(v));
  }
};
template <> struct FromAcc<__nv_bfloat16> {
  template <typename A> __device__ static __nv_bfloat16 cvt(A v) {
    return __float2bfloat16_rn(static_cast<float>(v));
  }
};
template <typename T, typename A> __device__ __forceinline__ T from_acc(A v) {
  return FromAcc<T>::cvt(v);
}

__device__ __forceinline__ float acc_sqrt(float v) { return sqrtf(v); }  // IEEE (no fast math)
__device__ __forceinline__ double acc_sqrt(double v) { return sqrt(v); }
__device__ __forceinline__ float acc_fma(float a, float b, float c) { return fmaf(a, b, c); }
__device__ __forceinline__ double acc_fma(double a, double b, double c) { return fma(a, b, c); }
// a * b rounded on its own: never contracted with a neighbouring add into an FMA, so every
// kernel that computes it gets the same bits.
__device__ __forceinline__ float acc_mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double acc_mul_rn(double a, double b) { return __dmul_rn(a, b); }
template <typename A> __device__ __forceinline__ A acc_abs(A v) { return v < A(0) ? -v : v; }
// True for +-inf and NaN: v - v is 0 for every finite v and NaN otherwise (IEEE arithmetic:
// the build has no fast math, so this is not folded away).
template <typename A> __device__ __forceinline__ bool not_finite(A v) { return !(v - v == A(0)); }

// The rounding error of s = fl(a + b), exactly: a + b = s + err (Knuth's TwoSum; additions
// only, so nothing is contracted into an FMA).
template <typename A> __device__ __forceinline__ A two_sum_err(A a, A b, A s) {
  const A bb = s - a;
  return (a - (s - bb)) + (b - bb);
}

// max that propagates NaN from either side (as torch.amax).
template <typename A> __device__ __forceinline__ A max_nan(A a, A b) {
  return (a > b || a != a) ? a : b;
}

// ------------------------------------------------------------------------------ vectors
// VEC consecutive elements moved as one 16-byte (or smaller) access. Callers guarantee
// alignment: the binding picks VEC = 16 / sizeof(T) only for 16-byte aligned tensors whose
// rows ("ncs": S, "mc": C) are a multiple of VEC long, and VEC = 1 otherwise.

template <int BYTES> struct Raw;
template <> struct Raw<16> { using type = uint4; };
template <> struct Raw<8> { using type = uint2; };
template <> struct Raw<4> { using type = uint32_t; };
template <> struct Raw<2> { using type = uint16_t; };

template <typename T, int VEC, typename A>
__device__ __forceinline__ void load_vec(const T* p, A (&out)[VEC]) {
  using R = typename Raw<sizeof(T) * VEC>::type;
  const R raw = __ldg(reinterpret_cast<const R*>(p));
  T v[VEC];
  memcpy(v, &raw, sizeof(raw));
#pragma unroll
  for (int j = 0; j < VEC; ++j) out[j] = to_acc<A>(v[j]);
}

template <typename T, int VEC, typename A>
__device__ __forceinline__ void store_vec(T* p, const A (&in)[VEC]) {
  using R = typename Raw<sizeof(T) * VEC>::type;
  T v[VEC];
#pragma unroll
  for (int j = 0; j < VEC; ++j) v[j] = from_acc<T>(in[j]);
  R raw;
  memcpy(&raw, v, sizeof(raw));
  *reinterpret_cast<R*>(p) = raw;
}

// a / d for non-negative a, d: 32-bit division when both fit (the common case: `small`, i.e.
// !Geometry::wide), else 64-bit. Offsets are always 64-bit.
__device__ __forceinline__ int64_t idiv(int64_t a, int64_t d, bool small) {
  return small ? static_cast<int64_t>(static_cast<uint32_t>(a) / static_cast<uint32_t>(d))
               : a / d;
}

// ------------------------------------------------------------------------------ Philox noise
// Philox4x32-10 (Salmon et al., 2011), keyed by the 64-bit seed, counter
// (index lo32, index hi32, step, stream). Exactly the reference's
// (bnkernels/backends/reference.py), so the uniforms are bit-identical to it:
//
//   stream 1, index = channel j:  mu_j    = n_mu (2 u0 - 1)               ~ U(-n_mu, n_mu)
//                                 sigma_j = 1 + (n_sigma - 1) u1           ~ U(1, n_sigma)
//   stream 0, index = logical element index:
//                                 m = mu_j + r_mu (2 u0 - 1)               ~ U(mu_j +- r_mu)
//                                 s = sigma_j + r_sigma sqrt(-2 ln u1) cos(2 pi u2)
//
// with u = ((r >> 8) + 1/2) 2^-24 in (0, 1). The _rn intrinsics keep every product and sum
// separately rounded (never contracted into an FMA), as the reference's fp32 torch ops are.

struct Philox4 { uint32_t r0, r1, r2, r3; };

__host__ __device__ __forceinline__ uint32_t mulhi32(uint32_t a, uint32_t b) {
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
}

__host__ __device__ __forceinline__ Philox4 philox4x32_10(uint64_t seed, uint32_t c0,
                                                           uint32_t c1, uint32_t c2,
                                                           uint32_t c3) {
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
#pragma unroll
  for (int round = 0; round < 10; ++round) {
    const uint32_t hi_a = mulhi32(0xD2511F53u, c0), lo_a = 0xD2511F53u * c0;
    const uint32_t hi_b = mulhi32(0xCD9E8D57u, c2), lo_b = 0xCD9E8D57u * c2;
    const uint32_t n0 = hi_b ^ c1 ^ k0, n2 = hi_a ^ c3 ^ k1;
    c0 = n0;
    c1 = lo_b;
    c2 = n2;
    c3 = lo_a;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return {c0, c1, c2, c3};
}

__device__ __forceinline__ float uniform01(uint32_t r) {
  return __fmul_rn(__fadd_rn(static_cast<float>(r >> 8), 0.5f), 5.9604644775390625e-08f);
}

// The step, read from its device tensor (CUDA-graph safe) or given by value. Kernels call this
// once, at the start, and keep the value (Noise::step) for the rest of the kernel.
__device__ __forceinline__ void resolve_step(Noise& n) {
  if (n.on && n.step_ptr != nullptr) {
    n.step = static_cast<uint32_t>(*n.step_ptr);  // the low 32 bits, as the reference
    n.step_ptr = nullptr;
  }
}

__device__ __forceinline__ void channel_noise(const Noise& n, int64_t c, float& mu,
                                              float& sigma) {
  const Philox4 q = philox4x32_10(n.seed, static_cast<uint32_t>(c), 0u, n.step, 1u);
  mu = __fmul_rn(n.n_mu, __fsub_rn(__fmul_rn(2.0f, uniform01(q.r0)), 1.0f));
  sigma = __fadd_rn(1.0f, __fmul_rn(n.n_sigma_m1, uniform01(q.r1)));
}

__device__ __forceinline__ void element_noise(const Noise& n, int64_t idx, float mu, float sigma,
                                              float& s, float& m) {
  const uint64_t i = static_cast<uint64_t>(idx);
  const Philox4 r = philox4x32_10(n.seed, static_cast<uint32_t>(i),
                                  static_cast<uint32_t>(i >> 32), n.step, 0u);
  m = __fadd_rn(mu, __fmul_rn(n.r_mu, __fsub_rn(__fmul_rn(2.0f, uniform01(r.r0)), 1.0f)));
  const float z = __fmul_rn(sqrtf(__fmul_rn(-2.0f, logf(uniform01(r.r1)))),
                            cosf(__fmul_rn(6.2831855f, uniform01(r.r2))));
  s = __fadd_rn(sigma, __fmul_rn(n.r_sigma, z));
}

// ------------------------------------------------------------------------------ accumulators
// An Op's per-thread accumulator is K values of A; Ops define identity() and merge().

template <typename A, int K> struct State { A v[K]; };

template <typename A, int K>
__device__ __forceinline__ State<A, K> shfl_down(const State<A, K>& s, int offset) {
  State<A, K> out;
#pragma unroll
  for (int k = 0; k < K; ++k) out.v[k] = __shfl_down_sync(0xffffffffu, s.v[k], offset);
  return out;
}

// Chan et al.'s merge of two (count, mean, M2) summaries; an empty summary is neutral:
//   n = na + nb,  mean = ma + d nb / n,  M2 = M2a + M2b + d^2 na nb / n,  d = mb - ma;
// the fourth value, a plain sum (of x: it tells special values apart), is added.
template <typename A>
__device__ __forceinline__ State<A, 4> chan_merge(const State<A, 4>& a, const State<A, 4>& b) {
  const A n = a.v[0] + b.v[0];
  const A frac = n == A(0) ? A(0) : b.v[0] / n;
  const A delta = b.v[1] - a.v[1];
  return {{n, a.v[1] + delta * frac, a.v[2] + b.v[2] + delta * delta * a.v[0] * frac,
           a.v[3] + b.v[3]}};
}

// Merge per-thread states over the rows of a block laid out as threadIdx.x = ty * TX + tx
// (TX a power of two <= 32): afterwards the threads with threadIdx.x < TX hold, for their
// column tx, the merge of every row's state, NS slots each. Warp-shuffle tree within each warp,
// then warp 0 merges the warps' results in warp order. Fixed order: deterministic.
// smem holds (blockDim.x / 32) * TX * NS states. Every thread of the block must call this.
template <class Op, int NS>
__device__ __forceinline__ void reduce_columns(const Op& op, typename Op::State (&st)[NS],
                                               int tx_dim, typename Op::State* smem) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  for (int offset = 16; offset >= tx_dim; offset >>= 1) {
#pragma unroll
    for (int s = 0; s < NS; ++s) st[s] = op.merge(st[s], shfl_down(st[s], offset));
  }
  if (lane < tx_dim) {
#pragma unroll
    for (int s = 0; s < NS; ++s) smem[(warp * tx_dim + lane) * NS + s] = st[s];
  }
  __syncthreads();
  if (warp == 0 && lane < tx_dim) {
#pragma unroll
    for (int s = 0; s < NS; ++s) {
      typename Op::State acc = smem[lane * NS + s];
      for (int w = 1; w < nwarps; ++w) acc = op.merge(acc, smem[(w * tx_dim + lane) * NS + s]);
      st[s] = acc;
    }
  }
  __syncthreads();  // smem may be reused
}

// Partials are [K, C, P] in A: value k of channel c from program p at (k * C + c) * P + p.
template <class Op>
__device__ __forceinline__ void store_partial(typename Op::A* part, int64_t C, int64_t c,
                                              int64_t p, int64_t P,
                                              const typename Op::State& st) {
#pragma unroll
  for (int k = 0; k < Op::K; ++k) part[(k * C + c) * P + p] = st.v[k];
}

// One warp merges the P partials of channel c: lane l takes p = l, l + 32, ... in order, then
// a shuffle tree. The result is valid in lane 0. Every lane of the warp must call this. The
// loads bypass L1 (other blocks of the same launch wrote the partials).
template <class Op>
__device__ __forceinline__ typename Op::State merge_partials(const Op& op,
                                                             const typename Op::A* part,
                                                             int64_t C, int64_t c, int64_t P) {
  typename Op::State st = op.identity();
  for (int64_t p = threadIdx.x & 31; p < P; p += 32) {
    typename Op::State other;
#pragma unroll
    for (int k = 0; k < Op::K; ++k) other.v[k] = __ldcg(part + (k * C + c) * P + p);
    st = op.merge(st, other);
  }
  for (int offset = 16; offset > 0; offset >>= 1) st = op.merge(st, shfl_down(st, offset));
  return st;
}

// ------------------------------------------------------------------------------ Op interface
// A reduction Op provides
//   using A; using State = State<A, K>; static constexpr int K;
//   static constexpr bool kDy (reads dy), kIndex (needs logical element indices);
//   struct Chan (per-channel constants), Chan chan(int64_t c) const;
//   void init()                          (once per thread, at kernel start: resolves the step)
//   State identity() const, State merge(State, State) const;
//   template <int B> void update(State&, const Chan&, const A (&x)[B], const A (&dy)[B],
//                                int64_t idx0, int64_t istride) const
//       folds B values of one channel (logical indices idx0 + j * istride) into the state.
// A finalize functor ("Fin") holds its reduction Op as `op` and provides
//   void init()                          (once per thread: initializes op too)
//   void finish(int64_t c, const State&) (run by one thread per channel, once all of the
//                                         channel's partials are merged)
// An elementwise Op provides A, kDy, kIndex, Chan, chan(), init(),
//   void block0() const                  (run by every thread of block 0 only: snapshots)
//   A elem(const Chan&, A x, A dy, int64_t idx) const.

// ------------------------------------------------------------------------------ last block
// A split reduction is finalized by the last of its P blocks of a channel (group) to finish,
// in the same launch: each block stores its partial, then takes a ticket (an atomic counter
// per group in a zero-initialized workspace). The block that draws ticket P - 1 has every
// other block's partial visible, merges all P of them in a fixed order (merge_partials: never
// in arrival order, so the result does not depend on timing) and resets the counter to 0 for
// the next launch. No host synchronization, no extra launch.

// Every thread of the block calls this after its partial stores. True in every thread of the
// last block of the group.
__device__ __forceinline__ bool last_of_group(unsigned* ticket, unsigned n) {
  BNK_SHARED(int, sh_last, 1);
  __threadfence();  // this block's partials, visible device-wide before its ticket
  __syncthreads();
  if (threadIdx.x == 0) {
    const unsigned t = atomicAdd(ticket, 1u);
    sh_last[0] = t == n - 1 ? 1 : 0;
    if (t == n - 1) *ticket = 0u;  // every block of the group has counted in: reset
  }
  __syncthreads();
  const bool last = sh_last[0] != 0;
  if (last) __threadfence();  // the other blocks' partials, read after their tickets
  return last;
}

// Split reduction over an (N, C, S)-contiguous x ("ncs"). Grid (C, P): program (c, p) folds the
// vectors [p * chunk, (p + 1) * chunk) of channel c's M / VEC vectors; vector v of the channel
// starts at per-channel index i = v * VEC (batch row n = i / S, position s = i % S), stored at
// (n * C + c) * S + s; a vector never crosses a row (S % VEC == 0). Writes partials [K, C, P];
// the last program of channel c (ticket tickets[c]) merges them and runs fin.finish(c, .).
template <typename T, int VEC, class Fin>
__global__ void __launch_bounds__(kThreads)
    reduce_ncs_kernel(Fin fin, const T* __restrict__ x, const T* __restrict__ dy, Geometry g,
                      int64_t chunk, typename Fin::A* part, unsigned* tickets) {
  using Op = typename Fin::Op;
  using A = typename Op::A;
  using St = typename Op::State;
  BNK_SHARED(St, smem, kThreads / 32);
  fin.init();
  const Op& op = fin.op;
  const int64_t c = blockIdx.x, p = blockIdx.y, P = gridDim.y;
  const int64_t nvec = g.M() / VEC;
  const int64_t v_end = p * chunk + chunk < nvec ? p * chunk + chunk : nvec;
  const bool small = !g.wide;
  const typename Op::Chan ch = op.chan(c);
  St st[1] = {op.identity()};
  for (int64_t v = p * chunk + threadIdx.x; v < v_end; v += blockDim.x) {
    const int64_t i = v * VEC;
    const int64_t n = idiv(i, g.S, small);
    const int64_t off = (n * g.C + c) * g.S + (i - n * g.S);
    A xv[VEC], dv[VEC];
    load_vec<T, VEC>(x + off, xv);
    if constexpr (Op::kDy) {
      load_vec<T, VEC>(dy + off, dv);
    } else {
#pragma unroll
      for (int j = 0; j < VEC; ++j) dv[j] = A(0);
    }
    op.template update<VEC>(st[0], ch, xv, dv, off, 1);
  }
  reduce_columns<Op, 1>(op, st, 1, smem);
  if (threadIdx.x == 0) store_partial<Op>(part, g.C, c, p, P, st[0]);
  if (!last_of_group(tickets + c, static_cast<unsigned>(P))) return;
  if (threadIdx.x < 32) {
    const St merged = merge_partials(op, part, g.C, c, P);
    if (threadIdx.x == 0) fin.finish(c, merged);
  }
}

// Split reduction over an (M, C)-contiguous x ("mc", channels last). The block is TX x TY
// threads (threadIdx.x = ty * TX + tx): column tx holds VEC consecutive channels
// c0 = (blockIdx.x * TX + tx) * VEC, and rows ty, ty + TY, ... of the program's row range
// [p * chunk, (p + 1) * chunk). Grid (ceil(C / (VEC TX)), P). Writes partials [K, C, P]; the
// last program of channel group blockIdx.x (ticket tickets[blockIdx.x]) merges them, one warp
// per channel, and runs fin.finish on the group's channels.
template <typename T, int VEC, class Fin>
__global__ void __launch_bounds__(kThreads)
    reduce_mc_kernel(Fin fin, const T* __restrict__ x, const T* __restrict__ dy, Geometry g,
                     int64_t chunk, int tx_dim, typename Fin::A* part, unsigned* tickets) {
  using Op = typename Fin::Op;
  using A = typename Op::A;
  using St = typename Op::State;
  BNK_SHARED(St, smem, kThreads * VEC);
  fin.init();
  const Op& op = fin.op;
  const int tx = threadIdx.x % tx_dim, ty = threadIdx.x / tx_dim, ty_dim = blockDim.x / tx_dim;
  const int64_t c0 = (static_cast<int64_t>(blockIdx.x) * tx_dim + tx) * VEC;
  const bool active = c0 < g.C;  // C % VEC == 0: a vector is all in or all out
  const int64_t p = blockIdx.y, P = gridDim.y, M = g.M();
  const int64_t r_end = p * chunk + chunk < M ? p * chunk + chunk : M;
  const bool small = !g.wide;
  typename Op::Chan ch[VEC];
  St st[VEC];
#pragma unroll
  for (int j = 0; j < VEC; ++j) {
    st[j] = op.identity();
    if (active) ch[j] = op.chan(c0 + j);
  }
  if (active) {
    for (int64_t m = p * chunk + ty; m < r_end; m += ty_dim) {
      const int64_t off = m * g.C + c0;
      A xv[VEC], dv[VEC];
      load_vec<T, VEC>(x + off, xv);
      if constexpr (Op::kDy) {
        load_vec<T, VEC>(dy + off, dv);
      } else {
#pragma unroll
        for (int j = 0; j < VEC; ++j) dv[j] = A(0);
      }
      int64_t idx0 = 0;  // logical index of channel c0 at row m = n * S + s
      if constexpr (Op::kIndex) {
        const int64_t n = idiv(m, g.S, small);
        idx0 = (n * g.C + c0) * g.S + (m - n * g.S);
      }
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const A xj[1] = {xv[j]}, dj[1] = {dv[j]};
        op.template update<1>(st[j], ch[j], xj, dj, idx0 + j * g.S, 0);
      }
    }
  }
  reduce_columns<Op, VEC>(op, st, tx_dim, smem);
  if (threadIdx.x < tx_dim && active) {
#pragma unroll
    for (int j = 0; j < VEC; ++j) store_partial<Op>(part, g.C, c0 + j, p, P, st[j]);
  }
  if (!last_of_group(tickets + blockIdx.x, static_cast<unsigned>(P))) return;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  const int64_t base = static_cast<int64_t>(blockIdx.x) * tx_dim * VEC;
  for (int cl = warp; cl < tx_dim * VEC; cl += nwarps) {
    const int64_t c = base + cl;
    if (c >= g.C) break;  // warp-uniform
    const St merged = merge_partials(op, part, g.C, c, P);
    if (lane == 0) fin.finish(c, merged);
  }
}

// out = op.elem(x, dy) elementwise over an (N, C, S)-contiguous tensor ("ncs"), VEC elements
// per step: block b takes the vectors [b * span, (b + 1) * span), its threads consecutive
// vectors (a vector lies in one row n * C + c, as S % VEC == 0). A thread's next vector is
// blockDim.x vectors on, mostly in the same row: the channel's constants are recomputed only
// when the row changes. Logical index = memory index.
template <typename T, int VEC, class Op>
__global__ void __launch_bounds__(kThreads)
    elementwise_ncs_kernel(Op op, const T* __restrict__ x, const T* __restrict__ dy,
                           T* __restrict__ out, Geometry g, int64_t span) {
  using A = typename Op::A;
  op.init();
  if (blockIdx.x == 0) op.block0();
  const int64_t nvec = g.numel() / VEC;
  const bool small = !g.wide;
  const int64_t begin = static_cast<int64_t>(blockIdx.x) * span;
  const int64_t end = begin + span < nvec ? begin + span : nvec;
  int64_t row_of_ch = -1;
  typename Op::Chan ch{};
  for (int64_t v = begin + threadIdx.x; v < end; v += blockDim.x) {
    const int64_t i = v * VEC;
    const int64_t row = idiv(i, g.S, small);
    if (row != row_of_ch) {
      row_of_ch = row;
      ch = op.chan(row - idiv(row, g.C, small) * g.C);
    }
    A xv[VEC], dv[VEC], ov[VEC];
    load_vec<T, VEC>(x + i, xv);
    if constexpr (Op::kDy) {
      load_vec<T, VEC>(dy + i, dv);
    } else {
#pragma unroll
      for (int j = 0; j < VEC; ++j) dv[j] = A(0);
    }
#pragma unroll
    for (int j = 0; j < VEC; ++j) ov[j] = op.elem(ch, xv[j], dv[j], i + j);
    store_vec<T, VEC>(out + i, ov);
  }
}

// out = op.elem(x, dy) elementwise over an (M, C)-contiguous tensor ("mc"), tiled as the "mc"
// reduction: thread (tx, ty) of block (gx, p) holds the VEC consecutive channels
// c0 = (gx * TX + tx) * VEC -- their constants computed once -- and rows ty, ty + TY, ... of
// [p * chunk, (p + 1) * chunk). Logical index of (row m = n * S + s, channel c):
// (n * C + c) * S + s.
template <typename T, int VEC, class Op>
__global__ void __launch_bounds__(kThreads)
    elementwise_mc_kernel(Op op, const T* __restrict__ x, const T* __restrict__ dy,
                          T* __restrict__ out, Geometry g, int64_t chunk, int tx_dim) {
  using A = typename Op::A;
  op.init();
  if (blockIdx.x == 0 && blockIdx.y == 0) op.block0();
  const int tx = threadIdx.x % tx_dim, ty = threadIdx.x / tx_dim, ty_dim = blockDim.x / tx_dim;
  const int64_t c0 = (static_cast<int64_t>(blockIdx.x) * tx_dim + tx) * VEC;
  if (c0 >= g.C) return;  // C % VEC == 0: a vector is all in or all out
  const int64_t M = g.M(), r0 = static_cast<int64_t>(blockIdx.y) * chunk;
  const int64_t r_end = r0 + chunk < M ? r0 + chunk : M;
  const bool small = !g.wide;
  typename Op::Chan ch[VEC];
#pragma unroll
  for (int j = 0; j < VEC; ++j) ch[j] = op.chan(c0 + j);
  for (int64_t m = r0 + ty; m < r_end; m += ty_dim) {
    const int64_t off = m * g.C + c0;
    A xv[VEC], dv[VEC], ov[VEC];
    load_vec<T, VEC>(x + off, xv);
    if constexpr (Op::kDy) {
      load_vec<T, VEC>(dy + off, dv);
    } else {
#pragma unroll
      for (int j = 0; j < VEC; ++j) dv[j] = A(0);
    }
    int64_t idx0 = 0;
    if constexpr (Op::kIndex) {
      const int64_t n = idiv(m, g.S, small);
      idx0 = (n * g.C + c0) * g.S + (m - n * g.S);
    }
#pragma unroll
    for (int j = 0; j < VEC; ++j) ov[j] = op.elem(ch[j], xv[j], dv[j], idx0 + j * g.S);
    store_vec<T, VEC>(out + off, ov);
  }
}

// ------------------------------------------------------------------------------ launching

// Split and tiling of a per-channel reduction (the same for every family, so one workspace
// serves them all): about 8 blocks per SM in all, each thread with at least one vector (or
// row) unless the split is forced.
struct ReduceCfg {
  int64_t split = 1, chunk = 1;  // programs per channel (group); vectors or rows per program
  int tx = 1;                    // "mc": threads across a channel group
  int64_t groups = 1;            // channels ("ncs") or channel groups ("mc"): grid.x, tickets
};

// "mc" tiles: TX threads across ceil(C / VEC) channel vectors (a power of two <= 32).
inline int mc_tx(const Launch& l) {
  const int64_t cv = ceil_div(l.g.C, l.vec);
  return next_pow2(cv) < 32 ? next_pow2(cv) : 32;
}

inline ReduceCfg reduce_cfg(const Launch& l) {
  const Geometry& g = l.g;
  ReduceCfg r;
  const int64_t target = static_cast<int64_t>(l.num_sms) * 8;
  int64_t units, per_block, groups;
  if (g.ncs) {
    units = g.M() / l.vec;  // vectors per channel
    per_block = kThreads;
    groups = g.C;
  } else {
    r.tx = mc_tx(l);
    units = g.M();  // rows
    per_block = kThreads / r.tx;
    groups = ceil_div(ceil_div(g.C, l.vec), r.tx);
  }
  if (units < 1) units = 1;
  int64_t split = l.split > 0 ? l.split : ceil_div(target, groups);
  if (l.split <= 0 && split > ceil_div(units, per_block)) split = ceil_div(units, per_block);
  if (split > units) split = units;
  if (split > 65535) split = 65535;  // grid.y limit
  if (split < 1) split = 1;
  r.chunk = ceil_div(units, split);
  r.split = ceil_div(units, r.chunk);
  r.groups = groups;
  return r;
}

// Run a split reduction (ncs or mc by l.g) of fin.op over x (and dy), finalized by the last
// block of each channel (group): partials [K, C, split] in `part`, tickets [groups] (zero on
// entry, zero again on exit). One launch.
template <typename T, int VEC, class Fin>
void launch_reduce(const Launch& l, const Fin& fin, const void* x, const void* dy, void* part,
                   unsigned* tickets, const char* what) {
  const ReduceCfg r = reduce_cfg(l);
  const T* xp = static_cast<const T*>(x);
  const T* dp = static_cast<const T*>(dy);
  auto* pp = static_cast<typename Fin::A*>(part);
  if (l.g.ncs) {
    const auto kernel = &reduce_ncs_kernel<T, VEC, Fin>;
    BNK_LAUNCH(kernel, dim3(static_cast<unsigned>(l.g.C), static_cast<unsigned>(r.split)),
               kThreads, l.stream, fin, xp, dp, l.g, r.chunk, pp, tickets);
  } else {
    const auto kernel = &reduce_mc_kernel<T, VEC, Fin>;
    BNK_LAUNCH(kernel, dim3(static_cast<unsigned>(r.groups), static_cast<unsigned>(r.split)),
               kThreads, l.stream, fin, xp, dp, l.g, r.chunk, r.tx, pp, tickets);
  }
  check_launch(what);
}

template <typename T, int VEC, class Op>
void launch_elementwise(const Launch& l, const Op& op, const void* x, const void* dy, void* out,
                        const char* what) {
  const int64_t cap = static_cast<int64_t>(l.num_sms) * 32;  // blocks
  const T* xp = static_cast<const T*>(x);
  const T* dp = static_cast<const T*>(dy);
  T* op_out = static_cast<T*>(out);
  if (l.g.ncs) {
    const int64_t nvec = l.g.numel() / VEC;
    int64_t blocks = ceil_div(nvec, kThreads);
    if (blocks > cap) blocks = cap;
    if (blocks < 1) blocks = 1;
    const int64_t span = ceil_div(ceil_div(nvec, blocks), kThreads) * kThreads;
    blocks = ceil_div(nvec, span) > 0 ? ceil_div(nvec, span) : 1;
    const auto kernel = &elementwise_ncs_kernel<T, VEC, Op>;
    BNK_LAUNCH(kernel, static_cast<unsigned>(blocks), kThreads, l.stream, op, xp, dp, op_out,
               l.g, span);
  } else {
    const int tx = mc_tx(l);
    const int64_t groups = ceil_div(ceil_div(l.g.C, VEC), tx);
    const int64_t rows_per_block = kThreads / tx, M = l.g.M();
    int64_t split = ceil_div(cap, groups);
    if (split > ceil_div(M, rows_per_block)) split = ceil_div(M, rows_per_block);
    if (split > 65535) split = 65535;
    if (split < 1) split = 1;
    const int64_t chunk = ceil_div(M, split);
    split = ceil_div(M, chunk);
    const auto kernel = &elementwise_mc_kernel<T, VEC, Op>;
    BNK_LAUNCH(kernel, dim3(static_cast<unsigned>(groups), static_cast<unsigned>(split)),
               kThreads, l.stream, op, xp, dp, op_out, l.g, chunk, tx);
  }
  check_launch(what);
}

// Run body with T bound to x's element type and VEC to the vector width (16 bytes, or 1).
#define BNK_DISPATCH_VEC(T, VEC, ...)                        \
  do {                                                       \
    if (l.vec > 1) {                                         \
      constexpr int VEC = 16 / static_cast<int>(sizeof(T));  \
      __VA_ARGS__;                                           \
    } else {                                                 \
      constexpr int VEC = 1;                                 \
      __VA_ARGS__;                                           \
    }                                                        \
  } while (0)

#define BNK_DISPATCH(dtype, T, VEC, ...)                                    \
  switch (dtype) {                                                          \
    case DType::kFloat: {                                                   \
      using T = float;                                                      \
      BNK_DISPATCH_VEC(T, VEC, __VA_ARGS__);                                \
      break;                                                                \
    }                                                                       \
    case DType::kHalf: {                                                    \
      using T = __half;                                                     \
      BNK_DISPATCH_VEC(T, VEC, __VA_ARGS__);                                \
      break;                                                                \
    }                                                                       \
    case DType::kBFloat16: {                                                \
      using T = __nv_bfloat16;                                              \
      BNK_DISPATCH_VEC(T, VEC, __VA_ARGS__);                                \
      break;                                                                \
    }                                                                       \
    case DType::kDouble: {                                                  \
      using T = double;                                                     \
      BNK_DISPATCH_VEC(T, VEC, __VA_ARGS__);                                \
      break;                                                                \
    }                                                                       \
    default:                                                                \
      throw std::runtime_error("bnkernels cuda: unsupported dtype");       \
  }

}  // namespace bnk
