// Recurrent cells: the params of one time step's fused pointwise kernels, shared by the CPU kernels
// (csrc/cpu/rnn.cpp) and the CUDA kernels (csrc/cuda/rnn.cu). Raw pointers and sizes only, no
// at::Tensor. The math is fastdl/reference/rnn.py; the time loop around these kernels (the GEMMs)
// is csrc/rnn_scan.h.
#pragma once
#include <cstdint>

namespace fastdl::rnn {

// PyTorch's cells. gx = x W_ih^T + b_ih and gh = h W_hh^T + b_hh, each of G * H columns:
//   Lstm (i, f, g, o):  c' = s(f) c + s(i) tanh(g),  h' = s(o) tanh(c')           (s: sigmoid)
//   Gru (r, z, n):      r = s(gx_r + gh_r), z = s(gx_z + gh_z), n = tanh(gx_n + r gh_n),
//                       h' = (1 - z) n + z h
//   RnnTanh / RnnRelu:  h' = act(gx + gh)
enum class Mode { Lstm, Gru, RnnTanh, RnnRelu };

constexpr int64_t gates_of(Mode m) { return m == Mode::Lstm ? 4 : m == Mode::Gru ? 3 : 1; }

// Columns of a workspace row (one per sequence and step): Lstm: the activated gates i, f, g, o,
// then c' (5 H); Gru: r, z, n, then gh_n (4 H); the plain cells keep nothing (h' is the output).
constexpr int64_t workspace_of(Mode m, int64_t H) { return m == Mode::Lstm ? 5 * H : m == Mode::Gru ? 4 * H : 0; }

// One step of B rows (the sequences active at it). Every array is dense, row-major, row r of B.
// Gate math is float (double for double T), inputs and outputs T.
template <typename T>
struct StepForward {
  Mode mode;
  int64_t B, H;
  const T* gx;  // [B][G * H]
  const T* gh;  // [B][G * H]
  T* h;         // [B][H]: in, h (Gru reads it); out, h'
  T* c;         // [B][H], Lstm only: in, c; out, c'
  T* out;       // [B][H]: h' again (the step's rows of the layer's output)
  T* ws;        // [B][workspace_of(mode, H)], or nullptr: nothing saved for backward
};

// The gradients of one step, given the gradient of its h' (grad_out + the carry from later steps).
template <typename T>
struct StepBackward {
  Mode mode;
  int64_t B, H;
  const T* grad_out;  // [B][H]: the loss's gradient of the step's output rows
  T* dh;              // [B][H]: in, the gradient reaching h' from later steps (and h_n); out (Gru
                      // only), the part of h's gradient that skips gh: dh' z (the caller adds
                      // dgh W_hh; for the others it overwrites dh with dgx W_hh)
  T* dc;              // [B][H], Lstm only: in, the gradient reaching c'; out, c's
  const T* h_prev;    // [B][H]: h (Gru reads it)
  const T* c_prev;    // [B][H], Lstm only: c
  const T* out;       // [B][H]: h' (RnnTanh / RnnRelu read it)
  const T* ws;        // [B][workspace_of(mode, H)], as written by the forward step
  T* dgx;             // [B][G * H]: gradient of gx
  T* dgh;             // [B][G * H]: gradient of gh; Gru only (the others' equals dgx), else unused
};

}  // namespace fastdl::rnn
