/*
 * The non-GEMM operations of a decode step, fused (part of the glmkit.kernels._qgemm extension).
 *
 * Why: with the quantized GEMMs at the memory bandwidth, a ChatGLM3-6B INT4 decode step on 2 cores spent
 * ~30 of ~185 ms in ~60 small PyTorch ops per layer (norm, rotary, cache write, fp16 -> fp32 of the cache,
 * attention, SiLU * up, residual adds), each a few microseconds of dispatch on one thread.  These calls
 * replace them; glmkit/engine/fast_decode.py strings them together with the GEMMs.  fp32 activations.
 *
 *   rmsnorm(x, res, w, out, rows, n, eps):  per row of n: x += res (when res is given; x is the residual
 *                                     stream, updated in place), out = w * (x * rsqrt(mean(x^2) + eps))  -- fp32
 *   layernorm(x, res, w, b, out, rows, n, eps, alpha):  per row: x += res (when given), out = LayerNorm(x) * w
 *                                     + b; then, when alpha != 0, x = alpha * out (ChatGLM-6B's residual stream
 *                                     carries the normalised input scaled by alpha: x' = alpha * LN(x) + f(LN(x)))
 *   attend_ex(q, k, v, cos1, sin1, cos2, sin2, kc, vc, ks, vs, y, H, G, D, R, interleaved, qs, kvs, pos, kv_len,
 *             cache_stride, mode):  one token's attention.  Query head h at q + h*qs, key/value group g at
 *       k / v + g*kvs (fp32; [q | k | v] has qs = kvs = D, ChatGLM-6B's per-head [q, k, v] 3D).
 *       mode & 1 (write): rotary on the first R dims of every q and k head with cos1/sin1 [R/2] (the table row
 *       of the position), in interleaved pairs (x0, x1), (x2, x3)... or halves (rotate_half); with cos2/sin2
 *       (2D rotary, ChatGLM-6B) dims [R, 2R) too with those; q and k are modified in place; k and v are stored
 *       in the cache at position `pos` (cache [G][cache_stride / D][D], kc / vc = row 0 of the batch): fp16
 *       (ks = vs = 0) or int8 with one fp32 scale per position and group (ks / vs [G][cache_stride / D]:
 *       s = max|x| / 127, q = round(x / s)).  mode & 2 (attend): each query head h attends over cache positions
 *       [0, kv_len) of its group g = h / (H / G) with scale 1/sqrt(D): y [H*D] fp32 = softmax(q k^T / sqrt(D)) v,
 *       the keys and values read back from the cache as the PyTorch path does.  A bidirectional context
 *       (ChatGLM-6B's prompt) writes all its tokens first (mode 1), then attends (mode 2) with kv_len = the
 *       context; a causal token does both (mode 3) with kv_len = pos + 1.
 *       The query heads of a group share each key and value read (GQA: ChatGLM3's 16 heads per group read it
 *       from L1 after the first); the (group, key range) pieces are split over the kernels' thread pool when
 *       the context is long enough to pay, each piece with its own softmax maximum and sum, merged after.
 *   attend(qkv, cos, sin, kc, vc, y, H, G, D, R, interleaved, pos, kv_len, cache_stride): attend_ex of a
 *       [q | k | v] row with 1D rotary and an fp16 cache, mode 3.
 *   swiglu(h, out, rows, F):          out[r, i] = silu(h[r, i]) * h[r, F + i]    -- fp32 [rows, 2F] -> [rows, F]
 *   gelu(h, out, rows, F):            out = gelu_tanh(h) = h * sigmoid(2 sqrt(2/pi) (h + 0.044715 h^3)) (which is
 *                                     0.5 h (1 + tanh(...)) as torch's approximate="tanh")  -- fp32 [rows, F]
 *
 * Each has an AVX2/FMA/F16C version and a portable scalar one (the same arithmetic up to summation order and
 * the exp approximation: a Cody-Waite range reduction and a degree-6 polynomial, relative error ~2e-7).
 */
#include "qgemm_internal.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>

#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__)) && !defined(QG_FORCE_PORTABLE)
#define DO_X86 1
#include <immintrin.h>
#define DO_TARGET __attribute__((target("avx2,fma,f16c")))
#else
#define DO_X86 0
#endif

/* ================================================================================================= */
/* fp32 -> fp16, portable (round to nearest even, as PyTorch's .to(torch.float16)); the other way:   */
/* qg_half_to_float from qgemm.c                                                                       */
/* ================================================================================================= */
static uint16_t f2h(float value) {
    uint32_t f;
    memcpy(&f, &value, 4);
    const uint32_t sign = f & 0x80000000u;
    f ^= sign;
    uint16_t o;
    if (f >= 0x47800000u) {                                        /* >= 65536, inf or nan */
        o = f > 0x7f800000u ? 0x7e00 : 0x7c00;
    } else if (f < 0x38800000u) {                                  /* below 2^-14: subnormal or zero */
        /* adding 0.5 (exponent so that one fp16 subnormal ulp = one fp32 ulp) rounds to nearest even */
        float t, magic = 0.5f;
        memcpy(&t, &f, 4);
        t += magic;
        uint32_t u;
        memcpy(&u, &t, 4);
        o = (uint16_t)(u - 0x3f000000u);
    } else {
        const uint32_t odd = (f >> 13) & 1;
        f += 0xc8000fffu + odd;                                    /* rebias the exponent (-112 << 23), round */
        o = (uint16_t)(f >> 13);                                   /* overflow into inf is the right result */
    }
    return (uint16_t)(o | (sign >> 16));
}

