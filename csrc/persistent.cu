// Persistent single-read BatchNorm (training), for tensors that fit on chip.
//
// The multi-pass pipeline reads x twice from memory (statistics, then normalize) and its
// backward reads x and dy twice. Here one cooperative launch does it all, with each block's
// share of x (and dy) kept in registers across a grid-wide barrier:
//
//   forward:   load x -> per-thread Welford of x - K (K = the channel's first element, as the
//              multi-pass kernels) and sum of x -> block merge -> partial [4, C, P] in global
//              == grid.sync() ==
//              every block Chan-merges the P partials of its channels (a fixed order, so all
//              blocks of a channel get bit-identical statistics); block 0 of each channel writes
//              mean / invstd and updates the running buffers; normalize the registers -> y as
//              (x - mean_hi) - mean_lo (mean_lo left out with the fused ReLU, see
//              batch_norm.cuh).
//   backward:  load x, dy -> g (fused ReLU mask) -> block sums -> partial [2, C, P]
//              == grid.sync() ==
//              merge -> mean(g), mean(g (x - mean)); block 0 writes dweight, dbias;
//              dx from the registers.
//
// Contract: "ncs" (N, C, S) or "mc" (N*S, C) contiguous x, as the multi-pass kernels. Work
// split: "ncs": channel c gets P blocks, each a run of `chunk` vectors of the channel's M / VEC;
// "mc": a group of TX * VEC channels gets P blocks, each `chunk` rows. A thread keeps at most
// kItems elements (per tensor). The plan (bn_persistent_plan) checks that the whole grid is
// co-resident (occupancy x SMs), which a grid barrier needs; otherwise the binding runs the
// multi-pass kernels. float64 is not instantiated here (it is for gradcheck; multi-pass serves
// it), nor is the noisy variant (its Philox work dwarfs the saved read).
#include <cooperative_groups.h>

#include <algorithm>
#include <map>
#include <mutex>
#include <type_traits>
#include <utility>

#include "batch_norm.cuh"

