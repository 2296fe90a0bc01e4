/* The rest of a decoding step for a few rows, beside head_top.c: the blocks' linear
 * layers, and each row's attention over its own cached positions.
 *
 * Why not torch's: a decoding step feeds 1 to 8 rows of one position each. Torch picks its
 * matrix-product kernel by shape (a vector product for one row, a GEMM for several), and
 * its attention, with rows at different positions, runs over the longest row's span with
 * a mask. So the same row gets different roundings alone and beside other rows, and a
 * sampled token can change at a near-tie: what a seeded request returns would depend on
 * what else the server decodes. Here every number a row gets is computed by the same
 * arithmetic in the same order whatever the other rows are (how many, and where they
 * stand), so a row's logits have the same bits alone and in any batch (with head_top's,
 * which has the same property). Small products like these are also bound by per-call
 * overhead and by streaming the weights, which one pass over them for all rows serves.
 *
 * Plain C with GCC/Clang vector extensions, no intrinsics, built by native.py with
 * head_top.c into one library. */

#include <stddef.h>
#include <stdint.h>
#include <string.h>

typedef float v8 __attribute__((vector_size(32)));
typedef int32_t m8 __attribute__((vector_size(32)));

#define WIDTH 16  /* output columns a panel of packed weights holds: two vectors, or one of AVX-512 */
#define GROUP 4   /* rows sharing one pass over a panel */

/* The linear layers' vector: 16 floats where the CPU has AVX-512 (one per panel, twice the
 * FMA work per instruction, 32 registers), else 8 (two per panel). Each output is the same
 * chain of FMAs either way. */
#if defined(__AVX512F__)
typedef float vl __attribute__((vector_size(64)));
#define LANES 16
#else
typedef v8 vl;
#define LANES 8
#endif
#define HALVES (WIDTH / LANES)  /* vectors per panel row */

/* ---- linear layers: y (rows, N) = x (rows, K) W (K, N) + b ----
 *
 * W comes packed by native.py: N / WIDTH panels, panel p (K, WIDTH) row-major holding
 * columns [p WIDTH, (p + 1) WIDTH), so a tile streams its panels in order. Each output
 * is one fp32 sum over k in order, from zero, plus the bias: the same in every tile. */

#define LTILE(R, P)                                                                        \
static void ltile_##R##_##P(const float *x, int64_t K, const float *w, const float *b,     \
                            float *y, int64_t N, int64_t p0) {                             \
    vl acc[R][P][HALVES];                                                                  \
    for (int r = 0; r < R; r++)                                                            \
        for (int q = 0; q < P; q++)                                                        \
            for (int h = 0; h < HALVES; h++) acc[r][q][h] = (vl){0};                       \
    for (int64_t k = 0; k < K; k++) {                                                      \
        vl wv[P][HALVES];                                                                  \
        for (int q = 0; q < P; q++)                                                        \
            for (int h = 0; h < HALVES; h++)                                               \
                __builtin_memcpy(&wv[q][h], w + ((p0 + q) * K + k) * WIDTH + h * LANES, sizeof(vl)); \
        for (int r = 0; r < R; r++) {                                                      \
            float xs = x[r * K + k];                                                       \
            for (int q = 0; q < P; q++)                                                    \
                for (int h = 0; h < HALVES; h++) acc[r][q][h] += xs * wv[q][h];            \
        }                                                                                  \
    }                                                                                      \
    for (int q = 0; q < P; q++)                                                            \
        for (int h = 0; h < HALVES; h++) {                                                 \
            vl bv = (vl){0};                                                               \
            if (b) __builtin_memcpy(&bv, b + (p0 + q) * WIDTH + h * LANES, sizeof(vl));    \
            for (int r = 0; r < R; r++) {                                                  \
                vl o = acc[r][q][h] + bv;                                                  \
                __builtin_memcpy(y + r * N + (p0 + q) * WIDTH + h * LANES, &o, sizeof(vl)); \
            }                                                                              \
        }                                                                                  \
}

