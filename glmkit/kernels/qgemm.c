/*
 * glmkit.kernels._qgemm -- weight-only INT4 / INT8 block-quantized GEMM for small M (decode), CPU.
 *
 * A plain CPython extension (no PyTorch C++ ABI): Python passes tensor data pointers as ints.
 *
 *   y[M, N] (fp32) = x[M, K] (fp32) @ W^T (+ bias[N] fp32)
 *
 * Activations are quantized once per call to int8 per 32-block (one fp32 scale per block, round to
 * nearest even, d = amax / 127), then integer dot products with the block-quantized weights, fp32
 * accumulation with the per-block / per-group scales.  Output rows are split over a persistent pthread
 * pool (the calling thread does a share).
 *
 * ---------------------------------------------------------------------------------------------------
 * Canonical (input) format, see glmkit/quant.py.  W is [N, K], K % group == 0, group % 32 == 0.
 *   q8: qweight int8 [N, K];        w[n,k] = q[n,k] * scales[n, k/group],         scales fp16 [N, K/group]
 *   q4: qweight uint8 [N, K/2];     in 32-block b of row n, byte b*16 + j holds element b*32 + j in its
 *       low nibble and element b*32 + 16 + j in its high nibble; w = (u - 8) * scales[n, k/group].
 *
 * Packed (kernel) layout, made once at load by repack():
 *   Rows are taken 8 at a time ("panels"); P = ceil(N / 8) panels, rows past N are zero (scale 0).
 *   NB = K / 32 blocks per row, NG = K / group scale groups per row.
 *   [quant area]  P * NB blocks, panel-major, then block: one "block tile" holds 8 rows x 32 k:
 *       q8: 256 bytes = 8 chunks j = 0..7 of 32 bytes; chunk j, byte 4*r + i = q[8p + r, 32b + 4j + i]
 *       q4: 128 bytes = 4 chunks j = 0..3 of 32 bytes; chunk j, byte 4*r + i = canonical byte
 *           (16b + 4j + i) of row 8p + r, i.e. low nibble = k 32b + 4j + i, high nibble = k 32b + 16 + 4j + i
 *       so one 32-byte load gives, per 32-bit lane r, four consecutive k of row r: the dot product with
 *       4 activation bytes broadcast to all lanes lands row r's partial sum in lane r (no horizontal sums).
 *   [scale area]  at byte offset P * NB * (128 | 256): P * NG * 8 fp16, scale (p, g, r) = scales[8p + r, g]
 *       (one 16-byte load = the 8 rows' scales of a group, converted with vcvtph2ps).
 *   Total bytes = P * 8 * (K/2 | K) + P * 8 * NG * 2: the canonical size for N % 8 == 0 (see packed_nbytes).
 *
 * Arithmetic (AVX2; a portable scalar path with the same layout and rounding exists for other CPUs/tests):
 *   q8: sum_k q*xq via the sign trick: maddubs(|q|, sign(xq, q)); pairs <= 2*128*127 fit int16.
 *   q4: maddubs(u, xq) with unsigned u in 0..15 and the offset folded out: sum (u-8) x = sum u x - 8 sum x,
 *       sum x precomputed per activation block; int16 partials of a whole 32-block (<= 8*2*15*127 = 30480)
 *       are summed before one madd.
 *   Per block: int32 sums -> fp32, times the activation block scale, accumulated per group, times the 8
 *   rows' group scales (one vector op for 8 rows).  M = 1 has its own register-only kernel; M > 1 runs in
 *   tiles of up to 4 activation rows that share each decoded weight register.
 *
 * Memory: decode is bandwidth-bound, so the kernels stream the packed weights once, with software prefetch
 * for M = 1 on top of the hardware prefetchers (prefetcht0 3072 bytes ahead on Intel, prefetchnta 1536 on
 * others: detect_cpu, QG_PF_STREAM); repack() asks for
 * transparent huge pages on the packed buffer (madvise; effective when the buffer is still untouched).
 *
 * Threads: a persistent pool (set_num_threads; default = CPUs this process may run on).  A call quantizes
 * x on the calling thread, then splits the 8-row panels into ~32 KiB work items; each thread owns a
 * contiguous share (sequential streams for the prefetchers) and steals from the others' shares when done,
 * so a descheduled thread does not stall the call.  Idle workers spin ~50 us (set_spin_us) on an atomic
 * generation counter, then sleep on a condition variable; the caller does a share of the work and yields
 * the CPU if it has to wait long for a worker.  Calls are serialised by a mutex and run without the GIL.
 * fork() in a child resets the pool (threads do not survive fork).
 */
#include "qgemm_internal.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>
#include <float.h>
#include <pthread.h>
#include <sched.h>
#include <time.h>
#include <stdatomic.h>

#if defined(__linux__)
#include <unistd.h>
#include <sys/mman.h>
#endif
#if defined(__APPLE__) || defined(__unix__)
#include <unistd.h>
#endif

#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__)) && !defined(QG_FORCE_PORTABLE)
#define QG_X86 1
#include <immintrin.h>
#include <cpuid.h>
#define QG_TARGET __attribute__((target("avx2,fma,f16c")))
#define QG_INLINE static inline __attribute__((always_inline))
#else
#define QG_X86 0
#endif