/* ================================================================================================= */
/* Scalar versions                                                                                      */
/* ================================================================================================= */
static void rmsnorm_scalar(float *x, const float *res, const float *w, float *out, long n, float eps) {
    double ss = 0;
    for (long i = 0; i < n; i++) {
        if (res) x[i] += res[i];
        ss += (double)x[i] * x[i];
    }
    const float inv = 1.0f / sqrtf((float)(ss / (double)n) + eps);
    for (long i = 0; i < n; i++) out[i] = w[i] * (x[i] * inv);
}

static float silu_mul(float g, float u) { return g / (1.0f + expf(-g)) * u; }

static void swiglu_scalar(const float *h, float *out, long F) {
    for (long i = 0; i < F; i++) out[i] = silu_mul(h[i], h[F + i]);
}

static void rope_head(float *x, const float *cos, const float *sin, int R, int interleaved) {
    const int half = R / 2;
    for (int i = 0; i < half; i++) {
        const int a = interleaved ? 2 * i : i, b = interleaved ? 2 * i + 1 : i + half;
        const float x0 = x[a], x1 = x[b];
        x[a] = x0 * cos[i] - x1 * sin[i];
        x[b] = x1 * cos[i] + x0 * sin[i];
    }
}

static void layernorm_scalar(float *x, const float *res, const float *w, const float *b, float *out, long n,
                             float eps, float alpha) {
    double s = 0;
    for (long i = 0; i < n; i++) {
        if (res) x[i] += res[i];
        s += x[i];
    }
    const float mean = (float)(s / (double)n);
    double ss = 0;
    for (long i = 0; i < n; i++) ss += (double)(x[i] - mean) * (x[i] - mean);
    const float inv = 1.0f / sqrtf((float)(ss / (double)n) + eps);
    for (long i = 0; i < n; i++) out[i] = (x[i] - mean) * inv * w[i] + b[i];
    if (alpha != 0.0f)
        for (long i = 0; i < n; i++) x[i] = out[i] * alpha;
}

#define GELU_B 0.7978845608028654f        /* sqrt(2 / pi) */
#define GELU_K 0.044715f

static float gelu1(float x) { return x / (1.0f + expf(-2.0f * GELU_B * (x + GELU_K * x * x * x))); }

static void gelu_scalar(const float *h, float *out, long F) {
    for (long i = 0; i < F; i++) out[i] = gelu1(h[i]);
}

/* fp32 row -> int8 with one scale, as glmkit/engine/cache.py quantizes (s = max|x| / 127, q = round(x / s)) */
static void quant_row_i8(const float *x, int8_t *q, float *scale, long n) {
    float amax = 0;
    for (long i = 0; i < n; i++) amax = fmaxf(amax, fabsf(x[i]));
    const float s = amax / 127.0f;
    *scale = s;
    for (long i = 0; i < n; i++) {
        float r = s > 0 ? nearbyintf(x[i] / s) : 0.0f;
        q[i] = (int8_t)(r > 127.0f ? 127.0f : r < -127.0f ? -127.0f : r);
    }
}

/* keys per block: with H/G > 1 query heads per group a block is converted to fp32 once (16 KB at D = 128, in
 * L1) and every head of the group reads that, instead of each converting the fp16 / int8 again (AVX2) */
#define ATTEND_BLOCK 32

typedef struct {
    const float *q;        /* query head h at q + h * qs, rotary applied */
    long qs;
    const void *kc, *vc;   /* fp16 (uint16) or int8 cache, group g at + g * stride elements */
    const float *ksc, *vsc;  /* int8 cache: scales, group g at + g * (stride / D); NULL: fp16 */
    float *y;              /* [H][D] */
    float *scores;         /* per thread: rep * clen */
    float *part;           /* nchunk > 1: per piece, per head of its group: m, l, y[D] (unnormalised) */
    int H, G, D, kv_len, nchunk, clen;
    long stride;
    float scale;
    int avx2;
} attend_job;

static inline float kv_at(const attend_job *J, const void *base, long idx) {
    return J->ksc ? (float)((const int8_t *)base)[idx] : qg_half_to_float(((const uint16_t *)base)[idx]);
}

/* piece `it` = (group g, key range c): scores, softmax numerators, their sum and the weighted values */
static void attend_piece_scalar(const attend_job *J, int it, float *s) {
    const int D = J->D, rep = J->H / J->G, g = it / J->nchunk, c = it % J->nchunk;
    const long j0 = (long)J->kv_len * c / J->nchunk, n = (long)J->kv_len * (c + 1) / J->nchunk - j0;
    const long ss = J->stride / D;
    for (int r = 0; r < rep; r++) {
        const float *q = J->q + (long)(g * rep + r) * J->qs;
        float *sr = s + (long)r * J->clen, m = -INFINITY, sum = 0;
        for (long j = 0; j < n; j++) {
            const long at = g * J->stride + (j0 + j) * D;
            float d = 0;
            for (int i = 0; i < D; i++) d += q[i] * kv_at(J, J->kc, at + i);
            sr[j] = d * J->scale * (J->ksc ? J->ksc[g * ss + j0 + j] : 1.0f);
            if (sr[j] > m) m = sr[j];
        }
        for (long j = 0; j < n; j++) {
            sr[j] = expf(sr[j] - m);
            sum += sr[j];
        }
        float *y = J->nchunk > 1 ? J->part + ((long)it * rep + r) * (D + 2) + 2 : J->y + (long)(g * rep + r) * D;
        for (int i = 0; i < D; i++) y[i] = 0;
        for (long j = 0; j < n; j++) {
            const long at = g * J->stride + (j0 + j) * D;
            const float p = sr[j] * (J->vsc ? J->vsc[g * ss + j0 + j] : 1.0f);
            for (int i = 0; i < D; i++) y[i] += p * kv_at(J, J->vc, at + i);
        }
        if (J->nchunk > 1) {
            y[-2] = m;
            y[-1] = sum;
        } else {
            const float inv = 1.0f / sum;
            for (int i = 0; i < D; i++) y[i] *= inv;
        }
    }
}

