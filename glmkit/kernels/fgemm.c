/*
 * Float weight kinds of the glmkit.kernels._qgemm extension: fp16 (kind 16) and bf16 (kind 17) weights used
 * unquantized, fp32 activations and accumulation.
 *
 *   y[M, N] (fp32) = x[M, K] (fp32) @ W^T (+ bias[N] fp32),   W [N, K] in fp16 or bf16, as the checkpoint has it
 *
 * Packed layout (made once at load by qg_frepack, the same bytes as the weight when N % 16 == 0):
 *   P = ceil(N / 16) panels of 16 rows (rows past N are zero); panel p holds K x 16 16-bit values, k-major:
 *   element (p, k, r) at index (p * K + k) * 16 + r  =  W[16p + r, k].
 *   So one 32-byte load is the 16 rows' weights at one k: converted to fp32 (vcvtph2ps for fp16, a 16-bit
 *   shift for bf16) and multiplied by the broadcast x[m, k], row r's partial sum lands in lane r (no
 *   horizontal sums), for any K.
 *
 * Arithmetic: the products and sums are fp32 (FMA); the weights are exact in fp32 (fp16 and bf16 are subsets of
 * it), so the only rounding is the fp32 accumulation (order: k ascending per lane, in two interleaved sets over
 * even / odd k for M <= 4, in blocks of 256 k otherwise). The AVX2 / AVX-512 loops are in fgemm_kern.inc;
 * the portable scalar path here is the reference and the fallback (same layout).
 *
 * Threads: the panels are cut into work items (~64 KiB of weights for decode; groups of 4 panels for prefill,
 * so each thread's block of activations is reused over 64 output rows) taken from a shared counter by the
 * kernels' pool (qg_parallel).
 */
#include "qgemm_internal.h"

#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

size_t qg_fpacked_bytes(long long N, long long K) { return (size_t)((N + 15) / 16) * 16 * (size_t)K * 2; }

static float bf16_to_float(uint16_t h) {
    const uint32_t b = (uint32_t)h << 16;
    float f;
    memcpy(&f, &b, 4);
    return f;
}

/* ---------------- repack ---------------------------------------------------------------------------------- */
typedef struct {
    const uint16_t *w;
    uint16_t *out;
    long long N, K;
} frepack_job;

static void frepack_task(void *ctx, int tid, int nth) {
    const frepack_job *R = (const frepack_job *)ctx;
    const long long N = R->N, K = R->K, P = (N + 15) / 16;
    const long long p0 = P * tid / nth, p1 = P * (tid + 1) / nth;
    for (long long p = p0; p < p1; p++) {
        uint16_t *o = R->out + (size_t)p * 16 * K;
        for (long long k0 = 0; k0 < K; k0 += 64) {          /* 64 k of 16 rows at a time: both sides cached */
            const long long k1 = k0 + 64 < K ? k0 + 64 : K;
            for (int r = 0; r < 16; r++) {
                const long long n = 16 * p + r;
                if (n >= N) {
                    for (long long k = k0; k < k1; k++) o[k * 16 + r] = 0;
                    continue;
                }
                const uint16_t *src = R->w + (size_t)n * K;
                for (long long k = k0; k < k1; k++) o[k * 16 + r] = src[k];
            }
        }
    }
}

void qg_frepack(const uint16_t *w, uint16_t *out, long long N, long long K) {
    frepack_job R = {w, out, N, K};
    qg_parallel(frepack_task, &R, qg_pool_threads());
}

/* ---------------- scalar reference ------------------------------------------------------------------------- */
static void fpanels_scalar(const fg_job *J, int p0, int p1) {
    const int M = J->M, N = J->N, K = J->K;
    for (int p = p0; p < p1; p++) {
        const uint16_t *W = J->w + (size_t)p * 16 * K;
        for (int r = 0; r < 16 && 16 * p + r < N; r++) {
            const int n = 16 * p + r;
            for (int m = 0; m < M; m++) {
                const float *x = J->x + (size_t)m * K;
                float s = 0.f;
                for (int k = 0; k < K; k++) {
                    const uint16_t h = W[(size_t)k * 16 + r];
                    s += x[k] * (J->kind == QG_KIND_F16 ? qg_half_to_float(h) : bf16_to_float(h));
                }
                J->y[(size_t)m * N + n] = s + (J->bias ? J->bias[n] : 0.f);
            }
        }
    }
}

/* ---------------- the job ---------------------------------------------------------------------------------- */
typedef struct {
    fg_job J;
    int isa, chunk, nchunks;
    _Atomic int next;
    _Atomic int failed;
} fg_run;

