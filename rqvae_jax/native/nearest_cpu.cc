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
#include <limits>
#include <vector>

#include "xla/ffi/api/ffi.h"
#include "parallel.h"
#include "simd.h"

namespace ffi = xla::ffi;

namespace {

using rqvae_native::any_lane;
using rqvae_native::HalfN;
using rqvae_native::IntN;
using rqvae_native::kDoubleLanes;
using rqvae_native::kLanes;
using rqvae_native::load_doubles;
using rqvae_native::load_vec;
using rqvae_native::UIntN;
using rqvae_native::VecD;
using rqvae_native::VecN;

// Every loop here runs in vectors of the CPU's register width (simd.h): with 16-float
// vectors an AVX2 build ran the argmin 21x slower (0.30 -> 6.5 ms for 441 rows of 4096,
// -march=haswell on the AMX Xeon), the screened search 2.2x and the table 2.1x (x86-64-v3
// on the Zen 4 EPYC, 2026-12-07).

// The sum of a VecD's lanes, in lane order.
inline double lane_sum(const VecD& v) {
  double s = 0.0;
  for (int l = 0; l < kDoubleLanes; ++l) s += v[l];
  return s;
}

void nearest_rows(const float* cross, const float* norms, int64_t k, int64_t first,
                  int64_t last, int32_t* out) {
  const float inf = std::numeric_limits<float>::infinity();
  IntN lane;
  for (int i = 0; i < kLanes; ++i) lane[i] = i;
  for (int64_t r = first; r < last; ++r) {
    const float* row = cross + r * k;
    VecN best = {};
    IntN best_index = {};
    best += inf;
    int64_t j = 0;
    // Per lane, a strict < keeps the earliest index of that lane's minimum.
    for (; j + kLanes <= k; j += kLanes) {
      const VecN d = load_vec(norms + j) - 2.0f * load_vec(row + j);
      const IntN better = d < best;
      best = better ? d : best;
      best_index = better ? lane + static_cast<int32_t>(j) : best_index;
    }
    // Across lanes, the smallest value and, among equal ones, the smallest index.
    float value = inf;
    int32_t index = 0;
    for (int i = 0; i < kLanes; ++i) {
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

// Per code, what the interval of its true distance needs besides the row: ||c||, and the
// norm widened by its own error bound, up (norm + kNormEps norm + kTiny) and down.
struct CodeTerms {
  std::vector<float> code_norm, norm_up, norm_down;
  explicit CodeTerms(const float* norms, int64_t k) : code_norm(k), norm_up(k), norm_down(k) {
    for (int64_t j = 0; j < k; ++j) {
      code_norm[j] = std::sqrt(std::max(norms[j], 0.0f));
      norm_up[j] = norms[j] + (kNormEps * norms[j] + kTiny);
      norm_down[j] = norms[j] - (kNormEps * norms[j] + kTiny);
    }
  }
};

// The ends of the interval a code's true distance lies in: the approximate distance
// norm - 2 cross, widened by scale ||c|| (scale = 2 eps ||x|| * a safety factor) and the norm's
// own bound, for one code (T = float) or kLanes (T = VecN); the scalar tails use the same
// expressions.
template <typename T>
inline T upper_end(T cross, T norm_up, T code_norm, float scale) {
  return norm_up - 2.0f * cross + scale * code_norm;
}

template <typename T>
inline T lower_end(T cross, T norm_down, T code_norm, float scale) {
  return norm_down - 2.0f * cross - scale * code_norm;
}

void screened_rows(const float* cross, const CodeTerms& terms,
                   const float* x, const float* codebook, int64_t k, int64_t d,
                   int64_t first, int64_t last, int32_t* out) {
  const float inf = std::numeric_limits<float>::infinity();
  for (int64_t r = first; r < last; ++r) {
    const float* row = cross + r * k;
    const float* xr = x + r * d;
    // ||x||^2 in double lanes: one chain of D dependent adds cost ~20 % of a row.
    VecD xx_lanes = {};
    int64_t i0 = 0;
    for (; i0 + kDoubleLanes <= d; i0 += kDoubleLanes) {
      const VecD xd = load_doubles(xr + i0);
      xx_lanes += xd * xd;
    }
    double xx = lane_sum(xx_lanes);
    for (; i0 < d; ++i0) xx += static_cast<double>(xr[i0]) * xr[i0];
    const float scale = 2.0f * kScreenEps * static_cast<float>(std::sqrt(xx)) * 1.0001f;
    const float* code_norm = terms.code_norm.data();
    const float* norm_up = terms.norm_up.data();
    const float* norm_down = terms.norm_down.data();
    // Pass 1: the smallest upper end.
    VecN upper = {};
    upper += inf;
    int64_t j = 0;
    for (; j + kLanes <= k; j += kLanes) {
      const VecN u = upper_end(load_vec(row + j), load_vec(norm_up + j),
                               load_vec(code_norm + j), scale);
      upper = u < upper ? u : upper;
    }
    float bound = inf;
    for (int i = 0; i < kLanes; ++i) bound = upper[i] < bound ? upper[i] : bound;
    for (; j < k; ++j) {
      const float u = upper_end(row[j], norm_up[j], code_norm[j], scale);
      bound = u < bound ? u : bound;
    }
    // Pass 2: exact distances of the candidates (||c||^2 - 2 x.c; ||x||^2 is common), found
    // kLanes codes at a time (a candidate is rare: a mask test per kLanes codes, the scoring
    // only for the set lanes).
    double best = std::numeric_limits<double>::infinity();
    int32_t index = 0;
    auto score = [&](int64_t jj) {
      const float* c = codebook + jj * d;
      // Double lanes (independent sums, so not one long chain of dependent adds).
      VecD acc = {};
      int64_t i = 0;
      for (; i + kDoubleLanes <= d; i += kDoubleLanes) {
        const VecD ci = load_doubles(c + i);
        acc += ci * (ci - 2.0 * load_doubles(xr + i));
      }
      double dist = lane_sum(acc);
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
    for (; j + kLanes <= k; j += kLanes) {
      // NaN rows have no candidates: index 0.
      const IntN hit = lower_end(load_vec(row + j), load_vec(norm_down + j),
                                 load_vec(code_norm + j), scale) <= bound;
      if (!any_lane(hit)) continue;
      for (int l = 0; l < kLanes; ++l) {
        if (hit[l]) score(j + l);
      }
    }
    for (; j < k; ++j) {
      if (lower_end(row[j], norm_down[j], code_norm[j], scale) <= bound) score(j);
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
  const CodeTerms terms(norms.typed_data(), k);
  const int64_t parts = n >= 64 ? 2 : 1;
  const float* c = cross.typed_data();
  const float* xs = x.typed_data();
  const float* cb = codebook.typed_data();
  int32_t* out = index->typed_data();
  rqvae_native::run_in_parallel(pool, parts, [&](int64_t part) {
    screened_rows(c, terms, xs, cb, k, d, n * part / parts,
                  n * (part + 1) / parts, out);
  });
  return ffi::Error::Success();
}

// The screened search's table from float32 codebooks (Q, K, D): `bits` (Q, D, K) uint16, the
// codes rounded to bfloat16 (to nearest, ties to even, as XLA converts) and transposed so
// that XLA's bfloat16 dot reads them at its fast rate, and `norms` (Q, K) float32 ||c||^2
// (summed in double, rounded once: well inside kNormEps). Why a kernel: in a training step
// the codebooks change every step, so the table is rebuilt every step, and XLA built it in
// ~20 ms (a transposing convert, a layout copy, a separate reduction for the norms) where
// the bfloat16 dots save ~28. Here each block of 32 codes is read once into a (D, 32) tile
// that both outputs are written from.
constexpr int64_t kTableBlock = 32;   // codes per tile: a (D, 32) float tile fits in L1,
                                      // and each output row piece is one 64-byte line

inline uint16_t bf16_bits(float f) {
  uint32_t b;
  std::memcpy(&b, &f, sizeof(b));
  if ((b & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((b >> 16) | 0x40u);
  return static_cast<uint16_t>((b + 0x7fffu + ((b >> 16) & 1u)) >> 16);
}

inline HalfN bf16_bits(const VecN& f) {
  UIntN b;
  std::memcpy(&b, &f, sizeof(b));
  const UIntN rounded = (b + 0x7fffu + ((b >> 16) & 1u)) >> 16;
  const UIntN nan = (b >> 16) | 0x40u;
  const UIntN out = (b & 0x7fffffffu) > 0x7f800000u ? nan : rounded;
  return __builtin_convertvector(out, HalfN);
}

void table_blocks(const float* codebooks, int64_t k, int64_t d, int64_t first, int64_t last,
                  uint16_t* bits, float* norms) {
  const int64_t blocks_per_stage = (k + kTableBlock - 1) / kTableBlock;
  std::vector<float> tile(d * kTableBlock);
  for (int64_t block = first; block < last; ++block) {
    const int64_t q = block / blocks_per_stage;
    const int64_t k0 = (block % blocks_per_stage) * kTableBlock;
    const int64_t width = std::min(kTableBlock, k - k0);
    const float* src = codebooks + (q * k + k0) * d;
    uint16_t* dst = bits + q * d * k + k0;
    float* norm = norms + q * k + k0;
    if (width < kTableBlock) {   // the last, partial block of a stage: one code at a time
      for (int64_t j = 0; j < width; ++j) {
        double sum = 0.0;
        for (int64_t i = 0; i < d; ++i) {
          dst[i * k + j] = bf16_bits(src[j * d + i]);
          sum += static_cast<double>(src[j * d + i]) * src[j * d + i];
        }
        norm[j] = static_cast<float>(sum);
      }
      continue;
    }
    for (int64_t j = 0; j < kTableBlock; ++j)
      for (int64_t i = 0; i < d; ++i) tile[i * kTableBlock + j] = src[j * d + i];
    // Each code's norm sums its D squares in order (the same sum at any vector width).
    VecD sums[kTableBlock / kDoubleLanes] = {};
    for (int64_t i = 0; i < d; ++i) {
      const float* t = tile.data() + i * kTableBlock;
      for (int64_t j = 0; j < kTableBlock; j += kLanes) {
        const HalfN h = bf16_bits(load_vec(t + j));
        std::memcpy(dst + i * k + j, &h, sizeof(h));
      }
      for (int64_t j = 0; j < kTableBlock; j += kDoubleLanes) {
        const VecD w = load_doubles(t + j);
        sums[j / kDoubleLanes] += w * w;
      }
    }
    for (int64_t j = 0; j < kTableBlock; ++j)
      norm[j] = static_cast<float>(sums[j / kDoubleLanes][j % kDoubleLanes]);
  }
}

ffi::Error TableImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> codebooks,
                     ffi::ResultBuffer<ffi::U16> bits, ffi::ResultBuffer<ffi::F32> norms) {
  auto cd = codebooks.dimensions();
  auto bd = bits->dimensions();
  auto nd = norms->dimensions();
  if (cd.size() != 3 || bd.size() != 3 || nd.size() != 2 || bd[0] != cd[0] ||
      bd[1] != cd[2] || bd[2] != cd[1] || nd[0] != cd[0] || nd[1] != cd[1]) {
    return ffi::Error::InvalidArgument(
        "rqvae search-table kernel: the codebooks must be (Q, K, D), the results (Q, D, K) "
        "and (Q, K)");
  }
  const int64_t q = cd[0], k = cd[1], d = cd[2];
  const int64_t blocks = q * ((k + kTableBlock - 1) / kTableBlock);
  const int64_t parts = blocks >= 8 ? 2 : 1;
  const float* src = codebooks.typed_data();
  uint16_t* b = bits->typed_data();
  float* n = norms->typed_data();
  rqvae_native::run_in_parallel(pool, parts, [&](int64_t part) {
    table_blocks(src, k, d, blocks * part / parts, blocks * (part + 1) / parts, b, n);
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

XLA_FFI_DEFINE_HANDLER_SYMBOL(RqvaeSearchTable, TableImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::U16>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
