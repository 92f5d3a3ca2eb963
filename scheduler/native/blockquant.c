/* Products over GGUF's block-quantized weights, as llama.cpp computes them on a CPU.

   Weights keep the file's blocks of 32 input features: 4-bit values with a scale d and an offset m
   (Q4_1: w = d * q + m; Q4_0 is m = -8 d), or 8-bit values with a scale (Q8_0: w = d * q).
   Activations are quantized per row to 8 bits in blocks of 32 (Q8: x = d * q, and s = d * sum(q)),
   so a block's dot product is one integer sum:

       sum(w * x) = wd * xd * sum(qw * qx) + wm * xs

   Every output element is computed alone, in the same order of operations whatever the number of
   rows, their place in the batch, the tile or the thread that computes it: a token's result does
   not depend on the batch it is in (no float reduction is split or reordered by shape).

   Built by scheduler/native/__init__.py with the system's C compiler on first use; the AVX2 path is
   chosen at run time, and the portable path computes the same formula elsewhere. */

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#ifdef __x86_64__
#include <immintrin.h>
#endif

#define QK 32
enum { Q4_BLOCKS = 0, FLOAT32 = 1, Q8_BLOCKS = 2 }; /* kinds of weights (scheduler/native/__init__.py) */
#ifndef MR
#define MR 8 /* rows of activations per tile: each weight block is unpacked once for them */
#endif
#define NB 16 /* weight rows per unit of work: their blocks stay in cache across row tiles */

/* ---- activations ---------------------------------------------------------------------------- */

static void quantize_row(const float *x, int64_t k, int8_t *q, float *d, float *s) {
    for (int64_t b = 0; b < k / QK; b++) {
        const float *xb = x + b * QK;
        float amax = 0.0f;
        for (int j = 0; j < QK; j++) amax = fmaxf(amax, fabsf(xb[j]));
        const float scale = amax / 127.0f;
        const float divisor = scale != 0.0f ? scale : 1.0f; /* as quantized._q8_rounded divides */
        int sum = 0;
        for (int j = 0; j < QK; j++) {
            const int v = (int)nearbyintf(xb[j] / divisor);
            q[b * QK + j] = (int8_t)v;
            sum += v;
        }
        d[b] = scale;
        s[b] = scale * (float)sum;
    }
}