namespace bnk {

namespace cg = cooperative_groups;

constexpr int kItems = 16;  // elements per thread per tensor held in registers

template <typename A> struct PersistentFwd {
  const void* x;
  void* y;
  A* ws;
  A* mean;
  A* invstd;
  A* running_mean;
  A* running_var;
  A m, unbias, momentum, keep, eps;
  const A* weight;
  const A* bias;
  bool relu;
  Geometry g;
  int per_channel, tx;
  int64_t chunk;
};

template <typename A> struct PersistentBwd {
  const void* dy;
  const void* x;
  void* dx;
  A* ws;
  const A* mean;
  const A* invstd;
  const A* weight;
  const A* bias;
  A* dweight;
  A* dbias;
  A inv_m;
  bool relu;
  Geometry g;
  int per_channel, tx;
  int64_t chunk;
};

// Where thread `threadIdx.x` of block `blockIdx.x` reads its j-th vector, for both layouts:
// the element offset of the vector and whether it exists. `grp` is the block's channel ("ncs")
// or channel group ("mc"), `share` its index among the blocks of that group.
template <int VEC, bool NCS> struct Tile {
  int64_t grp, share;
  int tx, ty, ty_dim;
  int64_t c0;      // "mc": first channel of this thread's vector
  bool active;     // "mc": the thread's channels exist
  int64_t begin, end;

  __device__ Tile(const Geometry& g, int per_channel, int tx_dim, int64_t chunk) {
    grp = blockIdx.x / per_channel;
    share = blockIdx.x % per_channel;
    begin = share * chunk;
    if (NCS) {
      tx = 0;
      ty = threadIdx.x;
      ty_dim = blockDim.x;
      c0 = grp;
      active = true;
      const int64_t nvec = g.M() / VEC;
      end = begin + chunk < nvec ? begin + chunk : nvec;
    } else {
      tx = threadIdx.x % tx_dim;
      ty = threadIdx.x / tx_dim;
      ty_dim = blockDim.x / tx_dim;
      c0 = (grp * tx_dim + tx) * VEC;
      active = c0 < g.C;
      end = begin + chunk < g.M() ? begin + chunk : g.M();
    }
  }

  // Offset of the thread's j-th vector, or -1 if there is none.
  __device__ int64_t offset(const Geometry& g, int j) const {
    const int64_t u = begin + ty + static_cast<int64_t>(j) * ty_dim;  // vector ("ncs"), row ("mc")
    if (!active || u >= end) return -1;
    if (NCS) {
      const int64_t i = u * VEC;
      const int64_t n = idiv(i, g.S, !g.wide);
      return (n * g.C + grp) * g.S + (i - n * g.S);
    }
    return u * g.C + c0;
  }
};

template <typename T, int VEC, bool NCS>
__global__ void __launch_bounds__(kThreads) bn_persistent_fwd_kernel(PersistentFwd<acc_t<T>> p) {
  using A = acc_t<T>;
  using Op = WelfordOp<T, A>;
  using St = typename Op::State;
  constexpr int IV = kItems / VEC;  // vectors per thread
  constexpr int NS = NCS ? 1 : VEC;  // channels per thread
  constexpr int kMaxCh = NCS ? 1 : 32 * VEC;  // channels of a block (TX <= 32)
  BNK_SHARED(St, smem, kThreads * NS);
  BNK_SHARED(A, sh_mean, kMaxCh);
  BNK_SHARED(A, sh_lo, kMaxCh);
  BNK_SHARED(A, sh_k, kMaxCh);
  BNK_SHARED(A, sh_b, kMaxCh);
  const Geometry& g = p.g;
  const T* x = static_cast<const T*>(p.x);
  const Op op{x, g.ncs ? g.S : 1};
  const Tile<VEC, NCS> t(g, p.per_channel, p.tx, p.chunk);

  // Phase 1: x -> registers, Welford per channel slot, block merge, partial to global.
  A xr[IV][VEC];
  St st[NS];
  typename Op::Chan sh[NS];
#pragma unroll
  for (int s = 0; s < NS; ++s) {
    st[s] = op.identity();
    if (t.active) sh[s] = op.chan(t.c0 + s);
  }
#pragma unroll
  for (int j = 0; j < IV; ++j) {
    const int64_t off = t.offset(g, j);
    if (off < 0) continue;
    load_vec<T, VEC>(x + off, xr[j]);
    if constexpr (NCS) {
      op.template update<VEC>(st[0], sh[0], xr[j], xr[j], 0, 0);
    } else {
#pragma unroll
      for (int s = 0; s < VEC; ++s) {
        const A xs[1] = {xr[j][s]};
        op.template update<1>(st[s], sh[s], xs, xs, 0, 0);
      }
    }
  }
  reduce_columns<Op, NS>(op, st, NCS ? 1 : p.tx, smem);
  if (threadIdx.x < (NCS ? 1 : p.tx) && t.active) {
#pragma unroll
    for (int s = 0; s < NS; ++s) {
      store_partial<Op>(p.ws, g.C, t.c0 + s, t.share, p.per_channel, st[s]);
    }
  }

  cg::this_grid().sync();

  // Phase 2: the statistics of this block's channels, one warp per channel.
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  const int nch = NCS ? 1 : p.tx * VEC;
  const int64_t cbase = NCS ? t.grp : t.grp * p.tx * VEC;
  for (int cl = warp; cl < nch; cl += nwarps) {
    const int64_t c = cbase + cl;
    if (c >= g.C) continue;  // warp-uniform
    const St merged = merge_partials(op, p.ws, g.C, c, p.per_channel);
    if (lane == 0) {
      const BnMoments<A> r = bn_moments(merged, op.shift(c), p.m, p.eps);
      const BnChan<A> ch = make_chan(c, r.mean, r.invstd, p.weight, p.bias, Noise{});
      sh_mean[cl] = ch.mean;
      sh_lo[cl] = p.relu ? A(0) : r.lo;
      sh_k[cl] = ch.k;
      sh_b[cl] = ch.b;
      if (t.share == 0) {
        p.mean[c] = r.mean;
        p.invstd[c] = r.invstd;
        bn_update_running(p.running_mean, p.running_var, c, r, p.momentum, p.keep, p.unbias);
      }
    }
  }
  __syncthreads();

  // Phase 3: normalize the registers.
  T* y = static_cast<T*>(p.y);
  const Noise no_noise{};
#pragma unroll
  for (int j = 0; j < IV; ++j) {
    const int64_t off = t.offset(g, j);
    if (off < 0) continue;
    A out[VEC];
#pragma unroll
    for (int s = 0; s < VEC; ++s) {
      const int cl = NCS ? 0 : t.tx * VEC + s;
      BnChan<A> ch{};
      ch.mean = sh_mean[cl];
      ch.lo = sh_lo[cl];
      ch.k = sh_k[cl];
      ch.b = sh_b[cl];
      A unused;
      out[s] = bn_out<A, false>(ch, xr[j][s], 0, no_noise, p.relu, unused);
    }
    store_vec<T, VEC>(y + off, out);
  }
}

template <typename T, int VEC, bool NCS>
__global__ void __launch_bounds__(kThreads) bn_persistent_bwd_kernel(PersistentBwd<acc_t<T>> p) {
  using A = acc_t<T>;
  using Op = BnGradOp<A, false>;
  using St = typename Op::State;
  constexpr int IV = kItems / VEC;
  constexpr int NS = NCS ? 1 : VEC;
  constexpr int kMaxCh = NCS ? 1 : 32 * VEC;
  BNK_SHARED(St, smem, kThreads * NS);
  BNK_SHARED(A, sh_kg, kMaxCh);
  BNK_SHARED(A, sh_kgx, kMaxCh);
  const Op op{{p.mean, p.invstd, kFromInvstd, A(0), p.weight, p.bias}, p.relu, Noise{}};
  const Geometry& g = p.g;
  const Tile<VEC, NCS> t(g, p.per_channel, p.tx, p.chunk);
  const T* x = static_cast<const T*>(p.x);
  const T* dy = static_cast<const T*>(p.dy);

  // Phase 1: x, dy -> registers; g = dL/da replaces dy; block sums; partial to global.
  BnChan<A> ch[NS];
#pragma unroll
  for (int s = 0; s < NS; ++s) {
    if (t.active) ch[s] = op.chan(t.c0 + s);
  }
  A xr[IV][VEC], gr[IV][VEC];
  St st[NS];
#pragma unroll
  for (int s = 0; s < NS; ++s) st[s] = op.identity();
#pragma unroll
  for (int j = 0; j < IV; ++j) {
    const int64_t off = t.offset(g, j);
    if (off < 0) continue;
    load_vec<T, VEC>(x + off, xr[j]);
    load_vec<T, VEC>(dy + off, gr[j]);
#pragma unroll
    for (int s = 0; s < VEC; ++s) {
      const int slot = NCS ? 0 : s;
      const A gv = bn_upstream<A, false>(ch[slot], xr[j][s], gr[j][s], 0, op.noise, p.relu);
      gr[j][s] = gv;
      st[slot].v[0] += gv;
      st[slot].v[1] += gv * (xr[j][s] - ch[slot].mean);
    }
  }
  reduce_columns<Op, NS>(op, st, NCS ? 1 : p.tx, smem);
  if (threadIdx.x < (NCS ? 1 : p.tx) && t.active) {
#pragma unroll
    for (int s = 0; s < NS; ++s) {
      store_partial<Op>(p.ws, g.C, t.c0 + s, t.share, p.per_channel, st[s]);
    }
  }

  cg::this_grid().sync();

  // Phase 2: the channels' sums -> dx coefficients; block 0 of each channel writes dw, db.
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  const int nch = NCS ? 1 : p.tx * VEC;
  const int64_t cbase = NCS ? t.grp : t.grp * p.tx * VEC;
  for (int cl = warp; cl < nch; cl += nwarps) {
    const int64_t c = cbase + cl;
    if (c >= g.C) continue;  // warp-uniform
    const St sums = merge_partials(op, p.ws, g.C, c, p.per_channel);
    if (lane == 0) {
      const A invstd = p.invstd[c];
      sh_kg[cl] = sums.v[0] * p.inv_m;
      sh_kgx[cl] = sums.v[1] * p.inv_m * invstd * invstd;
      if (t.share == 0) {
        if (p.dweight != nullptr) p.dweight[c] = sums.v[1] * invstd;
        if (p.dbias != nullptr) p.dbias[c] = sums.v[0];
      }
    }
  }
  __syncthreads();
  if (p.dx == nullptr) return;

  // Phase 3: dx = k (g - mean(g) - (x - mean) kgx) from the registers.
  T* dx = static_cast<T*>(p.dx);
#pragma unroll
  for (int j = 0; j < IV; ++j) {
    const int64_t off = t.offset(g, j);
    if (off < 0) continue;
    A out[VEC];
#pragma unroll
    for (int s = 0; s < VEC; ++s) {
      const int slot = NCS ? 0 : s;
      const int cl = NCS ? 0 : t.tx * VEC + s;
      out[s] = ch[slot].k * (gr[j][s] - sh_kg[cl] - (xr[j][s] - ch[slot].mean) * sh_kgx[cl]);
    }
    store_vec<T, VEC>(dx + off, out);
  }
}

// ------------------------------------------------------------------------------ host side

namespace {

// Every instantiation takes the same parameter struct (float accumulation), so one pointer
// type per direction covers the float32, float16 and bfloat16 kernels.
using FwdKernel = void (*)(PersistentFwd<float>);
using BwdKernel = void (*)(PersistentBwd<float>);

template <typename T, int VEC> FwdKernel fwd_kernel(bool ncs) {
  return ncs ? &bn_persistent_fwd_kernel<T, VEC, true> : &bn_persistent_fwd_kernel<T, VEC, false>;
}
template <typename T, int VEC> BwdKernel bwd_kernel(bool ncs) {
  return ncs ? &bn_persistent_bwd_kernel<T, VEC, true> : &bn_persistent_bwd_kernel<T, VEC, false>;
}

// The instantiation for the launch's dtype, vector width and layout; null for float64.
template <bool BWD> auto kernel_for(const Launch& l) {
  using K = std::conditional_t<BWD, BwdKernel, FwdKernel>;
  const bool v = l.vec > 1, ncs = l.g.ncs;
  switch (l.dtype) {
    case DType::kFloat:
      if constexpr (BWD) return K(v ? bwd_kernel<float, 4>(ncs) : bwd_kernel<float, 1>(ncs));
      else return K(v ? fwd_kernel<float, 4>(ncs) : fwd_kernel<float, 1>(ncs));
    case DType::kHalf:
      if constexpr (BWD) return K(v ? bwd_kernel<__half, 8>(ncs) : bwd_kernel<__half, 1>(ncs));
      else return K(v ? fwd_kernel<__half, 8>(ncs) : fwd_kernel<__half, 1>(ncs));
    case DType::kBFloat16:
      if constexpr (BWD) {
        return K(v ? bwd_kernel<__nv_bfloat16, 8>(ncs) : bwd_kernel<__nv_bfloat16, 1>(ncs));
      } else {
        return K(v ? fwd_kernel<__nv_bfloat16, 8>(ncs) : fwd_kernel<__nv_bfloat16, 1>(ncs));
      }
    default:
      return K(nullptr);
  }
}

// Resident blocks per SM of `kernel` on `device` (0 when the query fails), and whether the
// device takes cooperative launches (false when the query fails). Both are asked of the
// driver once per device and kernel, not on every call.
template <typename K> int blocks_per_sm(K kernel, int device) {
  static std::mutex mutex;
  static std::map<std::pair<int, const void*>, int> cache;
  const auto key = std::make_pair(device, reinterpret_cast<const void*>(kernel));
  const std::lock_guard<std::mutex> lock(mutex);
  const auto it = cache.find(key);
  if (it != cache.end()) return it->second;
  int n = 0;
  if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, kernel, kThreads, 0) != cudaSuccess) {
    (void)cudaGetLastError();
    return 0;  // not cached: asked again next time
  }
  cache.emplace(key, n);
  return n;
}

