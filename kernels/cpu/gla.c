/* Gated linear attention, chunked, forward and backward in one pass per sequence: the CPU kernel.
 *
 * The same chunked form as kernels/gla_chunk.py (read its docstring first), fused: one thread takes
 * one batch entry's heads (or a group of them, run_unit) at a time and walks over their chunks with
 * every temporary of a chunk in a few hundred KB of workspace, so nothing but the inputs, the
 * outputs and the states entering each chunk ever leaves the cache. Built at first use by
 * kernels/compiled.py (cc -O3 -march=native -fopenmp) and called through ctypes; `gla_chunk` in
 * plain PyTorch stays the reference and the fallback.
 *
 * Layout: q, k, g (per-key) [B, T, H, K]; v, o [B, T, H, V]; g (scalar) [B, T, H]; states
 * [B, H, K, V]; all float32 and contiguous. Inside a chunk the key and value dimensions are padded
 * with zeros to Kp, Vp (multiples of 16) and the chunk to C rows (zero keys, values and log decays
 * are inert). A scalar decay is broadcast over the key dimension, so the inter-chunk part serves
 * both (its decay factors are one exp per row, exp_rows).
 *
 * Intra-chunk decays, one per head (attention_scalar): A = (q k^T) * D with D_ij = exp(G_i - G_j),
 * at most 1 on and below the diagonal, applied after the matmul.
 *
 * Intra-chunk decays, one per key dimension (attention_block). The chunk is cut into blocks of BLOCK rows. For the rows i of block a, with
 * r its first row, and every column j < r:  exp(G_i - G_j) = exp(G_i - G_r) * exp(G_r - G_j), both
 * factors <= 1, so block a's rows of A are one matmul of q * exp(G - G_r) with k * exp(G_r - G).
 * The diagonal block (r <= j <= i) joins that matmul when the block's log decay spans at most
 * SAFE_SPAN (then exp(G_r - G_j) <= e^SAFE_SPAN, far from overflow); a block with steeper decays
 * gets its diagonal exactly, one exp per (i, j, key). Arguments of exp are floored at EXP_FLOOR, as
 * in the PyTorch path. */

#include <pthread.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define BLOCK 16
#define SAFE_SPAN 60.0f
#define EXP_FLOOR (-80.0f)
#define EXP_CEIL 88.0f

/* ------------------------------------------------------------------ small dense helpers */

#if defined(__AVX512F__)
#define LANES 16
#define VECS 4
#elif defined(__AVX__)
#define LANES 8
#define VECS 2
#else
#define LANES 4
#define VECS 4
#endif
#define ROWS 4
typedef float vec __attribute__((vector_size(LANES * 4), aligned(4)));

/* One tile of matmul: rows i .. i+ROWS, columns j .. j + vecs*LANES, kept in registers over the
 * whole depth; a's element (i, p) is a[i * a_row + p * a_col]. Inlined with vecs and the strides of
 * one of the two forms (a or its transpose) constants, so each gets its own fully unrolled code. */
static inline __attribute__((always_inline)) void tile(int i, int j, const int vecs, int depth, const float *a,
                                                      int a_row, int a_col, const float *b, int ldb, float *c,
                                                      int ldc, int accumulate) {
  vec sum[ROWS][4]; /* vecs <= 4 in every configuration */
  for (int r = 0; r < ROWS; r++)
    for (int s = 0; s < vecs; s++) sum[r][s] = accumulate ? *(const vec *)(c + (i + r) * ldc + j + s * LANES) : (vec){0};
  for (int p = 0; p < depth; p++) {
    vec row[4];
    for (int s = 0; s < vecs; s++) row[s] = *(const vec *)(b + p * ldb + j + s * LANES);
    for (int r = 0; r < ROWS; r++) {
      float x = a[(i + r) * a_row + p * a_col];
      for (int s = 0; s < vecs; s++) sum[r][s] += x * row[s];
    }
  }
  for (int r = 0; r < ROWS; r++)
    for (int s = 0; s < vecs; s++) *(vec *)(c + (i + r) * ldc + j + s * LANES) = sum[r][s];
}

/* c[m x n] = (accumulate ? c : 0) + op(a)[m x depth] . b[depth x n], op(a)'s element (i, p) at
 * a[i * a_row + p * a_col]. m % ROWS == 0 and n % 16 == 0 (chunk rows and padded dims are multiples
 * of 16): tiles of VECS vectors, then one narrower tile for what is left of the row (n = 16, 32, 48
 * are common here). */