static void fgemm_task(void *ctx, int tid, int nth) {
    (void)tid;
    (void)nth;
    fg_run *R = (fg_run *)ctx;
    const fg_job *J = &R->J;
    float *tmp = NULL;
    for (;;) {
        const int c = atomic_fetch_add_explicit(&R->next, 1, memory_order_relaxed);
        if (c >= R->nchunks) break;
        const int p0 = c * R->chunk, p1 = p0 + R->chunk < J->P ? p0 + R->chunk : J->P;
        if ((J->M > 4 || (p1 == J->P && J->N % 16)) && !tmp && R->isa != QG_ISA_SCALAR) {
            tmp = (float *)malloc(QG_FG_SCRATCH(J->M) * sizeof(float));
            if (!tmp) {
                atomic_store(&R->failed, 1);
                continue;
            }
        }
        switch (R->isa) {
#if QG_HAVE_X86
        case QG_ISA_AVX512:
            qg_fpanels_avx512(J, p0, p1, tmp);
            break;
        case QG_ISA_AVX2:
        case QG_ISA_AVX512_EMU:        /* the float kernels' AVX-512 variant differs only in the vector width */
            qg_fpanels_avx2(J, p0, p1, tmp);
            break;
#endif
        default:
            fpanels_scalar(J, p0, p1);
        }
    }
    free(tmp);
}

/* The packed activations: a buffer kept per calling thread and grown as needed (up to 64 MiB; larger ones are
 * allocated per call), so a prompt's many calls do not map, fault in and zero fresh pages each time (a 128-row
 * call on a 13696-wide input packs 7 MiB). Never freed: one per thread that calls the kernels. */
#define TL_AP_MAX ((size_t)64 << 20)
static _Thread_local float *tl_ap;
static _Thread_local size_t tl_cap;

static float *packed_a_buffer(size_t n) {
    const size_t bytes = (n * sizeof(float) + 63) / 64 * 64;
    if (bytes > TL_AP_MAX) return (float *)aligned_alloc(64, bytes);
    if (bytes > tl_cap) {
        free(tl_ap);
        tl_cap = 0;
        tl_ap = (float *)aligned_alloc(64, bytes);
        if (!tl_ap) return NULL;
        tl_cap = bytes;
    }
    return tl_ap;
}

typedef struct {
    const float *x;
    float *ap;
    int M, K, isa;
} fpack_run;

static void fpack_task(void *ctx, int tid, int nth) {
    const fpack_run *P = (const fpack_run *)ctx;
#if QG_HAVE_X86
    if (P->isa == QG_ISA_AVX512) qg_fpack_a_avx512(P->x, P->M, P->K, P->ap, tid, nth);
    else qg_fpack_a_avx2(P->x, P->M, P->K, P->ap, tid, nth);
#else
    (void)P; (void)tid; (void)nth;
#endif
}

int qg_fgemm(int kind, const float *x, const uint16_t *w, const float *bias, float *y, int M, int N, int K) {
    fg_run R;
    memset(&R, 0, sizeof R);
    R.J.kind = kind;
    R.J.w = w;
    R.J.x = x;
    R.J.bias = bias;
    R.J.y = y;
    R.J.M = M;
    R.J.N = N;
    R.J.K = K;
    R.J.P = (N + 15) / 16;
    R.J.pf = qg_prefetch_bytes();
    R.isa = qg_isa();
    const int nth = qg_pool_threads();
    int chunk;
    if (M <= 4) {                                   /* ~64 KiB of weights per work item */
        chunk = (int)((64 << 10) / ((long)32 * K));
        if (chunk < 1) chunk = 1;
    } else {
        chunk = QG_FG_NP;
    }
    while (chunk > 1 && (R.J.P + chunk - 1) / chunk < 4 * nth) chunk /= 2;
    R.chunk = chunk;
    R.nchunks = (R.J.P + chunk - 1) / chunk;
    atomic_store(&R.next, 0);
    atomic_store(&R.failed, 0);
    float *ap = NULL, *own = NULL;                  /* the blocked kernels' A operand, packed once for all panels */
    if (M > 4 && R.isa != QG_ISA_SCALAR) {
        ap = own = packed_a_buffer((size_t)M * K);
        if (!ap) return -1;
        fpack_run P = {x, ap, M, K, R.isa};
        qg_parallel(fpack_task, &P, nth);
        if (own == tl_ap) own = NULL;               /* the calling thread's buffer, kept for its next call */
        R.J.ap = ap;
    }
    qg_parallel(fgemm_task, &R, nth < R.nchunks ? nth : R.nchunks);
    free(own);
    return atomic_load(&R.failed) ? -1 : 0;
}
