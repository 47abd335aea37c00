/*
 * Native CPU kernels of the fused path: one pass over every parameter of a
 * param group per optimizer step. Built and loaded by optimizers/_native.py.
 *
 * Each exported function, e.g. cadam_bfloat16, updates n tensors of one dtype:
 *
 *     void cadam_bfloat16(int64_t n, const int64_t *numel, void *const *ptrs,
 *                         const double *k, int threads);
 *
 * ptrs holds, per tensor, the data pointers of q (the parameter), g (its
 * gradient) and the optimizer's state tensors in the order of its state_names,
 * all dense with one and the same layout, so that element i of each is at
 * index i. k is the optimizer's coefficient tuple (its _coefficients(group), a
 * named tuple), indexed by constants named after the kernel and the field:
 * CD_TWO_C_H is the index of CD's two_c_h. optimizers/_native.py generates them
 * from the tuples' fields at build time (-D flags), so the order is stated once,
 * in Python, where every value is computed. The elements of all n tensors are
 * split into `threads` contiguous, equal ranges, one per OpenMP thread: one
 * parallel region per call, whatever the number of tensors.
 *
 * The arithmetic is that of the optimizer's _update in the same order, sub-step
 * by sub-step (the macros below are optimizers/_base.py's single-tensor
 * sub-steps), with two differences, both within a rounding:
 *   - bfloat16 and float16 elements are computed in float and rounded once,
 *     on the store (the eager paths round after every sub-step); float64 in double;
 *   - in float, 2^x is exp2_float below (at most 0.89 ulp from the exact value,
 *     against Sleef's 1 ulp in PyTorch's exp2), because Sleef's is not
 *     available here and libm's exp2f does not vectorise. It is what makes
 *     iKFAD, two exponentials per element, as fast as Adam.
 * The compiler may contract a*b + c into a fused multiply-add, as Inductor's
 * kernels do; float64 results agree with the eager paths to about 1e-15.
 */
#include <math.h>
#include <stdint.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#define DAMPED_API __attribute__((visibility("default")))

#ifndef CD_TWO_C_H
#error "build with optimizers/_native.py: it defines the coefficient indices (CD_TWO_C_H, ...)"
#endif

/* Below this many elements per thread, waking another thread costs more than it saves. */
#define MIN_ELEMENTS_PER_THREAD 16384

/* --------------------------------------------------------------------------
 * 2^x in float: x = n + f with n an integer and |f| <= 1/2; 2^f by a degree-6
 * polynomial (a near-minimax fit, relative error 4e-9 in exact arithmetic),
 * 2^n written into the exponent bits. At most 0.89 ulp from the exact value
 * for x in [-126, 127] (checked against every third float there); exactly 1
 * at x = 0; NaN for NaN. Below -126.5 it is 0, where the exact value is a
 * subnormal under 1.2e-38 (friction factors that small leave p at 0 either
 * way); from 127.5 up it is inf. NaN in, NaN out. No branch, so that the
 * loops around it vectorise.
 *
 * The clamp bounds are arguments, which the kernels read from the volatile
 * variables below, rather than literals: with literal bounds GCC folds the
 * polynomial at the bounds and rewrites each clamp as compares and blends after
 * it, which made iKFAD's AVX2 loop 30% slower; opaque bounds keep each clamp
 * one max and one min instruction (which pass a NaN through).
 * -------------------------------------------------------------------------- */
static volatile float exp2_lower_bound = -127.0f, exp2_upper_bound = 128.0f;

static inline float exp2_float(float x, float lower, float upper) {
    const float shifter = 12582912.0f; /* 1.5 * 2^23: adding it rounds to an integer */
    float y = x < lower ? lower : x;
    y = y > upper ? upper : y;
    union { float f; int32_t i; } t = { y + shifter };
    float f = y - (t.f - shifter);             /* in [-1/2, 1/2] */
    int32_t biased = t.i - (0x4B400000 - 127); /* n + 127, from the shifted value's low bits */
    float r = 1.5084365e-4f;
    r = r * f + 1.3395548e-3f;
    r = r * f + 9.6194297e-3f;
    r = r * f + 5.5503421e-2f;
    r = r * f + 2.4022639e-1f;
    r = r * f + 6.9314718e-1f;
    r = r * f + 1.0f;
    union { int32_t i; float f; } scale = { biased << 23 }; /* 2^n; 0 for n = -127, inf for n = 128 */
    return r * scale.f;
}

