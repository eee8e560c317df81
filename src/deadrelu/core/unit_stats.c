/* deadrelu's CPU statistics kernel: per-unit fired count, float64 sum of |h| and NaN/Inf count of
 * an activation in one read, optionally writing relu(x) in the same pass.
 *
 * Compiled at first use by deadrelu/core/native.py (no build step at install time) and called
 * through ctypes, which releases the GIL, so native.py can run row slices on several threads.
 * The activation is addressed as (before, units, after) through element strides, the layout
 * deadrelu.core.kernels.plan describes; three loops cover it:
 *   - units contiguous (s_u == 1, after == 1): (batch, units), (B, T, C), channels_last maps;
 *     the inner loop runs along units and is vectorised, each unit's sums stay in its lane;
 *   - runs contiguous (s_a == 1): a contiguous (N, C, H, W) map, one run of H*W per unit;
 *   - anything else, element by element.
 * Sums are float64 and added in an order fixed by this source (explicit lanes, no -ffast-math),
 * so the numbers do not depend on which instruction set the machine picks.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__x86_64__) || defined(_M_X64) || defined(__i386__)
#include <xmmintrin.h>
#endif


/* Units per block of the (rows, units) loop: its int32 and float64 counters take 6 KiB. */
#define DR_UNIT_BLOCK 512

enum { DR_F32 = 0, DR_F64 = 1, DR_BF16 = 2, DR_F16 = 3 };

/* Widening to the compare type (float32, or float64 for float64) is exact for every value,
 * subnormals included; "bad" tests the stored bits: an all-ones exponent is NaN or +-Inf. */
static inline float widen_f32(float v) { return v; }
static inline int bad_f32(float v) {
    uint32_t b;
    memcpy(&b, &v, 4);
    return (b & 0x7f800000u) == 0x7f800000u;
}
static inline double widen_f64(double v) { return v; }
static inline int bad_f64(double v) {
    uint64_t b;
    memcpy(&b, &v, 8);
    return (b & 0x7ff0000000000000ull) == 0x7ff0000000000000ull;
}
static inline float widen_bf16(uint16_t v) {
    uint32_t b = (uint32_t)v << 16; /* bf16 is the top half of a float32 */
    float f;
    memcpy(&f, &b, 4);
    return f;
}
static inline int bad_bf16(uint16_t v) { return (v & 0x7f80u) == 0x7f80u; }
static inline float widen_f16(uint16_t v) {
    /* IEEE half to float32 by bits, exact for subnormals (no compiler _Float16 support needed) */
    uint32_t sign = (uint32_t)(v & 0x8000u) << 16, exp = (v >> 10) & 0x1fu, man = v & 0x3ffu, b;
    if (exp == 0x1fu) {
        b = sign | 0x7f800000u | (man << 13);
    } else if (exp != 0) {
        b = sign | ((exp + 112u) << 23) | (man << 13);
    } else if (man == 0) {
        b = sign;
    } else {
        float f = (float)man * 5.9604644775390625e-08f; /* man * 2**-24, exact */
        memcpy(&b, &f, 4);
        b |= sign;
    }
    float f;
    memcpy(&f, &b, 4);
    return f;
}
static inline int bad_f16(uint16_t v) { return (v & 0x7c00u) == 0x7c00u; }

#define NAME(s) f32_##s
#define T float
#define WT float
#define WIDEN widen_f32
#define BAD bad_f32
#define ZERO 0.0f
#include "unit_stats_body.h"

#define NAME(s) f64_##s
#define T double
#define WT double
#define WIDEN widen_f64
#define BAD bad_f64
#define ZERO 0.0
#include "unit_stats_body.h"

#define NAME(s) bf16_##s
#define T uint16_t
#define WT float
#define WIDEN widen_bf16
#define BAD bad_bf16
#define ZERO ((uint16_t)0)
#include "unit_stats_body.h"

#define NAME(s) f16_##s
#define T uint16_t
#define WT float
#define WIDEN widen_f16
#define BAD bad_f16
#define ZERO ((uint16_t)0)
#include "unit_stats_body.h"

