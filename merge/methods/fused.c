/* Merge math for contiguous CPU tensors in one pass over the entries (fused.py loads it): the
 * task-vector combine of methods/task_arithmetic.py (`_combine`), with TIES' fast magnitude
 * selection (select.py) inside it; linear merges (linear.py); DARE's masks (sparsify.bernoulli).
 * Every step rounds where torch's kernels round, so the result is theirs bit for bit: a
 * bfloat16 op computes in float32 and rounds to nearest even; a sum over the models accumulates
 * in float32 from +0 and rounds once (two models: one add, so -0 + -0 stays -0, as
 * `_sum_models` does). Built with -ffp-contract=off: no fused multiply-adds torch would not
 * make. Blocks of BLOCK entries keep float32 partial sums in L1, so each loop over entries
 * vectorizes.
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
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0; /* NaN */
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
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

/* Task arithmetic's common case (no sign election, normalization or lambda) in one loop over the
 * entries, for a constant number of task vectors the compiler unrolls. */
static inline void plain(const void *base, const void *deltas, int64_t stride, int64_t numel,
                         const int models, const float *weights, void *out, int bf16) {
    const int64_t size = bf16 ? 2 : 4;
    const float zero = models == 2 ? -0.0f : 0.0f;
    const char *d[4];
    float w[4];
    for (int i = 0; i < models; i++) {
        d[i] = (const char *)deltas + i * stride * size;
        w[i] = weights[i];
    }
    for (int64_t j = 0; j < numel; j++) {
        float mixed = zero;
        for (int i = 0; i < models; i++) mixed += rnd(load(d[i], j, bf16) * w[i], bf16);
        float v = load(base, j, bf16) + rnd(mixed, bf16);
        if (bf16)
            ((uint16_t *)out)[j] = f32_to_bf16(v);
        else
            ((float *)out)[j] = v;
    }
}