static inline double exp2_double(double x, float lower, float upper) {
    (void)lower, (void)upper;
    return exp2(x);
}

#define SQRT(x) _Generic((x), float: sqrtf, double: sqrt)(x)
/* EXP2 needs exp2_lower and exp2_upper in scope: the clamp bounds, read once per loop. */
#define EXP2(x) _Generic((x), float: exp2_float, double: exp2_double)((x), exp2_lower, exp2_upper)
#define LOG2E 1.4426950408889634 /* exp(x) = 2^(x log2 e) */

/* --------------------------------------------------------------------------
 * Sub-steps: optimizers/_base.py's functions of the same names, each the exact
 * flow of one piece of the vector field over one time step h.
 * -------------------------------------------------------------------------- */
#define kick(p, g, step) ((p) + (step) * (g))               /* p' = -g: step = -h (+h to maximize) */
#define drift(q, p, step) ((q) + (step) * (p))              /* q' = p: step = lr h */
#define scale(x, factor) ((x) * (factor))                   /* x' = -k x, factor = exp(-k h) */
#define cubic_damping(p, two_c_h) ((p) / SQRT((p) * (p) * (two_c_h) + 1)) /* p' = -c p^3 */
#define relax(x, s, decay, weight) ((x) * (decay) + (weight) * (s) * (s)) /* x' = w' s^2 - a x */
#define friction(p, xi, minus_h_log2e) ((p) * EXP2((xi) * (minus_h_log2e))) /* p' = -xi p */
#define preconditioned_drift(q, p, zeta, step, eps) ((q) + (step) * (p) / (SQRT(zeta) + (eps)))

/* --------------------------------------------------------------------------
 * Storage dtypes: DT_t is the element, DT_acc the type computed in,
 * DT_load/DT_save convert between them.
 * -------------------------------------------------------------------------- */
typedef float float32_t;
typedef float float32_acc;
static inline float float32_load(const float *x, int64_t i) { return x[i]; }
static inline void float32_save(float *x, int64_t i, float v) { x[i] = v; }

typedef double float64_t;
typedef double float64_acc;
static inline double float64_load(const double *x, int64_t i) { return x[i]; }
static inline void float64_save(double *x, int64_t i, double v) { x[i] = v; }

/* bfloat16: the upper half of a float; stored rounded to nearest, ties to even. */
typedef uint16_t bfloat16_t;
typedef float bfloat16_acc;
static inline float bfloat16_load(const uint16_t *x, int64_t i) {
    union { uint32_t u; float f; } v = { (uint32_t)x[i] << 16 };
    return v.f;
}
static inline void bfloat16_save(uint16_t *x, int64_t i, float value) {
    union { float f; uint32_t u; } v = { value };
    uint32_t rounded = (v.u + 0x7FFFu + ((v.u >> 16) & 1u)) >> 16;
    uint32_t nan = (v.u >> 16) | 0x0040u; /* a quiet NaN keeps its sign */
    x[i] = (uint16_t)((v.u & 0x7FFFFFFFu) > 0x7F800000u ? nan : rounded);
}

#ifdef __FLT16_MANT_DIG__ /* the compiler has _Float16 (GCC >= 12, Clang >= 15 on x86-64; AArch64) */
typedef _Float16 float16_t;
typedef float float16_acc;
static inline float float16_load(const _Float16 *x, int64_t i) { return (float)x[i]; }
static inline void float16_save(_Float16 *x, int64_t i, float v) { x[i] = (_Float16)v; }
#define WITH_FLOAT16(KERNEL) KERNEL(float16)
#else
#define WITH_FLOAT16(KERNEL)
#endif

#define ALL_DTYPES(KERNEL) KERNEL(float32) KERNEL(float64) KERNEL(bfloat16) WITH_FLOAT16(KERNEL)

/* --------------------------------------------------------------------------
 * The driver: split the elements of all tensors into equal contiguous ranges,
 * one per thread; each thread updates the pieces of tensors in its range.
 * -------------------------------------------------------------------------- */
