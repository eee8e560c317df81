/* The loops of unit_stats.c for one storage type, included once per dtype with these defined:
 *   T      the stored element type          WT     the compare type (float, or double)
 *   WIDEN  T -> WT, exact                    BAD    1 for a NaN/Inf element (by its bits)
 *   ZERO   T's +0.0                          NAME   prefixes this dtype's function names
 * and undefines them at its end, so the next dtype defines its own.
 * Each inner loop is one straight line per element (no branch), so the compiler vectorises it;
 * that needs -fno-trapping-math (a compare that may raise a floating-point flag is never
 * speculated otherwise), which changes no value. */

/* relu(x) = (x < 0 ? 0 : x): NaN and -0.0 stay, as torch.relu keeps them. */
static inline T NAME(relu)(T raw) { return WIDEN(raw) < 0 ? ZERO : raw; }
static inline WT NAME(mag)(WT w, int nonneg) { return nonneg ? w : (w < 0 ? -w : w); }

/* NaN/Inf values of unit u in rows b0..b1 (kept rows only), counted one by one. */
static int64_t NAME(bad_column)(const T* x, const uint8_t* mask, int64_t b0, int64_t b1, int64_t u,
                                int64_t s_b, int64_t mask_div, int relu) {
    int64_t n = 0;
    for (int64_t b = b0; b < b1; b++)
        if (mask == 0 || mask[b / mask_div]) n += BAD(relu ? NAME(relu)(x[b * s_b + u]) : x[b * s_b + u]);
    return n;
}

/* Statistics of contiguous units (no ReLU output), DR_LANES units at a time: rows t0..t1 of
 * units u0..u0+DR_LANES go through accumulators held in registers, so each value costs one load and
 * the counters are loaded and stored once per tile of DR_ROW_TILE rows, not once per four rows.
 * Each unit's sum is still added in row order: the sums are the row-group loop's, bit for bit. Side
 * by side this is 25-45% faster than the row groups for layers 16 to 4096 wide; for a ReLU, whose
 * output is stored too, walking a block down rows a power-of-two stride apart was slower (its stores
 * alias in the L1 cache), so a ReLU stays in the row groups. */
#ifndef DR_LANES
#define DR_LANES 16
#define DR_ROW_TILE 64
#endif
static void NAME(lanes)(const T* restrict x, const uint8_t* restrict mask, int64_t b0, int64_t b1,
                        int64_t full, int64_t s_b, int64_t mask_div, WT thr, int nonneg,
                        int32_t* restrict cnt, double* restrict part) {
    for (int64_t t0 = b0; t0 < b1; t0 += DR_ROW_TILE) {
        int64_t t1 = b1 - t0 < DR_ROW_TILE ? b1 : t0 + DR_ROW_TILE;
        for (int64_t u0 = 0; u0 < full; u0 += DR_LANES) {
            int32_t c[DR_LANES];
            double s[DR_LANES];
            for (int k = 0; k < DR_LANES; k++) {
                c[k] = cnt[u0 + k];
                s[k] = part[u0 + k];
            }
            for (int64_t b = t0; b < t1; b++) {
                if (mask && !mask[b / mask_div]) continue;
                const T* restrict xr = x + b * s_b + u0;
                if (nonneg) {
                    _Pragma("omp simd") for (int k = 0; k < DR_LANES; k++) {
                        WT w = WIDEN(xr[k]);
                        c[k] += w > thr;
                        s[k] += (double)w;
                    }
                } else {
                    _Pragma("omp simd") for (int k = 0; k < DR_LANES; k++) {
                        WT w = WIDEN(xr[k]);
                        c[k] += w > thr;
                        s[k] += (double)(w < 0 ? -w : w);
                    }
                }
            }
            for (int k = 0; k < DR_LANES; k++) {
                cnt[u0 + k] = c[k];
                part[u0 + k] = s[k];
            }
        }
    }
}

/* Units contiguous: rows b0..b1 of `units` values, row stride s_b. Four kept rows go through the
 * accumulators at a time (each unit's sum still added in row order), so the per-unit counters are
 * loaded and stored once per four values. Counts run in int32 (cnt, at most 2**30 rows per call:
 * native.py splits larger ones) and the sums of this call in `part`, both scratch of `units`
 * entries that unit_stats.c allocates; NaN/Inf are counted afterwards, only for a unit whose sum here is not finite (a sum of
 * finite float32 values in float64 cannot overflow; see native.py for float64). For an in-place ReLU
 * x and y are one pointer: each element is read once and then written at the same place, which the
 * restrict-qualified loops keep in that order (without restrict the compiler does not vectorise them). */
