// Depthwise causal 1-D convolution on the CPU, with the optional SiLU fused: the semantics of
// causal_conv1d's causal_conv1d_fn, forward and backward, in one pass per channel row.
//
// The optional CPU kernel of the "torch" conv backend (muse_pyramid/ops/_cpu_kernel.py builds it with
// selective_scan_cpu.cpp, registers its fake and autograd, and falls back to F.conv1d when it
// cannot). For fp32, per video b and channel d, with width taps w[d, 0..width-1]:
//
//   pre[t] = bias[d] + sum_k w[d, k] x[t - (width - 1) + k]        (x[<0] = 0)
//   out[t] = silu(pre[t]) or pre[t]
//
// Layouts: x (batch, dim, L) with any batch and channel strides and unit time stride (a channel slice
// of a larger tensor is read in place); weight (dim, width) and bias (dim,) contiguous; out, dout and
// dx (batch, dim, L) contiguous. F.conv1d computes the same with a padded copy of the output and, for
// the backward, a zero-filled padded gradient; here the edges are handled in the loops.
//
// The backward recomputes pre[t] (no activation is saved) and forms d pre = dout * silu'(pre) in a
// per-thread row buffer. The weight and bias gradients of each (b, d) row go to (batch, dim, .) buffers
// summed over the batch at the end, so results do not depend on the number of threads.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/sum.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <tuple>
#include <vector>

#include "simd.h"

namespace {

using namespace muse_pyramid_cpu;
using OptTensor = std::optional<at::Tensor>;

// sum_t a[t] b[t] over n steps, or sum_t a[t] when b is nullptr
inline float dot(const float* __restrict a, const float* __restrict b, int64_t n) {
  vf acc{};
  int64_t t = 0;
  for (; t + W <= n; t += W) acc += b ? load_vf(a + t) * load_vf(b + t) : load_vf(a + t);
  float sum = hsum(acc);
  for (; t < n; ++t) sum += b ? a[t] * b[t] : a[t];
  return sum;
}

// rows of (batch, dim, L) per task: about 32 K steps, at least one row
inline int64_t grain(int64_t L) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(L, 1)); }

struct Conv {
  const float* x;  // (batch, dim, L), strides sb, sd, 1
  int64_t sb, sd;
  const float *w, *bias;  // (dim, width), (dim,) or nullptr
  int64_t batch, dim, L, width;
  bool activate;  // apply SiLU
  const float* row(int64_t r) const { return x + (r / dim) * sb + (r % dim) * sd; }
};

Conv conv_of(const at::Tensor& x, const at::Tensor& weight, const OptTensor& bias, bool activate) {
  TORCH_CHECK(x.dim() == 3 && weight.dim() == 2, "causal_conv1d_cpu: x must be (batch, dim, L), weight (dim, width)");
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat, "causal_conv1d_cpu: `x` must be fp32 on the CPU");
  TORCH_CHECK(x.size(2) <= 1 || x.stride(2) == 1, "causal_conv1d_cpu: `x` must have unit stride in time");
  TORCH_CHECK(weight.device().is_cpu() && weight.scalar_type() == at::kFloat && weight.is_contiguous() &&
                  weight.size(0) == x.size(1) && weight.size(1) >= 1,
              "causal_conv1d_cpu: `weight` must be a contiguous fp32 CPU (dim, width) tensor");
  const bool has_bias = bias.has_value() && bias->defined();
  if (has_bias) {
    TORCH_CHECK(bias->device().is_cpu() && bias->scalar_type() == at::kFloat && bias->is_contiguous() &&
                    bias->numel() == x.size(1),
                "causal_conv1d_cpu: `bias` must be a contiguous fp32 CPU (dim,) tensor");
  }
  return Conv{x.data_ptr<float>(), x.stride(0), x.stride(1), weight.data_ptr<float>(),
              has_bias ? bias->data_ptr<float>() : nullptr, x.size(0), x.size(1), x.size(2), weight.size(1), activate};
}

// pre[t] for t in [0, L) of row r into pre
void preactivation(const Conv& c, int64_t r, float* __restrict pre) {
  const float* __restrict x = c.row(r);
  const float* __restrict w = c.w + (r % c.dim) * c.width;
  const float b = c.bias ? c.bias[r % c.dim] : 0.0f;
  const int64_t pad = c.width - 1, head = std::min(pad, c.L);
  for (int64_t t = 0; t < head; ++t) {  // the first steps see fewer than `width` inputs
    float acc = b;
    for (int64_t k = pad - t; k < c.width; ++k) acc += w[k] * x[t - pad + k];
    pre[t] = acc;
  }
  const float* x0 = x + head - pad;  // x0[i + k] = x[t - pad + k] for t = head + i
  for_steps(c.L - head, [&](int64_t i, auto v) {
    using T = decltype(v);
    T acc = splat<T>(b);
    for (int64_t k = 0; k < c.width; ++k) acc += w[k] * get<T>(x0 + k, i);
    put(pre + head, i, acc);
  });
}

