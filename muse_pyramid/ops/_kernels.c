/* CPU kernels of muse_pyramid: fp32, OpenMP over rows. Three ops live here (one build, one cache):
 *   - the selective scan, fused like mamba_ssm's selective_scan_fn (muse_scan_*);
 *   - the depthwise causal conv1d with optional SiLU, like causal_conv1d_fn (muse_conv_*);
 *   - dropout with a mask recomputed from a seed (muse_dropout), at the end.
 *
 * Selective scan
 *
 * Layouts (all C-contiguous; "row" = one (batch, channel) pair):
 *   u, delta, z, out and their gradients : (batch, dim, L)
 *   A, dA                                 : (dim, N)
 *   D, delta_bias and their gradients    : (dim,)           D, z, delta_bias may be NULL
 *   B, C, dB, dC                          : (batch, G, L, N)  channel d reads group d / (dim / G)
 *   last, dlast                           : (batch, dim, N)   dlast may be NULL
 *
 * Per row:  dt_t = softplus(delta_t + bias)  (softplus optional)
 *           h_t  = exp(dt_t A) * h_{t-1} + dt_t u_t B_t ,  h_{-1} = 0
 *           out_t = (<C_t, h_t> + D u_t) * silu(z_t)
 * reverse = 1 runs every row from t = L-1 down to 0 (the same as flipping u, delta, z, B, C along
 * time, scanning, and flipping out back), which the backward direction of a bidirectional Mamba
 * needs: a reversed row is copied into per-thread scratch, scanned forwards, and copied back
 * reversed, so no flipped copy of a whole (batch, dim, L) tensor is ever made. The caller passes
 * B, C (and receives dB, dC) already flipped: they are (batch, G, L, N), 1/H of the size of u.
 * The state of a row lives in a small local array: nothing of size (batch, dim, L, N) exists.
 * The backward recomputes the row's states into per-thread scratch (L x N), then runs the
 * adjoint g_t = dy_t C_t + exp(dt_{t+1} A) * g_{t+1} backwards. For A <= 0 only decays <= 1 are
 * multiplied; nothing divides by a cumulative decay. dB/dC sum over the channels of a group:
 * each thread accumulates into its own buffer, reduced after every batch element. dA, dD and
 * d(delta_bias) sum over batch and time: one thread owns a channel within a batch element.
 * All scratch memory comes from the caller (`work`, sized by the *_work_floats functions), so
 * the library never allocates and its memory shows up in the caller's accounting.
 */
#include <stdint.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__x86_64__) || defined(_M_X64)
#include <xmmintrin.h>
#define HAVE_MXCSR 1
#endif

/* exp(x) accurate to ~2 ulp, written so that the compiler vectorises it (no libm call):
 * Cody-Waite range reduction, degree-6 polynomial, 2^k built in the exponent bits.
 * x is clamped to [-88, 88]; at -88 the result is exactly 0. */
static inline float exp_vec(float x) {
    x = x < -88.0f ? -88.0f : (x > 88.0f ? 88.0f : x);
    const float k = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f; /* round(x / ln 2) */
    float r = x - k * 0.693359375f;
    r = r + k * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    const int32_t bits = ((int32_t)k + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof(scale));
    return p * scale;
}

/* log(1 + e) for e in [0, 1] as 2 atanh(s), s = e / (2 + e) <= 1/3 (relative error ~1e-7). */
static inline float log1p_unit(float e) {
    const float s = e / (2.0f + e), s2 = s * s;
    float p = 1.0f / 15.0f;
    p = p * s2 + 1.0f / 13.0f;
    p = p * s2 + 1.0f / 11.0f;
    p = p * s2 + 1.0f / 9.0f;
    p = p * s2 + 1.0f / 7.0f;
    p = p * s2 + 1.0f / 5.0f;
    p = p * s2 + 1.0f / 3.0f;
    p = p * s2 + 1.0f;
    return 2.0f * s * p;
}

