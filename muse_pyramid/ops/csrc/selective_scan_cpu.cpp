// Selective scan on the CPU, fused: the semantics of mamba_ssm's selective_scan_fn in one pass per
// channel, with the state in registers.
//
// The optional CPU kernel of the "torch" backend (muse_pyramid/ops/_cpu_kernel.py builds it on first
// use, registers its fake and autograd, and falls back to the PyTorch path when it cannot). For fp32,
// per (batch b, channel d), with B and C shared by the H channels of a group:
//
//   dt[t]   = softplus(delta[t] + delta_bias[d])                   (each part optional)
//   h[t, n] = exp(dt[t] A[n]) h[t-1, n] + dt[t] u[t] B[t, n]         (h[-1] = 0)
//   y[t]    = sum_n C[t, n] h[t, n]
//   out[t]  = (y[t] + D[d] u[t]) * silu(z[t])                        (each part optional)
//
// Layouts (all contiguous):
//   u, delta, z, out and their gradients: (batch, dim, L); A, dA: (dim, N); D, delta_bias: (dim,);
//   Bt, Ct, dBt, dCt: (batch, G, L, N), time-major so that one step's N values are adjacent;
//   last, dlast: (batch, dim, N); starts: (J, batch, dim, N), the state before each block of `steps`.
//
// The forward keeps only the block start states. The backward goes through the blocks from the last,
// recomputes a block's decays and states into a per-task buffer and runs the adjoint
//   g[t] = C[t] dy[t] + a[t+1] g[t+1]
// carrying g from block to block. Work is split into tasks (b, g, p): channel slice p of group g of
// video b, run with at::parallel_for on PyTorch's own intra-op threads. Sums over channels (dB, dC)
// and over videos (dA, dD, d delta_bias) go through per-slice / per-video buffers added in a fixed
// order, so results do not depend on the number of threads. Only decays exp(dt A) are multiplied in.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <optional>
#include <tuple>
#include <vector>

#include "simd.h"

namespace {

using namespace muse_pyramid_cpu;
using OptTensor = std::optional<at::Tensor>;

// ---------------------------------------------------------------------------------------------
// one channel's state

// The state of one channel: N = 16 floats, held as K = 2 values of an 8-float GCC vector type (one
// AVX2 register each, or two SSE ones). Wider vectors gain nothing here: the two halves are
// independent, and 256-bit operations run at full rate on current x86 cores.
constexpr int64_t N = 16, K = N / W;

// the N values at p as K vectors, and back
struct State {
  vf v[K];
};

inline State load(const float* p) {
  State s;
  for (int64_t k = 0; k < K; ++k) s.v[k] = load_vf(p + k * W);
  return s;
}

inline void store(float* p, const State& s) {
  for (int64_t k = 0; k < K; ++k) store_vf(p + k * W, s.v[k]);
}

// The sums of W consecutive W-float rows at p, as one vector: out[i] = sum_k p[i * W + k]. With AVX,
// a transpose-and-add tree (7 operations for 8 sums) instead of 8 horizontal sums.
inline vf sum_rows(const float* p) {
  static_assert(W == 8, "sum_rows is written for 8-float vectors");
#if defined(__AVX__)
  __m256 v[W];
  for (int64_t i = 0; i < W; ++i) v[i] = _mm256_loadu_ps(p + i * W);
  const __m256 a = _mm256_hadd_ps(_mm256_hadd_ps(v[0], v[1]), _mm256_hadd_ps(v[2], v[3]));
  const __m256 b = _mm256_hadd_ps(_mm256_hadd_ps(v[4], v[5]), _mm256_hadd_ps(v[6], v[7]));
  const __m256 sum = _mm256_add_ps(_mm256_permute2f128_ps(a, b, 0x20), _mm256_permute2f128_ps(a, b, 0x31));
  vf out;
  std::memcpy(&out, &sum, sizeof(out));
  return out;
#else
  vf out;
  for (int64_t i = 0; i < W; ++i) out[i] = hsum(get<vf>(p, i * W));
  return out;
#endif
}

// out[t] = sum_k rows[t * W + k] for t < n: the per-step sums of vectors a loop stored without summing
inline void sum_steps(const float* __restrict rows, float* __restrict out, int64_t n) {
  int64_t t = 0;
  for (; t + W <= n; t += W) put(out, t, sum_rows(rows + t * W));
  for (; t < n; ++t) out[t] = hsum(get<vf>(rows, t * W));
}

// ---------------------------------------------------------------------------------------------
// sizes, checks, tasks

struct Sizes {
  int64_t batch, dim, L, G, H, steps, blocks, parts;
};

Sizes sizes_of(const at::Tensor& u, const at::Tensor& A, const at::Tensor& Bt, int64_t steps) {
  TORCH_CHECK(u.dim() == 3 && A.dim() == 2 && Bt.dim() == 4, "selective_scan_cpu: bad ranks");
  TORCH_CHECK(steps > 0, "selective_scan_cpu: steps must be positive, got ", steps);
  Sizes s{};
  s.batch = u.size(0);
  s.dim = u.size(1);
  s.L = u.size(2);
  TORCH_CHECK(A.size(1) == N, "selective_scan_cpu: the kernel is built for N = ", N, " states, got ", A.size(1));
  s.G = Bt.size(1);
  TORCH_CHECK(s.G > 0 && s.dim % s.G == 0, "selective_scan_cpu: dim ", s.dim, " not divisible by G ", s.G);
  s.H = s.dim / s.G;
  s.steps = steps;
  s.blocks = (s.L + steps - 1) / steps;
  // about kTasks tasks, never more than one per channel; fixed by the sizes alone (not the thread
  // count), so that the order of the sums over channel slices, and with it every bit of the result,
  // is the same on any number of threads
  constexpr int64_t kTasks = 64;
  const int64_t videos = std::max<int64_t>(s.batch * s.G, 1);
  s.parts = std::max<int64_t>(1, std::min(s.H, (kTasks + videos - 1) / videos));
  return s;
}

void check_tensor(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.is_contiguous(),
              "selective_scan_cpu: `", name, "` must be a contiguous fp32 CPU tensor");
}

