// The LSTM recurrence on the CPU as XLA FFI custom calls (rqvae_jax/native_lstm.py builds
// and loads this file; README: Performance).
//
// Why a kernel: the recurrence is 441 sequential steps of a (B, H) x (H, 4H) product and a
// few elementwise gates. Under XLA each step is several thunks (matmul, gate fusions, the
// dynamic slices of the scan), and both directions share one matmul whose 2 MB of weights
// do not stay in one core's L2. Here each direction runs its whole sequence on its own
// thread: no per-step dispatch, one direction's 1 MB of weights per core.
//
// Layouts (row-major, float32), D = 2 directions, direction 1 already time-reversed:
//   xs     (T, D, B, 4H)  input projections with both biases, gate order i, f, g, o
//   w_t    (D, P4, H, 32) recurrent weights transposed (h @ w_t, (H, 4H)) in panels of 32
//                         columns, P4 = ceil(4H / 32) (below: accumulate_panels)
//   w      (D, P, 4H, 32) recurrent weights, PyTorch layout (dh = dgates @ w, (4H, H)), in
//                         panels, P = ceil(H / 32)
//   hs, cs (T, D, B, H)   hidden and cell states after each step
//   acts   (T, D, B, 4H)  activated gates sigmoid(i), sigmoid(f), tanh(g), sigmoid(o)
//   dgates (T, D, B, 4H)  gradient w.r.t. the gate pre-activations (= w.r.t. xs)
// Zero initial state, as in rqvae_jax/lstm.py `_scan_forward` / `_recurrence_bwd`.

#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"
#include "parallel.h"
#include "simd.h"

namespace ffi = xla::ffi;