#ifdef __x86_64__
/* The same blocks as quantize_row, 8 values at a time (division and ties-to-even rounding alike). */
__attribute__((target("avx2,fma"))) static void quantize_row_avx2(const float *x, int64_t k, int8_t *q, float *d,
                                                                 float *s) {
    const __m256 sign = _mm256_set1_ps(-0.0f);
    for (int64_t b = 0; b < k / QK; b++) {
        __m256 v[4], top = _mm256_setzero_ps();
        for (int i = 0; i < 4; i++) {
            v[i] = _mm256_loadu_ps(x + b * QK + i * 8);
            top = _mm256_max_ps(top, _mm256_andnot_ps(sign, v[i]));
        }
        __m128 t = _mm_max_ps(_mm256_castps256_ps128(top), _mm256_extractf128_ps(top, 1));
        t = _mm_max_ps(t, _mm_movehl_ps(t, t));
        t = _mm_max_ss(t, _mm_movehdup_ps(t));
        const float scale = _mm_cvtss_f32(t) / 127.0f;
        const __m256 divisor = _mm256_set1_ps(scale != 0.0f ? scale : 1.0f);
        __m256i sum = _mm256_setzero_si256();
        int32_t values[QK];
        for (int i = 0; i < 4; i++) {
            const __m256 r = _mm256_round_ps(_mm256_div_ps(v[i], divisor), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
            const __m256i n = _mm256_cvtps_epi32(r);
            sum = _mm256_add_epi32(sum, n);
            _mm256_storeu_si256((__m256i *)(values + i * 8), n);
        }
        for (int j = 0; j < QK; j++) q[b * QK + j] = (int8_t)values[j];
        __m128i t2 = _mm_add_epi32(_mm256_castsi256_si128(sum), _mm256_extracti128_si256(sum, 1));
        t2 = _mm_hadd_epi32(t2, t2);
        t2 = _mm_hadd_epi32(t2, t2);
        d[b] = scale;
        s[b] = scale * (float)_mm_cvtsi128_si32(t2);
    }
}
#endif

static void quantize_any(const float *x, int64_t k, int8_t *q, float *d, float *s, int avx2) {
#ifdef __x86_64__
    if (avx2) {
        quantize_row_avx2(x, k, q, d, s);
        return;
    }
#endif
    quantize_row(x, k, q, d, s);
}

/* ---- portable kernels ----------------------------------------------------------------------- */

static float dot_q4_portable(const uint8_t *wq, const float *wd, const float *wm, const int8_t *xq, const float *xd,
                             const float *xs, int64_t blocks) {
    float acc = 0.0f, offsets = 0.0f;
    for (int64_t b = 0; b < blocks; b++) {
        int sum = 0;
        for (int j = 0; j < QK / 2; j++) {
            sum += (wq[b * 16 + j] & 0x0F) * xq[b * QK + j];
            sum += (wq[b * 16 + j] >> 4) * xq[b * QK + j + 16];
        }
        acc = fmaf(wd[b] * xd[b], (float)sum, acc);
        offsets = fmaf(wm[b], xs[b], offsets);
    }
    return acc + offsets;
}

static float dot_q8_portable(const int8_t *wq, const float *wd, const int8_t *xq, const float *xd, int64_t blocks) {
    float acc = 0.0f;
    for (int64_t b = 0; b < blocks; b++) {
        int sum = 0;
        for (int j = 0; j < QK; j++) sum += wq[b * QK + j] * xq[b * QK + j];
        acc = fmaf(wd[b] * xd[b], (float)sum, acc);
    }
    return acc;
}

/* ---- AVX2 kernels --------------------------------------------------------------------------- */

#ifdef __x86_64__
#define AVX2 __attribute__((target("avx2,fma"), always_inline)) static inline

AVX2 float hsum(__m256 v) {
    __m128 x = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    x = _mm_add_ps(x, _mm_movehl_ps(x, x));
    x = _mm_add_ss(x, _mm_movehdup_ps(x));
    return _mm_cvtss_f32(x);
}

/* 32 unsigned nibbles of a Q4 block: byte j holds value j (low) and j + 16 (high). */
AVX2 __m256i nibbles(const uint8_t *p) {
    const __m128i raw = _mm_loadu_si128((const __m128i *)p);
    const __m256i both = _mm256_set_m128i(_mm_srli_epi16(raw, 4), raw);
    return _mm256_and_si256(both, _mm256_set1_epi8(0x0F));
}

/* sum(a[b] * c[b]) over `blocks` floats, 8 at a time: the offsets' share of a Q4 product. */
AVX2 float dot_floats(const float *a, const float *c, int64_t blocks) {
    __m256 acc = _mm256_setzero_ps();
    int64_t b = 0;
    for (; b + 8 <= blocks; b += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + b), _mm256_loadu_ps(c + b), acc);
    float tail = 0.0f;
    for (; b < blocks; b++) tail = fmaf(a[b], c[b], tail);
    return hsum(acc) + tail;
}

