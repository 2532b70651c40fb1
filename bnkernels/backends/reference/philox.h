/* Philox4x32-10 (Salmon et al., 2011) in C: the one C definition of the noise's random bits,
 * included by the reference's compiled CPU Philox (philox.c) and the cpu backend's noise
 * (../cpu/kernels.c). The same function as formulas.philox4x32 and the Triton kernels'
 * (backends/triton/noise.py). Integer arithmetic only, so the compiler's vectorization (or
 * none) cannot change the bits. */
#ifndef BNK_PHILOX_H
#define BNK_PHILOX_H
#include <stdint.h>

#define BNK_PHILOX_KA 0x9E3779B9u /* the key's increments per round */
#define BNK_PHILOX_KB 0xBB67AE85u
#define BNK_PHILOX_RA 0xD2511F53u /* the round multipliers */
#define BNK_PHILOX_RB 0xCD9E8D57u

/* Ten rounds on the counter c (in place: the four output words) with the key
 * (seed mod 2^32, seed >> 32). Always inlined: c stays in registers and a loop over counters
 * vectorizes. */
static inline __attribute__((always_inline)) void bnk_philox10(uint32_t c[4], uint64_t seed) {
  uint32_t c0 = c[0], c1 = c[1], c2 = c[2], c3 = c[3];
  uint32_t k0 = (uint32_t)seed, k1 = (uint32_t)(seed >> 32);
  for (int r = 0; r < 10; ++r) {
    uint64_t pa = (uint64_t)c0 * BNK_PHILOX_RA, pb = (uint64_t)c2 * BNK_PHILOX_RB;
    uint32_t n0 = (uint32_t)(pb >> 32) ^ c1 ^ k0, n2 = (uint32_t)(pa >> 32) ^ c3 ^ k1;
    c1 = (uint32_t)pb;
    c3 = (uint32_t)pa;
    c0 = n0;
    c2 = n2;
    k0 += BNK_PHILOX_KA;
    k1 += BNK_PHILOX_KB;
  }
  c[0] = c0;
  c[1] = c1;
  c[2] = c2;
  c[3] = c3;
}

#endif
