/* Instantiated by kernels.c for T = float (SUF f32) and T = double (SUF f64). */
#define CAT2(a, b) a##b
#define CAT(a, b) CAT2(a, b)
#define FN(name) CAT(name, SUF)

/* LANES values of T, and their lane masks (GCC/Clang vector extensions: one AVX-512
 * register of floats, or two AVX2 registers; plain scalar code where there are none). */
typedef T FN(vt_) __attribute__((vector_size(LANES * sizeof(T))));
typedef TI FN(vi_) __attribute__((vector_size(LANES * sizeof(T))));
#define VT FN(vt_)
#define VI FN(vi_)

static inline VT FN(load_)(const T *p) {
  VT v;
  memcpy(&v, p, sizeof v);
  return v;
}

static inline VT FN(loadf_)(const float *p) { /* float noise as T */
  vf v;
  memcpy(&v, p, sizeof v);
  return __builtin_convertvector(v, VT);
}

/* Channels last with a period: when C is a multiple of LANES, or divides it, the flat
 * (M*C) array is a sequence of blocks of P = C or P = LANES values in which value j belongs to
 * channel j % C, so whole vectors go through with per-lane constants. Other C: scalar rows. */
static inline int64_t FN(mc_period_)(int64_t C) {
  int64_t P = C % LANES == 0 ? C : (LANES % C == 0 ? LANES : 0);
  while (P && P < 4 * LANES) P *= 2; /* >= 4 vectors a block: independent accumulators */
  return P;
}

/* dst[j] = src[j % C], j < P (per-lane constants of one block) */
static void FN(lanes_of_)(const T *src, T *dst, int64_t C, int64_t P) {
  for (int64_t j = 0; j < P; ++j) dst[j] = src[j % C];
}

static vd *FN(alloc_vd_)(int64_t K) {
  vd *p = aligned_alloc(64, sizeof(vd) * (size_t)(K > 0 ? K : 1));
  memset(p, 0, sizeof(vd) * (size_t)(K > 0 ? K : 1));
  return p;
}

/* out[c] = sum over the channel's values of x (pass 0), or of (x - mean[c])^2 (pass 1) */
static void FN(mc_sums_)(const T *restrict x, int64_t total, int64_t C, int64_t P, int pass,
                         const double *mean, double *out) {
  const int64_t K = P / LANES;
  vd *restrict acc = FN(alloc_vd_)(K), *restrict mv = FN(alloc_vd_)(K);
  double *md = (double *)mv;
  for (int64_t j = 0; j < P; ++j) md[j] = pass ? mean[j % C] : 0.0;
  for (int64_t c = 0; c < C; ++c) out[c] = 0;
  int64_t j = 0;
  for (; j + P <= total; j += P)
    for (int64_t k = 0; k < K; ++k) {
      vd v = __builtin_convertvector(FN(load_)(x + j + k * LANES), vd);
      if (pass) {
        v -= mv[k];
        acc[k] += v * v;
      } else {
        acc[k] += v;
      }
    }
  for (; j < total; ++j) {
    double v = (double)x[j] - (pass ? mean[j % C] : 0.0);
    out[j % C] += pass ? v * v : v;
  }
  const double *ad = (const double *)acc;
  for (int64_t q = 0; q < P; ++q) out[q % C] += ad[q];
  free(acc);
  free(mv);
}

/* y = ((x - hi) - lo) * a + b [* s + m] [relu], per-lane constants, noise laid out as x */
static void FN(mc_apply_)(const T *restrict x, T *restrict y, int64_t total, int64_t C,
                          int64_t P, const T *hi, const T *lo, const T *a, const T *b,
                          const float *restrict ns, const float *restrict nm, int relu) {
  T *lc = aligned_alloc(64, sizeof(T) * 4 * (size_t)P);
  FN(lanes_of_)(hi, lc, C, P);
  FN(lanes_of_)(lo, lc + P, C, P);
  FN(lanes_of_)(a, lc + 2 * P, C, P);
  FN(lanes_of_)(b, lc + 3 * P, C, P);
  int64_t j = 0;
  for (; j + P <= total; j += P)
    for (int64_t q = 0; q < P; q += LANES) {
      VT v = ((FN(load_)(x + j + q) - FN(load_)(lc + q)) - FN(load_)(lc + P + q)) *
                 FN(load_)(lc + 2 * P + q) + FN(load_)(lc + 3 * P + q);
      if (ns) v = v * FN(loadf_)(ns + j + q) + FN(loadf_)(nm + j + q);
      if (relu) v = (VT)((VI)v & ~(VI)(v < 0));
      memcpy(y + j + q, &v, sizeof v);
    }
  for (; j < total; ++j) {
    int64_t c = j % C;
    T v = ((x[j] - hi[c]) - lo[c]) * a[c] + b[c];
    if (ns) v = v * (T)ns[j] + (T)nm[j];
    y[j] = relu && v < 0 ? (T)0 : v;
  }
  free(lc);
}

/* Per-channel sum of EXPR(v, c) (v: one value of channel c, as T) over the channel's M values,
 * in double, into out[c]. */
