// BatchNorm as Ops of the generic kernels in common.cuh, and the per-channel math they share.
//
// Per channel, over its M = N * S values (biased variance for normalization, unbiased for the
// running estimate):
//
//   mean = sum(x) / M,  var = sum((x - mean)^2) / M,  invstd = 1 / sqrt(var + eps)
//   a    = k (x - mean) + b,   k = w invstd               (w = 1, b = 0 without affine)
//   out  = act(s a + m)                                    (s = 1, m = 0 without noise)
//   running_mean <- momentum mean + (1 - momentum) running_mean
//   running_var  <- momentum var M / (M - 1) + (1 - momentum) running_var
//
// Backward, g = dL/da = s dy [out > 0] (fused ReLU; out recomputed with the very same code):
//
//   dbias = sum(g),  dweight = sum(g (x - mean)) invstd
//   dx    = k (g - mean(g) - (x - mean) mean(g (x - mean)) invstd^2)     (training)
//   dx    = k g                                                          (eval)
//
// Statistics are Welford per thread (Chan-merging each loaded vector's exact two-pass summary),
// Chan-merged across threads, warps and programs in a fixed order: never E[x^2] - E[x]^2. They
// are taken around a per-channel shift K, the channel's first element x[0, c, 0, ...] (every
// block loads it): the summaries are of x - K, so a channel of mean 1e4 and std 1e-2 loses
// nothing to its mean. Then mean = K + mean(x - K), rounded to A as mean_hi (the saved mean)
// with its rounding error mean_lo kept apart (TwoSum), and the training forward normalizes
// (x - mean_hi) - mean_lo: x - mean_hi is exact for x near the mean, so the output is as good
// as that of an exact mean. With a fused ReLU the forward leaves mean_lo out (lo = 0): the
// backward recomputes the output from the saved mean alone, and must get the forward's bits.
// Special values follow torch: the accumulators also keep a plain sum of x (one add per
// element), and a channel whose sum and Welford summary are not finite (it holds a NaN or an
// infinity) gets the sum as its mean (+inf, -inf, or NaN for a NaN or both infinities) and a
// NaN variance, so its output and gradients are NaN as torch's (bn_moments).
// Divisions and square roots are IEEE (the build has no fast math); the multiply-adds of the
// output and the noise are explicit (acc_fma, __fmul_rn / __fadd_rn), never left to the
// compiler's contraction, so forward and backward compute them identically.
// This header is included by batch_norm.cu (plain), noisy.cu (NOISY = true) and persistent.cu.
#pragma once

#include "common.cuh"