at::Tensor conv_fwd(const at::Tensor& x, const at::Tensor& weight, const OptTensor& bias, bool activate) {
  const Conv c = conv_of(x, weight, bias, activate);
  at::Tensor out = at::empty({c.batch, c.dim, c.L}, x.options().memory_format(at::MemoryFormat::Contiguous));
  float* out_p = out.data_ptr<float>();
  at::parallel_for(0, c.batch * c.dim, grain(c.L), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      float* __restrict o = out_p + r * c.L;
      preactivation(c, r, o);
      if (c.activate) {
        for_steps(c.L, [&](int64_t t, auto v) { put(o, t, silu(get<decltype(v)>(o, t))); });
      }
    }
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> conv_bwd(const at::Tensor& x, const at::Tensor& weight,
                                                        const OptTensor& bias, bool activate, const at::Tensor& dout) {
  const Conv c = conv_of(x, weight, bias, activate);
  TORCH_CHECK(dout.sizes() == x.sizes() && dout.is_contiguous() && dout.scalar_type() == at::kFloat,
              "causal_conv1d_cpu: `dout` must be a contiguous fp32 tensor shaped like `x`");
  const at::TensorOptions opts = x.options().memory_format(at::MemoryFormat::Contiguous);
  at::Tensor dx = at::empty({c.batch, c.dim, c.L}, opts);
  at::Tensor dw_rows = at::empty({c.batch, c.dim, c.width}, opts), db_rows = at::empty({c.batch, c.dim}, opts);
  const float* dout_p = dout.data_ptr<float>();
  float *dx_p = dx.data_ptr<float>(), *dw_p = dw_rows.data_ptr<float>(), *db_p = db_rows.data_ptr<float>();
  const int64_t L = c.L, pad = c.width - 1;
  at::parallel_for(0, c.batch * c.dim, grain(L), [&](int64_t begin, int64_t end) {
    std::vector<float> buffer(L);
    float* __restrict g = buffer.data();  // d pre
    for (int64_t r = begin; r < end; ++r) {
      const float* __restrict x_r = c.row(r);
      const float* __restrict w = c.w + (r % c.dim) * c.width;
      const float* __restrict dy = dout_p + r * L;
      preactivation(c, r, g);
      if (c.activate) {
        for_steps(L, [&](int64_t t, auto v) {
          using T = decltype(v);
          const T pre = get<T>(g, t);
          put(g, t, silu_grad(pre, sigmoid(pre), get<T>(dy, t)));
        });
      } else {
        std::copy(dy, dy + L, g);
      }
      // dx[t] = sum_k w[k] g[t + pad - k]: every term exists for t < L - pad
      float* __restrict dx_r = dx_p + r * L;
      const int64_t body = std::max<int64_t>(L - pad, 0);
      for_steps(body, [&](int64_t t, auto v) {
        using T = decltype(v);
        T acc = splat<T>(0.0f);
        for (int64_t k = 0; k < c.width; ++k) acc += w[k] * get<T>(g + pad - k, t);
        put(dx_r, t, acc);
      });
      for (int64_t t = body; t < L; ++t) {
        float acc = 0.0f;
        for (int64_t k = t + pad - (L - 1); k < c.width; ++k) acc += w[k] * g[t + pad - k];
        dx_r[t] = acc;
      }
      // dw[k] = sum_t g[t] x[t - pad + k] (terms with t - pad + k >= 0), d bias = sum_t g[t]
      float* dw = dw_p + r * c.width;
      for (int64_t k = 0; k < c.width; ++k) {
        const int64_t first = std::min(pad - k, L);
        dw[k] = dot(g + first, x_r + first - pad + k, L - first);
      }
      db_p[r] = dot(g, nullptr, L);
    }
  });
  at::Tensor db = c.bias ? db_rows.sum(0) : at::empty({0}, opts);
  return {dx, dw_rows.sum(0), db};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(muse_pyramid_cpu, m) {
  m.def("conv_fwd(Tensor x, Tensor weight, Tensor? bias, bool silu) -> Tensor");
  m.def("conv_bwd(Tensor x, Tensor weight, Tensor? bias, bool silu, Tensor dout) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(muse_pyramid_cpu, CPU, m) {
  m.impl("conv_fwd", &conv_fwd);
  m.impl("conv_bwd", &conv_bwd);
}