/* The thread's flush-to-zero state (torch.set_flush_denormal sets it for the thread that calls it,
 * and a compare then reads a subnormal as 0): x86's MXCSR FTZ and DAZ bits, aarch64's FPCR.FZ. A
 * thread inherits it when it is created, so native.py's worker threads hold whatever the caller had
 * then; each slice is run under the caller's state of now, passed in `flush`. */
#if defined(__x86_64__) || defined(_M_X64) || defined(__i386__)
#define DR_FLUSH_BITS 0x8040u
static uint64_t dr_fp_get(void) { return _mm_getcsr(); }
static void dr_fp_set(uint64_t v) { _mm_setcsr((unsigned)v); }
#elif defined(__aarch64__)
#define DR_FLUSH_BITS (1u << 24)
static uint64_t dr_fp_get(void) {
    uint64_t v;
    __asm__ volatile("mrs %0, fpcr" : "=r"(v));
    return v;
}
static void dr_fp_set(uint64_t v) { __asm__ volatile("msr fpcr, %0" : : "r"(v) : "memory"); }
#else
#define DR_FLUSH_BITS 0u
static uint64_t dr_fp_get(void) { return 0; }
static void dr_fp_set(uint64_t v) { (void)v; }
#endif

/* The calling thread's flush bits, for deadrelu_unit_stats' `flush` on another thread. */
int deadrelu_flush_mode(void) { return (int)(dr_fp_get() & DR_FLUSH_BITS); }

/* The entry point. Rows b0..b1 of the (before, units, after) layout; y (same strides as x) gets
 * relu(x) when relu != 0; mask (one byte per mask_div rows of before) selects the rows that count.
 * fired/mag/bad (units entries each) and obs (one) are added to. flush: -1 to count under this
 * thread's flush-to-zero state, else deadrelu_flush_mode() of the thread whose state to use (set
 * for the call, restored after). Returns 0; -1 for a dtype code this build does not know, -2 when
 * scratch memory cannot be allocated (nothing is added then). */
int deadrelu_unit_stats(int dtype, const void* x, void* y, const uint8_t* mask, int64_t b0, int64_t b1,
                        int64_t units, int64_t after, int64_t s_b, int64_t s_u, int64_t s_a,
                        int64_t mask_div, double thr, int relu, int nonneg, int flush, int64_t* fired,
                        double* mag, int64_t* bad, int64_t* obs) {
    if (dtype < DR_F32 || dtype > DR_F16) return -1;
    int32_t* cnt = 0;
    double* part = 0;
    if (s_u == 1 && after == 1) { /* the (rows, units) loop's per-call counters */
        cnt = (int32_t*)malloc((size_t)(units > 0 ? units : 1) * sizeof(int32_t));
        part = (double*)malloc((size_t)(units > 0 ? units : 1) * sizeof(double));
        if (cnt == 0 || part == 0) {
            free(cnt);
            free(part);
            return -2;
        }
    }
    uint64_t saved = dr_fp_get();
    if (flush >= 0) dr_fp_set((saved & ~(uint64_t)DR_FLUSH_BITS) | ((uint64_t)flush & DR_FLUSH_BITS));
#define DR_CALL(NAME_, T_, THR_)                                                                         \
    NAME_##_stats((const T_*)x, (T_*)y, mask, b0, b1, units, after, s_b, s_u, s_a, mask_div, THR_, relu, \
                  nonneg, cnt, part, fired, mag, bad, obs)
    switch (dtype) {
        case DR_F32: DR_CALL(f32, float, (float)thr); break;
        case DR_F64: DR_CALL(f64, double, thr); break;
        case DR_BF16: DR_CALL(bf16, uint16_t, (float)thr); break;
        default: DR_CALL(f16, uint16_t, (float)thr); break;
    }
#undef DR_CALL
    if (flush >= 0) dr_fp_set(saved);
    free(cnt);
    free(part);
    return 0;
}

/* The ABI version native.py checks before it calls anything. */
int deadrelu_unit_stats_abi(void) { return 4; }
