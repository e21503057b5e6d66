// y = x @ w^T for the few rows of a CPU decode step (fp32; x [M, K], w [N, K], both row-major).
//
// MKL re-reads the weights for every few rows at small M (on a 2-core Xeon, 16 rows cost 2.4x one row);
// this kernel reads them from memory once at any M. A tile of NR weight rows (NR * K floats, in L1) meets
// the rows of x MR at a time: MR * NR vector accumulators, one FMA per (row, weight row) per vector of
// K, then one horizontal sum each. While a tile runs, the next tile's rows are prefetched into L2, so
// the weight stream overlaps the FMAs. The threads split the weight rows (ATen's parallel_for, torch's
// intra-op threads).
//
// Summation order: vector lanes over K, then a tree over the lanes: not MKL's order, so results differ
// from F.linear in the last bits (~1e-7 relative), as any two GEMM libraries do.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include "cpu_vec.h"

#if defined(__AVX512F__)
constexpr int MR = 6, NR = 4;  // 24 zmm accumulators + 4 weight vectors of 32 registers
#elif defined(__AVX__)
constexpr int MR = 2, NR = 4;  // 16 ymm registers
#else
constexpr int MR = 6, NR = 4;  // 128-bit vectors (NEON: 32 registers)
#endif

// y[m, j] = x[m, :] . w[j, :] for m < R, j < C (R <= MR, C <= NR); pf: the next tile's weight rows
template <int R, int C>
static inline void tile(const float* __restrict x, const float* __restrict w, float* __restrict y, int64_t K,
                        int64_t N, const float* pf) {
  vec acc[R][C];
  for (int i = 0; i < R; i++)
    for (int j = 0; j < C; j++) acc[i][j] = (vec){};
  int64_t k = 0;
  for (; k + LANES <= K; k += LANES) {
    vec wv[C];
    for (int j = 0; j < C; j++) std::memcpy(&wv[j], w + j * K + k, sizeof(vec));
    if (pf)
      for (int j = 0; j < C; j++) __builtin_prefetch(pf + j * K + k, 0, 2);
    for (int i = 0; i < R; i++) {
      vec xv;
      std::memcpy(&xv, x + i * K + k, sizeof(vec));
      for (int j = 0; j < C; j++) acc[i][j] += xv * wv[j];
    }
  }
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

// All M rows of x against C weight rows: MR rows at a time, then the remainder (prefetching only once).
template <int C>
static void all_rows(const float* x, const float* w, float* y, int64_t M, int64_t K, int64_t N, const float* pf) {
  int64_t m = 0;
  for (; m + MR <= M; m += MR, pf = nullptr) tile<MR, C>(x + m * K, w, y + m * N, K, N, pf);
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