/* [mr, 1] outputs of Q4 weights: each element's sums run block by block, as in every other tile. */
AVX2 void tile_q4(int mr, int64_t blocks, const uint8_t *wq, const float *wd, const float *wm, const int8_t *xq,
                  const float *xd, const float *xs, float *y, int64_t ldy) {
    __m256 acc[8];
    for (int m = 0; m < mr; m++) acc[m] = _mm256_setzero_ps();
    const __m256i ones = _mm256_set1_epi16(1);
    for (int64_t b = 0; b < blocks; b++) {
        const __m256i w = nibbles(wq + b * 16);
        const __m256 dw = _mm256_broadcast_ss(wd + b);
        for (int m = 0; m < mr; m++) {
            const __m256i x = _mm256_loadu_si256((const __m256i *)(xq + (m * blocks + b) * QK));
            const __m256i sums = _mm256_madd_epi16(_mm256_maddubs_epi16(w, x), ones);
            const __m256 dx = _mm256_broadcast_ss(xd + m * blocks + b);
            acc[m] = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(sums), dw), dx, acc[m]);
        }
    }
    for (int m = 0; m < mr; m++) y[m * ldy] = hsum(acc[m]) + dot_floats(wm, xs + m * blocks, blocks);
}

AVX2 void tile_q8(int mr, int64_t blocks, const int8_t *wq, const float *wd, const int8_t *xq, const float *xd,
                  float *y, int64_t ldy) {
    __m256 acc[8];
    for (int m = 0; m < mr; m++) acc[m] = _mm256_setzero_ps();
    const __m256i ones = _mm256_set1_epi16(1);
    for (int64_t b = 0; b < blocks; b++) {
        const __m256i w = _mm256_loadu_si256((const __m256i *)(wq + b * QK));
        const __m256i magnitude = _mm256_sign_epi8(w, w);
        const __m256 dw = _mm256_broadcast_ss(wd + b);
        for (int m = 0; m < mr; m++) {
            const __m256i x = _mm256_loadu_si256((const __m256i *)(xq + (m * blocks + b) * QK));
            /* maddubs takes one unsigned operand: |w| times x with w's sign. */
            const __m256i sums = _mm256_madd_epi16(_mm256_maddubs_epi16(magnitude, _mm256_sign_epi8(x, w)), ones);
            const __m256 dx = _mm256_broadcast_ss(xd + m * blocks + b);
            acc[m] = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(sums), dw), dx, acc[m]);
        }
    }
    for (int m = 0; m < mr; m++) y[m * ldy] = hsum(acc[m]);
}

#define CASES(CALL) \
    switch (mr) {      \
    case 8: CALL(8); break; case 7: CALL(7); break; case 6: CALL(6); break; case 5: CALL(5); break; \
    case 4: CALL(4); break; case 3: CALL(3); break; case 2: CALL(2); break; default: CALL(1);    \
    }

/* One unit of work: weight rows [n0, n1) against every activation row, in tiles of MR rows. */
__attribute__((target("avx2,fma"))) static void unit_q4_avx2(int64_t m_rows, int64_t n0, int64_t n1, int64_t blocks,
                                                            const uint8_t *wq, const float *wd, const float *wm,
                                                            const int8_t *xq, const float *xd, const float *xs,
                                                            float *y, int64_t ldy) {
    for (int64_t m = 0; m < m_rows; m += MR) {
        const int mr = m_rows - m < MR ? (int)(m_rows - m) : MR;
        for (int64_t n = n0; n < n1; n++) {
#define Q4(MRV) \
    tile_q4(MRV, blocks, wq + n * blocks * 16, wd + n * blocks, wm + n * blocks, xq + m * blocks * QK, xd + m * blocks, \
            xs + m * blocks, y + m * ldy + n, ldy)
            CASES(Q4)
#undef Q4
        }
    }
}

__attribute__((target("avx2,fma"))) static void unit_q8_avx2(int64_t m_rows, int64_t n0, int64_t n1, int64_t blocks,
                                                            const int8_t *wq, const float *wd, const int8_t *xq,
                                                            const float *xd, float *y, int64_t ldy) {
    for (int64_t m = 0; m < m_rows; m += MR) {
        const int mr = m_rows - m < MR ? (int)(m_rows - m) : MR;
        for (int64_t n = n0; n < n1; n++) {
#define Q8(MRV) \
    tile_q8(MRV, blocks, wq + n * blocks * QK, wd + n * blocks, xq + m * blocks * QK, xd + m * blocks, y + m * ldy + n, \
            ldy)
            CASES(Q8)
#undef Q8
        }
    }
}
#endif

