/* Merge math for contiguous CPU tensors in one pass over the entries (fused.py loads it): the
 * task-vector combine of methods/task_arithmetic.py (`_combine`), with TIES' fast magnitude
 * selection (select.py) inside it or DARE's and DELLA's rescale factors applied in it; linear
 * merges (linear.py); DARE's and DELLA's masks (sparsify.bernoulli, sparsify.della_magprune).
 * Every step rounds where torch's kernels round, so the result is theirs bit for bit: a
 * bfloat16 op computes in float32 and rounds to nearest even; a sum over the models accumulates
 * in float32 from +0 and rounds once (two models: one add, so -0 + -0 stays -0, as
 * `_sum_models` does). Built with -ffp-contract=off: no fused multiply-adds torch would not
 * make. Each loop is written so that the compiler vectorizes it: up to four task vectors one
 * entry at a time in scalars (`elect`, `plain`), more in blocks of BLOCK entries in L1; no
 * short-circuit && or data-dependent branch inside a loop.
 *
 *   out = base + lambda * sum_i(w_i * delta_i [agreeing with the elected sign]) / divisor
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#define BLOCK 1024

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t f32_to_bf16(float f) { /* round to nearest even, as c10::BFloat16 */
    uint32_t u;
    memcpy(&u, &f, 4);
    uint16_t rounded = (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
    return (u & 0x7fffffffu) > 0x7f800000u ? 0x7fc0 : rounded; /* NaN; a select, not a branch */
}

/* f32_to_bf16 then back, without narrowing. No NaN test: a NaN here comes from bfloat16 inputs or
 * from arithmetic, so its low 16 bits are 0 and rounding leaves it as it is. */
static inline float round_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    u = (u + 0x7fffu + ((u >> 16) & 1u)) & 0xffff0000u;
    memcpy(&f, &u, 4);
    return f;
}

/* In the dtype: bfloat16 values (bf16 = 1) are rounded after every op, float32 ones are exact.
 * One body for both: the wrappers below pass a constant, which the compiler folds. */
static inline float load(const void *p, int64_t j, int bf16) {
    return bf16 ? bf16_to_f32(((const uint16_t *)p)[j]) : ((const float *)p)[j];
}

static inline float rnd(float f, int bf16) { return bf16 ? round_bf16(f) : f; }

/* A task vector's entry, times its rescale factor when it has one (DARE, DELLA: sparsify.py's
 * `_rescale` multiplies in the dtype before the combine weighs it). */
static inline float entry(const void *p, int64_t j, int bf16, int scaled, float scale) {
    return scaled ? rnd(load(p, j, bf16) * scale, bf16) : load(p, j, bf16);
}

/* Task arithmetic's common case (no sign election, normalization or lambda) in one loop over the
 * entries, for a constant number of task vectors the compiler unrolls. */
static inline __attribute__((always_inline)) void plain(const void *base, const void *deltas, int64_t stride, int64_t numel,
                         const int models, const float *weights, const float *scales,
                         int scaled, void *out, int bf16) {
    const int64_t size = bf16 ? 2 : 4;
    const float zero = models == 2 ? -0.0f : 0.0f;
    const char *d[4];
    float w[4], f[4];
    for (int i = 0; i < models; i++) {
        d[i] = (const char *)deltas + i * stride * size;
        w[i] = weights[i];
        f[i] = scaled ? scales[i] : 1.0f;
    }
    for (int64_t j = 0; j < numel; j++) {
        float mixed = zero;
        for (int i = 0; i < models; i++)
            mixed += rnd(entry(d[i], j, bf16, scaled, f[i]) * w[i], bf16);
        float v = load(base, j, bf16) + rnd(mixed, bf16);
        if (bf16)
            ((uint16_t *)out)[j] = f32_to_bf16(v);
        else
            ((float *)out)[j] = v;
    }
}