/* ================================================================================================= */
/* AVX2 versions                                                                                        */
/* ================================================================================================= */
#if DO_X86
DO_TARGET static inline __m256 exp256(__m256 x) {
    /* e^x = 2^n * e^r, n = round(x / ln 2), r = x - n ln 2 in two parts (Cody-Waite), e^r by a polynomial */
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.33654f)), _mm256_set1_ps(88.0f));
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    /* the clamps keep n in [-126, 127]: 2^n is a normal float built from its exponent field */
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

DO_TARGET static inline float hsum256(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

DO_TARGET static void rmsnorm_avx2(float *x, const float *res, const float *w, float *out, long n, float eps) {
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
    long i = 0;
    for (; i + 16 <= n; i += 16) {
        __m256 v0 = _mm256_loadu_ps(x + i), v1 = _mm256_loadu_ps(x + i + 8);
        if (res) {
            v0 = _mm256_add_ps(v0, _mm256_loadu_ps(res + i));
            v1 = _mm256_add_ps(v1, _mm256_loadu_ps(res + i + 8));
            _mm256_storeu_ps(x + i, v0);
            _mm256_storeu_ps(x + i + 8, v1);
        }
        a0 = _mm256_fmadd_ps(v0, v0, a0);
        a1 = _mm256_fmadd_ps(v1, v1, a1);
    }
    float ss = hsum256(_mm256_add_ps(a0, a1));
    for (; i < n; i++) {
        if (res) x[i] += res[i];
        ss += x[i] * x[i];
    }
    const float inv = 1.0f / sqrtf(ss / (float)n + eps);
    const __m256 vi = _mm256_set1_ps(inv);
    for (i = 0; i + 8 <= n; i += 8)
        _mm256_storeu_ps(out + i, _mm256_mul_ps(_mm256_loadu_ps(w + i), _mm256_mul_ps(_mm256_loadu_ps(x + i), vi)));
    for (; i < n; i++) out[i] = w[i] * (x[i] * inv);
}

DO_TARGET static void swiglu_avx2(const float *h, float *out, long F) {
    const __m256 one = _mm256_set1_ps(1.0f), zero = _mm256_setzero_ps();
    long i = 0;
    for (; i + 8 <= F; i += 8) {
        const __m256 g = _mm256_loadu_ps(h + i), u = _mm256_loadu_ps(h + F + i);
        const __m256 e = exp256(_mm256_sub_ps(zero, g));
        _mm256_storeu_ps(out + i, _mm256_mul_ps(_mm256_div_ps(g, _mm256_add_ps(one, e)), u));
    }
    for (; i < F; i++) out[i] = silu_mul(h[i], h[F + i]);
}

DO_TARGET static void to_half_avx2(const float *x, uint16_t *h, long n) {      /* n % 8 == 0 */
    for (long i = 0; i < n; i += 8)
        _mm_storeu_si128((__m128i *)(h + i), _mm256_cvtps_ph(_mm256_loadu_ps(x + i), _MM_FROUND_TO_NEAREST_INT));
}

DO_TARGET static void layernorm_avx2(float *x, const float *res, const float *w, const float *b, float *out,
                                     long n, float eps, float alpha) {
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
    long i = 0;
    for (; i + 16 <= n; i += 16) {
        __m256 v0 = _mm256_loadu_ps(x + i), v1 = _mm256_loadu_ps(x + i + 8);
        if (res) {
            v0 = _mm256_add_ps(v0, _mm256_loadu_ps(res + i));
            v1 = _mm256_add_ps(v1, _mm256_loadu_ps(res + i + 8));
            _mm256_storeu_ps(x + i, v0);
            _mm256_storeu_ps(x + i + 8, v1);
        }
        a0 = _mm256_add_ps(v0, a0);
        a1 = _mm256_add_ps(v1, a1);
    }
    float s = hsum256(_mm256_add_ps(a0, a1));
    for (; i < n; i++) {
        if (res) x[i] += res[i];
        s += x[i];
    }
    const float mean = s / (float)n;
    const __m256 mv = _mm256_set1_ps(mean);
    a0 = a1 = _mm256_setzero_ps();
    for (i = 0; i + 16 <= n; i += 16) {
        const __m256 d0 = _mm256_sub_ps(_mm256_loadu_ps(x + i), mv), d1 = _mm256_sub_ps(_mm256_loadu_ps(x + i + 8), mv);
        a0 = _mm256_fmadd_ps(d0, d0, a0);
        a1 = _mm256_fmadd_ps(d1, d1, a1);
    }
    float ss = hsum256(_mm256_add_ps(a0, a1));
    for (; i < n; i++) ss += (x[i] - mean) * (x[i] - mean);
    const float inv = 1.0f / sqrtf(ss / (float)n + eps);
    const __m256 vi = _mm256_set1_ps(inv), va = _mm256_set1_ps(alpha);
    for (i = 0; i + 8 <= n; i += 8) {
        const __m256 o = _mm256_add_ps(_mm256_mul_ps(_mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(x + i), mv), vi),
                                                     _mm256_loadu_ps(w + i)), _mm256_loadu_ps(b + i));
        _mm256_storeu_ps(out + i, o);
        if (alpha != 0.0f) _mm256_storeu_ps(x + i, _mm256_mul_ps(o, va));
    }
    for (; i < n; i++) {
        out[i] = (x[i] - mean) * inv * w[i] + b[i];
        if (alpha != 0.0f) x[i] = out[i] * alpha;
    }
}