#define CHANNEL_SUMS(xp, out, EXPR)                                                        \
  do {                                                                                      \
    if (!mc) {                                                                              \
      for (int64_t c = 0; c < C; ++c) {                                                     \
        double lanes_[LANES] = {0};                                                          \
        for (int64_t n = 0; n < N; ++n) {                                                   \
          const T *restrict p_ = (xp) + (n * C + c) * S;                                    \
          int64_t s = 0;                                                                    \
          for (; s + LANES <= S; s += LANES)                                                \
            for (int l = 0; l < LANES; ++l) {                                               \
              T v = p_[s + l];                                                              \
              lanes_[l] += (double)(EXPR);                                                   \
            }                                                                               \
          for (; s < S; ++s) {                                                              \
            T v = p_[s];                                                                    \
            lanes_[0] += (double)(EXPR);                                                     \
          }                                                                                 \
        }                                                                                   \
        double t = 0;                                                                       \
        for (int l = 0; l < LANES; ++l) t += lanes_[l];                                      \
        (out)[c] = t;                                                                       \
      }                                                                                     \
    } else {                                                                                \
      for (int64_t c = 0; c < C; ++c) (out)[c] = 0;                                         \
      for (int64_t r = 0; r < N * S; ++r) {                                                 \
        const T *restrict p_ = (xp) + r * C;                                                \
        for (int64_t c = 0; c < C; ++c) {                                                   \
          T v = p_[c];                                                                      \
          (out)[c] += (double)(EXPR);                                                       \
        }                                                                                   \
      }                                                                                     \
    }                                                                                       \
  } while (0)

/* y = (x - hi - lo) * a + b [* ns + nm] [relu] over every element. */
static void FN(apply_)(const T *restrict x, T *restrict y, int64_t N, int64_t C, int64_t S,
                       int mc, const T *hi, const T *lo, const T *a, const T *b,
                       const float *restrict ns, const float *restrict nm, int relu) {
  if (!mc) {
    for (int64_t n = 0; n < N; ++n)
      for (int64_t c = 0; c < C; ++c) {
        int64_t o = (n * C + c) * S;
        const T *restrict p = x + o;
        T *restrict q = y + o;
        const T h = hi[c], l = lo[c], k = a[c], d = b[c];
        if (ns) {
          const float *restrict s_ = ns + o, *restrict m_ = nm + o;
          if (relu)
            for (int64_t s = 0; s < S; ++s) {
              T v = (((p[s] - h) - l) * k + d) * (T)s_[s] + (T)m_[s];
              q[s] = v < 0 ? (T)0 : v;
            }
          else
            for (int64_t s = 0; s < S; ++s)
              q[s] = (((p[s] - h) - l) * k + d) * (T)s_[s] + (T)m_[s];
        } else if (relu) {
          for (int64_t s = 0; s < S; ++s) {
            T v = ((p[s] - h) - l) * k + d;
            q[s] = v < 0 ? (T)0 : v;
          }
        } else {
          for (int64_t s = 0; s < S; ++s) q[s] = ((p[s] - h) - l) * k + d;
        }
      }
  } else if (FN(mc_period_)(C)) {
    FN(mc_apply_)(x, y, N * S * C, C, FN(mc_period_)(C), hi, lo, a, b, ns, nm, relu);
  } else {
    for (int64_t r = 0; r < N * S; ++r) {
      const T *restrict p = x + r * C;
      T *restrict q = y + r * C;
      if (ns) {
        const float *restrict s_ = ns + r * C, *restrict m_ = nm + r * C;
        for (int64_t c = 0; c < C; ++c) {
          T v = (((p[c] - hi[c]) - lo[c]) * a[c] + b[c]) * (T)s_[c] + (T)m_[c];
          q[c] = relu && v < 0 ? (T)0 : v;
        }
      } else if (relu) {
        for (int64_t c = 0; c < C; ++c) {
          T v = ((p[c] - hi[c]) - lo[c]) * a[c] + b[c];
          q[c] = v < 0 ? (T)0 : v;
        }
      } else {
        for (int64_t c = 0; c < C; ++c) q[c] = ((p[c] - hi[c]) - lo[c]) * a[c] + b[c];
      }
    }
  }
}

/* The apply's constants of channel c (see apply_): the mean as a pair of T (mh + ml: a batch
 * mean of 1e4 keeps the digits of a std of 1e-2; a running mean is one T, ml = 0),
 * a = inv [* w], b [or 0]. */
static inline __attribute__((always_inline)) void FN(coeffs_)(int64_t c, T mh, T ml, T inv,
                                                          const T *w, const T *b, T *hi,
                                                          T *lo, T *a, T *bb) {
  hi[c] = mh;
  lo[c] = ml;
  a[c] = w ? inv * w[c] : inv;
  bb[c] = b ? b[c] : (T)0;
}

/* Eval (both families): the running statistics are constants. inv = 1 / sqrt(rs + eps) (root:
 * BatchNorm's running variance) or 1 / (rs + eps) (l_p's running scale); saved (if save_a):
 * the running mean and inv, snapshots as the reference saves them. */
