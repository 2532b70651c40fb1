// BatchNorm: training statistics, per-channel coefficients, and the noise-free instantiations of
// the apply / gradient-sum / dx kernels (noisy.cu compiles the noisy ones in parallel). The
// math is in batch_norm.cuh; the binding (bindings.cpp) chains the launchers:
//
//   training forward   bn_stats (split Welford + finalize: mean, invstd, running, coef)
//                      -> bn_apply
//   eval forward       bn_coef (invstd = 1/sqrt(running_var + eps)) -> bn_apply
//   backward           bn_grad_sums (split sums + finalize: dweight, dbias, dx coef) -> bn_dx
//
// Shapes: x, dy, y, dx are "ncs" (N, C, S) or "mc" (N*S, C) contiguous (see bnkernels.h); every
// per-channel array is [C] (or [k, C]) contiguous in the accumulation type A.
#include "batch_norm.cuh"

namespace bnk {

extern template void bn_apply_launch<true>(const Launch&, const BnApplyArgs&);
extern template void bn_grad_sums_launch<true>(const Launch&, const BnGradArgs&);
extern template void bn_dx_launch<true>(const Launch&, const BnDxArgs&);
template void bn_apply_launch<false>(const Launch&, const BnApplyArgs&);
template void bn_grad_sums_launch<false>(const Launch&, const BnGradArgs&);
template void bn_dx_launch<false>(const Launch&, const BnDxArgs&);

int reduce_split(const Launch& l) { return static_cast<int>(reduce_cfg(l).split); }

void bn_stats(const Launch& l, const BnStatsArgs& a) {
  const double M = static_cast<double>(l.g.M());
  BNK_DISPATCH(l.dtype, T, VEC, {
    using A = acc_t<T>;
    WelfordOp<A> op;
    launch_reduce<T, VEC>(l, op, a.x, nullptr, a.part, "bn_stats");
    BnStatsFin<A> fin{op,
                      static_cast<A*>(a.mean),
                      static_cast<A*>(a.second),
                      a.out_var,
                      static_cast<A*>(a.running_mean),
                      static_cast<A*>(a.running_var),
                      static_cast<A>(M),
                      static_cast<A>(M > 1 ? M / (M - 1) : 1.0),
                      static_cast<A>(a.momentum),
                      static_cast<A>(1.0 - a.momentum),
                      static_cast<A>(a.eps),
                      static_cast<const A*>(a.weight),
                      static_cast<const A*>(a.bias),
                      static_cast<A*>(a.coef),
                      l.g.C,
                      a.noise};
    launch_finalize(l, fin, a.part, "bn_stats_finalize");
  });
}

// One thread per channel: coefficients from given statistics (see BnCoefArgs).
template <typename A>
__global__ void __launch_bounds__(kThreads)
    bn_coef_kernel(const A* __restrict__ mean, const A* __restrict__ second, bool from_var,
                   A eps, const A* __restrict__ weight, const A* __restrict__ bias,
                   const A* __restrict__ mean_sums, A* __restrict__ coef, int64_t C,
                   Noise noise) {
  resolve_step(noise);
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= C) return;
  const A invstd = from_var ? A(1) / acc_sqrt(second[c] + eps) : second[c];
  BnChan<A> ch = make_chan(c, mean[c], invstd, weight, bias, noise);
  if (mean_sums != nullptr) {
    ch.kg = mean_sums[c];
    ch.kgx = mean_sums[C + c] * invstd * invstd;
  }
  write_coef(coef, C, c, ch);
}

template <typename A> void bn_coef_launch(const Launch& l, const BnCoefArgs& a) {
  const auto kernel = &bn_coef_kernel<A>;
  BNK_LAUNCH(kernel, static_cast<unsigned>(ceil_div(l.g.C, kThreads)), kThreads, l.stream,
             static_cast<const A*>(a.mean), static_cast<const A*>(a.second), a.from_var,
             static_cast<A>(a.eps), static_cast<const A*>(a.weight),
             static_cast<const A*>(a.bias), static_cast<const A*>(a.mean_sums),
             static_cast<A*>(a.coef), l.g.C, a.noise);
  check_launch("bn_coef");
}

void bn_coef(const Launch& l, const BnCoefArgs& a) {
  if (l.dtype == DType::kDouble) {
    bn_coef_launch<double>(l, a);
  } else {
    bn_coef_launch<float>(l, a);
  }
}

void bn_apply(const Launch& l, const BnApplyArgs& a) {
  if (a.noise.on) {
    bn_apply_launch<true>(l, a);
  } else {
    bn_apply_launch<false>(l, a);
  }
}

void bn_grad_sums(const Launch& l, const BnGradArgs& a) {
  if (a.noise.on) {
    bn_grad_sums_launch<true>(l, a);
  } else {
    bn_grad_sums_launch<false>(l, a);
  }
}

void bn_dx(const Launch& l, const BnDxArgs& a) {
  if (a.noise.on) {
    bn_dx_launch<true>(l, a);
  } else {
    bn_dx_launch<false>(l, a);
  }
}

}  // namespace bnk