DO_TARGET static void gelu_avx2(const float *h, float *out, long F) {
    const __m256 one = _mm256_set1_ps(1.0f), c = _mm256_set1_ps(-2.0f * GELU_B), k = _mm256_set1_ps(GELU_K);
    long i = 0;
    for (; i + 8 <= F; i += 8) {
        const __m256 x = _mm256_loadu_ps(h + i);
        const __m256 z = _mm256_mul_ps(c, _mm256_fmadd_ps(_mm256_mul_ps(k, _mm256_mul_ps(x, x)), x, x));
        _mm256_storeu_ps(out + i, _mm256_div_ps(x, _mm256_add_ps(one, exp256(z))));
    }
    for (; i < F; i++) out[i] = gelu1(h[i]);
}

DO_TARGET static inline __m256 ld_h8(const uint16_t *p) { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p)); }
DO_TARGET static inline __m256 ld_q8(const int8_t *p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p)));
}

/* 4 dot products of q with keys j..j+3 (D % 8 == 0) -> one vector of the 4 sums; and one */
#define DOTS(SUF, T, LD)                                                                                    \
    DO_TARGET static inline __m128 dot4_##SUF(const float *q, const T *k, int D) {                          \
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;                                         \
        for (int i = 0; i < D; i += 8) {                                                                    \
            const __m256 qv = _mm256_loadu_ps(q + i);                                                       \
            a0 = _mm256_fmadd_ps(qv, LD(k + i), a0);                                                        \
            a1 = _mm256_fmadd_ps(qv, LD(k + D + i), a1);                                                    \
            a2 = _mm256_fmadd_ps(qv, LD(k + 2 * D + i), a2);                                                \
            a3 = _mm256_fmadd_ps(qv, LD(k + 3 * D + i), a3);                                                \
        }                                                                                                   \
        const __m256 t = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));                   \
        return _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1));                          \
    }                                                                                                       \
    DO_TARGET static inline float dot1_##SUF(const float *q, const T *k, int D) {                           \
        __m256 a = _mm256_setzero_ps();                                                                     \
        for (int i = 0; i < D; i += 8) a = _mm256_fmadd_ps(_mm256_loadu_ps(q + i), LD(k + i), a);           \
        return hsum256(a);                                                                                  \
    }
DOTS(h, uint16_t, ld_h8)
DOTS(q, int8_t, ld_q8)
DOTS(f, float, _mm256_loadu_ps)
#undef DOTS

/* a block of cached keys or values -> fp32 (count % 8 == 0): converted once for all the heads of a group */
DO_TARGET static void conv_h(const uint16_t *x, float *out, long count) {
    for (long i = 0; i < count; i += 8) _mm256_storeu_ps(out + i, ld_h8(x + i));
}
DO_TARGET static void conv_q(const int8_t *x, float *out, long count) {
    for (long i = 0; i < count; i += 8) _mm256_storeu_ps(out + i, ld_q8(x + i));
}

/* y[off : off + 8 NV] += sum_j p[j] v[j][off : off + 8 NV] over n keys, the 8 NV sums kept in registers */
#define PV_SLAB(SUF, T, LD, NV)                                                                             \
    DO_TARGET static void pv_##SUF##NV(const float *p, const T *V, long n, int D, int off, float *y) {      \
        __m256 acc[NV];                                                                                     \
        for (int c = 0; c < NV; c++) acc[c] = _mm256_loadu_ps(y + off + 8 * c);                            \
        for (long j = 0; j < n; j++) {                                                                      \
            const __m256 pj = _mm256_broadcast_ss(p + j);                                                   \
            const T *v = V + j * D + off;                                                                   \
            for (int c = 0; c < NV; c++) acc[c] = _mm256_fmadd_ps(pj, LD(v + 8 * c), acc[c]);               \
        }                                                                                                   \
        for (int c = 0; c < NV; c++) _mm256_storeu_ps(y + off + 8 * c, acc[c]);                             \
    }
PV_SLAB(h, uint16_t, ld_h8, 8)
PV_SLAB(h, uint16_t, ld_h8, 1)
PV_SLAB(q, int8_t, ld_q8, 8)
PV_SLAB(q, int8_t, ld_q8, 1)
PV_SLAB(f, float, _mm256_loadu_ps, 8)
PV_SLAB(f, float, _mm256_loadu_ps, 1)
#undef PV_SLAB


