/* What qgemm.c shares with the other sources of the _qgemm extension (decode_ops.c). */
#ifndef GLMKIT_QGEMM_INTERNAL_H
#define GLMKIT_QGEMM_INTERNAL_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <stdatomic.h>

#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__)) && !defined(QG_FORCE_PORTABLE)
#define QG_HAVE_X86 1
#else
#define QG_HAVE_X86 0
#endif

/* Kernel variants, chosen at run time (qgemm.c: cpuid + the OS's xsave state; GLMKIT_KERNEL_ISA caps it).
 * QG_ISA_AVX512_EMU is for tests only: the AVX-512 code paths with the AVX-512-only instructions emulated on
 * AVX2 (so an AVX2 machine checks their structure against the reference). */
enum { QG_ISA_SCALAR = 0, QG_ISA_AVX2 = 1, QG_ISA_AVX512 = 2, QG_ISA_AVX512_EMU = 3 };
int qg_isa(void);                     /* the variant in use */
long qg_prefetch_bytes(void);         /* software prefetch distance of one-row (decode) weight streams */

#define QG_MAX_THREADS 256

/* one INT4 / INT8 GEMM (qgemm.c: layout and arithmetic), as the per-ISA panel kernels see it */
typedef struct {
    int8_t *q;        /* [M][K] */
    float *d;         /* [M][NB] scale */
    int32_t *s;       /* [M][NB] 8 * sum(q) (q4 offset correction) */
} xquant;

typedef struct {
    int kind;                 /* 4 or 8 */
    const uint8_t *wq;        /* packed quant area */
    const uint16_t *ws;       /* packed scale area */
    const float *bias;        /* or NULL */
    float *y;
    int M, N, K, group;
    int NB, NG, P;
    xquant xq;
    int chunk;                /* panels per work item */
    int nchunks;
    int nth;
    struct { _Atomic int next; int end; char pad[56]; } q[QG_MAX_THREADS];   /* per-thread chunk queues */
} gemm_job;

/* the VNNI kernels (qgemm_vnni.inc): the AVX2 panel kernel with vpdpbusd for the int8 dot products; the
 * emulated one runs the same code with vpdpbusd emulated exactly on AVX2 (tests) */
void qg_qpanel_vnni(const gemm_job *J, int p);
void qg_qpanel_vnni_emu(const gemm_job *J, int p);

typedef void (*qg_task_fn)(void *ctx, int tid, int nth);

/* Run fn(ctx, tid, n) on n = min(max_threads, pool size) threads of the kernels' pool (the caller is tid 0),
 * serialised with the GEMM calls.  Call without the GIL. */
void qg_parallel(qg_task_fn fn, void *ctx, int max_threads);
int qg_pool_threads(void);            /* threads a qg_parallel call may use */
int qg_impl_avx2(void);               /* 1 when the AVX2/FMA/F16C code is in use (set_impl can turn it off) */
float qg_half_to_float(uint16_t h);  /* portable fp16 -> fp32 (exact) */
int qg_arg_ptr(PyObject *o, void **out);
int qg_arg_ll(PyObject *o, long long *out);

/* fgemm.c: the float weight kinds 16 (fp16) and 17 (bf16), layout and arithmetic described there */
#define QG_KIND_F16 16
#define QG_KIND_BF16 17
size_t qg_fpacked_bytes(long long N, long long K);
void qg_frepack(const uint16_t *w, uint16_t *out, long long N, long long K);      /* without the GIL */
int qg_fgemm(int kind, const float *x, const uint16_t *w, const float *bias, float *y, int M, int N, int K);

typedef struct {              /* one float GEMM, as the per-ISA panel kernels see it */
    int kind;
    const uint16_t *w;        /* packed panels */
    const float *x, *bias;    /* x [M, K]; bias [N] or NULL */
    float *y;                 /* [M, N] */
    int M, N, K, P;           /* P = ceil(N / 16) panels */
    long pf;                  /* prefetch distance (bytes) for M = 1 */
    const float *ap;          /* M > 4: x packed by the ISA's qg_fpack_a (row tiles, k-major) */
} fg_job;
#define QG_FG_NP 4            /* panels the blocked float kernel works on at once */
#define QG_FG_SCRATCH(M) ((size_t)(M) * ((M) > 4 ? QG_FG_NP * 16 : 16))   /* floats of the panels' scratch */
void qg_fpanels_avx2(const fg_job *J, int p0, int p1, float *tmp);
void qg_fpanels_avx512(const fg_job *J, int p0, int p1, float *tmp);
void qg_fpack_a_avx2(const float *x, int M, int K, float *ap, int tid, int nth);
void qg_fpack_a_avx512(const float *x, int M, int K, float *ap, int tid, int nth);

/* decode_ops.c: the non-GEMM operations of a one-token decode step (see there) */
PyObject *qg_py_rmsnorm(PyObject *self, PyObject *const *args, Py_ssize_t nargs);
PyObject *qg_py_attend(PyObject *self, PyObject *const *args, Py_ssize_t nargs);
PyObject *qg_py_swiglu(PyObject *self, PyObject *const *args, Py_ssize_t nargs);
PyObject *qg_py_layernorm(PyObject *self, PyObject *const *args, Py_ssize_t nargs);
PyObject *qg_py_gelu(PyObject *self, PyObject *const *args, Py_ssize_t nargs);
PyObject *qg_py_attend_ex(PyObject *self, PyObject *const *args, Py_ssize_t nargs);
extern const char qg_rmsnorm_doc[], qg_attend_doc[], qg_swiglu_doc[];
extern const char qg_layernorm_doc[], qg_gelu_doc[], qg_attend_ex_doc[];

/* the method-table entries of decode_ops.c's later ops (qgemm.c's table includes them) */
#define QG_DECODE_OPS_MORE                                                                             \
    {"layernorm", (PyCFunction)(void (*)(void))qg_py_layernorm, METH_FASTCALL, qg_layernorm_doc},     \
    {"gelu", (PyCFunction)(void (*)(void))qg_py_gelu, METH_FASTCALL, qg_gelu_doc},                     \
    {"attend_ex", (PyCFunction)(void (*)(void))qg_py_attend_ex, METH_FASTCALL, qg_attend_ex_doc},

/* The software prefetch of a weight stream read once (M = 1 decode, qgemm.c / qgemm_vnni.inc / fgemm_kern.inc),
 * its hint chosen per CPU at load (qgemm.c detect_cpu): 0 = prefetchnta (AMD: measured slightly better than t0
 * on Zen3), 1 = prefetcht0 (Intel: nta lines skip the L2 and its streamer, and the stream ran at ~70% of the
 * read bandwidth with them), 2 = t1, 3 = t2 (benchmarking, _tune("pfhint", n)). The switch is on a global
 * that does not change during a call: one predictable branch per prefetch. */
extern int qg_pf_hint;
#define QG_PF_KEEP(a) _mm_prefetch((a), _MM_HINT_T0)   /* a panel the M-tiled kernels re-read: cached */
#define QG_PF_STREAM(a)                                                             \
    do {                                                                            \
        switch (qg_pf_hint) {                                                       \
        case 0: _mm_prefetch((a), _MM_HINT_NTA); break;                             \
        case 1: _mm_prefetch((a), _MM_HINT_T0); break;                              \
        case 2: _mm_prefetch((a), _MM_HINT_T1); break;                              \
        default: _mm_prefetch((a), _MM_HINT_T2);                                    \
        }                                                                           \
    } while (0)
#endif