static int has_avx2(void) {
#ifdef __x86_64__
    static int known = -1;
    if (known < 0) {
        __builtin_cpu_init();
        /* BILD_NATIVE_PORTABLE: the portable kernels on any CPU (tests/test_quantized.py runs them so) */
        known = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && !getenv("BILD_NATIVE_PORTABLE");
    }
    return known;
#else
    return 0;
#endif
}

/* ---- entry points --------------------------------------------------------------------------- */

int bild_native_avx2(void) { return has_avx2(); }

/* Scratch for one call's quantized activations; NULL when out of memory. */
typedef struct {
    int8_t *q;
    float *d, *s;
} Activations;

static int quantize(const float *x, int64_t m_rows, int64_t k, Activations *a) {
    const int64_t blocks = k / QK;
    a->q = malloc((size_t)(m_rows * k));
    a->d = malloc(sizeof(float) * (size_t)(m_rows * blocks));
    a->s = malloc(sizeof(float) * (size_t)(m_rows * blocks));
    if (!a->q || !a->d || !a->s) return -1;
#pragma omp parallel for schedule(static) if (m_rows > 1)
    for (int64_t m = 0; m < m_rows; m++)
        quantize_any(x + m * k, k, a->q + m * k, a->d + m * blocks, a->s + m * blocks, has_avx2());
    return 0;
}

static void release(Activations *a) {
    free(a->q);
    free(a->d);
    free(a->s);
}

/* y[M, N] (row stride ldy) = x[M, K] @ W.T for block-quantized weights of `kind`: Q4_BLOCKS (wq
   [N, K/2] nibbles in GGUF's block order, wd and wm [N, K/32]) or Q8_BLOCKS (wq [N, K] int8, wd
   [N, K/32]; wm unused). Returns 0, or -1 when out of memory. */
int bild_linear(int64_t kind, const float *x, int64_t m_rows, int64_t k, const void *wq, const float *wd,
                const float *wm, int64_t n_rows, float *y, int64_t ldy) {
    Activations a;
    if (quantize(x, m_rows, k, &a)) return release(&a), -1;
    const int64_t blocks = k / QK, units = (n_rows + NB - 1) / NB;
    const int avx2 = has_avx2();
#pragma omp parallel for schedule(static)
    for (int64_t u = 0; u < units; u++) {
        const int64_t n0 = u * NB, n1 = n0 + NB < n_rows ? n0 + NB : n_rows;
#ifdef __x86_64__
        if (avx2) {
            if (kind == Q8_BLOCKS)
                unit_q8_avx2(m_rows, n0, n1, blocks, wq, wd, a.q, a.d, y, ldy);
            else
                unit_q4_avx2(m_rows, n0, n1, blocks, wq, wd, wm, a.q, a.d, a.s, y, ldy);
            continue;
        }
#endif
        for (int64_t m = 0; m < m_rows; m++)
            for (int64_t n = n0; n < n1; n++)
                y[m * ldy + n] = kind == Q8_BLOCKS
                                     ? dot_q8_portable((const int8_t *)wq + n * k, wd + n * blocks, a.q + m * k,
                                                       a.d + m * blocks, blocks)
                                     : dot_q4_portable((const uint8_t *)wq + n * blocks * 16, wd + n * blocks,
                                                       wm + n * blocks, a.q + m * k, a.d + m * blocks,
                                                       a.s + m * blocks, blocks);
    }
    release(&a);
    return 0;
}

/* ---- a Llama decoder stack over Q4 layers ---------------------------------------------------- */

/* A layer's product: Q4 blocks (q: nibbles, d, m) or float32 (q: [N, K] floats; d, m unused),
   plus a bias where it has one (else NULL). */
typedef struct {
    int64_t kind;
    const void *q;
    const float *d, *m, *bias;
} Weights;