static inline __attribute__((always_inline)) void matmul_strided(int m, int n, int depth, const float *a, int a_row,
                                                                int a_col, const float *b, int ldb, float *c,
                                                                int ldc, int accumulate) {
  for (int i = 0; i < m; i += ROWS) {
    int j = 0;
    for (; j + LANES * VECS <= n; j += LANES * VECS)
      tile(i, j, VECS, depth, a, a_row, a_col, b, ldb, c, ldc, accumulate);
    switch ((n - j) / LANES) {
      case 3: tile(i, j, 3, depth, a, a_row, a_col, b, ldb, c, ldc, accumulate); break;
      case 2: tile(i, j, 2, depth, a, a_row, a_col, b, ldb, c, ldc, accumulate); break;
      case 1: tile(i, j, 1, depth, a, a_row, a_col, b, ldb, c, ldc, accumulate); break;
      default: break;
    }
  }
}

/* c[m x n] = (accumulate ? c : 0) + a[m x depth] . b[depth x n], row-major with leading dimensions */
static void matmul(int m, int n, int depth, const float *a, int lda, const float *b, int ldb, float *c, int ldc,
                   int accumulate) {
  matmul_strided(m, n, depth, a, lda, 1, b, ldb, c, ldc, accumulate);
}

/* c[m x n] = (accumulate ? c : 0) + a^T . b for a [depth x m], with no transposed copy of a (the
 * tile reads a's elements one at a time either way) */
static void matmul_at(int m, int n, int depth, const float *a, int lda, const float *b, int ldb, float *c, int ldc,
                      int accumulate) {
  matmul_strided(m, n, depth, a, 1, lda, b, ldb, c, ldc, accumulate);
}

/* dst[cols x rows] = src[rows x cols]^T */
static void transpose(int rows, int cols, const float *src, int lds, float *dst, int ldd) {
  for (int i = 0; i < rows; i++)
    for (int j = 0; j < cols; j++) dst[j * ldd + i] = src[i * lds + j];
}

/* exp(x) for x clamped to [EXP_FLOOR, EXP_CEIL], branch-free so that loops over it vectorise:
 * x = n ln2 + r with |r| <= ln2/2, exp(r) by its Taylor series to r^7 (relative error < 1e-8),
 * 2^n put into the exponent bits. */
static inline float exp_clamped(float x) {
  x = x < EXP_FLOOR ? EXP_FLOOR : x;
  x = x > EXP_CEIL ? EXP_CEIL : x;
  const float shifter = 12582912.0f; /* 1.5 * 2^23: adding it rounds to an integer */
  float t = x * 1.44269504088896341f + shifter;
  float n = t - shifter;
  float r = x - n * 0.693145751953125f;
  r = r - n * 1.428606765330187e-6f;
  float p = 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  int32_t bits;
  memcpy(&bits, &t, 4);
  int32_t exponent = (bits - 0x4B400000 + 127) << 23;
  float two_n;
  memcpy(&two_n, &exponent, 4);
  return p * two_n;
}

/* ------------------------------------------------------------------ the problem and a chunk's workspace */

typedef struct {
  int batch, length, heads, key_dim, value_dim, per_key, chunk, kp, vp, n_chunks, threads;
  int group; /* heads per unit of work (run_unit) */
  float scale;
  const float *q, *k, *v, *g, *initial;   /* inputs (initial may be NULL) */
  float *o, *states, *final;              /* forward outputs (states, final may be NULL) */
  const float *d_o, *d_final;             /* backward inputs (d_final may be NULL) */
  float *dq, *dk, *dv, *dg, *d_initial;   /* backward outputs */
} Problem;

typedef struct {
  /* [C x Kp] */ float *q, *k, *log_decay, *q_factor, *k_factor, *q_decay, *k_decay, *row_factor, *rows, *col_factor, *cols, *d_q, *d_k, *d_qd, *d_kd;
  /* [C x Vp] */ float *v, *d_o, *d_v;
  /* [C x C]  */ float *attention, *d_attention, *decay;
  /* [Kp x C] */ float *transposed_keys;
  /* [Kp x Vp] */ float *state_t;
  /* [group x Kp x Vp] */ float *state;
  /* [C] */ int *exact_diagonal;
  float *memory;
} Workspace;

/* Buffers are laid one after the other, each followed by SKEW floats (5 cache lines) so that the
 * same element of different buffers does not fall into the same cache set (buffers a multiple of
 * 4 KB apart would: a chunk's loops read up to seven of them in step). */
#define SKEW 80