/* Panels at a time by the rows in a tile (AVX2: 1 row 4 panels, 2-3 rows 2, groups of 4
 * rows 1; AVX-512, a vector per panel: twice those): enough independent sums (>= 8) to
 * hide the FMA latency, few enough to stay in the vector registers (<= 12 of 16 with
 * AVX2, <= 16 of 32 with AVX-512). */
#define PANELS(rows) ((rows == 1 ? 4 : rows < GROUP ? 2 : 1) * (2 / HALVES))
LTILE(1, 8) LTILE(1, 4) LTILE(1, 2) LTILE(1, 1) LTILE(2, 4) LTILE(2, 2) LTILE(2, 1) LTILE(3, 4)
LTILE(3, 2) LTILE(3, 1) LTILE(4, 2) LTILE(4, 1)

static void ltile(int R, int P, const float *x, int64_t K, const float *w, const float *b, float *y,
                  int64_t N, int64_t p0) {
    switch (R * 16 + P) {
    case 24: ltile_1_8(x, K, w, b, y, N, p0); break;
    case 20: ltile_1_4(x, K, w, b, y, N, p0); break;
    case 18: ltile_1_2(x, K, w, b, y, N, p0); break;
    case 17: ltile_1_1(x, K, w, b, y, N, p0); break;
    case 36: ltile_2_4(x, K, w, b, y, N, p0); break;
    case 34: ltile_2_2(x, K, w, b, y, N, p0); break;
    case 33: ltile_2_1(x, K, w, b, y, N, p0); break;
    case 52: ltile_3_4(x, K, w, b, y, N, p0); break;
    case 50: ltile_3_2(x, K, w, b, y, N, p0); break;
    case 49: ltile_3_1(x, K, w, b, y, N, p0); break;
    case 66: ltile_4_2(x, K, w, b, y, N, p0); break;
    default: ltile_4_1(x, K, w, b, y, N, p0); break;
    }
}

/* y (rows, N) = x (rows, K) W + b, W packed as above (b may be NULL: no bias). Returns 0,
 * or -1 for arguments it cannot take (N not a multiple of WIDTH). */
int rows_linear(const float *x, int64_t rows, int64_t K, const float *w, int64_t N, const float *b, float *y) {
    if (rows < 1 || K < 1 || N < WIDTH || N % WIDTH) return -1;
    int64_t panels = N / WIDTH;
    int P = PANELS(rows);  /* with GROUP rows, 8 sums per panel already */
    for (int64_t p = 0; p < panels;) {
        int step = P;
        while (step > panels - p) step /= 2;  /* the last panels: fewer at a time */
        for (int64_t r0 = 0; r0 < rows; r0 += GROUP) {  /* the panels are still cached for the next group */
            int R = rows - r0 < GROUP ? (int)(rows - r0) : GROUP;
            ltile(R, step, x + r0 * K, K, w, b, y + r0 * N, N, p);
        }
        p += step;
    }
    return 0;
}

/* ---- attention: each row's one query over its own cached positions ---- */

/* The lanes of a with those of b where mask is set. */
static inline v8 select8(m8 mask, v8 a, v8 b) {
    m8 ai, bi;
    __builtin_memcpy(&ai, &a, sizeof ai);
    __builtin_memcpy(&bi, &b, sizeof bi);
    ai = (mask & ai) | (~mask & bi);
    v8 r;
    __builtin_memcpy(&r, &ai, sizeof r);
    return r;
}

/* e^x, x clamped to [-87, 88] (e^-87 ~ 1.6e-38: nothing beside a softmax maximum's 1;
 * e^88 ~ 1.7e38, under the largest float): x = n ln 2 + r with |r| <= ln 2 / 2 (ln 2 in
 * two parts), e^r by its Taylor polynomial to r^6 (remainder under 1.7e-7 relative;
 * 2.3e-7, under 3 ulp, measured with the rounding), times 2^n through the exponent bits. */