/* softplus with PyTorch's / mamba's threshold: x above 20 passes through */
static inline float softplus_vec(float x) {
    const float sp = (x > 0.0f ? x : 0.0f) + log1p_unit(exp_vec(x > 0.0f ? -x : x));
    return x > 20.0f ? x : sp;
}

static inline float sigmoid_vec(float x) { return 1.0f / (1.0f + exp_vec(-x)); }

/* dst[t] = src[L - 1 - t] */
static inline void reverse_copy(const float *restrict src, float *restrict dst, int64_t L) {
#pragma omp simd
    for (int64_t t = 0; t < L; ++t) dst[t] = src[L - 1 - t];
}

/* dt_t for a whole row: delta_t + bias, softplus optional */
static inline void row_dt(const float *restrict delta, float bias, int softplus, float *restrict dt,
                          int64_t L) {
    if (softplus) {
#pragma omp simd
        for (int64_t t = 0; t < L; ++t) dt[t] = softplus_vec(delta[t] + bias);
    } else {
#pragma omp simd
        for (int64_t t = 0; t < L; ++t) dt[t] = delta[t] + bias;
    }
}

/* ------------------------------------------------------------------------------------------ */
/* one row; N is a compile-time constant after inlining in the common cases.                  */
/* Sums over the state (y_t = <C_t, h_t>, ...) are not reduced step by step: a horizontal sum  */
/* per step costs as much as the step. The lanes of BLOCK steps are kept and summed together. */

#define BLOCK 16

#if defined(__AVX512F__)
#include <immintrin.h>
/* out[i] = sum of the 16 lanes of v[i], i < 16, as a transpose-and-add: about 3 instructions per
 * sum instead of a 4-level horizontal reduction each. Unpacks add lanes pairwise inside 128-bit
 * blocks (v[4j..4j+3] -> w[j], block k holding the block-k sums of those four vectors); two rounds of
 * 128-bit block shuffles then add the four blocks. */
static inline __attribute__((always_inline)) void hsum16x16(const __m512 v[16], float *restrict out) {
    __m512 p[8], w[4];
    for (int j = 0; j < 8; ++j)
        p[j] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * j], v[2 * j + 1]),
                             _mm512_unpackhi_ps(v[2 * j], v[2 * j + 1]));
    for (int j = 0; j < 4; ++j) {
        const __m512d a = _mm512_castps_pd(p[2 * j]), b = _mm512_castps_pd(p[2 * j + 1]);
        w[j] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)),
                             _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
    }
    const __m512 s01 = _mm512_add_ps(_mm512_shuffle_f32x4(w[0], w[1], 0x44), _mm512_shuffle_f32x4(w[0], w[1], 0xEE));
    const __m512 s23 = _mm512_add_ps(_mm512_shuffle_f32x4(w[2], w[3], 0x44), _mm512_shuffle_f32x4(w[2], w[3], 0xEE));
    _mm512_storeu_ps(out, _mm512_add_ps(_mm512_shuffle_f32x4(s01, s23, 0x88), _mm512_shuffle_f32x4(s01, s23, 0xDD)));
}
#endif

/* out[i] = sum_n blk[i][n] for the m first steps of a block */
static inline __attribute__((always_inline)) void sum_lanes(const float *restrict blk, int64_t m,
                                                            float *restrict out, const int N) {
#if defined(__AVX512F__)
    if (m == BLOCK && BLOCK == 16 && (N == 16 || N == 32)) {
        __m512 v[16];
        for (int i = 0; i < 16; ++i) {
            v[i] = _mm512_loadu_ps(blk + i * N);
            if (N == 32) v[i] = _mm512_add_ps(v[i], _mm512_loadu_ps(blk + i * N + 16));
        }
        hsum16x16(v, out);
        return;
    }
#endif
    for (int64_t i = 0; i < m; ++i) {
        float s = 0.0f;
#pragma omp simd reduction(+ : s)
        for (int n = 0; n < N; ++n) s += blk[i * N + n];
        out[i] = s;
    }
}