static void NAME(units)(const T* restrict x, T* restrict y, const uint8_t* restrict mask, int64_t b0,
                        int64_t b1, int64_t units, int64_t s_b, int64_t mask_div, WT thr, int relu,
                        int nonneg, int32_t* restrict cnt, double* restrict part,
                        int64_t* restrict fired, double* restrict mag, int64_t* restrict bad,
                        int64_t* restrict obs) {
    int64_t kept = 0;
    for (int64_t b = b0; b < b1; b++) kept += mask == 0 || mask[b / mask_div];
    for (int64_t u = 0; u < units; u++) {
        cnt[u] = 0;
        part[u] = 0;
    }
    int64_t full = relu ? 0 : units - units % DR_LANES; /* a ReLU stays in the row groups (see lanes) */
    if (full) NAME(lanes)(x, mask, b0, b1, full, s_b, mask_div, thr, nonneg, cnt, part);
    /* a ReLU's units, or the last units % DR_LANES: four rows at a time */
    const T* restrict xt = x + full;
    T* restrict yt = relu ? y + full : y;
    int32_t* restrict ct = cnt + full;
    double* restrict pt = part + full;
    int64_t rest = units - full;
    int64_t b = b0;
    while (b < b1 && rest) {
        int group = b + 4 <= b1;
        for (int64_t k = 0; group && mask && k < 4; k++) group = mask[(b + k) / mask_div] != 0;
        if (group) {
            const T *x0 = xt + b * s_b, *x1 = x0 + s_b, *x2 = x1 + s_b, *x3 = x2 + s_b;
            if (relu) {
                T *y0 = yt + b * s_b, *y1 = y0 + s_b, *y2 = y1 + s_b, *y3 = y2 + s_b;
                for (int64_t u = 0; u < rest; u++) {
                    T o0 = NAME(relu)(x0[u]), o1 = NAME(relu)(x1[u]), o2 = NAME(relu)(x2[u]),
                      o3 = NAME(relu)(x3[u]);
                    WT v0 = WIDEN(o0), v1 = WIDEN(o1), v2 = WIDEN(o2), v3 = WIDEN(o3);
                    y0[u] = o0;
                    y1[u] = o1;
                    y2[u] = o2;
                    y3[u] = o3;
                    ct[u] += (int32_t)(v0 > thr) + (v1 > thr) + (v2 > thr) + (v3 > thr);
                    pt[u] = (((pt[u] + (double)v0) + (double)v1) + (double)v2) + (double)v3;
                }
            } else {
                for (int64_t u = 0; u < rest; u++) {
                    WT w0 = WIDEN(x0[u]), w1 = WIDEN(x1[u]), w2 = WIDEN(x2[u]), w3 = WIDEN(x3[u]);
                    ct[u] += (int32_t)(w0 > thr) + (w1 > thr) + (w2 > thr) + (w3 > thr);
                    pt[u] = (((pt[u] + (double)NAME(mag)(w0, nonneg)) + (double)NAME(mag)(w1, nonneg)) +
                               (double)NAME(mag)(w2, nonneg)) + (double)NAME(mag)(w3, nonneg);
                }
            }
            b += 4;
            continue;
        }
        const T* xr = xt + b * s_b;
        int keep = mask == 0 || mask[b / mask_div];
        if (relu) {
            T* yr = yt + b * s_b;
            for (int64_t u = 0; u < rest; u++) { /* every position gets its output */
                T o = NAME(relu)(xr[u]);
                WT v = WIDEN(o);
                yr[u] = o;
                if (keep) { /* only kept rows are counted */
                    ct[u] += v > thr;
                    pt[u] += (double)v;
                }
            }
        } else if (keep) {
            for (int64_t u = 0; u < rest; u++) {
                WT w = WIDEN(xr[u]);
                ct[u] += w > thr;
                pt[u] += (double)NAME(mag)(w, nonneg);
            }
        }
        b += 1;
    }
    for (int64_t u = 0; u < units; u++) {
        fired[u] += cnt[u];
        mag[u] += part[u];
        if (!(part[u] - part[u] == 0)) /* NaN or Inf: count them exactly */
            bad[u] += NAME(bad_column)(x, mask, b0, b1, u, s_b, mask_div, relu);
    }
    *obs += kept;
}

/* One contiguous run of n values of one unit. The sums are reductions the compiler vectorises
 * (omp simd: float64 lanes, added up at the end), so the last bits of |h| depend on the
 * machine's vector width, as any parallel sum does; counts are exact. The loops count no NaN/Inf:
 * every term of the sum is >= 0 (relu(x), |x|) or NaN, so a NaN or Inf value makes the sum NaN or
 * Inf, and only then are the run's NaN/Inf counted, one by one (a float64 sum of finite float64
 * values may overflow too: that recount finds none). Fired counts run in int32 lanes, DR_RUN_CHUNK
 * values at a time: half the work of int64 ones in a loop that is compute-bound. */
