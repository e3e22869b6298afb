/* dist_clip native CPU kernel: per-tensor norm partials of many tensors in one read pass.
 *
 * Plain C (no torch headers): compiled by dist_clip/_native.py with the system C compiler in well under a
 * second, loaded with ctypes, and used only on the CPU. Powers 1-3 are summed a few terms at a time in float
 * lanes and accumulated in double (DEF_BSUM: at most 4.8e-7 relative for fp32, 9.5e-7 for halves, with exact
 * double recomputation where float would overflow or underflow); other orders widen every element to double
 * before raising it to the power p (the float64 reference up to float64 rounding); counts and maxima are exact.
 * With AVX2 or AVX-512 the arithmetic costs less than the memory traffic: the pass runs at read bandwidth.
 *
 * Work is split into items of at most ITEM_BYTES of one tensor; items run in parallel (OpenMP, the
 * runtime torch already loaded), each summed in LANES independent double accumulators, and the per-tensor
 * results are combined in item order, so the answer does not depend on the number of threads.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(__x86_64__) && !defined(DC_NO_CLONES)
/* One build runs at its best on any x86-64: the loader picks the clone for the CPU at load time. */
#define DC_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define DC_CLONES
#endif

enum { DT_F32 = 0, DT_BF16 = 1, DT_F16 = 2 };
enum { OP_COUNT = 0, OP_P1 = 1, OP_P2 = 2, OP_P3 = 3, OP_POW = 4, OP_MAX = 5 };

#define ITEM_BYTES ((int64_t)1 << 19) /* 512 KiB a work item: long enough runs for the prefetchers */
#ifndef LANES
#define LANES 32
#endif
#define PARALLEL_MIN ((int64_t)1 << 18) /* below this (1 MiB of fp32, ~25 us of one core) a thread wake-up costs more than it saves */

/* |x| as float, from each storage format. bf16 is the top half of a float32; fp16 is decoded with integer
 * operations only (no subnormal float arithmetic, so a denormals-are-zero FPU mode cannot change it). */
static inline float abs_f32(const void *p, int64_t i) { return fabsf(((const float *)p)[i]); }

