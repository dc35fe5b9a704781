// The nearest-code search's last step on the CPU as an XLA FFI custom call
// (rqvae_jax/quantizer.py `nearest_code`; README: Performance).
//
// Why a kernel: XLA computes the (N, K) cross products x.c at the matmul's peak, but then
// fuses the distances ||c||^2 - 2 x.c into the matmul (slower than a plain dot) and makes
// several passes over the 14 MB of distances of a batch-2 chunk (group minima, their
// argmin, the argmin inside the chosen group). Here one pass per row reads the plain dot's
// output and the code norms and keeps, per vector lane, the smallest distance and its
// index: one VQ stage (882 x 256 against 4096 codes) 5.8-6.4 -> 4.3 ms, the dot alone being
// 4.0 ms, with the same indices.
//
// Layouts (row-major): cross (N, K) float32 = x @ codebook.T; norms (K,) float32 =
// ||codebook||^2; result (N,) int32 = the first index of min_k(norms[k] - 2 cross[n, k]),
// as jnp.argmin (NaN distances never win; a row of NaN gets 0).

#include <cstdint>
#include <cstring>
#include <limits>

#include "xla/ffi/api/ffi.h"
#include "parallel.h"

namespace ffi = xla::ffi;

namespace {

typedef float Vec16 __attribute__((vector_size(64)));
typedef int32_t Int16 __attribute__((vector_size(64)));

void nearest_rows(const float* cross, const float* norms, int64_t k, int64_t first,
                  int64_t last, int32_t* out) {
  const float inf = std::numeric_limits<float>::infinity();
  Int16 lane;
  for (int i = 0; i < 16; ++i) lane[i] = i;
  for (int64_t r = first; r < last; ++r) {
    const float* row = cross + r * k;
    Vec16 best = {};
    Int16 best_index = {};
    best += inf;
    int64_t j = 0;
    // Per lane, a strict < keeps the earliest index of that lane's minimum.
    for (; j + 16 <= k; j += 16) {
      Vec16 c, n;
      std::memcpy(&c, row + j, sizeof(c));
      std::memcpy(&n, norms + j, sizeof(n));
      const Vec16 d = n - 2.0f * c;
      const auto better = d < best;
      best = better ? d : best;
      best_index = better ? lane + static_cast<int32_t>(j) : best_index;
    }
    // Across lanes, the smallest value and, among equal ones, the smallest index.
    float value = inf;
    int32_t index = 0;
    for (int i = 0; i < 16; ++i) {
      if (best[i] < value || (best[i] == value && best_index[i] < index)) {
        value = best[i];
        index = best_index[i];
      }
    }
    for (; j < k; ++j) {
      const float d = norms[j] - 2.0f * row[j];
      if (d < value) {
        value = d;
        index = static_cast<int32_t>(j);
      }
    }
    out[r] = index;
  }
}

ffi::Error NearestImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> cross,
                       ffi::Buffer<ffi::F32> norms, ffi::ResultBuffer<ffi::S32> index) {
  auto dims = cross.dimensions();
  if (dims.size() != 2 || norms.dimensions().size() != 1 ||
      norms.dimensions()[0] != dims[1] || index->dimensions().size() != 1 ||
      index->dimensions()[0] != dims[0]) {
    return ffi::Error::InvalidArgument(
        "rqvae nearest-code kernel: cross must be (N, K), norms (K,), the result (N,)");
  }
  const int64_t n = dims[0], k = dims[1];
  const int64_t parts = n >= 64 ? 2 : 1;           // rows split over (at most) two threads
  const float* c = cross.typed_data();
  const float* nn = norms.typed_data();
  int32_t* out = index->typed_data();
  rqvae_native::run_in_parallel(pool, parts, [&](int64_t part) {
    nearest_rows(c, nn, k, n * part / parts, n * (part + 1) / parts, out);
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(RqvaeNearestCode, NearestImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>());