static inline void combine(const void *base, const void *deltas, int64_t stride, int64_t numel,
                           int models, const float *weights, int consensus, int normalize,
                           float divisor_all, int scale, float lambda_, void *out,
                           const int32_t *cuts, const int64_t *limits, int64_t offset, int bf16) {
    if (!consensus && !normalize && !scale && models <= 4 && !cuts) {
        switch (models) { /* a constant each, so each call is unrolled */
        case 1: plain(base, deltas, stride, numel, 1, weights, out, bf16); return;
        case 2: plain(base, deltas, stride, numel, 2, weights, out, bf16); return;
        case 3: plain(base, deltas, stride, numel, 3, weights, out, bf16); return;
        default: plain(base, deltas, stride, numel, 4, weights, out, bf16); return;
        }
    }
    static _Thread_local float weighted[8][BLOCK], mixed[BLOCK], divisor[BLOCK], positive[BLOCK];
    const int64_t size = bf16 ? 2 : 4;
    const float zero = models == 2 ? -0.0f : 0.0f; /* -0 + x is x; +0 + -0 is +0 */
    for (int64_t start = 0; start < numel; start += BLOCK) {
        int64_t m = numel - start < BLOCK ? numel - start : BLOCK;
        for (int i = 0; i < models; i++) { /* mixed = sum_i w_i * delta_i */
            const char *d = (const char *)deltas + (i * stride + start) * size;
            float w = weights[i], *keep = weighted[i];
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
                for (int64_t j = 0; j < m; j++) keep[j] = rnd(load(d, j, bf16) * w, bf16);
            }
            if (consensus && i == 0) {
                for (int64_t j = 0; j < m; j++) mixed[j] = zero + keep[j];
            } else if (consensus) {
                for (int64_t j = 0; j < m; j++) mixed[j] += keep[j];
            } else if (i == 0) {
                for (int64_t j = 0; j < m; j++) mixed[j] = zero + rnd(load(d, j, bf16) * w, bf16);
            } else {
                for (int64_t j = 0; j < m; j++) mixed[j] += rnd(load(d, j, bf16) * w, bf16);
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
              int64_t offset) {                                                                  \
        combine(base, deltas, stride, numel, models, weights, consensus, normalize,             \
                divisor_all, scale, lambda_, out, cuts, limits, offset, BF16);                   \
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

/* The index just past the nth (from 1) entry of x whose magnitude key is `key`, or n. */
int64_t nth_equal_bf16(const uint16_t *x, int64_t n, int32_t key, int64_t nth) {
    int64_t seen = 0;
    for (int64_t start = 0; start < n; start += 4096) {
        int64_t m = n - start < 4096 ? n - start : 4096, here = 0;
        for (int64_t j = 0; j < m; j++) here += (x[start + j] & 0x7fff) == key;
        if (seen + here >= nth)
            for (int64_t j = 0; j < m; j++)
                if ((x[start + j] & 0x7fff) == key && ++seen == nth) return start + j + 1;
        seen += here;
    }
    return n;
}

/* DARE's mask (sparsify.bernoulli) as torch's CPU generator draws it: torch.bernoulli(probs,
 * generator) runs MT19937 seeded with the low 32 bits of the seed and, entry by entry in index
 * order, keeps the entry when (next 32-bit draw & 0xffffff) * 2^-24 < p (p: the probability in
 * the tensor's dtype, as a float). Writes x * keep (x or a signed zero) to `masked`. fused.py
 * checks these masks against torch.bernoulli once before using them. */
#define MT_N 624
#define MT_M 397

static void mt_twist(uint32_t *s) {
    int i = 0;
    for (; i < MT_N - MT_M; i++) {
        uint32_t y = (s[i] & 0x80000000u) | (s[i + 1] & 0x7fffffffu);
        s[i] = s[i + MT_M] ^ (y >> 1) ^ ((y & 1u) ? 0x9908b0dfu : 0u);
    }
    for (; i < MT_N - 1; i++) {
        uint32_t y = (s[i] & 0x80000000u) | (s[i + 1] & 0x7fffffffu);
        s[i] = s[i + MT_M - MT_N] ^ (y >> 1) ^ ((y & 1u) ? 0x9908b0dfu : 0u);
    }
    uint32_t y = (s[MT_N - 1] & 0x80000000u) | (s[0] & 0x7fffffffu);
    s[MT_N - 1] = s[MT_M - 1] ^ (y >> 1) ^ ((y & 1u) ? 0x9908b0dfu : 0u);
}

static inline void dare_mask(const void *x, int64_t n, uint64_t seed, float p, void *masked,
                             int bf16) {
    uint32_t s[MT_N];
    float keep[MT_N];
    s[0] = (uint32_t)seed;
    for (int j = 1; j < MT_N; j++) s[j] = 1812433253u * (s[j - 1] ^ (s[j - 1] >> 30)) + (uint32_t)j;
    for (int64_t start = 0; start < n; start += MT_N) {
        int64_t m = n - start < MT_N ? n - start : MT_N;
        mt_twist(s);
        for (int j = 0; j < MT_N; j++) {
            uint32_t y = s[j];
            y ^= y >> 11;
            y ^= (y << 7) & 0x9d2c5680u;
            y ^= (y << 15) & 0xefc60000u;
            y ^= y >> 18;
            keep[j] = (float)(y & 0xffffffu) * (1.0f / 16777216.0f) < p ? 1.0f : 0.0f;
        }
        for (int64_t j = 0; j < m; j++) {
            float v = load(x, start + j, bf16) * keep[j];
            if (bf16)
                ((uint16_t *)masked)[start + j] = f32_to_bf16(v);
            else
                ((float *)masked)[start + j] = v;
        }
    }
}

void dare_mask_bf16(const void *x, int64_t n, uint64_t seed, float p, void *masked) {
    dare_mask(x, n, seed, p, masked, 1);
}
void dare_mask_f32(const void *x, int64_t n, uint64_t seed, float p, void *masked) {
    dare_mask(x, n, seed, p, masked, 0);
}
