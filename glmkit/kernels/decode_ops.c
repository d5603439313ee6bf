/*
 * The non-GEMM operations of a one-token decode step, fused (part of the glmkit.kernels._qgemm extension).
 *
 * Why: with the quantized GEMMs at the memory bandwidth, a ChatGLM3-6B INT4 decode step on 2 cores spent
 * ~30 of ~185 ms in ~60 small PyTorch ops per layer (norm, rotary, cache write, fp16 -> fp32 of the cache,
 * attention, SiLU * up, residual adds), each a few microseconds of dispatch on one thread.  These three calls
 * replace them; glmkit/fast_decode.py strings them together with the GEMMs.  Batch 1, fp32 activations.
 *
 *   rmsnorm(x, res, w, out, rows, n, eps):  per row of n: x += res (when res is given; x is the residual
 *                                     stream, updated in place), out = w * (x * rsqrt(mean(x^2) + eps))  -- fp32
 *   attend(qkv, cos, sin, kc, vc, y, H, G, D, R, interleaved, pos, kv_len, cache_stride):
 *       qkv [q (H*D) | k (G*D) | v (G*D)] fp32, the fused projection of one token (modified: rotary applied);
 *       rotary on the first R dims of every q and k head with cos/sin [R/2] (the table row of the position),
 *       in interleaved pairs (x0, x1), (x2, x3)... or halves (rotate_half); k and v are stored in the fp16 cache
 *       at position `pos` (cache [G][cache_stride / D][D], kc / vc = row 0 of the batch), then each query head h
 *       attends over cache positions [0, kv_len) of its group g = h / (H / G) with scale 1/sqrt(D):
 *       y [H*D] fp32 = softmax(q k^T / sqrt(D)) v.  The new key is read back from the fp16 cache, as the PyTorch
 *       path does.  Heads are split over the kernels' thread pool when the context is long enough to pay.
 *   swiglu(h, out, rows, F):          out[r, i] = silu(h[r, i]) * h[r, F + i]    -- fp32 [rows, 2F] -> [rows, F]
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

typedef struct {
    const float *q;        /* [H][D], rotary applied */
    const uint16_t *kc, *vc;
    float *y;              /* [H][D] */
    float *scores;         /* [nth][kv_len] */
    int H, G, D, kv_len;
    long stride;           /* elements between groups in the cache */
    float scale;
    int avx2;
} attend_job;

static void attend_head_scalar(const attend_job *J, int h, float *s) {
    const int D = J->D, g = h / (J->H / J->G);
    const float *q = J->q + (long)h * D;
    const uint16_t *K = J->kc + g * J->stride, *V = J->vc + g * J->stride;
    float m = -INFINITY;
    for (int j = 0; j < J->kv_len; j++) {
        float d = 0;
        for (int i = 0; i < D; i++) d += q[i] * qg_half_to_float(K[(long)j * D + i]);
        s[j] = d * J->scale;
        if (s[j] > m) m = s[j];
    }
    float sum = 0;
    for (int j = 0; j < J->kv_len; j++) {
        s[j] = expf(s[j] - m);
        sum += s[j];
    }
    float *y = J->y + (long)h * D;
    for (int i = 0; i < D; i++) y[i] = 0;
    for (int j = 0; j < J->kv_len; j++)
        for (int i = 0; i < D; i++) y[i] += s[j] * qg_half_to_float(V[(long)j * D + i]);
    const float inv = 1.0f / sum;
    for (int i = 0; i < D; i++) y[i] *= inv;
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

/* 4 dot products of q with keys j..j+3 (fp16, D % 8 == 0) -> one vector of the 4 sums */
DO_TARGET static inline __m128 dot4(const float *q, const uint16_t *k, int D) {
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (int i = 0; i < D; i += 8) {
        const __m256 qv = _mm256_loadu_ps(q + i);
        a0 = _mm256_fmadd_ps(qv, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(k + i))), a0);
        a1 = _mm256_fmadd_ps(qv, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(k + D + i))), a1);
        a2 = _mm256_fmadd_ps(qv, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(k + 2 * D + i))), a2);
        a3 = _mm256_fmadd_ps(qv, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(k + 3 * D + i))), a3);
    }
    const __m256 t = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
    return _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1));
}

