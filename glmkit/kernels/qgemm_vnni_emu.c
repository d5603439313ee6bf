/* qgemm_vnni.inc on AVX2 with vpdpbusd emulated exactly (isa 'avx512-emulated', for tests): checks the VNNI
 * kernels' structure -- offsets, the w + 128 and 8 sum x corrections, tiles -- on machines without AVX-512. */
#include "qgemm_internal.h"

#if QG_HAVE_X86
#include <immintrin.h>
#include <string.h>

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c"))), apply_to = function)
#else
#pragma GCC target("avx2,fma,f16c")
#endif

/* per 32-bit lane: acc + u0 s0 + u1 s1 + u2 s2 + u3 s3 (u unsigned bytes, s signed), exact: products of the even
 * and of the odd bytes as int16 pairs (u <= 255 and s fit int16), summed in int32 by vpmaddwd */
static inline __attribute__((always_inline)) __m256i dpbusd_emu(__m256i acc, __m256i u, __m256i s) {
    const __m256i lo = _mm256_set1_epi16(0x00ff);
    const __m256i ue = _mm256_and_si256(u, lo), uo = _mm256_srli_epi16(u, 8);
    const __m256i se = _mm256_srai_epi16(_mm256_slli_epi16(s, 8), 8), so = _mm256_srai_epi16(s, 8);
    return _mm256_add_epi32(acc, _mm256_add_epi32(_mm256_madd_epi16(ue, se), _mm256_madd_epi16(uo, so)));
}

#define DPBUSD(acc, u, s) dpbusd_emu((acc), (u), (s))
#define FQ(name) name##_vnni_emu
#include "qgemm_vnni.inc"

#if defined(__clang__)
#pragma clang attribute pop
#endif
#endif