/* ================================================================================================= */
/* fp16 -> fp32 (portable)                                                                             */
/* ================================================================================================= */
float qg_half_to_float(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, mant = h & 0x3ff, bits;
    if (exp == 0) {
        if (mant == 0) {
            bits = sign;
        } else {                       /* subnormal */
            float f = (float)mant * (1.0f / 16777216.0f);   /* mant * 2^-24 */
            return (h & 0x8000) ? -f : f;
        }
    } else if (exp == 31) {
        bits = sign | 0x7f800000u | (mant << 13);
    } else {
        bits = sign | ((exp + 112) << 23) | (mant << 13);
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

/* ================================================================================================= */
/* CPU features                                                                                        */
/* ================================================================================================= */
static int g_has_avx2 = 0, g_has_fma = 0, g_has_f16c = 0;
static int g_has_avx512f = 0, g_has_avx512bw = 0, g_has_avx512vl = 0, g_has_vnni = 0, g_has_avx512bf16 = 0,
           g_has_avx512fp16 = 0, g_os_ymm = 0, g_os_zmm = 0;
static int g_isa_best = QG_ISA_SCALAR;  /* the best variant this CPU + OS can run */
static int g_isa_cap = QG_ISA_SCALAR;   /* ... capped by GLMKIT_KERNEL_ISA ('auto' goes back to it) */
static int g_isa = QG_ISA_SCALAR;       /* the variant in use (set_impl for tests) */
static int g_use_avx2 = 0;            /* g_isa >= AVX2: the AVX2 code of the non-GEMM ops (decode_ops.c) */
static char g_isa_env_error[160] = "";

/* tuning knobs (see _tune()) */
int qg_pf_hint = 0;              /* qgemm_internal.h QG_PF_STREAM; set by detect_cpu */
static const char *const pf_hint_names[4] = {"nta", "t0", "t1", "t2"};
static long g_pf = 1536;              /* software prefetch distance in bytes (0: none) */
static long g_chunk_bytes = 32 << 10; /* weight bytes per work item */
static int g_hugepage = 1;           /* madvise(MADV_HUGEPAGE) the packed buffer in repack */
static int g_steal = 1;               /* 1: each thread owns a contiguous share and steals at the end; 0: shared queue */

static const char *isa_name(int isa) {
    return isa == QG_ISA_AVX512 ? "avx512" : isa == QG_ISA_AVX512_EMU ? "avx512-emulated"
         : isa == QG_ISA_AVX2 ? "avx2" : "scalar";
}

/* cpuid for the instructions, XCR0 (xgetbv) for the OS saving the registers: AVX needs the SSE + AVX state
 * (bits 1, 2), AVX-512 also the opmask and both halves of the zmm state (bits 5, 6, 7) */
static void detect_cpu(void) {
#if QG_X86
    unsigned a, b, c, d;
    if (__get_cpuid(0, &a, &b, &c, &d) && b == 0x756e6547 && d == 0x49656e69 && c == 0x6c65746e) {
        /* GenuineIntel: prefetcht0 3072 bytes ahead. Measured on a 2-core Xeon (AVX-512, 2026-12-01, the
         * ChatGLM3-6B linear layers back to back, 2 threads): INT4 216 -> 147 ms a token, INT8 388 -> 302,
         * bf16 172 -> 121 against prefetchnta 1536 (the AMD default, kept there as measured on Zen3) */
        qg_pf_hint = 1;
        g_pf = 3072;
    }
    if (__get_cpuid(1, &a, &b, &c, &d)) {
        g_has_fma = (c >> 12) & 1;
        g_has_f16c = (c >> 29) & 1;
        if ((c >> 27) & 1) {                       /* OSXSAVE: xgetbv is usable */
            unsigned lo, hi;
            __asm__ __volatile__("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
            g_os_ymm = (lo & 0x6) == 0x6;
            g_os_zmm = (lo & 0xe6) == 0xe6;
        }
    }
    if (__get_cpuid_max(0, NULL) >= 7) {
        __cpuid_count(7, 0, a, b, c, d);
        g_has_avx2 = (b >> 5) & 1;
        g_has_avx512f = (b >> 16) & 1;
        g_has_avx512bw = (b >> 30) & 1;
        g_has_avx512vl = (b >> 31) & 1;
        g_has_vnni = (c >> 11) & 1;
        g_has_avx512fp16 = (d >> 23) & 1;
        if (a >= 1) {                              /* leaf 7 has a subleaf 1 */
            __cpuid_count(7, 1, a, b, c, d);
            g_has_avx512bf16 = (a >> 5) & 1;
        }
    }
#endif
    if (g_has_avx2 && g_has_fma && g_has_f16c && g_os_ymm) g_isa_best = QG_ISA_AVX2;
    if (g_isa_best == QG_ISA_AVX2 && g_has_avx512f && g_has_avx512bw && g_has_avx512vl && g_has_vnni && g_os_zmm)
        g_isa_best = QG_ISA_AVX512;
    g_isa_cap = g_isa_best;
    const char *e = getenv("GLMKIT_KERNEL_ISA");  /* a cap: never above what the machine can run */
    if (e && *e && strcmp(e, "auto")) {
        const int want = !strcmp(e, "avx512") ? QG_ISA_AVX512 : !strcmp(e, "avx2") ? QG_ISA_AVX2
                       : !strcmp(e, "scalar") ? QG_ISA_SCALAR : -1;
        if (want < 0)
            snprintf(g_isa_env_error, sizeof g_isa_env_error, "GLMKIT_KERNEL_ISA=%.40s is not one of "
                     "auto, avx512, avx2, scalar", e);
        else if (want < g_isa_cap)
            g_isa_cap = want;
    }
    g_isa = g_isa_cap;
    g_use_avx2 = g_isa >= QG_ISA_AVX2;
}

int qg_isa(void) { return g_isa; }
long qg_prefetch_bytes(void) { return g_pf; }

static double now_s(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

static inline void cpu_relax(void) {
#if QG_X86
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

/* ================================================================================================= */
/* Thread pool                                                                                         */
/* ================================================================================================= */
typedef void (*task_fn)(void *ctx, int tid, int nth);

static struct {
    pthread_t th[QG_MAX_THREADS];
    int started;                   /* worker threads running (the caller is thread 0, not counted) */
    int nthreads;                  /* wanted total incl. the caller */
    _Atomic unsigned gen;          /* bumped once per job */
    _Atomic int pending;           /* workers that have not finished the current job */
    _Atomic int sleepers;
    _Atomic int stop;
    task_fn fn;
    void *ctx;
    int njob;                      /* threads taking part in the current job */
    pthread_mutex_t mu;
    pthread_cond_t cv;
    double spin_s;                 /* how long an idle worker spins before sleeping */
} P = {.mu = PTHREAD_MUTEX_INITIALIZER, .cv = PTHREAD_COND_INITIALIZER, .spin_s = 50e-6};

/* serialises callers: one gemm (or set_num_threads) at a time uses the pool */
static pthread_mutex_t g_call_mu = PTHREAD_MUTEX_INITIALIZER;

typedef struct { int tid; unsigned gen0; } worker_arg;
static worker_arg g_wargs[QG_MAX_THREADS];

static void *worker_main(void *arg) {
    const int tid = ((worker_arg *)arg)->tid;
    unsigned seen = ((worker_arg *)arg)->gen0;     /* the generation before this worker existed */
    for (;;) {
        unsigned g = atomic_load_explicit(&P.gen, memory_order_acquire);
        if (g == seen) {
            double t0 = now_s(), lim = P.spin_s;
            int it = 0;
            while ((g = atomic_load_explicit(&P.gen, memory_order_acquire)) == seen) {
                cpu_relax();
                if (++it == 64) {
                    it = 0;
                    if (now_s() - t0 > lim) break;
                }
            }
            if (g == seen) {
                pthread_mutex_lock(&P.mu);
                atomic_fetch_add(&P.sleepers, 1);
                while ((g = atomic_load(&P.gen)) == seen && !atomic_load(&P.stop))
                    pthread_cond_wait(&P.cv, &P.mu);
                atomic_fetch_sub(&P.sleepers, 1);
                pthread_mutex_unlock(&P.mu);
            }
        }
        seen = g;
        if (atomic_load(&P.stop)) break;
        if (tid < P.njob) P.fn(P.ctx, tid, P.njob);
        atomic_fetch_sub_explicit(&P.pending, 1, memory_order_release);
    }
    return NULL;
}

static void pool_stop(void) {
    if (P.started == 0) return;
    pthread_mutex_lock(&P.mu);
    atomic_store(&P.stop, 1);
    atomic_fetch_add(&P.gen, 1);
    pthread_cond_broadcast(&P.cv);
    pthread_mutex_unlock(&P.mu);
    for (int i = 0; i < P.started; i++) pthread_join(P.th[i + 1], NULL);
    P.started = 0;
    atomic_store(&P.stop, 0);
}

static void pool_start(void) {        /* starts nthreads - 1 workers; call with g_call_mu held */
    int want = P.nthreads - 1;
    if (P.started == want) return;
    pool_stop();
    for (int i = 0; i < want; i++) {
        g_wargs[i + 1].tid = i + 1;
        g_wargs[i + 1].gen0 = atomic_load(&P.gen);
        if (pthread_create(&P.th[i + 1], NULL, worker_main, &g_wargs[i + 1]) != 0) {
            want = i;
            break;
        }
        P.started = i + 1;
    }
    P.started = want;
}

/* run fn(ctx, tid, n) on n = min(nth, started + 1) threads; the caller is tid 0 */
static void pool_run(task_fn fn, void *ctx, int nth) {
    if (nth > P.started + 1) nth = P.started + 1;
    if (nth <= 1) {
        fn(ctx, 0, 1);
        return;
    }
    P.fn = fn;
    P.ctx = ctx;
    P.njob = nth;
    atomic_store(&P.pending, P.started);
    atomic_fetch_add(&P.gen, 1);                 /* seq_cst: pairs with the sleepers check below */
    if (atomic_load(&P.sleepers) > 0) {
        pthread_mutex_lock(&P.mu);
        pthread_cond_broadcast(&P.cv);
        pthread_mutex_unlock(&P.mu);
    }
    fn(ctx, 0, nth);
    /* wait for the workers (usually at most a chunk's time); if one is not running (more runnable threads
     * than cores), yield the CPU instead of spinning against it */
    for (int it = 0; atomic_load_explicit(&P.pending, memory_order_acquire) > 0; it++) {
        if (it < 4096) {
            cpu_relax();
        } else {
            sched_yield();
        }
    }
}

static void atfork_child(void) {            /* the threads did not survive fork(): start afresh */
    P.started = 0;
    atomic_store(&P.pending, 0);
    atomic_store(&P.sleepers, 0);
    atomic_store(&P.stop, 0);
    pthread_mutex_init(&P.mu, NULL);
    pthread_cond_init(&P.cv, NULL);
    pthread_mutex_init(&g_call_mu, NULL);
}

static int default_threads(void) {
    long n = 1;
#if defined(__linux__) && defined(CPU_COUNT)
    cpu_set_t cs;
    if (sched_getaffinity(0, sizeof cs, &cs) == 0) n = CPU_COUNT(&cs);   /* honours taskset / cpusets */
    else
#endif
#if defined(_SC_NPROCESSORS_ONLN)
    n = sysconf(_SC_NPROCESSORS_ONLN);
#endif
    if (n < 1) n = 1;
    if (n > QG_MAX_THREADS) n = QG_MAX_THREADS;
    return (int)n;
}

/* ================================================================================================= */
/* Scratch: quantized activations                                                                      */
/* ================================================================================================= */

static void *g_scratch = NULL;
static size_t g_scratch_n = 0;

static void *scratch(size_t n) {         /* call with g_call_mu held */
    if (n > g_scratch_n) {
        free(g_scratch);
        g_scratch = NULL;
        g_scratch_n = 0;
        void *p = NULL;
        if (posix_memalign(&p, 64, n + 64) != 0) return NULL;
        g_scratch = p;
        g_scratch_n = n;
    }
    return g_scratch;
}

static void quantize_x_scalar(const float *x, int M, int K, xquant *xq) {
    const int NB = K / 32;
    for (int m = 0; m < M; m++) {
        for (int b = 0; b < NB; b++) {
            const float *v = x + (size_t)m * K + (size_t)b * 32;
            float amax = 0.f;
            int nan = 0;
            for (int i = 0; i < 32; i++) {
                amax = fmaxf(amax, fabsf(v[i]));
                nan |= v[i] != v[i];
            }
            float d = amax / 127.f, id = amax > 0.f ? 127.f / amax : 0.f;
            if (id > FLT_MAX) d = id = 0.f;
            if (nan) d = NAN;
            int8_t *q = xq->q + (size_t)m * K + (size_t)b * 32;
            int s = 0;
            for (int i = 0; i < 32; i++) {
                const float f = v[i] * id;
                int t = f != f ? 0 : (f > 127.f ? 127 : (f < -127.f ? -127 : (int)nearbyintf(f)));
                q[i] = (int8_t)t;
                s += t;
            }
            xq->d[(size_t)m * NB + b] = d;
            xq->s[(size_t)m * NB + b] = 8 * s;
        }
    }
}

/* ================================================================================================= */
/* GEMM job                                                                                            */
/* ================================================================================================= */

/* ---------------- portable scalar panel kernel (reference semantics for the AVX2 one) ------------ */
static void panel_scalar(const gemm_job *J, int p) {
    const int NB = J->NB, NG = J->NG, bpg = J->group / 32, K = J->K;
    const size_t tile = J->kind == 4 ? 128 : 256;
    const uint8_t *qp = J->wq + (size_t)p * NB * tile;
    const uint16_t *sp = J->ws + (size_t)p * NG * 8;
    for (int m = 0; m < J->M; m++) {
        const int8_t *xq = J->xq.q + (size_t)m * K;
        const float *xd = J->xq.d + (size_t)m * NB;
        float acc[8] = {0};
        for (int g = 0; g < NG; g++) {
            float gacc[8] = {0};
            for (int bb = 0; bb < bpg; bb++) {
                const int b = g * bpg + bb;
                const uint8_t *t = qp + (size_t)b * tile;
                const int8_t *x = xq + (size_t)b * 32;
                for (int r = 0; r < 8; r++) {
                    int32_t s = 0;
                    if (J->kind == 4) {
                        for (int j = 0; j < 4; j++)
                            for (int i = 0; i < 4; i++) {
                                const uint8_t byte = t[j * 32 + r * 4 + i];
                                s += ((int)(byte & 15) - 8) * x[4 * j + i] + ((int)(byte >> 4) - 8) * x[16 + 4 * j + i];
                            }
                    } else {
                        for (int j = 0; j < 8; j++)
                            for (int i = 0; i < 4; i++) s += (int)(int8_t)t[j * 32 + r * 4 + i] * x[4 * j + i];
                    }
                    gacc[r] += (float)s * xd[b];
                }
            }
            for (int r = 0; r < 8; r++) acc[r] += gacc[r] * qg_half_to_float(sp[g * 8 + r]);
        }
        const int n0 = p * 8;
        for (int r = 0; r < 8 && n0 + r < J->N; r++)
            J->y[(size_t)m * J->N + n0 + r] = acc[r] + (J->bias ? J->bias[n0 + r] : 0.f);
    }
}

#if QG_X86
/* ---------------- AVX2 -------------------------------------------------------------------------- */

QG_TARGET static void quantize_x_avx2(const float *x, int M, int K, xquant *xq) {
    const int NB = K / 32;
    const __m256 signbit = _mm256_set1_ps(-0.0f);
    const __m256i perm = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    for (int m = 0; m < M; m++) {
        for (int b = 0; b < NB; b++) {
            const float *v = x + (size_t)m * K + (size_t)b * 32;
            __m256 v0 = _mm256_loadu_ps(v), v1 = _mm256_loadu_ps(v + 8);
            __m256 v2 = _mm256_loadu_ps(v + 16), v3 = _mm256_loadu_ps(v + 24);
            __m256 a = _mm256_max_ps(_mm256_max_ps(_mm256_andnot_ps(signbit, v0), _mm256_andnot_ps(signbit, v1)),
                                     _mm256_max_ps(_mm256_andnot_ps(signbit, v2), _mm256_andnot_ps(signbit, v3)));
            __m128 h = _mm_max_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
            h = _mm_max_ps(h, _mm_movehl_ps(h, h));
            h = _mm_max_ss(h, _mm_movehdup_ps(h));
            const float amax = _mm_cvtss_f32(h);
            float d = amax / 127.f, id = amax > 0.f ? 127.f / amax : 0.f;
            if (id > FLT_MAX) d = id = 0.f;          /* subnormal block: 127 / amax overflows; ~0 anyway */
            {   /* max_ps drops NaNs: make a NaN in the block give a NaN scale, so it reaches the output */
                const __m256 u = _mm256_or_ps(_mm256_or_ps(_mm256_cmp_ps(v0, v0, _CMP_UNORD_Q), _mm256_cmp_ps(v1, v1, _CMP_UNORD_Q)),
                                              _mm256_or_ps(_mm256_cmp_ps(v2, v2, _CMP_UNORD_Q), _mm256_cmp_ps(v3, v3, _CMP_UNORD_Q)));
                if (_mm256_movemask_ps(u)) d = NAN;
            }
            const __m256 vid = _mm256_set1_ps(id);
            const int rn = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
            __m256i i0 = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v0, vid), rn));
            __m256i i1 = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v1, vid), rn));
            __m256i i2 = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v2, vid), rn));
            __m256i i3 = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v3, vid), rn));
            __m256i s = _mm256_add_epi32(_mm256_add_epi32(i0, i1), _mm256_add_epi32(i2, i3));
            __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
            s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4e));
            s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xb1));
            __m256i q = _mm256_packs_epi16(_mm256_packs_epi32(i0, i1), _mm256_packs_epi32(i2, i3));
            q = _mm256_permutevar8x32_epi32(q, perm);
            _mm256_storeu_si256((__m256i *)(xq->q + (size_t)m * K + (size_t)b * 32), q);
            xq->d[(size_t)m * NB + b] = d;
            xq->s[(size_t)m * NB + b] = 8 * _mm_cvtsi128_si32(s4);
        }
    }
}