#ifdef __x86_64__
/* [mr, 1] outputs of float32 weights, each a dot product in one fixed order. */
AVX2 void tile_f32(int mr, int64_t k, const float *w, const float *x, float *y, int64_t ldy) {
    __m256 acc[8];
    for (int m = 0; m < mr; m++) acc[m] = _mm256_setzero_ps();
    int64_t j = 0;
    for (; j + 8 <= k; j += 8) {
        const __m256 wv = _mm256_loadu_ps(w + j);
        for (int m = 0; m < mr; m++) acc[m] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + m * k + j), acc[m]);
    }
    for (int m = 0; m < mr; m++) {
        float tail = 0.0f;
        for (int64_t t = j; t < k; t++) tail = fmaf(w[t], x[m * k + t], tail);
        y[m * ldy] = hsum(acc[m]) + tail;
    }
}

__attribute__((target("avx2,fma"))) static void unit_f32_avx2(int64_t m_rows, int64_t n0, int64_t n1, int64_t k,
                                                             const float *w, const float *x, float *y, int64_t ldy) {
    for (int64_t m = 0; m < m_rows; m += MR) {
        const int mr = m_rows - m < MR ? (int)(m_rows - m) : MR;
        for (int64_t n = n0; n < n1; n++) {
#define F32(MRV) tile_f32(MRV, k, w + n * k, x + m * k, y + m * ldy + n, ldy)
            CASES(F32)
#undef F32
        }
    }
}
#endif

/* y [rows, n_rows] = x [rows, k] @ W.T, activations quantized once per call for Q4 weights. Called
   by every thread of the stack's parallel region: its loops are shared out (orphaned `omp for`). */
static void product(const float *x, int64_t m_rows, int64_t k, const Weights *w, int64_t n_rows, float *y,
                    const Activations *a) {
    if (w->kind == Q4_BLOCKS) {
#pragma omp for schedule(static)
        for (int64_t m = 0; m < m_rows; m++)
            quantize_any(x + m * k, k, a->q + m * k, a->d + m * (k / QK), a->s + m * (k / QK), 1);
    }
    const int64_t blocks = k / QK, units = (n_rows + NB - 1) / NB;
#pragma omp for schedule(static)
    for (int64_t u = 0; u < units; u++) {
        const int64_t n0 = u * NB, n1 = n0 + NB < n_rows ? n0 + NB : n_rows;
#ifdef __x86_64__
        if (w->kind == Q4_BLOCKS)
            unit_q4_avx2(m_rows, n0, n1, blocks, w->q, w->d, w->m, a->q, a->d, a->s, y, n_rows);
        else
            unit_f32_avx2(m_rows, n0, n1, k, w->q, x, y, n_rows);
#endif
        if (w->bias)
            for (int64_t m = 0; m < m_rows; m++)
                for (int64_t n = n0; n < n1; n++) y[m * n_rows + n] += w->bias[n];
    }
}

/* One layer's weights and cache, as scheduler/native/__init__.py lays them out. */
typedef struct {
    const float *input_norm, *post_norm;
    Weights qkv, o, gate_up, down;
    float *keys, *values; /* [slots, kv_heads, max_len, head_dim] */
} Layer;

typedef struct {
    int64_t hidden, heads, kv_heads, head_dim, intermediate, max_len, num_slots;
    float eps, scaling;
} Shape;

#ifdef __x86_64__
__attribute__((target("avx2,fma"))) static void rms_norm(const float *x, const float *w, float eps, int64_t n, float *y) {
    __m256 acc = _mm256_setzero_ps();
    int64_t j = 0;
    for (; j + 8 <= n; j += 8) {
        const __m256 v = _mm256_loadu_ps(x + j);
        acc = _mm256_fmadd_ps(v, v, acc);
    }
    float sum = hsum(acc);
    for (; j < n; j++) sum = fmaf(x[j], x[j], sum);
    const float inverse = 1.0f / sqrtf(sum / (float)n + eps);
    for (j = 0; j < n; j++) y[j] = w[j] * (x[j] * inverse);
}