/* y[0:W] += sum_j p[j] v[j][0:W] over all keys, W = 8 * NV values kept in registers */
#define PV_SLAB(NV)                                                                                         \
    DO_TARGET static void pv_slab##NV(const float *p, const uint16_t *V, int n, int D, int off, float *y) { \
        __m256 acc[NV];                                                                                     \
        for (int c = 0; c < NV; c++) acc[c] = _mm256_setzero_ps();                                         \
        for (int j = 0; j < n; j++) {                                                                       \
            const __m256 pj = _mm256_broadcast_ss(p + j);                                                   \
            const uint16_t *v = V + (long)j * D + off;                                                      \
            for (int c = 0; c < NV; c++)                                                                    \
                acc[c] = _mm256_fmadd_ps(pj, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(v + 8 * c))), \
                                         acc[c]);                                                           \
        }                                                                                                   \
        for (int c = 0; c < NV; c++) _mm256_storeu_ps(y + off + 8 * c, acc[c]);                             \
    }
PV_SLAB(8)
PV_SLAB(1)
#undef PV_SLAB

DO_TARGET static void attend_head_avx2(const attend_job *J, int h, float *s) {
    const int D = J->D, n = J->kv_len, g = h / (J->H / J->G);
    const float *q = J->q + (long)h * D;
    const uint16_t *K = J->kc + g * J->stride, *V = J->vc + g * J->stride;
    const __m128 sc = _mm_set1_ps(J->scale);
    int j = 0;
    __m128 mx4 = _mm_set1_ps(-INFINITY);
    for (; j + 4 <= n; j += 4) {
        const __m128 d = _mm_mul_ps(dot4(q, K + (long)j * D, D), sc);
        _mm_storeu_ps(s + j, d);
        mx4 = _mm_max_ps(mx4, d);
    }
    float m = fmaxf(fmaxf(mx4[0], mx4[1]), fmaxf(mx4[2], mx4[3]));
    for (; j < n; j++) {
        __m256 a = _mm256_setzero_ps();
        for (int i = 0; i < D; i += 8)
            a = _mm256_fmadd_ps(_mm256_loadu_ps(q + i),
                                _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(K + (long)j * D + i))), a);
        s[j] = hsum256(a) * J->scale;
        if (s[j] > m) m = s[j];
    }
    /* softmax numerators in place, and their sum */
    const __m256 mv = _mm256_set1_ps(m);
    __m256 sum8 = _mm256_setzero_ps();
    for (j = 0; j + 8 <= n; j += 8) {
        const __m256 e = exp256(_mm256_sub_ps(_mm256_loadu_ps(s + j), mv));
        _mm256_storeu_ps(s + j, e);
        sum8 = _mm256_add_ps(sum8, e);
    }
    float sum = hsum256(sum8);
    for (; j < n; j++) {
        s[j] = expf(s[j] - m);
        sum += s[j];
    }
    float *y = J->y + (long)h * D;
    int off = 0;
    for (; off + 64 <= D; off += 64) pv_slab8(s, V, n, D, off, y);
    for (; off < D; off += 8) pv_slab1(s, V, n, D, off, y);
    const __m256 inv = _mm256_set1_ps(1.0f / sum);
    for (int i = 0; i < D; i += 8) _mm256_storeu_ps(y + i, _mm256_mul_ps(_mm256_loadu_ps(y + i), inv));
}
#endif /* DO_X86 */

