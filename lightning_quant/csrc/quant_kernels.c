/* CPU kernels of the PACT activation, the DoReFa weight quantizer and DSQ (float32, contiguous), called through ctypes
 * by lightning_quant/functional/native.py inside the custom ops. One pass over memory each way (two for DoReFa, whose
 * second pass needs a reduction of the first). The arithmetic is the torch reference's, operation for operation, in
 * float32 and in the same order, built without fused multiply-add or fast-math, so every value is bit-identical to it
 * (tests/test_kernels.py), except DSQ's backward (see its section). Sums are `omp simd` reductions in float64, per
 * vector lane and thread, added in an order fixed by the thread count.
 */
#include <math.h>
#include <stdint.h>

/* Below this many elements (1 MiB of float32) one thread: waking the pool's sleeping threads costs tens of
 * microseconds on a busy or virtual machine, as long as a small weight's whole kernel. (Not an OpenMP `if` clause:
 * GCC does not vectorize the serial version it generates for it, which is then 3-4x slower.) */
#define PARALLEL_MIN 262144
#define LQ_THREADS(n, threads) ((n) < PARALLEL_MIN ? 1 : (threads))

/* PACT forward: q = round(clamp(x, 0, a) * scale) * step, and the code 0 (x < 0 or NaN), 1 (0 <= x < a), 2 (x >= a).
 * clamp propagates NaN like torch.clamp (both comparisons are false for NaN). */
void lq_pact_forward_f32(const float *x, float *q, int8_t *code, int64_t n, float a, float scale, float step,
                         int threads) {
#pragma omp parallel for num_threads(LQ_THREADS(n, threads)) schedule(static)
    for (int64_t i = 0; i < n; ++i) {
        float v = x[i];
        float y = v < 0.0f ? 0.0f : v;
        y = y > a ? a : y;
        q[i] = rintf(y * scale) * step; /* rintf rounds half to even, as torch.round */
        code[i] = (int8_t)(v >= a ? 2 : (v >= 0.0f ? 1 : 0));
    }
}

/* PACT backward: grad_x = g * (code == 1), and returns sum(g * (code == 2)) (the alpha gradient) in float64.
 * Products, not selects: g * 0 is NaN for an infinite g, as in torch. */
double lq_pact_backward_f32(const float *g, const int8_t *code, float *grad_x, int64_t n, int threads) {
    double total = 0.0;
#pragma omp parallel for simd num_threads(LQ_THREADS(n, threads)) schedule(static) reduction(+ : total)
    for (int64_t i = 0; i < n; ++i) {
        float gi = g[i];
        int8_t c = code[i];
        grad_x[i] = gi * (c == 1 ? 1.0f : 0.0f);
        total += (double)(gi * (c == 2 ? 1.0f : 0.0f));
    }
    return total;
}

/* DoReFa forward on t = tanh(w): m = max|t| (NaN if any t is NaN, like torch.max), d = 2 * max(m, tiny),
 * out = 2 * (round((t / d + 0.5) * levels) / levels) - 1. Writes m and d to one-element outputs. */
void lq_dorefa_forward_f32(const float *t, float *out, float *m_out, float *d_out, int64_t n, float levels, float tiny,
                           int threads) {
    float m = 0.0f;
    int64_t nans = 0;
#pragma omp parallel for simd num_threads(LQ_THREADS(n, threads)) schedule(static) reduction(max : m) \
    reduction(+ : nans)
    for (int64_t i = 0; i < n; ++i) {
        float v = fabsf(t[i]);
        nans += v != v;
        m = v > m ? v : m;
    }
    if (nans) m = NAN;
    float d = 2.0f * (m < tiny ? tiny : m); /* clamp_min keeps NaN */
#pragma omp parallel for simd num_threads(LQ_THREADS(n, threads)) schedule(static)
    for (int64_t i = 0; i < n; ++i) out[i] = 2.0f * (rintf((t[i] / d + 0.5f) * levels) / levels) - 1.0f;
    *m_out = m;
    *d_out = d;
}

