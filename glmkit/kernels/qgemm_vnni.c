/* INT4 / INT8 panels with AVX-512 VNNI (vpdpbusd on 256-bit registers): qgemm_vnni.inc. Only called where
 * qgemm.c found AVX-512 F/BW/VL + VNNI in the CPU and the OS. */
#include "qgemm_internal.h"

#if QG_HAVE_X86
#include <immintrin.h>
#include <string.h>

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni"))), apply_to = function)
#else
#pragma GCC target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")
#endif

#define DPBUSD(acc, u, s) _mm256_dpbusd_epi32((acc), (u), (s))
#define FQ(name) name##_vnni
#include "qgemm_vnni.inc"

#if defined(__clang__)
#pragma clang attribute pop
#endif
#endif
