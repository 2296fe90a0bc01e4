/* Each row's top logits straight from the LM head: the head streamed once for up to 8
 * rows, then an exact selection that looks at few of the logits.
 *
 * Decoding a few rows on a CPU spends most of a step in the LM head: a small-M matrix
 * product that BLAS runs well below the core's rate, then a top-k over every row's full
 * vocabulary (torch's CPU topk is a branchy selection, about as slow again). Here:
 *   1. the rows' logits, 64 ids at a time, with the partial sums in vector registers and
 *      the weights prefetched ahead (the hardware prefetchers alone lag by half), and
 *      each 64-id block's maximum while the block is still in L1;
 *   2. per row, the top-th largest block maximum, a floor no higher than the row's top-th
 *      logit (top blocks each hold a logit at least that large), found among the ~800
 *      maxima; only blocks whose maximum reaches the floor are read again (a vector compare
 *      gives a mask of the logits that reach it), and their
 *      logits at or above it (every id that can be in the top, ties included) are
 *      selected and sorted: value descending, id ascending among equals, as gptcore's
 *      exact_top orders.
 *
 * Every logit is one fp32 dot product summed over k in order, x[0] w[0] first: the same
 * arithmetic whatever the number of rows or the id's place in its block, so a row decoded
 * in a batch gets exactly the logits it gets alone.
 *
 * The weights come packed by gptcore/model/native.py: blocks of SUPER vocabulary rows,
 * each block (C, SUPER) row-major, so that one vector load holds one k of 8 ids; the
 * vocabulary is padded with zero rows to a multiple of CHUNK ids (never selected).
 *
 * Plain C with GCC/Clang vector extensions, no intrinsics: it builds for the CPU it is
 * compiled on (-march=native picks AVX2, AVX-512 or NEON). */

#include <stddef.h>
#include <stdint.h>

/* One vector of ids: 16 floats where the CPU has AVX-512 (twice the FMA work per
 * instruction and 32 registers for the sums), else 8. Each lane is the same chain of FMAs
 * either way, so the logits' bits do not depend on the width. */
#if defined(__AVX512F__)
typedef float vf __attribute__((vector_size(64)));
typedef int32_t vi __attribute__((vector_size(64)));
#define BLOCK 16
#define LANE_BITS ((vi){1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768})
#else
typedef float vf __attribute__((vector_size(32)));
typedef int32_t vi __attribute__((vector_size(32)));
#define BLOCK 8
#define LANE_BITS ((vi){1, 2, 4, 8, 16, 32, 64, 128})
#endif
#define SUPER 64    /* ids whose weights are stored together, and whose maximum is kept */
#define PREFETCH 2  /* super-blocks ahead the weights are prefetched */
#define CHUNK 256   /* ids computed per call of tile() */

/* A logit and its id as one integer that orders as the pair ranks: the float's bits made
 * monotonic (negatives' bits flipped, positives' sign bit set) above the id's complement,
 * so a larger key is a larger value or, among equal values, a lower id. -0.0 counts as 0.0. */
static inline uint64_t key_of(float v, int64_t id) {
    union { float f; uint32_t u; } b = { v + 0.0f };
    uint32_t m = (b.u & 0x80000000u) ? ~b.u : (b.u | 0x80000000u);
    return ((uint64_t)m << 32) | (uint32_t)(0xFFFFFFFFu - (uint32_t)id);
}

static inline float value_of(uint64_t key) {
    uint32_t m = (uint32_t)(key >> 32);
    union { uint32_t u; float f; } b = { (m & 0x80000000u) ? (m & 0x7FFFFFFFu) : ~m };
    return b.f;
}

static inline int64_t id_of(uint64_t key) { return (int64_t)(0xFFFFFFFFu - (uint32_t)key); }

static inline void swap(uint64_t *a, uint64_t *b) { uint64_t t = *a; *a = *b; *b = t; }

/* Partition keys[lo..hi] around keys[hi] (the pivot, after a median of three of lo, mid
 * and hi): the keys above it first, then the pivot, whose index is returned. Every key is
 * swapped and the count advances by the comparison, so no branch depends on the data
 * (a compare-and-branch mispredicts on about every other key of logits in random order). */