static inline v8 exp8(v8 x) {
    const v8 low = (v8){0} - 87.0f, high = (v8){0} + 88.0f;
    const v8 magic = (v8){0} + 12582912.0f;  /* 1.5 * 2^23: adding it rounds to an integer */
    x = select8(x < low, low, x);
    x = select8(x > high, high, x);
    v8 n = (x * 1.44269504088896341f + magic) - magic;
    v8 r = x - n * 0.693145751953125f;
    r = r - n * 1.428606765330187e-06f;
    v8 p = (v8){0} + (1.0f / 720);
    p = p * r + (1.0f / 120);
    p = p * r + (1.0f / 24);
    p = p * r + (1.0f / 6);
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    m8 bits = (__builtin_convertvector(n, m8) + 127) << 23;
    v8 scale;
    __builtin_memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}

/* Lane t: the sum of a[t]'s lanes, pairwise in one fixed order (the same for every t). */
static inline v8 sums8(const v8 *a) {
    const m8 even = {0, 8, 2, 10, 4, 12, 6, 14}, odd = {1, 9, 3, 11, 5, 13, 7, 15};
    const m8 lo2 = {0, 1, 8, 9, 4, 5, 12, 13}, hi2 = {2, 3, 10, 11, 6, 7, 14, 15};
    const m8 lo4 = {0, 1, 2, 3, 8, 9, 10, 11}, hi4 = {4, 5, 6, 7, 12, 13, 14, 15};
    v8 t[4], u[2];
    for (int i = 0; i < 4; i++)
        t[i] = __builtin_shuffle(a[2 * i], a[2 * i + 1], even) + __builtin_shuffle(a[2 * i], a[2 * i + 1], odd);
    for (int i = 0; i < 2; i++)
        u[i] = __builtin_shuffle(t[2 * i], t[2 * i + 1], lo2) + __builtin_shuffle(t[2 * i], t[2 * i + 1], hi2);
    return __builtin_shuffle(u[0], u[1], lo4) + __builtin_shuffle(u[0], u[1], hi4);
}

static inline float lane_sum(v8 a) {
    v8 one[8] = {a};
    v8 s = sums8(one);
    return s[0];
}

/* One row and head: the query (D vectors), keys and values (len, 8 D) row-major, out (8 D). */
static inline __attribute__((always_inline)) void attend_head(const float *q, const float *K, const float *V,
                                                              int64_t len, const int D, float scale,
                                                              float *out, float *work) {
    v8 qv[16], acc[16];
    for (int d = 0; d < D; d++) {
        __builtin_memcpy(&qv[d], q + 8 * d, sizeof(v8));
        qv[d] *= scale;
    }
    /* scores, 8 positions at a time (the last ones alone: the same sum in lane 0) */
    v8 top = (v8){0} - __builtin_inff();
    int64_t j = 0;
    for (; j + 8 <= len; j += 8) {
        v8 a[8];
        for (int t = 0; t < 8; t++) {
            const float *kj = K + (j + t) * 8 * D;
            v8 s = (v8){0};
            for (int d = 0; d < D; d++) {
                v8 kd;
                __builtin_memcpy(&kd, kj + 8 * d, sizeof kd);
                s += qv[d] * kd;
            }
            a[t] = s;
        }
        v8 s = sums8(a);
        __builtin_memcpy(work + j, &s, sizeof s);
        top = select8(s > top, s, top);
    }
    float m = -__builtin_inff();
    for (int l = 0; l < 8; l++) m = top[l] > m ? top[l] : m;
    for (; j < len; j++) {
        const float *kj = K + j * 8 * D;
        v8 s = (v8){0};
        for (int d = 0; d < D; d++) {
            v8 kd;
            __builtin_memcpy(&kd, kj + 8 * d, sizeof kd);
            s += qv[d] * kd;
        }
        work[j] = lane_sum(s);
        m = work[j] > m ? work[j] : m;
    }
    /* softmax weights, unnormalised: e^(s - max), padded to whole vectors with -inf */
    int64_t padded = (len + 7) / 8 * 8;
    for (int64_t i = len; i < padded; i++) work[i] = -__builtin_inff();
    v8 total = (v8){0};
    for (int64_t i = 0; i < padded; i += 8) {
        v8 s;
        __builtin_memcpy(&s, work + i, sizeof s);
        v8 p = exp8(s - m);
        __builtin_memcpy(work + i, &p, sizeof p);
        total += p;  /* the padding's e^-87 each: invisible beside the maximum's 1 */
    }
    for (int d = 0; d < D; d++) acc[d] = (v8){0};
    for (int64_t i = 0; i < len; i++) {
        const float *vi = V + i * 8 * D;
        float p = work[i];
        for (int d = 0; d < D; d++) {
            v8 vd;
            __builtin_memcpy(&vd, vi + 8 * d, sizeof vd);
            acc[d] += p * vd;
        }
    }
    float inv = 1.0f / lane_sum(total);
    for (int d = 0; d < D; d++) {
        v8 o = acc[d] * inv;
        __builtin_memcpy(out + 8 * d, &o, sizeof o);
    }
}

