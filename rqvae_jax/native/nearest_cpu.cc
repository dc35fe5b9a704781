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

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#ifdef __AVX512F__
#include <immintrin.h>
#endif
#include <limits>
#include <vector>

#include "xla/ffi/api/ffi.h"
#include "parallel.h"

namespace ffi = xla::ffi;

namespace {

typedef float Vec16 __attribute__((vector_size(64)));
typedef int32_t Int16 __attribute__((vector_size(64)));
typedef float Vec8 __attribute__((vector_size(32)));
typedef double VecD8 __attribute__((vector_size(64)));

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

// Whether any lane of a comparison's result is set.
inline bool any_lane(const Int16& m) {
#ifdef __AVX512F__
  __m512i v;
  std::memcpy(&v, &m, sizeof(v));
  return _mm512_test_epi32_mask(v, v) != 0;
#else
  int32_t acc = 0;
  for (int i = 0; i < 16; ++i) acc |= m[i];
  return acc != 0;
#endif
}

// The screened search (quantizer.nearest_code with a bfloat16 search table): `cross` is
// bf16(x) . bf16(c) accumulated in float32, which an AVX-512-BF16 CPU computes about twice as
// fast as the float32 dot, but which can rank codes wrongly. Each approximate product is
// within eps ||x|| ||c|| of x.c: rounding x and c to bfloat16 (8 significant bits, round to
// nearest) changes each product x_i c_i by at most (2u + u^2) |x_i c_i| with u = 2^-8, float32
// accumulation over D <= 256 terms adds at most D 2^-24 sum |x_i c_i|, and
// sum |x_i c_i| <= ||x|| ||c|| (Cauchy-Schwarz); kScreenEps = 2^-7 + 2^-12 covers both with
// room for the float32 arithmetic of the screen itself. The norms were summed in float32:
// kNormEps = 2^-12 of ||c||^2 covers that. So with bound_k = 2 eps ||x|| ||c_k|| + kNormEps
// ||c_k||^2, every code's true distance lies in [approx_k - bound_k, approx_k + bound_k], and
// the true nearest code is among the candidates whose lower end is at most the smallest
// upper end. Those few are scored exactly (double precision, from the float32 x and
// codebook) and the smallest distance wins, the first index on ties. The result is the
// nearest code of the real-valued distances; the float32 search can differ from it only
// where two codes are within float32 rounding of each other.
constexpr float kScreenEps = 1.0f / 128 + 1.0f / 4096;
constexpr float kNormEps = 1.0f / 4096;
constexpr float kTiny = 1e-30f;   // flushed subnormals in the bf16 products, in absolute terms

// A code's approximate distance (norm - 2 cross) and the half-width of the interval its true
// distance lies in (code_norm = ||c||, scale = 2 eps ||x|| * a safety factor), for one code
// (T = float) or 16 (T = Vec16): both passes use this one expression.
template <typename T>
inline void screen_interval(T cross, T norm, T code_norm, float scale, T* approx, T* margin) {
  *approx = norm - 2.0f * cross;
  *margin = scale * code_norm + kNormEps * norm + kTiny;
}

void screened_rows(const float* cross, const float* norms, const float* code_norm,
                   const float* x, const float* codebook, int64_t k, int64_t d,
                   int64_t first, int64_t last, int32_t* out) {
  const float inf = std::numeric_limits<float>::infinity();
  for (int64_t r = first; r < last; ++r) {
    const float* row = cross + r * k;
    const float* xr = x + r * d;
    double xx = 0.0;
    for (int64_t i = 0; i < d; ++i) xx += static_cast<double>(xr[i]) * xr[i];
    const float scale = 2.0f * kScreenEps * static_cast<float>(std::sqrt(xx)) * 1.0001f;
    // Pass 1: the smallest upper end.
    Vec16 upper = {};
    upper += inf;
    int64_t j = 0;
    for (; j + 16 <= k; j += 16) {
      Vec16 c, n, cn;
      std::memcpy(&c, row + j, sizeof(c));
      std::memcpy(&n, norms + j, sizeof(n));
      std::memcpy(&cn, code_norm + j, sizeof(cn));
      Vec16 approx, margin;
      screen_interval(c, n, cn, scale, &approx, &margin);
      const Vec16 u = approx + margin;
      upper = u < upper ? u : upper;
    }
    float bound = inf;
    for (int i = 0; i < 16; ++i) bound = upper[i] < bound ? upper[i] : bound;
    for (; j < k; ++j) {
      float approx, margin;
      screen_interval(row[j], norms[j], code_norm[j], scale, &approx, &margin);
      bound = approx + margin < bound ? approx + margin : bound;
    }
    // Pass 2: exact distances of the candidates (||c||^2 - 2 x.c; ||x||^2 is common), found
    // 16 codes at a time (a candidate is rare: a mask test per 16 codes, the scoring only
    // for the set lanes).
    double best = std::numeric_limits<double>::infinity();
    int32_t index = 0;
    auto score = [&](int64_t jj) {
      const float* c = codebook + jj * d;
      // Eight double lanes (independent sums, so not one long chain of dependent adds).
      VecD8 acc = {};
      int64_t i = 0;
      for (; i + 8 <= d; i += 8) {
        Vec8 cf, xf;
        std::memcpy(&cf, c + i, sizeof(cf));
        std::memcpy(&xf, xr + i, sizeof(xf));
        const VecD8 ci = __builtin_convertvector(cf, VecD8);
        acc += ci * (ci - 2.0 * __builtin_convertvector(xf, VecD8));
      }
      double dist = 0.0;
      for (int l = 0; l < 8; ++l) dist += acc[l];
      for (; i < d; ++i) {
        const double ci = c[i];
        dist += ci * (ci - 2.0 * static_cast<double>(xr[i]));
      }
      if (dist < best) {                          // ascending jj: the first index on ties
        best = dist;
        index = static_cast<int32_t>(jj);
      }
    };
    j = 0;
    for (; j + 16 <= k; j += 16) {
      Vec16 c, n, cn;
      std::memcpy(&c, row + j, sizeof(c));
      std::memcpy(&n, norms + j, sizeof(n));
      std::memcpy(&cn, code_norm + j, sizeof(cn));
      Vec16 approx, margin;
      screen_interval(c, n, cn, scale, &approx, &margin);
      const Int16 hit = approx - margin <= bound;           // NaN rows have no candidates: index 0
      if (!any_lane(hit)) continue;
      for (int l = 0; l < 16; ++l) {
        if (hit[l]) score(j + l);
      }
    }
    for (; j < k; ++j) {
      float approx, margin;
      screen_interval(row[j], norms[j], code_norm[j], scale, &approx, &margin);
      if (approx - margin <= bound) score(j);
    }
    out[r] = index;
  }
}

ffi::Error ScreenedImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> cross,
                        ffi::Buffer<ffi::F32> norms, ffi::Buffer<ffi::F32> x,
                        ffi::Buffer<ffi::F32> codebook, ffi::ResultBuffer<ffi::S32> index) {
  auto dims = cross.dimensions();
  auto xd = x.dimensions();
  auto cd = codebook.dimensions();
  if (dims.size() != 2 || norms.dimensions().size() != 1 ||
      norms.dimensions()[0] != dims[1] || xd.size() != 2 || xd[0] != dims[0] ||
      cd.size() != 2 || cd[0] != dims[1] || cd[1] != xd[1] ||
      index->dimensions().size() != 1 || index->dimensions()[0] != dims[0]) {
    return ffi::Error::InvalidArgument(
        "rqvae screened nearest-code kernel: cross must be (N, K), norms (K,), x (N, D), "
        "the codebook (K, D), the result (N,)");
  }
  const int64_t n = dims[0], k = dims[1], d = xd[1];
  std::vector<float> code_norm(k);
  const float* nn = norms.typed_data();
  for (int64_t j = 0; j < k; ++j) code_norm[j] = std::sqrt(std::max(nn[j], 0.0f));
  const int64_t parts = n >= 64 ? 2 : 1;
  const float* c = cross.typed_data();
  const float* xs = x.typed_data();
  const float* cb = codebook.typed_data();
  int32_t* out = index->typed_data();
  rqvae_native::run_in_parallel(pool, parts, [&](int64_t part) {
    screened_rows(c, nn, code_norm.data(), xs, cb, k, d, n * part / parts,
                  n * (part + 1) / parts, out);
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

XLA_FFI_DEFINE_HANDLER_SYMBOL(RqvaeNearestCodeScreened, ScreenedImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>());
