/* Philox4x32-10 top bits for the reference backend's CPU noise (see formulas.py,
 * _philox_top_bits_cpu). Compiled at first use per process with the system C compiler and
 * loaded with ctypes; without a compiler the numpy path gives the same bits.
 *
 * For counters (i mod 2^32, i >> 32, step, 0), i = start .. start + n - 1, and key
 * (seed mod 2^32, seed >> 32), writes r >> 8 of the first three output words as float32
 * (exact: 24 bits) to out[j], out[ld + j], out[2 ld + j]. The rounds are philox.h's. */
#include <stdint.h>

#include "philox.h"

void bnk_philox_top_bits(uint64_t seed, uint32_t step, uint64_t start, int64_t n,
                         float *restrict out, int64_t ld) {
  for (int64_t j = 0; j < n; ++j) {
    uint64_t i = start + (uint64_t)j;
    uint32_t c[4] = {(uint32_t)i, (uint32_t)(i >> 32), step, 0};
    bnk_philox10(c, seed);
    out[j] = (float)(c[0] >> 8);
    out[ld + j] = (float)(c[1] >> 8);
    out[2 * ld + j] = (float)(c[2] >> 8);
  }
}