static void FN(eval_coeffs_)(int64_t C, const T *rm, const T *rs, double eps, int root,
                             const T *w, const T *b, T *save_a, T *save_b, T *hi, T *lo, T *a,
                             T *bb) {
  for (int64_t c = 0; c < C; ++c) {
    T inv = root ? (T)1 / (T)sqrt((double)(rs[c] + (T)eps)) : (T)1 / (rs[c] + (T)eps);
    if (save_a) {
      save_a[c] = rm[c];
      save_b[c] = inv;
    }
    FN(coeffs_)(c, rm[c], 0, inv, w, b, hi, lo, a, bb);
  }
}

/* BatchNorm forward. Training: batch statistics (saved: mean and 1/sqrt(var + eps)), running
 * buffers (if rm) updated with the unbiased variance; eval: the running statistics (saved:
 * snapshots of them, as the reference). ns/nm: the noise or NULL. */
void FN(bnk_bn_fwd_)(const T *x, T *y, int64_t N, int64_t C, int64_t S, int mc, int training,
                     const T *w, const T *b, double eps, double momentum, T *rm, T *rv,
                     T *save_mean, T *save_invstd, const float *ns, const float *nm,
                     int relu) {
  const int64_t M = N * S;
  double *buf = malloc(sizeof(double) * 2 * C);
  T *con = malloc(sizeof(T) * 4 * C);
  double *mean = buf, *m2 = buf + C;
  T *hi = con, *lo = con + C, *a = con + 2 * C, *bb = con + 3 * C;
  const int64_t P = mc ? FN(mc_period_)(C) : 0;
  if (training) {
    if (P) {
      FN(mc_sums_)(x, M * C, C, P, 0, NULL, mean);
    } else {
      CHANNEL_SUMS(x, mean, v);
    }
    for (int64_t c = 0; c < C; ++c) mean[c] /= (double)M;
    if (P) {
      FN(mc_sums_)(x, M * C, C, P, 1, mean, m2);
    } else {
      CHANNEL_SUMS(x, m2, ((double)v - mean[c]) * ((double)v - mean[c]));
    }
    const T mom = (T)momentum, keep = (T)(1.0 - momentum), unb = (T)((double)M / (double)(M - 1));
    for (int64_t c = 0; c < C; ++c) {
      double var = m2[c] / (double)M;
      T mt = (T)mean[c], vt = (T)var;
      T inv = (T)(1.0 / sqrt(var + eps));
      save_mean[c] = mt;
      save_invstd[c] = inv;
      if (rm) {
        rm[c] = mom * mt + keep * rm[c];
        rv[c] = mom * (vt * unb) + keep * rv[c];
      }
      FN(coeffs_)(c, mt, (T)(mean[c] - (double)mt), inv, w, b, hi, lo, a, bb);
    }
  } else {
    FN(eval_coeffs_)(C, rm, rv, eps, 1, w, b, save_mean, save_invstd, hi, lo, a, bb);
  }
  FN(apply_)(x, y, N, C, S, mc, hi, lo, a, bb, ns, nm, relu);
  free(buf);
  free(con);
}

/* The gradient reaching a = w xhat + b from dy (relu: masked where the output was <= 0,
 * recomputed from x; noisy: times s). */
static inline __attribute__((always_inline)) T FN(bn_g_)(T g, T xv, T mu, T is, T w, T b,
                                                         int relu, int noisy, T sv, T mv) {
  if (relu) {
    T out = ((xv - mu) * is) * w + b;
    if (noisy) out = sv * out + mv;
    if (out <= 0) g = 0;
  }
  return noisy ? g * sv : g;
}

static inline __attribute__((always_inline)) VT FN(bn_gv_)(VT g, VT xv, T mu, T is, T w, T b,
                                                            int relu, int noisy, VT sv, VT mv) {
  if (relu) {
    VT out = ((xv - mu) * is) * w + b;
    if (noisy) out = sv * out + mv;
    g = (VT)((VI)g & ~(VI)(out <= 0));
  }
  return noisy ? g * sv : g;
}

/* One (n, c) run of S values (ncs): a0 += g, a1 += g * xhat, lane by lane. */
static inline __attribute__((always_inline)) void FN(bn_run_sums_)(
    const T *restrict q, const T *restrict p, const float *restrict sv, const float *restrict mv,
    int64_t S, T mu, T is, T w, T b, int relu, int noisy, vd *a0, vd *a1) {
  int64_t s = 0;
  VT zero = {0};
  for (; s + LANES <= S; s += LANES) {
    VT xv = FN(load_)(p + s);
    VT g = FN(bn_gv_)(FN(load_)(q + s), xv, mu, is, w, b, relu, noisy,
                      noisy ? FN(loadf_)(sv + s) : zero, noisy ? FN(loadf_)(mv + s) : zero);
    *a0 += __builtin_convertvector(g, vd);
    *a1 += __builtin_convertvector(g * ((xv - mu) * is), vd);
  }
  for (; s < S; ++s) {
    T g = FN(bn_g_)(q[s], p[s], mu, is, w, b, relu, noisy, noisy ? (T)sv[s] : 0,
                    noisy ? (T)mv[s] : 0);
    (*a0)[0] += (double)g;
    (*a1)[0] += (double)(g * ((p[s] - mu) * is));
  }
}