static inline __attribute__((always_inline)) void fwd_row(
    const float *restrict u, const float *restrict dt, const float *restrict A,
    const float *restrict B, const float *restrict C, float *restrict y, float *restrict last,
    int64_t L, const int N) {
    float h[N], blk[BLOCK * N];
    for (int n = 0; n < N; ++n) h[n] = 0.0f;
    for (int64_t t0 = 0; t0 < L; t0 += BLOCK) {
        const int64_t m = L - t0 < BLOCK ? L - t0 : BLOCK;
        for (int64_t i = 0; i < m; ++i) {
            const int64_t t = t0 + i;
            const float dtt = dt[t], x = dtt * u[t];
            const float *restrict Bt = B + t * N, *restrict Ct = C + t * N;
            float *restrict bi = blk + i * N;
#pragma omp simd
            for (int n = 0; n < N; ++n) {
                h[n] = exp_vec(dtt * A[n]) * h[n] + x * Bt[n];
                bi[n] = Ct[n] * h[n];
            }
        }
        sum_lanes(blk, m, y + t0, N);
    }
    for (int n = 0; n < N; ++n) last[n] = h[n];
}

/* Recompute the states: hs has (L + 1) x N (row 0 = zero initial state), as has L x N.
 * Also writes y_t = <C_t, h_t> (needed for the gradient of z). */
static inline __attribute__((always_inline)) void recompute_row(
    const float *restrict u, const float *restrict dt, const float *restrict A,
    const float *restrict B, const float *restrict C, float *restrict hs, float *restrict as,
    float *restrict y, int64_t L, const int N) {
    float h[N], blk[BLOCK * N];
    for (int n = 0; n < N; ++n) h[n] = hs[n] = 0.0f;
    for (int64_t t0 = 0; t0 < L; t0 += BLOCK) {
        const int64_t m = L - t0 < BLOCK ? L - t0 : BLOCK;
        for (int64_t i = 0; i < m; ++i) {
            const int64_t t = t0 + i;
            const float dtt = dt[t], x = dtt * u[t];
            const float *restrict Bt = B + t * N, *restrict Ct = C + t * N;
            float *restrict at = as + t * N, *restrict ht = hs + (t + 1) * N, *restrict bi = blk + i * N;
#pragma omp simd
            for (int n = 0; n < N; ++n) {
                at[n] = exp_vec(dtt * A[n]);
                h[n] = at[n] * h[n] + x * Bt[n];
                ht[n] = h[n];
                bi[n] = Ct[n] * h[n];
            }
        }
        sum_lanes(blk, m, y + t0, N);
    }
}

/* Adjoint recurrence; dy = dL/dy_t. Writes du (without the D term) and ddt, accumulates
 * dB, dC (group buffers of this thread) and dA (this channel). */
static inline __attribute__((always_inline)) void adjoint_row(
    const float *restrict u, const float *restrict dt, const float *restrict A,
    const float *restrict B, const float *restrict C, const float *restrict dy,
    const float *restrict dlast, const float *restrict hs, const float *restrict as,
    float *restrict du, float *restrict ddt, float *restrict dA, float *restrict dB,
    float *restrict dC, int64_t L, const int N) {
    float g[N], dA_row[N], gB_blk[BLOCK * N], gAah_blk[BLOCK * N], gB[BLOCK], gAah[BLOCK];
    for (int n = 0; n < N; ++n) {
        g[n] = dlast ? dlast[n] : 0.0f;
        dA_row[n] = 0.0f;
    }
    for (int64_t t1 = L; t1 > 0; t1 -= BLOCK) { /* steps t1 - 1 down to t1 - m */
        const int64_t m = t1 < BLOCK ? t1 : BLOCK;
        for (int64_t i = 0; i < m; ++i) { /* g holds exp(dt_{t+1} A) g_{t+1} */
            const int64_t t = t1 - 1 - i;
            const float dtt = dt[t], dyt = dy[t], x = dtt * u[t];
            const float *restrict Bt = B + t * N, *restrict Ct = C + t * N, *restrict at = as + t * N;
            const float *restrict ht = hs + (t + 1) * N, *restrict hprev = hs + t * N;
            float *restrict dBt = dB + t * N, *restrict dCt = dC + t * N;
            float *restrict gBi = gB_blk + i * N, *restrict gAahi = gAah_blk + i * N;
#pragma omp simd
            for (int n = 0; n < N; ++n) {
                const float gn = g[n] + dyt * Ct[n];   /* dL/dh_t */
                const float w = gn * at[n] * hprev[n]; /* dL/d(dt_t A_n) */
                dCt[n] += dyt * ht[n];
                dBt[n] += gn * x;
                gBi[n] = gn * Bt[n];
                gAahi[n] = w * A[n];
                dA_row[n] += w * dtt;
                g[n] = gn * at[n];
            }
        }
        sum_lanes(gB_blk, m, gB, N);
        sum_lanes(gAah_blk, m, gAah, N);
        for (int64_t i = 0; i < m; ++i) {
            const int64_t t = t1 - 1 - i;
            du[t] = gB[i] * dt[t];
            ddt[t] = gB[i] * u[t] + gAah[i];
        }
    }
    for (int n = 0; n < N; ++n) dA[n] += dA_row[n];
}