bool cooperative(int device) {
  static std::mutex mutex;
  static std::map<int, bool> cache;
  const std::lock_guard<std::mutex> lock(mutex);
  const auto it = cache.find(device);
  if (it != cache.end()) return it->second;
  int coop = 0;
  if (cudaDeviceGetAttribute(&coop, cudaDevAttrCooperativeLaunch, device) != cudaSuccess) {
    (void)cudaGetLastError();
    return false;
  }
  cache.emplace(device, coop != 0);
  return coop != 0;
}

// One launch of the whole grid, every block resident at once (what grid.sync() needs).
// Returns false, with nothing launched and the error cleared, when the driver refuses a
// cooperative launch of this size here (an MPS client or an SM-limited context: "cooperative
// launch too large"; or not supported/permitted): the caller then runs the multi-pass kernels.
// Any other error throws.
template <typename P>
bool launch_cooperative(void (*kernel)(P), const PersistentPlan& plan, P params,
                        cudaStream_t stream, const char* what) {
#ifndef BNK_CPU_EMULATION
  void* args[] = {&params};
  const cudaError_t e =
      cudaLaunchCooperativeKernel(reinterpret_cast<const void*>(kernel), dim3(plan.blocks),
                                  dim3(kThreads), args, 0, stream);
#else
  (void)stream;
  const cudaError_t e =
      ::emu::launch_cooperative(kernel, dim3(plan.blocks), dim3(kThreads), params);
#endif
  if (e == cudaSuccess) return true;
  (void)cudaGetLastError();  // clear it
  if (e == cudaErrorCooperativeLaunchTooLarge || e == cudaErrorNotSupported ||
      e == cudaErrorNotPermitted) {
    return false;
  }
  throw std::runtime_error(std::string("bnkernels cuda: cooperative launch of ") + what +
                           " failed: " + cudaGetErrorString(e));
}

}  // namespace

