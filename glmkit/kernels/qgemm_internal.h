/* What qgemm.c shares with the other sources of the _qgemm extension (decode_ops.c). */
#ifndef GLMKIT_QGEMM_INTERNAL_H
#define GLMKIT_QGEMM_INTERNAL_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>

typedef void (*qg_task_fn)(void *ctx, int tid, int nth);

/* Run fn(ctx, tid, n) on n = min(max_threads, pool size) threads of the kernels' pool (the caller is tid 0),
 * serialised with the GEMM calls.  Call without the GIL. */
void qg_parallel(qg_task_fn fn, void *ctx, int max_threads);
int qg_pool_threads(void);            /* threads a qg_parallel call may use */
int qg_impl_avx2(void);               /* 1 when the AVX2/FMA/F16C code is in use (set_impl can turn it off) */
float qg_half_to_float(uint16_t h);  /* portable fp16 -> fp32 (exact) */
int qg_arg_ptr(PyObject *o, void **out);
int qg_arg_ll(PyObject *o, long long *out);

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

#endif
