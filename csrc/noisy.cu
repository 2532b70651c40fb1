// Noisy BatchNorm (Algorithm 1 of Santurkar et al., 2018): out = act(s a + m), with the noise
// (s, m) generated inside the kernels by Philox4x32-10 from (seed, step, logical index) and
// regenerated in the backward, never stored (see common.cuh for the exact scheme, which is the
// reference's). This file compiles the NOISY = true instantiations of BatchNorm's apply,
// gradient-sum and dx kernels (batch_norm.cuh), and the kernel that writes the noise itself.
#include "batch_norm.cuh"

namespace bnk {

template void bn_apply_launch<true>(const Launch&, const BnApplyArgs&);
template void bn_grad_sums_launch<true>(const Launch&, const BnGradArgs&);
template void bn_dx_launch<true>(const Launch&, const BnDxArgs&);

// s, m: fp32 [N, C, S] contiguous (logical order), one element per thread, grid-stride.
__global__ void __launch_bounds__(kThreads)
    noisy_bn_noise_kernel(Noise noise, Geometry g, float* __restrict__ s,
                          float* __restrict__ m) {
  resolve_step(noise);
  const int64_t total = g.numel();
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += stride) {
    const int64_t c = (i / g.S) % g.C;
    float mu, sigma;
    channel_noise(noise, c, mu, sigma);
    element_noise(noise, i, mu, sigma, s[i], m[i]);
  }
}

void noisy_bn_noise(const Launch& l, const Noise& noise, float* s, float* m) {
  int64_t blocks = ceil_div(l.g.numel(), kThreads);
  const int64_t cap = static_cast<int64_t>(l.num_sms) * 32;
  if (blocks > cap) blocks = cap;
  if (blocks < 1) blocks = 1;
  const auto kernel = &noisy_bn_noise_kernel;
  BNK_LAUNCH(kernel, static_cast<unsigned>(blocks), kThreads, l.stream, noise, l.g, s, m);
  check_launch("noisy_bn_noise");
}

}  // namespace bnk