#ifndef DR_RUN_CHUNK
#define DR_RUN_CHUNK ((int64_t)1 << 30)
#endif
static void NAME(run)(const T* restrict p, T* restrict q, int64_t n, WT thr, int relu, int nonneg,
                      int64_t* restrict fired, double* restrict mag, int64_t* restrict bad) {
    int64_t f = 0;
    double s = 0;
    for (int64_t a0 = 0; a0 < n; a0 += DR_RUN_CHUNK) {
        int64_t a1 = n - a0 < DR_RUN_CHUNK ? n : a0 + DR_RUN_CHUNK;
        int32_t fc = 0;
        if (relu) {
#pragma omp simd reduction(+ : fc, s)
            for (int64_t a = a0; a < a1; a++) {
                T raw = p[a];
                WT w = WIDEN(raw);
                WT v = w < 0 ? (WT)0 : w;
                q[a] = w < 0 ? ZERO : raw;
                fc += v > thr;
                s += (double)v;
            }
        } else if (nonneg) {
#pragma omp simd reduction(+ : fc, s)
            for (int64_t a = a0; a < a1; a++) {
                WT w = WIDEN(p[a]);
                fc += w > thr;
                s += (double)w;
            }
        } else {
#pragma omp simd reduction(+ : fc, s)
            for (int64_t a = a0; a < a1; a++) {
                WT w = WIDEN(p[a]);
                fc += w > thr;
                s += (double)(w < 0 ? -w : w);
            }
        }
        f += fc;
    }
    *fired += f;
    *mag += s;
    if (!(s - s == 0)) { /* NaN or Inf somewhere in the run: count them exactly */
        int64_t nb = 0;
        const T* r = relu ? q : p; /* relu keeps NaN and +Inf and makes -Inf 0, as its output reads */
        for (int64_t a = 0; a < n; a++) nb += BAD(r[a]);
        *bad += nb;
    }
}

/* Runs contiguous (s_a == 1): for each row b and unit u, a run of `after` values. */
static void NAME(runs)(const T* x, T* y, const uint8_t* mask, int64_t b0, int64_t b1, int64_t units,
                       int64_t after, int64_t s_b, int64_t s_u, int64_t mask_div, WT thr, int relu,
                       int nonneg, int64_t* fired, double* mag, int64_t* bad, int64_t* obs) {
    int64_t f_skip = 0, b_skip = 0;
    double m_skip = 0;
    for (int64_t b = b0; b < b1; b++) {
        int keep = mask == 0 || mask[b / mask_div];
        if (!keep && !relu) continue;
        for (int64_t u = 0; u < units; u++) {
            const T* p = x + b * s_b + u * s_u;
            T* q = relu ? y + b * s_b + u * s_u : 0;
            if (keep)
                NAME(run)(p, q, after, thr, relu, nonneg, &fired[u], &mag[u], &bad[u]);
            else /* the output everywhere; the statistics of kept rows only */
                NAME(run)(p, q, after, thr, relu, nonneg, &f_skip, &m_skip, &b_skip);
        }
        if (keep) *obs += after;
    }
}

/* Any other strides, element by element. */
static void NAME(strided)(const T* x, T* y, const uint8_t* mask, int64_t b0, int64_t b1, int64_t units,
                          int64_t after, int64_t s_b, int64_t s_u, int64_t s_a, int64_t mask_div,
                          WT thr, int relu, int nonneg, int64_t* fired, double* mag, int64_t* bad,
                          int64_t* obs) {
    for (int64_t b = b0; b < b1; b++) {
        int keep = mask == 0 || mask[b / mask_div];
        for (int64_t a = 0; a < after; a++)
            for (int64_t u = 0; u < units; u++) {
                int64_t off = b * s_b + u * s_u + a * s_a;
                T raw = x[off];
                WT w = WIDEN(raw);
                if (relu) {
                    raw = w < 0 ? ZERO : raw;
                    w = w < 0 ? (WT)0 : w;
                    y[off] = raw;
                }
                if (keep) {
                    fired[u] += w > thr;
                    mag[u] += (double)(relu || nonneg ? w : (w < 0 ? -w : w));
                    bad[u] += BAD(raw);
                }
            }
        if (keep) *obs += after;
    }
}

static void NAME(stats)(const T* x, T* y, const uint8_t* mask, int64_t b0, int64_t b1, int64_t units,
                        int64_t after, int64_t s_b, int64_t s_u, int64_t s_a, int64_t mask_div, WT thr,
                        int relu, int nonneg, int32_t* cnt, double* part, int64_t* fired, double* mag,
                        int64_t* bad, int64_t* obs) {
    if (s_u == 1 && after == 1) {
        /* Blocks of DR_UNIT_BLOCK units, all rows each: a block's counters stay in the L1 cache
         * (a 4096-unit layer's would not), and every value is still read once. */
        int64_t unused = 0;
        for (int64_t u0 = 0; u0 < units; u0 += DR_UNIT_BLOCK) {
            int64_t n = units - u0 < DR_UNIT_BLOCK ? units - u0 : DR_UNIT_BLOCK;
            NAME(units)(x + u0, relu ? y + u0 : y, mask, b0, b1, n, s_b, mask_div, thr, relu, nonneg, cnt + u0,
                        part + u0, fired + u0, mag + u0, bad + u0, u0 == 0 ? obs : &unused);
        }
    }
    else if (s_a == 1)
        NAME(runs)(x, y, mask, b0, b1, units, after, s_b, s_u, mask_div, thr, relu, nonneg, fired, mag,
                   bad, obs);
    else
        NAME(strided)(x, y, mask, b0, b1, units, after, s_b, s_u, s_a, mask_div, thr, relu, nonneg,
                      fired, mag, bad, obs);
}

#undef NAME
#undef T
#undef WT
#undef WIDEN
#undef BAD
#undef ZERO