static float *take(float **cursor, size_t n) {
  float *start = *cursor;
  *cursor += n + SKEW;
  return start;
}

static int workspace_init(Workspace *w, const Problem *p) {
  size_t c = p->chunk, kp = p->kp, vp = p->vp;
  size_t kv = kp > vp ? kp : vp;
  float **per_key[] = {&w->q, &w->k, &w->log_decay, &w->q_factor, &w->k_factor, &w->q_decay, &w->k_decay, &w->row_factor,
                       &w->rows, &w->col_factor, &w->cols, &w->d_q, &w->d_k, &w->d_qd, &w->d_kd};
  size_t n_per_key = sizeof per_key / sizeof *per_key;
  size_t total = n_per_key * c * kp + 3 * c * vp + 3 * c * c + kv * c + (1 + p->group) * kv * kv + (n_per_key + 10) * SKEW;
  w->memory = (float *)calloc(total, sizeof(float));
  w->exact_diagonal = (int *)calloc(c / BLOCK, sizeof(int));
  if (!w->memory || !w->exact_diagonal) return -1;
  float *m = w->memory;
  for (size_t i = 0; i < n_per_key; i++) *per_key[i] = take(&m, c * kp);
  w->v = take(&m, c * vp);
  w->d_o = take(&m, c * vp);
  w->d_v = take(&m, c * vp);
  w->attention = take(&m, c * c);
  w->d_attention = take(&m, c * c);
  w->decay = take(&m, c * c);
  w->transposed_keys = take(&m, kv * c);
  w->state_t = take(&m, kv * kv);
  w->state = take(&m, p->group * kv * kv);
  return 0;
}

static void workspace_free(Workspace *w) {
  free(w->memory);
  free(w->exact_diagonal);
}

/* out[i][d] = exp(sign * (a[i][d] - b[d])) for rows i < rows of [* x Kp] matrices (b NULL: 0).
 * With one decay per head every column of a row is the same number: computed once per row. */
static void exp_rows(const Problem *p, int rows, const float *a, const float *b, float sign, float *out) {
  int kp = p->kp, distinct = p->per_key ? kp : 1;
  for (int i = 0; i < rows; i++) {
    for (int d = 0; d < distinct; d++) out[i * kp + d] = exp_clamped(sign * (a[i * kp + d] - (b ? b[d] : 0.0f)));
    for (int d = distinct; d < kp; d++) out[i * kp + d] = out[i * kp];
  }
}

/* out = x * factor, elementwise over [rows x Kp] */
static void scale_rows(const Problem *p, int rows, const float *x, const float *factor, float *out) {
  for (int i = 0; i < rows * p->kp; i++) out[i] = x[i] * factor[i];
}

/* Copies rows [start, start + rows) of sequence (b, h) of a [B, T, H, D] tensor into dst [C x ld],
 * zero-padded; `factor` multiplies them. */
static void load_rows(const Problem *p, const float *src, int dim, int b, int h, int start, int rows, float factor,
                      float *dst, int ld) {
  for (int i = 0; i < rows; i++) {
    const float *row = src + (((size_t)b * p->length + start + i) * p->heads + h) * dim;
    for (int d = 0; d < dim; d++) dst[i * ld + d] = factor * row[d];
    for (int d = dim; d < ld; d++) dst[i * ld + d] = 0.0f;
  }
  if (rows < p->chunk) memset(dst + rows * ld, 0, sizeof(float) * (p->chunk - rows) * ld);
}

static void store_rows(const Problem *p, float *dst, int dim, int b, int h, int start, int rows, const float *src,
                       int ld) {
  for (int i = 0; i < rows; i++) {
    float *row = dst + (((size_t)b * p->length + start + i) * p->heads + h) * dim;
    memcpy(row, src + i * ld, sizeof(float) * dim);
  }
}

/* Loads chunk n of sequence (b, h) and derives what both passes need: G (cumulative log decay
 * within the chunk), q_factor = exp(G), k_factor = exp(G_last - G), q_decay = q * q_factor,
 * k_decay = k * k_factor, and which blocks have their diagonal computed exactly. Returns the number of real rows. */