#define ATTEND(D)                                                                          \
static void attend_##D(const float *q, int64_t q_row, const float *kv, int64_t kv_row, int nh, \
                       int64_t block, const int64_t *n, int64_t rows, float scale, float *y, \
                       int64_t y_row, float *work) {                                      \
    for (int64_t r = 0; r < rows; r++)                                                     \
        for (int h = 0; h < nh; h++) {                                                     \
            const float *k = kv + r * kv_row + (int64_t)h * block * 8 * D;                 \
            attend_head(q + r * q_row + h * 8 * D, k, k + (int64_t)nh * block * 8 * D,     \
                        n[r], D, scale, y + r * y_row + h * 8 * D, work);                  \
        }                                                                                  \
}
ATTEND(1) ATTEND(2) ATTEND(4) ATTEND(8) ATTEND(16)

/* Row r's query q[r] (nh heads of hs, at q + r q_row) over the first n[r] positions of
 * its cache kv + r kv_row, laid out (2, nh, block, hs): K then V. Writes y + r y_row (nh
 * hs). work: block + 8 floats. Returns 0, or -1 for arguments it cannot take (hs not 8,
 * 16, 32, 64 or 128; a length outside 1..block). */
int rows_attend(const float *q, int64_t q_row, const float *kv, int64_t kv_row, int nh, int64_t block,
                int hs, const int64_t *n, int64_t rows, float scale, float *y, int64_t y_row, float *work) {
    if (rows < 1 || nh < 1 || block < 1) return -1;
    for (int64_t r = 0; r < rows; r++)
        if (n[r] < 1 || n[r] > block) return -1;
    switch (hs) {
    case 8: attend_1(q, q_row, kv, kv_row, nh, block, n, rows, scale, y, y_row, work); return 0;
    case 16: attend_2(q, q_row, kv, kv_row, nh, block, n, rows, scale, y, y_row, work); return 0;
    case 32: attend_4(q, q_row, kv, kv_row, nh, block, n, rows, scale, y, y_row, work); return 0;
    case 64: attend_8(q, q_row, kv, kv_row, nh, block, n, rows, scale, y, y_row, work); return 0;
    case 128: attend_16(q, q_row, kv, kv_row, nh, block, n, rows, scale, y, y_row, work); return 0;
    default: return -1;
    }
}

/* ---- a whole decoding step through the blocks, in one call ----
 *
 * Per operation, Python's overhead (torch's dispatch, or ctypes') is as large as the
 * arithmetic of a few rows at this size: a step of a 4-layer model is ~50 operations. So
 * the blocks run here end to end, the model's equations in gpt.py restated (as
 * decode.py's torch step restates them): pre-norm, fused QKV, QK-norm and rotary
 * positions when the model has them, the new key and value written at each row's own
 * position, attention, projection, the MLP (tanh GELU or ReLU²), residuals. */