void check_inputs(std::initializer_list<at::Tensor> tensors, std::initializer_list<const char*> names) {
  auto name = names.begin();
  for (const at::Tensor& t : tensors) check_tensor(t, *name++);
}

const float* optional_ptr(const OptTensor& t, const char* name) {
  if (!t.has_value() || !t->defined()) return nullptr;
  check_tensor(*t, name);
  return t->data_ptr<float>();
}

// task -> (b, g, first channel, end channel) with channels counted over the whole dim
inline void task_range(const Sizes& s, int64_t task, int64_t& b, int64_t& g, int64_t& d0, int64_t& d1) {
  const int64_t p = task % s.parts;
  g = (task / s.parts) % s.G;
  b = task / (s.parts * s.G);
  d0 = g * s.H + p * s.H / s.parts;
  d1 = g * s.H + (p + 1) * s.H / s.parts;
}

// the optional parts of the op, as pointers (nullptr: absent) and one channel's scalars
struct Extras {
  const float *D, *z, *bias;
  bool softplus;
};

// dt[t] = softplus(delta[t] + bias) (or without softplus) for n steps
inline void final_delta(const float* __restrict delta, float bias, bool use_softplus, float* __restrict dt,
                        int64_t n) {
  for_steps(n, [&](int64_t t, auto v) {
    const decltype(v) x = get<decltype(v)>(delta, t) + bias;
    put(dt, t, use_softplus ? softplus(x) : x);
  });
}

// final_delta, and its derivative d dt / d delta (sigmoid for softplus) into slope
inline void final_delta_and_slope(const float* __restrict delta, float bias, bool use_softplus,
                                  float* __restrict dt, float* __restrict slope, int64_t n) {
  if (!use_softplus) {
    final_delta(delta, bias, false, dt, n);
    std::fill(slope, slope + n, 1.0f);
    return;
  }
  for_steps(n, [&](int64_t t, auto v) {
    using T = decltype(v);
    const T zero = splat<T>(0.0f), x = get<T>(delta, t) + bias, e = exp_f32(x < zero ? x : -x);
    const T r = 1.0f / (1.0f + e);
    put(dt, t, (x > zero ? x : zero) + log1p_unit(e));
    put(slope, t, x >= zero ? r : e * r);
  });
}