/* software prefetch of the weight stream, `pf` bytes ahead (measured: ~+10% at 2 threads over the hardware
 * prefetchers alone on Zen3).  M = 1 reads each weight once: the hint per CPU (QG_PF_STREAM: non-temporal on
 * AMD, t0 on Intel).  M-tiled kernels re-read a panel for each tile of activation rows: keep it cached
 * (QG_PF_KEEP). Both macros are in qgemm_internal.h, shared with the VNNI and float kernels. */

/* keeps a value in a register at this point: stops the compiler from re-associating a chain of integer adds
 * into a tree that needs all its terms live at once (which spills) */
#define QG_KEEP(v) __asm__("" : "+x"(v))

QG_INLINE QG_TARGET __m256i bcast4(const int8_t *p) {
    int32_t v;
    memcpy(&v, p, 4);
    return _mm256_set1_epi32(v);
}


/* MT (<= 4) activation rows x one 8-row panel.  out[m] = 8 lanes: the panel's rows for activation row m.
 * Weights are decoded once per 32-byte load and used for all MT rows; per block and row the int32 sums get
 * their scale with one multiply (ws * dx) and one FMA. */
QG_INLINE QG_TARGET void q4_tile(const uint8_t *restrict qp, const uint16_t *restrict sp, int NB, int bpg,
                                 const int8_t *restrict xq, const float *restrict xd, const int32_t *restrict xs,
                                 int K, const int MT, __m256 *out, const long pf) {
    const __m256i m4 = _mm256_set1_epi8(0x0f);
    const __m256i ones = _mm256_set1_epi16(1);
    __m256 acc[4];
    for (int m = 0; m < MT; m++) acc[m] = _mm256_setzero_ps();
    __m256 ws = _mm256_setzero_ps();
    for (int b = 0, bg = 0; b < NB; b++, bg--) {
        if (bg == 0) {
            ws = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)sp));
            sp += 8;
            bg = bpg;
        }
        const uint8_t *q = qp + (size_t)b * 128;
        if (pf) {
            QG_PF_KEEP((const char *)q + pf);
            QG_PF_KEEP((const char *)q + pf + 64);
        }
        __m256i s16[4];
        for (int j = 0; j < 4; j++) {
            const __m256i v = _mm256_loadu_si256((const __m256i *)(q + 32 * j));
            const __m256i lo = _mm256_and_si256(v, m4), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
            for (int m = 0; m < MT; m++) {
                const int8_t *x = xq + (size_t)m * K + (size_t)b * 32 + 4 * j;
                const __m256i t = _mm256_add_epi16(_mm256_maddubs_epi16(lo, bcast4(x)),
                                                   _mm256_maddubs_epi16(hi, bcast4(x + 16)));
                s16[m] = j ? _mm256_add_epi16(s16[m], t) : t;
                QG_KEEP(s16[m]);
            }
        }
        for (int m = 0; m < MT; m++) {
            const __m256i i32 = _mm256_sub_epi32(_mm256_madd_epi16(s16[m], ones),
                                                 _mm256_set1_epi32(xs[(size_t)m * NB + b]));
            acc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(i32),
                                     _mm256_mul_ps(ws, _mm256_set1_ps(xd[(size_t)m * NB + b])), acc[m]);
        }
    }
    for (int m = 0; m < MT; m++) out[m] = acc[m];
}