#define DISPATCH_N(N, CALL)       \
    switch (N) {                  \
        case 4: CALL(4); break;   \
        case 8: CALL(8); break;   \
        case 16: CALL(16); break; \
        case 32: CALL(32); break; \
        case 64: CALL(64); break; \
        default: CALL(N); break;  \
    }

/* Flush denormals to zero inside the kernel only (a decayed state must not run 100x slower);
 * each thread restores its floating-point mode before leaving. */
#ifdef HAVE_MXCSR
#define FTZ_BEGIN                                   \
    const unsigned int mxcsr_saved = _mm_getcsr(); \
    _mm_setcsr(mxcsr_saved | 0x8040);
#define FTZ_END _mm_setcsr(mxcsr_saved);
#else
#define FTZ_BEGIN
#define FTZ_END
#endif

static int thread_id(void) {
#ifdef _OPENMP
    return omp_get_thread_num();
#else
    return 0;
#endif
}

static int team_size(void) {
#ifdef _OPENMP
    return omp_get_num_threads();
#else
    return 1;
#endif
}

/* ------------------------------------------------------------------------------------------ */
/* entry points                                                                               */

/* scratch floats per thread */
/* forward: dt, then the reversed row's u, delta, z, out */
int64_t muse_scan_fwd_work_floats(int64_t L) { return 5 * L; }
/* row scratch of the backward: states, decays, dt, y, dy, then the reversed row's u, delta, z,
 * dout, du, ddelta, dz */
#define BWD_ROW_FLOATS(L, N) ((2 * (L) + 1) * (N) + 10 * (L))
int64_t muse_scan_bwd_work_floats(int64_t L, int64_t N, int64_t G, int64_t dim) {
    /* dB, dC of one batch element, then one row's scratch, then private dA, dD, d(delta_bias) */
    return 2 * G * L * N + BWD_ROW_FLOATS(L, N) + dim * (N + 2);
}

void muse_scan_fwd(const float *u, const float *delta, const float *A, const float *B,
                   const float *C, const float *D, const float *z, const float *delta_bias,
                   int softplus, int reverse, float *out, float *last, float *work, int64_t batch,
                   int64_t dim, int64_t L, int64_t N, int64_t G, int nthreads) {
    const int64_t H = dim / G;
#pragma omp parallel num_threads(nthreads)
    {
        FTZ_BEGIN
        float *dt = work + (size_t)thread_id() * (size_t)muse_scan_fwd_work_floats(L);
        float *ubuf = dt + L, *deltabuf = ubuf + L, *zbuf = deltabuf + L, *obuf = zbuf + L;
#pragma omp for collapse(2) schedule(dynamic, 4)
        for (int64_t b = 0; b < batch; ++b)
            for (int64_t d = 0; d < dim; ++d) {
                const int64_t row = (b * dim + d) * L, bc = (b * G + d / H) * L * N;
                const float *ur = u + row, *dr = delta + row, *zr = z ? z + row : NULL;
                float *o = out + row;
                if (reverse) {
                    reverse_copy(ur, ubuf, L);
                    reverse_copy(dr, deltabuf, L);
                    if (zr) reverse_copy(zr, zbuf, L);
                    ur = ubuf, dr = deltabuf, zr = zr ? zbuf : NULL, o = obuf;
                }
                row_dt(dr, delta_bias ? delta_bias[d] : 0.0f, softplus, dt, L);
#define FWD_CALL(NN) fwd_row(ur, dt, A + d * N, B + bc, C + bc, o, last + (b * dim + d) * N, L, NN)
                DISPATCH_N(N, FWD_CALL)
#undef FWD_CALL
                const float Dd = D ? D[d] : 0.0f;
                if (zr) {
#pragma omp simd
                    for (int64_t t = 0; t < L; ++t) o[t] = (o[t] + Dd * ur[t]) * zr[t] * sigmoid_vec(zr[t]);
                } else if (D) {
#pragma omp simd
                    for (int64_t t = 0; t < L; ++t) o[t] += Dd * ur[t];
                }
                if (reverse) reverse_copy(obuf, out + row, L);
            }
        FTZ_END
    }
}