// ---------------------------------------------------------------------------------------------
// one channel

// Forward over the whole sequence. scratch: L * (W + 1) floats (final delta, per-step partial sums of y).
void forward_channel(const float* __restrict ur, const float* __restrict deltar, const float* __restrict zr,
                     const float* __restrict Ad, float Dd, float bias, bool softplus, const float* __restrict Bg,
                     const float* __restrict Cg, float* __restrict outr, float* __restrict starts,
                     int64_t starts_stride, float* __restrict last, int64_t L, int64_t S,
                     float* __restrict scratch) {
  float* __restrict dt = scratch;
  float* __restrict y_rows = scratch + L;
  final_delta(deltar, bias, softplus, dt, L);
  const State A = load(Ad);
  State h{};
  for (int64_t t0 = 0; t0 < L; t0 += S) {
    store(starts + (t0 / S) * starts_stride, h);
    const int64_t t1 = std::min(L, t0 + S);
    for (int64_t t = t0; t < t1; ++t) {
      const State B = load(Bg + t * N), C = load(Cg + t * N);
      const float dtu = dt[t] * ur[t];
      vf y{};
      for (int64_t k = 0; k < K; ++k) {
        h.v[k] = exp_f32(dt[t] * A.v[k]) * h.v[k] + dtu * B.v[k];
        y += h.v[k] * C.v[k];
      }
      put(y_rows, t * W, y);
    }
  }
  store(last, h);
  sum_steps(y_rows, outr, L);
  if (zr != nullptr) {
    for_steps(L, [&](int64_t t, auto v) {
      using T = decltype(v);
      const T z = get<T>(zr, t);
      put(outr, t, (get<T>(outr, t) + Dd * get<T>(ur, t)) * silu(z));
    });
  } else if (Dd != 0.0f) {
    for_steps(L, [&](int64_t t, auto v) {
      using T = decltype(v);
      put(outr, t, get<T>(outr, t) + Dd * get<T>(ur, t));
    });
  }
}

// Pointers of one channel's backward over one block (all at the block's first step).
struct ChannelBlock {
  const float *u, *delta, *z, *dout, *A, *B, *C, *h0;
  float D, bias;
  bool softplus;
  float *carry, *du, *ddelta, *dz, *dB, *dC;  // carry: dL/dh after the block in, before it out
  float *dA, *dD, *dbias;                     // this video's rows, added to
};