QG_INLINE QG_TARGET void q8_tile(const uint8_t *restrict qp, const uint16_t *restrict sp, int NB, int bpg,
                                 const int8_t *restrict xq, const float *restrict xd, int K, const int MT,
                                 __m256 *out, const long pf) {
    const __m256i ones = _mm256_set1_epi16(1);
    __m256 acc[4];
    for (int m = 0; m < MT; m++) acc[m] = _mm256_setzero_ps();
    __m256 ws = _mm256_setzero_ps();
    for (int b = 0, bg = 0; b < NB; b++, bg--) {
        if (bg == 0) {
            ws = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)sp));
            sp += 8;
            bg = bpg;
        }
        const uint8_t *q = qp + (size_t)b * 256;
        if (pf) {
            QG_PF_KEEP((const char *)q + pf);
            QG_PF_KEEP((const char *)q + pf + 64);
            QG_PF_KEEP((const char *)q + pf + 128);
            QG_PF_KEEP((const char *)q + pf + 192);
        }
        __m256i i32[4];
        for (int j = 0; j < 8; j++) {
            const __m256i w = _mm256_loadu_si256((const __m256i *)(q + 32 * j));
            const __m256i a = _mm256_sign_epi8(w, w);
            for (int m = 0; m < MT; m++) {
                const int8_t *x = xq + (size_t)m * K + (size_t)b * 32 + 4 * j;
                const __m256i t = _mm256_madd_epi16(_mm256_maddubs_epi16(a, _mm256_sign_epi8(bcast4(x), w)), ones);
                i32[m] = j ? _mm256_add_epi32(i32[m], t) : t;
                QG_KEEP(i32[m]);
            }
        }
        for (int m = 0; m < MT; m++)
            acc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(i32[m]),
                                     _mm256_mul_ps(ws, _mm256_set1_ps(xd[(size_t)m * NB + b])), acc[m]);
    }
    for (int m = 0; m < MT; m++) out[m] = acc[m];
}

/* M = 1 (decode): the same arithmetic as q4_tile / q8_tile, written out so everything stays in registers */
QG_INLINE QG_TARGET __m256 q4_row1(const uint8_t *restrict qp, const uint16_t *restrict sp, int NB, int bpg,
                                   const int8_t *restrict x, const float *restrict xd,
                                   const int32_t *restrict xs, const long pf) {
    const __m256i m4 = _mm256_set1_epi8(0x0f);
    const __m256i ones = _mm256_set1_epi16(1);
    __m256 acc = _mm256_setzero_ps();
    const uint8_t *q = qp;
    for (int b = 0; b < NB; sp += 8) {
        const __m256 ws = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)sp));
        __m256 gacc = _mm256_setzero_ps();
        for (int bb = 0; bb < bpg; bb++, b++, q += 128, x += 32) {
            if (pf) {
                QG_PF_STREAM((const char *)q + pf);
                QG_PF_STREAM((const char *)q + pf + 64);
            }
            const __m256i v0 = _mm256_loadu_si256((const __m256i *)q);
            const __m256i v1 = _mm256_loadu_si256((const __m256i *)(q + 32));
            const __m256i v2 = _mm256_loadu_si256((const __m256i *)(q + 64));
            const __m256i v3 = _mm256_loadu_si256((const __m256i *)(q + 96));
            __m256i s0 = _mm256_maddubs_epi16(_mm256_and_si256(v0, m4), bcast4(x + 0));
            __m256i s1 = _mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi16(v0, 4), m4), bcast4(x + 16));
            __m256i s2 = _mm256_maddubs_epi16(_mm256_and_si256(v1, m4), bcast4(x + 4));
            __m256i s3 = _mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi16(v1, 4), m4), bcast4(x + 20));
            s0 = _mm256_add_epi16(s0, _mm256_maddubs_epi16(_mm256_and_si256(v2, m4), bcast4(x + 8)));
            s1 = _mm256_add_epi16(s1, _mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi16(v2, 4), m4), bcast4(x + 24)));
            s2 = _mm256_add_epi16(s2, _mm256_maddubs_epi16(_mm256_and_si256(v3, m4), bcast4(x + 12)));
            s3 = _mm256_add_epi16(s3, _mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi16(v3, 4), m4), bcast4(x + 28)));
            const __m256i s = _mm256_add_epi16(_mm256_add_epi16(s0, s1), _mm256_add_epi16(s2, s3));
            const __m256i i32 = _mm256_sub_epi32(_mm256_madd_epi16(s, ones), _mm256_set1_epi32(xs[b]));
            gacc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(i32), _mm256_set1_ps(xd[b]), gacc);
        }
        acc = _mm256_fmadd_ps(gacc, ws, acc);
    }
    return acc;
}

