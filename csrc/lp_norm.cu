// l_p normalization (p in {1, 2, inf}; p = 0 encodes inf): training statistics and backward.
// Per channel, over its M = N * S values:
//
//   mean = sum(x) / M
//   z    = x - mean (centered)  or  x (uncentered: the scale is taken before shifting the mean)
//   s    = sum|z| / M,  sqrt(sum z^2 / M),  max|z|                 (p = 1, 2, inf; NaN kept)
//   y    = w (x - mean) / (s + eps) + b          (BatchNorm's apply with k = w / (s + eps))
//   running_mean  <- momentum mean + (1 - momentum) running_mean
//   running_scale <- momentum s    + (1 - momentum) running_scale          (no unbiasing)
//
// Backward (training), a = s + eps, d = x - mean, g = dy, ds/dz_i = f_i / D:
//
//   p = 1: f = sign(z), D = M;   p = 2: f = z, D = M s (no term where s = 0);
//   p = inf: f = sign(z) [|z| = s], D = #{|z| = s}  (ties share the max's gradient equally)
//   dbias = sum(g),  dweight = sum(g d) / a
//   dx    = (g - k1) k2 - k3 (f - k4),   k1 = sum(g) / M,  k2 = w / a,
//           k3 = w dweight / (a D),  k4 = sum(f) / M if centered else 0
//
// Pipelines (every split reduction finalized by the last block of each channel group, in the
// same launch): forward = one split reduction of sum(x) and stat(x) (uncentered), or two
// (sum(x) -> mean, then stat(x - mean): never E[x^2] - E[x]^2), writing BatchNorm's
// coefficients -> BatchNorm's bn_apply: 2 launches uncentered, 3 centered. Backward = split
// sums (the last block writes the coefficients, dweight, dbias) -> elementwise dx: 2 launches.
// Eval needs no kernel of its own: the binding runs BatchNorm's with scale_from = kFromLpScale
// (invstd = 1 / (running_scale + eps), computed in the kernel).
#include "batch_norm.cuh"