static inline int partition(uint64_t *keys, int lo, int hi) {
    int mid = lo + (hi - lo) / 2;
    if (keys[mid] < keys[lo]) swap(&keys[mid], &keys[lo]);
    if (keys[hi] < keys[lo]) swap(&keys[hi], &keys[lo]);
    if (keys[mid] < keys[hi]) swap(&keys[mid], &keys[hi]);
    uint64_t pivot = keys[hi];
    int store = lo;
    for (int i = lo; i < hi; i++) {
        uint64_t v = keys[i];
        keys[i] = keys[store];
        keys[store] = v;
        store += v > pivot;
    }
    swap(&keys[store], &keys[hi]);  /* keys are distinct (ids differ): a strict order */
    return store;
}

/* Reorder keys[0..n) so that keys[0..k) are the k largest (in no order). */
static void select_largest(uint64_t *keys, int n, int k) {
    int lo = 0, hi = n - 1;
    while (hi > lo) {
        int store = partition(keys, lo, hi);
        if (store == k || store == k - 1) return;
        if (store < k) lo = store + 1; else hi = store - 1;
    }
}

/* Sort keys[0..n) descending: quicksort (median of three) recursing into the smaller
 * side, insertion sort below 16. */
static void sort_descending(uint64_t *keys, int n) {
    while (n > 16) {
        int store = partition(keys, 0, n - 1);
        if (store < n - store - 1) {
            sort_descending(keys, store);
            keys += store + 1;
            n -= store + 1;
        } else {
            sort_descending(keys + store + 1, n - store - 1);
            n = store;
        }
    }
    for (int i = 1; i < n; i++) {
        uint64_t k = keys[i];
        int j = i;
        while (j > 0 && keys[j - 1] < k) { keys[j] = keys[j - 1]; j--; }
        keys[j] = k;
    }
}

/* Logits of R rows for the SUPER ids of super-block s, T vectors of BLOCK ids at a time:
 * out[r * stride + i] for id s * SUPER + i. */
#define TILE(R, T)                                                                        \
static void tile_##R(const float *x, int C, const float *w, int64_t s, float *out,        \
                     int stride) {                                                        \
    const float *ws = w + (size_t)s * C * SUPER;                                          \
    for (int b = 0; b < SUPER; b += T * BLOCK) {                                          \
        vf acc[R][T];                                                                     \
        for (int r = 0; r < R; r++)                                                       \
            for (int t = 0; t < T; t++) acc[r][t] = (vf){0};                              \
        for (int k = 0; k < C; k++) {                                                     \
            /* the super-block PREFETCH ahead, spread over this one's iterations */      \
            const char *ahead = (const char *)(ws + (size_t)PREFETCH * C * SUPER)         \
                + ((size_t)b * C + (size_t)k * T * BLOCK) * sizeof(float);                \
            for (int l = 0; l < T * BLOCK * (int)sizeof(float); l += 64)                  \
                __builtin_prefetch(ahead + l);                                            \
            vf wv[T];                                                                     \
            for (int t = 0; t < T; t++)                                                   \
                __builtin_memcpy(&wv[t], ws + (size_t)k * SUPER + b + t * BLOCK, sizeof(vf)); \
            for (int r = 0; r < R; r++) {                                                 \
                float xs = x[(size_t)r * C + k];                                          \
                for (int t = 0; t < T; t++) acc[r][t] += xs * wv[t];                      \
            }                                                                             \
        }                                                                                 \
        for (int r = 0; r < R; r++)                                                       \
            for (int t = 0; t < T; t++)                                                   \
                __builtin_memcpy(out + (size_t)r * stride + b + t * BLOCK, &acc[r][t], sizeof(vf)); \
    }                                                                                     \
}

/* T vectors at a time: enough independent sums (R * T >= 8; one row streams from memory
 * anyway) to hide the FMA latency, few enough to stay in the vector registers (<= 12 of
 * 16 with AVX2, <= 24 of 32 with AVX-512). */