/* DoReFa backward up to tanh (the caller applies tanh_backward): with g_r = ((g * 2) / levels) * levels,
 *   g_d   = sum(-g_r * ((t / d) / d))         (float64 accumulation, rounded to float32)
 *   g_m   = m >= tiny ? g_d * 2 : 0
 *   share = g_m / count(|t| == m)
 *   g_t   = g_r / d + (|t| == m ? share : 0) * sgn(t)      with sgn(NaN) = 0, as torch.sgn */
void lq_dorefa_backward_f32(const float *g, const float *t, float *g_t, int64_t n, float m, float d, float levels,
                            float tiny, int threads) {
    double total = 0.0;
    int64_t count = 0;
#pragma omp parallel for simd num_threads(LQ_THREADS(n, threads)) schedule(static) reduction(+ : total, count)
    for (int64_t i = 0; i < n; ++i) {
        float g_r = ((g[i] * 2.0f) / levels) * levels;
        total += (double)(-g_r * ((t[i] / d) / d));
        count += fabsf(t[i]) == m;
    }
    float g_d = (float)total;
    float g_m = m >= tiny ? g_d * 2.0f : 0.0f;
    float share = g_m / (float)count;
#pragma omp parallel for num_threads(LQ_THREADS(n, threads)) schedule(static)
    for (int64_t i = 0; i < n; ++i) {
        float ti = t[i];
        float g_r = ((g[i] * 2.0f) / levels) * levels;
        float sgn = ti > 0.0f ? 1.0f : (ti < 0.0f ? -1.0f : 0.0f);
        g_t[i] = g_r / d + (fabsf(ti) == m ? share : 0.0f) * sgn;
    }
}

/* ---------------------------------------------------------------------------------------------------- DSQ
 * DSQ (functional/dsq.py) for one range [lo, up_eff], bin width delta, nlev = 2^bits - 1 bins, after the activation it
 * replaces (pre: 0 none, 1 relu, 2 relu6). The forward is the reference's arithmetic, bit for bit. The backward needs
 * tanh; libm's does not vectorize and torch's (SLEEF) cannot be called from here, so lq_tanhf is its own (within 5 ulp;
 * torch's within 1), and constants are folded: its gradients agree with the reference to float32 rounding. */

/* The activation as a clip to [floor, ceil]: (-inf, inf) for none, (0, inf) for relu, (0, 6) for relu6. Branch-free,
 * so the loops vectorize; NaN passes through. */
static inline float lq_activation(float v, float floor_, float ceil_) {
    return v < floor_ ? floor_ : (v > ceil_ ? ceil_ : v);
}

/* tanh(z) as Eigen's float tanh: z * P(z^2) / Q(z^2), a rational minimax fit on [-7.9, 7.9] (where tanh rounds to
 * +-1 in float32 beyond), evaluated with fused multiply-adds; within a few ulp of torch.tanh on that interval. Without
 * Eigen's clamp to it: DSQ's argument c * y has |y| <= 0.5 and c <= log(2 / ALPHA_EPS - 1) = 14.5, so |z| <= 7.26,
 * and the clamp cost a tenth of the backward pass. */
static inline float lq_tanhf(float x) {
    float x2 = x * x;
    float p = fmaf(x2, -2.76076847742355e-16f, 2.00018790482477e-13f);
    p = fmaf(x2, p, -8.60467152213735e-11f);
    p = fmaf(x2, p, 5.12229709037114e-08f);
    p = fmaf(x2, p, 1.48572235717979e-05f);
    p = fmaf(x2, p, 6.37261928875436e-04f);
    p = fmaf(x2, p, 4.89352455891786e-03f);
    p = x * p;
    float q = fmaf(x2, 1.19825839466702e-06f, 1.18534705686654e-04f);
    q = fmaf(x2, q, 2.26843463243900e-03f);
    q = fmaf(x2, q, 4.89352518554385e-03f);
    return p / q;
}