struct rows_layer {                      /* one block; matrices packed as for rows_linear */
    const float *ln_1_w, *ln_1_b;        /* ln_1_b NULL: RMSNorm (or a LayerNorm without bias) */
    const float *attn_w, *attn_b, *attn_proj_w, *attn_proj_b;
    const float *ln_2_w, *ln_2_b;
    const float *fc_w, *fc_b, *mlp_proj_w, *mlp_proj_b;
    float *kv;                           /* this layer's cache, (slots, 2, nh, block, hs) */
};

#define STEP_RMSNORM 1
#define STEP_QK_NORM 2
#define STEP_RELU2 4

/* A row's norm: LayerNorm (mean and variance over C, then w and b) or RMSNorm (no mean, no b). */
static void norm_row(const float *x, int64_t C, const float *w, const float *b, int rms, float eps, float *out) {
    float mean = 0.0f;
    if (!rms) {
        v8 s = (v8){0};
        for (int64_t i = 0; i < C; i += 8) {  /* C is a multiple of WIDTH */
            v8 xi;
            __builtin_memcpy(&xi, x + i, sizeof xi);
            s += xi;
        }
        mean = lane_sum(s) / (float)C;
    }
    v8 ss = (v8){0};
    for (int64_t i = 0; i < C; i += 8) {
        v8 d;
        __builtin_memcpy(&d, x + i, sizeof d);
        d -= mean;
        ss += d * d;
    }
    float inv = 1.0f / __builtin_sqrtf(lane_sum(ss) / (float)C + eps);
    for (int64_t i = 0; i < C; i++) out[i] = (x[i] - mean) * inv * w[i] + (b ? b[i] : 0.0f);
}

/* RMS-normalise each of a row's nh heads of hs, no weight (QK-norm). */
static void norm_heads(float *x, int nh, int hs, float eps) {
    for (int h = 0; h < nh; h++) {
        float *v = x + h * hs;
        v8 ss = (v8){0};
        for (int i = 0; i < hs; i += 8) {
            v8 d;
            __builtin_memcpy(&d, v + i, sizeof d);
            ss += d * d;
        }
        float inv = 1.0f / __builtin_sqrtf(lane_sum(ss) / (float)hs + eps);
        for (int i = 0; i < hs; i++) v[i] *= inv;
    }
}

/* Rotate each head's pairs (i, i + hs/2) by the row's angles (cos, sin: hs/2 each). */
static void rope_heads(float *x, int nh, int hs, const float *cos, const float *sin) {
    int half = hs / 2;
    for (int h = 0; h < nh; h++) {
        float *v = x + h * hs;
        for (int i = 0; i < half; i++) {
            float a = v[i], b = v[i + half];
            v[i] = a * cos[i] - b * sin[i];
            v[i + half] = a * sin[i] + b * cos[i];
        }
    }
}

/* tanh-approximated GELU, 0.5 u (1 + tanh(sqrt(2/pi) (u + 0.044715 u^3))), or ReLU², in place. */
static void activate(float *x, int64_t n, int relu2) {
    int64_t i = 0;
    if (relu2) {
        for (; i < n; i++) x[i] = x[i] > 0.0f ? x[i] * x[i] : 0.0f;
        return;
    }
    for (; i + 8 <= n; i += 8) {
        v8 u;
        __builtin_memcpy(&u, x + i, sizeof u);
        v8 e = exp8(2.0f * 0.7978845608028654f * (u + 0.044715f * u * u * u));
        v8 g = 0.5f * u * (2.0f - 2.0f / (e + 1.0f));  /* 1 + tanh(z) = 2 - 2 / (e^2z + 1) */
        __builtin_memcpy(x + i, &g, sizeof g);
    }
    for (; i < n; i++) {  /* the tail through the same vector code, one lane used */
        v8 u = (v8){0} + x[i];
        v8 e = exp8(2.0f * 0.7978845608028654f * (u + 0.044715f * u * u * u));
        v8 g = 0.5f * u * (2.0f - 2.0f / (e + 1.0f));
        x[i] = g[0];
    }
}

