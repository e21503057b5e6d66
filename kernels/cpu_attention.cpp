// CPU decode attention over the padded decode batch (the decode mirrors, or a gather): q [B, Hkv, G, D] against
// the first ctx[b] keys of k, v [B, S, Hkv, D]; fp32, no window, no soft-cap. One work item per (sequence, KV
// head): its K and V come from memory once and from L2 for the other G - 1 query heads. Per query head: scores
// four keys at a time (one shuffle-tree sum for four dot products), a vectorised softmax, then the weighted V
// rows into D / LANES register accumulators.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <vector>

#include "cpu_vec.h"

template <int NV>  // D = NV * LANES
static void one_head(const float* q, const float* kb, int64_t kss, const float* vb, int64_t vss, int64_t n, float sc,
                     float* scores, float* out) {
  vec qv[NV];
  for (int j = 0; j < NV; j++) qv[j] = load(q + j * LANES);
  int64_t s = 0;
  for (; s + 4 <= n; s += 4) {  // scores of keys s..s+3
    vec a[4];
    for (int t = 0; t < 4; t++) {
      const float* ks = kb + (s + t) * kss;
      a[t] = qv[0] * load(ks);
      for (int j = 1; j < NV; j++) a[t] += qv[j] * load(ks + j * LANES);
    }
    sums4(a, scores + s);
  }
  for (; s < n; s++) {
    const float* ks = kb + s * kss;
    vec a = qv[0] * load(ks);
    for (int j = 1; j < NV; j++) a += qv[j] * load(ks + j * LANES);
    scores[s] = lane_sum(a);
  }
  float mx = scores[0] * sc;  // softmax(sc * scores)
  for (s = 0; s < n; s++) mx = scores[s] * sc > mx ? scores[s] * sc : mx;
  vec vsum = (vec){};
  for (s = 0; s + LANES <= n; s += LANES) {
    const vec e = vexp(load(scores + s) * sc - mx);
    store(scores + s, e);
    vsum += e;
  }
  float sum = lane_sum(vsum);
  for (; s < n; s++) sum += (scores[s] = vexp((vec){} + (scores[s] * sc - mx))[0]);
  vec acc[NV];
  for (int j = 0; j < NV; j++) acc[j] = (vec){};
  for (s = 0; s < n; s++) {
    const float* vs = vb + s * vss;
    const float p = scores[s];
    for (int j = 0; j < NV; j++) acc[j] += p * load(vs + j * LANES);
  }
  const float inv = 1.f / sum;
  for (int j = 0; j < NV; j++) store(out + j * LANES, acc[j] * inv);
}

at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& ctx,
                            double scale) {
  const int64_t b = q.size(0), hkv = q.size(1), g = q.size(2), d = q.size(3);
  const int64_t nv = d / LANES;
  TORCH_CHECK(d % LANES == 0 && (nv == 4 || nv == 8 || nv == 16), "head_dim ", d, " is not 4, 8 or 16 vectors");
  at::Tensor out = at::empty({b, hkv, g, d}, q.options());
  const float* qp = q.data_ptr<float>();
  const float* kp = k.data_ptr<float>();
  const float* vp = v.data_ptr<float>();
  const int64_t* cp = ctx.data_ptr<int64_t>();
  float* op = out.data_ptr<float>();
  const int64_t ksb = k.stride(0), kss = k.stride(1), ksh = k.stride(2);
  const int64_t vsb = v.stride(0), vss = v.stride(1), vsh = v.stride(2);
  const float sc = static_cast<float>(scale);
  for (int64_t bi = 0; bi < b; bi++)
    TORCH_CHECK(cp[bi] >= 1 && cp[bi] <= k.size(1), "context ", cp[bi], " outside the batch's ", k.size(1), " keys");
  at::parallel_for(0, b * hkv, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores;
    for (int64_t bh = begin; bh < end; bh++) {
      const int64_t bi = bh / hkv, hi = bh % hkv, n = cp[bi];
      scores.resize(n);
      const float* kb = kp + bi * ksb + hi * ksh;
      const float* vb = vp + bi * vsb + hi * vsh;
      for (int64_t gi = 0; gi < g; gi++) {
        const float* qg = qp + (bh * g + gi) * d;
        float* og = op + (bh * g + gi) * d;
        if (nv == 4) one_head<4>(qg, kb, kss, vb, vss, n, sc, scores.data(), og);
        else if (nv == 8) one_head<8>(qg, kb, kss, vb, vss, n, sc, scores.data(), og);
        else one_head<16>(qg, kb, kss, vb, vss, n, sc, scores.data(), og);
      }
    }
  });
  return out;
}