/* Backward of one row, given as pointers to its (L,) slices of u, delta, z (NULL when absent),
 * dout and the outputs du, ddelta, dz; A_d (N,) and bc_B/bc_C: the row's (L, N) group of B, C.
 * dB_g/dC_g: (L, N) accumulators of the row's group; dA_d (N), dD_d, dbias_d: accumulators of
 * channel d. scratch: BWD_ROW_FLOATS(L, N) floats (the reversed-row buffers are not used here). */
static void bwd_row(const float *ur, const float *dr, const float *A_d, const float *B_g,
                    const float *C_g, float Dd, const float *zr, float bias, int use_bias,
                    int softplus, const float *dor, const float *dlast_row, float *dur, float *ddr,
                    float *dzr, float *dA_d, float *dB_g, float *dC_g, float *dD_d, float *dbias_d,
                    float *scratch, int64_t L, int64_t N) {
    float *hs = scratch, *as = hs + (L + 1) * N, *dt = as + L * N, *y = dt + L, *dy = y + L;
    row_dt(dr, bias, softplus, dt, L);
#define REC_CALL(NN) recompute_row(ur, dt, A_d, B_g, C_g, hs, as, y, L, NN)
    DISPATCH_N(N, REC_CALL)
#undef REC_CALL
    /* through the gate and the skip: dy = dL/d<C_t, h_t> */
    float dD_row = 0.0f;
    if (zr) {
#pragma omp simd reduction(+ : dD_row)
        for (int64_t t = 0; t < L; ++t) {
            const float s = sigmoid_vec(zr[t]), pre = y[t] + Dd * ur[t];
            dy[t] = dor[t] * zr[t] * s;
            dzr[t] = dor[t] * pre * s * (1.0f + zr[t] * (1.0f - s));
            dD_row += dy[t] * ur[t];
        }
    } else {
#pragma omp simd reduction(+ : dD_row)
        for (int64_t t = 0; t < L; ++t) {
            dy[t] = dor[t];
            dD_row += dy[t] * ur[t];
        }
    }
#define ADJ_CALL(NN) adjoint_row(ur, dt, A_d, B_g, C_g, dy, dlast_row, hs, as, dur, ddr, dA_d, dB_g, dC_g, L, NN)
    DISPATCH_N(N, ADJ_CALL)
#undef ADJ_CALL
    if (dD_d) {
#pragma omp simd
        for (int64_t t = 0; t < L; ++t) dur[t] += Dd * dy[t];
        *dD_d += dD_row;
    }
    if (softplus) {
#pragma omp simd
        for (int64_t t = 0; t < L; ++t) {
            const float x = dr[t] + bias;
            ddr[t] *= x > 20.0f ? 1.0f : sigmoid_vec(x);
        }
    }
    if (use_bias) {
        float s = 0.0f;
#pragma omp simd reduction(+ : s)
        for (int64_t t = 0; t < L; ++t) s += ddr[t];
        *dbias_d += s;
    }
}

