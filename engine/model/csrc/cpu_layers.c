/* RMSNorm (with its residual add) and rotary embedding (with the K/V cache write), fp32, CPU: the small ops of a
 * decode step, one call each instead of five to nine torch ops whose per-op overhead dwarfs their work at a few tokens.
 * Built and loaded by engine/model/cpu_layers.py, checked against the PyTorch path of layers.py in
 * tests/engine/test_cpu_layers.py.
 *
 * Every row (token) is computed by the same code in the same order whatever the number of rows in the call, on one
 * thread or in the OpenMP loop: a row's result never depends on its batch (batch invariance, tested bitwise).
 * Layouts (contiguous): x, residual, out [num_tokens, hidden]; qkv [num_tokens, (num_heads + 2 * num_kv_heads) *
 * head_dim] as qkv_proj gives it; cos_signed_sin [2, max_positions, head_dim] (layers.RotaryEmbedding: cos, then sin
 * with its first half negated); q_out [num_tokens, num_heads, head_dim]; k_cache, v_cache [num_slots, num_kv_heads,
 * head_dim] (the paged cache, a slot being block_id * block_size + offset).
 */
/* A fixed summation order (no reassociation the compiler could choose per call site or alignment), and no fused
 * multiply-add: each product rounded, as torch's separate mul and add ops round them. */
#pragma GCC optimize("no-associative-math", "fp-contract=off")

#include <math.h>
#include <stdint.h>
#include <string.h>

/* From this many tokens on (prefill chunks, large decode batches), the rows are shared among OpenMP threads. A norm's
 * row takes about 0.25 us on one core: below this, waking a second thread (on a shared box, one that may be descheduled)
 * costs more than it saves. */
#define PARALLEL_MIN_TOKENS 64
#define LORA_PARALLEL_MIN_TOKENS 4  // a row's LoRA update is ~width * (in + out) FMAs: worth a thread from few rows
#define LANES 8

/* out = x / sqrt(mean(x^2) + eps) * weight, with Hugging Face's rounding of the two products. The sum of squares is
 * taken in double over LANES fixed lanes, then rounded once: the float32 result is then nearly always the correctly
 * rounded inverse RMS (torch sums in float32, so the two paths can differ by an ulp of it, nothing more). */
static void norm_row(const float *x, const float *weight, int64_t hidden, float eps, float *out) {
  double lanes[LANES] = {0};
  int64_t i = 0;
  for (; i + LANES <= hidden; i += LANES)
    for (int l = 0; l < LANES; l++) lanes[l] += (double)x[i + l] * (double)x[i + l];
  double sum = 0.0;
  for (int l = 0; l < LANES; l++) sum += lanes[l];
  for (; i < hidden; i++) sum += (double)x[i] * (double)x[i];
  const float inv_rms = (float)(1.0 / sqrt(sum / (double)hidden + (double)eps));
  for (i = 0; i < hidden; i++) out[i] = (x[i] * inv_rms) * weight[i];
}

/* out = norm(x) * weight, x [num_tokens, hidden]. */
void rms_norm(const float *x, const float *weight, int64_t num_tokens, int64_t hidden, float eps, float *out) {
#pragma omp parallel for schedule(static) if (num_tokens >= PARALLEL_MIN_TOKENS)
  for (int64_t t = 0; t < num_tokens; t++) norm_row(x + t * hidden, weight, hidden, eps, out + t * hidden);
}

/* residual += x, then out = norm(residual) * weight; out may be x (the layer's output, no longer needed). */
void add_rms_norm(const float *x, float *residual, const float *weight, int64_t num_tokens, int64_t hidden, float eps,
                  float *out) {
#pragma omp parallel for schedule(static) if (num_tokens >= PARALLEL_MIN_TOKENS)
  for (int64_t t = 0; t < num_tokens; t++) {
    float *r = residual + t * hidden;
    const float *xt = x + t * hidden;
    for (int64_t i = 0; i < hidden; i++) r[i] += xt[i];
    norm_row(r, weight, hidden, eps, out + t * hidden);
  }
}

/* One head: out = x * cos + rotate_half(x) * sin, rotate_half(x) * sin = roll(x, half) * signed_sin (layers.py). */
static void rotate_head(const float *x, const float *cos, const float *signed_sin, int64_t head_dim, float *out) {
  const int64_t half = head_dim / 2;
  for (int64_t j = 0; j < half; j++) out[j] = x[j] * cos[j] + x[j + half] * signed_sin[j];
  for (int64_t j = half; j < head_dim; j++) out[j] = x[j] * cos[j] + x[j - half] * signed_sin[j];
}