static int load_chunk(const Problem *p, Workspace *w, int b, int h, int n) {
  int c = p->chunk, kp = p->kp, start = n * c;
  int rows = p->length - start < c ? p->length - start : c;
  load_rows(p, p->q, p->key_dim, b, h, start, rows, 1.0f, w->q, kp);
  load_rows(p, p->k, p->key_dim, b, h, start, rows, 1.0f, w->k, kp);
  load_rows(p, p->v, p->value_dim, b, h, start, rows, 1.0f, w->v, p->vp);
  float *G = w->log_decay;
  if (p->per_key) {
    load_rows(p, p->g, p->key_dim, b, h, start, rows, 1.0f, G, kp);
  } else {
    memset(G, 0, sizeof(float) * c * kp);
    for (int i = 0; i < rows; i++) {
      float decay = p->g[((size_t)b * p->length + start + i) * p->heads + h];
      for (int d = 0; d < p->key_dim; d++) G[i * kp + d] = decay;
    }
  }
  for (int i = 1; i < c; i++)
    for (int d = 0; d < kp; d++) G[i * kp + d] += G[(i - 1) * kp + d];
  const float *last = G + (c - 1) * kp;
  exp_rows(p, c, G, NULL, 1.0f, w->q_factor);
  exp_rows(p, c, G, last, -1.0f, w->k_factor);
  scale_rows(p, c, w->q, w->q_factor, w->q_decay);
  scale_rows(p, c, w->k, w->k_factor, w->k_decay);
  float spans[kp];
  for (int a = 0; a < c / BLOCK; a++) {
    const float *first = G + a * BLOCK * kp;
    for (int d = 0; d < kp; d++) spans[d] = 0.0f;
    for (int i = 1; i < BLOCK; i++)
      for (int d = 0; d < kp; d++) {
        float gap = first[d] - first[i * kp + d];
        gap = gap < 0 ? -gap : gap;
        spans[d] = gap > spans[d] ? gap : spans[d];
      }
    int exact = 0;
    for (int d = 0; d < kp; d++) exact |= spans[d] > SAFE_SPAN;
    w->exact_diagonal[a] = exact;
  }
  return rows;
}

/* Rows r .. r+BLOCK of A for block a (first row r), A[i][j] = sum_d q_id k_jd exp(G_id - G_jd) for
 * j <= i, 0 above, into w->attention (its other entries are left alone). Leaves in the workspace
 * what the backward of the block needs: row_factor[i] = exp(G_i - G_r), rows = q * row_factor,
 * col_factor[j] = exp(G_r - G_j) and cols = k * col_factor for the columns j < width, where width
 * is r + BLOCK when the diagonal block joins the matmul and r when it is computed exactly. */
static int attention_block(const Problem *p, Workspace *w, int a) {
  int c = p->chunk, kp = p->kp, r = a * BLOCK;
  int width = w->exact_diagonal[a] ? r : r + BLOCK;
  const float *G = w->log_decay, *ref = G + r * kp;
  float *A = w->attention + r * c;
  exp_rows(p, BLOCK, G + r * kp, ref, 1.0f, w->row_factor);
  scale_rows(p, BLOCK, w->q + r * kp, w->row_factor, w->rows);
  exp_rows(p, width, G, ref, -1.0f, w->col_factor);
  scale_rows(p, width, w->k, w->col_factor, w->cols);
  if (width > 0) {
    transpose(width, kp, w->cols, kp, w->transposed_keys, c);
    matmul(BLOCK, width, kp, w->rows, kp, w->transposed_keys, c, A, c, 0);
  }
  if (!w->exact_diagonal[a]) {
    for (int i = 0; i < BLOCK; i++)
      for (int j = i + 1; j < BLOCK; j++) A[i * c + r + j] = 0.0f;
    return width;
  }
  for (int i = r; i < r + BLOCK; i++)
    for (int j = r; j < r + BLOCK; j++) {
      float sum = 0.0f;
      if (j <= i)
        for (int d = 0; d < kp; d++)
          sum += w->q[i * kp + d] * w->k[j * kp + d] * exp_clamped(G[i * kp + d] - G[j * kp + d]);
      A[(i - r) * c + j] = sum;
    }
  return width;
}

/* One decay per head: A = (q k^T) * D with D[i][j] = exp(G_i - G_j) on and below the diagonal and 0
 * above, into w->attention and D into w->decay. G falls along a chunk, so every factor is at most 1:
 * no reference rows, no exact diagonal. The products go block row by block row (a block's row r + i
 * needs the columns j <= r + BLOCK - 1 only). */
