/* Weight-only quantized matmuls for CPU: out[m, n] = sum_k x[m, k] * w[n, k], w stored in 4 or 8 bits per weight in
 * blocks of 32 along k. Built and loaded by engine/model/quant_kernels.py, checked against x @ dequantize(w).T in
 * tests/engine/test_quant.py.
 *
 * Activations stay float32: per block of 32 the kernel unpacks the weights' q to float in registers and FMAs them with
 * the float x, then scales once: d * sum(q * x) + z * sum(x) for int4 (sum(x) per block per row computed once), d *
 * sum(q * x) for int8. It reads each weight byte once. It does not round x (to int8, as integer dot products would):
 * such rounding is discontinuous, so float differences of 1e-6 that the model already has between, say, a prompt
 * prefilled in one chunk or in two flip roundings and grow to 1e-2 after a layer, and greedy text changes with chunking
 * and prefix caching. In float, results differ from x @ dequantize(w).T by summation order alone.
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

/* sum(x) per block of 32 of each row, sx [M, nb]: int4's zero term z * sum(x), computed once per row in a fixed order
 * (4 vectors of 8 added pairwise, then across lanes). NULL when out of memory. */
KERNEL static float *block_sums(const float *x, int64_t M, int64_t K) {
  const int64_t n = M * (K / 32);
  float *sx = malloc((size_t)n * sizeof(float));
  if (sx == NULL) return NULL;
  for (int64_t i = 0; i < n; i++) {  // rows are contiguous, so block i of the whole buffer is row i / nb's block i % nb
    const float *xb = x + i * 32;
    const __m256 lo = _mm256_add_ps(_mm256_loadu_ps(xb), _mm256_loadu_ps(xb + 8));
    const __m256 hi = _mm256_add_ps(_mm256_loadu_ps(xb + 16), _mm256_loadu_ps(xb + 24));
    sx[i] = hsum(_mm256_add_ps(lo, hi));
  }
  return sx;
}

/* Up to 4 activation rows against one group of 8 int4 weight rows: one weight row per lane, so no lane is ever summed
 * across. Per block, chunk t's 32 bytes are 8 int32 lanes (one per weight row) holding k = 4t + j in the low nibble of
 * byte j and k = 16 + 4t + j in its high nibble: a shift and a mask give the 8 rows' q at one k as floats, unpacked once
 * and FMA'd with each tile row's x[k] (broadcast). Two sums per row (k < 16, k >= 16) halve the FMA dependency chain.
 * A row's operations and their order are the same whatever rows are tiled beside it, so its result does not depend on
 * them. */
KERNEL static void group_q4(const uint8_t *wg, const uint16_t *dg, const uint16_t *zg, const float *x, const float *sx,
                            int64_t nb, int64_t K, int rows, float *out, int64_t N) {
  const __m256i nibble = _mm256_set1_epi32(0x0F);
  __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
  for (int64_t b = 0; b < nb; b++) {
    __m256 lo[4], hi[4];  // per tile row: sum of q * x over k < 16 and over k >= 16 of this block
    for (int r = 0; r < 4; r++) lo[r] = hi[r] = _mm256_setzero_ps();
    for (int t = 0; t < 4; t++) {
      const __m256i raw = _mm256_loadu_si256((const __m256i *)(wg + b * 128 + t * 32));
      for (int j = 0; j < 4; j++) {
        const __m256 q_lo = _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srli_epi32(raw, 8 * j), nibble));  // k = 4t + j
        const __m256 q_hi = _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srli_epi32(raw, 8 * j + 4), nibble));  // 16 + 4t + j
        for (int r = 0; r < rows; r++) {
          const float *xb = x + r * K + b * 32;
          lo[r] = _mm256_fmadd_ps(q_lo, _mm256_broadcast_ss(xb + 4 * t + j), lo[r]);
          hi[r] = _mm256_fmadd_ps(q_hi, _mm256_broadcast_ss(xb + 16 + 4 * t + j), hi[r]);
        }
      }
    }
    const __m256 wd = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(dg + b * 8)));
    const __m256 wz = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(zg + b * 8)));
    for (int r = 0; r < rows; r++) {  // d * sum(q * x) + z * sum(x)
      acc[r] = _mm256_fmadd_ps(_mm256_add_ps(lo[r], hi[r]), wd, acc[r]);
      acc[r] = _mm256_fmadd_ps(wz, _mm256_set1_ps(sx[r * nb + b]), acc[r]);
    }
  }
  for (int r = 0; r < rows; r++) _mm256_storeu_ps(out + r * N, acc[r]);
}