QG_INLINE QG_TARGET __m256 q8_row1(const uint8_t *restrict qp, const uint16_t *restrict sp, int NB, int bpg,
                                   const int8_t *restrict x, const float *restrict xd, const long pf) {
    const __m256i ones = _mm256_set1_epi16(1);
    __m256 acc = _mm256_setzero_ps();
    const uint8_t *q = qp;
    for (int b = 0; b < NB; sp += 8) {
        const __m256 ws = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)sp));
        __m256 gacc = _mm256_setzero_ps();
        for (int bb = 0; bb < bpg; bb++, b++, q += 256, x += 32) {
            if (pf) {
                QG_PF_STREAM((const char *)q + pf);
                QG_PF_STREAM((const char *)q + pf + 64);
                QG_PF_STREAM((const char *)q + pf + 128);
                QG_PF_STREAM((const char *)q + pf + 192);
            }
            __m256i i0, i1;
#define QG_Q8_STEP(j, acc_)                                                                             \
            {                                                                                           \
                const __m256i w = _mm256_loadu_si256((const __m256i *)(q + 32 * (j)));                  \
                const __m256i p = _mm256_maddubs_epi16(_mm256_sign_epi8(w, w),                          \
                                                       _mm256_sign_epi8(bcast4(x + 4 * (j)), w));       \
                acc_ = _mm256_madd_epi16(p, ones);                                                      \
            }
            __m256i t;
            QG_Q8_STEP(0, i0)
            QG_Q8_STEP(1, i1)
            QG_Q8_STEP(2, t) i0 = _mm256_add_epi32(i0, t);
            QG_Q8_STEP(3, t) i1 = _mm256_add_epi32(i1, t);
            QG_Q8_STEP(4, t) i0 = _mm256_add_epi32(i0, t);
            QG_Q8_STEP(5, t) i1 = _mm256_add_epi32(i1, t);
            QG_Q8_STEP(6, t) i0 = _mm256_add_epi32(i0, t);
            QG_Q8_STEP(7, t) i1 = _mm256_add_epi32(i1, t);
#undef QG_Q8_STEP
            gacc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_add_epi32(i0, i1)), _mm256_set1_ps(xd[b]), gacc);
        }
        acc = _mm256_fmadd_ps(gacc, ws, acc);
    }
    return acc;
}

QG_INLINE QG_TARGET void store_rows(const gemm_job *J, int p, int m0, int MT, const __m256 *acc) {
    const int n0 = p * 8;
    const int full = n0 + 8 <= J->N;
    __m256 bv = _mm256_setzero_ps();
    if (J->bias) {
        if (full) {
            bv = _mm256_loadu_ps(J->bias + n0);
        } else {
            float tb[8] = {0};
            for (int r = 0; n0 + r < J->N; r++) tb[r] = J->bias[n0 + r];
            bv = _mm256_loadu_ps(tb);
        }
    }
    for (int m = 0; m < MT; m++) {
        float *yr = J->y + (size_t)(m0 + m) * J->N + n0;
        const __m256 v = _mm256_add_ps(acc[m], bv);
        if (full) {
            _mm256_storeu_ps(yr, v);
        } else {
            float t[8];
            _mm256_storeu_ps(t, v);
            for (int r = 0; n0 + r < J->N; r++) yr[r] = t[r];
        }
    }
}

#define QG_TILE_CASE(MT_)                                                                                    \
    case MT_: {                                                                                              \
        __m256 acc[MT_];                                                                                     \
        if (J->kind == 4)                                                                                    \
            q4_tile(qp, sp, NB, bpg, J->xq.q + (size_t)m0 * K, J->xq.d + (size_t)m0 * NB,                   \
                    J->xq.s + (size_t)m0 * NB, K, MT_, acc, g_pf);                                                 \
        else                                                                                                 \
            q8_tile(qp, sp, NB, bpg, J->xq.q + (size_t)m0 * K, J->xq.d + (size_t)m0 * NB, K, MT_, acc, g_pf);    \
        store_rows(J, p, m0, MT_, acc);                                                                      \
        break;                                                                                               \
    }

QG_TARGET static void panel_avx2(const gemm_job *J, int p) {
    const int NB = J->NB, K = J->K, bpg = J->group / 32;
    const size_t tile = J->kind == 4 ? 128 : 256;
    const uint8_t *qp = J->wq + (size_t)p * NB * tile;
    const uint16_t *sp = J->ws + (size_t)p * J->NG * 8;
    if (J->M == 1) {
        __m256 acc = J->kind == 4 ? q4_row1(qp, sp, NB, bpg, J->xq.q, J->xq.d, J->xq.s, g_pf)
                                  : q8_row1(qp, sp, NB, bpg, J->xq.q, J->xq.d, g_pf);
        store_rows(J, p, 0, 1, &acc);
        return;
    }
    for (int m0 = 0; m0 < J->M;) {
        int mt = J->M - m0;
        if (mt > 4) mt = (mt == 5 || mt == 6) ? 3 : 4;   /* 5 -> 3+2, 6 -> 3+3, 7 -> 4+3, ... */
        switch (mt) {
            QG_TILE_CASE(1)
            QG_TILE_CASE(2)
            QG_TILE_CASE(3)
            QG_TILE_CASE(4)
        }
        m0 += mt;
    }
}
#endif /* QG_X86 */

static void gemm_task(void *ctx, int tid, int nth) {
    gemm_job *J = (gemm_job *)ctx;
    int v = tid;                                /* queue being drained: own first, then the others' */
    for (int tries = 0; tries < nth;) {
        const int c = atomic_fetch_add_explicit(&J->q[v].next, 1, memory_order_relaxed);
        if (c >= J->q[v].end) {
            v = v + 1 == nth ? 0 : v + 1;
            tries++;
            continue;
        }
        const int p0 = c * J->chunk;
        const int p1 = p0 + J->chunk < J->P ? p0 + J->chunk : J->P;
#if QG_X86
        if (g_isa == QG_ISA_AVX512) {
            for (int p = p0; p < p1; p++) qg_qpanel_vnni(J, p);
            continue;
        }
        if (g_isa == QG_ISA_AVX512_EMU) {
            for (int p = p0; p < p1; p++) qg_qpanel_vnni_emu(J, p);
            continue;
        }
        if (g_use_avx2) {
            for (int p = p0; p < p1; p++) panel_avx2(J, p);
            continue;
        }
#endif
        for (int p = p0; p < p1; p++) panel_scalar(J, p);
    }
}

/* ================================================================================================= */
/* Layout helpers                                                                                      */
/* ================================================================================================= */
static int is_float_kind(long long kind) { return kind == QG_KIND_F16 || kind == QG_KIND_BF16; }

static int check_shape(int kind, long long N, long long K, long long group, char *err, size_t errn) {
    if (is_float_kind(kind)) {
        if (N < 1 || K < 1 || N > (1LL << 30) || K > (1LL << 30)) {
            snprintf(err, errn, "bad shape N=%lld K=%lld (need 1 <= N, K <= 2^30)", N, K);
            return -1;
        }
        return 0;
    }
    if (kind != 4 && kind != 8) {
        snprintf(err, errn, "kind must be 4, 8, 16 (fp16) or 17 (bf16), not %d", kind);
        return -1;
    }
    if (N < 1 || K < 32 || group < 32 || group % 32 || K % group) {
        snprintf(err, errn, "bad shape N=%lld K=%lld group=%lld (need N >= 1, group %% 32 == 0, K %% group == 0)",
                 N, K, group);
        return -1;
    }
    if (N > (1LL << 30) || K > (1LL << 30)) {
        snprintf(err, errn, "shape too large");
        return -1;
    }
    return 0;
}