/* One (n, c) run (ncs): dx = (g - mg - xhat * mgx) * k, or g * k (eval). */
static inline __attribute__((always_inline)) void FN(bn_run_dx_)(
    const T *restrict q, const T *restrict p, const float *restrict sv, const float *restrict mv,
    T *restrict r, int64_t S, T mu, T is, T w, T b, T k, T mg, T mgx, int training, int relu,
    int noisy) {
  for (int64_t s = 0; s < S; ++s) {
    T g = FN(bn_g_)(q[s], p[s], mu, is, w, b, relu, noisy, noisy ? (T)sv[s] : 0,
                    noisy ? (T)mv[s] : 0);
    r[s] = training ? (g - mg - ((p[s] - mu) * is) * mgx) * k : g * k;
  }
}

/* The (mc) rows: per-channel sums and dx, channels contiguous. */
static inline __attribute__((always_inline)) void FN(bn_mc_)(
    const T *restrict dy, const T *restrict x, T *restrict dx, int64_t N, int64_t C, int64_t S,
    const T *mu, const T *is, const T *ww, const T *bb, const float *ns, const float *nm,
    double *restrict sg, double *restrict sgx, const T *k, const T *mg, const T *mgx,
    int training, int relu, int noisy, int sums) {
  for (int64_t rr = 0; rr < N * S; ++rr) {
    const T *restrict p = x + rr * C, *restrict q = dy + rr * C;
    const float *restrict sv = noisy ? ns + rr * C : NULL, *restrict mv = noisy ? nm + rr * C : NULL;
    if (sums) {
      for (int64_t c = 0; c < C; ++c) {
        T g = FN(bn_g_)(q[c], p[c], mu[c], is[c], ww[c], bb[c], relu, noisy,
                        noisy ? (T)sv[c] : 0, noisy ? (T)mv[c] : 0);
        sg[c] += (double)g;
        sgx[c] += (double)(g * ((p[c] - mu[c]) * is[c]));
      }
    } else {
      T *restrict r = dx + rr * C;
      for (int64_t c = 0; c < C; ++c) {
        T g = FN(bn_g_)(q[c], p[c], mu[c], is[c], ww[c], bb[c], relu, noisy,
                        noisy ? (T)sv[c] : 0, noisy ? (T)mv[c] : 0);
        r[c] = training ? (g - mg[c] - ((p[c] - mu[c]) * is[c]) * mgx[c]) * k[c] : g * k[c];
      }
    }
  }
}

/* The (mc) rows with a period (see mc_period_): whole vectors, per-lane constants. */
static inline __attribute__((always_inline)) void FN(bn_mcp_)(
    const T *restrict dy, const T *restrict x, T *restrict dx, int64_t total, int64_t C,
    int64_t P, const T *mu, const T *is, const T *ww, const T *bb, const float *restrict ns,
    const float *restrict nm, double *sg, double *sgx, const T *k, const T *mg, const T *mgx,
    int training, int relu, int noisy, int sums) {
  const int64_t K = P / LANES;
  T *lc = aligned_alloc(64, sizeof(T) * 7 * (size_t)P);
  const T *src[7] = {mu, is, ww, bb, k, mg, mgx};
  for (int i = 0; i < 7; ++i)
    if (sums ? i < 4 : 1) FN(lanes_of_)(src[i], lc + i * P, C, P);
  vd *restrict a0 = FN(alloc_vd_)(K), *restrict a1 = FN(alloc_vd_)(K);
  VT zero = {0};
  int64_t j = 0;
  for (; j + P <= total; j += P)
    for (int64_t kk = 0; kk < K; ++kk) {
      const int64_t q = kk * LANES, o = j + q;
      VT xv = FN(load_)(x + o), g = FN(load_)(dy + o);
      VT m_ = FN(load_)(lc + q), i_ = FN(load_)(lc + P + q);
      VT xh = (xv - m_) * i_;
      VT sv = noisy ? FN(loadf_)(ns + o) : zero;
      if (relu) {
        VT out = xh * FN(load_)(lc + 2 * P + q) + FN(load_)(lc + 3 * P + q);
        if (noisy) out = sv * out + FN(loadf_)(nm + o);
        g = (VT)((VI)g & ~(VI)(out <= 0));
      }
      if (noisy) g = g * sv;
      if (sums) {
        a0[kk] += __builtin_convertvector(g, vd);
        a1[kk] += __builtin_convertvector(g * xh, vd);
      } else {
        VT kv = FN(load_)(lc + 4 * P + q);
        VT r = training ? (g - FN(load_)(lc + 5 * P + q) - xh * FN(load_)(lc + 6 * P + q)) * kv
                        : g * kv;
        memcpy(dx + o, &r, sizeof r);
      }
    }
  for (; j < total; ++j) {
    int64_t c = j % C;
    T g = FN(bn_g_)(dy[j], x[j], mu[c], is[c], ww[c], bb[c], relu, noisy,
                    noisy ? (T)ns[j] : 0, noisy ? (T)nm[j] : 0);
    T xh = (x[j] - mu[c]) * is[c];
    if (sums) {
      sg[c] += (double)g;
      sgx[c] += (double)(g * xh);
    } else {
      dx[j] = training ? (g - mg[c] - xh * mgx[c]) * k[c] : g * k[c];
    }
  }
  if (sums) {
    const double *d0 = (const double *)a0, *d1 = (const double *)a1;
    for (int64_t q = 0; q < P; ++q) {
      sg[q % C] += d0[q];
      sgx[q % C] += d1[q];
    }
  }
  free(a0);
  free(a1);
  free(lc);
}

