// CPU decode attention over the padded decode batch (the decode mirrors, or a gather): q [B, Hkv, G, D] against
// the first ctx[b] keys of k, v [B, S, Hkv, D]; fp32, no window, no soft-cap; any strides with D contiguous (the
// mirrors are head-major, so each (sequence, KV head) reads its keys and values as two contiguous runs).
//
// One work item per (sequence, KV head). Its query heads go through in groups of GG (as many as the registers
// hold), and each K and V row is loaded once per group: the scores of four keys for all GG heads (one shuffle-tree
// sum per head for four dot products), a vectorised softmax per head, then each V row into GG x D / LANES register
// accumulators. The keys and values PF rows ahead are prefetched: the rows stream from memory while the FMAs run.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <vector>

#include "cpu_vec.h"

constexpr int64_t PF = 8;  // rows prefetched ahead (~2 KB at D = 64)

// query heads per group for D = NV * LANES: GG * NV accumulators and one V row (NV) in the registers, at most 4
constexpr int group_of(int nv) {
  return (REGS - 4 - nv) / nv < 1 ? 1 : ((REGS - 4 - nv) / nv > 4 ? 4 : (REGS - 4 - nv) / nv);
}

template <int NV>
static inline void prefetch_row(const float* row) {
  for (int j = 0; j < NV; j++) __builtin_prefetch(row + j * LANES, 0, 3);
}

// GG query heads q [GG, D] (contiguous) of one KV head; scores: GG rows of sstride floats
template <int NV, int GG>
static void head_group(const float* q, const float* kb, int64_t kss, const float* vb, int64_t vss, int64_t n,
                       float sc, float* scores, int64_t sstride, float* out) {
  int64_t s = 0;
  for (; s + 4 <= n; s += 4) {  // scores of keys s..s+3
    for (int t = 0; t < 4; t++) prefetch_row<NV>(kb + (s + t + PF) * kss);
    vec a[GG][4];
    for (int t = 0; t < 4; t++) {
      const float* ks = kb + (s + t) * kss;
      vec kv[NV];
      for (int j = 0; j < NV; j++) kv[j] = load(ks + j * LANES);
      for (int g = 0; g < GG; g++) {
        a[g][t] = load(q + g * NV * LANES) * kv[0];
        for (int j = 1; j < NV; j++) a[g][t] += load(q + (g * NV + j) * LANES) * kv[j];
      }
    }
    for (int g = 0; g < GG; g++) sums4(a[g], scores + g * sstride + s);
  }
  for (; s < n; s++) {
    const float* ks = kb + s * kss;
    for (int g = 0; g < GG; g++) {
      vec a = load(q + g * NV * LANES) * load(ks);
      for (int j = 1; j < NV; j++) a += load(q + (g * NV + j) * LANES) * load(ks + j * LANES);
      scores[g * sstride + s] = lane_sum(a);
    }
  }
  for (int64_t t = 0; t < PF && t < n; t++) prefetch_row<NV>(vb + t * vss);
  const int64_t nk = (n + LANES - 1) / LANES * LANES;  // <= sstride
  float inv[GG];
  for (int g = 0; g < GG; g++) inv[g] = softmax_in_place(scores + g * sstride, n, nk, sc);
  vec acc[GG][NV];
  for (int g = 0; g < GG; g++)
    for (int j = 0; j < NV; j++) acc[g][j] = (vec){};
  for (s = 0; s < n; s++) {
    const float* vs = vb + s * vss;
    prefetch_row<NV>(vs + PF * vss);
    vec vv[NV];
    for (int j = 0; j < NV; j++) vv[j] = load(vs + j * LANES);
    for (int g = 0; g < GG; g++) {
      const float p = scores[g * sstride + s];
      for (int j = 0; j < NV; j++) acc[g][j] += p * vv[j];
    }
  }
  for (int g = 0; g < GG; g++)
    for (int j = 0; j < NV; j++) store(out + (g * NV + j) * LANES, acc[g][j] * inv[g]);
}

// the last r < GG heads of a KV head
template <int NV, int GG>
static void head_rest(int64_t r, const float* q, const float* kb, int64_t kss, const float* vb, int64_t vss, int64_t n,
                      float sc, float* scores, int64_t sstride, float* out) {
  if constexpr (GG > 1) {
    if (r == GG - 1) return head_group<NV, GG - 1>(q, kb, kss, vb, vss, n, sc, scores, sstride, out);
    head_rest<NV, GG - 1>(r, q, kb, kss, vb, vss, n, sc, scores, sstride, out);
  }
}

// all g query heads of one KV head: q, out [g, D]
template <int NV>
static void kv_head(const float* q, const float* kb, int64_t kss, const float* vb, int64_t vss, int64_t n, float sc,
                    float* scores, int64_t sstride, float* out, int64_t g) {
  constexpr int GG = group_of(NV);
  constexpr int64_t d = NV * LANES;
  int64_t h = 0;
  for (; h + GG <= g; h += GG) head_group<NV, GG>(q + h * d, kb, kss, vb, vss, n, sc, scores, sstride, out + h * d);
  if (h < g) head_rest<NV, GG>(g - h, q + h * d, kb, kss, vb, vss, n, sc, scores, sstride, out + h * d);
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
  int64_t longest = 0;
  for (int64_t bi = 0; bi < b; bi++) {
    TORCH_CHECK(cp[bi] >= 1 && cp[bi] <= k.size(1), "context ", cp[bi], " outside the batch's ", k.size(1), " keys");
    longest = cp[bi] > longest ? cp[bi] : longest;
  }
  const int64_t sstride = (longest + LANES - 1) / LANES * LANES;
  at::parallel_for(0, b * hkv, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores(sstride * 4);  // a score row per head of a group (at most 4)
    for (int64_t bh = begin; bh < end; bh++) {
      const int64_t bi = bh / hkv, hi = bh % hkv, n = cp[bi];
      const float* kb = kp + bi * ksb + hi * ksh;
      const float* vb = vp + bi * vsb + hi * vsh;
      const float* qh = qp + bh * g * d;
      float* oh = op + bh * g * d;
      if (nv == 4) kv_head<4>(qh, kb, kss, vb, vss, n, sc, scores.data(), sstride, oh, g);
      else if (nv == 8) kv_head<8>(qh, kb, kss, vb, vss, n, sc, scores.data(), sstride, oh, g);
      else kv_head<16>(qh, kb, kss, vb, vss, n, sc, scores.data(), sstride, oh, g);
    }
  });
  return out;
}