/* TIES' sign election for a constant number of task vectors, one entry at a time (the block
 * loops below do the same steps for any number): the weighted entries (after the magnitude cut,
 * or rescaled), their sum's sign, the sum of those that agree with it, normalized by the weights
 * that agree, scaled by lambda, added to the base. With `cuts` the range is split where a task
 * vector's ties at the cut stop being kept, so that the loop compares no 64-bit index. */
/* A task vector's weighted entry j: after the magnitude cut (cuts) or rescaled (scaled). */
static inline __attribute__((always_inline)) float term(const char *d, float w, float f,
                                                        int32_t above, int64_t j, int cuts,
                                                        int scaled, int bf16) {
    if (cuts) { /* kept: the entries whose magnitude key is above `above` */
        int32_t key = ((const uint16_t *)d)[j] & 0x7fff;
        float kept = key > above ? 1.0f : 0.0f;
        return rnd(load(d, j, 1) * kept * w, 1); /* x * 0/1 is exact */
    }
    return rnd(entry(d, j, bf16, scaled, f) * w, bf16);
}

/* Its share of the agreeing sum (itself or 0), and of the divisor (its weight or 0). */
#define AGREE(X, W)                                                                              \
    do {                                                                                         \
        float kept = (((X) > 0.0f) == positive) & ((X) != 0.0f) ? 1.0f : 0.0f; /* no && */    \
        agree += (X) * kept;                                                                     \
        divisor += kept * (W);                                                                   \
    } while (0)
#define TERM(I) term(d##I, w##I, f##I, above##I, j, cuts, scaled, bf16)

static inline __attribute__((always_inline)) void elect_range(
    const char *const *d, const float *w, const float *f, const int32_t *above,
    const void *restrict base, int64_t from, int64_t to, const int models, int normalize,
    int scale, float lambda_, void *restrict out, const int cuts, int scaled, int tail, int bf16) {
    const float zero = models == 2 ? -0.0f : 0.0f;
    /* Scalars, not arrays, for up to four task vectors: the loop over j vectorizes. */
    const int k1 = models > 1, k2 = models > 2, k3 = models > 3;
    const char *d0 = d[0], *d1 = d[k1], *d2 = d[2 * k2], *d3 = d[3 * k3];
    const float w0 = w[0], w1 = w[k1], w2 = w[2 * k2], w3 = w[3 * k3];
    const float f0 = f[0], f1 = f[k1], f2 = f[2 * k2], f3 = f[3 * k3];
    const int32_t above0 = above[0], above1 = above[k1], above2 = above[2 * k2];
    const int32_t above3 = above[3 * k3];
    const float lam = lambda_;
    for (int64_t j = from; j < to; j++) {
        float x0 = TERM(0), x1 = k1 ? TERM(1) : 0.0f, x2 = k2 ? TERM(2) : 0.0f;
        float x3 = k3 ? TERM(3) : 0.0f;
        float mixed = zero + x0;
        if (k1) mixed += x1;
        if (k2) mixed += x2;
        if (k3) mixed += x3;
        /* rnd(mixed) >= 0: in bfloat16 everything from -2^-134 up rounds to -0 or above */
        int positive = mixed >= (bf16 ? -0x1p-134f : 0.0f);
        float agree = zero, divisor = zero;
        AGREE(x0, w0);
        if (k1) AGREE(x1, w1);
        if (k2) AGREE(x2, w2);
        if (k3) AGREE(x3, w3);
        if (tail) { /* normalize or lambda: dividing or multiplying by 1 changes nothing, so no
                     * branch here (a conditional division keeps the loop from vectorizing) */
            float v = normalize ? rnd(divisor, bf16) : 1.0f;
            agree = rnd(rnd(agree, bf16) / (v == 0.0f ? 1.0f : v), bf16);
            if (scale) agree = rnd(agree * lam, bf16);
        }
        float v = load(base, j, bf16) + (tail ? agree : rnd(agree, bf16)); /* rounded above */
        if (bf16)
            ((uint16_t *)out)[j] = f32_to_bf16(v);
        else
            ((float *)out)[j] = v;
    }
}
#undef TERM
#undef AGREE