#define ATTEND_PIECE(SUF, T)                                                                                \
    DO_TARGET static void attend_piece_##SUF(const attend_job *J, int it, float *s) {                      \
        const int D = J->D, rep = J->H / J->G, g = it / J->nchunk, c = it % J->nchunk;                      \
        const long j0 = (long)J->kv_len * c / J->nchunk, n = (long)J->kv_len * (c + 1) / J->nchunk - j0;    \
        const long ss = J->stride / D;                                                                      \
        const T *K = (const T *)J->kc + g * J->stride + j0 * D, *V = (const T *)J->vc + g * J->stride + j0 * D; \
        const float *ks = J->ksc ? J->ksc + g * ss + j0 : NULL, *vs = J->vsc ? J->vsc + g * ss + j0 : NULL;  \
        const __m128 sc = _mm_set1_ps(J->scale);                                                            \
        float *kb = s + (long)rep * J->clen;                 /* this thread's fp32 block */                 \
        for (long b0 = 0; b0 < n; b0 += ATTEND_BLOCK) {                                                     \
            const long b1 = b0 + ATTEND_BLOCK < n ? b0 + ATTEND_BLOCK : n;                                  \
            if (rep > 1) conv_##SUF(K + b0 * D, kb, (b1 - b0) * D);                                         \
            for (int r = 0; r < rep; r++) {                                                                 \
                const float *q = J->q + (long)(g * rep + r) * J->qs;                                        \
                float *sr = s + (long)r * J->clen;                                                          \
                long j = b0;                                                                                \
                for (; j + 4 <= b1; j += 4) {                                                               \
                    __m128 d = rep > 1 ? dot4_f(q, kb + (j - b0) * D, D) : dot4_##SUF(q, K + j * D, D);     \
                    d = _mm_mul_ps(d, sc);                                                                  \
                    if (ks) d = _mm_mul_ps(d, _mm_loadu_ps(ks + j));                                        \
                    _mm_storeu_ps(sr + j, d);                                                               \
                }                                                                                           \
                for (; j < b1; j++)                                                                         \
                    sr[j] = (rep > 1 ? dot1_f(q, kb + (j - b0) * D, D) : dot1_##SUF(q, K + j * D, D)) *     \
                            J->scale * (ks ? ks[j] : 1.0f);                                                 \
            }                                                                                               \
        }                                                                                                   \
        float mx[rep], sum[rep];                                                                            \
        for (int r = 0; r < rep; r++) {                                                                     \
            float *sr = s + (long)r * J->clen;                                                              \
            __m256 m8 = _mm256_set1_ps(-INFINITY);                                                          \
            long j = 0;                                                                                     \
            for (; j + 8 <= n; j += 8) m8 = _mm256_max_ps(m8, _mm256_loadu_ps(sr + j));                     \
            __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(m8), _mm256_extractf128_ps(m8, 1));               \
            float m = fmaxf(fmaxf(m4[0], m4[1]), fmaxf(m4[2], m4[3]));                                      \
            for (; j < n; j++) m = fmaxf(m, sr[j]);                                                         \
            const __m256 mv = _mm256_set1_ps(m);                                                            \
            __m256 s8 = _mm256_setzero_ps();                                                                \
            for (j = 0; j + 8 <= n; j += 8) {                                                               \
                const __m256 e = exp256(_mm256_sub_ps(_mm256_loadu_ps(sr + j), mv));                        \
                s8 = _mm256_add_ps(s8, e);                                                                  \
                _mm256_storeu_ps(sr + j, vs ? _mm256_mul_ps(e, _mm256_loadu_ps(vs + j)) : e);               \
            }                                                                                               \
            float t = hsum256(s8);                                                                          \
            for (; j < n; j++) {                                                                            \
                const float e = expf(sr[j] - m);                                                            \
                t += e;                                                                                     \
                sr[j] = vs ? e * vs[j] : e;                                                                 \
            }                                                                                               \
            mx[r] = m;                                                                                      \
            sum[r] = t;                                                                                     \
            float *y = J->nchunk > 1 ? J->part + ((long)it * rep + r) * (D + 2) + 2                        \
                                     : J->y + (long)(g * rep + r) * D;                                      \
            memset(y, 0, sizeof(float) * (size_t)D);                                                        \
        }                                                                                                   \
        for (long b0 = 0; b0 < n; b0 += ATTEND_BLOCK) {                                                     \
            const long b1 = b0 + ATTEND_BLOCK < n ? b0 + ATTEND_BLOCK : n;                                  \
            if (rep > 1) conv_##SUF(V + b0 * D, kb, (b1 - b0) * D);                                         \
            for (int r = 0; r < rep; r++) {                                                                 \
                const float *p = s + (long)r * J->clen + b0;                                                \
                float *y = J->nchunk > 1 ? J->part + ((long)it * rep + r) * (D + 2) + 2                    \
                                         : J->y + (long)(g * rep + r) * D;                                  \
                int off = 0;                                                                                \
                if (rep > 1) {                                                                              \
                    for (; off + 64 <= D; off += 64) pv_f8(p, kb, b1 - b0, D, off, y);                      \
                    for (; off < D; off += 8) pv_f1(p, kb, b1 - b0, D, off, y);                             \
                    continue;                                                                               \
                }                                                                                           \
                for (; off + 64 <= D; off += 64) pv_##SUF##8(p, V + b0 * D, b1 - b0, D, off, y);            \
                for (; off < D; off += 8) pv_##SUF##1(p, V + b0 * D, b1 - b0, D, off, y);                   \
            }                                                                                               \
        }                                                                                                   \
        for (int r = 0; r < rep; r++) {                                                                     \
            float *y = J->nchunk > 1 ? J->part + ((long)it * rep + r) * (D + 2) + 2                        \
                                     : J->y + (long)(g * rep + r) * D;                                      \
            if (J->nchunk > 1) {                                                                            \
                y[-2] = mx[r];                                                                              \
                y[-1] = sum[r];                                                                             \
            } else {                                                                                        \
                const __m256 inv = _mm256_set1_ps(1.0f / sum[r]);                                           \
                for (int i = 0; i < D; i += 8) _mm256_storeu_ps(y + i, _mm256_mul_ps(_mm256_loadu_ps(y + i), inv)); \
            }                                                                                               \
        }                                                                                                   \
    }
ATTEND_PIECE(h, uint16_t)
ATTEND_PIECE(q, int8_t)
#undef ATTEND_PIECE
#endif /* DO_X86 */

static void attend_task(void *ctx, int tid, int nth) {
    const attend_job *J = (const attend_job *)ctx;
    const int items = J->G * J->nchunk;
    const int i0 = (int)((long)items * tid / nth), i1 = (int)((long)items * (tid + 1) / nth);
    float *s = J->scores + (long)tid * ((long)(J->H / J->G) * J->clen + ATTEND_BLOCK * J->D);
    for (int it = i0; it < i1; it++) {
#if DO_X86
        if (J->avx2) {
            if (J->ksc)
                attend_piece_q(J, it, s);
            else
                attend_piece_h(J, it, s);
            continue;
        }
#endif
        attend_piece_scalar(J, it, s);
    }
}

