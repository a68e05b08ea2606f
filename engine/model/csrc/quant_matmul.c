/* Weight-only quantized matmuls for CPU: out[m, n] = sum_k x[m, k] * w[n, k], w stored in 4 or 8 bits per weight in
 * blocks of 32 along k. Built and loaded by engine/model/quant_kernels.py, checked in tests/engine/test_quant.py.
 *
 * One formula, two ways to run it. Every output is one float32 chain over k in ascending order,
 *     w = q * d + z (int4, one FMA) or q * d (int8), from the fp16 scales of w's block,
 *     acc = fma(w, x[m, k], acc), acc starting at 0,
 * so a row's result never depends on the rows beside it, on the batch size, on the path below or on the thread count:
 * bit for bit. (Against x @ dequantize(w).T it differs by float summation order only.) Activations stay float32:
 * rounding them to int8, as integer dot products would, is discontinuous, so the 1e-6 differences the model already has
 * between, say, a prompt prefilled in one chunk or two flip roundings, grow to 1e-2 after a layer, and change greedy
 * text under chunking and prefix caching.
 *   - direct (few rows, decode): per k, the q of 16 weight rows are unpacked to w in registers and FMA'd with each
 *     row's x[k]; the weights are read once from memory, and each unpack serves the few rows of the call.
 *   - panel (many rows, prefill and batched decode): 16 weight rows are dequantized, 256 k at a time, into a panel in
 *     L1 (the same FMA: the same w), which a 6-row x 16-column register tile then sweeps for every row of x: the
 *     unpacking is paid once per weight, not once per row, and the inner loop is 2 loads, 6 broadcasts, 12 FMAs.
 * Threads (OpenMP, torch's runtime) split the weight rows, 16 at a time; each output is computed by one thread.
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
#define INLINE KERNEL static inline __attribute__((always_inline))

enum { KC = 256, TILE_ROWS = 6, DIRECT_ROWS = 3 };  // panel depth in k; register tile rows; most rows direct takes

int quant_kernels_supported(void) {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
}

/* The weights of one group of 8 rows. Functions taking `bits` (4 or 8) are inlined into a copy per format, so that the
 * inner loops hold no test of it (a value passed into an OpenMP region would stay a run-time one). */
typedef struct {
  const uint8_t *qs;  // the group's first block
  const uint16_t *d, *z;  // the group's scales (and int4 zeros), 8 per block
} Group;

INLINE Group group_at(int bits, const uint8_t *qs, const uint16_t *d, const uint16_t *z, int64_t g, int64_t nb) {
  Group out = {qs + g * nb * (bits == 4 ? 128 : 256), d + g * nb * 8, z == NULL ? NULL : z + g * nb * 8};
  return out;
}

/* The 8 rows' w at k = 32b + 16h + 4t + j (int4) or 32b + 4s + j, s = 4h + t (int8): raw is the 32 bytes holding them.
 * int4: a shift and a mask pick the nibble; int8: shifting byte j to the top and back (arithmetic) sign-extends it. */
INLINE __m256i load_raw(int bits, const Group *g, int64_t b, int h, int t) {
  const int64_t offset = bits == 4 ? b * 128 + t * 32 : b * 256 + (4 * h + t) * 32;
  return _mm256_loadu_si256((const __m256i *)(g->qs + offset));
}

INLINE __m256 weight_at(int bits, __m256i raw, __m256 d, __m256 z, int h, int j) {
  if (bits == 4) {
    const __m256i q = _mm256_and_si256(_mm256_srli_epi32(raw, 8 * j + 4 * h), _mm256_set1_epi32(0x0F));
    return _mm256_fmadd_ps(_mm256_cvtepi32_ps(q), d, z);
  }
  const __m256 q = _mm256_cvtepi32_ps(_mm256_srai_epi32(_mm256_slli_epi32(raw, 24 - 8 * j), 24));
  return _mm256_mul_ps(q, d);
}

INLINE __m256 scales(const uint16_t *s, int64_t b) { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(s + b * 8))); }

INLINE __m256 zeros(int bits, const uint16_t *z, int64_t b) { return bits == 4 ? scales(z, b) : _mm256_setzero_ps(); }