static size_t quant_area(int kind, long long N, long long K) {
    if (is_float_kind(kind)) return qg_fpacked_bytes(N, K);        /* no scale area */
    const long long P = (N + 7) / 8;
    return (size_t)P * 8 * (size_t)(kind == 4 ? K / 2 : K);
}

static size_t packed_bytes(int kind, long long N, long long K, long long group) {
    if (is_float_kind(kind)) return qg_fpacked_bytes(N, K);
    const long long P = (N + 7) / 8;
    return quant_area(kind, N, K) + (size_t)P * 8 * (size_t)(K / group) * 2;
}

typedef struct {
    int kind;
    const uint8_t *qw;
    const uint16_t *sc;
    uint8_t *out;
    long long N, K, group;
} repack_job;

static void repack_task(void *ctx, int tid, int nth) {
    const repack_job *R = (const repack_job *)ctx;
    const long long N = R->N, K = R->K, P = (N + 7) / 8, NB = K / 32, NG = K / R->group;
    const long long p0 = P * tid / nth, p1 = P * (tid + 1) / nth;
    const size_t tile = R->kind == 4 ? 128 : 256;
    const size_t rowb = R->kind == 4 ? (size_t)K / 2 : (size_t)K;
    uint16_t *so = (uint16_t *)(R->out + quant_area(R->kind, N, K));
    for (long long p = p0; p < p1; p++) {
        uint8_t *o = R->out + (size_t)p * NB * tile;
        for (long long b = 0; b < NB; b++, o += tile) {
            for (int r = 0; r < 8; r++) {
                const long long n = p * 8 + r;
                if (n >= N) {
                    for (size_t j = 0; j < tile / 32; j++) {
                        /* padding rows: q4 nibbles 8 (= 0) would also do; zeros with scale 0 are simplest */
                        memset(o + j * 32 + r * 4, 0, 4);
                    }
                    continue;
                }
                const uint8_t *src = R->qw + (size_t)n * rowb + (size_t)b * (tile / 8);
                for (size_t j = 0; j < tile / 32; j++) memcpy(o + j * 32 + r * 4, src + 4 * j, 4);
            }
        }
        for (long long g = 0; g < NG; g++)
            for (int r = 0; r < 8; r++) {
                const long long n = p * 8 + r;
                so[((size_t)p * NG + g) * 8 + r] = n < N ? R->sc[(size_t)n * NG + g] : 0;
            }
    }
}

/* ================================================================================================= */
/* Streaming read (memory bandwidth reference)                                                         */
/* ================================================================================================= */
typedef struct {
    const uint8_t *p;
    size_t n;
    uint64_t sums[QG_MAX_THREADS];
} read_job;

#if QG_X86
QG_TARGET static uint64_t read_avx2(const uint8_t *p, size_t n) {
    __m256i s0 = _mm256_setzero_si256(), s1 = s0, s2 = s0, s3 = s0;
    size_t i = 0;
    for (; i + 128 <= n; i += 128) {
        s0 = _mm256_add_epi32(s0, _mm256_loadu_si256((const __m256i *)(p + i)));
        s1 = _mm256_add_epi32(s1, _mm256_loadu_si256((const __m256i *)(p + i + 32)));
        s2 = _mm256_add_epi32(s2, _mm256_loadu_si256((const __m256i *)(p + i + 64)));
        s3 = _mm256_add_epi32(s3, _mm256_loadu_si256((const __m256i *)(p + i + 96)));
    }
    s0 = _mm256_add_epi32(_mm256_add_epi32(s0, s1), _mm256_add_epi32(s2, s3));
    uint64_t r = (uint64_t)(uint32_t)_mm256_extract_epi32(s0, 0) + (uint32_t)_mm256_extract_epi32(s0, 5);
    for (; i < n; i++) r += p[i];
    return r;
}
#endif

static void read_task(void *ctx, int tid, int nth) {
    read_job *R = (read_job *)ctx;
    size_t a = R->n / nth * tid & ~(size_t)63, b = tid == nth - 1 ? R->n : (R->n / nth * (tid + 1) & ~(size_t)63);
#if QG_X86
    if (g_has_avx2) {
        R->sums[tid] = read_avx2(R->p + a, b - a);
        return;
    }
#endif
    const uint64_t *q = (const uint64_t *)(R->p + a);
    uint64_t s = 0;
    for (size_t i = 0; i < (b - a) / 8; i++) s += q[i];
    R->sums[tid] = s;
}

/* ================================================================================================= */
/* Python bindings                                                                                     */
/* ================================================================================================= */
static int arg_ptr(PyObject *o, void **out) {
    if (o == Py_None) {
        *out = NULL;
        return 0;
    }
    unsigned long long v = PyLong_AsUnsignedLongLong(o);
    if (v == (unsigned long long)-1 && PyErr_Occurred()) return -1;
    *out = (void *)(uintptr_t)v;
    return 0;
}

static int arg_ll(PyObject *o, long long *out) {
    long long v = PyLong_AsLongLong(o);
    if (v == -1 && PyErr_Occurred()) return -1;
    *out = v;
    return 0;
}

static void ensure_pool(void) {            /* g_call_mu held */
    if (P.nthreads <= 0) P.nthreads = default_threads();
    if (P.started != P.nthreads - 1) pool_start();
}

/* --- for decode_ops.c (qgemm_internal.h) --- */
int qg_arg_ptr(PyObject *o, void **out) { return arg_ptr(o, out); }
int qg_arg_ll(PyObject *o, long long *out) { return arg_ll(o, out); }
int qg_impl_avx2(void) { return g_use_avx2; }

int qg_pool_threads(void) { return P.nthreads > 0 ? P.nthreads : default_threads(); }

void qg_parallel(qg_task_fn fn, void *ctx, int max_threads) {
    pthread_mutex_lock(&g_call_mu);
    ensure_pool();
    pool_run(fn, ctx, max_threads);
    pthread_mutex_unlock(&g_call_mu);
}

PyDoc_STRVAR(gemm_doc,
"gemm(kind, x_ptr, wq_ptr, ws_ptr, bias_ptr, y_ptr, M, N, K, group)\n--\n\n"
"y[M,N] fp32 = x[M,K] fp32 @ W^T (+ bias). W in the packed layout: wq_ptr = quant area, ws_ptr = scale area\n"
"(packed + packed_scales_offset(...)). bias_ptr 0/None for no bias. All pointers are raw addresses.");

