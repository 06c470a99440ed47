// Host emulation of the recurrent CUDA kernels (csrc/cuda/rnn.cu), built and run by
// tests/ops/test_rnn_cuda_host.py with nvcc and no GPU.
//
// Each step kernel's body is the __host__ __device__ forward_thread / backward_thread: here every
// block and thread of the launch that rnn_forward_step / rnn_backward_step would make (launch_of,
// with a small grid-y cap so the grid-stride loops run) calls it in order, on NaN-poisoned outputs.
// The results are compared with a float64 reference written from the layouts of csrc/rnn.h, not
// from rnn_cell.h: any element of gx / gh / ws / out read or written in the wrong place, or left
// unwritten, fails. For every mode x element type (float, double, __half, __nv_bfloat16) x awkward
// (B, H). What it cannot catch: races, warp-level behaviour, the launch itself (block shape against
// the device's limits), and the device's own math (DeviceMath's __fdividef and expf on the GPU).
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include "cuda/rnn.cu"

namespace {

using fastdl::rnn::Mode;
namespace k = fastdl::cuda::rnn_k;
using fastdl::cuda::to_acc;

double sig(double x) { return 1.0 / (1.0 + std::exp(-x)); }

template <typename T>
std::vector<T> to_t(const std::vector<double>& v) {
  std::vector<T> out(v.size());
  for (size_t i = 0; i < v.size(); ++i) fastdl::cuda::store(&out[i], static_cast<fastdl::cuda::Acc<T>>(v[i]));
  return out;
}

template <typename T>
std::vector<double> to_d(const std::vector<T>& v) {
  std::vector<double> out(v.size());
  for (size_t i = 0; i < v.size(); ++i) out[i] = double(to_acc(v[i]));
  return out;
}

template <typename T>
std::vector<T> poisoned(size_t n) {
  return to_t<T>(std::vector<double>(n, std::nan("")));
}

int failures = 0;

void expect(const char* what, const char* mode, const char* type, long B, long H, const std::vector<double>& got,
            const std::vector<double>& want, double tol) {
  for (size_t i = 0; i < want.size(); ++i) {
    const double err = std::fabs(got[i] - want[i]);
    if (!(err <= tol * (1.0 + std::fabs(want[i])))) {
      std::printf("FAIL %s %s B=%ld H=%ld %s[%zu]: got %.9g, want %.9g\n", mode, type, B, H, what, i, got[i], want[i]);
      ++failures;
      return;
    }
  }
}

// Every block and thread of the launch, in order, calling thread(j0, r0, dj, dr) as the kernel does.
template <typename F>
void emulate(long B, long H, F&& thread) {
  const k::Launch l = k::launch_of(B, H, /*max_gy=*/2);
  for (unsigned by = 0; by < l.gy; ++by)
    for (unsigned bx = 0; bx < l.gx; ++bx)
      for (unsigned ty = 0; ty < l.by; ++ty)
        for (unsigned tx = 0; tx < l.bx; ++tx)
          thread(int64_t(bx) * l.bx + tx, int64_t(by) * l.by + ty, int64_t(l.gx) * l.bx, int64_t(l.gy) * l.by);
}

template <Mode kMode, typename T>
void check(const char* mode, const char* type, long B, long H, double tol, std::mt19937& rng) {
  const long G = fastdl::rnn::gates_of(kMode), W = fastdl::rnn::workspace_of(kMode, H);
  std::normal_distribution<double> normal;
  auto randn = [&](size_t n) {
    std::vector<double> v(n);
    for (auto& x : v) x = normal(rng);
    return to_d(to_t<T>(v));  // values T holds exactly
  };
  const std::vector<double> gx = randn(B * G * H), gh = randn(B * G * H), h0 = randn(B * H), c0 = randn(B * H);
  const std::vector<double> grad_out = randn(B * H), dh_in = randn(B * H), dc_in = randn(B * H);

  // Reference forward (float64), from csrc/rnn.h's layouts: gate g of row r, unit j at r*G*H + g*H + j.
  std::vector<double> h1(B * H), c1(B * H), ws(B * W);
  for (long r = 0; r < B; ++r)
    for (long j = 0; j < H; ++j) {
      const long e = r * H + j, q = r * G * H + j;
      auto x = [&](long g) { return gx[q + g * H] + gh[q + g * H]; };
      if (kMode == Mode::Lstm) {
        const double i = sig(x(0)), f = sig(x(1)), g = std::tanh(x(2)), o = sig(x(3));
        c1[e] = f * c0[e] + i * g;
        h1[e] = o * std::tanh(c1[e]);
        const double saved[5] = {i, f, g, o, c1[e]};
        for (int s = 0; s < 5; ++s) ws[r * W + s * H + j] = saved[s];
      } else if (kMode == Mode::Gru) {
        const double rg = sig(x(0)), z = sig(x(1)), n = std::tanh(gx[q + 2 * H] + rg * gh[q + 2 * H]);
        h1[e] = (1 - z) * n + z * h0[e];
        const double saved[4] = {rg, z, n, gh[q + 2 * H]};
        for (int s = 0; s < 4; ++s) ws[r * W + s * H + j] = saved[s];
      } else {
        h1[e] = kMode == Mode::RnnRelu ? std::fmax(x(0), 0.0) : std::tanh(x(0));
      }
    }

  std::vector<T> tgx = to_t<T>(gx), tgh = to_t<T>(gh), th = to_t<T>(h0), tc = to_t<T>(c0);
  std::vector<T> tout = poisoned<T>(B * H), tws = poisoned<T>(B * W);
  if (kMode != Mode::Lstm) tc.clear();
  const fastdl::rnn::StepForward<T> fp{kMode, B, H, tgx.data(), tgh.data(), th.data(), tc.data(), tout.data(),
                                       W ? tws.data() : nullptr};
  emulate(B, H, [&](int64_t j0, int64_t r0, int64_t dj, int64_t dr) {
    k::forward_thread<k::DeviceMath, kMode>(fp, j0, r0, dj, dr);
  });
  expect("h'", mode, type, B, H, to_d(th), h1, tol);
  expect("out", mode, type, B, H, to_d(tout), h1, tol);
  if (kMode == Mode::Lstm) expect("c'", mode, type, B, H, to_d(tc), c1, tol);
  // The workspace as the kernel saved it feeds the backward below (as on the device).
  if (W) expect("ws", mode, type, B, H, to_d(tws), ws, tol);
  const std::vector<double> ws_saved = W ? to_d(tws) : std::vector<double>(), out_saved = to_d(tout);

  // Reference backward (float64), from the saved values as T holds them.
  std::vector<double> dgx(B * G * H), dgh(B * G * H), dh_out = dh_in, dc_out = dc_in;
  for (long r = 0; r < B; ++r)
    for (long j = 0; j < H; ++j) {
      const long e = r * H + j, q = r * G * H + j;
      const double dh = grad_out[e] + dh_in[e];
      auto w = [&](long s) { return ws_saved[r * W + s * H + j]; };
      if (kMode == Mode::Lstm) {
        const double i = w(0), f = w(1), g = w(2), o = w(3), cn = w(4), tcn = std::tanh(cn);
        const double dcn = dc_in[e] + dh * o * (1 - tcn * tcn);
        dgx[q] = dcn * g * i * (1 - i), dgx[q + H] = dcn * c0[e] * f * (1 - f);
        dgx[q + 2 * H] = dcn * i * (1 - g * g), dgx[q + 3 * H] = dh * tcn * o * (1 - o);
        dc_out[e] = dcn * f;
      } else if (kMode == Mode::Gru) {
        const double rg = w(0), z = w(1), n = w(2), hn = w(3);
        const double d_xn = dh * (1 - z) * (1 - n * n), d_xz = dh * (h0[e] - n) * z * (1 - z);
        const double d_xr = d_xn * hn * rg * (1 - rg);
        dgx[q] = dgh[q] = d_xr, dgx[q + H] = dgh[q + H] = d_xz, dgx[q + 2 * H] = d_xn;
        dgh[q + 2 * H] = d_xn * rg;
        dh_out[e] = dh * z;
      } else {
        const double hn = out_saved[e];
        dgx[q] = kMode == Mode::RnnRelu ? (hn > 0 ? dh : 0.0) : dh * (1 - hn * hn);
      }
    }

  std::vector<T> tgo = to_t<T>(grad_out), tdh = to_t<T>(dh_in), tdc = to_t<T>(dc_in), th0 = to_t<T>(h0);
  std::vector<T> tc0 = to_t<T>(c0), tdgx = poisoned<T>(B * G * H), tdgh = poisoned<T>(B * G * H);
  const fastdl::rnn::StepBackward<T> bp{kMode,      B,           H,           tgo.data(),  tdh.data(),
                                        kMode == Mode::Lstm ? tdc.data() : nullptr, th0.data(),
                                        kMode == Mode::Lstm ? tc0.data() : nullptr, tout.data(),
                                        W ? tws.data() : nullptr, tdgx.data(),
                                        kMode == Mode::Gru ? tdgh.data() : nullptr};
  emulate(B, H, [&](int64_t j0, int64_t r0, int64_t dj, int64_t dr) {
    k::backward_thread<k::DeviceMath, kMode>(bp, j0, r0, dj, dr);
  });
  expect("dgx", mode, type, B, H, to_d(tdgx), dgx, tol);
  if (kMode == Mode::Gru) expect("dgh", mode, type, B, H, to_d(tdgh), dgh, tol);
  if (kMode == Mode::Gru) expect("dh", mode, type, B, H, to_d(tdh), dh_out, tol);
  if (kMode == Mode::Lstm) expect("dc", mode, type, B, H, to_d(tdc), dc_out, tol);
}

template <typename T>
void check_type(const char* type, double tol, std::mt19937& rng) {
  // (B, H): one element; H below, at and past a warp and a block (several blocks along x); B past
  // the grid-y cap of 2 blocks (grid-stride rows); primes.
  const long shapes[][2] = {{1, 1}, {3, 7}, {5, 32}, {2, 33}, {4, 255}, {3, 257}, {2, 600}, {67, 5}, {129, 40}};
  for (const auto& s : shapes) {
    check<Mode::Lstm, T>("lstm", type, s[0], s[1], tol, rng);
    check<Mode::Gru, T>("gru", type, s[0], s[1], tol, rng);
    check<Mode::RnnTanh, T>("rnn_tanh", type, s[0], s[1], tol, rng);
    check<Mode::RnnRelu, T>("rnn_relu", type, s[0], s[1], tol, rng);
  }
}

}  // namespace

int main() {
  std::mt19937 rng(0);
  // Tolerances: the element's float (double) arithmetic and, for fp16 / bf16, the rounding of each
  // stored output; the saved workspace is compared as stored, so errors do not compound.
  check_type<double>("float64", 1e-12, rng);
  check_type<float>("float32", 1e-5, rng);
  check_type<__half>("float16", 4e-3, rng);
  check_type<__nv_bfloat16>("bfloat16", 3e-2, rng);
  std::printf("%s: %d failures\n", failures ? "FAIL" : "OK", failures);
  return failures ? 1 : 0;
}
