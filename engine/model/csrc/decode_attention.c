/* Decode attention over the paged KV cache, fp32, CPU: one query token per sequence, keys and values read where they
 * lie in the cache (no gathered copy). Built and loaded by engine/model/cpu_attention.py, checked against the PyTorch
 * reference in tests/engine/test_cpu_attention.py.
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

#define MAX_GROUP 64 /* query heads per KV head; cpu_attention.py checks it */

#if defined(__x86_64__)
#define VECTOR_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define VECTOR_CLONES
#endif

/* One (sequence, KV head): scores of its `group` query heads against every visible key, softmax, weighted sum of values.
 * k and v point at this KV head's slice of block 0; token_stride is the distance between two positions. */
VECTOR_CLONES
static void attend(const float *q, float *out, const float *k, const float *v, const int32_t *table, int64_t first,
                   int64_t len, int64_t block_size, int64_t token_stride, int64_t group, int64_t head_dim, float scale,
                   float *scores /* [group, len - first] */) {
  const int64_t n = len - first;
  float max_score[MAX_GROUP], sum[MAX_GROUP];
  for (int64_t g = 0; g < group; g++) {
    max_score[g] = -INFINITY;
    sum[g] = 0.f;
  }
  for (int64_t t = first; t < len; t++) {
    const float *key = k + ((int64_t)table[t / block_size] * block_size + t % block_size) * token_stride;
    for (int64_t g = 0; g < group; g++) {
      const float *qg = q + g * head_dim;
      float dot = 0.f;
      for (int64_t d = 0; d < head_dim; d++) dot += qg[d] * key[d];
      dot *= scale;
      scores[g * n + (t - first)] = dot;
      max_score[g] = dot > max_score[g] ? dot : max_score[g];
    }
  }
  for (int64_t g = 0; g < group; g++) {
    float *sg = scores + g * n;
    for (int64_t i = 0; i < n; i++) {
      sg[i] = expf(sg[i] - max_score[g]);
      sum[g] += sg[i];
    }
    memset(out + g * head_dim, 0, sizeof(float) * head_dim);
  }
  for (int64_t t = first; t < len; t++) {
    const float *value = v + ((int64_t)table[t / block_size] * block_size + t % block_size) * token_stride;
    for (int64_t g = 0; g < group; g++) {
      const float p = scores[g * n + (t - first)];
      float *og = out + g * head_dim;
      for (int64_t d = 0; d < head_dim; d++) og[d] += p * value[d];
    }
  }
  for (int64_t g = 0; g < group; g++) {
    const float inv = 1.f / sum[g];
    for (int64_t d = 0; d < head_dim; d++) out[g * head_dim + d] *= inv;
  }
}

/* Returns 0, or -1 when a scores buffer could not be allocated (out is then incomplete). */
int decode_attention(const float *q, const float *k_cache, const float *v_cache, const int32_t *block_tables,
                     const int32_t *seq_lens, const int64_t *q_rows, float *out, int64_t num_seqs, int64_t max_blocks,
                     int64_t block_size, int64_t num_kv_heads, int64_t group, int64_t head_dim, float scale,
                     int64_t window) {
  const int64_t token_stride = num_kv_heads * head_dim;
  const int64_t row_stride = num_kv_heads * group * head_dim;
  int failed = 0;
#pragma omp parallel for schedule(dynamic, 1) collapse(2) reduction(| : failed)
  for (int64_t s = 0; s < num_seqs; s++) {
    for (int64_t h = 0; h < num_kv_heads; h++) {
      const int64_t len = seq_lens[s];
      const int64_t first = (window > 0 && len > window) ? len - window : 0;
      float *scores = malloc(sizeof(float) * group * (len - first));
      if (scores == NULL) {
        failed |= 1;
        continue;
      }
      const int64_t offset = q_rows[s] * row_stride + h * group * head_dim;
      attend(q + offset, out + offset, k_cache + h * head_dim, v_cache + h * head_dim, block_tables + s * max_blocks, first,
             len, block_size, token_stride, group, head_dim, scale, scores);
      free(scores);
    }
  }
  return failed ? -1 : 0;
}