/* One function per variant: inlined into one large function, most of them did not vectorize. */
typedef void (*elect_fn)(const char *const *, const float *, const float *, const int32_t *,
                         const void *, int64_t, int64_t, int, int, float, void *);
#define ELECT_FN(NAME, M, CUTS, SCALED, BF16)                                                    \
    static void NAME(const char *const *d, const float *w, const float *f, const int32_t *above, \
                     const void *base, int64_t from, int64_t to, int normalize, int scale,      \
                     float lambda_, void *out) {                                                 \
        if (normalize && !scale) /* TIES, DELLA */                                              \
            elect_range(d, w, f, above, base, from, to, M, 1, 0, 1.0f, out, CUTS, SCALED, 1,   \
                        BF16);                                                                   \
        else if (normalize || scale)                                                             \
            elect_range(d, w, f, above, base, from, to, M, normalize, scale, lambda_, out, CUTS, \
                        SCALED, 1, BF16);                                                        \
        else /* DARE-TIES */                                                                     \
            elect_range(d, w, f, above, base, from, to, M, 0, 0, 1.0f, out, CUTS, SCALED, 0,   \
                        BF16);                                                                   \
    }
#define ELECT_FNS(M)                                                                             \
    ELECT_FN(elect_cut_##M, M, 1, 0, 1)                                                          \
    ELECT_FN(elect_bf16_##M, M, 0, 0, 1)                                                         \
    ELECT_FN(elect_bf16_scaled_##M, M, 0, 1, 1)                                                  \
    ELECT_FN(elect_f32_##M, M, 0, 0, 0)                                                          \
    ELECT_FN(elect_f32_scaled_##M, M, 0, 1, 0)
ELECT_FNS(1)
ELECT_FNS(2)
ELECT_FNS(3)
ELECT_FNS(4)
static const elect_fn ELECT[4][5] = {
#define ROW(M) {elect_cut_##M, elect_bf16_##M, elect_bf16_scaled_##M, elect_f32_##M, elect_f32_scaled_##M}
    ROW(1), ROW(2), ROW(3), ROW(4)
#undef ROW
};

static void elect(const void *base, const void *deltas, int64_t stride, int64_t numel, int models,
                  const float *weights, int normalize, int scale, float lambda_, void *out,
                  const int32_t *cuts, const int64_t *limits, int64_t offset, const float *scales,
                  int bf16) {
    const int64_t size = bf16 ? 2 : 4;
    const char *d[4];
    float w[4], f[4];
    int32_t cut[4];
    int64_t edges[6] = {0, numel}; /* where a task vector's kept ties stop, in order */
    int count = 2;
    for (int i = 0; i < models; i++) {
        d[i] = (const char *)deltas + i * stride * size;
        w[i] = weights[i];
        f[i] = scales ? scales[i] : 1.0f;
        cut[i] = cuts ? cuts[i] : 0;
        int64_t limit = cuts ? limits[i] - offset : 0;
        if (limit > 0 && limit < numel) {
            int k = count++;
            for (; edges[k - 1] > limit; k--) edges[k] = edges[k - 1];
            edges[k] = limit;
        }
    }
    elect_fn fn = ELECT[models - 1][cuts ? 0 : 1 + 2 * !bf16 + (scales != NULL)];
    for (int e = 0; e + 1 < count; e++) {
        int32_t above[4]; /* before its limit a task vector keeps its ties at the cut too */
        for (int i = 0; i < models; i++)
            above[i] = cut[i] - (cuts && edges[e] < limits[i] - offset);
        fn(d, w, f, above, base, edges[e], edges[e + 1], normalize, scale, lambda_, out);
    }
}

static inline __attribute__((always_inline)) void combine(const void *base, const void *deltas, int64_t stride, int64_t numel,
                           int models, const float *weights, int consensus, int normalize,
                           float divisor_all, int scale, float lambda_, void *out,
                           const int32_t *cuts, const int64_t *limits, int64_t offset,
                           const float *scales, int scaled, int bf16) {
    if (!consensus && !normalize && !scale && models <= 4 && !cuts) {
        switch (models) { /* a constant each, so each call is unrolled */
        case 1: plain(base, deltas, stride, numel, 1, weights, scales, scaled, out, bf16); return;
        case 2: plain(base, deltas, stride, numel, 2, weights, scales, scaled, out, bf16); return;
        case 3: plain(base, deltas, stride, numel, 3, weights, scales, scaled, out, bf16); return;
        default: plain(base, deltas, stride, numel, 4, weights, scales, scaled, out, bf16); return;
        }
    }
    if (consensus && models <= 4 && (!cuts || bf16)) {
        elect(base, deltas, stride, numel, models, weights, normalize, scale, lambda_, out, cuts,
              limits, offset, scaled ? scales : NULL, bf16);
        return;
    }
    static _Thread_local float weighted[8][BLOCK], mixed[BLOCK], divisor[BLOCK], positive[BLOCK];
    const int64_t size = bf16 ? 2 : 4;
    const float zero = models == 2 ? -0.0f : 0.0f; /* -0 + x is x; +0 + -0 is +0 */
    for (int64_t start = 0; start < numel; start += BLOCK) {
        int64_t m = numel - start < BLOCK ? numel - start : BLOCK;
        for (int i = 0; i < models; i++) { /* mixed = sum_i w_i * delta_i */
            const char *d = (const char *)deltas + (i * stride + start) * size;
            float w = weights[i], *keep = weighted[i], f = scaled ? scales[i] : 1.0f;
            if (consensus && cuts && bf16) { /* TIES: magnitude selection (select.py) */
                const uint16_t *bits = (const uint16_t *)d;
                int32_t cut = cuts[i];
                int64_t limit = limits[i] - offset - start; /* ties at the cut before it stay */
                for (int64_t j = 0; j < m; j++) {
                    int32_t key = bits[j] & 0x7fff;
                    float kept = key > cut || (key == cut && j < limit) ? 1.0f : 0.0f;
                    keep[j] = rnd(load(d, j, 1) * kept * w, 1); /* x * 0/1 is exact */
                }
            } else if (consensus) {
                for (int64_t j = 0; j < m; j++) keep[j] = rnd(entry(d, j, bf16, scaled, f) * w, bf16);
            }
            if (consensus && i == 0) {
                for (int64_t j = 0; j < m; j++) mixed[j] = zero + keep[j];
            } else if (consensus) {
                for (int64_t j = 0; j < m; j++) mixed[j] += keep[j];
            } else if (i == 0) {
                for (int64_t j = 0; j < m; j++)
                    mixed[j] = zero + rnd(entry(d, j, bf16, scaled, f) * w, bf16);
            } else {
                for (int64_t j = 0; j < m; j++)
                    mixed[j] += rnd(entry(d, j, bf16, scaled, f) * w, bf16);
            }
        }
        if (consensus) { /* keep the entries whose sign agrees with the sum's; zeros never */
            for (int64_t j = 0; j < m; j++) {
                positive[j] = rnd(mixed[j], bf16) >= 0.0f ? 1.0f : 0.0f;
                mixed[j] = zero;
                divisor[j] = zero;
            }
            for (int i = 0; i < models; i++) {
                float w = weights[i], *x = weighted[i];
                for (int64_t j = 0; j < m; j++) {
                    float sign = x[j] > 0.0f ? 1.0f : 0.0f;
                    float kept = sign == positive[j] && x[j] != 0.0f ? 1.0f : 0.0f;
                    mixed[j] += x[j] * kept;
                    divisor[j] += kept * w;
                }
            }
            for (int64_t j = 0; j < m; j++) {
                float v = rnd(divisor[j], bf16);
                divisor[j] = v == 0.0f ? 1.0f : v;
            }
        }
        /* out = base + lambda * mixed / divisor */
        if (normalize && consensus)
            for (int64_t j = 0; j < m; j++) mixed[j] = rnd(rnd(mixed[j], bf16) / divisor[j], bf16);
        if (normalize && !consensus)
            for (int64_t j = 0; j < m; j++) mixed[j] = rnd(rnd(mixed[j], bf16) / divisor_all, bf16);
        if (scale)
            for (int64_t j = 0; j < m; j++) mixed[j] = rnd(rnd(mixed[j], bf16) * lambda_, bf16);
        const char *b = (const char *)base + start * size;
        if (bf16) {
            uint16_t *o = (uint16_t *)out + start;
            for (int64_t j = 0; j < m; j++) o[j] = f32_to_bf16(load(b, j, 1) + round_bf16(mixed[j]));
        } else {
            float *o = (float *)out + start;
            for (int64_t j = 0; j < m; j++) o[j] = load(b, j, 0) + mixed[j];
        }
    }
}

#define EXPORT(NAME, BF16)                                                                       \
    void NAME(const void *base, const void *deltas, int64_t stride, int64_t numel, int models,  \
              const float *weights, int consensus, int normalize, float divisor_all, int scale, \
              float lambda_, void *out, const int32_t *cuts, const int64_t *limits,             \
              int64_t offset, const float *scales) {                                             \
        if (scales) /* rescaled task vectors: a second copy of the loops */                     \
            combine(base, deltas, stride, numel, models, weights, consensus, normalize,         \
                    divisor_all, scale, lambda_, out, cuts, limits, offset, scales, 1, BF16);    \
        else                                                                                     \
            combine(base, deltas, stride, numel, models, weights, consensus, normalize,         \
                    divisor_all, scale, lambda_, out, cuts, limits, offset, NULL, 0, BF16);      \
    }
EXPORT(combine_bf16, 1)
EXPORT(combine_f32, 0)


/* Linear (methods/linear.py): out = sum_i(w_i * x_i) / total, accumulated in float32 in the order
 * of the inputs as torch's addcmul_ into a float32 buffer does it, rounded once into the output
 * dtype. Whether torch's kernel fuses each multiply-add depends on how it was built (its AVX2 and
 * AVX-512 kernels do): fused.py asks it once and passes `madd`. */
static inline void linear(const void *const *inputs, int models, const float *weights,
                          int normalize, float total, int64_t start, int64_t numel, void *out,
                          int bf16, int madd) {
    for (int64_t j = start; j < start + numel; j++) {
        float acc = 0.0f;
        for (int i = 0; i < models; i++) {
            float x = load(inputs[i], j, bf16);
            acc = madd ? fmaf(x, weights[i], acc) : acc + x * weights[i];
        }
        if (normalize) acc = acc / total;
        if (bf16)
            ((uint16_t *)out)[j] = f32_to_bf16(acc);
        else
            ((float *)out)[j] = acc;
    }
}

#define LINEAR_CASES(BF16, MADD)                                                                 \
    switch (models) { /* constants, unrolled */                                                  \
    case 1: linear(inputs, 1, weights, normalize, total, start, numel, out, BF16, MADD); return; \
    case 2: linear(inputs, 2, weights, normalize, total, start, numel, out, BF16, MADD); return; \
    case 3: linear(inputs, 3, weights, normalize, total, start, numel, out, BF16, MADD); return; \
    default: linear(inputs, models, weights, normalize, total, start, numel, out, BF16, MADD);   \
    }
#define EXPORT_LINEAR(NAME, BF16)                                                                \
    void NAME(const void *const *inputs, int models, const float *weights, int normalize,       \
              float total, int64_t start, int64_t numel, void *out, int madd) {                  \
        if (madd) {                                                                              \
            LINEAR_CASES(BF16, 1)                                                                \
        } else {                                                                                 \
            LINEAR_CASES(BF16, 0)                                                                \
        }                                                                                        \
    }
EXPORT_LINEAR(linear_bf16, 1)
EXPORT_LINEAR(linear_f32, 0)

/* Magnitude selection's counts (select.py): how many entries of x have each 15-bit magnitude
 * key (the bfloat16 bits without the sign), added into counts[32768]. Two histograms take turns
 * so that equal neighbours do not wait on each other's increment. */
void histogram_bf16(const uint16_t *x, int64_t n, int64_t *counts) {
    static _Thread_local uint32_t h[2][32768];
    memset(h, 0, sizeof h);
    int64_t j = 0;
    for (; j + 1 < n; j += 2) {
        h[0][x[j] & 0x7fff]++;
        h[1][x[j + 1] & 0x7fff]++;
    }
    if (j < n) h[0][x[j] & 0x7fff]++;
    for (int k = 0; k < 32768; k++) counts[k] += (int64_t)h[0][k] + h[1][k];
}

/* The index just past the nth (from 1) entry of x whose magnitude key is `key`, or n. Counted
 * 4096 entries at a time (in 32 bits: an int64_t count vectorized 8 entries at a time), then the
 * block that holds it is searched. */
int64_t nth_equal_bf16(const uint16_t *x, int64_t n, int32_t key, int64_t nth) {
    int64_t seen = 0;
    for (int64_t start = 0; start < n; start += 4096) {
        int64_t m = n - start < 4096 ? n - start : 4096;
        uint32_t here = 0;
        for (int64_t j = 0; j < m; j++) here += (x[start + j] & 0x7fff) == key;
        if (seen + here >= nth)
            for (int64_t j = 0; j < m; j++)
                if ((x[start + j] & 0x7fff) == key && ++seen == nth) return start + j + 1;
        seen += here;
    }
    return n;
}

/* Random masks as torch's CPU generator draws them, for DARE (sparsify.bernoulli: every entry
 * kept with probability p) and DELLA (sparsify.della_magprune: with a probability from the
 * entry's magnitude rank in its row, its rank norm). torch.bernoulli(probs, generator) runs
 * MT19937 seeded with the low 32 bits of the seed and, entry by entry in index order, keeps the
 * entry when (next 32-bit draw & 0xffffff) * 2^-24 < its probability (in the tensor's dtype, as
 * a float). Writes x * keep (x, its signed zero, or NaN) to `masked` and adds the kept
 * magnitudes, in double, into sums[j / chunk]: the L1 norms fused.py rescales with
 * (`_l1_after`). fused.py checks the draws against torch.bernoulli once before using them. */
#define MT_N 624
#define MT_M 397

/* s[i] = s[i + offset] ^ twist(s[i], s[i + 1]) for i in [from, to), 16 at a time through a copy
 * so that the compiler vectorizes it (every read is of an entry not yet written, or written
 * `offset` >= 16 entries before). */
static inline void twist_range(uint32_t *s, int from, int to, int offset) {
    int i = from;
    for (; i + 16 <= to; i += 16) {
        uint32_t t[16];
        for (int l = 0; l < 16; l++) {
            uint32_t y = (s[i + l] & 0x80000000u) | (s[i + l + 1] & 0x7fffffffu);
            t[l] = s[i + l + offset] ^ (y >> 1) ^ ((0u - (y & 1u)) & 0x9908b0dfu);
        }
        memcpy(s + i, t, sizeof t);
    }
    for (; i < to; i++) {
        uint32_t y = (s[i] & 0x80000000u) | (s[i + 1] & 0x7fffffffu);
        s[i] = s[i + offset] ^ (y >> 1) ^ ((0u - (y & 1u)) & 0x9908b0dfu);
    }
}

static void mt_twist(uint32_t *s) {
    twist_range(s, 0, MT_N - MT_M, MT_M);
    twist_range(s, MT_N - MT_M, MT_N - 1, MT_M - MT_N);
    uint32_t y = (s[MT_N - 1] & 0x80000000u) | (s[0] & 0x7fffffffu);
    s[MT_N - 1] = s[MT_M - 1] ^ (y >> 1) ^ ((0u - (y & 1u)) & 0x9908b0dfu);
}

/* The sum of a[0..m) (m <= MT_N) in float32 over 16 lanes, so that it vectorizes: each value
 * passes through at most MT_N / 16 + 31 roundings (fused.py's LANE_SUM_DEPTH). */
static inline float lane_sum(const float *a, int64_t m) {
    float lanes[16] = {0}, total = 0;
    int64_t k = 0;
    for (; k + 16 <= m; k += 16)
        for (int l = 0; l < 16; l++) lanes[l] += a[k + l];
    for (; k < m; k++) total += a[k];
    for (int l = 0; l < 16; l++) total += lanes[l];
    return total;
}

static inline uint32_t temper(uint32_t y) {
    y ^= y >> 11;
    y ^= (y << 7) & 0x9d2c5680u;
    y ^= (y << 15) & 0xefc60000u;
    return y ^ (y >> 18);
}

static inline void random_mask(const void *x, int64_t n, uint64_t seed, uint32_t limit,
                               const void *norms, float low, float epsilon, void *masked,
                               int64_t chunk, double *sums, int bf16) {
    uint32_t s[MT_N];
    uint32_t keep[MT_N]; /* all ones or 0 */
    float kept[MT_N];    /* the kept magnitudes */
    const float twice = 2.0f * epsilon; /* (x * 2) * eps == x * (2 * eps): x * 2 is exact */
    s[0] = (uint32_t)seed;
    for (int j = 1; j < MT_N; j++) s[j] = 1812433253u * (s[j - 1] ^ (s[j - 1] >> 30)) + (uint32_t)j;
    for (int64_t start = 0; start < n; start += MT_N) {
        int64_t m = n - start < MT_N ? n - start : MT_N;
        mt_twist(s);
        /* Draw and decide (a loop each way: one loop with both did not vectorize), then write
         * x * keep as torch's float multiply gives it: x, its signed zero, or (an infinite or
         * NaN x dropped) NaN, with bit masks (a ?: there kept the loop scalar). */
        if (norms) /* DELLA: p = (density - epsilon) + rank_norm * 2 * epsilon, in the dtype */
            for (int64_t j = 0; j < m; j++) {
                float q = rnd(low + rnd(load(norms, start + j, bf16) * twice, bf16), bf16);
                keep[j] = -(uint32_t)((float)(temper(s[j]) & 0xffffffu) * 0x1p-24f < q);
            }
        else /* DARE: y * 2^-24 < p, as y < ceil(p * 2^24) */
            for (int64_t j = 0; j < m; j++) keep[j] = -(uint32_t)((temper(s[j]) & 0xffffffu) < limit);
        for (int64_t j = 0; j < m; j++) {
            if (bf16) {
                uint16_t v = ((const uint16_t *)x)[start + j];
                uint16_t odd = -(uint16_t)((v & 0x7fffu) >= 0x7f80u), on = (uint16_t)keep[j];
                uint16_t dropped = (odd & 0x7fc0u) | (~odd & v & 0x8000u);
                v = (on & v) | (~on & dropped);
                ((uint16_t *)masked)[start + j] = v;
                kept[j] = bf16_to_f32(v & 0x7fffu);
            } else {
                uint32_t v = ((const uint32_t *)x)[start + j];
                uint32_t odd = -(uint32_t)((v & 0x7fffffffu) >= 0x7f800000u), on = keep[j];
                uint32_t dropped = (odd & 0x7fc00000u) | (~odd & v & 0x80000000u);
                v = (on & v) | (~on & dropped);
                ((uint32_t *)masked)[start + j] = v;
                v &= 0x7fffffffu;
                memcpy(kept + j, &v, 4);
            }
        }
        for (int64_t j = 0; j < m;) { /* a stretch per chunk the block meets */
            int64_t stop = ((start + j) / chunk + 1) * chunk - start;
            stop = stop < m ? stop : m;
            sums[(start + j) / chunk] += lane_sum(kept + j, stop - j);
            j = stop;
        }
    }
}

#define EXPORT_MASK(NAME, BF16)                                                                  \
    void NAME(const void *x, int64_t n, uint64_t seed, uint32_t limit, const void *norms,       \
              float low, float epsilon, void *masked, int64_t chunk, double *sums) {             \
        random_mask(x, n, seed, limit, norms, low, epsilon, masked, chunk, sums, BF16);          \
    }
EXPORT_MASK(random_mask_bf16, 1)
EXPORT_MASK(random_mask_f32, 0)