/* Returns 0, or -1 when the block sums could not be allocated (out is then untouched). */
KERNEL int q4_matmul(const float *x, int64_t M, int64_t K, const uint8_t *qs, const uint16_t *d, const uint16_t *z,
                     int64_t N, float *out) {
  const int64_t nb = K / 32;
  float *sx = block_sums(x, M, K);
  if (sx == NULL) return -1;
#pragma omp parallel for schedule(static)
  for (int64_t g = 0; g < N / 8; g++) {
    for (int64_t m0 = 0; m0 < M; m0 += 4) {
      const int rows = M - m0 < 4 ? (int)(M - m0) : 4;
      group_q4(qs + g * nb * 128, d + g * nb * 8, z + g * nb * 8, x + m0 * K, sx + m0 * nb, nb, K, rows,
               out + m0 * N + g * 8, N);
    }
  }
  free(sx);
  return 0;
}

/* group_q4 for int8 weights: chunk s's 8 int32 lanes hold k = 4s + j in byte j; shifting byte j to the top and back
 * (arithmetic) sign-extends it. Two sums per row (k < 16, k >= 16), then d * sum(q * x). */
KERNEL static void group_q8(const int8_t *wg, const uint16_t *dg, const float *x, int64_t nb, int64_t K, int rows, float *out,
                            int64_t N) {
  __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
  for (int64_t b = 0; b < nb; b++) {
    __m256 lo[4], hi[4];
    for (int r = 0; r < 4; r++) lo[r] = hi[r] = _mm256_setzero_ps();
    for (int s = 0; s < 4; s++) {
      const __m256i raw_lo = _mm256_loadu_si256((const __m256i *)(wg + b * 256 + s * 32));        // k = 4s + j
      const __m256i raw_hi = _mm256_loadu_si256((const __m256i *)(wg + b * 256 + (s + 4) * 32));  // k = 16 + 4s + j
      for (int j = 0; j < 4; j++) {
        const __m256 q_lo = _mm256_cvtepi32_ps(_mm256_srai_epi32(_mm256_slli_epi32(raw_lo, 24 - 8 * j), 24));
        const __m256 q_hi = _mm256_cvtepi32_ps(_mm256_srai_epi32(_mm256_slli_epi32(raw_hi, 24 - 8 * j), 24));
        for (int r = 0; r < rows; r++) {
          const float *xb = x + r * K + b * 32;
          lo[r] = _mm256_fmadd_ps(q_lo, _mm256_broadcast_ss(xb + 4 * s + j), lo[r]);
          hi[r] = _mm256_fmadd_ps(q_hi, _mm256_broadcast_ss(xb + 16 + 4 * s + j), hi[r]);
        }
      }
    }
    const __m256 wd = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(dg + b * 8)));
    for (int r = 0; r < rows; r++) acc[r] = _mm256_fmadd_ps(_mm256_add_ps(lo[r], hi[r]), wd, acc[r]);
  }
  for (int r = 0; r < rows; r++) _mm256_storeu_ps(out + r * N, acc[r]);
}

KERNEL void q8_matmul(const float *x, int64_t M, int64_t K, const int8_t *qs, const uint16_t *d, int64_t N, float *out) {
  const int64_t nb = K / 32;
#pragma omp parallel for schedule(static)
  for (int64_t g = 0; g < N / 8; g++) {
    for (int64_t m0 = 0; m0 < M; m0 += 4) {
      const int rows = M - m0 < 4 ? (int)(M - m0) : 4;
      group_q8(qs + g * nb * 256, d + g * nb * 8, x + m0 * K, nb, K, rows, out + m0 * N + g * 8, N);
    }
  }
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