#if BLOCK == 16
TILE(1, 4) TILE(2, 4) TILE(3, 4) TILE(4, 4) TILE(5, 4) TILE(6, 4) TILE(7, 2) TILE(8, 2)
#else
TILE(1, 8) TILE(2, 4) TILE(3, 4) TILE(4, 2) TILE(5, 2) TILE(6, 2) TILE(7, 1) TILE(8, 1)
#endif

static void tile(int R, const float *x, int C, const float *w, int64_t start, float *out, int stride) {
    for (int i = 0; i < CHUNK; i += SUPER) {
        int64_t s = (start + i) / SUPER;
        float *o = out + i;
        switch (R) {
        case 1: tile_1(x, C, w, s, o, stride); break;
        case 2: tile_2(x, C, w, s, o, stride); break;
        case 3: tile_3(x, C, w, s, o, stride); break;
        case 4: tile_4(x, C, w, s, o, stride); break;
        case 5: tile_5(x, C, w, s, o, stride); break;
        case 6: tile_6(x, C, w, s, o, stride); break;
        case 7: tile_7(x, C, w, s, o, stride); break;
        default: tile_8(x, C, w, s, o, stride); break;
        }
    }
}

/* Bytes of the workspace head_top needs for ids [first, last). */
int64_t head_top_work(int64_t first, int64_t last) {
    int64_t n = last - first, blocks = n / SUPER;
    return 8 * n * (int64_t)sizeof(float) + 8 * blocks * (int64_t)sizeof(float)
        + blocks * (int64_t)sizeof(uint64_t) + n * (int64_t)sizeof(uint64_t);
}

/* The lanes of a, or of b where b's are larger (a NaN in b is never taken). */
static inline vf larger(vf a, vf b) {
    vi m = b > a, ai, bi;
    __builtin_memcpy(&ai, &a, sizeof ai);
    __builtin_memcpy(&bi, &b, sizeof bi);
    ai = (ai & ~m) | (bi & m);
    __builtin_memcpy(&a, &ai, sizeof a);
    return a;
}

/* Bit l set where lane l of v is at least f (a NaN never is). */
static inline uint32_t lanes_at_least(vf v, float f) {
    vi bit = (v >= f) & LANE_BITS;
    uint32_t r = 0;
    for (int l = 0; l < BLOCK; l++) r |= (uint32_t)bit[l];
    return r;
}

/* The largest of a block's SUPER logits, `valid` of them real (NaN-blind). */
static inline float block_max(const float *b, int64_t valid) {
    float m = -__builtin_inff();
    if (valid >= SUPER) {
        vf lanes = (vf){0} - __builtin_inff();  /* from -inf, so a NaN never becomes a lane's maximum */
        for (int j = 0; j < SUPER; j += BLOCK) {
            vf v;
            __builtin_memcpy(&v, b + j, sizeof v);
            lanes = larger(lanes, v);
        }
        for (int l = 0; l < BLOCK; l++) m = lanes[l] > m ? lanes[l] : m;
    } else {
        for (int64_t j = 0; j < valid; j++) m = b[j] > m ? b[j] : m;
    }
    return m;
}

/* Each of `rows` rows' top `top` logits over ids [first, last) of `limit` real ones:
 * x (rows, C) fp32; w packed (see above); first and last multiples of CHUNK (last may
 * pass limit: the padding); work: head_top_work(first, last) bytes, 8-byte aligned.
 * Writes values (rows, top) and ids (rows, top), best first (value descending, id
 * ascending among equals); a row with fewer than `top` ids in range (or NaN logits, which
 * are never selected: torch's topk would rank them first) gets -inf and id -1 after its last. Returns 0, or -1 for arguments
 * it cannot take. */