namespace bnk {

// ------------------------------------------------------------------------------ channel math

template <typename A> struct BnChan {
  A mean, k, b;       // a = k ((x - mean) - lo) + b
  float mu, sigma;    // per-channel noise (mu = 0, sigma = 1 without noise)
  A kg, kgx;          // dx coefficients (training backward)
  A lo;               // the mean's rounding error (training forward without ReLU), else 0
};

// The forward coefficients of channel c from its statistics. One function for every kernel
// (statistics finalize, apply, backward, persistent): the backward's recomputed output is then
// bit-identical to the forward's.
template <typename A>
__device__ __forceinline__ BnChan<A> make_chan(int64_t c, A mean, A invstd, const A* w,
                                               const A* b, const Noise& noise) {
  BnChan<A> ch;
  ch.mean = mean;
  ch.k = w != nullptr ? invstd * w[c] : invstd;
  ch.b = b != nullptr ? b[c] : A(0);
  ch.mu = 0.f;
  ch.sigma = 1.f;
  if (noise.on) channel_noise(noise, c, ch.mu, ch.sigma);
  ch.kg = A(0);
  ch.kgx = A(0);
  ch.lo = A(0);
  return ch;
}

template <typename A>
__device__ __forceinline__ void write_coef(A* coef, int64_t C, int64_t c, const BnChan<A>& ch) {
  coef[kMean * C + c] = ch.mean;
  coef[kScale * C + c] = ch.k;
  coef[kBias * C + c] = ch.b;
  coef[kMu * C + c] = static_cast<A>(ch.mu);
  coef[kSigma * C + c] = static_cast<A>(ch.sigma);
  coef[kG * C + c] = ch.kg;
  coef[kGx * C + c] = ch.kgx;
  coef[kLo * C + c] = ch.lo;
}

// Coefficients written by a finalize of the same stream's previous launch.
template <typename A>
__device__ __forceinline__ BnChan<A> read_coef(const A* coef, int64_t C, int64_t c) {
  BnChan<A> ch;
  ch.mean = coef[kMean * C + c];
  ch.k = coef[kScale * C + c];
  ch.b = coef[kBias * C + c];
  ch.mu = static_cast<float>(coef[kMu * C + c]);
  ch.sigma = static_cast<float>(coef[kSigma * C + c]);
  ch.kg = coef[kG * C + c];
  ch.kgx = coef[kGx * C + c];
  ch.lo = coef[kLo * C + c];
  return ch;
}

// Given statistics (BnGiven) in the accumulation type: the mean, and invstd from the "second"
// array as scale_from says, correctly rounded.
template <typename A> struct BnStatsIn {
  const A* mean;
  const A* second;
  int scale_from;
  A eps;
  const A* weight;
  const A* bias;

  static BnStatsIn from(const BnGiven& g) {
    return {static_cast<const A*>(g.mean), static_cast<const A*>(g.second), g.scale_from,
            static_cast<A>(g.eps), static_cast<const A*>(g.weight),
            static_cast<const A*>(g.bias)};
  }
  __device__ A invstd(int64_t c) const {
    const A s = second[c];
    if (scale_from == kFromVar) return A(1) / acc_sqrt(s + eps);
    if (scale_from == kFromLpScale) return A(1) / (s + eps);
    return s;
  }
  __device__ BnChan<A> chan(int64_t c, const Noise& noise) const {
    return make_chan(c, mean[c], invstd(c), weight, bias, noise);
  }
};

// out = act(s a + m), a = k ((x - mean) - lo) + b; also returns the noise scale s (1 without
// noise).
template <typename A, bool NOISY>
__device__ __forceinline__ A bn_out(const BnChan<A>& ch, A x, int64_t idx, const Noise& noise,
                                    bool relu, A& s_out) {
  A out = acc_fma((x - ch.mean) - ch.lo, ch.k, ch.b);
  s_out = A(1);
  if constexpr (NOISY) {
    float s, m;
    element_noise(noise, idx, ch.mu, ch.sigma, s, m);
    s_out = static_cast<A>(s);
    out = acc_fma(s_out, out, static_cast<A>(m));
  }
  if (relu && out < A(0)) out = A(0);  // NaN passes, as torch.relu
  return out;
}

// out = act(s a + m + z): bn_out with a residual z added, in the accumulation type, before the
// activation (rounded once to the output's type by the caller).
template <typename A, bool NOISY>
__device__ __forceinline__ A bn_out_res(const BnChan<A>& ch, A x, A z, int64_t idx,
                                        const Noise& noise, bool relu) {
  A s;
  A out = bn_out<A, NOISY>(ch, x, idx, noise, false, s) + z;
  if (relu && out < A(0)) out = A(0);  // NaN passes, as torch.relu
  return out;
}

// g = dL/da from dy: zero where the fused ReLU's output is <= 0 (as threshold_backward, so NaN
// passes), times the noise scale s.
template <typename A, bool NOISY>
__device__ __forceinline__ A bn_upstream(const BnChan<A>& ch, A x, A dy, int64_t idx,
                                         const Noise& noise, bool relu) {
  if (!NOISY && !relu) return dy;
  A s;
  const A out = bn_out<A, NOISY>(ch, x, idx, noise, false, s);
  A g = (relu && out <= A(0)) ? A(0) : dy;
  if constexpr (NOISY) g = acc_mul_rn(g, s);
  return g;
}

// ------------------------------------------------------------------------------ statistics

// Welford accumulator of x - K, K = the channel's first element, and the plain sum of x:
// v = (count, mean, M2, sum).
template <typename T, typename A_> struct WelfordOp {
  using A = A_;
  static constexpr int K = 4;
  static constexpr bool kDy = false, kIndex = false;
  using State = bnk::State<A, K>;
  struct Chan { A shift; };
  const T* x;       // the input: channel c's first element at x[c * cstride]
  int64_t cstride;  // S ("ncs") or 1 ("mc")

  __device__ void init() {}
  __device__ A shift(int64_t c) const { return to_acc<A>(x[c * cstride]); }
  __device__ Chan chan(int64_t c) const { return {shift(c)}; }
  __device__ State identity() const { return {{A(0), A(0), A(0), A(0)}}; }
  __device__ State merge(const State& a, const State& b) const { return chan_merge(a, b); }

  // Chan-merge the B values' own summary (an exact two-pass over B registers) into st:
  // one division per vector instead of one per element.
  template <int B>
  __device__ void update(State& st, const Chan& ch, const A (&x_)[B], const A (&)[B], int64_t,
                         int64_t) const {
    A d[B];
    A sum = A(0);
#pragma unroll
    for (int j = 0; j < B; ++j) {
      d[j] = x_[j] - ch.shift;
      sum += d[j];
      st.v[3] += x_[j];
    }
    const A mean_b = sum * (A(1) / A(B));  // B is a power of two: exact
    A m2_b = A(0);
#pragma unroll
    for (int j = 0; j < B; ++j) {
      const A e = d[j] - mean_b;
      m2_b += e * e;
    }
    const A n = st.v[0] + A(B);
    const A delta = mean_b - st.v[1];
    st.v[1] += delta * (A(B) / n);
    st.v[2] += m2_b + delta * (mean_b - st.v[1]) * A(B);
    st.v[0] = n;
  }
};

// Statistics of a channel from its merged (count, mean of x - K, M2, sum of x) and its shift
// K; M exact, not the count. mean = hi + lo exactly (hi = fl(K + mean(x - K))). A channel
// holding a NaN or +-inf (sum and Welford summary not finite) has torch's statistics: mean =
// sum(x) / M, i.e. the sum itself (+inf, -inf or NaN), and a NaN variance.
template <typename A> struct BnMoments { A mean, lo, var, invstd; };
template <typename A>
__device__ __forceinline__ BnMoments<A> bn_moments(const State<A, 4>& st, A shift, A m, A eps) {
  BnMoments<A> r;
  const A total = st.v[3];
  if (not_finite(total) && (not_finite(st.v[1]) || not_finite(st.v[2]))) {
    r.mean = total;
    r.lo = A(0);
    r.var = total - total;  // NaN
  } else {
    r.mean = shift + st.v[1];
    r.lo = two_sum_err(shift, st.v[1], r.mean);
    r.var = st.v[2] / m;
  }
  r.invstd = A(1) / acc_sqrt(r.var + eps);
  return r;
}

// running <- momentum batch + keep running (keep = 1 - momentum), the variance unbiased.
template <typename A>
__device__ __forceinline__ void bn_update_running(A* running_mean, A* running_var, int64_t c,
                                                  const BnMoments<A>& r, A momentum, A keep,
                                                  A unbias) {
  if (running_mean == nullptr) return;
  running_mean[c] = momentum * r.mean + keep * running_mean[c];
  running_var[c] = momentum * (r.var * unbias) + keep * running_var[c];
}

// Statistics finalize: mean, invstd (or var), running buffers, forward coefficients.
template <typename T, typename A_> struct BnStatsFin {
  using A = A_;
  using Op = WelfordOp<T, A>;
  using State = typename Op::State;
  Op op;
  A* mean;
  A* second;
  bool out_var;
  A* running_mean;
  A* running_var;
  A m, unbias, momentum, keep, eps;  // M, M / (M - 1), momentum, 1 - momentum, eps
  const A* weight;
  const A* bias;
  A* coef;
  bool keep_lo;
  int64_t C;
  Noise noise;

  __device__ void init() {
    op.init();
    resolve_step(noise);
  }
  __device__ void finish(int64_t c, const State& st) {
    const BnMoments<A> r = bn_moments(st, op.shift(c), m, eps);
    mean[c] = r.mean;
    second[c] = out_var ? r.var : r.invstd;
    bn_update_running(running_mean, running_var, c, r, momentum, keep, unbias);
    if (coef != nullptr) {
      BnChan<A> ch = make_chan(c, r.mean, r.invstd, weight, bias, noise);
      if (keep_lo) ch.lo = r.lo;
      write_coef(coef, C, c, ch);
    }
  }
};

// ------------------------------------------------------------------------------ apply / dx

// The per-channel constants of the apply and dx kernels: the coefficients a finalize wrote
// (training), or made from given statistics (eval, SyncBatchNorm's stages).
template <typename A> struct BnChanSource {
  const A* coef;         // [kBnCoefs, C], or null: from `given`
  BnStatsIn<A> given;
  const A* mean_sums;    // with `given`: [mean(g), mean(g (x - mean))] (nullable)
  int64_t C;

  __device__ BnChan<A> chan(int64_t c, const Noise& noise) const {
    if (coef != nullptr) return read_coef(coef, C, c);
    BnChan<A> ch = make_chan(c, given.mean[c], given.invstd(c), given.weight, given.bias, noise);
    if (mean_sums != nullptr) {
      const A invstd = given.invstd(c);
      ch.kg = mean_sums[c];
      ch.kgx = mean_sums[C + c] * invstd * invstd;
    }
    return ch;
  }
};

// RES: a residual is added before the activation; the elementwise kernels read it in the
// place of dy.
template <typename A_, bool NOISY, bool RES = false> struct BnApplyOp {
  using A = A_;
  static constexpr bool kDy = RES, kIndex = NOISY;
  using Chan = BnChan<A>;
  BnChanSource<A> src;
  A* save_mean;    // with src.given: snapshots of the statistics used (nullable)
  A* save_invstd;
  bool relu;
  Noise noise;
  const int64_t* step_src;  // the noise step's tensor (before init() resolves it)
  int64_t* step_used;       // its snapshot (nullable)

  __device__ void init() { resolve_step(noise); }
  __device__ void block0() const {
    if (step_used != nullptr && threadIdx.x == 0) *step_used = *step_src;
    if (save_mean == nullptr) return;
    for (int64_t c = threadIdx.x; c < src.C; c += blockDim.x) {
      save_mean[c] = src.given.mean[c];
      save_invstd[c] = src.given.invstd(c);
    }
  }
  __device__ Chan chan(int64_t c) const { return src.chan(c, noise); }
  __device__ A elem(const Chan& ch, A x, A z, int64_t idx) const {
    if constexpr (RES) {
      return bn_out_res<A, NOISY>(ch, x, z, idx, noise, relu);
    } else {
      A s;
      return bn_out<A, NOISY>(ch, x, idx, noise, relu, s);
    }
  }
};

template <typename A_, bool NOISY> struct BnDxOp {
  using A = A_;
  static constexpr bool kDy = true, kIndex = NOISY;
  using Chan = BnChan<A>;
  BnChanSource<A> src;
  bool relu, training;
  Noise noise;

  __device__ void init() { resolve_step(noise); }
  __device__ void block0() const {}
  __device__ Chan chan(int64_t c) const { return src.chan(c, noise); }
  __device__ A elem(const Chan& ch, A x, A dy, int64_t idx) const {
    const A g = bn_upstream<A, NOISY>(ch, x, dy, idx, noise, relu);
    return training ? ch.k * (g - ch.kg - (x - ch.mean) * ch.kgx) : ch.k * g;
  }
};

// ------------------------------------------------------------------------------ gradient sums

// v = (sum g, sum g (x - mean)).
template <typename A_, bool NOISY> struct BnGradOp {
  using A = A_;
  static constexpr int K = 2;
  static constexpr bool kDy = true, kIndex = NOISY;
  using State = bnk::State<A, K>;
  using Chan = BnChan<A>;
  BnStatsIn<A> stats;
  bool relu;
  Noise noise;

  __device__ void init() { resolve_step(noise); }
  __device__ Chan chan(int64_t c) const { return stats.chan(c, noise); }
  __device__ State identity() const { return {{A(0), A(0)}}; }
  __device__ State merge(const State& a, const State& b) const {
    return {{a.v[0] + b.v[0], a.v[1] + b.v[1]}};
  }
  template <int B>
  __device__ void update(State& st, const Chan& ch, const A (&x)[B], const A (&dy)[B],
                         int64_t idx0, int64_t istride) const {
#pragma unroll
    for (int j = 0; j < B; ++j) {
      const A g = bn_upstream<A, NOISY>(ch, x[j], dy[j], idx0 + j * istride, noise, relu);
      st.v[0] += g;
      st.v[1] += g * (x[j] - ch.mean);
    }
  }
};

template <typename A_, bool NOISY> struct BnGradFin {
  using A = A_;
  using Op = BnGradOp<A, NOISY>;
  using State = typename Op::State;
  Op op;
  A inv_m;
  A* coef;
  A* dweight;
  A* dbias;
  A* sums;
  int64_t C;

  __device__ void init() { op.init(); }
  __device__ void finish(int64_t c, const State& st) {
    const A sum_g = st.v[0], sum_gx = st.v[1];
    const A invstd = op.stats.invstd(c);
    if (sums != nullptr) {
      sums[c] = sum_g;
      sums[C + c] = sum_gx;
    }
    if (dweight != nullptr) dweight[c] = sum_gx * invstd;
    if (dbias != nullptr) dbias[c] = sum_g;
    if (coef != nullptr) {
      BnChan<A> ch = op.chan(c);
      ch.kg = sum_g * inv_m;
      ch.kgx = sum_gx * inv_m * invstd * invstd;
      write_coef(coef, C, c, ch);
    }
  }
};

// ------------------------------------------------------------------------------ launchers
// Explicitly instantiated in batch_norm.cu (NOISY = false) and noisy.cu (NOISY = true), which
// declare the other half `extern template`: each file compiles its own half of the kernels.

template <typename A> BnChanSource<A> chan_source(const Launch& l, const void* coef,
                                                  const BnGiven& given, const void* mean_sums) {
  return {static_cast<const A*>(coef), BnStatsIn<A>::from(given),
          static_cast<const A*>(mean_sums), l.g.C};
}

template <typename A, bool NOISY, bool RES>
BnApplyOp<A, NOISY, RES> apply_op(const Launch& l, const BnApplyArgs& a) {
  return {chan_source<A>(l, a.coef, a.given, nullptr),
          static_cast<A*>(a.save_mean),
          static_cast<A*>(a.save_invstd),
          a.relu,
          a.noise,
          a.noise.step_ptr,
          a.step_used != nullptr && a.noise.step_ptr != nullptr ? a.step_used : nullptr};
}

template <bool NOISY> void bn_apply_launch(const Launch& l, const BnApplyArgs& a) {
  BNK_DISPATCH(l.dtype, T, VEC, {
    using A = acc_t<T>;
    if (a.res != nullptr) {
      launch_elementwise<T, VEC>(l, apply_op<A, NOISY, true>(l, a), a.x, a.res, a.y,
                                 "bn_apply");
    } else {
      launch_elementwise<T, VEC>(l, apply_op<A, NOISY, false>(l, a), a.x, nullptr, a.y,
                                 "bn_apply");
    }
  });
}

template <bool NOISY> void bn_grad_sums_launch(const Launch& l, const BnGradArgs& a) {
  BNK_DISPATCH(l.dtype, T, VEC, {
    using A = acc_t<T>;
    BnGradOp<A, NOISY> op{BnStatsIn<A>::from(a.given), a.relu, a.noise};
    BnGradFin<A, NOISY> fin{op, static_cast<A>(a.inv_m), static_cast<A*>(a.coef),
                            static_cast<A*>(a.dweight), static_cast<A*>(a.dbias),
                            static_cast<A*>(a.sums), l.g.C};
    launch_reduce<T, VEC>(l, fin, a.x, a.dy, a.part, a.tickets, "bn_grad_sums");
  });
}

template <bool NOISY> void bn_dx_launch(const Launch& l, const BnDxArgs& a) {
  BNK_DISPATCH(l.dtype, T, VEC, {
    using A = acc_t<T>;
    BnDxOp<A, NOISY> op{chan_source<A>(l, a.coef, a.given, a.mean_sums), a.relu, a.training,
                        a.noise};
    launch_elementwise<T, VEC>(l, op, a.x, a.dy, a.dx, "bn_dx");
  });
}

}  // namespace bnk