static void attention_scalar(const Problem *p, Workspace *w) {
  int c = p->chunk, kp = p->kp;
  float g[c]; /* the chunk's cumulative log decay, one per row */
  for (int i = 0; i < c; i++) g[i] = w->log_decay[i * kp];
  transpose(c, kp, w->k, kp, w->transposed_keys, c);
  for (int a = 0; a < c / BLOCK; a++) {
    int r = a * BLOCK, width = r + BLOCK;
    matmul(BLOCK, width, kp, w->q + r * kp, kp, w->transposed_keys, c, w->attention + r * c, c, 0);
    for (int i = r; i < r + BLOCK; i++) {
      float *D = w->decay + i * c, *A = w->attention + i * c;
      for (int j = 0; j < width; j++) D[j] = j <= i ? exp_clamped(g[i] - g[j]) : 0.0f;
      for (int j = 0; j < width; j++) A[j] *= D[j];
    }
  }
}

/* The gradients through A of the scalar-decay form (given dA, zero above the diagonal), added into
 * w->d_q and w->d_k: with dS = dA * D, d_q += dS . k and d_k += dS^T . q, block by block over the
 * lower triangle only (block a's rows of dS reach column r + BLOCK, its columns start at row r). */
static void attention_scalar_backward(const Problem *p, Workspace *w) {
  int c = p->chunk, kp = p->kp;
  float *dS = w->d_attention;
  for (int a = 0; a < c / BLOCK; a++) {
    int r = a * BLOCK, width = r + BLOCK;
    for (int i = r; i < r + BLOCK; i++)
      for (int j = 0; j < width; j++) dS[i * c + j] *= w->decay[i * c + j];
  }
  for (int a = 0; a < c / BLOCK; a++) {
    int r = a * BLOCK;
    matmul(BLOCK, kp, r + BLOCK, dS + r * c, c, w->k, kp, w->d_q + r * kp, kp, 1);
    matmul_at(BLOCK, kp, c - r, dS + r * c + r, c, w->q + r * kp, kp, w->d_k + r * kp, kp, 1);
  }
}

/* The gradients through block a's rows of A (given dA, zero above the diagonal, and the factors
 * attention_block left), added into w->d_q and w->d_k. */
static void attention_block_backward(const Problem *p, Workspace *w, int a, int width) {
  int c = p->chunk, kp = p->kp, r = a * BLOCK;
  const float *dA = w->d_attention + r * c, *G = w->log_decay;
  float *scratch = w->d_kd;
  if (width > 0) {
    /* d rows = dA[:, :width] . cols, times row_factor into d_q */
    matmul(BLOCK, kp, width, dA, c, w->cols, kp, scratch, kp, 0);
    for (int i = 0; i < BLOCK; i++)
      for (int d = 0; d < kp; d++) w->d_q[(r + i) * kp + d] += scratch[i * kp + d] * w->row_factor[i * kp + d];
    /* d cols = dA[:, :width]^T . rows, times col_factor into d_k */
    matmul_at(width, kp, BLOCK, dA, c, w->rows, kp, scratch, kp, 0);
    for (int j = 0; j < width; j++)
      for (int d = 0; d < kp; d++) w->d_k[j * kp + d] += scratch[j * kp + d] * w->col_factor[j * kp + d];
  }
  if (!w->exact_diagonal[a]) return;
  for (int i = r; i < r + BLOCK; i++)
    for (int j = r; j <= i; j++) {
      float x = dA[(i - r) * c + j];
      for (int d = 0; d < kp; d++) {
        float f = x * exp_clamped(G[i * kp + d] - G[j * kp + d]);
        w->d_q[i * kp + d] += f * w->k[j * kp + d];
        w->d_k[j * kp + d] += f * w->q[i * kp + d];
      }
    }
}

/* ------------------------------------------------------------------ the passes over one sequence */

static void copy_state(const Problem *p, const float *src, float *dst) {
  /* [K, V] (real dims) -> [Kp, Vp] (zero-padded) */
  memset(dst, 0, sizeof(float) * p->kp * p->vp);
  if (src)
    for (int d = 0; d < p->key_dim; d++) memcpy(dst + d * p->vp, src + d * p->value_dim, sizeof(float) * p->value_dim);
}

static void store_state(const Problem *p, const float *src, float *dst) {
  for (int d = 0; d < p->key_dim; d++) memcpy(dst + d * p->value_dim, src + d * p->vp, sizeof(float) * p->value_dim);
}

/* S <- exp(G_last) S (row by row: one decay per key dimension) */
static void decay_state(const Problem *p, const float *last, float *state) {
  for (int d = 0; d < p->kp; d++) {
    float f = exp_clamped(last[d]);
    for (int e = 0; e < p->vp; e++) state[d * p->vp + e] *= f;
  }
}

/* Chunk n of sequence (b, h) forward, from the state entering it (`state`, [Kp x Vp]) to the one
 * leaving it (in place). */