/* the pieces of a head's key range -> its output: one softmax over the whole range */
static void attend_merge(const attend_job *J) {
    const int D = J->D, rep = J->H / J->G;
    for (int h = 0; h < J->H; h++) {
        const int g = h / rep, r = h % rep;
        float M = -INFINITY, L = 0;
        for (int c = 0; c < J->nchunk; c++) M = fmaxf(M, J->part[((long)(g * J->nchunk + c) * rep + r) * (D + 2)]);
        float *y = J->y + (long)h * D;
        for (int i = 0; i < D; i++) y[i] = 0;
        for (int c = 0; c < J->nchunk; c++) {
            const float *p = J->part + ((long)(g * J->nchunk + c) * rep + r) * (D + 2);
            const float w = expf(p[0] - M);
            L += w * p[1];
            for (int i = 0; i < D; i++) y[i] += w * p[2 + i];
        }
        const float inv = 1.0f / L;
        for (int i = 0; i < D; i++) y[i] *= inv;
    }
}

/* contexts shorter than this many key-heads run on the calling thread (waking the pool costs more) */
#define ATTEND_PARALLEL_MIN 8192
#define ATTEND_MIN_PIECE 32

typedef struct {
    float *q, *k, *v;                       /* fp32 heads (rotary applied in place in mode 1) */
    const float *cos1, *sin1, *cos2, *sin2; /* cos2/sin2 NULL: 1D rotary */
    void *kc, *vc;                          /* cache, row 0 of the batch */
    float *ks, *vs;                         /* int8 cache scales, NULL: fp16 cache */
    float *y;
    long H, G, D, R, inter, qs, kvs, pos, kv_len, stride, mode;
} attend_args;

static int gcd_i(int a, int b) {
    while (b) {
        const int t = a % b;
        a = b;
        b = t;
    }
    return a;
}

/* without the GIL; -1 when out of memory */
static int attend_run(const attend_args *A) {
    const long H = A->H, G = A->G, D = A->D, R = A->R;
    const int avx2 = qg_impl_avx2() && D % 8 == 0;
    if (A->mode & 1) {
        for (long h = 0; h < H + G; h++) {                              /* q heads, then k */
            float *x = h < H ? A->q + h * A->qs : A->k + (h - H) * A->kvs;
            rope_head(x, A->cos1, A->sin1, (int)R, (int)A->inter);
            if (A->cos2) rope_head(x + R, A->cos2, A->sin2, (int)R, (int)A->inter);
        }
        for (long g = 0; g < G; g++) {
            const float *kk = A->k + g * A->kvs, *vv = A->v + g * A->kvs;
            const long at = g * A->stride + A->pos * D;
            if (A->ks) {
                const long sat = g * (A->stride / D) + A->pos;
                quant_row_i8(kk, (int8_t *)A->kc + at, A->ks + sat, D);
                quant_row_i8(vv, (int8_t *)A->vc + at, A->vs + sat, D);
                continue;
            }
            uint16_t *kd = (uint16_t *)A->kc + at, *vd = (uint16_t *)A->vc + at;
#if DO_X86
            if (avx2) {
                to_half_avx2(kk, kd, D);
                to_half_avx2(vv, vd, D);
                continue;
            }
#endif
            for (long i = 0; i < D; i++) {
                kd[i] = f2h(kk[i]);
                vd[i] = f2h(vv[i]);
            }
        }
    }
    if (!(A->mode & 2)) return 0;
    attend_job J;
    J.q = A->q;
    J.qs = A->qs;
    J.kc = A->kc;
    J.vc = A->vc;
    J.ksc = A->ks;
    J.vsc = A->vs;
    J.y = A->y;
    J.H = (int)H;
    J.G = (int)G;
    J.D = (int)D;
    J.kv_len = (int)A->kv_len;
    J.stride = A->stride;
    J.scale = 1.0f / sqrtf((float)D);
    J.avx2 = avx2;
    int nth = H * A->kv_len >= ATTEND_PARALLEL_MIN ? qg_pool_threads() : 1;
    /* G * nchunk pieces, a multiple of the threads: every thread gets as many keys */
    int nchunk = nth / gcd_i((int)G, nth);
    while (nchunk > 1 && A->kv_len / nchunk < ATTEND_MIN_PIECE) nchunk--;
    if (nth > G * nchunk) nth = (int)G * nchunk;
    J.nchunk = nchunk;
    J.clen = (int)((A->kv_len + nchunk - 1) / nchunk);
    const long rep = H / G;
    J.scores = (float *)malloc(sizeof(float) * (size_t)nth * ((size_t)rep * (size_t)J.clen + ATTEND_BLOCK * (size_t)D));
    J.part = nchunk > 1 ? (float *)malloc(sizeof(float) * (size_t)(G * nchunk * rep * (D + 2))) : NULL;
    if (!J.scores || (nchunk > 1 && !J.part)) {
        free(J.scores);
        free(J.part);
        return -1;
    }
    if (nth > 1)
        qg_parallel(attend_task, &J, nth);
    else
        attend_task(&J, 0, 1);
    if (nchunk > 1) attend_merge(&J);
    free(J.scores);
    free(J.part);
    return 0;
}

/* ================================================================================================= */
/* Python bindings (raw addresses, like gemm)                                                           */
/* ================================================================================================= */
static int get_args(PyObject *const *args, Py_ssize_t nargs, Py_ssize_t want, const char *name,
                    const char *kinds, void **ptrs, long long *ints, double *dbl) {
    if (nargs != want) {
        PyErr_Format(PyExc_TypeError, "%s expects %d arguments", name, (int)want);
        return -1;
    }
    int np = 0, ni = 0;
    for (Py_ssize_t i = 0; i < nargs; i++) {
        if (kinds[i] == 'p') {
            if (qg_arg_ptr(args[i], &ptrs[np++])) return -1;
        } else if (kinds[i] == 'i') {
            if (qg_arg_ll(args[i], &ints[ni++])) return -1;
        } else {
            *dbl = PyFloat_AsDouble(args[i]);
            if (*dbl == -1.0 && PyErr_Occurred()) return -1;
        }
    }
    return 0;
}