/* Forward: r = activation(x); t = (min(max(r, lo), up_eff) - lo) / delta; idx = clamp(round(t), 0, nlev);
 * q = idx >= nlev ? up_eff : lo + idx * delta. The bounds are finite (the caller checks), so only r can be NaN. */
void lq_dsq_forward_f32(const float *x, float *q, int64_t n, float lo, float up_eff, float delta, int nlev, int pre,
                        int threads) {
    const float top = (float)nlev, floor_ = pre ? 0.0f : -INFINITY, ceil_ = pre == 2 ? 6.0f : INFINITY;
#pragma omp parallel for simd num_threads(LQ_THREADS(n, threads)) schedule(static)
    for (int64_t i = 0; i < n; ++i) {
        float r = lq_activation(x[i], floor_, ceil_);
        float m = r < lo ? lo : r; /* torch.maximum / minimum: NaN passes (both comparisons are false) */
        m = m > up_eff ? up_eff : m;
        float idx = rintf((m - lo) / delta);
        idx = idx < 0.0f ? 0.0f : (idx > top ? top : idx);
        q[i] = idx >= top ? up_eff : lo + idx * delta;
    }
}

/* Backward through the soft value with the bin held fixed (functional/dsq.py, `_soft` and `_dg_dc`): grad_x, and
 * sums[0] / sums[1] = the gradients of lo / up (sums[0] only if with_lower or alpha_mode), sums[2] = the sum of
 * go * dg/dc over the range (alpha_mode 1 or 2; else 0), which the caller scales by delta * dc/dalpha.
 *
 * dg/dc = g * (h(2 c y) - h(c)) / c with h(z) = z / sinh(z) (alpha_mode 1; `ratio` = h(c)), or its series in c
 * (alpha_mode 2, for c below the threshold where that difference cancels). h(2u) needs no sinh of its own:
 * sinh(2u) = 2 tanh(u) / sech^2(u), so h(2u) = u * sech^2(u) / tanh(u), from the tanh already computed.
 *
 * Constants are folded and multiply-adds fused where that costs an ulp (the backward is not bit-exact anyway; see
 * above); the division by delta stays (t - bin - 0.5 cancels at 8 bits and more). Each block of LQ_DSQ_BLOCK
 * elements sums its terms in float (a vectorized reduction; GCC's float64 one over the whole loop costs a fifth of
 * the pass) and the blocks add up in float64; the blocks are the same on any thread count.
 *
 * The loop body is a macro so that each activation and each case below compiles to its own loop with them as
 * constants, instead of one loop that tests them for every element. Points outside [lo, up_eff] (NaN
 * included) go through the same arithmetic on meaningless values (even inf and NaN), and every use of those values
 * is a select on `inside`, never a product, so none of it reaches a result. */
#define LQ_DSQ_BLOCK 2048