/* direct: R rows of x against G groups of 8 weight rows (R * G <= 4 chains, a group for each while R is small, which
 * keeps 4 FMA chains in flight: one chain would wait out the FMA latency at every k), w unpacked in registers. */
INLINE void direct_tile(int bits, const Group *gs, int G, const float *x, int64_t K, int R, float *out, int64_t N) {
  __m256 acc[DIRECT_ROWS][4];
  for (int r = 0; r < R; r++)
    for (int c = 0; c < G; c++) acc[r][c] = _mm256_setzero_ps();
  for (int64_t b = 0; b < K / 32; b++) {
    __m256 d[4], z[4];
    for (int c = 0; c < G; c++) d[c] = scales(gs[c].d, b), z[c] = zeros(bits, gs[c].z, b);
    for (int h = 0; h < 2; h++) {
      for (int t = 0; t < 4; t++) {
        __m256i raw[4];
        for (int c = 0; c < G; c++) raw[c] = load_raw(bits, &gs[c], b, h, t);
        for (int j = 0; j < 4; j++) {
          const int64_t k = 32 * b + 16 * h + 4 * t + j;
          for (int c = 0; c < G; c++) {
            const __m256 w = weight_at(bits, raw[c], d[c], z[c], h, j);
            for (int r = 0; r < R; r++) acc[r][c] = _mm256_fmadd_ps(w, _mm256_broadcast_ss(x + r * K + k), acc[r][c]);
          }
        }
      }
    }
  }
  for (int r = 0; r < R; r++)
    for (int c = 0; c < G; c++) _mm256_storeu_ps(out + r * N + 8 * c, acc[r][c]);
}

INLINE void direct_rows(int bits, const Group *gs, int G, const float *x, int64_t K, int R, float *out, int64_t N) {
  // One specialisation per (G, R): the compiler keeps the accumulators in registers only when both are constants.
  // 1 row takes up to 4 groups per call; more rows take 1 or 2 (the caller splits).
  switch (G * 4 + R) {
    case 5: direct_tile(bits, gs, 1, x, K, 1, out, N); break;
    case 6: direct_tile(bits, gs, 1, x, K, 2, out, N); break;
    case 7: direct_tile(bits, gs, 1, x, K, 3, out, N); break;
    case 9: direct_tile(bits, gs, 2, x, K, 1, out, N); break;
    case 10: direct_tile(bits, gs, 2, x, K, 2, out, N); break;
    case 11: direct_tile(bits, gs, 2, x, K, 3, out, N); break;
    case 13: direct_tile(bits, gs, 3, x, K, 1, out, N); break;
    default: direct_tile(bits, gs, 4, x, K, 1, out, N); break;
  }
}

/* panel: G groups' w for k in [k0, k0 + kc) into panel[kk][8G] (the same weight_at as direct: the same floats). */
INLINE void fill_panel(int bits, const Group *gs, int G, int64_t k0, int64_t kc, float *panel) {
  for (int c = 0; c < G; c++) {
    for (int64_t b = k0 / 32; b < (k0 + kc) / 32; b++) {
      const __m256 d = scales(gs[c].d, b), z = zeros(bits, gs[c].z, b);
      for (int h = 0; h < 2; h++) {
        for (int t = 0; t < 4; t++) {
          const __m256i raw = load_raw(bits, &gs[c], b, h, t);
          for (int j = 0; j < 4; j++) {
            const int64_t kk = 32 * b + 16 * h + 4 * t + j - k0;
            _mm256_store_ps(panel + kk * 8 * G + 8 * c, weight_at(bits, raw, d, z, h, j));
          }
        }
      }
    }
  }
}

