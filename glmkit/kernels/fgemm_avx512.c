/* The AVX-512 (F/BW/VL) variant of the float-kind kernels (fgemm_kern.inc): v16 = one __m512, fp16 -> fp32 with
 * the 512-bit vcvtph2ps, bf16 -> fp32 with a 512-bit zero-extend and shift. Only called where qgemm.c found
 * AVX-512 in the CPU and the OS (cpuid + xgetbv); everything here may use AVX-512. */
#include "qgemm_internal.h"

#if QG_HAVE_X86
#include <immintrin.h>
#include <stdint.h>
#include <stddef.h>

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c,avx512f,avx512bw,avx512vl"))), apply_to = function)
#else
#pragma GCC target("avx2,fma,f16c,avx512f,avx512bw,avx512vl")
#endif

#define QG_INLINE static inline __attribute__((always_inline))
typedef __m512 v16;

QG_INLINE v16 v16_zero(void) { return _mm512_setzero_ps(); }
QG_INLINE v16 v16_load(const float *p) { return _mm512_loadu_ps(p); }
QG_INLINE void v16_store(float *p, v16 v) { _mm512_storeu_ps(p, v); }
QG_INLINE v16 v16_set1(float f) { return _mm512_set1_ps(f); }
QG_INLINE v16 v16_fma(v16 a, v16 b, v16 c) { return _mm512_fmadd_ps(a, b, c); }
QG_INLINE v16 v16_add(v16 a, v16 b) { return _mm512_add_ps(a, b); }
QG_INLINE v16 v16_f16(const uint16_t *p) { return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p)); }
QG_INLINE v16 v16_bf16(const uint16_t *p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}

#define FV(name) name##_avx512
#define FV_MR 8
#include "fgemm_kern.inc"

#if defined(__clang__)
#pragma clang attribute pop
#endif
#endif
