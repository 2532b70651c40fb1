/* The cpu backend's kernels: BatchNorm (plain, fused ReLU, noisy) and l_p normalization,
 * forward and backward, for float and double (float16/bfloat16 inputs are converted to float
 * by the caller). Compiled at first use with the system C compiler and loaded with ctypes
 * (see __init__.py); no dependency but libm.
 *
 * An input is an (N, C, S) tensor in one of two layouts: "ncs" (mc = 0), element (n, c, s) at
 * (n C + c) S + s, and "mc" (mc = 1: channels last, or 2-D), at (n S + s) C + c. The noise of
 * noisy BatchNorm (s, m) is float, laid out as x (the caller lays it out so).
 *
 * Per-channel sums are accumulated in double, in a fixed order (8 lanes along a contiguous
 * run, the tail into lane 0): the same input gives bit-identical output run to run, and the
 * compiler vectorizes the lanes without reassociating anything. Statistics are two-pass
 * (the mean, then the squares of x - mean), never E[x^2] - E[x]^2; the apply subtracts the
 * mean as a float pair (hi, lo), so a channel of mean 1e4 and std 1e-2 keeps its digits. */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "../reference/philox.h"
#ifdef __AVX512F__
#include <immintrin.h>
#endif

#define LANES 8
typedef double vd __attribute__((vector_size(LANES * sizeof(double))));
typedef float vf __attribute__((vector_size(LANES * sizeof(float))));

#define T float
#define TI int32_t
#define SUF f32
#include "kernels_impl.h"
#undef T
#undef TI
#undef SUF

#define T double
#define TI int64_t
#define SUF f64
#include "kernels_impl.h"
#undef T
#undef TI
#undef SUF

/* ----------------------------------------------------------------------------- noisy BatchNorm
 * The noise of Algorithm 1 up to its transcendental functions, from the same Philox4x32-10
 * stream as every backend (its rounds are the reference's, ../reference/philox.h): per
 * channel j, counters (j, 0, step, 1) give mu_j = n_mu (2 u - 1) and
 * sigma_j = 1 + (n_sigma - 1) u'; element i (logical (n, c, s) order), counters
 * (i mod 2^32, i >> 32, step, 0) give u0, u1, u2. Written: m = (2 u0 - 1) r_mu + mu_j (final), u1 and 2 pi u2, in float with the
 * reference's operations in its order (this file is built with -ffp-contract=off), so that the
 * caller's log/sqrt/cos (torch's, as the reference's) finish s = sigma_j + r_sigma z,
 * z = sqrt(-2 log u1) cos(2 pi u2), bit-identical to the reference. */
static inline float uniform24(uint32_t r) { return ((float)(r >> 8) + 0.5f) * 0x1p-24f; }