/* Rotary on every token's q heads (into q_out) and k heads (into the key cache at its slot), v copied to the value
 * cache at the same slot. Returns 0, or -1 (nothing written) when a position or slot is out of range. */
int rotary_write_kv(const float *qkv, const int64_t *positions, const int64_t *slots, const float *cos_signed_sin,
                    int64_t num_tokens, int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
                    int64_t max_positions, int64_t num_slots, float *q_out, float *k_cache, float *v_cache) {
  for (int64_t t = 0; t < num_tokens; t++)
    if (positions[t] < 0 || positions[t] >= max_positions || slots[t] < 0 || slots[t] >= num_slots) return -1;
  const int64_t q_size = num_heads * head_dim, kv_size = num_kv_heads * head_dim, row = q_size + 2 * kv_size;
#pragma omp parallel for schedule(static) if (num_tokens >= PARALLEL_MIN_TOKENS)
  for (int64_t t = 0; t < num_tokens; t++) {
    const float *cos = cos_signed_sin + positions[t] * head_dim;
    const float *signed_sin = cos_signed_sin + (max_positions + positions[t]) * head_dim;
    const float *q = qkv + t * row, *k = q + q_size, *v = k + kv_size;
    for (int64_t h = 0; h < num_heads; h++)
      rotate_head(q + h * head_dim, cos, signed_sin, head_dim, q_out + t * q_size + h * head_dim);
    float *k_slot = k_cache + slots[t] * kv_size;
    for (int64_t h = 0; h < num_kv_heads; h++)
      rotate_head(k + h * head_dim, cos, signed_sin, head_dim, k_slot + h * head_dim);
    memcpy(v_cache + slots[t] * kv_size, v, sizeof(float) * kv_size);
  }
  return 0;
}

/* One row of lora_add. Compiled twice (GCC's target_clones, picked once at load by the CPU): with AVX2 and FMA where the
 * CPU has them, for baseline x86-64 elsewhere; the rest of this file stays baseline. */
__attribute__((target_clones("arch=x86-64-v3", "default"))) static void lora_row(float *out_t, const float *x_t,
                                                                                  const float *a_s, const float *b_s,
                                                                                  int64_t in, int64_t n_out, int64_t width) {
  for (int64_t w = 0; w < width; w++) {
    const float *a_w = a_s + w * in;
    float lanes[8] = {0};  // (A_s x[t])[w] in 8 partial sums: one vector register, summed in a fixed order after
    int64_t k = 0;
    for (; k + 8 <= in; k += 8)
      for (int i = 0; i < 8; i++) lanes[i] += a_w[k + i] * x_t[k + i];
    for (; k < in; k++) lanes[k % 8] += a_w[k] * x_t[k];
    const float shrink = ((lanes[0] + lanes[4]) + (lanes[1] + lanes[5])) + ((lanes[2] + lanes[6]) + (lanes[3] + lanes[7]));
    if (shrink == 0.0f) continue;  // a zero-padded rank (rank below max_rank) adds nothing
    for (int64_t j = 0; j < n_out; j++) out_t[j] += shrink * b_s[w * n_out + j];
  }
}

/* LoRA's update for each row of a step (engine/model/lora.py): out[t] += B_s (A_s x[t]) with s the row's slot, slot 0
 * (the base model) adding nothing. a [num_slots, width, in] holds slot s at index s - 1, b [num_slots, width, n_out]
 * likewise (B transposed). Each row reads only its own slot's matrices, where the PyTorch path multiplies every row by
 * every slot's and masks, and a row's arithmetic (and its order) never depends on the rows beside it. */
void lora_add(float *out, const float *x, const float *a, const float *b, const int64_t *slots, int64_t num_tokens,
              int64_t in, int64_t n_out, int64_t width) {
#pragma omp parallel for schedule(static) if (num_tokens >= LORA_PARALLEL_MIN_TOKENS)
  for (int64_t t = 0; t < num_tokens; t++) {
    if (slots[t] <= 0) continue;
    lora_row(out + t * n_out, x + t * in, a + (slots[t] - 1) * width * in, b + (slots[t] - 1) * width * n_out, in, n_out,
             width);
  }
}