static void forward_chunk(const Problem *p, Workspace *w, int b, int h, int n, float *state) {
  int c = p->chunk, kp = p->kp, vp = p->vp;
  int rows = load_chunk(p, w, b, h, n);
  if (p->states) memcpy(p->states + (((size_t)b * p->heads + h) * p->n_chunks + n) * kp * vp, state,
                        sizeof(float) * kp * vp);
  float *out = w->d_v; /* [C x Vp] scratch: o = q_decay . S + A . v */
  matmul(c, vp, kp, w->q_decay, kp, state, vp, out, vp, 0);
  if (!p->per_key) attention_scalar(p, w);
  for (int a = 0; a < c / BLOCK; a++) {
    if (p->per_key) attention_block(p, w, a);
    matmul(BLOCK, vp, (a + 1) * BLOCK, w->attention + a * BLOCK * c, c, w->v, vp, out + a * BLOCK * vp, vp, 1);
  }
  for (int i = 0; i < rows * vp; i++) out[i] *= p->scale;
  store_rows(p, p->o, p->value_dim, b, h, n * c, rows, out, vp);
  /* S <- exp(G_last) S + k_decay^T . v */
  decay_state(p, w->log_decay + (c - 1) * kp, state);
  matmul_at(kp, vp, c, w->k_decay, kp, w->v, vp, state, vp, 1);
}

/* Chunk n of sequence (b, h) backward, from the gradient of the state leaving it (`d_state`,
 * [Kp x Vp]) to that of the state entering it (in place). */
static void backward_chunk(const Problem *p, Workspace *w, int b, int h, int n, float *d_state) {
  int c = p->chunk, kp = p->kp, vp = p->vp;
  float through_last[kp];
  int rows = load_chunk(p, w, b, h, n);
  const float *entering = p->states + (((size_t)b * p->heads + h) * p->n_chunks + n) * kp * vp;
  const float *G = w->log_decay, *last = G + (c - 1) * kp;
  load_rows(p, p->d_o, p->value_dim, b, h, n * c, rows, p->scale, w->d_o, vp);
  /* Through the state leaving the chunk (dS): dv = k_decay . dS, d(k_decay) = v . dS^T; the
   * state entering it: d(q_decay) = dO . S_in^T */
  matmul(c, vp, kp, w->k_decay, kp, d_state, vp, w->d_v, vp, 0);
  transpose(kp, vp, d_state, vp, w->state_t, kp);
  matmul(c, kp, vp, w->v, vp, w->state_t, kp, w->d_kd, kp, 0);
  transpose(kp, vp, entering, vp, w->state_t, kp);
  matmul(c, kp, vp, w->d_o, vp, w->state_t, kp, w->d_qd, kp, 0);
  /* G_last scales every key of the chunk and the state carried through it */
  for (int d = 0; d < kp; d++) through_last[d] = 0.0f;
  for (int i = 0; i < c; i++)
    for (int d = 0; d < kp; d++) through_last[d] += w->d_kd[i * kp + d] * w->k_decay[i * kp + d];
  for (int d = 0; d < kp; d++) {
    float carried = 0.0f;
    for (int e = 0; e < vp; e++) carried += entering[d * vp + e] * d_state[d * vp + e];
    through_last[d] += exp_clamped(last[d]) * carried;
  }
  /* dS_in = exp(G_last) dS + q_decay^T . dO */
  decay_state(p, last, d_state);
  matmul_at(kp, vp, c, w->q_decay, kp, w->d_o, vp, d_state, vp, 1);
  for (int i = 0; i < c; i++)
    for (int d = 0; d < kp; d++) {
      w->d_q[i * kp + d] = w->d_qd[i * kp + d] * w->q_factor[i * kp + d];
      w->d_k[i * kp + d] = w->d_kd[i * kp + d] * w->k_factor[i * kp + d];
    }
  /* Through A: dA = dO . v^T on and below the diagonal, block by block with A itself */
  transpose(c, vp, w->v, vp, w->transposed_keys, c);
  memset(w->attention, 0, sizeof(float) * c * c);
  memset(w->d_attention, 0, sizeof(float) * c * c);
  for (int a = 0; a < c / BLOCK; a++) {
    int r = a * BLOCK;
    float *dA = w->d_attention + r * c;
    matmul(BLOCK, r + BLOCK, vp, w->d_o + r * vp, vp, w->transposed_keys, c, dA, c, 0);
    for (int i = 0; i < BLOCK; i++)
      for (int j = i + 1; j < BLOCK; j++) dA[i * c + r + j] = 0.0f;
  }
  if (p->per_key) {
    for (int a = 0; a < c / BLOCK; a++) attention_block_backward(p, w, a, attention_block(p, w, a));
  } else {
    attention_scalar(p, w);
    attention_scalar_backward(p, w);
  }
  /* dv += A^T . dO: block a of rows takes A's rows from a * BLOCK on (A is zero above its diagonal) */
  for (int a = 0; a < c / BLOCK; a++)
    matmul_at(BLOCK, vp, c - a * BLOCK, w->attention + a * BLOCK * (c + 1), c, w->d_o + a * BLOCK * vp, vp,
              w->d_v + a * BLOCK * vp, vp, 1);
  /* dL/dG_i = q_i dq_i - k_i dk_i (+ the G_last terms), then back through the cumulative sum */
  float *dG = w->d_qd;
  for (int i = 0; i < c; i++)
    for (int d = 0; d < kp; d++) dG[i * kp + d] = w->q[i * kp + d] * w->d_q[i * kp + d] - w->k[i * kp + d] * w->d_k[i * kp + d];
  for (int d = 0; d < kp; d++) dG[(c - 1) * kp + d] += through_last[d];
  for (int i = c - 2; i >= 0; i--)
    for (int d = 0; d < kp; d++) dG[i * kp + d] += dG[(i + 1) * kp + d];
  store_rows(p, p->dq, p->key_dim, b, h, n * c, rows, w->d_q, kp);
  store_rows(p, p->dk, p->key_dim, b, h, n * c, rows, w->d_k, kp);
  store_rows(p, p->dv, p->value_dim, b, h, n * c, rows, w->d_v, vp);
  if (p->per_key) {
    store_rows(p, p->dg, p->key_dim, b, h, n * c, rows, dG, kp);
  } else {
    for (int i = 0; i < rows; i++) {
      float sum = 0.0f;
      for (int d = 0; d < p->key_dim; d++) sum += dG[i * kp + d];
      p->dg[((size_t)b * p->length + n * c + i) * p->heads + h] = sum;
    }
  }
}