// Backward of one channel over n_steps steps. work: (2 N + 3 W + 7) * n_steps floats.
void backward_channel_block(const ChannelBlock& c, int64_t n_steps, float* __restrict work) {
  float* __restrict hs = work;                     // states
  float* __restrict as = hs + n_steps * N;         // decays
  float* __restrict dt = as + n_steps * N;         // final delta
  float* __restrict dy = dt + n_steps;             // dL/dy
  float* __restrict ys = dy + n_steps;             // y, for dz
  float* __restrict sb = ys + n_steps;             // sum_n g B (dL/d(dt u))
  float* __restrict swa = sb + n_steps;            // sum_n w A
  float* __restrict slope = swa + n_steps;         // d dt / d delta
  float* __restrict sgz = slope + n_steps;         // sigmoid(z)
  float* __restrict rows = sgz + n_steps;          // per-step partial sums of sb, swa, y: W each
  const float* __restrict ur = c.u;
  const float* __restrict zr = c.z;
  final_delta_and_slope(c.delta, c.bias, c.softplus, dt, slope, n_steps);
  if (zr != nullptr) {
    for_steps(n_steps, [&](int64_t t, auto v) {
      using T = decltype(v);
      const T z = get<T>(zr, t), sg = sigmoid(z);
      put(sgz, t, sg);
      put(dy, t, get<T>(c.dout, t) * z * sg);
    });
  } else {
    std::copy(c.dout, c.dout + n_steps, dy);
  }
  // recompute the block's decays and states from its start state
  const State A = load(c.A);
  State h = load(c.h0);
  for (int64_t t = 0; t < n_steps; ++t) {
    const State B = load(c.B + t * N);
    const float dtu = dt[t] * ur[t];
    State a;
    for (int64_t k = 0; k < K; ++k) {
      a.v[k] = exp_f32(dt[t] * A.v[k]);
      h.v[k] = a.v[k] * h.v[k] + dtu * B.v[k];
    }
    store(as + t * N, a);
    store(hs + t * N, h);
  }
  // g: dL/dh_t; the carry is dL/dh at the block's last step from later blocks, already times their
  // first decay, so the block starts with a_next = 1
  State g = load(c.carry), dA{}, a_next;
  for (int64_t k = 0; k < K; ++k) a_next.v[k] = splat<vf>(1.0f);
  for (int64_t t = n_steps - 1; t >= 0; --t) {
    const float dtt = dt[t], dtu = dtt * ur[t], dyt = dy[t];
    const State B = load(c.B + t * N), C = load(c.C + t * N), a = load(as + t * N), ht = load(hs + t * N);
    const State hp = load(t > 0 ? hs + (t - 1) * N : c.h0);
    State dB = load(c.dB + t * N), dC = load(c.dC + t * N);
    vf s_b{}, s_wa{}, y{};
    for (int64_t k = 0; k < K; ++k) {
      g.v[k] = a_next.v[k] * g.v[k] + C.v[k] * dyt;  // dL/dh_t = a_{t+1} dL/dh_{t+1} + C_t dy_t
      dC.v[k] += dyt * ht.v[k];
      dB.v[k] += dtu * g.v[k];
      const vf w = g.v[k] * hp.v[k] * a.v[k];  // dL/d(dt_t A_n)
      s_b += g.v[k] * B.v[k];
      s_wa += w * A.v[k];
      y += C.v[k] * ht.v[k];
      dA.v[k] += w * dtt;
    }
    a_next = a;
    store(c.dB + t * N, dB);
    store(c.dC + t * N, dC);
    put(rows, t * W, s_b);
    put(rows, (n_steps + t) * W, s_wa);
    put(rows, (2 * n_steps + t) * W, y);
  }
  sum_steps(rows, sb, n_steps);
  sum_steps(rows + n_steps * W, swa, n_steps);
  sum_steps(rows + 2 * n_steps * W, ys, n_steps);
  for (int64_t k = 0; k < K; ++k) g.v[k] = a_next.v[k] * g.v[k];
  store(c.carry, g);
  State dA_row = load(c.dA);
  for (int64_t k = 0; k < K; ++k) dA_row.v[k] += dA.v[k];
  store(c.dA, dA_row);
  // the skip, the gate and the delta transform, step by step
  if (zr != nullptr) {
    for_steps(n_steps, [&](int64_t t, auto v) {
      using T = decltype(v);
      const T z = get<T>(zr, t), sg = get<T>(sgz, t);
      put(c.dz, t, silu_grad(z, sg, get<T>(c.dout, t) * (get<T>(ys, t) + c.D * get<T>(ur, t))));
    });
  }
  vf dD_v{}, dbias_v{};
  float dD = 0.0f, dbias = 0.0f;
  for_steps(n_steps, [&](int64_t t, auto v) {
    using T = decltype(v);
    const T dyt = get<T>(dy, t), sb_t = get<T>(sb, t), ut = get<T>(ur, t);
    const T ddt_t = sb_t * ut + get<T>(swa, t);
    put(c.du, t, sb_t * get<T>(dt, t) + c.D * dyt);
    const T grad = ddt_t * get<T>(slope, t);
    put(c.ddelta, t, grad);
    if constexpr (sizeof(T) == sizeof(vf)) {
      dD_v += dyt * ut;
      dbias_v += grad;
    } else {
      dD += dyt * ut;
      dbias += grad;
    }
  });
  dD += hsum(dD_v);
  dbias += hsum(dbias_v);
  *c.dD += dD;
  *c.dbias += dbias;
}

// ---------------------------------------------------------------------------------------------
// the ops