namespace bnk {

template <typename A> __device__ __forceinline__ A lp_direction(A z, A s, int p) {
  const A sign = z > A(0) ? A(1) : (z < A(0) ? A(-1) : A(0));
  if (p == 1) return sign;
  if (p == 2) return z;
  return acc_abs(z) == s ? sign : A(0);
}

// v = (sum x, stat z): stat is sum|z|, sum z^2 or max|z| by p.
template <typename A_> struct LpStatsOp {
  using A = A_;
  static constexpr int K = 2;
  static constexpr bool kDy = false, kIndex = false;
  using State = bnk::State<A, K>;
  struct Chan { A mu; };
  const A* mean;  // read when center
  int p;
  bool sum_x, stat, center;

  __device__ void init() {}
  __device__ Chan chan(int64_t c) const { return {center ? mean[c] : A(0)}; }
  __device__ State identity() const { return {{A(0), A(0)}}; }
  __device__ State merge(const State& a, const State& b) const {
    return {{a.v[0] + b.v[0], p == 0 ? max_nan(a.v[1], b.v[1]) : a.v[1] + b.v[1]}};
  }
  template <int B>
  __device__ void update(State& st, const Chan& ch, const A (&x)[B], const A (&)[B], int64_t,
                         int64_t) const {
#pragma unroll
    for (int j = 0; j < B; ++j) {
      if (sum_x) st.v[0] += x[j];
      if (stat) {
        const A z = x[j] - ch.mu;
        if (p == 1) {
          st.v[1] += acc_abs(z);
        } else if (p == 2) {
          st.v[1] += z * z;
        } else {
          st.v[1] = max_nan(st.v[1], acc_abs(z));
        }
      }
    }
  }
};

template <typename A_> struct LpStatsFin {
  using A = A_;
  using Op = LpStatsOp<A>;
  using State = typename Op::State;
  Op op;
  A* mean;
  A* scale;
  A* running_mean;
  A* running_scale;
  A m, momentum, keep, eps;
  bool write_mean, write_scale;
  const A* weight;
  const A* bias;
  A* coef;
  int64_t C;

  __device__ void init() { op.init(); }
  __device__ void finish(int64_t c, const State& st) {
    A mu;
    if (write_mean) {
      mu = st.v[0] / m;
      mean[c] = mu;
      if (running_mean != nullptr) running_mean[c] = momentum * mu + keep * running_mean[c];
    } else {
      mu = mean[c];
    }
    if (write_scale) {
      const A stat = st.v[1];
      const A s = op.p == 1 ? stat / m : (op.p == 2 ? acc_sqrt(stat / m) : stat);
      scale[c] = s;
      if (running_scale != nullptr) running_scale[c] = momentum * s + keep * running_scale[c];
      write_coef(coef, C, c, make_chan(c, mu, A(1) / (s + eps), weight, bias, Noise{}));
    }
  }
};

// v = (sum g, sum g d, sum f, #{|z| = s}).
template <typename A_> struct LpGradOp {
  using A = A_;
  static constexpr int K = 4;
  static constexpr bool kDy = true, kIndex = false;
  using State = bnk::State<A, K>;
  struct Chan { A mean, s; };
  const A* mean;
  const A* scale;
  int p;
  bool centered;

  __device__ void init() {}
  __device__ Chan chan(int64_t c) const { return {mean[c], scale[c]}; }
  __device__ State identity() const { return {{A(0), A(0), A(0), A(0)}}; }
  __device__ State merge(const State& a, const State& b) const {
    return {{a.v[0] + b.v[0], a.v[1] + b.v[1], a.v[2] + b.v[2], a.v[3] + b.v[3]}};
  }
  template <int B>
  __device__ void update(State& st, const Chan& ch, const A (&x)[B], const A (&dy)[B], int64_t,
                         int64_t) const {
#pragma unroll
    for (int j = 0; j < B; ++j) {
      const A d = x[j] - ch.mean;
      st.v[0] += dy[j];
      st.v[1] += dy[j] * d;
      const A z = centered ? d : x[j];
      if (centered) st.v[2] += lp_direction(d, ch.s, p);
      if (p == 0 && acc_abs(z) == ch.s) st.v[3] += A(1);
    }
  }
};

template <typename A_> struct LpGradFin {
  using A = A_;
  using Op = LpGradOp<A>;
  using State = typename Op::State;
  Op op;
  A m, eps;
  const A* weight;
  A* coef;  // [kLpCoefs, C] (nullable)
  A* dweight;
  A* dbias;
  int64_t C;

  __device__ void init() { op.init(); }
  __device__ void finish(int64_t c, const State& st) {
    const A sum_g = st.v[0], sum_gd = st.v[1], sum_f = st.v[2], count = st.v[3];
    const A s = op.scale[c], a = s + eps;
    const A sum_gxhat = sum_gd / a;
    if (coef != nullptr) {
      const A w = weight != nullptr ? weight[c] : A(1);
      const A den = op.p == 1 ? m : (op.p == 2 ? m * s : count);
      coef[kLpMean * C + c] = op.mean[c];
      coef[kLpScale * C + c] = s;
      coef[kLpK1 * C + c] = sum_g / m;
      coef[kLpK2 * C + c] = w / a;
      coef[kLpK3 * C + c] = den > A(0) ? w * sum_gxhat / (a * den) : A(0);
      coef[kLpK4 * C + c] = op.centered ? sum_f / m : A(0);
    }
    if (dweight != nullptr) dweight[c] = sum_gxhat;
    if (dbias != nullptr) dbias[c] = sum_g;
  }
};

template <typename A_> struct LpDxOp {
  using A = A_;
  static constexpr bool kDy = true, kIndex = false;
  struct Chan { A mean, s, k1, k2, k3, k4; };
  const A* coef;
  int64_t C;
  int p;
  bool centered;

  __device__ void init() {}
  __device__ void block0() const {}
  __device__ Chan chan(int64_t c) const {
    return {coef[kLpMean * C + c], coef[kLpScale * C + c], coef[kLpK1 * C + c],
            coef[kLpK2 * C + c],   coef[kLpK3 * C + c],    coef[kLpK4 * C + c]};
  }
  __device__ A elem(const Chan& ch, A x, A dy, int64_t) const {
    const A d = x - ch.mean;
    const A f = lp_direction(centered ? d : x, ch.s, p);
    return (dy - ch.k1) * ch.k2 - ch.k3 * (f - ch.k4);
  }
};

void lp_stats(const Launch& l, const LpStatsArgs& a) {
  const double M = static_cast<double>(l.g.M());
  BNK_DISPATCH(l.dtype, T, VEC, {
    using A = acc_t<T>;
    auto fin = [&](const LpStatsOp<A>& op, bool write_mean, bool write_scale) {
      return LpStatsFin<A>{op,
                           static_cast<A*>(a.mean),
                           static_cast<A*>(a.scale),
                           static_cast<A*>(a.running_mean),
                           static_cast<A*>(a.running_scale),
                           static_cast<A>(M),
                           static_cast<A>(a.momentum),
                           static_cast<A>(1.0 - a.momentum),
                           static_cast<A>(a.eps),
                           write_mean,
                           write_scale,
                           static_cast<const A*>(a.weight),
                           static_cast<const A*>(a.bias),
                           static_cast<A*>(a.coef),
                           l.g.C};
    };
    const A* mean = static_cast<const A*>(a.mean);
    if (!a.centered) {  // one pass: sum(x) and stat(x)
      const LpStatsOp<A> op{mean, a.p, true, true, false};
      launch_reduce<T, VEC>(l, fin(op, true, true), a.x, nullptr, a.part, a.tickets,
                            "lp_stats");
    } else {  // two passes: the mean, then stat(x - mean)
      const LpStatsOp<A> op1{mean, a.p, true, false, false};
      launch_reduce<T, VEC>(l, fin(op1, true, false), a.x, nullptr, a.part, a.tickets,
                            "lp_stats_mean");
      const LpStatsOp<A> op2{mean, a.p, false, true, true};
      launch_reduce<T, VEC>(l, fin(op2, false, true), a.x, nullptr, a.part, a.tickets,
                            "lp_stats");
    }
  });
}

void lp_bwd(const Launch& l, const LpBwdArgs& a) {
  const double M = static_cast<double>(l.g.M());
  BNK_DISPATCH(l.dtype, T, VEC, {
    using A = acc_t<T>;
    const LpGradOp<A> op{static_cast<const A*>(a.mean), static_cast<const A*>(a.scale), a.p,
                         a.centered};
    A* coef = a.dx != nullptr ? static_cast<A*>(a.coef) : nullptr;
    const LpGradFin<A> fin{op,
                           static_cast<A>(M),
                           static_cast<A>(a.eps),
                           static_cast<const A*>(a.weight),
                           coef,
                           static_cast<A*>(a.dweight),
                           static_cast<A*>(a.dbias),
                           l.g.C};
    launch_reduce<T, VEC>(l, fin, a.x, a.dy, a.part, a.tickets, "lp_bwd_sums");
    if (a.dx != nullptr) {
      const LpDxOp<A> dx_op{coef, l.g.C, a.p, a.centered};
      launch_elementwise<T, VEC>(l, dx_op, a.x, a.dy, a.dx, "lp_bwd_dx");
    }
  });
}

}  // namespace bnk