int head_top(const float *x, int64_t rows, int C, const float *w, int64_t first, int64_t last,
             int64_t limit, int top, float *values, int64_t *ids, void *work) {
    if (rows < 1 || C < 1 || top < 1 || first < 0 || first % CHUNK || last % CHUNK || first > last)
        return -1;
    int64_t n = last - first, blocks = n / SUPER;
    int64_t real = limit - first < 0 ? 0 : (limit - first < n ? limit - first : n);
    int64_t end = first + (real + CHUNK - 1) / CHUNK * CHUNK;  /* chunks past `limit`: skipped */
    float *y = work;                                           /* (8, n) logits */
    float *bmax = y + 8 * n;                                   /* (8, blocks) block maxima */
    uint64_t *bkeys = (uint64_t *)(bmax + 8 * blocks);         /* (blocks) one row's, as keys */
    uint64_t *cand = bkeys + blocks;                           /* (n) one row's candidates */
    int64_t used = (real + SUPER - 1) / SUPER;                 /* blocks holding real ids */
    for (int64_t r0 = 0; r0 < rows; r0 += 8) {
        int R = rows - r0 < 8 ? (int)(rows - r0) : 8;
        for (int64_t start = first; start < end; start += CHUNK) {
            float *out = y + (start - first);
            tile(R, x + r0 * C, C, w, start, out, (int)n);
            for (int r = 0; r < R; r++)
                for (int i = 0; i < CHUNK; i += SUPER)
                    bmax[r * blocks + (start - first + i) / SUPER] =
                        block_max(out + (size_t)r * n + i, limit - (start + i));
        }
        for (int r = 0; r < R; r++) {
            const float *yr = y + (size_t)r * n, *br = bmax + (size_t)r * blocks;
            float floor = -__builtin_inff();  /* fewer blocks than top: every logit */
            if (used > top) {
                for (int64_t i = 0; i < used; i++) bkeys[i] = key_of(br[i], i);
                select_largest(bkeys, (int)used, top);
                uint64_t kth = bkeys[0];
                for (int i = 1; i < top; i++) kth = bkeys[i] < kth ? bkeys[i] : kth;
                floor = value_of(kth);
            }
            int found = 0;
            for (int64_t blk = 0; blk < used; blk++) {
                if (!(br[blk] >= floor)) continue;
                const float *b = yr + blk * SUPER;
                int64_t m = real - blk * SUPER < SUPER ? real - blk * SUPER : SUPER;
                if (m == SUPER) {  /* a mask of the block's logits at the floor, then only those */
                    uint64_t hits = 0;
                    for (int j = 0; j < SUPER; j += BLOCK) {
                        vf v;
                        __builtin_memcpy(&v, b + j, sizeof v);
                        hits |= (uint64_t)lanes_at_least(v, floor) << j;
                    }
                    for (; hits; hits &= hits - 1) {
                        int j = __builtin_ctzll(hits);
                        cand[found++] = key_of(b[j], first + blk * SUPER + j);
                    }
                } else {
                    for (int64_t j = 0; j < m; j++)
                        if (b[j] >= floor) cand[found++] = key_of(b[j], first + blk * SUPER + j);
                }
            }
            if (found > top) select_largest(cand, found, top);
            int kept = found < top ? found : top;
            sort_descending(cand, kept);
            float *v = values + (r0 + r) * top;
            int64_t *id = ids + (r0 + r) * top;
            for (int i = 0; i < top; i++) {
                v[i] = i < kept ? value_of(cand[i]) : -__builtin_inff();
                id[i] = i < kept ? id_of(cand[i]) : -1;
            }
        }
    }
    return 0;
}

/* Every logit of `rows` rows over ids [first, last): out (rows, out_stride), column i for
 * id first + i; the same arithmetic as head_top. */
int head_dense(const float *x, int64_t rows, int C, const float *w, int64_t first, int64_t last,
               float *out, int64_t out_stride) {
    if (rows < 1 || C < 1 || first < 0 || first % CHUNK || last % CHUNK || first > last) return -1;
    float y[8 * CHUNK];
    for (int64_t r0 = 0; r0 < rows; r0 += 8) {
        int R = rows - r0 < 8 ? (int)(rows - r0) : 8;
        for (int64_t start = first; start < last; start += CHUNK) {
            tile(R, x + r0 * C, C, w, start, y, CHUNK);
            for (int r = 0; r < R; r++)
                for (int i = 0; i < CHUNK; i++) out[(r0 + r) * out_stride + (start - first) + i] = y[r * CHUNK + i];
        }
    }
    return 0;
}
