// The fastdl operator library: every schema, declared once. Kernels register in
// csrc/cpu/<op>_api.cpp (CPU), csrc/cuda/<op>_api.cpp (CUDA) or from Python (the Triton launchers
// of fastdl/triton/<op>.py, registered in fastdl/ops/<op>.py).
#include <Python.h>
#include <torch/library.h>

#include <string>

#include "cpu/isa.h"
#ifdef FASTDL_WITH_CUDA
#include "cuda/build_info.h"
#endif

namespace fastdl {

// "key=value;..." describing how this library was compiled; fastdl.info() parses it.
std::string build_info() {
#ifdef _OPENMP
  std::string info = "openmp=1";
#else
  std::string info = "openmp=0";
#endif
#ifdef FASTDL_WITH_CUDA
  info += ";" + cuda::build_info();
#else
  info += ";cuda=none";
#endif
  return info;
}

TORCH_LIBRARY(fastdl, m) {
  m.def("_build_info() -> str", &build_info);
  // The CPU kernels' ISA (csrc/cpu/isa.h): "key=value;..." with supported, compiled, features,
  // active and reason; setting it returns the previous ISA; resolving checks a request.
  m.def("_cpu_isa() -> str", &cpu::isa_info);
  m.def("_set_cpu_isa(str isa) -> str", &cpu::set_kernel_isa);
  m.def("_resolve_cpu_isa(str what, str isa, str supported) -> str",
        [](const std::string& what, const std::string& isa, const std::string& supported) -> std::string {
          return cpu::isa_name(cpu::resolve_isa(what, isa, supported));
        });
  // y = act(batch_norm(x) + residual); returns (y, mean, invstd, mask). mean/invstd are fp32 (fp64 for
  // fp64 x), the batch statistics in training and the running ones in eval; mask (bool, x's shape) is
  // act'(z) > 0, written only when save_mask and activation != "none", else empty.
  m.def(
      "batch_norm_act_forward(Tensor x, Tensor? weight, Tensor? bias, Tensor? residual, "
      "Tensor(a!)? running_mean, Tensor(b!)? running_var, bool training, float momentum, float eps, "
      "str activation, float slope, bool save_mask) -> (Tensor, Tensor, Tensor, Tensor)");
  // The batch statistics alone: per-channel (mean, M2) of x (N, C, *) over all but dim 1, M2 the sum
  // of squared deviations from the mean; fp32 (fp64 for fp64 x). Synchronized batch norm merges them
  // across processes, then normalizes with batch_norm_act_forward(training=False).
  m.def("batch_norm_stats(Tensor x) -> (Tensor, Tensor)");
  // Returns (grad_x, grad_weight, grad_bias, grad_residual); grad_residual is empty unless
  // residual_grad and activation != "none" (without an activation it equals grad_out).
  m.def(
      "batch_norm_act_backward(Tensor grad_out, Tensor x, Tensor? weight, Tensor mean, Tensor invstd, "
      "Tensor mask, bool training, str activation, float slope, bool residual_grad) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
  // Depthwise conv2d (weight (C * multiplier, 1, KH, KW), groups = C): y = act((conv(x) + bias) *
  // scale + shift), in x's memory format; activation "none", "relu" or "relu6".
  m.def(
      "depthwise_conv2d_forward(Tensor x, Tensor weight, Tensor? bias, Tensor? scale, Tensor? shift, "
      "int[2] stride, int[2] padding, int[2] dilation, str activation) -> Tensor");
  // Gradients of conv(x) (no epilogue): (grad_x in x's memory format, grad_weight of weight's shape);
  // each is empty unless asked for by output_mask.
  m.def(
      "depthwise_conv2d_backward(Tensor grad_out, Tensor x, Tensor weight, int[2] stride, int[2] padding, "
      "int[2] dilation, bool[2] output_mask) -> (Tensor, Tensor)");
  // Attention, FlashAttention-style. q (N, H, L, D), k (N, Hkv, S, D), v (N, Hkv, S, D), Hkv divides
  // H (query head h reads kv head h / (H / Hkv)); any strides. s = scale * q k^T + attn_mask, with
  // keys masked out by key_padding_mask (bool (N, S), True = attend), key_lengths (int64 (N,): keys
  // j >= len masked) and is_causal (j > i masked). attn_mask: q's dtype, additive, (N, H, L, S)
  // with stride 0 on broadcast dims. Dropout keeps a probability with the counter-based hash of
  // fastdl/reference/attention.py (same on every backend) and scales kept ones by 1 / (1 - p); seed
  // is an int64 scalar tensor on the CPU (a tensor, so torch.compile keeps its draw in the graph).
  // Returns (out, lse): out (N, H, L, D) stored (N, L, H, D)-contiguous; lse (N, H, L) fp32 (fp64
  // for fp64 q) = log sum_j exp(s_ij) over the attended keys, +inf for a row with none (its out
  // row is 0).
  m.def(
      "attention_forward(Tensor q, Tensor k, Tensor v, Tensor? attn_mask, Tensor? key_padding_mask, "
      "Tensor? key_lengths, bool is_causal, float scale, float dropout_p, Tensor seed) -> (Tensor, Tensor)");
  // Returns (grad_q, grad_k, grad_v) of q's, k's and v's shapes, stored like forward's out.
  m.def(
      "attention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
      "Tensor? attn_mask, Tensor? key_padding_mask, Tensor? key_lengths, bool is_causal, float scale, "
      "float dropout_p, Tensor seed) -> (Tensor, Tensor, Tensor)");
  // One layer and direction of a recurrent net, the time loop in C++ (fastdl/reference/rnn.py is
  // the contract). mode: "lstm" (gates i, f, g, o), "gru" (r, z, n), "rnn_tanh", "rnn_relu"; G = 4,
  // 3, 1 gates of size H. gates_x = x W_ih^T + b_ih for every step, precomputed: (T, N, G*H), or,
  // with batch_sizes (int64 (T,) on the CPU, non-increasing, batch_sizes[0] = N: a PackedSequence's),
  // packed (sum(batch_sizes), G*H), step t holding the first batch_sizes[t] sequences. h0 (N, H);
  // c0 (N, H) for "lstm" only; w_hh (G*H, H); b_hh (G*H,). reverse runs the steps from last to first.
  // Returns (output: gates_x's shape with H last, h_n (N, H): each sequence's last state, c_n
  // (N, H) for "lstm" else empty, workspace: what rnn_backward reads, empty unless save_workspace).
  m.def(
      "rnn_forward(Tensor gates_x, Tensor? batch_sizes, Tensor h0, Tensor? c0, Tensor w_hh, Tensor? b_hh, "
      "str mode, bool reverse, bool save_workspace) -> (Tensor, Tensor, Tensor, Tensor)");
  // One step of nn.LSTMCell / GRUCell / RNNCell (csrc/autograd/rnn_cell.cpp, composite: at::linear
  // then rnn_forward). input (N, I) or (I,); h0, c0 (c0 for "lstm" only) like input with H
  // features, or None for zeros; w_ih (G*H, I); w_hh (G*H, H); b_ih, b_hh (G*H,) or None.
  // Returns (h', c' for "lstm" else empty), shaped like h0.
  m.def(
      "rnn_cell(Tensor input, Tensor? h0, Tensor? c0, Tensor w_ih, Tensor w_hh, Tensor? b_ih, Tensor? b_hh, "
      "str mode) -> (Tensor, Tensor)");
  // Backpropagation through time over rnn_forward's steps; grad_c_n is read for "lstm" only.
  // Returns (grad_gates_x, grad_h0, grad_c0 (empty unless "lstm"), grad_w_hh, grad_b_hh).
  m.def(
      "rnn_backward(Tensor grad_output, Tensor grad_h_n, Tensor? grad_c_n, Tensor? batch_sizes, Tensor h0, "
      "Tensor? c0, Tensor w_hh, Tensor output, Tensor workspace, str mode, bool reverse) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");
}

}  // namespace fastdl

// An importable, empty Python module: loading it runs the registrations above.
extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}
