// Shared by the CPU kernels (cpu_linear.cpp, cpu_fused.cpp): the vector type of the
// machine the extension is built for (GCC/Clang vector extensions: AVX-512, AVX2 or 128-bit lanes), unaligned
// loads and stores, a lane sum and a vectorised e^x.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__AVX512F__)
constexpr int LANES = 16;
#elif defined(__AVX__)
constexpr int LANES = 8;
#else
constexpr int LANES = 4;
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
