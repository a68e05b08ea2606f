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
 *   int4: rows in groups of 8 (N a multiple of 8), qs uint8 [N / 8, nb, 4, 8, 4]: byte [g, b, t, i, j] holds
 *         q[8g + i, 32b + 4t + j] in its low nibble and q[8g + i, 32b + 4(t + 4) + j] in its high nibble,
 *         d and z fp16 bits [N / 8, nb, 8]: w = q * d + z;
 *   int8: likewise 8 rows interleaved, qs int8 [N / 8, nb, 8, 8, 4]: [g, b, s, i, j] holds q[8g + i, 32b + 4s + j],
 *         d fp16 bits [N / 8, nb, 8]: w = q * d.
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
/* Up to 4 activation rows against one group of 8 int4 weight rows: one row per lane, so no lane is ever summed across.
 * Per block, step s (k = 4s..4s+3 of the block) multiplies each row's 4 weights by the same 4 activations (broadcast);
 * maddubs sums pairs into int16 (8 steps add up to <= 8 * 2 * 15 * 127 < 2^15: exact), one madd makes the block's int32
 * sums, then each row's scale and zero term apply. A row's result does not depend on the rows tiled beside it. */
KERNEL static void group_q4(const uint8_t *wg, const uint16_t *dg, const uint16_t *zg, const int8_t *qx, const float *dx,
                            const float *sx, int64_t nb, int64_t K, int rows, float *out, int64_t N) {
  const __m256i low_mask = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
  __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
  for (int64_t b = 0; b < nb; b++) {
    __m256i w[8];
    for (int t = 0; t < 4; t++) {
      const __m256i raw = _mm256_loadu_si256((const __m256i *)(wg + b * 128 + t * 32));
      w[t] = _mm256_and_si256(raw, low_mask);
      w[t + 4] = _mm256_and_si256(_mm256_srli_epi16(raw, 4), low_mask);
    }
    const __m256 wd = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(dg + b * 8)));
    const __m256 wz = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(zg + b * 8)));
    for (int r = 0; r < rows; r++) {
      const int8_t *xb = qx + r * K + b * 32;
      __m256i sum16 = _mm256_setzero_si256();
      for (int step = 0; step < 8; step++) {
        int32_t x4;
        __builtin_memcpy(&x4, xb + 4 * step, 4);
        sum16 = _mm256_add_epi16(sum16, _mm256_maddubs_epi16(w[step], _mm256_set1_epi32(x4)));
      }
      const __m256 sum = _mm256_cvtepi32_ps(_mm256_madd_epi16(sum16, ones));  // [8 rows] exact block sums
      acc[r] = _mm256_fmadd_ps(sum, _mm256_mul_ps(wd, _mm256_set1_ps(dx[r * nb + b])), acc[r]);
      acc[r] = _mm256_fmadd_ps(wz, _mm256_set1_ps(sx[r * nb + b]), acc[r]);
    }
  }
  for (int r = 0; r < rows; r++) _mm256_storeu_ps(out + r * N, acc[r]);
}

/* Returns 0, or -1 when the activation buffer could not be allocated (out is then untouched). */
KERNEL int q4_matmul(const float *x, int64_t M, int64_t K, const uint8_t *qs, const uint16_t *d, const uint16_t *z,
                     int64_t N, float *out) {
  const int64_t nb = K / 32;
  float *dx, *sx;
  int8_t *qx = quantize_rows(x, M, K, &dx, &sx);
  if (qx == NULL) return -1;
#pragma omp parallel for schedule(static)
  for (int64_t g = 0; g < N / 8; g++) {
    for (int64_t m0 = 0; m0 < M; m0 += 4) {
      const int rows = M - m0 < 4 ? (int)(M - m0) : 4;
      group_q4(qs + g * nb * 128, d + g * nb * 8, z + g * nb * 8, qx + m0 * K, dx + m0 * nb, sx + m0 * nb, nb, K, rows,
               out + m0 * N + g * 8, N);
    }
  }
  free(qx);
  return 0;
}

/* group_q4 for int8 weights (8 rows interleaved, 4 bytes per row per step). maddubs needs one unsigned operand: it
 * gets |w|, and x takes w's sign. One step's pair sums reach 2 * 127 * 127, so each step widens to int32 at once. */
KERNEL static void group_q8(const int8_t *wg, const uint16_t *dg, const int8_t *qx, const float *dx, int64_t nb, int64_t K,
                            int rows, float *out, int64_t N) {
  const __m256i ones = _mm256_set1_epi16(1);
  __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
  for (int64_t b = 0; b < nb; b++) {
    __m256i w[8], w_abs[8];
    for (int step = 0; step < 8; step++) {
      w[step] = _mm256_loadu_si256((const __m256i *)(wg + b * 256 + step * 32));
      w_abs[step] = _mm256_sign_epi8(w[step], w[step]);
    }
    const __m256 wd = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(dg + b * 8)));
    for (int r = 0; r < rows; r++) {
      const int8_t *xb = qx + r * K + b * 32;
      __m256i sum32 = _mm256_setzero_si256();
      for (int step = 0; step < 8; step++) {
        int32_t x4;
        __builtin_memcpy(&x4, xb + 4 * step, 4);
        const __m256i x = _mm256_sign_epi8(_mm256_set1_epi32(x4), w[step]);
        sum32 = _mm256_add_epi32(sum32, _mm256_madd_epi16(_mm256_maddubs_epi16(w_abs[step], x), ones));
      }
      acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum32), _mm256_mul_ps(wd, _mm256_set1_ps(dx[r * nb + b])), acc[r]);
    }
  }
  for (int r = 0; r < rows; r++) _mm256_storeu_ps(out + r * N, acc[r]);
}