/* bwd_row for row (b, d) of the full tensors, through reversed copies when `reverse` */
static void bwd_row_at(const float *u, const float *delta, const float *A, const float *B,
                       const float *C, const float *D, const float *z, const float *delta_bias,
                       int softplus, int reverse, const float *dout, const float *dlast, float *du,
                       float *ddelta, float *dz, float *dA_d, float *dB_g, float *dC_g, float *dD_d,
                       float *dbias_d, float *scratch, int64_t b, int64_t d, int64_t dim, int64_t L,
                       int64_t N, int64_t G) {
    const int64_t row = (b * dim + d) * L, bc = (b * G + d / (dim / G)) * L * N;
    const float *ur = u + row, *dr = delta + row, *zr = z ? z + row : NULL, *dor = dout + row;
    float *dur = du + row, *ddr = ddelta + row, *dzr = dz ? dz + row : NULL;
    float *rbuf = scratch + (2 * L + 1) * N + 3 * L; /* 7 L floats for a reversed row */
    if (reverse) {
        reverse_copy(ur, rbuf, L);
        reverse_copy(dr, rbuf + L, L);
        if (zr) reverse_copy(zr, rbuf + 2 * L, L);
        reverse_copy(dor, rbuf + 3 * L, L);
        ur = rbuf, dr = rbuf + L, zr = zr ? rbuf + 2 * L : NULL, dor = rbuf + 3 * L;
        dur = rbuf + 4 * L, ddr = rbuf + 5 * L, dzr = dzr ? rbuf + 6 * L : NULL;
    }
    bwd_row(ur, dr, A + d * N, B + bc, C + bc, D ? D[d] : 0.0f, zr,
            delta_bias ? delta_bias[d] : 0.0f, delta_bias != NULL, softplus, dor,
            dlast ? dlast + (b * dim + d) * N : NULL, dur, ddr, dzr, dA_d, dB_g, dC_g, D ? dD_d : NULL,
            dbias_d, scratch, L, N);
    if (reverse) {
        reverse_copy(dur, du + row, L);
        reverse_copy(ddr, ddelta + row, L);
        if (dzr) reverse_copy(dzr, dz + row, L);
    }
}

/* Gradients of every input; dD, dz, ddelta_bias are skipped when the input is NULL.
 * With at least as many batch elements as threads, each thread takes whole batch elements
 * (dynamically): it owns their dB/dC, keeps private dA/dD/d(delta_bias), and never waits at a
 * barrier (a busy machine that deschedules one thread does not stall the others). Otherwise the
 * channels of each batch element are split over the threads, with per-thread dB/dC buffers
 * summed after every batch element. */
