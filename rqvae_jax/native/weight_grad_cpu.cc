// A convolution's weight gradient on the CPU as an XLA FFI custom call
// (rqvae_jax/blocks.py `weight_matmul`; README: Performance).
//
// Why a kernel: the gradient of y = x @ w with respect to w is x^T dy, a contraction over
// the long axis (batch x time: 176 400 rows at full rate) of two (N, small) arrays. XLA's
// CPU dot wants that axis minor, so the fusion that makes dy (the BatchNorm and PReLU
// backward) writes it transposed, a strided copy several times slower than the same
// fusion in its natural layout, and so does the one that makes x. Here both are read as
// they are, row by row: out (M, P) = a^T b for a (N, M), b (N, P), float32, in register tiles
// of 4 x (2 vectors) outputs over blocks of rows that stay in L2. The rows are split into two fixed
// halves (one per thread) summed at the end, so the result does not depend on timing.

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "xla/ffi/api/ffi.h"
#include "parallel.h"
#include "simd.h"

namespace ffi = xla::ffi;

namespace {

using rqvae_native::kLanes;
using rqvae_native::load_vec;
using rqvae_native::store_vec;
using rqvae_native::VecN;

constexpr int64_t kRowBlock = 256;   // rows per block: a block of a and b stays in L2

// acc[m0 + i, p0 : p0 + kLanes * PV] += sum_n a[n, m0 + i] * b[n, p0 : ...] for i < MT, over
// `rows` rows of the block, MT x PV accumulator vectors in registers.
template <int MT, int PV>
inline void tile(const float* a, int64_t m, const float* b, int64_t p, int64_t rows,
                 int64_t m0, int64_t p0, float* acc) {
  VecN c[MT][PV];
  for (int i = 0; i < MT; ++i)
    for (int v = 0; v < PV; ++v) c[i][v] = VecN{};
  for (int64_t n = 0; n < rows; ++n) {
    VecN bv[PV];
    for (int v = 0; v < PV; ++v) bv[v] = load_vec(b + n * p + p0 + kLanes * v);
    const float* an = a + n * m + m0;
    for (int i = 0; i < MT; ++i) {
      const float s = an[i];
      for (int v = 0; v < PV; ++v) c[i][v] += s * bv[v];
    }
  }
  for (int i = 0; i < MT; ++i) {
    for (int v = 0; v < PV; ++v) {
      float* out = acc + (m0 + i) * p + p0 + kLanes * v;
      store_vec(out, load_vec(out) + c[i][v]);
    }
  }
}

template <int PV>
inline void tile_columns(const float* a, int64_t m, const float* b, int64_t p, int64_t rows,
                         int64_t p0, float* acc) {
  int64_t m0 = 0;
  for (; m0 + 4 <= m; m0 += 4) tile<4, PV>(a, m, b, p, rows, m0, p0, acc);
  for (; m0 < m; ++m0) tile<1, PV>(a, m, b, p, rows, m0, p0, acc);
}

// acc (M, P) += a[first:last]^T b[first:last].
void accumulate(const float* a, const float* b, int64_t m, int64_t p, int64_t first,
                int64_t last, float* acc) {
  for (int64_t n0 = first; n0 < last; n0 += kRowBlock) {
    const int64_t rows = std::min(kRowBlock, last - n0);
    const float* ab = a + n0 * m;
    const float* bb = b + n0 * p;
    int64_t p0 = 0;
    for (; p0 + 2 * kLanes <= p; p0 += 2 * kLanes) tile_columns<2>(ab, m, bb, p, rows, p0, acc);
    for (; p0 + kLanes <= p; p0 += kLanes) tile_columns<1>(ab, m, bb, p, rows, p0, acc);
    for (; p0 < p; ++p0) {                         // fewer than kLanes columns left
      for (int64_t i = 0; i < m; ++i) {
        float s = 0.0f;
        for (int64_t n = 0; n < rows; ++n) s += ab[n * m + i] * bb[n * p + p0];
        acc[i * p + p0] += s;
      }
    }
  }
}

ffi::Error TnMatmulImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> a,
                        ffi::Buffer<ffi::F32> b, ffi::ResultBuffer<ffi::F32> out) {
  auto ad = a.dimensions();
  auto bd = b.dimensions();
  auto od = out->dimensions();
  if (ad.size() != 2 || bd.size() != 2 || ad[0] != bd[0] || od.size() != 2 ||
      od[0] != ad[1] || od[1] != bd[1]) {
    return ffi::Error::InvalidArgument(
        "rqvae weight-gradient kernel: a must be (N, M), b (N, P), the result (M, P)");
  }
  const int64_t n = ad[0], m = ad[1], p = bd[1];
  float* result = out->typed_data();
  std::fill(result, result + m * p, 0.0f);
  // Two fixed halves of the rows when there is enough work for both threads.
  const int64_t parts = n * m * p >= (int64_t{1} << 20) && n >= 2 * kRowBlock ? 2 : 1;
  std::vector<float> second(parts > 1 ? m * p : 0, 0.0f);
  const int64_t split = parts > 1 ? (n / 2 / kRowBlock) * kRowBlock : n;
  rqvae_native::run_in_parallel(pool, parts, [&](int64_t part) {
    if (part == 0) {
      accumulate(a.typed_data(), b.typed_data(), m, p, 0, split, result);
    } else {
      accumulate(a.typed_data(), b.typed_data(), m, p, split, n, second.data());
    }
  });
  for (size_t i = 0; i < second.size(); ++i) result[i] += second[i];
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(RqvaeTnMatmul, TnMatmulImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