static inline __attribute__((always_inline)) void FN(bn_bwd_body_)(
    const T *dy, const T *x, T *dx, int64_t N, int64_t C, int64_t S, int mc, int training,
    const T *mu, const T *is, const T *ww, const T *bb, const float *ns, const float *nm,
    double *sg, double *sgx, T *k, T *mg, T *mgx, int reduce, int relu, int noisy) {
  const int64_t M = N * S;
  if (reduce) {
    if (!mc) {
      for (int64_t c = 0; c < C; ++c) {
        vd a0 = {0}, a1 = {0};
        for (int64_t n = 0; n < N; ++n) {
          int64_t o = (n * C + c) * S;
          FN(bn_run_sums_)(dy + o, x + o, noisy ? ns + o : NULL, noisy ? nm + o : NULL, S,
                           mu[c], is[c], ww[c], bb[c], relu, noisy, &a0, &a1);
        }
        double t0 = 0, t1 = 0;
        for (int l = 0; l < LANES; ++l) {
          t0 += a0[l];
          t1 += a1[l];
        }
        sg[c] = t0;
        sgx[c] = t1;
      }
    } else {
      for (int64_t c = 0; c < C; ++c) sg[c] = sgx[c] = 0;
      if (FN(mc_period_)(C))
        FN(bn_mcp_)(dy, x, dx, M * C, C, FN(mc_period_)(C), mu, is, ww, bb, ns, nm, sg, sgx, k,
                    mg, mgx, training, relu, noisy, 1);
      else
        FN(bn_mc_)(dy, x, dx, N, C, S, mu, is, ww, bb, ns, nm, sg, sgx, k, mg, mgx, training,
                   relu, noisy, 1);
    }
  }
  if (!dx) return;
  for (int64_t c = 0; c < C; ++c) {
    k[c] = is[c] * ww[c];
    mg[c] = training ? (T)(sg[c] / (double)M) : (T)0;
    mgx[c] = training ? (T)(sgx[c] / (double)M) : (T)0;
  }
  if (!mc) {
    for (int64_t n = 0; n < N; ++n)
      for (int64_t c = 0; c < C; ++c) {
        int64_t o = (n * C + c) * S;
        FN(bn_run_dx_)(dy + o, x + o, noisy ? ns + o : NULL, noisy ? nm + o : NULL, dx + o, S,
                       mu[c], is[c], ww[c], bb[c], k[c], mg[c], mgx[c], training, relu, noisy);
      }
  } else if (FN(mc_period_)(C)) {
    FN(bn_mcp_)(dy, x, dx, M * C, C, FN(mc_period_)(C), mu, is, ww, bb, ns, nm, sg, sgx, k, mg,
                mgx, training, relu, noisy, 0);
  } else {
    FN(bn_mc_)(dy, x, dx, N, C, S, mu, is, ww, bb, ns, nm, sg, sgx, k, mg, mgx, training, relu,
               noisy, 0);
  }
}

/* BatchNorm backward: dx (if dx), dw, db (if given). mu/is: what the forward saved (the
 * batch mean and 1/sqrt(var + eps); in eval the running mean and its invstd). */
void FN(bnk_bn_bwd_)(const T *dy, const T *x, T *dx, int64_t N, int64_t C, int64_t S, int mc,
                     int training, const T *mu, const T *is, const T *w, const T *b, int relu,
                     const float *ns, const float *nm, T *dw, T *db) {
  double *sums = malloc(sizeof(double) * 2 * C);
  T *con = malloc(sizeof(T) * 5 * C);
  T *ww = con, *bb = con + C, *k = con + 2 * C, *mg = con + 3 * C, *mgx = con + 4 * C;
  double *sg = sums, *sgx = sums + C;
  for (int64_t c = 0; c < C; ++c) {
    ww[c] = w ? w[c] : (T)1;
    bb[c] = b ? b[c] : (T)0;
    sg[c] = sgx[c] = 0;
  }
  const int reduce = (dx && training) || dw || db;
#define BODY(r_, n_)                                                                         \
  FN(bn_bwd_body_)(dy, x, dx, N, C, S, mc, training, mu, is, ww, bb, ns, nm, sg, sgx, k, mg,    \
                   mgx, reduce, r_, n_)
  if (relu && ns)
    BODY(1, 1);
  else if (relu)
    BODY(1, 0);
  else if (ns)
    BODY(0, 1);
  else
    BODY(0, 0);
#undef BODY
  for (int64_t c = 0; c < C; ++c) {
    if (dw) dw[c] = (T)sgx[c];
    if (db) db[c] = (T)sg[c];
  }
  free(sums);
  free(con);
}