typedef void (*segment_fn)(int64_t lo, int64_t hi, void *const *tensor, const double *k);

static void run(segment_fn segment, int width, int64_t n, const int64_t *numel, void *const *ptrs,
                const double *k, int threads) {
    int64_t total = 0;
    for (int64_t j = 0; j < n; j++) total += numel[j];
    if ((int64_t)threads * MIN_ELEMENTS_PER_THREAD > total) threads = (int)(total / MIN_ELEMENTS_PER_THREAD);
    if (threads < 1) threads = 1;
#pragma omp parallel num_threads(threads) if (threads > 1)
    {
        int64_t id = 0, count = 1;
#ifdef _OPENMP
        id = omp_get_thread_num();
        count = omp_get_num_threads();
#endif
        const int64_t lo = total / count * id + (total % count) * id / count;
        const int64_t hi = total / count * (id + 1) + (total % count) * (id + 1) / count;
        int64_t start = 0; /* index of tensor j's first element in the concatenation */
        for (int64_t j = 0; j < n && start < hi; start += numel[j], j++) {
            const int64_t a = lo > start ? lo - start : 0;
            const int64_t b = hi - start < numel[j] ? hi - start : numel[j];
            if (a < b) segment(a, b, ptrs + j * width, k);
        }
    }
}

#define EXPORT(OPT, DT, WIDTH)                                                                     \
    DAMPED_API void OPT##_##DT(int64_t n, const int64_t *numel, void *const *ptrs, const double *k, \
                               int threads) {                                                      \
        run(OPT##_##DT##_segment, WIDTH, n, numel, ptrs, k, threads);                              \
    }

/* --------------------------------------------------------------------------
 * The optimizers: each loop body is the optimizer's _update, in its order.
 * -------------------------------------------------------------------------- */

/* The four coefficients every optimizer takes first (optimizers/_base.py's MOTION):
 * the kick's step -h (+h to maximize), the drift's lr h, the weight decay's
 * exp(-lambda lr h) and the linear friction's exp(-gamma h). */
#define MOTION(OPT, DT)                                                                            \
    const DT##_acc kick_step = k[OPT##_KICK_STEP], drift_step = k[OPT##_DRIFT_STEP],               \
                   decay = k[OPT##_DECAY], linear = k[OPT##_LINEAR]

/* LDHD (optimizers/ldhd.py): k = LDHDCoefficients, the motion's four; state p. */
#define LDHD_KERNEL(DT)                                                                            \
    static void ldhd_##DT##_segment(int64_t lo, int64_t hi, void *const *t, const double *k) {     \
        DT##_t *restrict qs = t[0], *restrict ps = t[2];                                           \
        const DT##_t *restrict gs = t[1];                                                          \
        MOTION(LDHD, DT);                                                                          \
        for (int64_t i = lo; i < hi; i++) {                                                        \
            DT##_acc q = DT##_load(qs, i), g = DT##_load(gs, i), p = DT##_load(ps, i);             \
            q = scale(q, decay);                                                                   \
            p = kick(p, g, kick_step);                                                             \
            p = scale(p, linear);                                                                  \
            q = drift(q, p, drift_step);                                                           \
            DT##_save(qs, i, q);                                                                   \
            DT##_save(ps, i, p);                                                                   \
        }                                                                                          \
    }                                                                                              \
    EXPORT(ldhd, DT, 3)
ALL_DTYPES(LDHD_KERNEL)

/* CD (optimizers/cd.py): k = CDCoefficients, the motion's four and 2 c h; state p. */
#define CD_KERNEL(DT)                                                                              \
    static void cd_##DT##_segment(int64_t lo, int64_t hi, void *const *t, const double *k) {       \
        DT##_t *restrict qs = t[0], *restrict ps = t[2];                                           \
        const DT##_t *restrict gs = t[1];                                                          \
        MOTION(CD, DT);                                                                            \
        const DT##_acc two_c_h = k[CD_TWO_C_H];                                                    \
        for (int64_t i = lo; i < hi; i++) {                                                        \
            DT##_acc q = DT##_load(qs, i), g = DT##_load(gs, i), p = DT##_load(ps, i);             \
            q = scale(q, decay);                                                                   \
            p = kick(p, g, kick_step);                                                             \
            q = drift(q, p, drift_step);                                                           \
            p = cubic_damping(p, two_c_h);                                                         \
            p = scale(p, linear);                                                                  \
            DT##_save(qs, i, q);                                                                   \
            DT##_save(ps, i, p);                                                                   \
        }                                                                                          \
    }                                                                                              \
    EXPORT(cd, DT, 3)
