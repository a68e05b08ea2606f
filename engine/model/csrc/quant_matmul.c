/* Weight-only quantized matmuls for CPU: out[m, n] = sum_k x[m, k] * w[n, k], w stored in 4 or 8 bits per weight in
 * blocks of 32 along k. Built and loaded by engine/model/quant_kernels.py, checked against x @ dequantize(w).T in
 * tests/engine/test_quant.py.
 *
 * Why integer dot products: a decode step is bound by reading the weights, so the kernel reads each weight byte once
 * and keeps the arithmetic cheap. Each activation row is quantized to int8 per block of 32 (scale = max|x| / 127), then
 * each block's dot product is 32 int8 x int8 (or uint4 x int8) products summed exactly in int32 and scaled once.
 *
 * Layouts (all contiguous; the kernel-ready form quant_kernels.py builds from engine/model/quant.py's formats):
 *   x [M, K] fp32, out [M, N] fp32, K a multiple of 32, nb = K / 32 blocks per row;
 *   int4: qs uint8 [N, nb, 16], byte j of a block holds q[j] in its low nibble and q[j + 16] in its high nibble,
 *         d and z fp16 bits [N, nb]: w = q * d + z;
 *   int8: qs int8 [N, K], d fp16 bits [N, nb]: w = q * d.
 * Needs AVX2, FMA and F16C at run time (quant_kernels_supported() says); the functions are compiled for them alone.
 */
#include <stdint.h>
#include <stdlib.h>

#if defined(__x86_64__)
#include <immintrin.h>
#define KERNEL __attribute__((target("avx2,fma,f16c")))

int quant_kernels_supported(void) {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
}

KERNEL static inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

KERNEL static inline float half_to_float(uint16_t h) { return _cvtsh_ss(h); }

/* One row of 32-blocks: qx int8 [nb * 32], dx [nb] the scales, sx [nb] = dx * sum(qx), the block sums of the
 * quantized row (int4's zero term): the whole product is then that of the rounded row, so the GEMM path for large
 * batches, which multiplies the rounded rows (quantize_activations) by the dequantized weight, gives the same sums. */
KERNEL static void quantize_row(const float *x, int64_t nb, int8_t *qx, float *dx, float *sx) {
  const __m256 sign_mask = _mm256_set1_ps(-0.0f);
  for (int64_t b = 0; b < nb; b++) {
    const float *xb = x + b * 32;
    __m256 v[4], amax = _mm256_setzero_ps();
    for (int i = 0; i < 4; i++) {
      v[i] = _mm256_loadu_ps(xb + 8 * i);
      amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign_mask, v[i]));
    }
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    m = _mm_max_ss(m, _mm_movehdup_ps(m));
    const float max_abs = _mm_cvtss_f32(m), d = max_abs / 127.0f;
    dx[b] = d;
    const __m256 inv = _mm256_set1_ps(d > 0.0f ? 1.0f / d : 0.0f);
    __m256i q[4];
    __m256i qsum = _mm256_setzero_si256();
    for (int i = 0; i < 4; i++) {
      q[i] = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v[i], inv), _MM_FROUND_TO_NEAREST_INT));
      qsum = _mm256_add_epi32(qsum, q[i]);
    }
    sx[b] = d * hsum(_mm256_cvtepi32_ps(qsum));  // exact: |sum(qx)| <= 32 * 127
    /* int32 x 32 -> int8 x 32 in order: the packs interleave 128-bit lanes, the permute puts them back */
    __m256i p16a = _mm256_packs_epi32(q[0], q[1]), p16b = _mm256_packs_epi32(q[2], q[3]);
    __m256i p8 = _mm256_packs_epi16(p16a, p16b);
    p8 = _mm256_permutevar8x32_epi32(p8, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    _mm256_storeu_si256((__m256i *)(qx + b * 32), p8);
  }
}

KERNEL static inline int32_t hsum_i32(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(1, 0, 3, 2)));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(2, 3, 0, 1)));
  return _mm_cvtsi128_si32(s);
}

/* v[j] holds block j's 8 int32 partial sums -> one vector of the 8 blocks' totals, in block order. */
KERNEL static inline __m256i sum_8_blocks(const __m256i v[8]) {
  const __m256i h01 = _mm256_hadd_epi32(v[0], v[1]), h23 = _mm256_hadd_epi32(v[2], v[3]);
  const __m256i h45 = _mm256_hadd_epi32(v[4], v[5]), h67 = _mm256_hadd_epi32(v[6], v[7]);
  const __m256i h0123 = _mm256_hadd_epi32(h01, h23), h4567 = _mm256_hadd_epi32(h45, h67);
  return _mm256_add_epi32(_mm256_permute2x128_si256(h0123, h4567, 0x20), _mm256_permute2x128_si256(h0123, h4567, 0x31));
}

