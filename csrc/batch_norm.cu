// BatchNorm: training statistics, the workspace sizes, and the noise-free instantiations of the
// apply / gradient-sum / dx kernels (noisy.cu compiles the noisy ones in parallel). The math is
// in batch_norm.cuh; the binding (bindings.cpp) chains the launchers, at most two per call:
//
//   training forward   bn_stats (split Welford; the last block of each channel finalizes:
//                      mean, invstd, running statistics, coefficients) -> bn_apply
//                      (or one persistent kernel, persistent.cu)
//   eval forward       bn_apply (invstd = 1/sqrt(running_var + eps) computed per channel)
//   training backward  bn_grad_sums (split sums; the last block writes dweight, dbias and the
//                      coefficients of dx) -> bn_dx     (or one persistent kernel)
//   eval backward      bn_dx alone; with dweight/dbias, bn_grad_sums first
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

namespace {

int element_size(DType d) {
  switch (d) {
    case DType::kDouble: return 8;
    case DType::kFloat: return 4;
    default: return 2;
  }
}

}  // namespace

WorkspaceSize workspace_needed(const Launch& l) {
  const ReduceCfg r = reduce_cfg(l);
  WorkspaceSize ws;
  ws.acc = static_cast<int64_t>(kBnCoefs) * l.g.C +
           static_cast<int64_t>(kMaxPartials) * l.g.C * r.split;
  ws.tickets = r.groups;
  return ws;
}

WorkspaceSize workspace_size(const Launch& l, int device) {
  WorkspaceSize ws;
  const int wide = 16 / element_size(l.dtype);
  const int64_t row = l.g.ncs ? l.g.S : l.g.C;
  for (const int vec : {1, wide}) {
    if (vec > 1 && row % vec != 0) continue;  // never vectorized
    Launch v = l;
    v.vec = vec;
    const WorkspaceSize need = workspace_needed(v);
    int64_t acc = need.acc;
    for (const bool backward : {false, true}) {
      const PersistentPlan p = bn_persistent_plan(v, backward, device);
      if (p.fits) {
        const int64_t need = static_cast<int64_t>(kBnCoefs) * l.g.C +
                             static_cast<int64_t>(kMaxPartials) * l.g.C * p.per_channel;
        acc = acc > need ? acc : need;
      }
    }
    ws.acc = ws.acc > acc ? ws.acc : acc;
    ws.tickets = ws.tickets > need.tickets ? ws.tickets : need.tickets;
  }
  return ws;
}

void bn_stats(const Launch& l, const BnStatsArgs& a) {
  const double M = static_cast<double>(l.g.M());
  BNK_DISPATCH(l.dtype, T, VEC, {
    using A = acc_t<T>;
    const WelfordOp<T, A> op{static_cast<const T*>(a.x), l.g.ncs ? l.g.S : 1};
    const BnStatsFin<T, A> fin{op,
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
                               a.keep_lo,
                               l.g.C,
                               a.noise};
    launch_reduce<T, VEC>(l, fin, a.x, nullptr, a.part, a.tickets, "bn_stats");
  });
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