/* x * cos + rotate_half(x) * sin, with sin's first half negated (as llama_forward's _rotate). */
static void rotate(float *x, const float *cos, const float *signed_sin, int64_t d) {
    float rotated[512];
    const int64_t half = d / 2;
    for (int64_t j = 0; j < d; j++) rotated[j] = x[j] * cos[j] + x[(j + half) % d] * signed_sin[j];
    memcpy(x, rotated, sizeof(float) * (size_t)d);
}

__attribute__((target("avx2,fma"))) static float dot(const float *a, const float *b, int64_t d) {
    __m256 acc = _mm256_setzero_ps();
    int64_t j = 0;
    for (; j + 8 <= d; j += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + j), _mm256_loadu_ps(b + j), acc);
    float sum = hsum(acc);
    for (; j < d; j++) sum = fmaf(a[j], b[j], sum);
    return sum;
}

/* One query over its sequence's keys 0..length-1: softmax(q k * scaling) v -> out [d]. */
__attribute__((target("avx2,fma"))) static void attend(const float *q, const float *keys, const float *values,
                                                       int64_t length, int64_t d, float scaling, float *scores,
                                                       float *out) {
    float top = -INFINITY;
    for (int64_t t = 0; t < length; t++) {
        scores[t] = dot(q, keys + t * d, d) * scaling;
        top = fmaxf(top, scores[t]);
    }
    float total = 0.0f;
    for (int64_t t = 0; t < length; t++) total += scores[t] = expf(scores[t] - top);
    for (int64_t j = 0; j < d; j++) out[j] = 0.0f;
    for (int64_t t = 0; t < length; t++) {
        const float weight = scores[t] / total;
        const float *v = values + t * d;
        for (int64_t j = 0; j < d; j++) out[j] = fmaf(weight, v[j], out[j]);
    }
}

/* One layer, run by every thread of the stack's parallel region: each loop over rows (or columns,
   or attention's rows and heads) is shared out, and its implicit barrier orders the next. */
__attribute__((target("avx2,fma"))) static void layer_forward(const Layer *l, const Shape *s, float *x, int64_t rows,
                                                              const float *cos, const float *signed_sin,
                                                              const int64_t *slots, const int64_t *positions,
                                                              float *h, float *qkv, float *attended, float *gate_up,
                                                              float *act, float *out, const Activations *a,
                                                              float *scores) {
    const int64_t d = s->head_dim, hidden = s->hidden, inter = s->intermediate;
    const int64_t q_size = s->heads * d, kv_size = s->kv_heads * d, qkv_size = q_size + 2 * kv_size;
#pragma omp for schedule(static)
    for (int64_t i = 0; i < rows; i++) rms_norm(x + i * hidden, l->input_norm, s->eps, hidden, h + i * hidden);
    product(h, rows, hidden, &l->qkv, qkv_size, qkv, a);
#pragma omp for schedule(static)
    for (int64_t i = 0; i < rows; i++) {
        float *row = qkv + i * qkv_size;
        for (int64_t head = 0; head < s->heads + s->kv_heads; head++)
            rotate(row + head * d, cos + i * d, signed_sin + i * d, d);
        for (int64_t g = 0; g < s->kv_heads; g++) {
            const int64_t at = ((slots[i] * s->kv_heads + g) * s->max_len + positions[i]) * d;
            memcpy(l->keys + at, row + q_size + g * d, sizeof(float) * (size_t)d);
            memcpy(l->values + at, row + q_size + kv_size + g * d, sizeof(float) * (size_t)d);
        }
    }
    const int64_t group = s->heads / s->kv_heads;
#pragma omp for schedule(dynamic)
    for (int64_t work = 0; work < rows * s->heads; work++) {
        const int64_t i = work / s->heads, head = work % s->heads, g = head / group;
        const int64_t base = (slots[i] * s->kv_heads + g) * s->max_len * d;
        attend(qkv + i * qkv_size + head * d, l->keys + base, l->values + base, positions[i] + 1, d, s->scaling, scores,
               attended + i * q_size + head * d);
    }
    product(attended, rows, q_size, &l->o, hidden, out, a);
#pragma omp for schedule(static)
    for (int64_t i = 0; i < rows; i++) {
        for (int64_t j = 0; j < hidden; j++) x[i * hidden + j] += out[i * hidden + j];
        rms_norm(x + i * hidden, l->post_norm, s->eps, hidden, h + i * hidden);
    }
    product(h, rows, hidden, &l->gate_up, 2 * inter, gate_up, a);
#pragma omp for schedule(static)
    for (int64_t i = 0; i < rows; i++)
        for (int64_t j = 0; j < inter; j++) {
            const float g = gate_up[i * 2 * inter + j];
            act[i * inter + j] = g / (1.0f + expf(-g)) * gate_up[i * 2 * inter + inter + j];
        }
    product(act, rows, inter, &l->down, hidden, out, a);
#pragma omp for schedule(static)
    for (int64_t i = 0; i < rows; i++)
        for (int64_t j = 0; j < hidden; j++) x[i * hidden + j] += out[i * hidden + j];
}
#endif