ALL_DTYPES(CD_KERNEL)

/* iKFAD (optimizers/ikfad.py): k = iKFADCoefficients, the motion's four, -h/2, exp(-alpha h)
 * and (1 - exp(-alpha h)) / (alpha mu); state p, xi. friction's exponent is in base 2
 * (EXP2), so -h/2 is scaled by log2 e here, once per call. */
#define IKFAD_KERNEL(DT)                                                                           \
    static void ikfad_##DT##_segment(int64_t lo, int64_t hi, void *const *t, const double *k) {    \
        DT##_t *restrict qs = t[0], *restrict ps = t[2], *restrict xis = t[3];                     \
        const DT##_t *restrict gs = t[1];                                                          \
        MOTION(IKFAD, DT);                                                                         \
        const DT##_acc half_step = k[IKFAD_MINUS_HALF_H] * LOG2E,                                  \
                       relax_decay = k[IKFAD_RELAX_DECAY], source_weight = k[IKFAD_SOURCE_WEIGHT]; \
        const float exp2_lower = exp2_lower_bound, exp2_upper = exp2_upper_bound;                  \
        for (int64_t i = lo; i < hi; i++) {                                                        \
            DT##_acc q = DT##_load(qs, i), g = DT##_load(gs, i), p = DT##_load(ps, i);             \
            DT##_acc xi = DT##_load(xis, i);                                                       \
            q = scale(q, decay);                                                                   \
            p = kick(p, g, kick_step);                                                             \
            q = drift(q, p, drift_step);                                                           \
            p = friction(p, xi, half_step);                                                        \
            xi = relax(xi, p, relax_decay, source_weight);                                         \
            p = friction(p, xi, half_step);                                                        \
            p = scale(p, linear);                                                                  \
            DT##_save(qs, i, q);                                                                   \
            DT##_save(ps, i, p);                                                                   \
            DT##_save(xis, i, xi);                                                                 \
        }                                                                                          \
    }                                                                                              \
    EXPORT(ikfad, DT, 4)
ALL_DTYPES(IKFAD_KERNEL)

/* CADAM (optimizers/cadam.py): k = CADAMCoefficients, the motion's four, exp(-alpha h),
 * (1 - exp(-alpha h)) / alpha, 2 c h and eps; state p, zeta. */
#define CADAM_KERNEL(DT)                                                                           \
    static void cadam_##DT##_segment(int64_t lo, int64_t hi, void *const *t, const double *k) {    \
        DT##_t *restrict qs = t[0], *restrict ps = t[2], *restrict zetas = t[3];                   \
        const DT##_t *restrict gs = t[1];                                                          \
        MOTION(CADAM, DT);                                                                         \
        const DT##_acc relax_decay = k[CADAM_RELAX_DECAY], source_weight = k[CADAM_SOURCE_WEIGHT], \
                       two_c_h = k[CADAM_TWO_C_H], eps = k[CADAM_EPS];                             \
        for (int64_t i = lo; i < hi; i++) {                                                        \
            DT##_acc q = DT##_load(qs, i), g = DT##_load(gs, i), p = DT##_load(ps, i);             \
            DT##_acc zeta = DT##_load(zetas, i);                                                   \
            q = scale(q, decay);                                                                   \
            p = kick(p, g, kick_step);                                                             \
            zeta = relax(zeta, g, relax_decay, source_weight);                                     \
            q = preconditioned_drift(q, p, zeta, drift_step, eps);                                 \
            p = cubic_damping(p, two_c_h);                                                         \
            p = scale(p, linear);                                                                  \
            DT##_save(qs, i, q);                                                                   \
            DT##_save(ps, i, p);                                                                   \
            DT##_save(zetas, i, zeta);                                                             \
        }                                                                                          \
    }                                                                                              \
    EXPORT(cadam, DT, 4)
ALL_DTYPES(CADAM_KERNEL)