/* 32 products of one block, summed exactly into 8 int32: w unsigned (int4 values, or |w| for int8), x signed. */
KERNEL static inline __m256i block_products(__m256i w, __m256i x) {
  return _mm256_madd_epi16(_mm256_maddubs_epi16(w, x), _mm256_set1_epi16(1));
}

/* One activation row against one int4 weight row, w unpacked to one value per byte (wq [nb * 32]). Eight blocks at a
 * time: their exact integer sums are gathered into one vector, then scaled by d * dx and summed with the zero terms
 * z * sx, eight blocks per instruction. The order of operations depends on nothing but K: a row's result is the same
 * in any batch. */
KERNEL static float dot_q4(const uint8_t *wq, const uint16_t *d, const uint16_t *z, const int8_t *qx, const float *dx,
                           const float *sx, int64_t nb) {
  __m256 acc = _mm256_setzero_ps(), zacc = _mm256_setzero_ps();
  float tail = 0.f;
  int64_t b = 0;
  for (; b + 8 <= nb; b += 8) {
    __m256i v[8];
    for (int j = 0; j < 8; j++) {
      const int64_t o = (b + j) * 32;
      v[j] = block_products(_mm256_loadu_si256((const __m256i *)(wq + o)), _mm256_loadu_si256((const __m256i *)(qx + o)));
    }
    const __m256 scale = _mm256_mul_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(d + b))), _mm256_loadu_ps(dx + b));
    acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum_8_blocks(v)), scale, acc);
    zacc = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(z + b))), _mm256_loadu_ps(sx + b), zacc);
  }
  for (; b < nb; b++) {
    const __m256i v = block_products(_mm256_loadu_si256((const __m256i *)(wq + b * 32)), _mm256_loadu_si256((const __m256i *)(qx + b * 32)));
    tail += (float)hsum_i32(v) * (half_to_float(d[b]) * dx[b]) + half_to_float(z[b]) * sx[b];
  }
  return hsum(_mm256_add_ps(acc, zacc)) + tail;
}

/* One activation row against one int8 weight row (qs [nb * 32]); the sign of w moves onto x so maddubs sees |w|. */
KERNEL static float dot_q8(const int8_t *qs, const uint16_t *d, const int8_t *qx, const float *dx, int64_t nb) {
  __m256 acc = _mm256_setzero_ps();
  float tail = 0.f;
  int64_t b = 0;
  for (; b + 8 <= nb; b += 8) {
    __m256i v[8];
    for (int j = 0; j < 8; j++) {
      const __m256i w = _mm256_loadu_si256((const __m256i *)(qs + (b + j) * 32));
      const __m256i x = _mm256_loadu_si256((const __m256i *)(qx + (b + j) * 32));
      v[j] = block_products(_mm256_sign_epi8(w, w), _mm256_sign_epi8(x, w));
    }
    const __m256 scale = _mm256_mul_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(d + b))), _mm256_loadu_ps(dx + b));
    acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum_8_blocks(v)), scale, acc);
  }
  for (; b < nb; b++) {
    const __m256i w = _mm256_loadu_si256((const __m256i *)(qs + b * 32));
    const __m256i x = _mm256_loadu_si256((const __m256i *)(qx + b * 32));
    tail += (float)hsum_i32(block_products(_mm256_sign_epi8(w, w), _mm256_sign_epi8(x, w))) * (half_to_float(d[b]) * dx[b]);
  }
  return hsum(acc) + tail;
}

/* Weight row n of int4 -> one value per byte in wq [nb * 32], in k order (read once, then used by every activation row). */
KERNEL static void unpack_q4_row(const uint8_t *qs, int64_t nb, uint8_t *wq) {
  const __m128i low_mask = _mm_set1_epi8(0x0F);
  for (int64_t b = 0; b < nb; b++) {
    const __m128i raw = _mm_loadu_si128((const __m128i *)(qs + b * 16));
    _mm_storeu_si128((__m128i *)(wq + b * 32), _mm_and_si128(raw, low_mask));
    _mm_storeu_si128((__m128i *)(wq + b * 32 + 16), _mm_and_si128(_mm_srli_epi16(raw, 4), low_mask));
  }
}

/* Quantize the M activation rows into one buffer: qx [M, K] int8, then dx and sx [M, nb] fp32. NULL when out of memory. */
KERNEL static int8_t *quantize_rows(const float *x, int64_t M, int64_t K, float **dx, float **sx) {
  const int64_t nb = K / 32;
  int8_t *buf = malloc((size_t)(M * K + 2 * M * nb * (int64_t)sizeof(float)));
  if (buf == NULL) return NULL;
  *dx = (float *)(buf + M * K);
  *sx = *dx + M * nb;
#pragma omp parallel for schedule(static) if (M > 4)
  for (int64_t m = 0; m < M; m++) quantize_row(x + m * K, nb, buf + m * K, *dx + m * nb, *sx + m * nb);
  return buf;
}