/* x [rows, hidden] (in place: the residual stream after every layer) through `count` layers.
   Each row is a token at positions[i] of slot slots[i]: its key and value are written there, and
   it attends over its slot's positions 0..positions[i]. Returns 0; -1 out of memory; -2 no AVX2;
   -3 a slot or position outside the cache (nothing is written). */
int bild_llama_layers(const Layer *layers, int64_t count, const Shape *s, float *x, int64_t rows, const float *cos,
                      const float *signed_sin, const int64_t *slots, const int64_t *positions) {
#ifdef __x86_64__
    if (!has_avx2() || s->head_dim > 512) return -2;
    for (int64_t i = 0; i < rows; i++)
        if (slots[i] < 0 || slots[i] >= s->num_slots || positions[i] < 0 || positions[i] >= s->max_len) return -3;
    const int64_t q_size = s->heads * s->head_dim, qkv_size = q_size + 2 * s->kv_heads * s->head_dim;
    const int64_t widest = s->intermediate > q_size ? (s->intermediate > s->hidden ? s->intermediate : s->hidden)
                                                   : (q_size > s->hidden ? q_size : s->hidden);
    float *h = malloc(sizeof(float) * (size_t)(rows * s->hidden));
    float *qkv = malloc(sizeof(float) * (size_t)(rows * qkv_size));
    float *attended = malloc(sizeof(float) * (size_t)(rows * q_size));
    float *gate_up = malloc(sizeof(float) * (size_t)(rows * 2 * s->intermediate));
    float *act = malloc(sizeof(float) * (size_t)(rows * s->intermediate));
    float *out = malloc(sizeof(float) * (size_t)(rows * s->hidden));
    Activations a = {malloc((size_t)(rows * widest)), malloc(sizeof(float) * (size_t)(rows * widest / QK)),
                     malloc(sizeof(float) * (size_t)(rows * widest / QK))};
    int status = -1;
    if (h && qkv && attended && gate_up && act && out && a.q && a.d && a.s) {
        status = 0;
        /* One parallel region for the whole stack: a fork and join per product cost more than the
           product itself at one token. */
#pragma omp parallel
        {
            float *scores = malloc(sizeof(float) * (size_t)s->max_len);
            if (!scores) {
#pragma omp atomic write
                status = -1;
            }
#pragma omp barrier
            if (status == 0)
                for (int64_t l = 0; l < count; l++)
                    layer_forward(layers + l, s, x, rows, cos, signed_sin, slots, positions, h, qkv, attended, gate_up,
                                  act, out, &a, scores);
            free(scores);
        }
    }
    free(h), free(qkv), free(attended), free(gate_up), free(act), free(out), release(&a);
    return status;
#else
    return -2;
#endif
}