std::tuple<at::Tensor, at::Tensor, at::Tensor> scan_fwd(const at::Tensor& u, const at::Tensor& delta,
                                                        const at::Tensor& A, const at::Tensor& Bt,
                                                        const at::Tensor& Ct, const OptTensor& D,
                                                        const OptTensor& z, const OptTensor& delta_bias,
                                                        bool softplus, int64_t steps) {
  check_inputs({u, delta, A, Bt, Ct}, {"u", "delta", "A", "Bt", "Ct"});
  const Sizes s = sizes_of(u, A, Bt, steps);
  const Extras x{optional_ptr(D, "D"), optional_ptr(z, "z"), optional_ptr(delta_bias, "delta_bias"), softplus};
  at::Tensor out = at::empty({s.batch, s.dim, s.L}, u.options());
  at::Tensor last = at::empty({s.batch, s.dim, N}, u.options());
  at::Tensor starts = at::empty({s.blocks, s.batch, s.dim, N}, u.options());
  const float *u_p = u.data_ptr<float>(), *d_p = delta.data_ptr<float>(), *A_p = A.data_ptr<float>();
  const float *B_p = Bt.data_ptr<float>(), *C_p = Ct.data_ptr<float>();
  float *out_p = out.data_ptr<float>(), *last_p = last.data_ptr<float>(), *st_p = starts.data_ptr<float>();
  const int64_t L = s.L;
  at::parallel_for(0, s.batch * s.G * s.parts, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scratch(L * (W + 1));
    for (int64_t task = begin; task < end; ++task) {
      int64_t b, g, d0, d1;
      task_range(s, task, b, g, d0, d1);
      const int64_t bg = (b * s.G + g) * L * N;
      for (int64_t d = d0; d < d1; ++d) {
        const int64_t row = b * s.dim + d;
        forward_channel(u_p + row * L, d_p + row * L, x.z ? x.z + row * L : nullptr, A_p + d * N,
                        x.D ? x.D[d] : 0.0f, x.bias ? x.bias[d] : 0.0f, x.softplus, B_p + bg, C_p + bg,
                        out_p + row * L, st_p + row * N, s.batch * s.dim * N, last_p + row * N, L, s.steps,
                        scratch.data());
      }
    }
  });
  return {out, last, starts};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