void bnk_noise_prep(uint64_t seed, uint32_t step, int64_t N, int64_t C, int64_t S, double n_mu,
                    double n_sigma, double r_mu, float *restrict m, float *restrict u1,
                    float *restrict a2, float *restrict sigma) {
  float *mu = malloc(sizeof(float) * (C > 0 ? C : 1));
  const float fn_mu = (float)n_mu, fsig1 = (float)(n_sigma - 1.0), fr_mu = (float)r_mu;
  const float two_pi = (float)6.283185307179586;
  for (int64_t j = 0; j < C; ++j) {
    uint32_t c[4] = {(uint32_t)j, (uint32_t)((uint64_t)j >> 32), step, 1};
    bnk_philox10(c, seed);
    mu[j] = fn_mu * (2.0f * uniform24(c[0]) - 1.0f);
    sigma[j] = 1.0f + fsig1 * uniform24(c[1]);
  }
  for (int64_t n = 0; n < N; ++n)
    for (int64_t j = 0; j < C; ++j) {
      const uint64_t base = (uint64_t)(n * C + j) * (uint64_t)S;
      const float mj = mu[j];
      float *restrict mo = m + base, *restrict uo = u1 + base, *restrict ao = a2 + base;
      int64_t s = 0;
#ifdef __AVX512F__
      /* 16 counters at a time: 32-bit words in the low halves of 64-bit lanes (two vectors of
       * 8), _mm512_mul_epu32 giving the 64-bit products; the high halves may hold garbage
       * (nothing reads them but the shifts of the products). The same bits as below. */
      const __m512i RA = _mm512_set1_epi64(BNK_PHILOX_RA), RB = _mm512_set1_epi64(BNK_PHILOX_RB);
      const __m512i stepv = _mm512_set1_epi64(step), lanes = _mm512_set_epi64(7, 6, 5, 4, 3, 2, 1, 0);
      const __m512 half = _mm512_set1_ps(0.5f), scale = _mm512_set1_ps(0x1p-24f);
      const __m512 two = _mm512_set1_ps(2.0f), one = _mm512_set1_ps(1.0f);
      const __m512 rmu = _mm512_set1_ps(fr_mu), mjv = _mm512_set1_ps(mj), tp = _mm512_set1_ps(two_pi);
      for (; s + 16 <= S; s += 16) {
        __m512i c0[2], c1[2], c2[2], c3[2];
        for (int h = 0; h < 2; ++h) {
          __m512i i = _mm512_add_epi64(_mm512_set1_epi64((long long)(base + s + 8 * h)), lanes);
          c0[h] = i;
          c1[h] = _mm512_srli_epi64(i, 32);
          c2[h] = stepv;
          c3[h] = _mm512_setzero_si512();
        }
        uint32_t k0 = (uint32_t)seed, k1 = (uint32_t)(seed >> 32);
        for (int r = 0; r < 10; ++r) {
          const __m512i K0 = _mm512_set1_epi64(k0), K1 = _mm512_set1_epi64(k1);
          for (int h = 0; h < 2; ++h) {
            __m512i pa = _mm512_mul_epu32(c0[h], RA), pb = _mm512_mul_epu32(c2[h], RB);
            __m512i n0 = _mm512_xor_si512(_mm512_xor_si512(_mm512_srli_epi64(pb, 32), c1[h]), K0);
            __m512i n2 = _mm512_xor_si512(_mm512_xor_si512(_mm512_srli_epi64(pa, 32), c3[h]), K1);
            c1[h] = pb;
            c3[h] = pa;
            c0[h] = n0;
            c2[h] = n2;
          }
          k0 += BNK_PHILOX_KA;
          k1 += BNK_PHILOX_KB;
        }
        /* the low 32 bits of each lane, 16 lanes into one vector of 32-bit words */
        __m512i w0 = _mm512_inserti64x4(_mm512_castsi256_si512(_mm512_cvtepi64_epi32(c0[0])),
                                        _mm512_cvtepi64_epi32(c0[1]), 1);
        __m512i w1 = _mm512_inserti64x4(_mm512_castsi256_si512(_mm512_cvtepi64_epi32(c1[0])),
                                        _mm512_cvtepi64_epi32(c1[1]), 1);
        __m512i w2 = _mm512_inserti64x4(_mm512_castsi256_si512(_mm512_cvtepi64_epi32(c2[0])),
                                        _mm512_cvtepi64_epi32(c2[1]), 1);
        __m512 u0 = _mm512_mul_ps(_mm512_add_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(w0, 8)), half), scale);
        __m512 uu = _mm512_mul_ps(_mm512_add_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(w1, 8)), half), scale);
        __m512 u2 = _mm512_mul_ps(_mm512_add_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(w2, 8)), half), scale);
        __m512 mm = _mm512_add_ps(_mm512_mul_ps(_mm512_sub_ps(_mm512_mul_ps(u0, two), one), rmu), mjv);
        _mm512_storeu_ps(mo + s, mm);
        _mm512_storeu_ps(uo + s, uu);
        _mm512_storeu_ps(ao + s, _mm512_mul_ps(u2, tp));
      }
#endif
      for (; s < S; ++s) {
        uint64_t i = base + (uint64_t)s;
        uint32_t c[4] = {(uint32_t)i, (uint32_t)(i >> 32), step, 0};
        bnk_philox10(c, seed);
        mo[s] = (uniform24(c[0]) * 2.0f - 1.0f) * fr_mu + mj;
        uo[s] = uniform24(c[1]);
        ao[s] = uniform24(c[2]) * two_pi;
      }
    }
  free(mu);
}