/* l_p forward (p = 1, 2, or 0 for inf). Training: mean, scale s_p of z = x - mean (centered)
 * or x, saved as they are; eval: the running mean and scale (saved: the running mean and
 * 1/(scale + eps), as the reference). y = (x - mean) / (s + eps) * w + b. */
void FN(bnk_lp_fwd_)(const T *x, T *y, int64_t N, int64_t C, int64_t S, int mc, int training,
                     int p, int centered, const T *w, const T *b, double eps, double momentum,
                     T *rm, T *rs, T *save_a, T *save_b) {
  const int64_t M = N * S;
  double *buf = malloc(sizeof(double) * 3 * C);
  T *con = malloc(sizeof(T) * 5 * C);
  double *mean = buf, *acc = buf + C, *nan = buf + 2 * C;
  T *hi = con, *lo = con + C, *a = con + 2 * C, *bb = con + 3 * C, *mt = con + 4 * C;
  if (training) {
    CHANNEL_SUMS(x, mean, v);
    for (int64_t c = 0; c < C; ++c) {
      mean[c] /= (double)M;
      mt[c] = (T)mean[c];
    }
    /* z in T exactly as the backward computes it (its l_inf ties compare |z| with s) */
#define Z(v, c) (centered ? (v) - mt[c] : (v))
    if (p == 1) {
      CHANNEL_SUMS(x, acc, fabs((double)Z(v, c)));
    } else if (p == 2) {
      CHANNEL_SUMS(x, acc, (double)Z(v, c) * (double)Z(v, c));
    } else {
      /* max |z| per channel, NaN if any z is NaN; lanes of vectors, then the lanes' max */
      T *mx = malloc(sizeof(T) * C);
      const int64_t P = mc ? FN(mc_period_)(C) : 0;
      if (!mc || P) {
        const int64_t K = mc ? P / LANES : 1, width = mc ? P : LANES;
        VT *vm = aligned_alloc(64, sizeof(VT) * (size_t)K), *vn = aligned_alloc(64, sizeof(VT) * (size_t)K);
        T *lz = aligned_alloc(64, sizeof(T) * (size_t)width);
        for (int64_t c = 0; c < C; ++c) {
          mx[c] = 0;
          nan[c] = 0;
        }
        for (int64_t c = 0; c < (mc ? 1 : C); ++c) {
          for (int64_t kk = 0; kk < K; ++kk) {
            VT zero = {0};
            vm[kk] = zero;
            vn[kk] = zero;
          }
          for (int64_t q = 0; q < width; ++q) lz[q] = centered ? mt[mc ? q % C : c] : (T)0;
          const int64_t runs = mc ? 1 : N, len = mc ? M * C : S;
          for (int64_t n = 0; n < runs; ++n) {
            const T *restrict p = mc ? x : x + (n * C + c) * S;
            int64_t j = 0;
            for (; j + width <= len; j += width)
              for (int64_t kk = 0; kk < K; ++kk) {
                VT z = FN(load_)(p + j + kk * LANES) - FN(load_)(lz + kk * LANES);
                z = (VT)((VI)z & ~(VI)(z < 0)) - (VT)((VI)z & (VI)(z < 0));
                VI gt = (VI)(z > vm[kk]);
                vm[kk] = (VT)(((VI)z & gt) | ((VI)vm[kk] & ~gt));
                vn[kk] = (VT)((VI)vn[kk] | (VI)(z != z));
              }
            for (; j < len; ++j) {
              int64_t cc = mc ? j % C : c;
              T z = centered ? p[j] - mt[cc] : p[j];
              z = z < 0 ? -z : z;
              mx[cc] = z > mx[cc] ? z : mx[cc];
              nan[cc] += z != z;
            }
          }
          for (int64_t q = 0; q < (mc ? P : LANES); ++q) {
            int64_t cc = mc ? q % C : c;
            T v = ((const T *)vm)[q];
            mx[cc] = v > mx[cc] ? v : mx[cc];
            nan[cc] += ((const TI *)vn)[q] != 0;
          }
        }
        free(vm);
        free(vn);
        free(lz);
      } else {
        CHANNEL_SUMS(x, nan, Z(v, c) != Z(v, c));
        for (int64_t c = 0; c < C; ++c) mx[c] = 0;
        for (int64_t r = 0; r < M; ++r)
          for (int64_t c = 0; c < C; ++c) {
            T z = Z(x[r * C + c], c);
            z = z < 0 ? -z : z;
            mx[c] = z > mx[c] ? z : mx[c];
          }
      }
      for (int64_t c = 0; c < C; ++c) acc[c] = nan[c] > 0 ? (double)NAN : (double)mx[c];
      free(mx);
    }
#undef Z
    const T mom = (T)momentum, keep = (T)(1.0 - momentum);
    for (int64_t c = 0; c < C; ++c) {
      T s = p == 1 ? (T)(acc[c] / (double)M) : p == 2 ? (T)sqrt(acc[c] / (double)M) : (T)acc[c];
      save_a[c] = mt[c];
      save_b[c] = s;
      if (rm) {
        rm[c] = mom * mt[c] + keep * rm[c];
        rs[c] = mom * s + keep * rs[c];
      }
      FN(coeffs_)(c, mt[c], (T)(mean[c] - (double)mt[c]), (T)1 / (s + (T)eps), w, b, hi, lo,
                  a, bb);
    }
  } else {
    FN(eval_coeffs_)(C, rm, rs, eps, 0, w, b, save_a, save_b, hi, lo, a, bb);
  }
  FN(apply_)(x, y, N, C, S, mc, hi, lo, a, bb, NULL, NULL, 0);
  free(buf);
  free(con);
}