namespace {

// exp, sigmoid and tanh as straight-line float code the compiler vectorises (a libm call
// per element would cost as much as the matrix product). exp: Cody-Waite reduction by
// ln 2 and the degree-6 polynomial of Cephes' expf (~1 ulp on its range); tanh: Cephes'
// tanhf odd polynomial below |x| 0.625, 1 - 2 / (exp(2|x|) + 1) above.
inline float fast_exp(float x) {
  x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
  const float n = std::floor(x * 1.44269504088896341f + 0.5f);
  const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  return p * __builtin_bit_cast(float, bits);
}

inline float fast_sigmoid(float x) { return 1.0f / (1.0f + fast_exp(-x)); }

inline float fast_tanh(float x) {
  const float a = std::fabs(x);
  const float z = x * x;
  float p = -5.70498872745e-3f;
  p = p * z + 2.06390887954e-2f;
  p = p * z - 5.37397155531e-2f;
  p = p * z + 1.33314422036e-1f;
  p = p * z - 3.33332819422e-1f;
  const float small = p * z * x + x;
  const float large = 1.0f - 2.0f / (fast_exp(2.0f * a) + 1.0f);
  return a < 0.625f ? small : std::copysign(large, x);
}

struct Dims {
  int64_t t, d, b, h;
  int64_t g() const { return 4 * h; }
};

// The recurrent products read their weights in panels: a (K, N) matrix m stored as
// (ceil(N / kPanel), K, kPanel), panel p holding columns [p * kPanel, (p + 1) * kPanel),
// zero-padded (rqvae_jax/native_lstm.py `panels` builds them). One panel's rows are
// contiguous, so a tile of output columns walks its weights as one sequential stream the
// prefetcher keeps ahead of; read row by row from the (K, N) layout the same tile strides
// 4N bytes per row, and a batch-2 step waited on L2 (2026-12-07, AMX Xeon: 25.6 -> 13.6 us a
// step for H = 256, one direction).
constexpr int64_t kPanel = 32;
constexpr int64_t kTileColumns = 2 * rqvae_native::kLanes;   // columns of one register tile
static_assert(kPanel % kTileColumns == 0, "a panel must hold whole register tiles");
using rqvae_native::VecN;
using rqvae_native::load_vec;
using rqvae_native::store_vec;

// acc[b, c0 : c0 + kTileColumns] += sum_k v[b, k] * panel[k, c0 : ...] for BB batch rows:
// the 2 x BB accumulator vectors stay in registers over all of K, four weight rows loaded
// per pass and used for every batch row.
template <int BB>
inline void panel_tile(float* acc, int64_t acc_stride, const float* v, int64_t vstride,
                       const float* panel, int64_t kdim, int64_t c0) {
  constexpr int64_t kHalf = rqvae_native::kLanes;
  VecN lo[BB], hi[BB];
  for (int b = 0; b < BB; ++b) {
    lo[b] = load_vec(acc + b * acc_stride);
    hi[b] = load_vec(acc + b * acc_stride + kHalf);
  }
  int64_t k = 0;
  for (; k + 4 <= kdim; k += 4) {
    const float* w = panel + k * kPanel + c0;
    for (int line = 0; line < 8; ++line) __builtin_prefetch(w + 32 * kPanel + 16 * line);
    const VecN w0l = load_vec(w), w0h = load_vec(w + kHalf);
    const VecN w1l = load_vec(w + kPanel), w1h = load_vec(w + kPanel + kHalf);
    const VecN w2l = load_vec(w + 2 * kPanel), w2h = load_vec(w + 2 * kPanel + kHalf);
    const VecN w3l = load_vec(w + 3 * kPanel), w3h = load_vec(w + 3 * kPanel + kHalf);
    for (int b = 0; b < BB; ++b) {
      const float* vb = v + b * vstride + k;
      const float a0 = vb[0], a1 = vb[1], a2 = vb[2], a3 = vb[3];
      lo[b] += a0 * w0l + a1 * w1l + a2 * w2l + a3 * w3l;
      hi[b] += a0 * w0h + a1 * w1h + a2 * w2h + a3 * w3h;
    }
  }
  for (; k < kdim; ++k) {
    const float* w = panel + k * kPanel + c0;
    const VecN wl = load_vec(w), wh = load_vec(w + kHalf);
    for (int b = 0; b < BB; ++b) {
      const float a = v[b * vstride + k];
      lo[b] += a * wl;
      hi[b] += a * wh;
    }
  }
  for (int b = 0; b < BB; ++b) {
    store_vec(acc + b * acc_stride, lo[b]);
    store_vec(acc + b * acc_stride + kHalf, hi[b]);
  }
}

// acc[b, :n] += sum_k v[b, k] * m[k, :n] for b < batch, m in panels (above); each panel in
// register tiles of kTileColumns, batch rows kMaxTileRows (4 with AVX-512, else 2), then
// fewer, at a time. A last, partial panel goes through a kPanel-wide copy.
inline void accumulate_panels(float* acc, const float* v, int64_t vstride, const float* m,
                              int64_t kdim, int64_t n, int64_t batch) {
  constexpr int64_t kRows = rqvae_native::kMaxTileRows;
  float part[kRows * kPanel];
  for (int64_t j0 = 0; j0 < n; j0 += kPanel) {
    const float* panel = m + (j0 / kPanel) * kdim * kPanel;
    const int64_t width = n - j0 < kPanel ? n - j0 : kPanel;
    for (int64_t b = 0; b < batch;) {
      const int64_t rows = batch - b >= kRows ? kRows : (batch - b >= 2 ? 2 : 1);
      float* out = acc + b * n + j0;
      float* tile = out;
      int64_t stride = n;
      if (width < kPanel) {
        std::memset(part, 0, sizeof(part));
        for (int64_t r = 0; r < rows; ++r)
          std::memcpy(part + r * kPanel, out + r * n, sizeof(float) * width);
        tile = part;
        stride = kPanel;
      }
      const float* vb = v + b * vstride;
      for (int64_t c0 = 0; c0 < kPanel; c0 += kTileColumns) {
        if (rows == kRows) panel_tile<kRows>(tile + c0, stride, vb, vstride, panel, kdim, c0);
        else if (rows == 2) panel_tile<2>(tile + c0, stride, vb, vstride, panel, kdim, c0);
        else panel_tile<1>(tile + c0, stride, vb, vstride, panel, kdim, c0);
      }
      if (width < kPanel) {
        for (int64_t r = 0; r < rows; ++r)
          std::memcpy(out + r * n, part + r * kPanel, sizeof(float) * width);
      }
      b += rows;
    }
  }
}

inline int64_t panel_count(int64_t n) { return (n + kPanel - 1) / kPanel; }

// One direction's forward pass over all steps. `cs` and `acts` may be null (inference).
void forward_direction(const Dims& s, int64_t dir, const float* xs, const float* w_t,
                       float* hs, float* cs, float* acts) {
  const int64_t h = s.h, g4 = s.g(), b = s.b;
  const float* w = w_t + dir * panel_count(g4) * h * kPanel;
  std::vector<float> gates(b * g4), hprev(b * h, 0.0f), c(b * h, 0.0f);
  for (int64_t t = 0; t < s.t; ++t) {
    const int64_t row = (t * s.d + dir) * b;              // (t, dir, 0) in (T, D, B, .)
    std::memcpy(gates.data(), xs + row * g4, sizeof(float) * b * g4);
    if (t > 0) accumulate_panels(gates.data(), hprev.data(), h, w, h, g4, b);
    for (int64_t bi = 0; bi < b; ++bi) {
      float* z = gates.data() + bi * g4;
      for (int64_t j = 0; j < 2 * h; ++j) z[j] = fast_sigmoid(z[j]);
      for (int64_t j = 2 * h; j < 3 * h; ++j) z[j] = fast_tanh(z[j]);
      for (int64_t j = 3 * h; j < g4; ++j) z[j] = fast_sigmoid(z[j]);
      const float *gi = z, *gf = z + h, *gg = z + 2 * h, *go = z + 3 * h;
      float* cb = c.data() + bi * h;
      float* hb = hprev.data() + bi * h;
      for (int64_t j = 0; j < h; ++j) {
        cb[j] = gf[j] * cb[j] + gi[j] * gg[j];
        hb[j] = go[j] * fast_tanh(cb[j]);
      }
    }
    std::memcpy(hs + row * h, hprev.data(), sizeof(float) * b * h);
    if (cs != nullptr) std::memcpy(cs + row * h, c.data(), sizeof(float) * b * h);
    if (acts != nullptr) std::memcpy(acts + row * g4, gates.data(), sizeof(float) * b * g4);
  }
}

// One step's gate gradients for one batch row: reads the carried dh (without this step's
// upstream dh_t) and dc, writes the four gate blocks of `out` and the carried dc * f.
inline void gate_gradients(int64_t h, const float* __restrict a, const float* __restrict c,
                           const float* __restrict c_prev, const float* __restrict dh_t,
                           const float* __restrict dh, float* __restrict dc,
                           float* __restrict out) {
  const float *gi = a, *gf = a + h, *gg = a + 2 * h, *go = a + 3 * h;
  for (int64_t j = 0; j < h; ++j) {
    const float dhj = dh[j] + dh_t[j];
    const float tc = fast_tanh(c[j]);
    const float dcj = dc[j] + dhj * go[j] * (1.0f - tc * tc);
    out[j] = dcj * gg[j] * gi[j] * (1.0f - gi[j]);
    out[h + j] = dcj * c_prev[j] * gf[j] * (1.0f - gf[j]);
    out[2 * h + j] = dcj * gi[j] * (1.0f - gg[j] * gg[j]);
    out[3 * h + j] = dhj * tc * go[j] * (1.0f - go[j]);
    dc[j] = dcj * gf[j];
  }
}

// One direction's backward pass: dgates for every step, last step first.
void backward_direction(const Dims& s, int64_t dir, const float* dhs, const float* cs,
                        const float* acts, const float* w_pt, float* dgates) {
  const int64_t h = s.h, g4 = s.g(), b = s.b;
  const float* w = w_pt + dir * panel_count(h) * g4 * kPanel;
  std::vector<float> dh(b * h, 0.0f), dc(b * h, 0.0f), dh_next(b * h), zeros(b * h, 0.0f);
  for (int64_t t = s.t - 1; t >= 0; --t) {
    const int64_t row = (t * s.d + dir) * b;
    const int64_t prev_row = ((t - 1) * s.d + dir) * b;
    float* dg = dgates + row * g4;
    for (int64_t bi = 0; bi < b; ++bi) {
      const float* a = acts + (row + bi) * g4;
      const float* c = cs + (row + bi) * h;
      const float* c_prev = t > 0 ? cs + (prev_row + bi) * h : zeros.data() + bi * h;
      const float* dh_t = dhs + (row + bi) * h;
      gate_gradients(h, a, c, c_prev, dh_t, dh.data() + bi * h, dc.data() + bi * h,
                     dg + bi * g4);
    }
    if (t > 0) {
      std::fill(dh_next.begin(), dh_next.end(), 0.0f);
      accumulate_panels(dh_next.data(), dg, g4, w, g4, h, b);
      dh.swap(dh_next);
    }
  }
}

// (T, D, B, 4H) of a gates-shaped buffer; false when it is not one.
bool dims_of(const ffi::Buffer<ffi::F32>& gates, Dims* out) {
  auto dims = gates.dimensions();
  if (dims.size() != 4 || dims[3] % 4 != 0) return false;
  *out = Dims{dims[0], dims[1], dims[2], dims[3] / 4};
  return true;
}

ffi::Error bad_shape() {
  return ffi::Error::InvalidArgument("rqvae LSTM kernel: gates must be (T, D, B, 4H)");
}

// Whether w is (D, ceil(n / kPanel), k, kPanel): the panels of D (k, n) matrices.
bool is_panels(const ffi::Buffer<ffi::F32>& w, int64_t d, int64_t k, int64_t n) {
  auto dims = w.dimensions();
  return dims.size() == 4 && dims[0] == d && dims[1] == panel_count(n) && dims[2] == k &&
         dims[3] == kPanel;
}

ffi::Error bad_weights() {
  return ffi::Error::InvalidArgument(
      "rqvae LSTM kernel: recurrent weights must be in panels (native_lstm.panels)");
}

// Both directions' forward passes; `cs` and `acts` null for inference.
ffi::Error forward(ffi::ThreadPool& pool, const ffi::Buffer<ffi::F32>& xs,
                   const ffi::Buffer<ffi::F32>& w_t, float* hs, float* cs, float* acts) {
  Dims d;
  if (!dims_of(xs, &d)) return bad_shape();
  if (!is_panels(w_t, d.d, d.h, d.g())) return bad_weights();
  rqvae_native::run_in_parallel(pool, d.d, [&](int64_t dir) {
    forward_direction(d, dir, xs.typed_data(), w_t.typed_data(), hs, cs, acts);
  });
  return ffi::Error::Success();
}

ffi::Error ForwardImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> xs,
                       ffi::Buffer<ffi::F32> w_t, ffi::ResultBuffer<ffi::F32> hs,
                       ffi::ResultBuffer<ffi::F32> cs, ffi::ResultBuffer<ffi::F32> acts) {
  return forward(pool, xs, w_t, hs->typed_data(), cs->typed_data(), acts->typed_data());
}

ffi::Error InferenceImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> xs,
                         ffi::Buffer<ffi::F32> w_t, ffi::ResultBuffer<ffi::F32> hs) {
  return forward(pool, xs, w_t, hs->typed_data(), nullptr, nullptr);
}

ffi::Error BackwardImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> dhs,
                        ffi::Buffer<ffi::F32> cs, ffi::Buffer<ffi::F32> acts,
                        ffi::Buffer<ffi::F32> w, ffi::ResultBuffer<ffi::F32> dgates) {
  Dims d;
  if (!dims_of(acts, &d)) return bad_shape();
  if (!is_panels(w, d.d, d.g(), d.h)) return bad_weights();
  float* out = dgates->typed_data();
  rqvae_native::run_in_parallel(pool, d.d, [&](int64_t dir) {
    backward_direction(d, dir, dhs.typed_data(), cs.typed_data(), acts.typed_data(),
                       w.typed_data(), out);
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(RqvaeLstmForward, ForwardImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(RqvaeLstmInference, InferenceImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(RqvaeLstmBackward, BackwardImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