const char qg_rmsnorm_doc[] =
    "rmsnorm(x_ptr, res_ptr, w_ptr, out_ptr, rows, n, eps)\n--\n\n"
    "fp32, per row of n: x += res (res_ptr 0: no add; x updated in place), out = w * (x * rsqrt(mean(x^2) + eps)).";

PyObject *qg_py_rmsnorm(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    void *p[4];
    long long v[2];
    double eps;
    if (get_args(args, nargs, 7, "rmsnorm", "ppppiif", p, v, &eps)) return NULL;
    const long long rows = v[0], n = v[1];
    if (!p[0] || !p[2] || !p[3] || n < 1 || rows < 0) {
        PyErr_SetString(PyExc_ValueError, "rmsnorm: null pointer, n < 1 or rows < 0");
        return NULL;
    }
    for (long long r = 0; r < rows; r++) {
        float *x = (float *)p[0] + r * n, *out = (float *)p[3] + r * n;
        const float *res = p[1] ? (const float *)p[1] + r * n : NULL, *w = (const float *)p[2];
#if DO_X86
        if (qg_impl_avx2()) {
            rmsnorm_avx2(x, res, w, out, (long)n, (float)eps);
            continue;
        }
#endif
        rmsnorm_scalar(x, res, w, out, (long)n, (float)eps);
    }
    Py_RETURN_NONE;
}

const char qg_swiglu_doc[] =
    "swiglu(h_ptr, out_ptr, rows, F)\n--\n\nfp32: out[r, i] = silu(h[r, i]) * h[r, F + i] for i < F "
    "(h: rows x 2F, out: rows x F).";

typedef void (*act_row_fn)(const float *h, float *out, long F);

/* The activations' entry: (h_ptr, out_ptr, rows, F), row r's input at h + r * in_mult * F, its output at
 * out + r * F; the AVX2 row function where the CPU has it (avx2_fn NULL off x86), else the scalar one. */