/* The rows as the integer kernels see them: out [M, K] = qx * dx, int8 per block of 32. Returns 0 or -1 (no memory). */
KERNEL int quantize_activations(const float *x, int64_t M, int64_t K, float *out) {
  const int64_t nb = K / 32;
  float *dx, *sx;
  int8_t *qx = quantize_rows(x, M, K, &dx, &sx);
  if (qx == NULL) return -1;
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < M * nb; i++) {
    const __m256 d = _mm256_set1_ps(dx[i]);
    for (int j = 0; j < 32; j += 8) {
      const __m128i q = _mm_loadl_epi64((const __m128i *)(qx + i * 32 + j));
      _mm256_storeu_ps(out + i * 32 + j, _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q)), d));
    }
  }
  free(qx);
  return 0;
}

/* Returns 0, or -1 when the activation buffer could not be allocated (out is then untouched). */
KERNEL int q4_matmul(const float *x, int64_t M, int64_t K, const uint8_t *qs, const uint16_t *d, const uint16_t *z,
                     int64_t N, float *out) {
  const int64_t nb = K / 32;
  float *dx, *sx;
  int8_t *qx = quantize_rows(x, M, K, &dx, &sx);
  if (qx == NULL) return -1;
#pragma omp parallel
  {
    uint8_t wq[K];  // this thread's unpacked weight row (K bytes: 14 KiB for Mistral-7B's down_proj)
#pragma omp for schedule(static)
    for (int64_t n = 0; n < N; n++) {
      unpack_q4_row(qs + n * nb * 16, nb, wq);
      for (int64_t m = 0; m < M; m++) {
        out[m * N + n] = dot_q4(wq, d + n * nb, z + n * nb, qx + m * K, dx + m * nb, sx + m * nb, nb);
      }
    }
  }
  free(qx);
  return 0;
}

KERNEL int q8_matmul(const float *x, int64_t M, int64_t K, const int8_t *qs, const uint16_t *d, int64_t N, float *out) {
  const int64_t nb = K / 32;
  float *dx, *sx;
  int8_t *qx = quantize_rows(x, M, K, &dx, &sx);
  if (qx == NULL) return -1;
#pragma omp parallel for schedule(static)
  for (int64_t n = 0; n < N; n++) {
    for (int64_t m = 0; m < M; m++) out[m * N + n] = dot_q8(qs + n * K, d + n * nb, qx + m * K, dx + m * nb, nb);
  }
  free(qx);
  return 0;
}

/* The float32 weight [N, K] (for large batches, which then run a float GEMM). */
KERNEL void q4_dequantize(const uint8_t *qs, const uint16_t *d, const uint16_t *z, int64_t N, int64_t K, float *out) {
  const int64_t nb = K / 32;
  const __m128i low_mask = _mm_set1_epi8(0x0F);
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < N * nb; i++) {
    const __m128i raw = _mm_loadu_si128((const __m128i *)(qs + i * 16));
    const __m128i halves[2] = {_mm_and_si128(raw, low_mask), _mm_and_si128(_mm_srli_epi16(raw, 4), low_mask)};
    const __m256 wd = _mm256_set1_ps(half_to_float(d[i])), wz = _mm256_set1_ps(half_to_float(z[i]));
    float *o = out + i * 32;  // block i of the row-major [N, K] weight starts at element 32 i
    for (int h = 0; h < 2; h++) {
      const __m256 lo = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(halves[h]));
      const __m256 hi = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(halves[h], 8)));
      _mm256_storeu_ps(o + 16 * h, _mm256_fmadd_ps(lo, wd, wz));
      _mm256_storeu_ps(o + 16 * h + 8, _mm256_fmadd_ps(hi, wd, wz));
    }
  }
}

KERNEL void q8_dequantize(const int8_t *qs, const uint16_t *d, int64_t N, int64_t K, float *out) {
  const int64_t nb = K / 32;
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < N * nb; i++) {
    const __m256 wd = _mm256_set1_ps(half_to_float(d[i]));
    for (int j = 0; j < 32; j += 8) {
      const __m128i q = _mm_loadl_epi64((const __m128i *)(qs + i * 32 + j));
      _mm256_storeu_ps(out + i * 32 + j, _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q)), wd));
    }
  }
}
#else
int quant_kernels_supported(void) { return 0; }
#endif