scan_bwd(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A, const at::Tensor& Bt,
         const at::Tensor& Ct, const OptTensor& D, const OptTensor& z, const OptTensor& delta_bias, bool softplus,
         const at::Tensor& starts, const at::Tensor& dout, const at::Tensor& dlast, int64_t steps) {
  check_inputs({u, delta, A, Bt, Ct, starts, dout, dlast}, {"u", "delta", "A", "Bt", "Ct", "starts", "dout", "dlast"});
  const Sizes s = sizes_of(u, A, Bt, steps);
  const Extras x{optional_ptr(D, "D"), optional_ptr(z, "z"), optional_ptr(delta_bias, "delta_bias"), softplus};
  TORCH_CHECK(starts.numel() == s.blocks * s.batch * s.dim * N, "selective_scan_cpu: `starts` has ",
              starts.numel(), " elements, expected ", s.blocks * s.batch * s.dim * N);
  const int64_t L = s.L, S = s.steps;
  at::Tensor du = at::empty_like(u), ddelta = at::empty_like(delta);
  const bool has_z = z.has_value() && z->defined();  // (not x.z: an empty tensor's data pointer is null)
  at::Tensor dz = has_z ? at::empty_like(u) : at::empty({0}, u.options());
  at::Tensor dA_rows = at::zeros({s.batch, s.dim, N}, u.options());
  at::Tensor dD_rows = at::zeros({s.batch, s.dim}, u.options()), dbias_rows = at::zeros({s.batch, s.dim}, u.options());
  at::Tensor dBt = at::empty_like(Bt), dCt = at::empty_like(Ct);
  at::Tensor carry = dlast.clone();  // dL/dh at the end of the current block, per (b, d)
  at::Tensor part = at::empty({2, s.parts, s.batch, s.G, S, N}, u.options());  // dB, dC per task slice
  const float *u_p = u.data_ptr<float>(), *d_p = delta.data_ptr<float>(), *A_p = A.data_ptr<float>();
  const float *B_p = Bt.data_ptr<float>(), *C_p = Ct.data_ptr<float>(), *st_p = starts.data_ptr<float>();
  const float* dout_p = dout.data_ptr<float>();
  float *du_p = du.data_ptr<float>(), *dd_p = ddelta.data_ptr<float>(), *dz_p = has_z ? dz.data_ptr<float>() : nullptr;
  float *dA_p = dA_rows.data_ptr<float>(), *dD_p = dD_rows.data_ptr<float>(), *db_p = dbias_rows.data_ptr<float>();
  float *dB_p = dBt.data_ptr<float>(), *dC_p = dCt.data_ptr<float>(), *g_p = carry.data_ptr<float>();
  float* part_p = part.data_ptr<float>();
  const int64_t part_stride = s.parts * s.batch * s.G * S * N;  // dB slices, then dC slices
  for (int64_t j = s.blocks - 1; j >= 0; --j) {
    const int64_t t0 = j * S, n_steps = std::min(S, L - t0);
    part.zero_();
    at::parallel_for(0, s.batch * s.G * s.parts, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> work((2 * N + 3 * W + 7) * n_steps);
      for (int64_t task = begin; task < end; ++task) {
        int64_t b, g, d0, d1;
        task_range(s, task, b, g, d0, d1);
        const int64_t slice = ((task % s.parts) * s.batch + b) * s.G + g;
        const int64_t bg = ((b * s.G + g) * L + t0) * N;
        for (int64_t d = d0; d < d1; ++d) {
          const int64_t row = b * s.dim + d, at_t0 = row * L + t0;
          const ChannelBlock c{u_p + at_t0, d_p + at_t0, x.z ? x.z + at_t0 : nullptr, dout_p + at_t0,
                               A_p + d * N, B_p + bg, C_p + bg, st_p + (j * s.batch * s.dim + row) * N,
                               x.D ? x.D[d] : 0.0f, x.bias ? x.bias[d] : 0.0f, x.softplus,
                               g_p + row * N, du_p + at_t0, dd_p + at_t0, dz_p ? dz_p + at_t0 : nullptr,
                               part_p + slice * S * N, part_p + part_stride + slice * S * N,
                               dA_p + row * N, dD_p + row, db_p + row};
          backward_channel_block(c, n_steps, work.data());
        }
      }
    });
    // sum the task slices of dB and dC into the block's rows, in slice order
    at::parallel_for(0, s.batch * s.G, 1, [&](int64_t begin, int64_t end) {
      for (int64_t bg = begin; bg < end; ++bg) {
        for (int64_t which = 0; which < 2; ++which) {
          float* __restrict out = (which == 0 ? dB_p : dC_p) + (bg * L + t0) * N;
          const float* src = part_p + which * part_stride;
          const int64_t count = n_steps * N;
          std::copy(src + bg * S * N, src + bg * S * N + count, out);
          for (int64_t p = 1; p < s.parts; ++p) {
            const float* __restrict sp = src + (p * s.batch * s.G + bg) * S * N;
#pragma omp simd
            for (int64_t i = 0; i < count; ++i) out[i] += sp[i];
          }
        }
      }
    });
  }
  return {du, ddelta, dA_rows.sum(0), dBt, dCt, dD_rows.sum(0), dz, dbias_rows.sum(0)};
}

}  // namespace

TORCH_LIBRARY(muse_pyramid_cpu, m) {
  m.def(
      "scan_fwd(Tensor u, Tensor delta, Tensor A, Tensor Bt, Tensor Ct, Tensor? D, Tensor? z, "
      "Tensor? delta_bias, bool softplus, int steps) -> (Tensor, Tensor, Tensor)");
  m.def(
      "scan_bwd(Tensor u, Tensor delta, Tensor A, Tensor Bt, Tensor Ct, Tensor? D, Tensor? z, "
      "Tensor? delta_bias, bool softplus, Tensor starts, Tensor dout, Tensor dlast, int steps) -> "
      "(Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(muse_pyramid_cpu, CPU, m) {
  m.impl("scan_fwd", &scan_fwd);
  m.impl("scan_bwd", &scan_bwd);
}