/* R rows of x against the panel (8G columns), k in [k0, k0 + kc): the chains continue from out unless k0 == 0. */
INLINE void panel_tile(const float *panel, int G, const float *x, int64_t K, int64_t k0, int64_t kc, int R, float *out,
                       int64_t N) {
  __m256 acc[TILE_ROWS][2];
  for (int r = 0; r < R; r++)
    for (int c = 0; c < G; c++) acc[r][c] = k0 == 0 ? _mm256_setzero_ps() : _mm256_loadu_ps(out + r * N + 8 * c);
  for (int64_t kk = 0; kk < kc; kk++) {
    const __m256 w0 = _mm256_load_ps(panel + kk * 8 * G);
    const __m256 w1 = G == 2 ? _mm256_load_ps(panel + kk * 8 * G + 8) : w0;
    for (int r = 0; r < R; r++) {
      const __m256 xr = _mm256_broadcast_ss(x + r * K + k0 + kk);
      acc[r][0] = _mm256_fmadd_ps(w0, xr, acc[r][0]);
      if (G == 2) acc[r][1] = _mm256_fmadd_ps(w1, xr, acc[r][1]);
    }
  }
  for (int r = 0; r < R; r++)
    for (int c = 0; c < G; c++) _mm256_storeu_ps(out + r * N + 8 * c, acc[r][c]);
}

KERNEL static void panel_rows(const float *panel, int G, const float *x, int64_t K, int64_t k0, int64_t kc, int R,
                              float *out, int64_t N) {
  switch (R) {  // one specialisation per row count (see direct_rows); G == 1 only for an odd last group
    case 6: G == 2 ? panel_tile(panel, 2, x, K, k0, kc, 6, out, N) : panel_tile(panel, 1, x, K, k0, kc, 6, out, N); break;
    case 5: G == 2 ? panel_tile(panel, 2, x, K, k0, kc, 5, out, N) : panel_tile(panel, 1, x, K, k0, kc, 5, out, N); break;
    case 4: G == 2 ? panel_tile(panel, 2, x, K, k0, kc, 4, out, N) : panel_tile(panel, 1, x, K, k0, kc, 4, out, N); break;
    case 3: G == 2 ? panel_tile(panel, 2, x, K, k0, kc, 3, out, N) : panel_tile(panel, 1, x, K, k0, kc, 3, out, N); break;
    case 2: G == 2 ? panel_tile(panel, 2, x, K, k0, kc, 2, out, N) : panel_tile(panel, 1, x, K, k0, kc, 2, out, N); break;
    default: G == 2 ? panel_tile(panel, 2, x, K, k0, kc, 1, out, N) : panel_tile(panel, 1, x, K, k0, kc, 1, out, N); break;
  }
}

/* One copy of each per format (see Group). */
KERNEL static void direct_q4(const Group *gs, int G, const float *x, int64_t K, int R, float *out, int64_t N) {
  direct_rows(4, gs, G, x, K, R, out, N);
}
KERNEL static void direct_q8(const Group *gs, int G, const float *x, int64_t K, int R, float *out, int64_t N) {
  direct_rows(8, gs, G, x, K, R, out, N);
}
KERNEL static void fill_panel_q4(const Group *gs, int G, int64_t k0, int64_t kc, float *panel) {
  fill_panel(4, gs, G, k0, kc, panel);
}
KERNEL static void fill_panel_q8(const Group *gs, int G, int64_t k0, int64_t kc, float *panel) {
  fill_panel(8, gs, G, k0, kc, panel);
}

/* out = x @ w.T for either format, split over the threads by weight rows: 32 at a time direct (M < panel_min_rows),
 * 16 at a time on panels. Returns 0, or -1 when a thread's panel could not be allocated (out is then incomplete). */
