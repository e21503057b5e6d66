// The greedy choice of each row of fp32 logits [N, V] on the CPU: argmax (the first index among ties) and its
// log-probability logits[i] - logsumexp(logits), in two vectorised passes over the row (max with its index, then
// the sum of exp(x - max)) instead of torch's argmax plus a logsumexp of four ops. Rows run in parallel. A row
// with a NaN or +inf (or only -inf) gets a NaN log-probability here: the caller then runs the reference for the
// whole batch. -inf entries (masked tokens) are fine.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <cmath>
#include <limits>
#include <tuple>

#include "cpu_vec.h"

static void greedy_row(const float* x, int64_t n, int64_t* id, float* logprob) {
  const float lowest = -std::numeric_limits<float>::infinity(), highest = -lowest;
  vec best = (vec){} + lowest;
  ivec where = (ivec){}, bad = (ivec){};
  const ivec lane = lane_ids();
  int64_t i = 0;
  for (; i + LANES <= n && i + LANES <= INT32_MAX; i += LANES) {  // per lane: the first maximum
    const vec v = load(x + i);
    bad |= (v != v) | (v == highest);
    const ivec more = v > best;
    best = more ? v : best;
    where = more ? lane + static_cast<int32_t>(i) : where;
  }
  float mx = lowest;
  int64_t at = 0;
  for (int l = 0; l < LANES; l++)
    if (best[l] > mx || (best[l] == mx && where[l] < at)) mx = best[l], at = where[l];
  bool finite = true;
  for (int l = 0; l < LANES; l++) finite &= bad[l] == 0;
  for (; i < n; i++) {
    finite &= !std::isnan(x[i]) && x[i] != highest;
    if (x[i] > mx) mx = x[i], at = i;
  }
  vec vsum = (vec){};
  for (i = 0; i + LANES <= n; i += LANES) vsum += vexp(load(x + i) - mx);
  float sum = lane_sum(vsum);
  for (; i < n; i++) sum += vexp((vec){} + (x[i] - mx))[0];
  *id = at;
  *logprob = finite && mx != lowest ? -std::log(sum) : std::numeric_limits<float>::quiet_NaN();
}

std::tuple<at::Tensor, at::Tensor> greedy_sample(const at::Tensor& logits) {
  const int64_t rows = logits.size(0), n = logits.size(1);
  at::Tensor ids = at::empty({rows}, logits.options().dtype(at::kLong));
  at::Tensor logprobs = at::empty({rows}, logits.options());
  const float* xp = logits.data_ptr<float>();
  int64_t* ip = ids.data_ptr<int64_t>();
  float* lp = logprobs.data_ptr<float>();
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; r++) greedy_row(xp + r * n, n, ip + r, lp + r);
  });
  return {ids, logprobs};
}