static PyObject *act_rows(const char *name, PyObject *const *args, Py_ssize_t nargs, long in_mult,
                          act_row_fn avx2_fn, act_row_fn scalar_fn) {
    void *p[2];
    long long v[2];
    if (get_args(args, nargs, 4, name, "ppii", p, v, NULL)) return NULL;
    const long long rows = v[0], F = v[1];
    if (!p[0] || !p[1] || F < 1 || rows < 0) {
        PyErr_Format(PyExc_ValueError, "%s: null pointer, F < 1 or rows < 0", name);
        return NULL;
    }
    const act_row_fn fn = avx2_fn && qg_impl_avx2() ? avx2_fn : scalar_fn;
    Py_BEGIN_ALLOW_THREADS
    for (long long r = 0; r < rows; r++) fn((const float *)p[0] + r * in_mult * F, (float *)p[1] + r * F, (long)F);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

#if DO_X86
#define DO_AVX2_FN(f) f
#else
#define DO_AVX2_FN(f) NULL
#endif

PyObject *qg_py_swiglu(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    return act_rows("swiglu", args, nargs, 2, DO_AVX2_FN(swiglu_avx2), swiglu_scalar);
}

const char qg_layernorm_doc[] =
    "layernorm(x_ptr, res_ptr, w_ptr, b_ptr, out_ptr, rows, n, eps, alpha)\n--\n\n"
    "fp32, per row of n: x += res (res_ptr 0: no add), out = (x - mean) / sqrt(var + eps) * w + b; then x = alpha *\n"
    "out when alpha != 0 (ChatGLM-6B's residual stream), else x keeps x + res.";

PyObject *qg_py_layernorm(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    void *p[5];
    long long v[2];
    double f[2];
    if (nargs != 9) {
        PyErr_SetString(PyExc_TypeError, "layernorm expects 9 arguments");
        return NULL;
    }
    if (get_args(args, 7, 7, "layernorm", "pppppii", p, v, NULL)) return NULL;
    for (int i = 0; i < 2; i++) {
        f[i] = PyFloat_AsDouble(args[7 + i]);
        if (f[i] == -1.0 && PyErr_Occurred()) return NULL;
    }
    const long long rows = v[0], n = v[1];
    if (!p[0] || !p[2] || !p[3] || !p[4] || n < 1 || rows < 0) {
        PyErr_SetString(PyExc_ValueError, "layernorm: null pointer, n < 1 or rows < 0");
        return NULL;
    }
    const float eps = (float)f[0], alpha = (float)f[1];
    for (long long r = 0; r < rows; r++) {
        float *x = (float *)p[0] + r * n, *out = (float *)p[4] + r * n;
        const float *res = p[1] ? (const float *)p[1] + r * n : NULL, *w = (const float *)p[2],
                    *b = (const float *)p[3];
#if DO_X86
        if (qg_impl_avx2()) {
            layernorm_avx2(x, res, w, b, out, (long)n, eps, alpha);
            continue;
        }
#endif
        layernorm_scalar(x, res, w, b, out, (long)n, eps, alpha);
    }
    Py_RETURN_NONE;
}

const char qg_gelu_doc[] =
    "gelu(h_ptr, out_ptr, rows, F)\n--\n\nfp32 [rows, F]: out = gelu(h) in torch's approximate='tanh' form "
    "(out may be h).";

PyObject *qg_py_gelu(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    return act_rows("gelu", args, nargs, 1, DO_AVX2_FN(gelu_avx2), gelu_scalar);
}

static int attend_check(const attend_args *A) {
    const int need_rope = (A->mode & 1) && A->R > 0;
    if (!A->q || !A->kc || !A->vc || !A->y || ((A->mode & 1) && (!A->k || !A->v)) ||
        (need_rope && (!A->cos1 || !A->sin1)) || (!A->cos2) != (!A->sin2) || (!A->ks) != (!A->vs)) {
        PyErr_SetString(PyExc_ValueError, "attend: null pointer (or only one of cos2/sin2, ks/vs)");
        return -1;
    }
    const long R2 = A->cos2 ? 2 * A->R : A->R;
    if (A->H < 1 || A->G < 1 || A->H % A->G || A->D < 2 || A->R < 0 || R2 > A->D || A->R % 2 || A->pos < 0 ||
        A->kv_len < 1 || A->mode < 1 || A->mode > 3 || ((A->mode & 2) && (A->mode & 1) && A->kv_len <= A->pos) ||
        A->stride < A->kv_len * A->D || A->stride % A->D || ((A->mode & 1) && A->pos * A->D >= A->stride) ||
        A->qs < A->D || A->kvs < A->D || A->H > (1 << 16) || A->D > (1 << 16) || A->kv_len > (1 << 26)) {
        PyErr_Format(PyExc_ValueError, "attend: bad sizes H=%ld G=%ld D=%ld R=%ld pos=%ld kv_len=%ld "
                     "cache_stride=%ld qs=%ld kvs=%ld mode=%ld", A->H, A->G, A->D, A->R, A->pos, A->kv_len,
                     A->stride, A->qs, A->kvs, A->mode);
        return -1;
    }
    return 0;
}

static PyObject *attend_call(const attend_args *A) {
    if (attend_check(A)) return NULL;
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = attend_run(A);
    Py_END_ALLOW_THREADS
    if (rc) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

const char qg_attend_doc[] =
    "attend(qkv_ptr, cos_ptr, sin_ptr, kc_ptr, vc_ptr, y_ptr, H, G, D, R, interleaved, pos, kv_len, "
    "cache_stride)\n--\n\n"
    "One token's attention: rotary on qkv (fp32 [q H*D | k G*D | v G*D], in place), k/v stored in the fp16\n"
    "cache at pos (kc/vc: [G][cache_stride/D][D]), y [H*D] fp32 = softmax(q K^T / sqrt(D)) V over positions\n"
    "[0, kv_len) of each head's group.  attend_ex with mode 3; see decode_ops.c.";

PyObject *qg_py_attend(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    void *p[6];
    long long v[8];
    if (get_args(args, nargs, 14, "attend", "ppppppiiiiiiii", p, v, NULL)) return NULL;
    attend_args A;
    memset(&A, 0, sizeof A);
    A.H = (long)v[0];
    A.G = (long)v[1];
    A.D = (long)v[2];
    if (!p[0]) {
        PyErr_SetString(PyExc_ValueError, "attend: null pointer");
        return NULL;
    }
    A.q = (float *)p[0];
    A.k = A.q + A.H * A.D;
    A.v = A.k + A.G * A.D;
    A.cos1 = (const float *)p[1];
    A.sin1 = (const float *)p[2];
    A.kc = p[3];
    A.vc = p[4];
    A.y = (float *)p[5];
    A.R = (long)v[3];
    A.inter = (long)v[4];
    A.pos = (long)v[5];
    A.kv_len = (long)v[6];
    A.stride = (long)v[7];
    A.qs = A.kvs = A.D;
    A.mode = 3;
    if (!A.cos1 || !A.sin1) {
        PyErr_SetString(PyExc_ValueError, "attend: null pointer");
        return NULL;
    }
    return attend_call(&A);
}

const char qg_attend_ex_doc[] =
    "attend_ex(q_ptr, k_ptr, v_ptr, cos1_ptr, sin1_ptr, cos2_ptr, sin2_ptr, kc_ptr, vc_ptr, ks_ptr, vs_ptr, y_ptr,\n"
    "          H, G, D, R, interleaved, qs, kvs, pos, kv_len, cache_stride, mode)\n--\n\n"
    "One token's attention with strided heads (q head h at q + h*qs, k/v group g at + g*kvs), 1D or 2D rotary\n"
    "(cos2/sin2 0: 1D), an fp16 (ks = vs = 0) or int8 cache (ks/vs: fp32 scales [G][cache_stride/D]); mode 1:\n"
    "rotary + cache write at pos, 2: attention over [0, kv_len), 3: both.  See decode_ops.c.";

PyObject *qg_py_attend_ex(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    void *p[12];
    long long v[11];
    if (get_args(args, nargs, 23, "attend_ex", "ppppppppppppiiiiiiiiiii", p, v, NULL)) return NULL;
    attend_args A;
    A.q = (float *)p[0];
    A.k = (float *)p[1];
    A.v = (float *)p[2];
    A.cos1 = (const float *)p[3];
    A.sin1 = (const float *)p[4];
    A.cos2 = (const float *)p[5];
    A.sin2 = (const float *)p[6];
    A.kc = p[7];
    A.vc = p[8];
    A.ks = (float *)p[9];
    A.vs = (float *)p[10];
    A.y = (float *)p[11];
    A.H = (long)v[0];
    A.G = (long)v[1];
    A.D = (long)v[2];
    A.R = (long)v[3];
    A.inter = (long)v[4];
    A.qs = (long)v[5];
    A.kvs = (long)v[6];
    A.pos = (long)v[7];
    A.kv_len = (long)v[8];
    A.stride = (long)v[9];
    A.mode = (long)v[10];
    return attend_call(&A);
}