PersistentPlan bn_persistent_plan(const Launch& l, bool backward, int device) {
  PersistentPlan plan;
  const bool have = backward ? kernel_for<true>(l) != nullptr : kernel_for<false>(l) != nullptr;
  if (!have) {
    plan.why = "no persistent kernel for this dtype (float64 runs multi-pass)";
    return plan;
  }
  if (!cooperative(device)) {
    plan.why = "the device does not support cooperative launches";
    return plan;
  }
  const int per_sm = backward ? blocks_per_sm(kernel_for<true>(l), device)
                              : blocks_per_sm(kernel_for<false>(l), device);
  if (per_sm <= 0) {
    plan.why = "the occupancy query failed";
    return plan;
  }
  const int64_t resident = static_cast<int64_t>(per_sm) * l.num_sms;
  const Geometry& g = l.g;
  const int64_t iv = kItems / l.vec;  // vectors (ncs) or rows (mc) per thread
  int64_t groups;
  if (g.ncs) {
    const int64_t nvec = g.M() / l.vec;
    plan.tx = 1;
    plan.per_channel = static_cast<int>(std::min<int64_t>(ceil_div(nvec, kThreads * iv), 1 << 30));
    plan.chunk = ceil_div(nvec, plan.per_channel);
    groups = g.C;
  } else {
    const int64_t cv = ceil_div(g.C, l.vec);
    plan.tx = next_pow2(cv) < 32 ? next_pow2(cv) : 32;
    const int64_t rows = (kThreads / plan.tx) * iv;
    plan.per_channel = static_cast<int>(std::min<int64_t>(ceil_div(g.M(), rows), 1 << 30));
    plan.chunk = ceil_div(g.M(), plan.per_channel);
    groups = ceil_div(cv, plan.tx);
  }
  const int64_t blocks = groups * plan.per_channel;
  if (blocks > resident) {
    plan.why = "the tensor does not fit in the registers of the co-resident blocks";
    return plan;
  }
  plan.blocks = static_cast<int>(blocks);
  plan.fits = true;
  return plan;
}

