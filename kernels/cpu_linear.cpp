// y = x @ w^T for the few rows of a CPU decode step (fp32; x [M, K], w [N, K], both row-major).
//
// MKL re-reads the weights for every few rows at small M (on a 2-core Xeon, 16 rows cost 2.4x one row);
// this kernel reads them from memory once at any M. A tile of NR weight rows (NR * K floats, in L1) meets
// the rows of x MR at a time: MR * NR vector accumulators, one FMA per (row, weight row) per vector of
// K, then one horizontal sum each. While a tile runs, the next tile's rows are prefetched into L2, so
// the weight stream overlaps the FMAs (struct Prefetch). The threads split the weight rows (ATen's
// parallel_for, torch's intra-op threads).
//
// Summation order: vector lanes over K, then a tree over the lanes: not MKL's order, so results differ
// from F.linear in the last bits (~1e-7 relative), as any two GEMM libraries do.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include "cpu_vec.h"

// 32 registers: 24 accumulators + 4 weight vectors; 16 (AVX2): 8 + 4
constexpr int NR = 4, MR = REGS == 32 ? 6 : 2;

// Prefetches the next tile's C weight rows (C * K contiguous floats) into L2 while a tile runs, one call per
// k step of every pass over the rows of x. With one pass (M <= MR): at each k, that k of every next row (the
// order the next tile reads them in). With several: the next tile's lines in address order, spread evenly over
// all the passes' k steps, so that the weight stream keeps going while the later passes run from L1 (on a
// 2-core Xeon, SmolLM2-135M decode steps at 16 / 32 sequences ~8 / ~9 % faster than prefetching during the
// first pass only; unchanged at 1-6, where there is one pass).
template <int C>
struct Prefetch {
  const char* next;  // the next tile's first line; nullptr: nothing to prefetch
  int64_t row_bytes;
  bool spread;
  int64_t lines, steps, budget = 0;  // spread: `lines` prefetches over `steps` calls

  Prefetch(const float* next_tile, int64_t M, int64_t K)
      : next(reinterpret_cast<const char*>(next_tile)), row_bytes(K * 4), spread(M > MR), lines(C * K * 4 / 64),
        steps((M + MR - 1) / MR * (K / LANES)) {
    if (lines == 0 || steps == 0) next = nullptr;
  }

  inline void step(int64_t k) {
    if (!next) return;
    if (!spread) {
      for (int j = 0; j < C; j++) __builtin_prefetch(next + j * row_bytes + k * 4, 0, 2);
      return;
    }
    for (budget += lines; budget >= steps; budget -= steps, next += 64) __builtin_prefetch(next, 0, 2);
  }
};

// y[m, j] = x[m, :] . w[j, :] for m < R, j < C (R <= MR, C <= NR)
template <int R, int C>
static inline void tile(const float* __restrict x, const float* __restrict w, float* __restrict y, int64_t K,
                        int64_t N, Prefetch<C>& pf) {
  vec acc[R][C];
  for (int i = 0; i < R; i++)
    for (int j = 0; j < C; j++) acc[i][j] = (vec){};
  Prefetch<C> p = pf;  // a local copy, kept in registers
  int64_t k = 0;
  for (; k + LANES <= K; k += LANES) {
    vec wv[C];
    for (int j = 0; j < C; j++) std::memcpy(&wv[j], w + j * K + k, sizeof(vec));
    p.step(k);
    for (int i = 0; i < R; i++) {
      vec xv;
      std::memcpy(&xv, x + i * K + k, sizeof(vec));
      for (int j = 0; j < C; j++) acc[i][j] += xv * wv[j];
    }
  }
  pf = p;
  for (int i = 0; i < R; i++) {
    float s[C];
    if constexpr (C == 4) {
      sums4(acc[i], s);
    } else {
      for (int j = 0; j < C; j++) s[j] = lane_sum(acc[i][j]);
    }
    for (int j = 0; j < C; j++) {
      for (int64_t kk = k; kk < K; kk++) s[j] += x[i * K + kk] * w[j * K + kk];
      y[i * N + j] = s[j];
    }
  }
}

// All M rows of x against C weight rows: MR rows at a time, then the remainder; next: the next tile or nullptr.
template <int C>
static void all_rows(const float* x, const float* w, float* y, int64_t M, int64_t K, int64_t N, const float* next) {
  Prefetch<C> pf(next, M, K);
  int64_t m = 0;
  for (; m + MR <= M; m += MR) tile<MR, C>(x + m * K, w, y + m * N, K, N, pf);
  const int64_t r = M - m;
  x += m * K, y += m * N;
  if constexpr (MR > 5) { if (r == 5) return tile<5, C>(x, w, y, K, N, pf); }
  if constexpr (MR > 4) { if (r == 4) return tile<4, C>(x, w, y, K, N, pf); }
  if constexpr (MR > 3) { if (r == 3) return tile<3, C>(x, w, y, K, N, pf); }
  if constexpr (MR > 2) { if (r == 2) return tile<2, C>(x, w, y, K, N, pf); }
  if constexpr (MR > 1) { if (r == 1) return tile<1, C>(x, w, y, K, N, pf); }
}

at::Tensor small_rows_linear(const at::Tensor& x, const at::Tensor& w) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1), "x [M, K] and w [N, K] expected");
  TORCH_CHECK(x.scalar_type() == at::kFloat && w.scalar_type() == at::kFloat, "float32 expected");
  TORCH_CHECK(x.is_contiguous() && w.is_contiguous(), "contiguous x and w expected");
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  auto y = at::empty({M, N}, x.options());
  const float* xp = x.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const int64_t tiles = N / NR;
  at::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; t++)
      all_rows<NR>(xp, wp + t * NR * K, yp + t * NR, M, K, N, t + 1 < end ? wp + (t + 1) * NR * K : nullptr);
  });
  for (int64_t n = tiles * NR; n < N; n++) all_rows<1>(xp, wp + n * K, yp + n, M, K, N, nullptr);
  return y;
}