/* l_p backward: the scale's direction f (ds/dz = f / D): sign(z), z, or sign(z) at the ties
 * of |z| = s (torch.sign: 0 for NaN). */
static inline __attribute__((always_inline)) T FN(lp_f_)(T z, T s, int p) {
  T sg = (T)(z > 0) - (T)(z < 0);
  if (p == 1) return sg;
  if (p == 2) return z;
  return (z == s || -z == s) ? sg : (T)0;
}

static inline __attribute__((always_inline)) VT FN(lp_fv_)(VT z, T s, int p) {
  VT one = {0};
  one += 1;
  VT sg = (VT)((VI)one & (VI)(z > 0)) - (VT)((VI)one & (VI)(z < 0));
  if (p == 1) return sg;
  if (p == 2) return z;
  return (VT)((VI)sg & ((VI)(z == s) | (VI)(-z == s)));
}

static inline __attribute__((always_inline)) VT FN(lp_tiev_)(VT z, T s) {
  VT one = {0};
  one += 1;
  return (VT)((VI)one & ((VI)(z == s) | (VI)(-z == s)));
}

/* l_p training backward (the eval backward is BatchNorm's, see the plan). */
static inline __attribute__((always_inline)) void FN(lp_bwd_body_)(
    const T *dy, const T *x, T *dx, int64_t N, int64_t C, int64_t S, int mc, int p,
    int centered, const T *mu, const T *sc, const T *w, double eps, T *dw, T *db) {
  const int64_t M = N * S;
  double *buf = malloc(sizeof(double) * 4 * C);
  T *con = malloc(sizeof(T) * 7 * C);
  double *sg = buf, *sgd = buf + C, *sf = buf + 2 * C, *cnt = buf + 3 * C;
  T *av = con, *k1 = con + C, *k3 = con + 2 * C, *k4 = con + 3 * C, *mg = con + 4 * C;
  T *zs = con + 5 * C; /* what z subtracts: the mean (centered) or 0 */
  for (int64_t c = 0; c < C; ++c) {
    av[c] = sc[c] + (T)eps;
    zs[c] = centered ? mu[c] : (T)0;
    sg[c] = sgd[c] = sf[c] = cnt[c] = 0;
  }
  const int need_f = centered, need_cnt = p == 0;
  if (!mc) {
    for (int64_t c = 0; c < C; ++c) {
      vd a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0};
      const T m_ = mu[c], z_ = zs[c], s_ = sc[c];
      for (int64_t n = 0; n < N; ++n) {
        int64_t o = (n * C + c) * S, s = 0;
        const T *restrict q = dy + o, *restrict v = x + o;
        for (; s + LANES <= S; s += LANES) {
          VT g = FN(load_)(q + s), xv = FN(load_)(v + s), z = xv - z_;
          a0 += __builtin_convertvector(g, vd);
          a1 += __builtin_convertvector(g * (xv - m_), vd);
          if (need_f) a2 += __builtin_convertvector(FN(lp_fv_)(z, s_, p), vd);
          if (need_cnt) a3 += __builtin_convertvector(FN(lp_tiev_)(z, s_), vd);
        }
        for (; s < S; ++s) {
          T g = q[s], z = v[s] - z_;
          a0[0] += (double)g;
          a1[0] += (double)(g * (v[s] - m_));
          if (need_f) a2[0] += (double)FN(lp_f_)(z, s_, p);
          if (need_cnt) a3[0] += (double)(z == s_ || -z == s_);
        }
      }
      for (int l = 0; l < LANES; ++l) {
        sg[c] += a0[l];
        sgd[c] += a1[l];
        sf[c] += a2[l];
        cnt[c] += a3[l];
      }
    }
  } else if (FN(mc_period_)(C)) {
    const int64_t P = FN(mc_period_)(C), K = P / LANES, total = M * C;
    T *lc = aligned_alloc(64, sizeof(T) * 3 * (size_t)P);
    FN(lanes_of_)(mu, lc, C, P);
    FN(lanes_of_)(zs, lc + P, C, P);
    FN(lanes_of_)(sc, lc + 2 * P, C, P);
    vd *restrict a0 = FN(alloc_vd_)(K), *restrict a1 = FN(alloc_vd_)(K),
       *restrict a2 = FN(alloc_vd_)(K), *restrict a3 = FN(alloc_vd_)(K);
    VT one = {0};
    one += 1;
    int64_t j = 0;
    for (; j + P <= total; j += P)
      for (int64_t kk = 0; kk < K; ++kk) {
        const int64_t q = kk * LANES, o = j + q;
        VT g = FN(load_)(dy + o), xv = FN(load_)(x + o);
        VT z = xv - FN(load_)(lc + P + q), s_ = FN(load_)(lc + 2 * P + q);
        a0[kk] += __builtin_convertvector(g, vd);
        a1[kk] += __builtin_convertvector(g * (xv - FN(load_)(lc + q)), vd);
        VI tie = (VI)(z == s_) | (VI)(-z == s_);
        if (need_f) {
          VT sg_ = (VT)((VI)one & (VI)(z > 0)) - (VT)((VI)one & (VI)(z < 0));
          VT f = p == 1 ? sg_ : p == 2 ? z : (VT)((VI)sg_ & tie);
          a2[kk] += __builtin_convertvector(f, vd);
        }
        if (need_cnt) a3[kk] += __builtin_convertvector((VT)((VI)one & tie), vd);
      }
    for (; j < total; ++j) {
      int64_t c = j % C;
      T g = dy[j], z = x[j] - zs[c];
      sg[c] += (double)g;
      sgd[c] += (double)(g * (x[j] - mu[c]));
      if (need_f) sf[c] += (double)FN(lp_f_)(z, sc[c], p);
      if (need_cnt) cnt[c] += (double)(z == sc[c] || -z == sc[c]);
    }
    const double *d0 = (const double *)a0, *d1 = (const double *)a1, *d2 = (const double *)a2,
                 *d3 = (const double *)a3;
    for (int64_t q = 0; q < P; ++q) {
      sg[q % C] += d0[q];
      sgd[q % C] += d1[q];
      sf[q % C] += d2[q];
      cnt[q % C] += d3[q];
    }
    free(a0);
    free(a1);
    free(a2);
    free(a3);
    free(lc);
  } else {
    for (int64_t r = 0; r < M; ++r) {
      const T *restrict q = dy + r * C, *restrict v = x + r * C;
      for (int64_t c = 0; c < C; ++c) {
        T g = q[c], z = v[c] - zs[c];
        sg[c] += (double)g;
        sgd[c] += (double)(g * (v[c] - mu[c]));
        if (need_f) sf[c] += (double)FN(lp_f_)(z, sc[c], p);
        if (need_cnt) cnt[c] += (double)(z == sc[c] || -z == sc[c]);
      }
    }
  }
  for (int64_t c = 0; c < C; ++c) {
    T wc = w ? w[c] : (T)1;
    T sgx = (T)sgd[c] / av[c];
    T den = p == 1 ? (T)M : p == 2 ? (T)M * sc[c] : (T)cnt[c];
    k1[c] = wc / av[c];
    k3[c] = den > 0 ? wc * sgx / (av[c] * den) : (T)0;
    k4[c] = centered ? (T)(sf[c] / (double)M) : (T)0;
    mg[c] = (T)(sg[c] / (double)M);
    if (dw) dw[c] = sgx;
    if (db) db[c] = (T)sg[c];
  }
  if (dx) {
    if (!mc) {
      for (int64_t n = 0; n < N; ++n)
        for (int64_t c = 0; c < C; ++c) {
          int64_t o = (n * C + c) * S;
          const T *restrict q = dy + o, *restrict v = x + o;
          T *restrict r = dx + o;
          const T g0 = mg[c], a = k1[c], b3 = k3[c], b4 = k4[c], z_ = zs[c], s_ = sc[c];
          for (int64_t s = 0; s < S; ++s)
            r[s] = (q[s] - g0) * a - b3 * (FN(lp_f_)(v[s] - z_, s_, p) - b4);
        }
    } else {
      for (int64_t rr = 0; rr < M; ++rr) {
        const T *restrict q = dy + rr * C, *restrict v = x + rr * C;
        T *restrict r = dx + rr * C;
        for (int64_t c = 0; c < C; ++c)
          r[c] = (q[c] - mg[c]) * k1[c] - k3[c] * (FN(lp_f_)(v[c] - zs[c], sc[c], p) - k4[c]);
      }
    }
  }
  free(buf);
  free(con);
}

void FN(bnk_lp_bwd_)(const T *dy, const T *x, T *dx, int64_t N, int64_t C, int64_t S, int mc,
                     int p, int centered, const T *mu, const T *sc, const T *w, double eps,
                     T *dw, T *db) {
#define BODY(p_, c_) FN(lp_bwd_body_)(dy, x, dx, N, C, S, mc, p_, c_, mu, sc, w, eps, dw, db)
  if (p == 1)
    centered ? BODY(1, 1) : BODY(1, 0);
  else if (p == 2)
    centered ? BODY(2, 1) : BODY(2, 0);
  else
    centered ? BODY(0, 1) : BODY(0, 0);
#undef BODY
}

#undef CAT2
#undef CAT
#undef FN
#undef CHANNEL_SUMS
#undef VT
#undef VI