bool bn_persistent_fwd(const Launch& l, const PersistentPlan& plan, const BnPersistentFwdArgs& a) {
  const auto kernel = kernel_for<false>(l);
  if (!plan.fits || kernel == nullptr) {
    throw std::runtime_error("bnkernels cuda: no persistent plan");
  }
  const double M = static_cast<double>(l.g.M());
  PersistentFwd<float> p{a.x,
                         a.y,
                         static_cast<float*>(a.ws),
                         static_cast<float*>(a.mean),
                         static_cast<float*>(a.invstd),
                         static_cast<float*>(a.running_mean),
                         static_cast<float*>(a.running_var),
                         static_cast<float>(M),
                         static_cast<float>(M > 1 ? M / (M - 1) : 1.0),
                         static_cast<float>(a.momentum),
                         static_cast<float>(1.0 - a.momentum),
                         static_cast<float>(a.eps),
                         static_cast<const float*>(a.weight),
                         static_cast<const float*>(a.bias),
                         a.relu,
                         l.g,
                         plan.per_channel,
                         plan.tx,
                         plan.chunk};
  return launch_cooperative(kernel, plan, p, l.stream, "bn_persistent_fwd");
}

bool bn_persistent_bwd(const Launch& l, const PersistentPlan& plan, const BnPersistentBwdArgs& a) {
  const auto kernel = kernel_for<true>(l);
  if (!plan.fits || kernel == nullptr) {
    throw std::runtime_error("bnkernels cuda: no persistent plan");
  }
  PersistentBwd<float> p{a.dy,
                         a.x,
                         a.dx,
                         static_cast<float*>(a.ws),
                         static_cast<const float*>(a.mean),
                         static_cast<const float*>(a.invstd),
                         static_cast<const float*>(a.weight),
                         static_cast<const float*>(a.bias),
                         static_cast<float*>(a.dweight),
                         static_cast<float*>(a.dbias),
                         static_cast<float>(1.0 / static_cast<double>(l.g.M())),
                         a.relu,
                         l.g,
                         plan.per_channel,
                         plan.tx,
                         plan.chunk};
  return launch_cooperative(kernel, plan, p, l.stream, "bn_persistent_bwd");
}

}  // namespace bnk
