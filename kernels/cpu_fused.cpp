// The element-wise ops around a CPU layer's matmuls, one pass each (fp32): RMSNorm with the residual add,
// the gated activations, the neox rotary. torch runs each as 3-8 ops with a tensor written and read back
// between them; on a 2-core machine those ops were ~12 % of a served step (BENCHMARKS.md). The arithmetic
// is the reference's (kernels/reference.py), vectorised: exp is a Cephes polynomial (~1 ulp), sums run
// over vector lanes, so results differ from torch's in the last bits.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>

#include <cmath>
#include <tuple>

#include "cpu_vec.h"

// ---- RMSNorm ------------------------------------------------------------------------------------
// out = w' * (s / sqrt(mean(s^2) + eps)), s = x (+ residual, also returned), w' = w (+ 1 for gemma)
std::tuple<at::Tensor, at::Tensor> rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps,
                                            const c10::optional<at::Tensor>& residual, bool gemma) {
  const int64_t n = x.size(-1), rows = x.numel() / n;
  at::Tensor out = at::empty_like(x);
  at::Tensor sum = residual.has_value() ? at::empty_like(x) : at::Tensor();
  const float* xp = x.data_ptr<float>();
  const float* rp = residual.has_value() ? residual->data_ptr<float>() : nullptr;
  const float* wp = weight.data_ptr<float>();
  float* op = out.data_ptr<float>();
  float* sp = rp ? sum.data_ptr<float>() : nullptr;
  const float add = gemma ? 1.f : 0.f;
  at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / n), [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; row++) {
      const float* s = xp + row * n;
      if (rp) {  // s = x + residual, kept for the next layer
        float* dst = sp + row * n;
        int64_t i = 0;
        for (; i + LANES <= n; i += LANES) store(dst + i, load(s + i) + load(rp + row * n + i));
        for (; i < n; i++) dst[i] = s[i] + rp[row * n + i];
        s = dst;
      }
      vec acc = (vec){};
      int64_t i = 0;
      for (; i + LANES <= n; i += LANES) {
        vec v = load(s + i);
        acc += v * v;
      }
      float ss = lane_sum(acc);
      for (; i < n; i++) ss += s[i] * s[i];
      const float inv = 1.f / std::sqrt(ss / n + static_cast<float>(eps));
      float* o = op + row * n;
      for (i = 0; i + LANES <= n; i += LANES) store(o + i, (load(wp + i) + add) * (load(s + i) * inv));
      for (; i < n; i++) o[i] = (wp[i] + add) * (s[i] * inv);
    }
  });
  return {out, sum};
}

// ---- gated activations: act(gate) * up for x = [gate | up] on the last dim ------------------------
static inline vec silu(vec g) { return g / (1.f + vexp(-g)); }
static inline vec gelu_tanh(vec g) {  // g (1 + tanh u) / 2 = g sigmoid(2u): no cancellation as tanh u -> -1
  vec u = 0.7978845608028654f * (g + 0.044715f * g * g * g);
  return g / (1.f + vexp(-2.f * u));
}

at::Tensor gated_activation(const at::Tensor& x, const std::string& activation) {
  const int64_t two_f = x.size(-1), f = two_f / 2, rows = x.numel() / two_f;
  auto sizes = x.sizes().vec();
  sizes.back() = f;
  at::Tensor out = at::empty(sizes, x.options());
  const float* xp = x.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const bool is_silu = activation == "silu";
  TORCH_CHECK(is_silu || activation == "gelu_tanh", "activation ", activation, ": silu or gelu_tanh expected");
  at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / f), [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; row++) {
      const float* g = xp + row * two_f;
      const float* u = g + f;
      float* o = op + row * f;
      int64_t i = 0;
      for (; i + LANES <= f; i += LANES) {
        vec gv = load(g + i);
        store(o + i, (is_silu ? silu(gv) : gelu_tanh(gv)) * load(u + i));
      }
      for (; i < f; i++) {
        vec gv = (vec){} + g[i];
        o[i] = (is_silu ? silu(gv) : gelu_tanh(gv))[0] * u[i];
      }
    }
  });
  return out;
}

// ---- neox rotary: x [T, H, D] (D contiguous, any T / H strides) by cos / sin [T, D/2] --------------
at::Tensor rotary(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  const int64_t t = x.size(0), h = x.size(1), d = x.size(2), half = d / 2;
  const int64_t st = x.stride(0), sh = x.stride(1);
  at::Tensor out = at::empty({t, h, d}, x.options());
  const float* xp = x.data_ptr<float>();
  const float* cp = cos.data_ptr<float>();
  const float* sp = sin.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, t * h, std::max<int64_t>(1, 16384 / d), [&](int64_t begin, int64_t end) {
    for (int64_t th = begin; th < end; th++) {
      const int64_t ti = th / h, hi = th % h;
      const float* x1 = xp + ti * st + hi * sh;
      const float* x2 = x1 + half;
      const float* c = cp + ti * half;
      const float* s = sp + ti * half;
      float* o = op + th * d;
      int64_t i = 0;
      for (; i + LANES <= half; i += LANES) {
        vec a = load(x1 + i), b = load(x2 + i), cv = load(c + i), sv = load(s + i);
        store(o + i, a * cv - b * sv);
        store(o + half + i, b * cv + a * sv);
      }
      for (; i < half; i++) {
        o[i] = x1[i] * c[i] - x2[i] * s[i];
        o[half + i] = x2[i] * c[i] + x1[i] * s[i];
      }
    }
  });
  return out;
}