void muse_scan_bwd(const float *u, const float *delta, const float *A, const float *B,
                   const float *C, const float *D, const float *z, const float *delta_bias,
                   int softplus, int reverse, const float *dout, const float *dlast, float *du,
                   float *ddelta, float *dA, float *dB, float *dC, float *dD, float *dz, float *ddelta_bias,
                   float *work, int64_t batch, int64_t dim, int64_t L, int64_t N, int64_t G,
                   int nthreads) {
    const int64_t H = dim / G, per = G * L * N, stride = muse_scan_bwd_work_floats(L, N, G, dim);
    memset(dA, 0, sizeof(float) * (size_t)(dim * N));
    if (dD) memset(dD, 0, sizeof(float) * (size_t)dim);
    if (ddelta_bias) memset(ddelta_bias, 0, sizeof(float) * (size_t)dim);
    const int by_batch = batch >= nthreads;
#pragma omp parallel num_threads(nthreads)
    {
        FTZ_BEGIN
        const int team = team_size();
        float *mine = work + (size_t)thread_id() * (size_t)stride;
        float *scratch = mine + 2 * per, *priv = scratch + BWD_ROW_FLOATS(L, N);
        float *pA = priv, *pD = pA + dim * N, *pbias = pD + dim;
        if (by_batch) {
            memset(priv, 0, sizeof(float) * (size_t)(dim * (N + 2)));
#pragma omp for schedule(dynamic, 1) nowait
            for (int64_t b = 0; b < batch; ++b) {
                memset(dB + b * per, 0, sizeof(float) * (size_t)per);
                memset(dC + b * per, 0, sizeof(float) * (size_t)per);
                for (int64_t d = 0; d < dim; ++d) {
                    const int64_t grp = b * per + (d / H) * L * N;
                    bwd_row_at(u, delta, A, B, C, D, z, delta_bias, softplus, reverse, dout, dlast, du,
                               ddelta, dz, pA + d * N, dB + grp, dC + grp, pD + d, pbias + d, scratch, b, d,
                               dim, L, N, G);
                }
            }
#pragma omp critical
            {
                for (int64_t i = 0; i < dim * N; ++i) dA[i] += pA[i];
                for (int64_t i = 0; i < dim; ++i) {
                    if (dD) dD[i] += pD[i];
                    if (ddelta_bias) ddelta_bias[i] += pbias[i];
                }
            }
        } else {
            for (int64_t b = 0; b < batch; ++b) {
                memset(mine, 0, sizeof(float) * 2 * (size_t)per);
#pragma omp for schedule(dynamic, 2)
                for (int64_t d = 0; d < dim; ++d) {
                    const int64_t grp = (d / H) * L * N;
                    bwd_row_at(u, delta, A, B, C, D, z, delta_bias, softplus, reverse, dout, dlast, du,
                               ddelta, dz, dA + d * N, mine + grp, mine + per + grp, dD ? dD + d : NULL,
                               ddelta_bias ? ddelta_bias + d : NULL, scratch, b, d, dim, L, N, G);
                }
#pragma omp for schedule(static)
                for (int64_t i = 0; i < per; ++i) {
                    float sb = 0.0f, sc = 0.0f;
                    for (int k = 0; k < team; ++k) {
                        sb += work[(size_t)k * (size_t)stride + (size_t)i];
                        sc += work[(size_t)k * (size_t)stride + (size_t)per + (size_t)i];
                    }
                    dB[b * per + i] = sb;
                    dC[b * per + i] = sc;
                }
            }
        }
        FTZ_END
    }
}

/* ------------------------------------------------------------------------------------------ */
/* depthwise causal conv1d (+ SiLU)                                                            */
/*                                                                                            */
/* x, out, dout, dx: (batch, dim, L); w, dw: (dim, W); bias, dbias: (dim,) or NULL.            */
/*   causal  (reverse = 0): pre_t = bias + sum_k w_k x_{t - (W-1) + k}                         */
/*   reverse (reverse = 1): pre_t = bias + sum_k w_k x_{t + (W-1) - k}                         */
/*   out_t = silu(pre_t) when silu, else pre_t; out-of-range x are 0.                          */
/* One pass over the row per tap keeps the inner loop a plain vectorisable axpy.               */

static void conv_row(const float *restrict x, const float *restrict w, float bias, int reverse,
                     float *restrict pre, int64_t L, int64_t W) {
#pragma omp simd
    for (int64_t t = 0; t < L; ++t) pre[t] = bias;
    for (int64_t k = 0; k < W; ++k) {
        const int64_t shift = W - 1 - k;
        if (shift >= L) continue;
        const float wk = w[k];
        if (reverse) {
#pragma omp simd
            for (int64_t t = 0; t < L - shift; ++t) pre[t] += wk * x[t + shift];
        } else {
#pragma omp simd
            for (int64_t t = shift; t < L; ++t) pre[t] += wk * x[t - shift];
        }
    }
}

void muse_conv_fwd(const float *x, const float *w, const float *bias, int silu, int reverse, float *out,
                   int64_t batch, int64_t dim, int64_t L, int64_t W, int nthreads) {
#pragma omp parallel for collapse(2) schedule(static) num_threads(nthreads)
    for (int64_t b = 0; b < batch; ++b)
        for (int64_t d = 0; d < dim; ++d) {
            const int64_t row = (b * dim + d) * L;
            float *restrict o = out + row;
            conv_row(x + row, w + d * W, bias ? bias[d] : 0.0f, reverse, o, L, W);
            if (silu) {
#pragma omp simd
                for (int64_t t = 0; t < L; ++t) o[t] *= sigmoid_vec(o[t]);
            }
        }
}