/* Bytes of rows_step's workspace for `rows` rows. */
int64_t rows_step_work(int64_t rows, int64_t C, int64_t hidden, int64_t block) {
    return (int64_t)sizeof(float) * (rows * (5 * C + hidden) + block + 8);
}

/* x (rows, C), the residual stream after the embeddings, through n_layer blocks in place:
 * row r at position pos[r] (its cache slot r holds positions 0 .. pos[r] - 1), its key and
 * value written at pos[r]. cos/sin (rows, hs/2): rotary angles, or NULL (learned
 * positions, already in x). hidden: the MLP's width. work: rows_step_work bytes. Returns
 * 0, or -1 for arguments it cannot take. */
int rows_step(float *x, int64_t rows, int64_t C, int nh, int64_t block, int64_t hidden, int n_layer,
              const struct rows_layer *layers, const int64_t *pos, const float *cos, const float *sin,
              int flags, float eps, float *work) {
    int hs = (int)(C / nh);
    if (rows < 1 || nh < 1 || C % nh || C % WIDTH || hidden % WIDTH || n_layer < 0) return -1;
    if (hs != 8 && hs != 16 && hs != 32 && hs != 64 && hs != 128) return -1;
    for (int64_t r = 0; r < rows; r++)
        if (pos[r] < 0 || pos[r] >= block) return -1;
    int rms = flags & STEP_RMSNORM;
    float *h = work, *qkv = h + rows * C, *y = qkv + rows * 3 * C, *f = y + rows * C, *scores = f + rows * hidden;
    int64_t n[rows];
    for (int64_t r = 0; r < rows; r++) n[r] = pos[r] + 1;
    int64_t kv_row = 2 * (int64_t)nh * block * hs;
    for (int l = 0; l < n_layer; l++) {
        const struct rows_layer *L = layers + l;
        for (int64_t r = 0; r < rows; r++) norm_row(x + r * C, C, L->ln_1_w, L->ln_1_b, rms, eps, h + r * C);
        rows_linear(h, rows, C, L->attn_w, 3 * C, L->attn_b, qkv);
        for (int64_t r = 0; r < rows; r++) {
            float *q = qkv + r * 3 * C, *k = q + C, *v = k + C;
            if (flags & STEP_QK_NORM) {
                norm_heads(q, nh, hs, eps);
                norm_heads(k, nh, hs, eps);
            }
            if (cos) {
                rope_heads(q, nh, hs, cos + r * (hs / 2), sin + r * (hs / 2));
                rope_heads(k, nh, hs, cos + r * (hs / 2), sin + r * (hs / 2));
            }
            float *slot = L->kv + r * kv_row;
            for (int hd = 0; hd < nh; hd++) {
                memcpy(slot + ((int64_t)hd * block + pos[r]) * hs, k + hd * hs, hs * sizeof(float));
                memcpy(slot + ((int64_t)(nh + hd) * block + pos[r]) * hs, v + hd * hs, hs * sizeof(float));
            }
        }
        rows_attend(qkv, 3 * C, L->kv, kv_row, nh, block, hs, n, rows, 1.0f / __builtin_sqrtf((float)hs), y, C,
                    scores);
        rows_linear(y, rows, C, L->attn_proj_w, C, L->attn_proj_b, h);
        for (int64_t i = 0; i < rows * C; i++) x[i] += h[i];
        for (int64_t r = 0; r < rows; r++) norm_row(x + r * C, C, L->ln_2_w, L->ln_2_b, rms, eps, h + r * C);
        rows_linear(h, rows, C, L->fc_w, hidden, L->fc_b, f);
        activate(f, rows * hidden, flags & STEP_RELU2);
        rows_linear(f, rows, hidden, L->mlp_proj_w, C, L->mlp_proj_b, h);
        for (int64_t i = 0; i < rows * C; i++) x[i] += h[i];
    }
    return 0;
}
