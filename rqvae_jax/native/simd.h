// Shared by the CPU kernels that use vector types (lstm_cpu.cc, weight_grad_cpu.cc, the
// argmin of nearest_cpu.cc): the
// widest float vector this CPU's registers hold, as a GCC/Clang vector type.
//
// Why not always 16 floats: without AVX-512 the compiler lowers a 64-byte vector type piece
// by piece through memory; compiled for AVX2 (-march=haswell on the AMX Xeon, 2026-12-07),
// the LSTM kernel's 16-float tiles took 165 ms per direction and layer where 8-float ones
// take ~15.
#ifndef RQVAE_JAX_NATIVE_SIMD_H_
#define RQVAE_JAX_NATIVE_SIMD_H_

#include <cstdint>
#include <cstring>

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

inline VecN load_vec(const float* p) {
  VecN v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

inline void store_vec(float* p, VecN v) { std::memcpy(p, &v, sizeof(v)); }

}  // namespace rqvae_native

#endif  // RQVAE_JAX_NATIVE_SIMD_H_