static void attend_task(void *ctx, int tid, int nth) {
    const attend_job *J = (const attend_job *)ctx;
    const int h0 = (int)((long)J->H * tid / nth), h1 = (int)((long)J->H * (tid + 1) / nth);
    float *s = J->scores + (long)tid * J->kv_len;
    for (int h = h0; h < h1; h++) {
#if DO_X86
        if (J->avx2) {
            attend_head_avx2(J, h, s);
            continue;
        }
#endif
        attend_head_scalar(J, h, s);
    }
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

PyObject *qg_py_swiglu(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    void *p[2];
    long long v[2];
    if (get_args(args, nargs, 4, "swiglu", "ppii", p, v, NULL)) return NULL;
    const long long rows = v[0], F = v[1];
    if (!p[0] || !p[1] || F < 1 || rows < 0) {
        PyErr_SetString(PyExc_ValueError, "swiglu: null pointer, F < 1 or rows < 0");
        return NULL;
    }
    const int avx2 = qg_impl_avx2();
    Py_BEGIN_ALLOW_THREADS
    for (long long r = 0; r < rows; r++) {
        const float *h = (const float *)p[0] + r * 2 * F;
        float *out = (float *)p[1] + r * F;
#if DO_X86
        if (avx2) {
            swiglu_avx2(h, out, (long)F);
            continue;
        }
#else
        (void)avx2;
#endif
        swiglu_scalar(h, out, (long)F);
    }
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

const char qg_attend_doc[] =
    "attend(qkv_ptr, cos_ptr, sin_ptr, kc_ptr, vc_ptr, y_ptr, H, G, D, R, interleaved, pos, kv_len, "
    "cache_stride)\n--\n\n"
    "One token's attention: rotary on qkv (fp32 [q H*D | k G*D | v G*D], in place), k/v stored in the fp16\n"
    "cache at pos (kc/vc: [G][cache_stride/D][D]), y [H*D] fp32 = softmax(q K^T / sqrt(D)) V over positions\n"
    "[0, kv_len) of each head's group.  See decode_ops.c.";

/* contexts shorter than this many key-heads run on the calling thread (waking the pool costs more) */
#define ATTEND_PARALLEL_MIN 8192

PyObject *qg_py_attend(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    void *p[6];
    long long v[8];
    if (get_args(args, nargs, 14, "attend", "ppppppiiiiiiii", p, v, NULL)) return NULL;
    const long long H = v[0], G = v[1], D = v[2], R = v[3], inter = v[4], pos = v[5], kv_len = v[6], stride = v[7];
    for (int i = 0; i < 6; i++)
        if (!p[i]) {
            PyErr_SetString(PyExc_ValueError, "attend: null pointer");
            return NULL;
        }
    if (H < 1 || G < 1 || H % G || D < 2 || R < 0 || R > D || R % 2 || pos < 0 || kv_len <= pos ||
        stride < kv_len * D || H > (1 << 16) || D > (1 << 16) || kv_len > (1 << 26)) {
        PyErr_Format(PyExc_ValueError, "attend: bad sizes H=%lld G=%lld D=%lld R=%lld pos=%lld kv_len=%lld "
                     "cache_stride=%lld", H, G, D, R, pos, kv_len, stride);
        return NULL;
    }
    attend_job J;
    J.H = (int)H;
    J.G = (int)G;
    J.D = (int)D;
    J.kv_len = (int)kv_len;
    J.stride = (long)stride;
    J.scale = 1.0f / sqrtf((float)D);
    J.avx2 = qg_impl_avx2() && D % 8 == 0;
    float *qkv = (float *)p[0];
    J.q = qkv;
    J.kc = (const uint16_t *)p[3];
    J.vc = (const uint16_t *)p[4];
    J.y = (float *)p[5];
    int nth = H * kv_len >= ATTEND_PARALLEL_MIN ? qg_pool_threads() : 1;
    if (nth > H) nth = (int)H;
    J.scores = (float *)malloc(sizeof(float) * (size_t)nth * (size_t)kv_len);
    if (!J.scores) return PyErr_NoMemory();
    Py_BEGIN_ALLOW_THREADS
    const float *cs = (const float *)p[1], *sn = (const float *)p[2];
    float *k = qkv + H * D, *vv = qkv + (H + G) * D;
    for (long h = 0; h < H + G; h++) rope_head(qkv + h * D, cs, sn, (int)R, (int)inter);   /* q heads, then k */
    uint16_t *kc = (uint16_t *)p[3], *vc = (uint16_t *)p[4];
    for (long g = 0; g < G; g++) {
        uint16_t *kd = kc + g * stride + pos * D, *vd = vc + g * stride + pos * D;
#if DO_X86
        if (J.avx2) {
            to_half_avx2(k + g * D, kd, D);
            to_half_avx2(vv + g * D, vd, D);
            continue;
        }
#endif
        for (long i = 0; i < D; i++) {
            kd[i] = f2h(k[g * D + i]);
            vd[i] = f2h(vv[g * D + i]);
        }
    }
    if (nth > 1)
        qg_parallel(attend_task, &J, nth);
    else
        attend_task(&J, 0, 1);
    Py_END_ALLOW_THREADS
    free(J.scores);
    Py_RETURN_NONE;
}