static PyObject *py_gemm(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (nargs != 10) {
        PyErr_SetString(PyExc_TypeError, "gemm expects 10 arguments");
        return NULL;
    }
    long long kind, M, N, K, group;
    void *x, *wq, *ws, *bias, *y;
    if (arg_ll(args[0], &kind) || arg_ptr(args[1], &x) || arg_ptr(args[2], &wq) || arg_ptr(args[3], &ws) ||
        arg_ptr(args[4], &bias) || arg_ptr(args[5], &y) || arg_ll(args[6], &M) || arg_ll(args[7], &N) ||
        arg_ll(args[8], &K) || arg_ll(args[9], &group))
        return NULL;
    char err[200];
    if (check_shape((int)kind, N, K, group, err, sizeof err)) {
        PyErr_SetString(PyExc_ValueError, err);
        return NULL;
    }
    if (M < 0 || M > (1 << 24)) {
        PyErr_SetString(PyExc_ValueError, "bad M");
        return NULL;
    }
    if (M == 0) Py_RETURN_NONE;
    if (!x || !wq || !ws || !y) {
        PyErr_SetString(PyExc_ValueError, "null pointer");
        return NULL;
    }

    int fail = 0;
    if (is_float_kind(kind)) {
        Py_BEGIN_ALLOW_THREADS
        fail = qg_fgemm((int)kind, (const float *)x, (const uint16_t *)wq, (const float *)bias, (float *)y, (int)M,
                        (int)N, (int)K);
        Py_END_ALLOW_THREADS
        if (fail) return PyErr_NoMemory();
        Py_RETURN_NONE;
    }
    Py_BEGIN_ALLOW_THREADS
    pthread_mutex_lock(&g_call_mu);
    const int NB = (int)(K / 32);
    const size_t qbytes = ((size_t)M * K + 63) & ~(size_t)63, fbytes = ((size_t)M * NB * 4 + 63) & ~(size_t)63;
    uint8_t *s = (uint8_t *)scratch(qbytes + 2 * fbytes);
    if (!s) {
        fail = 1;
    } else {
        gemm_job J;
        J.kind = (int)kind;
        J.wq = (const uint8_t *)wq;
        J.ws = (const uint16_t *)ws;
        J.bias = (const float *)bias;
        J.y = (float *)y;
        J.M = (int)M;
        J.N = (int)N;
        J.K = (int)K;
        J.group = (int)group;
        J.NB = NB;
        J.NG = (int)(K / group);
        J.P = (int)((N + 7) / 8);
        J.xq.q = (int8_t *)s;
        J.xq.d = (float *)(s + qbytes);
        J.xq.s = (int32_t *)(s + qbytes + fbytes);
#if QG_X86
        if (g_use_avx2)
            quantize_x_avx2((const float *)x, J.M, J.K, &J.xq);
        else
#endif
            quantize_x_scalar((const float *)x, J.M, J.K, &J.xq);
        ensure_pool();
        int nth = P.nthreads;
        /* work items: ~64 KiB of weights each (and >= 4 per thread when there is enough work) */
        const size_t panel_bytes = (size_t)8 * (kind == 4 ? K / 2 : K);
        int chunk = (int)(g_chunk_bytes / (long)panel_bytes);
        if (chunk < 1) chunk = 1;
        while (chunk > 1 && (J.P + chunk - 1) / chunk < 4 * nth) chunk /= 2;
        J.chunk = chunk;
        J.nchunks = (J.P + chunk - 1) / chunk;
        if (nth > J.nchunks) nth = J.nchunks;
        J.nth = nth;
        for (int t = 0; t < nth; t++) {
            if (g_steal) {       /* contiguous share per thread */
                atomic_store_explicit(&J.q[t].next, (int)((long)J.nchunks * t / nth), memory_order_relaxed);
                J.q[t].end = (int)((long)J.nchunks * (t + 1) / nth);
            } else {             /* one shared queue */
                atomic_store_explicit(&J.q[t].next, t == 0 ? 0 : J.nchunks, memory_order_relaxed);
                J.q[t].end = J.nchunks;
            }
        }
        pool_run(gemm_task, &J, nth);
    }
    pthread_mutex_unlock(&g_call_mu);
    Py_END_ALLOW_THREADS
    if (fail) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

PyDoc_STRVAR(repack_doc,
"repack(kind, qweight_ptr, scales_ptr, out_ptr, N, K, group)\n--\n\n"
"Write the packed layout of a canonical (qweight, scales) into out (packed_nbytes(kind, N, K, group) bytes).");

static PyObject *py_repack(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (nargs != 7) {
        PyErr_SetString(PyExc_TypeError, "repack expects 7 arguments");
        return NULL;
    }
    long long kind, N, K, group;
    void *qw, *sc, *out;
    if (arg_ll(args[0], &kind) || arg_ptr(args[1], &qw) || arg_ptr(args[2], &sc) || arg_ptr(args[3], &out) ||
        arg_ll(args[4], &N) || arg_ll(args[5], &K) || arg_ll(args[6], &group))
        return NULL;
    char err[200];
    if (check_shape((int)kind, N, K, group, err, sizeof err)) {
        PyErr_SetString(PyExc_ValueError, err);
        return NULL;
    }
    if (!qw || !out || (!sc && !is_float_kind(kind))) {
        PyErr_SetString(PyExc_ValueError, "null pointer");
        return NULL;
    }
    repack_job R = {(int)kind, (const uint8_t *)qw, (const uint16_t *)sc, (uint8_t *)out, N, K, group};
    Py_BEGIN_ALLOW_THREADS
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    {   /* transparent huge pages for the (usually still untouched) packed buffer: fewer TLB misses */
        const size_t n = packed_bytes((int)kind, N, K, group), H = (size_t)2 << 20;
        uintptr_t a = ((uintptr_t)out + H - 1) & ~(uintptr_t)(H - 1), e = ((uintptr_t)out + n) & ~(uintptr_t)(H - 1);
        if (e > a && g_hugepage) madvise((void *)a, e - a, MADV_HUGEPAGE);
    }
#endif
    if (is_float_kind(kind)) {
        qg_frepack((const uint16_t *)qw, (uint16_t *)out, N, K);
    } else {
        pthread_mutex_lock(&g_call_mu);
        ensure_pool();
        pool_run(repack_task, &R, P.nthreads);
        pthread_mutex_unlock(&g_call_mu);
    }
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyObject *py_packed_nbytes(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    long long kind, N, K, group;
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "packed_nbytes(kind, N, K, group)");
        return NULL;
    }
    if (arg_ll(args[0], &kind) || arg_ll(args[1], &N) || arg_ll(args[2], &K) || arg_ll(args[3], &group)) return NULL;
    char err[200];
    if (check_shape((int)kind, N, K, group, err, sizeof err)) {
        PyErr_SetString(PyExc_ValueError, err);
        return NULL;
    }
    return PyLong_FromSize_t(packed_bytes((int)kind, N, K, group));
}

static PyObject *py_packed_scales_offset(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    long long kind, N, K, group;
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "packed_scales_offset(kind, N, K, group)");
        return NULL;
    }
    if (arg_ll(args[0], &kind) || arg_ll(args[1], &N) || arg_ll(args[2], &K) || arg_ll(args[3], &group)) return NULL;
    char err[200];
    if (check_shape((int)kind, N, K, group, err, sizeof err)) {
        PyErr_SetString(PyExc_ValueError, err);
        return NULL;
    }
    return PyLong_FromSize_t(quant_area((int)kind, N, K));
}

