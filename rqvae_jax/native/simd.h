// Shared by the CPU kernels that use vector types (lstm_cpu.cc, weight_grad_cpu.cc,
// nearest_cpu.cc): the widest float vector this CPU's registers hold, as a GCC/Clang vector
// type, and the double, integer and 16-bit vectors of the same register.
//
// Why not always 16 floats: without AVX-512 the compiler lowers a 64-byte vector type piece
// by piece through memory; compiled for AVX2 (-march=haswell on the AMX Xeon, 2026-12-07),
// the LSTM kernel's 16-float tiles took 165 ms per direction and layer where 8-float ones
// take ~15.
#ifndef RQVAE_JAX_NATIVE_SIMD_H_
#define RQVAE_JAX_NATIVE_SIMD_H_

#include <cstdint>
#include <cstring>
#if defined(__AVX__)
#include <immintrin.h>
#endif

namespace rqvae_native {

#if defined(__AVX512F__)
constexpr int kLanes = 16;
#elif defined(__AVX__)
constexpr int kLanes = 8;
#else
constexpr int kLanes = 4;
#endif

// Batch or output rows a register tile may hold: 2 x rows accumulators plus the weights'
// vectors must fit the register file (32 vector registers with AVX-512, 16 without).
constexpr int kMaxTileRows = kLanes == 16 ? 4 : 2;

typedef float VecN __attribute__((vector_size(kLanes * sizeof(float))));
typedef int32_t IntN __attribute__((vector_size(kLanes * sizeof(int32_t))));   // VecN's masks
typedef uint32_t UIntN __attribute__((vector_size(kLanes * sizeof(uint32_t))));
typedef uint16_t HalfN __attribute__((vector_size(kLanes * sizeof(uint16_t))));  // kLanes bf16

// Doubles in one register: half as many lanes. The kernels sum float32 products in double;
// `load_doubles` widens kDoubleLanes floats.
constexpr int kDoubleLanes = kLanes / 2;
typedef double VecD __attribute__((vector_size(kDoubleLanes * sizeof(double))));
typedef float HalfVecN __attribute__((vector_size(kDoubleLanes * sizeof(float))));

inline VecN load_vec(const float* p) {
  VecN v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

inline void store_vec(float* p, VecN v) { std::memcpy(p, &v, sizeof(v)); }

inline VecD load_doubles(const float* p) {
  HalfVecN h;
  std::memcpy(&h, p, sizeof(h));
  return __builtin_convertvector(h, VecD);
}

// Whether any lane of a comparison's result is set.
inline bool any_lane(const IntN& m) {
#ifdef __AVX512F__
  __m512i v;
  std::memcpy(&v, &m, sizeof(v));
  return _mm512_test_epi32_mask(v, v) != 0;
#elif defined(__AVX__)
  __m256i v;
  std::memcpy(&v, &m, sizeof(v));
  return !_mm256_testz_si256(v, v);
#else
  int32_t acc = 0;
  for (int i = 0; i < kLanes; ++i) acc |= m[i];
  return acc != 0;
#endif
}

}  // namespace rqvae_native

#endif  // RQVAE_JAX_NATIVE_SIMD_H_