/* One unit of work: the heads first_head .. first_head + p->group of batch entry b, walked chunk
 * by chunk and, within a chunk, head by head: the heads of a time step lie side by side in
 * [B, T, H, D], so each chunk reads (and writes) one contiguous block instead of rows H * D apart.
 * Each head's state (forward) or state gradient (backward) has its slot in w->state. */
static void run_unit(const Problem *p, Workspace *w, int b, int first_head, int backward) {
  size_t kv = (size_t)p->key_dim * p->value_dim, slot = (size_t)p->kp * p->vp;
  const float *given = backward ? p->d_final : p->initial;
  float *kept = backward ? p->d_initial : p->final;
  for (int j = 0; j < p->group; j++)
    copy_state(p, given ? given + ((size_t)b * p->heads + first_head + j) * kv : NULL, w->state + j * slot);
  for (int step = 0; step < p->n_chunks; step++) {
    int n = backward ? p->n_chunks - 1 - step : step;
    for (int j = 0; j < p->group; j++)
      (backward ? backward_chunk : forward_chunk)(p, w, b, first_head + j, n, w->state + j * slot);
  }
  if (kept)
    for (int j = 0; j < p->group; j++)
      store_state(p, w->state + j * slot, kept + ((size_t)b * p->heads + first_head + j) * kv);
}

/* ------------------------------------------------------------------ threads
 *
 * Sequences are dealt to the threads round-robin (thread t takes t, t + n, ...), each thread with
 * its own workspace. Built with OpenMP (kernels/compiled.py tries -fopenmp first), the threads are
 * those of the OpenMP runtime already loaded: PyTorch's libgomp.so.1 satisfies this library's
 * dependency, so the kernel runs on PyTorch's own worker threads instead of beside them (a worker
 * still spinning after PyTorch's last parallel op would otherwise take a core from the kernel).
 * Without OpenMP the threads are plain pthreads. */

typedef struct {
  const Problem *problem;
  int first, backward, status;
} Job;

static void *run_job(void *arg) {
  Job *job = (Job *)arg;
  const Problem *p = job->problem;
  Workspace w;
  if (workspace_init(&w, p)) {
    job->status = -1;
    workspace_free(&w);
    return NULL;
  }
  int groups = p->heads / p->group;
  for (int unit = job->first; unit < p->batch * groups; unit += p->threads)
    run_unit(p, &w, unit / groups, unit % groups * p->group, job->backward);
  workspace_free(&w);
  job->status = 0;
  return NULL;
}

