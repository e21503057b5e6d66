// Shared by the CPU kernels (cpu_linear.cpp, cpu_fused.cpp, cpu_attention.cpp, cpu_prefill.cpp, cpu_sampling.cpp):
// the vector type of the machine the extension is built for (GCC/Clang vector extensions: AVX-512, AVX2 or 128-bit
// lanes) and its register count (for the kernels' register tiles), unaligned loads and stores, lane sums, a vectorised e^x and an attention row's softmax.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__AVX512F__)
constexpr int LANES = 16, REGS = 32;  // zmm
#elif defined(__AVX__)
constexpr int LANES = 8, REGS = 16;  // ymm
#else
constexpr int LANES = 4, REGS = 32;  // 128-bit (NEON: 32 registers)
#endif

typedef float vec __attribute__((vector_size(LANES * sizeof(float))));
typedef int32_t ivec __attribute__((vector_size(LANES * sizeof(int32_t))));

static inline vec load(const float* p) {
  vec v;
  std::memcpy(&v, p, sizeof(vec));
  return v;
}
static inline void store(float* p, vec v) { std::memcpy(p, &v, sizeof(vec)); }

// e^x (Cephes expf: x = n ln2 + r, |r| <= ln2 / 2, a degree-6 polynomial in r, times 2^n)
static inline vec vexp(vec x) {
  const vec hi = (vec){} + 88.3762626647949f, lo = (vec){} - 87.3365478515625f, half = (vec){} + 0.5f;
  x = x < hi ? x : hi;
  x = x > lo ? x : lo;
  vec fx = x * 1.44269504088896341f;
  ivec n = __builtin_convertvector(fx + (fx >= 0.f ? half : -half), ivec);  // rounded to nearest
  vec nf = __builtin_convertvector(n, vec);
  vec r = x - nf * 0.693359375f + nf * 2.12194440e-4f;
  vec y = 1.9875691500e-4f + (vec){};
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * r * r + r + 1.f;
  ivec bits = (n + 127) << 23;
  vec scale;
  std::memcpy(&scale, &bits, sizeof(vec));
  return y * scale;
}

static inline float lane_sum(vec v) {
  float s = 0.f;
  for (int l = 0; l < LANES; l++) s += v[l];
  return s;
}

// The lane sums of 4 vectors (AVX-512: a shuffle tree instead of 4 x 16 scalar adds).
static inline void sums4(const vec* a, float* s) {
#if defined(__AVX512F__)
  vec c01 = __builtin_shufflevector(a[0], a[1], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
            __builtin_shufflevector(a[0], a[1], 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
  vec c23 = __builtin_shufflevector(a[2], a[3], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
            __builtin_shufflevector(a[2], a[3], 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
  vec d = __builtin_shufflevector(c01, c23, 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27) +
          __builtin_shufflevector(c01, c23, 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31);
  vec e = d + __builtin_shufflevector(d, d, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13);
  vec f = e + __builtin_shufflevector(e, e, 1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14);
  s[0] = f[0], s[1] = f[4], s[2] = f[8], s[3] = f[12];
#else
  for (int j = 0; j < 4; j++) s[j] = lane_sum(a[j]);
#endif
}

// 0, 1, .., LANES - 1
static inline ivec lane_ids() {
  ivec lane;
  for (int l = 0; l < LANES; l++) lane[l] = l;
  return lane;
}

// An attention row: s[:n] <- exp(sc * s[:n] - max) and zeros in s[n:nk] (nk >= n, a multiple of LANES: whole vectors
// throughout); returns 1 / the sum, the normalisation the caller applies to its output.
static inline float softmax_in_place(float* s, int64_t n, int64_t nk, float sc) {
  vec vm = (vec){} + s[0] * sc;
  int64_t j = 0;
  for (; j + LANES <= n; j += LANES) {
    const vec x = load(s + j) * sc;
    vm = x > vm ? x : vm;
  }
  float mx = vm[0];
  for (int l = 1; l < LANES; l++) mx = vm[l] > mx ? vm[l] : mx;
  for (; j < n; j++) mx = s[j] * sc > mx ? s[j] * sc : mx;
  const ivec lane = lane_ids();
  vec vsum = (vec){};
  for (j = 0; j < n; j += LANES) {  // the lanes past n get 0
    const vec e = vexp(load(s + j) * sc - mx);
    const vec p = lane + static_cast<int32_t>(j) < static_cast<int32_t>(n) ? e : (vec){};
    store(s + j, p);
    vsum += p;
  }
  for (; j < nk; j += LANES) store(s + j, (vec){});
  return 1.f / lane_sum(vsum);
}