/* scratch floats per thread of the conv backward */
int64_t muse_conv_bwd_work_floats(int64_t L) { return L; }

/* Each thread owns whole channels (all batch elements of them), so dw and dbias need no reduction. */
void muse_conv_bwd(const float *x, const float *w, const float *bias, int silu, int reverse,
                   const float *dout, float *dx, float *dw, float *dbias, float *work, int64_t batch,
                   int64_t dim, int64_t L, int64_t W, int nthreads) {
#pragma omp parallel num_threads(nthreads)
    {
        float *restrict dpre = work + (size_t)thread_id() * (size_t)muse_conv_bwd_work_floats(L);
#pragma omp for schedule(static)
        for (int64_t d = 0; d < dim; ++d) {
            const float *restrict wd = w + d * W;
            float *restrict dwd = dw + d * W;
            float db = 0.0f;
            for (int64_t k = 0; k < W; ++k) dwd[k] = 0.0f;
            for (int64_t b = 0; b < batch; ++b) {
                const int64_t row = (b * dim + d) * L;
                const float *restrict xr = x + row, *restrict dor = dout + row;
                float *restrict dxr = dx + row;
                if (silu) { /* recompute the pre-activation, then d silu(p) / dp = s (1 + p (1 - s)) */
                    conv_row(xr, wd, bias ? bias[d] : 0.0f, reverse, dpre, L, W);
#pragma omp simd
                    for (int64_t t = 0; t < L; ++t) {
                        const float p = dpre[t], s = sigmoid_vec(p);
                        dpre[t] = dor[t] * s * (1.0f + p * (1.0f - s));
                    }
                } else {
                    memcpy(dpre, dor, sizeof(float) * (size_t)L);
                }
                float sb = 0.0f;
#pragma omp simd reduction(+ : sb)
                for (int64_t t = 0; t < L; ++t) sb += dpre[t];
                db += sb;
#pragma omp simd
                for (int64_t t = 0; t < L; ++t) dxr[t] = 0.0f;
                for (int64_t k = 0; k < W; ++k) {
                    const int64_t shift = W - 1 - k;
                    if (shift >= L) continue;
                    const float wk = wd[k];
                    float sw = 0.0f;
                    if (reverse) { /* pre_t += w_k x_{t + shift} */
#pragma omp simd reduction(+ : sw)
                        for (int64_t t = 0; t < L - shift; ++t) {
                            sw += dpre[t] * xr[t + shift];
                            dxr[t + shift] += wk * dpre[t];
                        }
                    } else { /* pre_t += w_k x_{t - shift} */
#pragma omp simd reduction(+ : sw)
                        for (int64_t t = shift; t < L; ++t) {
                            sw += dpre[t] * xr[t - shift];
                            dxr[t - shift] += wk * dpre[t];
                        }
                    }
                    dwd[k] += sw;
                }
            }
            if (dbias) dbias[d] = db;
        }
    }
}

/* Dropout with a counter-based mask (muse_dropout)
 *
 * Element i of a call with seed s is kept iff the high 32 bits of splitmix64(s + (i + 1) * golden)
 * are >= threshold, and a kept element is multiplied by scale. The mask depends only on (s, i), not
 * on the thread count; the backward calls the same function on the gradient with the same seed,
 * so the mask is recomputed, never stored. */
static inline uint64_t splitmix64(uint64_t z) {
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

void muse_dropout(const float *x, float *out, int64_t n, uint64_t seed, uint32_t threshold, float scale,
                  int nthreads) {
#pragma omp parallel for simd schedule(static) num_threads(nthreads)
    for (int64_t i = 0; i < n; ++i) {
        const uint64_t counter = seed + (uint64_t)(i + 1) * 0x9e3779b97f4a7c15ULL;
        const uint32_t r = (uint32_t)(splitmix64(counter) >> 32);
        out[i] = r >= threshold ? x[i] * scale : 0.0f;
    }
}
