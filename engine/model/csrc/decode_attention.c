/* Decode attention over the paged KV cache, fp32, CPU: one query token per sequence, keys and values read where they
 * lie in the cache (no gathered copy), one OpenMP task per sequence. Built and loaded by engine/model/cpu_attention.py,
 * checked against the PyTorch reference in tests/engine/test_cpu_attention.py.
 *
 * Layouts (all contiguous): q and out [num_tokens, num_kv_heads * group, head_dim], the query heads of one KV head
 * adjacent; k_cache and v_cache [num_blocks, block_size, num_kv_heads, head_dim]; block_tables [num_seqs, max_blocks].
 * Sequence s's query is row q_rows[s] and sees its keys first..seq_lens[s]-1, where first cuts Mistral's sliding window
 * (key j is visible from query i when i - window < j <= i; window 0: no window).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__x86_64__)
#define VECTOR_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define VECTOR_CLONES
#endif

/* One sequence, all its heads, so that each cached position's K (then V) row of every head is read in one contiguous
 * sweep: per (sequence, KV head) tasks read the same rows in 256-byte strided pieces and ran twice as slow from DRAM.
 * Scores first (one pass over K), softmax per head, then the weighted sum (one pass over V). */
VECTOR_CLONES
static void attend(const float *q, float *out, const float *k_cache, const float *v_cache, const int32_t *table,
                   int64_t first, int64_t len, int64_t block_size, int64_t num_kv_heads, int64_t group, int64_t head_dim,
                   float scale, float *scores /* [num_heads, len - first] */) {
  const int64_t n = len - first, num_heads = num_kv_heads * group, row = num_kv_heads * head_dim;
  for (int64_t t = first; t < len; t++) {
    const float *key = k_cache + ((int64_t)table[t / block_size] * block_size + t % block_size) * row;
    for (int64_t h = 0; h < num_heads; h++) {
      const float *qh = q + h * head_dim, *kh = key + (h / group) * head_dim;
      float dot = 0.f;
      for (int64_t d = 0; d < head_dim; d++) dot += qh[d] * kh[d];
      scores[h * n + (t - first)] = dot * scale;
    }
  }
  for (int64_t h = 0; h < num_heads; h++) {
    float *sh = scores + h * n, max_score = -INFINITY, sum = 0.f;
    for (int64_t i = 0; i < n; i++) max_score = sh[i] > max_score ? sh[i] : max_score;
    for (int64_t i = 0; i < n; i++) {
      sh[i] = expf(sh[i] - max_score);
      sum += sh[i];
    }
    const float inv = 1.f / sum;
    for (int64_t i = 0; i < n; i++) sh[i] *= inv;
  }
  memset(out, 0, sizeof(float) * num_heads * head_dim);
  for (int64_t t = first; t < len; t++) {
    const float *value = v_cache + ((int64_t)table[t / block_size] * block_size + t % block_size) * row;
    for (int64_t h = 0; h < num_heads; h++) {
      const float p = scores[h * n + (t - first)], *vh = value + (h / group) * head_dim;
      float *oh = out + h * head_dim;
      for (int64_t d = 0; d < head_dim; d++) oh[d] += p * vh[d];
    }
  }
}

/* Returns 0, or -1 when a scores buffer could not be allocated (out is then incomplete). */
int decode_attention(const float *q, const float *k_cache, const float *v_cache, const int32_t *block_tables,
                     const int32_t *seq_lens, const int64_t *q_rows, float *out, int64_t num_seqs, int64_t max_blocks,
                     int64_t block_size, int64_t num_kv_heads, int64_t group, int64_t head_dim, float scale,
                     int64_t window) {
  const int64_t row_stride = num_kv_heads * group * head_dim;
  int failed = 0;
#pragma omp parallel for schedule(dynamic, 1) reduction(| : failed)
  for (int64_t s = 0; s < num_seqs; s++) {
    const int64_t len = seq_lens[s];
    const int64_t first = (window > 0 && len > window) ? len - window : 0;
    float *scores = malloc(sizeof(float) * row_stride / head_dim * (len - first));
    if (scores == NULL) {
      failed |= 1;
      continue;
    }
    attend(q + q_rows[s] * row_stride, out + q_rows[s] * row_stride, k_cache, v_cache, block_tables + s * max_blocks, first,
           len, block_size, num_kv_heads, group, head_dim, scale, scores);
    free(scores);
  }
  return failed ? -1 : 0;
}