static PyObject *py_set_num_threads(PyObject *self, PyObject *arg) {
    (void)self;
    long n = PyLong_AsLong(arg);
    if (n == -1 && PyErr_Occurred()) return NULL;
    if (n < 1) n = default_threads();
    if (n > QG_MAX_THREADS) n = QG_MAX_THREADS;
    Py_BEGIN_ALLOW_THREADS
    pthread_mutex_lock(&g_call_mu);
    P.nthreads = (int)n;
    if (P.started != 0 && P.started != P.nthreads - 1) pool_start();
    pthread_mutex_unlock(&g_call_mu);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyObject *py_get_num_threads(PyObject *self, PyObject *unused) {
    (void)self;
    (void)unused;
    return PyLong_FromLong(P.nthreads > 0 ? P.nthreads : default_threads());
}

static PyObject *py_set_spin_us(PyObject *self, PyObject *arg) {
    (void)self;
    double us = PyFloat_AsDouble(arg);
    if (us == -1.0 && PyErr_Occurred()) return NULL;
    if (us < 0) us = 0;
    P.spin_s = us * 1e-6;
    Py_RETURN_NONE;
}

static PyObject *py_set_impl(PyObject *self, PyObject *arg) {
    (void)self;
    const char *s = PyUnicode_AsUTF8(arg);
    if (!s) return NULL;
    int want;
    if (!strcmp(s, "auto")) {
        want = g_isa_cap;
    } else if (!strcmp(s, "scalar")) {
        want = QG_ISA_SCALAR;
    } else if (!strcmp(s, "avx2") || !strcmp(s, "avx512-emulated")) {
        if (g_isa_best < QG_ISA_AVX2) {
            PyErr_SetString(PyExc_RuntimeError, "this CPU (or OS) lacks AVX2/FMA/F16C");
            return NULL;
        }
        want = !strcmp(s, "avx2") ? QG_ISA_AVX2 : QG_ISA_AVX512_EMU;
    } else if (!strcmp(s, "avx512")) {
        if (g_isa_best < QG_ISA_AVX512) {
            PyErr_SetString(PyExc_RuntimeError, "this CPU (or OS) lacks AVX-512 F/BW/VL/VNNI");
            return NULL;
        }
        want = QG_ISA_AVX512;
    } else {
        PyErr_SetString(PyExc_ValueError, "impl must be 'auto', 'avx512', 'avx2', 'scalar' or 'avx512-emulated'");
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    pthread_mutex_lock(&g_call_mu);
    g_isa = want;
    g_use_avx2 = want >= QG_ISA_AVX2;
    pthread_mutex_unlock(&g_call_mu);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyObject *py_tune(PyObject *self, PyObject *args) {
    (void)self;
    const char *name;
    long v;
    if (!PyArg_ParseTuple(args, "sl", &name, &v)) return NULL;
    if (!strcmp(name, "prefetch")) g_pf = v;
    else if (!strcmp(name, "chunk_bytes")) g_chunk_bytes = v > 0 ? v : 1;
    else if (!strcmp(name, "pfhint")) qg_pf_hint = v < 0 ? 0 : v > 3 ? 3 : (int)v;
    else if (!strcmp(name, "steal")) g_steal = v != 0;
    else if (!strcmp(name, "hugepage")) g_hugepage = v != 0;
    else {
        PyErr_SetString(PyExc_ValueError, "unknown knob");
        return NULL;
    }
    Py_RETURN_NONE;
}

static PyObject *py_cpu_features(PyObject *self, PyObject *unused) {
    (void)self;
    (void)unused;
#define QG_B(v) ((v) ? Py_True : Py_False)
    return Py_BuildValue("{s:O,s:O,s:O,s:O,s:s,s:i,s:s,s:s,s:s,s:s,s:O,s:O,s:O,s:O,s:O,s:O,s:O,s:O,s:s}",
                         "x86_64", QG_B(QG_X86), "avx2", QG_B(g_has_avx2), "fma", QG_B(g_has_fma),
                         "f16c", QG_B(g_has_f16c), "impl", g_use_avx2 ? "avx2" : "scalar", "prefetch", (int)g_pf,
                         "prefetch_hint", pf_hint_names[qg_pf_hint],
                         "isa", isa_name(g_isa), "isa_best", isa_name(g_isa_best), "isa_cap", isa_name(g_isa_cap),
                         "avx512f", QG_B(g_has_avx512f), "avx512bw", QG_B(g_has_avx512bw),
                         "avx512vl", QG_B(g_has_avx512vl), "avx512vnni", QG_B(g_has_vnni),
                         "avx512bf16", QG_B(g_has_avx512bf16), "avx512fp16", QG_B(g_has_avx512fp16),
                         "os_ymm", QG_B(g_os_ymm), "os_zmm", QG_B(g_os_zmm), "isa_env_error", g_isa_env_error);
#undef QG_B
}

PyDoc_STRVAR(stream_read_doc,
"stream_read(ptr, nbytes, nthreads=0) -> (seconds, checksum)\n--\n\n"
"Read nbytes from ptr with the pool's threads (AVX2 loads, split into contiguous ranges); for measuring\n"
"the machine's read bandwidth next to the kernels.");

static PyObject *py_stream_read(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (nargs < 2 || nargs > 3) {
        PyErr_SetString(PyExc_TypeError, "stream_read(ptr, nbytes, nthreads=0)");
        return NULL;
    }
    void *p;
    long long n, nt = 0;
    if (arg_ptr(args[0], &p) || arg_ll(args[1], &n) || (nargs == 3 && arg_ll(args[2], &nt))) return NULL;
    if (!p || n < 0) {
        PyErr_SetString(PyExc_ValueError, "bad buffer");
        return NULL;
    }
    read_job *R = (read_job *)calloc(1, sizeof(read_job));
    if (!R) return PyErr_NoMemory();
    R->p = (const uint8_t *)p;
    R->n = (size_t)n;
    double dt;
    uint64_t sum = 0;
    Py_BEGIN_ALLOW_THREADS
    pthread_mutex_lock(&g_call_mu);
    ensure_pool();
    int nth = nt > 0 && nt < P.nthreads ? (int)nt : P.nthreads;
    double t0 = now_s();
    pool_run(read_task, R, nth);
    dt = now_s() - t0;
    for (int i = 0; i < nth; i++) sum += R->sums[i];
    pthread_mutex_unlock(&g_call_mu);
    Py_END_ALLOW_THREADS
    free(R);
    return Py_BuildValue("(dK)", dt, (unsigned long long)sum);
}

static PyMethodDef methods[] = {
    {"gemm", (PyCFunction)(void (*)(void))py_gemm, METH_FASTCALL, gemm_doc},
    {"repack", (PyCFunction)(void (*)(void))py_repack, METH_FASTCALL, repack_doc},
    {"packed_nbytes", (PyCFunction)(void (*)(void))py_packed_nbytes, METH_FASTCALL,
     "packed_nbytes(kind, N, K, group) -> bytes of the packed layout"},
    {"packed_scales_offset", (PyCFunction)(void (*)(void))py_packed_scales_offset, METH_FASTCALL,
     "packed_scales_offset(kind, N, K, group) -> byte offset of the scale area in the packed layout"},
    {"set_num_threads", py_set_num_threads, METH_O, "set_num_threads(n): total threads incl. the caller (<1: all CPUs)"},
    {"get_num_threads", py_get_num_threads, METH_NOARGS, "get_num_threads() -> int"},
    {"set_spin_us", py_set_spin_us, METH_O, "set_spin_us(us): how long idle workers spin before sleeping"},
    {"set_impl", py_set_impl, METH_O, "set_impl('avx2' | 'scalar' | 'auto') (testing)"},
    {"_tune", py_tune, METH_VARARGS, "_tune(name, value): 'prefetch' bytes, 'pfhint' 0-3 (nta/t0/t1/t2), 'chunk_bytes', 'steal' 0/1 (benchmarking)"},
    {"cpu_features", py_cpu_features, METH_NOARGS, "cpu_features() -> dict"},
    {"stream_read", (PyCFunction)(void (*)(void))py_stream_read, METH_FASTCALL, stream_read_doc},
    {"rmsnorm", (PyCFunction)(void (*)(void))qg_py_rmsnorm, METH_FASTCALL, qg_rmsnorm_doc},
    {"attend", (PyCFunction)(void (*)(void))qg_py_attend, METH_FASTCALL, qg_attend_doc},
    {"swiglu", (PyCFunction)(void (*)(void))qg_py_swiglu, METH_FASTCALL, qg_swiglu_doc},
    QG_DECODE_OPS_MORE
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef moduledef = {PyModuleDef_HEAD_INIT, "_qgemm",
                                       "INT4/INT8 block-quantized GEMM kernels for small M (see qgemm.c)", -1,
                                       methods, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__qgemm(void) {
    detect_cpu();
    {
        const char *e = getenv("GLMKIT_QGEMM_SPIN_US");
        if (e && *e) P.spin_s = atof(e) * 1e-6;
        e = getenv("GLMKIT_QGEMM_THREADS");
        if (e && *e && atoi(e) > 0) P.nthreads = atoi(e) > QG_MAX_THREADS ? QG_MAX_THREADS : atoi(e);
    }
    pthread_atfork(NULL, NULL, atfork_child);
    return PyModule_Create(&moduledef);
}