static inline float abs_bf16(const void *p, int64_t i) {
    uint32_t u = (uint32_t)(((const uint16_t *)p)[i] & 0x7fffu) << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline float abs_f16(const void *p, int64_t i) {
    uint32_t em = ((const uint16_t *)p)[i] & 0x7fffu;
    uint32_t sub = 0u - (uint32_t)(em < 0x400u);     /* zero or subnormal */
    uint32_t spec = 0u - (uint32_t)(em >= 0x7c00u);  /* inf or NaN */
    /* Rebias the exponent by 112 (by 224 for inf/NaN, giving 255); a subnormal m becomes 2**-14 (1 + m/1024),
     * from which 2**-14 is subtracted exactly: m 2**-24, a normal float. */
    uint32_t bits = (em << 13) + 0x38000000u + (sub & 0x00800000u) + (spec & 0x38000000u);
    uint32_t cb = sub & 0x38800000u;
    float f, corr;
    memcpy(&f, &bits, 4);
    memcpy(&corr, &cb, 4);
    return f - corr;
}

/* a**p for a double a >= 0 that came from a float (0, normal, inf or NaN; never a double subnormal) and a
 * finite p > 0: exp2(p * log2(a)) with series accurate to about 1e-15 relative, branch-free so that it
 * vectorizes. 0**p = 0, inf**p = inf, NaN stays NaN. */
static inline double pow_pos(double a, double p) {
    uint64_t b;
    memcpy(&b, &a, 8);
    uint64_t eb = (b >> 52) | 0x4330000000000000ull; /* the double 2**52 + biased exponent: no int->double */
    double e;
    memcpy(&e, &eb, 8);
    e -= 0x1p52 + 1023.0;
    uint64_t mb = (b & 0x000fffffffffffffull) | 0x3ff0000000000000ull;
    double m;
    memcpy(&m, &mb, 8);
    double big = m > 1.4142135623730951 ? 1.0 : 0.0; /* reduce m to [sqrt(1/2), sqrt(2)) */
    m *= 1.0 - 0.5 * big;
    e += big;
    double s = (m - 1.0) / (m + 1.0); /* ln m = 2 atanh s, |s| <= 0.1716 */
    double s2 = s * s;
    double q = 1.0 / 13; /* truncation 2e-12 relative */
    q = q * s2 + 1.0 / 11;
    q = q * s2 + 1.0 / 9;
    q = q * s2 + 1.0 / 7;
    q = q * s2 + 1.0 / 5;
    q = q * s2 + 1.0 / 3;
    q = q * s2 + 1.0;
    double y = p * (e + 2.0 * s * q * 1.4426950408889634); /* p * log2(a) */
    y = y > 1100.0 ? 1100.0 : y;
    y = y < -1100.0 ? -1100.0 : y;
    double kd = y + 0x1.8p52; /* round to the nearest integer k, kept in the low mantissa bits */
    uint64_t kb;
    memcpy(&kb, &kd, 8);
    double f = y - (kd - 0x1.8p52);                  /* |f| <= 1/2 */
    uint64_t k = kb - 0x4338000000000000ull + 2048u; /* k + 2048 in [948, 3148]: unsigned shifts only */
    uint64_t k1 = k >> 1, k2 = k - k1;               /* 2**k as two normal factors 2**(k1-1024) 2**(k2-1024) */
    uint64_t b1 = (k1 - 1u) << 52, b2 = (k2 - 1u) << 52;
    double f1, f2;
    memcpy(&f1, &b1, 8);
    memcpy(&f2, &b2, 8);
    double t = f * 0.6931471805599453; /* 2**f = e**t, |t| <= 0.347: Taylor to t**9, truncation 7e-12 */
    double r = 1.0 / 3628800.0;
    r = r * t + 1.0 / 362880.0;
    r = r * t + 1.0 / 40320.0;
    r = r * t + 1.0 / 5040.0;
    r = r * t + 1.0 / 720.0;
    r = r * t + 1.0 / 120.0;
    r = r * t + 1.0 / 24.0;
    r = r * t + 1.0 / 6.0;
    r = r * t + 0.5;
    r = r * t + 1.0;
    r = r * t + 1.0;
    r = (r * f1) * f2;
    r = a == 0.0 ? 0.0 : r;
    r = a > 1.7976931348623157e308 ? a : r; /* inf */
    r = a != a ? a : r;                     /* NaN */
    return r;
}

/* s += |x|**k over the elements i..n-1, in double. */
#define DOUBLE_SUM(LOAD, TERM)                                                                            \
    for (; i < n; i++) {                                                                                  \
        double a = (double)LOAD(x, i);                                                                    \
        s += TERM;                                                                                        \
    }

/* The end of every sum: s, the elements past the last full block in double, then the lanes pairwise. */
#define SUM_REST(LOAD, TERM)                                                                              \
    double s = 0.0;                                                                                       \
    DOUBLE_SUM(LOAD, TERM)                                                                                \
    for (int j = 0; j < LANES; j += 2) s += acc[j] + acc[j + 1];

#define SUM_TAIL(LOAD, TERM)                                                                              \
    SUM_REST(LOAD, TERM)                                                                                  \
    (void)p;                                                                                              \
    return s;

/* Sum of |x|**k over one item, in double lanes. */
#define DEF_SUM(NAME, LOAD, TERM)                                                                            \
    DC_CLONES static double NAME(const void *x, int64_t n, double p) {                                     \
        double acc[LANES] = {0};                                                                          \
        int64_t i = 0;                                                                                    \
        for (; i + LANES <= n; i += LANES)                                                                \
            for (int j = 0; j < LANES; j++) {                                                             \
                double a = (double)LOAD(x, i + j);                                                        \
                acc[j] += TERM;                                                                           \
            }                                                                                             \
        SUM_TAIL(LOAD, TERM)                                                                              \
    }

/* Count of non-zeros; NaN anywhere gives NaN (a NaN gradient must not hide behind a count). Element k is
 * read as TYPE v = VAL; NZ and BAD test it (non-zero, NaN). */
#define DEF_COUNT_BY(NAME, TYPE, VAL, NZ, BAD)                                                            \
    DC_CLONES static double NAME(const void *x, int64_t n, double p) {                                    \
        int32_t cnt[LANES] = {0}, nan[LANES] = {0};                                                       \
        int64_t total = 0, i = 0;                                                                         \
        while (i + LANES <= n) { /* int32 lanes, emptied every 2**20 rows: no overflow */                 \
            int64_t stop = n - (n - i) % LANES;                                                           \
            if (stop - i > ((int64_t)LANES << 20)) stop = i + ((int64_t)LANES << 20);                     \
            for (; i < stop; i += LANES)                                                                  \
                for (int j = 0; j < LANES; j++) {                                                         \
                    int64_t k = i + j;                                                                    \
                    TYPE v = VAL;                                                                         \
                    cnt[j] += NZ;                                                                         \
                    nan[j] |= BAD;                                                                        \
                }                                                                                         \
            for (int j = 0; j < LANES; j++) total += cnt[j], cnt[j] = 0;                                  \
        }                                                                                                 \
        int anynan = 0;                                                                                   \
        for (int64_t k = i; k < n; k++) {                                                                 \
            TYPE v = VAL;                                                                                 \
            total += NZ;                                                                                  \
            anynan |= BAD;                                                                                \
        }                                                                                                 \
        for (int j = 0; j < LANES; j++) anynan |= nan[j];                                                 \
        (void)p;                                                                                          \
        return anynan ? NAN : (double)total;                                                              \
    }
#define DEF_COUNT(NAME, LOAD) DEF_COUNT_BY(NAME, float, LOAD(x, k), v != 0.0f, v != v)

/* Max of |x| (exact in float); NaN anywhere gives NaN. */
#define DEF_MAX(NAME, LOAD)                                                                                  \
    DC_CLONES static double NAME(const void *x, int64_t n, double p) {                                     \
        float mx[LANES] = {0};                                                                            \
        int32_t nan[LANES] = {0};                                                                         \
        int64_t i = 0;                                                                                    \
        for (; i + LANES <= n; i += LANES)                                                                \
            for (int j = 0; j < LANES; j++) {                                                             \
                float v = LOAD(x, i + j);                                                                 \
                mx[j] = v > mx[j] ? v : mx[j];                                                            \
                nan[j] |= v != v;                                                                         \
            }                                                                                             \
        float m = 0.0f;                                                                                   \
        int anynan = 0;                                                                                   \
        for (; i < n; i++) {                                                                              \
            float v = LOAD(x, i);                                                                         \
            m = v > m ? v : m;                                                                            \
            anynan |= v != v;                                                                             \
        }                                                                                                 \
        for (int j = 0; j < LANES; j++) {                                                                 \
            m = mx[j] > m ? mx[j] : m;                                                                    \
            anynan |= nan[j];                                                                             \
        }                                                                                                 \
        (void)p;                                                                                          \
        return anynan ? NAN : (double)m;                                                                  \
    }

/* Powers 1-3 are summed in float lanes for BLOCK terms, then widened and accumulated in double: a lane's BLOCK
 * roundings bound the relative error by BLOCK * 2**-24, and the float arithmetic keeps the pass at read
 * bandwidth where widening every element does not (AVX2: two vcvtps2pd per 8 floats, about 2 floats a cycle,
 * under the read rate of one core). fp32 takes blocks of FBLOCK = 8 terms (4.8e-7 at most, against the 1e-6
 * promised; about 1e-10 on real data), halves (8 or 11 significant bits) blocks of HBLOCK = 16 (9.5e-7, against
 * 1e-5). An item whose sum is not finite (a float lane overflowed, or the data hold inf or NaN) is summed again
 * in double: one test an item instead of one a block, which cost about 5% of the pass on one AVX2 core; fp16
 * needs no check for p <= 3 (65504**3 * 512 fits). Float squares and cubes of tiny values underflow: see
 * dc_partials. */
#define HBLOCK 16
#define FBLOCK 8
#define DEF_BSUM(NAME, LOAD, TERM, CHECK, BLOCK)                                                             \
    DC_CLONES static double NAME(const void *x, int64_t n, double p) {                                     \
        double acc[LANES] = {0};                                                                          \
        int64_t i = 0;                                                                                    \
        for (; i + LANES * BLOCK <= n; i += LANES * BLOCK) {                                              \
            float f[LANES] = {0};                                                                         \
            for (int r = 0; r < LANES * BLOCK; r += LANES)                                                \
                for (int j = 0; j < LANES; j++) {                                                         \
                    float a = LOAD(x, i + r + j);                                                         \
                    f[j] += TERM;                                                                         \
                }                                                                                         \
            for (int j = 0; j < LANES; j++) acc[j] += (double)f[j];                                       \
        }                                                                                                 \
        SUM_REST(LOAD, TERM)                                                                              \
        if (CHECK && __builtin_expect(!(s <= 1.7976931348623157e308), 0)) { /* the whole item in double */ \
            s = 0.0;                                                                                      \
            i = 0;                                                                                        \
            DOUBLE_SUM(LOAD, TERM)                                                                        \
        }                                                                                                 \
        (void)p;                                                                                          \
        return s;                                                                                         \
    }

/* Count and max of halves on their bits: |x| orders like the integer (bits & 0x7fff), NaN is above INF. */
#define DEF_HCOUNT(NAME, INF) DEF_COUNT_BY(NAME, uint32_t, ((const uint16_t *)x)[k] & 0x7fffu, v != 0, v > INF)

#define DEF_HMAX(NAME, INF, LOAD)                                                                            \
    DC_CLONES static double NAME(const void *x, int64_t n, double p) {                                     \
        const uint16_t *h = (const uint16_t *)x;                                                          \
        uint16_t mx[LANES] = {0};                                                                         \
        int64_t i = 0;                                                                                    \
        for (; i + LANES <= n; i += LANES)                                                                \
            for (int j = 0; j < LANES; j++) {                                                             \
                uint16_t m = h[i + j] & 0x7fffu;                                                          \
                mx[j] = m > mx[j] ? m : mx[j];                                                            \
            }                                                                                             \
        uint16_t m = 0;                                                                                   \
        for (; i < n; i++) {                                                                              \
            uint16_t v = h[i] & 0x7fffu;                                                                  \
            m = v > m ? v : m;                                                                            \
        }                                                                                                 \
        for (int j = 0; j < LANES; j++) m = mx[j] > m ? mx[j] : m;                                        \
        (void)p;                                                                                          \
        return m > INF ? NAN : (double)LOAD(&m, 0);                                                       \
    }

#define DEF_ALL(SUFFIX, LOAD)                                                                                \
    DEF_COUNT(count_##SUFFIX, LOAD)                                                                        \
    DEF_BSUM(p1_##SUFFIX, LOAD, a, 1, FBLOCK)                                                              \
    DEF_BSUM(p2_##SUFFIX, LOAD, a * a, 1, FBLOCK)                                                          \
    DEF_BSUM(p3_##SUFFIX, LOAD, a * a * a, 1, FBLOCK)                                                      \
    DEF_SUM(pow_##SUFFIX, LOAD, pow_pos(a, p))                                                             \
    DEF_MAX(max_##SUFFIX, LOAD)                                                                            \
    DEF_SUM(p2x_##SUFFIX, LOAD, a * a)                                                                     \
    DEF_SUM(p3x_##SUFFIX, LOAD, a * a * a)

#define DEF_HALF(SUFFIX, LOAD, INF, CHECK)                                                                   \
    DEF_HCOUNT(count_##SUFFIX, INF)                                                                        \
    DEF_BSUM(p1_##SUFFIX, LOAD, a, CHECK, HBLOCK)                                                          \
    DEF_BSUM(p2_##SUFFIX, LOAD, a * a, CHECK, HBLOCK)                                                      \
    DEF_BSUM(p3_##SUFFIX, LOAD, a * a * a, CHECK, HBLOCK)                                                  \
    DEF_SUM(pow_##SUFFIX, LOAD, pow_pos(a, p))                                                             \
    DEF_HMAX(max_##SUFFIX, INF, LOAD)                                                                      \
    DEF_SUM(p2x_##SUFFIX, LOAD, a * a)                                                                     \
    DEF_SUM(p3x_##SUFFIX, LOAD, a * a * a)

DEF_ALL(f32, abs_f32)
DEF_HALF(bf16, abs_bf16, 0x7f80u, 1)
DEF_HALF(f16, abs_f16, 0x7c00u, 0)

typedef double (*item_fn)(const void *, int64_t, double);

#if defined(__x86_64__) && !defined(DC_NO_CLONES)
#include <immintrin.h>
/* fp16 with F16C: gcc does not vectorise _Float16 -> float, and the integer decode above costs about an
 * instruction per element; vcvtph2ps converts 8 per instruction. Blocks of 16 as DEF_BSUM at HBLOCK (no checks
 * are needed: fp16 powers up to 3 cannot overflow or underflow float). Chosen at run time in pick(). */
#define DEF_F16C(NAME, TERM)                                                                                 \
    __attribute__((target("avx2,fma,f16c"))) static double NAME(const void *x, int64_t n, double p) {       \
        const uint16_t *h = (const uint16_t *)x;                                                          \
        const __m256 mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));                          \
        __m256d d0 = _mm256_setzero_pd(), d1 = d0, d2 = d0, d3 = d0, d4 = d0, d5 = d0, d6 = d0, d7 = d0;    \
        int64_t i = 0;                                                                                    \
        for (; i + 512 <= n; i += 512) {                                                                  \
            __m256 f0 = _mm256_setzero_ps(), f1 = f0, f2 = f0, f3 = f0;                                   \
            for (int r = 0; r < 512; r += 32) {                                                           \
                __m256 a0 = _mm256_and_ps(mask, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(h + i + r)))); \
                __m256 a1 = _mm256_and_ps(mask, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(h + i + r + 8)))); \
                __m256 a2 = _mm256_and_ps(mask, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(h + i + r + 16)))); \
                __m256 a3 = _mm256_and_ps(mask, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(h + i + r + 24)))); \
                TERM(f0, a0);                                                                             \
                TERM(f1, a1);                                                                             \
                TERM(f2, a2);                                                                             \
                TERM(f3, a3);                                                                             \
            }                                                                                             \
            d0 = _mm256_add_pd(d0, _mm256_cvtps_pd(_mm256_castps256_ps128(f0)));                          \
            d1 = _mm256_add_pd(d1, _mm256_cvtps_pd(_mm256_extractf128_ps(f0, 1)));                        \
            d2 = _mm256_add_pd(d2, _mm256_cvtps_pd(_mm256_castps256_ps128(f1)));                          \
            d3 = _mm256_add_pd(d3, _mm256_cvtps_pd(_mm256_extractf128_ps(f1, 1)));                        \
            d4 = _mm256_add_pd(d4, _mm256_cvtps_pd(_mm256_castps256_ps128(f2)));                          \
            d5 = _mm256_add_pd(d5, _mm256_cvtps_pd(_mm256_extractf128_ps(f2, 1)));                        \
            d6 = _mm256_add_pd(d6, _mm256_cvtps_pd(_mm256_castps256_ps128(f3)));                          \
            d7 = _mm256_add_pd(d7, _mm256_cvtps_pd(_mm256_extractf128_ps(f3, 1)));                        \
        }                                                                                                 \
        __m256d d = _mm256_add_pd(_mm256_add_pd(_mm256_add_pd(d0, d1), _mm256_add_pd(d2, d3)),              \
                                  _mm256_add_pd(_mm256_add_pd(d4, d5), _mm256_add_pd(d6, d7)));             \
        double lanes[4];                                                                                  \
        _mm256_storeu_pd(lanes, d);                                                                       \
        double s = (lanes[0] + lanes[1]) + (lanes[2] + lanes[3]);                                         \
        (void)p;                                                                                          \
        return s + tail_##NAME(h + i, n - i);                                                             \
    }
#define T1(f, a) f = _mm256_add_ps(f, a)
#define T2(f, a) f = _mm256_fmadd_ps(a, a, f)
#define T3(f, a) f = _mm256_fmadd_ps(_mm256_mul_ps(a, a), a, f)
static double tail_p1_f16c(const uint16_t *h, int64_t n) {
    double s = 0;
    for (int64_t i = 0; i < n; i++) s += (double)abs_f16(h, i);
    return s;
}
static double tail_p2_f16c(const uint16_t *h, int64_t n) {
    double s = 0;
    for (int64_t i = 0; i < n; i++) {
        double a = abs_f16(h, i);
        s += a * a;
    }
    return s;
}
static double tail_p3_f16c(const uint16_t *h, int64_t n) {
    double s = 0;
    for (int64_t i = 0; i < n; i++) {
        double a = abs_f16(h, i);
        s += a * a * a;
    }
    return s;
}
DEF_F16C(p1_f16c, T1)
DEF_F16C(p2_f16c, T2)
DEF_F16C(p3_f16c, T3)
#define HAVE_F16C_KERNELS 1
#endif

static item_fn pick(int dtype, int op) {
    static const item_fn table[3][6] = {
        {count_f32, p1_f32, p2_f32, p3_f32, pow_f32, max_f32},
        {count_bf16, p1_bf16, p2_bf16, p3_bf16, pow_bf16, max_bf16},
        {count_f16, p1_f16, p2_f16, p3_f16, pow_f16, max_f16},
    };
    if (dtype < 0 || dtype > 2 || op < 0 || op > 5) return 0;
#ifdef HAVE_F16C_KERNELS
    if (dtype == DT_F16 && op >= OP_P1 && op <= OP_P3 && __builtin_cpu_supports("avx2") &&
        __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"))
        return op == OP_P1 ? p1_f16c : (op == OP_P2 ? p2_f16c : p3_f16c);
#endif
    return table[dtype][op];
}

static int elem_size(int dtype) { return dtype == DT_F32 ? 4 : 2; }

/* Version of this interface, checked by the loader. */
int dc_version(void) { return 3; }

/* The work items of n contiguous tensors: each tensor cut into runs of at most `item` elements. Sets *nitems
 * and *total (elements); when *nitems > 0, *owner and *start (malloc'd, the caller frees them) hold the tensor
 * and first element of each item, in order. Returns 0, or -1 on a negative numel or no memory. */
static int split_items(int64_t n, const int64_t *numels, int64_t item, int64_t *nitems, int64_t *total,
                       int64_t **owner, int64_t **start) {
    int64_t count = 0, sum = 0;
    for (int64_t t = 0; t < n; t++) {
        if (numels[t] < 0) return -1;
        count += (numels[t] + item - 1) / item;
        sum += numels[t];
    }
    *nitems = count, *total = sum, *owner = 0, *start = 0;
    if (count == 0) return 0;
    *owner = (int64_t *)malloc((size_t)count * sizeof(int64_t));
    *start = (int64_t *)malloc((size_t)count * sizeof(int64_t));
    if (!*owner || !*start) {
        free(*owner), free(*start);
        return -1;
    }
    int64_t k = 0;
    for (int64_t t = 0; t < n; t++)
        for (int64_t s = 0; s < numels[t]; s += item) (*owner)[k] = t, (*start)[k] = s, k++;
    return 0;
}

/* out[t] = partial of order p of tensor t (sum of |x|**p, count of non-zeros, or max |x|), in double.
 * ptrs/numels describe n contiguous tensors of one dtype. Returns 0, or -1 on bad arguments or no memory. */
int dc_partials(int dtype, int op, double p, int64_t n, const int64_t *ptrs, const int64_t *numels,
                double *out, int nthreads) {
    item_fn fn = pick(dtype, op);
    if (!fn || n < 0) return -1;
    const int es = elem_size(dtype);
    const int64_t ITEM = ITEM_BYTES / es;
    int64_t nitems, total, *owner, *start;
    if (split_items(n, numels, ITEM, &nitems, &total, &owner, &start)) return -1;
    for (int64_t t = 0; t < n; t++) out[t] = 0.0;
    if (nitems == 0) return 0;
    double *part = (double *)malloc((size_t)nitems * sizeof(double));
    if (!part) {
        free(owner), free(start);
        return -1;
    }
#ifdef _OPENMP
    int nt = nthreads > 0 ? nthreads : 1;
    if (total < PARALLEL_MIN || nitems < 2) nt = 1;
#pragma omp parallel for schedule(dynamic, 1) num_threads(nt) if (nt > 1)
#endif
    for (int64_t i = 0; i < nitems; i++) {
        int64_t t = owner[i], s = start[i];
        int64_t len = numels[t] - s < ITEM ? numels[t] - s : ITEM;
        part[i] = fn((const char *)(intptr_t)ptrs[t] + s * es, len, p);
    }
    (void)nthreads;
    for (int64_t i = 0; i < nitems; i++) {
        double *o = &out[owner[i]];
        if (op == OP_MAX)
            *o = (part[i] != part[i] || *o != *o) ? NAN : (part[i] > *o ? part[i] : *o);
        else
            *o += part[i];
    }
    free(owner), free(start), free(part);
    if ((dtype == DT_BF16 || dtype == DT_F32) && (op == OP_P2 || op == OP_P3)) {
        /* fp32 and bf16 span float32's exponent range: float squares and cubes of tiny values underflow
         * (absolute error below 2**-126 a term, flush-to-zero included). That is negligible unless the whole
         * partial is tiny: then sum the tensor again in double, exactly (all-zero tensors land here too). */
        item_fn exact = dtype == DT_F32 ? (op == OP_P2 ? p2x_f32 : p3x_f32) : (op == OP_P2 ? p2x_bf16 : p3x_bf16);
        for (int64_t t = 0; t < n; t++)
            if (out[t] < (double)numels[t] * 0x1p-103) out[t] = exact((const void *)(intptr_t)ptrs[t], numels[t], p);
    }
    return 0;
}

/* ---- scaling: y = x * c in the tensor's own dtype, rounded as torch's mul_ rounds; y == x in place -------- */

DC_CLONES static void scale_f32(const void *x, void *y, int64_t n, float c) {
    const float *f = (const float *)x;
    float *o = (float *)y;
    for (int64_t i = 0; i < n; i++) o[i] = f[i] * c;
}

/* float -> bf16, round to nearest even, and NaN -> 0xffff: bit for bit what torch's vectorised CPU mul_ writes. */
DC_CLONES static void scale_bf16(const void *x, void *y, int64_t n, float c) {
    const uint16_t *h = (const uint16_t *)x;
    uint16_t *o = (uint16_t *)y;
    for (int64_t i = 0; i < n; i++) {
        uint32_t u = (uint32_t)h[i] << 16;
        float f;
        memcpy(&f, &u, 4);
        f *= c;
        memcpy(&u, &f, 4);
        uint32_t r = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
        o[i] = (uint16_t)(f != f ? 0xffffu : r);
    }
}

#ifdef HAVE_F16C_KERNELS
__attribute__((target("avx2,f16c"))) static void scale_f16c(const void *x, void *y, int64_t n, float c) {
    const uint16_t *h = (const uint16_t *)x;
    uint16_t *o = (uint16_t *)y;
    const __m256 cv = _mm256_set1_ps(c);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256 f = _mm256_mul_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(h + i))), cv);
        _mm_storeu_si128((__m128i *)(o + i), _mm256_cvtps_ph(f, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    }
    if (i < n) { /* the tail through an 8-wide scratch: same instructions, same rounding */
        uint16_t tmp[8] = {0};
        memcpy(tmp, h + i, (size_t)(n - i) * 2);
        __m256 f = _mm256_mul_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)tmp)), cv);
        _mm_storeu_si128((__m128i *)tmp, _mm256_cvtps_ph(f, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
        memcpy(o + i, tmp, (size_t)(n - i) * 2);
    }
}
#endif

typedef void (*scale_fn)(const void *, void *, int64_t, float);

typedef struct {
    int64_t lo, hi; /* byte range [lo, hi) */
} byte_range;

static int by_start(const void *a, const void *b) {
    int64_t x = ((const byte_range *)a)->lo, y = ((const byte_range *)b)->lo;
    return (x > y) - (x < y);
}

/* Whether any two of the n contiguous tensors share a byte: 1 or 0; -1 when out of memory. */
static int ranges_overlap(int64_t n, const int64_t *ptrs, const int64_t *numels, int es) {
    byte_range *r = (byte_range *)malloc((size_t)n * sizeof(byte_range));
    if (!r) return -1;
    int64_t m = 0;
    for (int64_t t = 0; t < n; t++)
        if (numels[t] > 0) r[m].lo = ptrs[t], r[m].hi = ptrs[t] + numels[t] * es, m++;
    qsort(r, (size_t)m, sizeof(byte_range), by_start);
    int hit = 0;
    for (int64_t t = 1; t < m && !hit; t++) hit = r[t].lo < r[t - 1].hi;
    free(r);
    return hit;
}

/* Write n contiguous tensors of one dtype, multiplied by c, to dsts (dsts == ptrs: in place; or the places of
 * the pieces in one flat buffer: a scaled flatten in one pass). Returns 0; -2 when this build cannot scale the
 * dtype exactly as torch does (fp16 without F16C: the caller keeps torch's own kernel); -1 on bad arguments. */
int dc_scale_to(int dtype, int64_t n, const int64_t *ptrs, const int64_t *dsts, const int64_t *numels, float c,
                int nthreads) {
    scale_fn fn = dtype == DT_F32 ? scale_f32 : (dtype == DT_BF16 ? scale_bf16 : 0);
#ifdef HAVE_F16C_KERNELS
    if (dtype == DT_F16 && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c")) fn = scale_f16c;
#endif
    if (dtype == DT_F16 && !fn) return -2;
    if (!fn || n < 0) return -1;
    const int es = elem_size(dtype);
    const int64_t ITEM = ITEM_BYTES / es;
    int64_t total = 0;
    for (int64_t t = 0; t < n; t++) {
        if (numels[t] < 0) return -1;
        total += numels[t];
    }
    if (total == 0) return 0;
    int serial = total < PARALLEL_MIN || nthreads <= 1;
    /* Checked only where the items would run in parallel: a sort per call cost 3-7x on 1000 small tensors. */
    int overlap = !serial && dsts == ptrs && n > 1 ? ranges_overlap(n, ptrs, numels, elem_size(dtype)) : 0;
    if (overlap < 0) return -1;
    if (serial || overlap) {
        /* In place on overlapping tensors (views sharing elements): one after the other, as torch's mul_ on each
         * in turn, so a shared element is scaled once per tensor; in parallel two items raced on it. */
        for (int64_t t = 0; t < n; t++) fn((const char *)(intptr_t)ptrs[t], (char *)(intptr_t)dsts[t], numels[t], c);
        return 0;
    }
    int64_t nitems, *owner, *start;
    if (split_items(n, numels, ITEM, &nitems, &total, &owner, &start)) return -1;
#ifdef _OPENMP
#pragma omp parallel for schedule(dynamic, 1) num_threads(nthreads)
#endif
    for (int64_t i = 0; i < nitems; i++) {
        int64_t t = owner[i], s = start[i];
        int64_t len = numels[t] - s < ITEM ? numels[t] - s : ITEM;
        fn((const char *)(intptr_t)ptrs[t] + s * es, (char *)(intptr_t)dsts[t] + s * es, len, c);
    }
    free(owner), free(start);
    return 0;
}

int dc_scale(int dtype, int64_t n, const int64_t *ptrs, const int64_t *numels, float c, int nthreads) {
    return dc_scale_to(dtype, n, ptrs, ptrs, numels, c, nthreads);
}
