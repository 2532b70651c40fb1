/* Philox4x32-10 top bits for the reference backend's CPU noise (see formulas.py,
 * _philox_top_bits_cpu). Compiled at first use per process with the system C compiler and
 * loaded with ctypes; without a compiler the numpy path gives the same bits.
 *
 * For counters (i mod 2^32, i >> 32, step, 0), i = start .. start + n - 1, and key
 * (seed mod 2^32, seed >> 32), writes r >> 8 of the first three output words as float32
 * (exact: 24 bits) to out[j], out[ld + j], out[2 ld + j]. Integer arithmetic only, so the
 * compiler's vectorization (or none) cannot change the bits. */
#include <stdint.h>

void bnk_philox_top_bits(uint64_t seed, uint32_t step, uint64_t start, int64_t n,
                         float *restrict out, int64_t ld) {
  const uint32_t KA = 0x9E3779B9u, KB = 0xBB67AE85u, RA = 0xD2511F53u, RB = 0xCD9E8D57u;
  for (int64_t j = 0; j < n; ++j) {
    uint64_t i = start + (uint64_t)j;
    uint32_t c0 = (uint32_t)i, c1 = (uint32_t)(i >> 32), c2 = step, c3 = 0;
    uint32_t k0 = (uint32_t)seed, k1 = (uint32_t)(seed >> 32);
    for (int r = 0; r < 10; ++r) {
      uint64_t pa = (uint64_t)c0 * RA, pb = (uint64_t)c2 * RB;
      uint32_t n0 = (uint32_t)(pb >> 32) ^ c1 ^ k0, n2 = (uint32_t)(pa >> 32) ^ c3 ^ k1;
      c1 = (uint32_t)pb;
      c3 = (uint32_t)pa;
      c0 = n0;
      c2 = n2;
      k0 += KA;
      k1 += KB;
    }
    out[j] = (float)(c0 >> 8);
    out[ld + j] = (float)(c1 >> 8);
    out[2 * ld + j] = (float)(c2 >> 8);
  }
}
