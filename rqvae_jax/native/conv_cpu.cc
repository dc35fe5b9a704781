// A stride-1, kernel-3, zero-padding-1 convolution over channels-last frames, for the small
// channel counts where XLA:CPU's convolution is slow.
//
// Why: XLA runs these layers as Eigen convolutions; at the paper's 16 channels and 88 200
// frames per chunk one (2, 88200, 16) -> 16 layer took 4.5 ms (~60 GFLOP/s) and the 16 -> 4
// output layer 4.2 ms (~16 GFLOP/s) on a 2-core Zen 4 EPYC (2026-12-07), where this loop
// keeps a tile of output frames x one register of output channels in registers and
// broadcasts each input sample against the weights' rows.
//
// y[b, t, o] = sum over k < 3, c < C_in of x[b, t + k - 1, c] * w[k, c, o], x zero outside
// [0, L). Every output sums its products in the same order (k, then c) whatever the
// thread split, so results do not depend on the thread count.
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "parallel.h"
#include "simd.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using rqvae_native::kLanes;
using rqvae_native::kMaxTileRows;
using rqvae_native::VecN;

constexpr int kRows = kMaxTileRows;   // output frames per register tile

// Frames [t0, t1) of one batch row. wp: the weights (3, ci, cop), output channels padded
// with zeros to cop (a multiple of kLanes); y: (L, co).
void conv_frames(const float* x, const float* wp, float* y, int64_t length, int64_t ci,
                 int64_t co, int64_t cop, int64_t t0, int64_t t1) {
  for (int64_t o0 = 0; o0 < cop; o0 += kLanes) {
    const int64_t width = std::min<int64_t>(kLanes, co - o0);
    for (int64_t t = t0; t < t1; t += kRows) {
      VecN acc[kRows];
      for (int r = 0; r < kRows; ++r) acc[r] = VecN{};
      const bool interior = t >= 1 && t + kRows + 1 <= length && t + kRows <= t1;
      for (int k = 0; k < 3; ++k) {
        const float* wk = wp + k * ci * cop + o0;
        if (interior) {
          const float* xs = x + (t + k - 1) * ci;
          for (int64_t c = 0; c < ci; ++c) {
            const VecN wv = rqvae_native::load_vec(wk + c * cop);
            for (int r = 0; r < kRows; ++r) acc[r] += xs[r * ci + c] * wv;
          }
        } else {
          for (int64_t c = 0; c < ci; ++c) {
            const VecN wv = rqvae_native::load_vec(wk + c * cop);
            for (int r = 0; r < kRows; ++r) {
              const int64_t s = t + r + k - 1;
              if (t + r < t1 && s >= 0 && s < length) acc[r] += x[s * ci + c] * wv;
            }
          }
        }
      }
      for (int r = 0; r < kRows && t + r < t1; ++r) {
        std::memcpy(y + (t + r) * co + o0, &acc[r], width * sizeof(float));
      }
    }
  }
}

ffi::Error Conv3Impl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                     ffi::ResultBuffer<ffi::F32> out) {
  auto xd = x.dimensions();
  auto wd = w.dimensions();
  auto od = out->dimensions();
  if (xd.size() != 3 || wd.size() != 3 || wd[0] != 3 || wd[1] != xd[2] || od.size() != 3 ||
      od[0] != xd[0] || od[1] != xd[1] || od[2] != wd[2]) {
    return ffi::Error::InvalidArgument(
        "rqvae convolution kernel: x must be (B, L, C_in), w (3, C_in, C_out), the result "
        "(B, L, C_out)");
  }
  const int64_t batch = xd[0], length = xd[1], ci = xd[2], co = wd[2];
  const int64_t cop = (co + kLanes - 1) / kLanes * kLanes;
  std::vector<float> wp(3 * ci * cop, 0.0f);
  for (int64_t kc = 0; kc < 3 * ci; ++kc) {
    std::memcpy(wp.data() + kc * cop, w.typed_data() + kc * co, co * sizeof(float));
  }
  const float* xs = x.typed_data();
  float* ys = out->typed_data();
  const int64_t rows = batch * length;
  // Two fixed halves of the frames when there is enough work for both threads.
  const int64_t parts = rows * ci * cop >= (int64_t{1} << 18) && rows >= 4 * kRows ? 2 : 1;
  const int64_t split = parts > 1 ? rows / 2 : rows;
  rqvae_native::run_in_parallel(pool, parts, [&](int64_t part) {
    const int64_t begin = part == 0 ? 0 : split, end = part == 0 ? split : rows;
    for (int64_t b = begin / std::max<int64_t>(length, 1); b < batch && b * length < end; ++b) {
      const int64_t t0 = std::max(begin - b * length, int64_t{0});
      const int64_t t1 = std::min(end - b * length, length);
      if (t0 < t1) {
        conv_frames(xs + b * length * ci, wp.data(), ys + b * length * co, length, ci, co, cop,
                    t0, t1);
      }
    }
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(RqvaeConv3, Conv3Impl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