#define MAX_THREADS 64

/* Heads per unit: all of them when the batch entries alone share out evenly over the threads, else
 * the fewest heads (a divisor of H) that do; one when none does (units are then the sequences). */
static int heads_per_unit(const Problem *p, int threads) {
  for (int group = p->heads; group > 1; group--) {
    int units = p->batch * (p->heads / group);
    if (p->heads % group == 0 && units >= threads && units % threads == 0) return group;
  }
  return 1;
}

static int run(const Problem *p, int backward) {
  if (p->batch < 1 || p->heads < 1) return 0; /* no sequences: nothing to do */
  int n = p->threads < 1 ? 1 : p->threads;
  if (n > p->batch * p->heads) n = p->batch * p->heads;
  if (n > MAX_THREADS) n = MAX_THREADS;
  Problem local = *p;
  local.threads = n;
  local.group = heads_per_unit(p, n);
  Job jobs[MAX_THREADS];
  for (int t = 0; t < n; t++) jobs[t] = (Job){&local, t, backward, -2};
#ifdef _OPENMP
#pragma omp parallel num_threads(n)
  {
    /* the runtime may give fewer threads than asked (nested regions): deal to those there are */
#pragma omp single
    local.threads = omp_get_num_threads();
    run_job(&jobs[omp_get_thread_num()]);
  }
#else
  pthread_t ids[MAX_THREADS];
  int started = 1;
  while (started < n && !pthread_create(&ids[started], NULL, run_job, &jobs[started])) started++;
  if (started == n) run_job(&jobs[0]); /* else jobs[0] keeps its failed status: a thread could not start */
  for (int t = 1; t < started; t++) pthread_join(ids[t], NULL);
#endif
  int status = 0;
  for (int t = 0; t < local.threads; t++) status = status ? status : jobs[t].status;
  return status;
}

/* ------------------------------------------------------------------ entry points (ctypes) */

static Problem problem(int batch, int length, int heads, int key_dim, int value_dim, int per_key, int chunk,
                       float scale, int threads) {
  Problem p;
  memset(&p, 0, sizeof p);
  p.batch = batch, p.length = length, p.heads = heads, p.key_dim = key_dim, p.value_dim = value_dim;
  p.per_key = per_key, p.chunk = chunk, p.scale = scale, p.threads = threads;
  p.kp = (key_dim + 15) / 16 * 16, p.vp = (value_dim + 15) / 16 * 16;
  p.n_chunks = (length + chunk - 1) / chunk;
  return p;
}

/* Forward: o [B, T, H, V]; the state entering every chunk into states [B, H, n_chunks, Kp, Vp]
 * (Kp, Vp the dims rounded up to 16; NULL when no gradient will be asked for); the last state
 * into final [B, H, K, V] (NULL: not kept). initial [B, H, K, V] or NULL (zeros). Returns 0, or
 * a negative status (bad chunk size, no memory for a workspace, no thread). */
int gla_forward(int batch, int length, int heads, int key_dim, int value_dim, int per_key, int chunk, float scale,
                int threads, const float *q, const float *k, const float *v, const float *g, const float *initial,
                float *o, float *states, float *final) {
  if (chunk % BLOCK || chunk <= 0) return -3;
  Problem p = problem(batch, length, heads, key_dim, value_dim, per_key, chunk, scale, threads);
  p.q = q, p.k = k, p.v = v, p.g = g, p.initial = initial, p.o = o, p.states = states, p.final = final;
  return run(&p, 0);
}

/* Backward: from d_o [B, T, H, V] and d_final [B, H, K, V] (NULL: zeros), with the forward's
 * states, the gradients dq, dk, dv, dg (g's shape) and d_initial (NULL: not wanted). */
int gla_backward(int batch, int length, int heads, int key_dim, int value_dim, int per_key, int chunk, float scale,
                 int threads, const float *q, const float *k, const float *v, const float *g, const float *states,
                 const float *d_o, const float *d_final, float *dq, float *dk, float *dv, float *dg,
                 float *d_initial) {
  if (chunk % BLOCK || chunk <= 0) return -3;
  Problem p = problem(batch, length, heads, key_dim, value_dim, per_key, chunk, scale, threads);
  p.q = q, p.k = k, p.v = v, p.g = g, p.states = (float *)states, p.d_o = d_o, p.d_final = d_final;
  p.dq = dq, p.dk = dk, p.dv = dv, p.dg = dg, p.d_initial = d_initial;
  return run(&p, 1);
}