KERNEL static int quant_matmul(int bits, const float *x, int64_t M, int64_t K, const uint8_t *qs, const uint16_t *d,
                               const uint16_t *z, int64_t N, float *out, int64_t panel_min_rows) {
  const int64_t nb = K / 32, num_groups = N / 8;
  void (*const direct)(const Group *, int, const float *, int64_t, int, float *, int64_t) = bits == 4 ? direct_q4 : direct_q8;
  void (*const fill)(const Group *, int, int64_t, int64_t, float *) = bits == 4 ? fill_panel_q4 : fill_panel_q8;
  if (M < panel_min_rows) {
#pragma omp parallel for schedule(static)
    for (int64_t g0 = 0; g0 < num_groups; g0 += 4) {
      Group gs[4];
      const int G = num_groups - g0 < 4 ? (int)(num_groups - g0) : 4;
      for (int c = 0; c < G; c++) gs[c] = group_at(bits, qs, d, z, g0 + c, nb);
      for (int64_t m0 = 0; m0 < M; m0 += DIRECT_ROWS) {
        const int R = M - m0 < DIRECT_ROWS ? (int)(M - m0) : DIRECT_ROWS;
        if (R == 1) {
          direct(gs, G, x + m0 * K, K, 1, out + m0 * N + 8 * g0, N);
          continue;
        }
        for (int c = 0; c < G; c += 2)  // 2 or 3 rows: 2 groups at a time
          direct(gs + c, G - c < 2 ? 1 : 2, x + m0 * K, K, R, out + m0 * N + 8 * (g0 + c), N);
      }
    }
    return 0;
  }
  const int64_t num_pairs = (num_groups + 1) / 2;
  int failed = 0;
#pragma omp parallel reduction(| : failed)
  {
    float *panel = aligned_alloc(64, KC * 16 * sizeof(float));
    failed = panel == NULL;
#pragma omp for schedule(static)
    for (int64_t p = 0; p < num_pairs; p++) {
      if (failed) continue;
      const int G = 2 * p + 1 < num_groups ? 2 : 1;
      const Group gs[2] = {group_at(bits, qs, d, z, 2 * p, nb), group_at(bits, qs, d, z, 2 * p + G - 1, nb)};
      for (int64_t k0 = 0; k0 < K; k0 += KC) {
        const int64_t kc = K - k0 < KC ? K - k0 : KC;
        fill(gs, G, k0, kc, panel);
        // Rows in tiles of (nearly) equal size: 8 rows as 4 + 4 rather than 6 + 2, whose 4 FMA chains would wait
        // out the FMA latency.
        const int64_t num_tiles = (M + TILE_ROWS - 1) / TILE_ROWS;
        for (int64_t tile = 0, m0 = 0; tile < num_tiles; tile++) {
          const int rows = (int)((M - m0) / (num_tiles - tile));  // the rest spread over the tiles left; at most 6
          panel_rows(panel, G, x + m0 * K, K, k0, kc, rows, out + m0 * N + 16 * p, N);
          m0 += rows;
        }
      }
    }
    free(panel);
  }
  return failed ? -1 : 0;
}

KERNEL int q4_matmul(const float *x, int64_t M, int64_t K, const uint8_t *qs, const uint16_t *d, const uint16_t *z,
                     int64_t N, float *out, int64_t panel_min_rows) {
  return quant_matmul(4, x, M, K, qs, d, z, N, out, panel_min_rows);
}

KERNEL int q8_matmul(const float *x, int64_t M, int64_t K, const int8_t *qs, const uint16_t *d, int64_t N, float *out,
                     int64_t panel_min_rows) {
  return quant_matmul(8, x, M, K, (const uint8_t *)qs, d, NULL, N, out, panel_min_rows);
}

/* The float32 weight [N, K] (what the torch path and the tests multiply by): weight_at's floats, row by row. */
KERNEL static void dequantize(int bits, const uint8_t *qs, const uint16_t *d, const uint16_t *z, int64_t N, int64_t K,
                              float *out) {
  const int64_t nb = K / 32;
#pragma omp parallel for schedule(static)
  for (int64_t g = 0; g < N / 8; g++) {
    const Group gr = group_at(bits, qs, d, z, g, nb);
    float panel[KC * 8] __attribute__((aligned(32)));
    for (int64_t k0 = 0; k0 < K; k0 += KC) {
      const int64_t kc = K - k0 < KC ? K - k0 : KC;
      (bits == 4 ? fill_panel_q4 : fill_panel_q8)(&gr, 1, k0, kc, panel);
      for (int64_t kk = 0; kk < kc; kk++)
        for (int i = 0; i < 8; i++) out[(8 * g + i) * K + k0 + kk] = panel[kk * 8 + i];
    }
  }
}

KERNEL void q4_dequantize(const uint8_t *qs, const uint16_t *d, const uint16_t *z, int64_t N, int64_t K, float *out) {
  dequantize(4, qs, d, z, N, K, out);
}

KERNEL void q8_dequantize(const int8_t *qs, const uint16_t *d, int64_t N, int64_t K, float *out) {
  dequantize(8, (const uint8_t *)qs, d, NULL, N, K, out);
}
#else
int quant_kernels_supported(void) { return 0; }
#endif