#define LQ_DSQ_BACKWARD_BODY(PRE, WITH_LOWER, ALPHA)                                                       \
    for (int64_t i = start; i < stop; ++i) {                                                               \
        float v = x[i], gv = go[i];                                                                        \
        float r = (PRE) == 0 ? v : lq_activation(v, 0.0f, (PRE) == 2 ? 6.0f : INFINITY);                    \
        int inside = r >= lo && r <= up_eff; /* false for NaN */                                           \
        float t = (r - lo) / delta;          /* >= 0 inside: the bin needs no lower clamp */                \
        float bin = floorf(t);                                                                             \
        bin = bin > last ? last : bin;                                                                     \
        float y = t - bin - 0.5f;                                                                          \
        float u = c * y;                                                                                   \
        float th = lq_tanhf(u);                                                                            \
        float sech2 = fmaf(-th, th, 1.0f);                                                                 \
        float g = th * k_g;                                                                                \
        float slope = sech2 * k_slope;                                                                     \
        float d_up = fmaf(t, 1.0f - slope, g - y) * inv_top;                                               \
        /* Where the activation passes its gradient, as torch's threshold_backward / hardtanh_backward select \
         * it (for relu, v = inf lies above the range anyway). */                                           \
        int passes = (PRE) == 0 || ((PRE) == 1 ? v > 0.0f : (v > 0.0f && v < 6.0f));                          \
        grad_x[i] = inside && passes ? gv * slope : 0.0f;                                                  \
        block_u += inside ? gv * d_up : (r > up_eff ? gv : 0.0f);                                          \
        if (WITH_LOWER) block_l += inside ? gv * ((1.0f - slope) - d_up) : (r < lo ? gv : 0.0f);           \
        if (ALPHA == 1) {                                                                                  \
            float h = th == 0.0f ? 1.0f : u * sech2 / th;                                                  \
            block_a += inside ? gv * (g * (h - ratio) * inv_c) : 0.0f;                                     \
        }                                                                                                  \
        if (ALPHA == 2) {                                                                                  \
            float y2 = y * y;                                                                              \
            float series = (1.0f - 4.0f * y2) * (1.0f / 6.0f) - c2 * (1.0f - 16.0f * y2 * y2) * (7.0f / 360.0f) \
                           + c4 * (1.0f - 64.0f * y2 * y2 * y2) * (31.0f / 15120.0f);                       \
            block_a += inside ? gv * (g * (c * series)) : 0.0f;                                            \
        }                                                                                                  \
    }

/* The learned-temperature loops always sum the lower bound's terms too: fewer loops to build, for a rarer case. */
#define LQ_DSQ_BACKWARD_LOOP(PRE)                                                                          \
    if (alpha_mode == 1) {                                                                                 \
        _Pragma("omp simd reduction(+ : block_l, block_u, block_a)") LQ_DSQ_BACKWARD_BODY(PRE, 1, 1)       \
    } else if (alpha_mode == 2) {                                                                          \
        _Pragma("omp simd reduction(+ : block_l, block_u, block_a)") LQ_DSQ_BACKWARD_BODY(PRE, 1, 2)       \
    } else if (with_lower) {                                                                               \
        _Pragma("omp simd reduction(+ : block_l, block_u)") LQ_DSQ_BACKWARD_BODY(PRE, 1, 0)                \
    } else {                                                                                               \
        _Pragma("omp simd reduction(+ : block_u)") LQ_DSQ_BACKWARD_BODY(PRE, 0, 0)                         \
    }

void lq_dsq_backward_f32(const float *x, const float *go, float *grad_x, double *sums, int64_t n, float lo,
                         float up_eff, float delta, int nlev, float c, float half_tanh, int pre, int with_lower,
                         int alpha_mode, float ratio, int threads) {
    const float last = (float)(nlev - 1), inv_top = 1.0f / (float)nlev;
    const float k_g = 0.5f / half_tanh, k_slope = 0.5f * c / half_tanh;
    const float inv_c = 1.0f / c, c2 = c * c, c4 = c2 * c2;
    const int64_t blocks = (n + LQ_DSQ_BLOCK - 1) / LQ_DSQ_BLOCK;
    double sum_l = 0.0, sum_u = 0.0, sum_a = 0.0;
#pragma omp parallel for num_threads(LQ_THREADS(n, threads)) schedule(static) reduction(+ : sum_l, sum_u, sum_a)
    for (int64_t b = 0; b < blocks; ++b) {
        const int64_t start = b * LQ_DSQ_BLOCK, stop = start + LQ_DSQ_BLOCK < n ? start + LQ_DSQ_BLOCK : n;
        float block_l = 0.0f, block_u = 0.0f, block_a = 0.0f;
        if (pre == 0) {
            LQ_DSQ_BACKWARD_LOOP(0)
        } else if (pre == 1) {
            LQ_DSQ_BACKWARD_LOOP(1)
        } else {
            LQ_DSQ_BACKWARD_LOOP(2)
        }
        sum_l += block_l;
        sum_u += block_u;
        sum_a += block_a;
    }
    sums[0] = sum_l;
    sums[1] = sum_u;
    sums[2] = sum_a;
}
