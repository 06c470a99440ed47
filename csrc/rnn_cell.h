// Recurrent cells: the math of one element (row r, unit j) of a step, forward and backward, written
// once for the CPU loops (csrc/cpu/rnn.cpp) and the CUDA kernels (csrc/cuda/rnn.cu). `A` is the
// arithmetic type (float, or double); `M` supplies sigmoid(x) and tanh(x) for it (a vectorizable
// polynomial on the CPU, the device's intrinsics on CUDA). Layouts and meaning: csrc/rnn.h.
#pragma once

#if defined(__CUDACC__)
#define FASTDL_HD __host__ __device__ __forceinline__
#else
#define FASTDL_HD inline
#endif

namespace fastdl::rnn {

// LSTM. In: the pre-activations x_* = gx_* + gh_* of gates i, f, g, o and c. Out: the activated
// gates (saved for backward), c' and h'.
template <typename M, typename A>
FASTDL_HD void lstm_forward(A xi, A xf, A xg, A xo, A c, A& i, A& f, A& g, A& o, A& c_new, A& h_new) {
  i = M::sigmoid(xi), f = M::sigmoid(xf), g = M::tanh(xg), o = M::sigmoid(xo);
  c_new = f * c + i * g;
  h_new = o * M::tanh(c_new);
}

// LSTM backward. dh: the gradient reaching h'; dc: reaching c' (in), c's (out). Out: the gradients
// of the pre-activations d_i, d_f, d_g, d_o.
template <typename M, typename A>
FASTDL_HD void lstm_backward(A dh, A& dc, A i, A f, A g, A o, A c_new, A c, A& d_i, A& d_f, A& d_g, A& d_o) {
  const A tc = M::tanh(c_new);
  const A dcn = dc + dh * o * (A(1) - tc * tc);
  d_o = dh * tc * o * (A(1) - o);
  d_i = dcn * g * i * (A(1) - i);
  d_f = dcn * c * f * (A(1) - f);
  d_g = dcn * i * (A(1) - g * g);
  dc = dcn * f;
}

// GRU. In: gx_r, gx_z, gx_n, gh_r, gh_z, gh_n and h. Out: r, z, n (saved with gh_n) and h'.
template <typename M, typename A>
FASTDL_HD void gru_forward(A xr, A xz, A xn, A hr, A hz, A hn, A h, A& r, A& z, A& n, A& h_new) {
  r = M::sigmoid(xr + hr), z = M::sigmoid(xz + hz);
  n = M::tanh(xn + r * hn);
  h_new = (A(1) - z) * n + z * h;
}

// GRU backward. dh: the gradient reaching h'. Out: the gradients of gx_r, gx_z, gx_n (those of
// gh_r, gh_z are the same; gh_n's is d_xn * r) and dh_direct = dh z, the part of h's gradient
// that skips gh.
template <typename M, typename A>
FASTDL_HD void gru_backward(A dh, A r, A z, A n, A hn, A h, A& d_xr, A& d_xz, A& d_xn, A& dh_direct) {
  d_xn = dh * (A(1) - z) * (A(1) - n * n);
  d_xz = dh * (h - n) * z * (A(1) - z);
  d_xr = d_xn * hn * r * (A(1) - r);
  dh_direct = dh * z;
}

// Elman RNN: h' = tanh(pre) or relu(pre); the backward reads h' only.
template <typename M, typename A>
FASTDL_HD A rnn_forward(bool relu, A pre) {
  return relu ? (pre > A(0) ? pre : A(0)) : M::tanh(pre);
}

template <typename A>
FASTDL_HD A rnn_backward(bool relu, A dh, A h_new) {
  return relu ? (h_new > A(0) ? dh : A(0)) : dh * (A(1) - h_new * h_new);
}

}  // namespace fastdl::rnn
