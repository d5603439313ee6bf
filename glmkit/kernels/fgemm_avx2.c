/* The AVX2 / FMA / F16C variant of the float-kind kernels (fgemm_kern.inc): v16 = two __m256. */
#include "qgemm_internal.h"

#if QG_HAVE_X86
#include <immintrin.h>
#include <stdint.h>
#include <stddef.h>

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c"))), apply_to = function)
#else
#pragma GCC target("avx2,fma,f16c")
#endif

#define QG_INLINE static inline __attribute__((always_inline))
typedef struct { __m256 a, b; } v16;

QG_INLINE v16 v16_zero(void) { v16 r = {_mm256_setzero_ps(), _mm256_setzero_ps()}; return r; }
QG_INLINE v16 v16_load(const float *p) { v16 r = {_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)}; return r; }
QG_INLINE void v16_store(float *p, v16 v) { _mm256_storeu_ps(p, v.a); _mm256_storeu_ps(p + 8, v.b); }
QG_INLINE v16 v16_set1(float f) { v16 r = {_mm256_set1_ps(f), _mm256_set1_ps(f)}; return r; }
QG_INLINE v16 v16_fma(v16 a, v16 b, v16 c) {
    v16 r = {_mm256_fmadd_ps(a.a, b.a, c.a), _mm256_fmadd_ps(a.b, b.b, c.b)};
    return r;
}
QG_INLINE v16 v16_add(v16 a, v16 b) { v16 r = {_mm256_add_ps(a.a, b.a), _mm256_add_ps(a.b, b.b)}; return r; }
QG_INLINE v16 v16_f16(const uint16_t *p) {
    v16 r = {_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p)),
             _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(p + 8)))};
    return r;
}
QG_INLINE __m256 bf16x8(const uint16_t *p) {      /* bf16 = the high half of an fp32 */
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16));
}
QG_INLINE v16 v16_bf16(const uint16_t *p) { v16 r = {bf16x8(p), bf16x8(p + 8)}; return r; }

#define FV(name) name##_avx2
#define FV_MR 6
#include "fgemm_kern.inc"

#if defined(__clang__)
#pragma clang attribute pop
#endif
#endif
