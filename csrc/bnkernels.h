// The interface between the binding (bindings.cpp, compiled by the host compiler with torch's
// headers) and the kernels (*.cu, compiled by nvcc without them): plain structs of pointers and
// sizes, and one launcher per kernel pipeline. Nothing here knows about at::Tensor, so the .cu
// files include only CUDA headers and compile quickly.
//
// Tensor layouts (see bnkernels/backends/cuda/launch.py, which views every input as one):
//   "ncs": x is (N, C, S) contiguous: NCHW, (N, C, L), NCDHW...; S = product of spatial dims.
//   "mc":  x is (M, C) contiguous with M = N * S rows: channels-last (NHWC, NDHWC) or (N, C).
// Either way a channel has M = N * S values. The *logical* index of an element is its offset in
// the NC(S)-contiguous order, whatever the memory layout: the noise of noisy BatchNorm is keyed
// by it, so it does not depend on the memory format.
//
// Per-channel tensors (weights, statistics, coefficients) are always given to kernels in the
// accumulation type A: float, or double for double input. The binding converts them.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#if defined(__CUDACC__)
#define BNK_HOST_DEVICE __host__ __device__
#else
#define BNK_HOST_DEVICE
#endif

namespace bnk {

enum class DType : int { kFloat = 0, kHalf = 1, kBFloat16 = 2, kDouble = 3 };

// Threads per block of every kernel (the reductions assume a multiple of 32, at most 1024).
constexpr int kThreads = 256;

struct Geometry {
  int64_t N = 0, C = 0, S = 0;
  bool ncs = true;    // layout: true "ncs" (N, C, S), false "mc" (N*S, C)
  bool wide = false;  // index arithmetic in 64 bits (numel >= 2^32; or forced, for tests)
  BNK_HOST_DEVICE int64_t M() const { return N * S; }
  BNK_HOST_DEVICE int64_t numel() const { return N * C * S; }
};

// Where kernels run, and the element type and vector width of x (and dy / y / dx).
struct Launch {
  DType dtype = DType::kFloat;
  Geometry g;
  int vec = 1;             // elements per 128-bit access (1: unaligned input, scalar accesses)
  int num_sms = 1;         // streaming multiprocessors of the device
  int split = 0;           // programs per channel of a split reduction (0: heuristic)
  cudaStream_t stream = nullptr;
};

// Noisy BatchNorm (Algorithm 1): counter-based Philox4x32-10 noise, see common.cuh.
struct Noise {
  bool on = false;
  uint64_t seed = 0;
  uint32_t step = 0;                    // the step, when step_ptr is null
  const int64_t* step_ptr = nullptr;    // a 1-element device tensor holding the step
  // per channel: mu ~ U(-n_mu, n_mu), sigma ~ 1 + U(0, n_sigma_m1) (n_sigma_m1 = n_sigma - 1)
  float n_mu = 0.f, n_sigma_m1 = 0.f;
  // per element: m ~ mu + U(-r_mu, r_mu), s ~ sigma + r_sigma N(0, 1)
  float r_mu = 0.f, r_sigma = 0.f;
};

// The workspace of a call, cached by the caller (one per CUDA stream; see
// bnkernels/backends/cuda/launch.py) and reused by every call of its signature:
//   acc:     [kBnCoefs, C] per-channel coefficients, then the partials of a split reduction
//            ([K, C, split], K <= kMaxPartials) or of the persistent kernels
//   tickets: one counter per channel (group) of a split reduction, zero between launches (the
//            last block of a group resets its counter), so zeroed once, when allocated.
// workspace_size gives the sizes for every vector width the launch could get (the width
// depends on the alignment of each call's pointers), so one workspace fits every call.
constexpr int kMaxPartials = 4;
struct WorkspaceSize {
  int64_t acc = 0;      // elements of the accumulation type
  int64_t tickets = 0;  // unsigned 32-bit counters
};
WorkspaceSize workspace_size(const Launch& l, int device);
// What this launch itself uses of it (its vector width; the multi-pass kernels).
WorkspaceSize workspace_needed(const Launch& l);

// BatchNorm per-channel coefficients, a [kBnCoefs, C] array in A:
//   out = act(s * (k * ((x - mean) - lo) + b) + m)   (s = 1, m = 0 without noise)
//   dx  = k * (g - kg - (x - mean) * kgx)            (training; eval: dx = k * g)
// lo is the rounding error of the fp32 mean (training forward without a fused ReLU), else 0.
enum BnCoef : int { kMean = 0, kScale = 1, kBias = 2, kMu = 3, kSigma = 4, kG = 5, kGx = 6,
                    kLo = 7, kBnCoefs = 8 };

// What the "second" per-channel statistic given to a kernel holds.
enum ScaleFrom : int {
  kFromInvstd = 0,   // invstd itself
  kFromVar = 1,      // a variance: invstd = 1 / sqrt(var + eps)
  kFromLpScale = 2,  // an l_p scale s: invstd = 1 / (s + eps)
};

// Per-channel statistics and affine parameters given as arrays ([C] A each).
struct BnGiven {
  const void* mean = nullptr;
  const void* second = nullptr;    // see scale_from
  int scale_from = kFromInvstd;
  double eps = 0.0;
  const void* weight = nullptr;    // nullable: 1
  const void* bias = nullptr;      // nullable: 0
};

// ------------------------------------------------------------------------------ BatchNorm

// Training statistics: mean and invstd = 1/sqrt(var + eps) (or the biased var itself), the
// running buffers updated in place, and (optionally) the coefficients of the forward. One
// launch: a split Welford reduction around a per-channel shift, finalized by the last block
// of each channel (group).
struct BnStatsArgs {
  const void* x = nullptr;
  void* part = nullptr;            // workspace [4, C, split] A
  unsigned* tickets = nullptr;     // workspace, zero (see WorkspaceSize)
  void* mean = nullptr;            // out [C] A: the fp32 (fp64) mean, "mean_hi"
  void* second = nullptr;          // out [C] A: invstd, or the biased variance if out_var
  bool out_var = false;
  void* running_mean = nullptr;    // [C] A, updated in place (nullable)
  void* running_var = nullptr;     // [C] A, updated in place (unbiased variance)
  double momentum = 0.0, eps = 0.0;
  const void* weight = nullptr;    // [C] A (nullable: 1)
  const void* bias = nullptr;      // [C] A (nullable: 0)
  void* coef = nullptr;            // out [kBnCoefs, C] A (nullable): the forward's
  bool keep_lo = true;             // coef's lo = the mean's rounding error (else 0)
  Noise noise;
};
void bn_stats(const Launch& l, const BnStatsArgs& a);

// y = act(s * (k ((x - mean) - lo) + b) + m), from the coefficients of bn_stats (training), or
// from given statistics (lo = 0), computing invstd on the fly; then optionally snapshots the
// mean and invstd used (for the backward of an eval forward). One launch.
struct BnApplyArgs {
  const void* x = nullptr;
  void* y = nullptr;
  const void* coef = nullptr;      // [kBnCoefs, C] A; null: from `given`
  BnGiven given;
  void* save_mean = nullptr;       // out [C] A (nullable; with `given`)
  void* save_invstd = nullptr;     // out [C] A (nullable; with `given`)
  bool relu = false;
  Noise noise;
  int64_t* step_used = nullptr;    // out [1] (nullable): *noise.step_ptr, for the backward
};
void bn_apply(const Launch& l, const BnApplyArgs& a);

// Backward sums: per channel sum(g) and sum(g (x - mean)), g = dL/da for a = k (x - mean) + b
// (dy masked by the fused ReLU and scaled by the noise s, both recomputed); finalized by the
// last block of each channel (group) into the coefficients of dx (and dweight =
// sum(g (x - mean)) invstd, dbias = sum(g)), or the raw sums. One launch.
struct BnGradArgs {
  const void* dy = nullptr;
  const void* x = nullptr;
  BnGiven given;                   // the saved (or running) statistics, weight, bias
  bool relu = false;
  void* part = nullptr;            // workspace [2, C, split] A
  unsigned* tickets = nullptr;     // workspace, zero
  double inv_m = 0.0;              // 1 / M: sums -> means for the coefficients
  void* coef = nullptr;            // out [kBnCoefs, C] A (nullable)
  void* dweight = nullptr;         // out [C] A (nullable)
  void* dbias = nullptr;           // out [C] A (nullable)
  void* sums = nullptr;            // out [2, C] A (nullable): sum(g), sum(g (x - mean))
  Noise noise;
};
void bn_grad_sums(const Launch& l, const BnGradArgs& a);

// dx = k (g - kg - (x - mean) kgx) (training) or k g (eval), from the coefficients of
// bn_grad_sums, or from given statistics (with mean_sums = [mean(g), mean(g (x - mean))]
// for training: kg = mean(g), kgx = mean(g (x - mean)) invstd^2). One launch.
struct BnDxArgs {
  const void* dy = nullptr;
  const void* x = nullptr;
  void* dx = nullptr;
  const void* coef = nullptr;      // [kBnCoefs, C] A; null: from `given`
  BnGiven given;
  const void* mean_sums = nullptr; // [2, C] A (nullable; with `given`, training)
  bool relu = false, training = true;
  Noise noise;
};
void bn_dx(const Launch& l, const BnDxArgs& a);

// The noise (s, m) itself, fp32, in logical (N, C, S)-contiguous order.
void noisy_bn_noise(const Launch& l, const Noise& noise, float* s, float* m);

// ------------------------------------------------------------------------------ persistent
// Single-read training forward/backward: one cooperative launch keeps this block's share of x
// (and dy) in registers across a grid-wide barrier between the statistics and the elementwise
// pass. Only when every block of the grid is resident at once (see persistent.cu).

struct PersistentPlan {
  bool fits = false;
  const char* why = "";  // when it does not fit
  int blocks = 0;        // grid size
  int per_channel = 0;   // blocks per channel ("ncs") or per channel group ("mc")
  int64_t chunk = 0;     // vectors ("ncs") or rows ("mc") per block
  int tx = 1;            // "mc": threads across the channels of a group
};
PersistentPlan bn_persistent_plan(const Launch& l, bool backward, int device);

struct BnPersistentFwdArgs {
  const void* x = nullptr;
  void* y = nullptr;
  void* ws = nullptr;              // workspace [4, C, per_channel] A
  void* mean = nullptr;            // out [C] A
  void* invstd = nullptr;          // out [C] A
  void* running_mean = nullptr;    // [C] A (nullable)
  void* running_var = nullptr;
  double momentum = 0.0, eps = 0.0;
  const void* weight = nullptr;
  const void* bias = nullptr;
  bool relu = false;
};
// false: the driver refused the cooperative launch (nothing ran): run the multi-pass kernels.
bool bn_persistent_fwd(const Launch& l, const PersistentPlan& p, const BnPersistentFwdArgs& a);

struct BnPersistentBwdArgs {
  const void* dy = nullptr;
  const void* x = nullptr;
  void* dx = nullptr;              // out (nullable: only dweight / dbias)
  void* ws = nullptr;              // workspace [2, C, per_channel] A
  const void* mean = nullptr;
  const void* invstd = nullptr;
  const void* weight = nullptr;
  const void* bias = nullptr;
  void* dweight = nullptr;         // out [C] A (nullable)
  void* dbias = nullptr;           // out [C] A (nullable)
  bool relu = false;
};
// false: as bn_persistent_fwd.
bool bn_persistent_bwd(const Launch& l, const PersistentPlan& p, const BnPersistentBwdArgs& a);

// ------------------------------------------------------------------------------ l_p norm
// p is 1, 2, or 0 for infinity. See lp_norm.cu for the formulas.

// Lp coefficients, a [kLpCoefs, C] array in A: dx = (g - k1) k2 - k3 (f - k4).
enum LpCoef : int { kLpMean = 0, kLpScale = 1, kLpK1 = 2, kLpK2 = 3, kLpK3 = 4, kLpK4 = 5,
                    kLpCoefs = 6 };

struct LpStatsArgs {
  const void* x = nullptr;
  int p = 2;
  bool centered = false;
  void* part = nullptr;            // workspace [2, C, split] A
  unsigned* tickets = nullptr;     // workspace, zero
  void* mean = nullptr;            // out [C] A
  void* scale = nullptr;           // out [C] A: s_p
  void* running_mean = nullptr;    // [C] A (nullable)
  void* running_scale = nullptr;
  double momentum = 0.0, eps = 0.0;
  const void* weight = nullptr;
  const void* bias = nullptr;
  void* coef = nullptr;            // out [kBnCoefs, C] A: BatchNorm's, for bn_apply
};
void lp_stats(const Launch& l, const LpStatsArgs& a);

struct LpBwdArgs {
  const void* dy = nullptr;
  const void* x = nullptr;
  void* dx = nullptr;              // out (nullable)
  int p = 2;
  bool centered = false;
  const void* mean = nullptr;      // [C] A
  const void* scale = nullptr;     // [C] A
  const void* weight = nullptr;    // [C] A (nullable)
  double eps = 0.0;
  void* part = nullptr;            // workspace [4, C, split] A
  unsigned* tickets = nullptr;     // workspace, zero
  void* coef = nullptr;            // workspace [kLpCoefs, C] A
  void* dweight = nullptr;         // out [C] A (nullable)
  void* dbias = nullptr;           // out [C] A (nullable)
};
void lp_bwd(const Launch& l, const LpBwdArgs& a);

}  // namespace bnk