KERNEL int q8_matmul(const float *x, int64_t M, int64_t K, const int8_t *qs, const uint16_t *d, int64_t N, float *out) {
  const int64_t nb = K / 32;
  float *dx, *sx;
  int8_t *qx = quantize_rows(x, M, K, &dx, &sx);
  if (qx == NULL) return -1;
#pragma omp parallel for schedule(static)
  for (int64_t g = 0; g < N / 8; g++) {
    for (int64_t m0 = 0; m0 < M; m0 += 4) {
      const int rows = M - m0 < 4 ? (int)(M - m0) : 4;
      group_q8(qs + g * nb * 256, d + g * nb * 8, qx + m0 * K, dx + m0 * nb, nb, K, rows, out + m0 * N + g * 8, N);
    }
  }
  free(qx);
  return 0;
}

/* The float32 weight [N, K] (for large batches, which then run a float GEMM). */
/* Each (group, block) holds 8 rows side by side, 4 values a row per 32 bytes: 8 bytes at a time are rows 2p and 2p + 1,
 * widened to 8 floats, scaled by those rows' d (and z) and stored as two 4-float pieces of their rows. */
KERNEL static inline void store_row_pair(__m256 v, float *row0, float *row1) {
  _mm_storeu_ps(row0, _mm256_castps256_ps128(v));
  _mm_storeu_ps(row1, _mm256_extractf128_ps(v, 1));
}

KERNEL static inline __m256 row_pair_scale(__m256 scales, int p) {  // [8 rows] -> [row 2p x4, row 2p + 1 x4]
  return _mm256_permutevar8x32_ps(scales, _mm256_setr_epi32(2 * p, 2 * p, 2 * p, 2 * p, 2 * p + 1, 2 * p + 1, 2 * p + 1, 2 * p + 1));
}

KERNEL void q4_dequantize(const uint8_t *qs, const uint16_t *d, const uint16_t *z, int64_t N, int64_t K, float *out) {
  const int64_t nb = K / 32;
  const __m256i low_mask = _mm256_set1_epi8(0x0F);
#pragma omp parallel for schedule(static)
  for (int64_t gb = 0; gb < N / 8 * nb; gb++) {  // one (group of 8 rows, block) each
    const int64_t g = gb / nb, b = gb % nb;
    const __m256 wd = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(d + gb * 8)));
    const __m256 wz = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(z + gb * 8)));
    for (int t = 0; t < 4; t++) {
      const __m256i raw = _mm256_loadu_si256((const __m256i *)(qs + gb * 128 + t * 32));
      uint8_t q[2][32];  // low nibbles (k = 4t + j), high nibbles (k = 4(t + 4) + j); row i at bytes 4i..4i+3
      _mm256_storeu_si256((__m256i *)q[0], _mm256_and_si256(raw, low_mask));
      _mm256_storeu_si256((__m256i *)q[1], _mm256_and_si256(_mm256_srli_epi16(raw, 4), low_mask));
      for (int h = 0; h < 2; h++) {
        for (int p = 0; p < 4; p++) {
          const __m256 v = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(q[h] + 8 * p))));
          float *row0 = out + (g * 8 + 2 * p) * K + b * 32 + 4 * t + 16 * h;
          store_row_pair(_mm256_fmadd_ps(v, row_pair_scale(wd, p), row_pair_scale(wz, p)), row0, row0 + K);
        }
      }
    }
  }
}

KERNEL void q8_dequantize(const int8_t *qs, const uint16_t *d, int64_t N, int64_t K, float *out) {
  const int64_t nb = K / 32;
#pragma omp parallel for schedule(static)
  for (int64_t gb = 0; gb < N / 8 * nb; gb++) {
    const int64_t g = gb / nb, b = gb % nb;
    const __m256 wd = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(d + gb * 8)));
    for (int step = 0; step < 8; step++) {
      for (int p = 0; p < 4; p++) {
        const __m128i q = _mm_loadl_epi64((const __m128i *)(qs + gb * 256 + step * 32 + 8 * p));
        float *row0 = out + (g * 8 + 2 * p) * K + b * 32 + 4 * step;
        store_row_pair(_mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q)), row_pair_scale(wd, p)), row0, row0 + K);
      }
    }
  }
}
#else
int quant_kernels_supported(void) { return 0; }
#endif
