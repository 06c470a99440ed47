// Recurrent layers: argument checks and the time loop shared by the CPU and CUDA API files
// (csrc/{cpu,cuda}/rnn_api.cpp). Per step, the recurrent GEMM runs through ATen (MKL / cuBLAS on
// the current stream), then the device's fused pointwise kernel (csrc/rnn.h); backward through
// time is the same loop in reverse, and the weight gradients are one GEMM after it.
#pragma once
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include <algorithm>
#include <cstdint>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "rnn.h"

namespace fastdl::rnn {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

inline Mode parse_mode(const std::string& name) {
  if (name == "lstm") return Mode::Lstm;
  if (name == "gru") return Mode::Gru;
  if (name == "rnn_tanh") return Mode::RnnTanh;
  if (name == "rnn_relu") return Mode::RnnRelu;
  TORCH_CHECK_VALUE(false, "mode: expected one of 'lstm', 'gru', 'rnn_tanh', 'rnn_relu', got '", name, "'");
}

// The checked sizes of a call and where each step's rows are: step t holds rows
// [offset[t], offset[t] + size[t]) of the (S, .) packed arrays.
struct Args {
  Mode mode;
  int64_t T, N, H, G, S;
  bool packed;
  std::vector<int64_t> offset, size;
};

inline void check_same(const Tensor& t, const char* name, const Tensor& like, const char* like_name) {
  TORCH_CHECK_TYPE(t.scalar_type() == like.scalar_type(), name, ": expected dtype ", like.scalar_type(), " (",
                   like_name, "'s), got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.device() == like.device(), name, ": expected device ", like.device(), " (", like_name,
                    "'s), got ", t.device());
}

inline void check_shape(const Tensor& t, const char* name, at::IntArrayRef expected) {
  TORCH_CHECK_VALUE(t.sizes() == expected, name, ": expected shape ", expected, ", got ", t.sizes());
}

// Checks the states and recurrent weight shared by rnn_forward and rnn_backward (messages name the
// argument); returns the args with the sizes they fix (mode, N, H, G).
inline Args check_states(const Tensor& h0, const OptTensor& c0, const Tensor& w_hh, const std::string& mode) {
  Args a{};
  a.mode = parse_mode(mode);
  TORCH_CHECK_VALUE(h0.dim() == 2, "h0: expected a 2-D (N, H) tensor, got ", h0.dim(), "-D");
  TORCH_CHECK_TYPE(h0.is_floating_point(), "h0: expected a floating-point dtype, got ", h0.scalar_type());
  a.N = h0.size(0), a.H = h0.size(1), a.G = gates_of(a.mode);
  check_same(w_hh, "w_hh", h0, "h0");
  check_shape(w_hh, "w_hh", {a.G * a.H, a.H});
  if (a.mode == Mode::Lstm) {
    TORCH_CHECK_VALUE(c0.has_value(), "c0: expected an (N, H) cell state for mode 'lstm', got None");
    check_same(*c0, "c0", h0, "h0");
    check_shape(*c0, "c0", {a.N, a.H});
  } else {
    TORCH_CHECK_VALUE(!c0.has_value(), "c0: expected None for mode '", mode, "' (only 'lstm' has a cell state)");
  }
  return a;
}

// Checks a per-step tensor `seq` of `width` columns, (T, N, width) or packed (S, width) with
// batch_sizes, and fills in the steps of `a`.
inline void lay_out(Args& a, const Tensor& seq, const char* name, int64_t width, const OptTensor& batch_sizes) {
  a.packed = batch_sizes.has_value();
  if (!a.packed) {
    TORCH_CHECK_VALUE(seq.dim() == 3 && seq.size(1) == a.N && seq.size(2) == width, name, ": expected shape (T, ",
                      a.N, ", ", width, ") (N from h0, H = ", a.H, "), got ", seq.sizes());
    a.T = seq.size(0), a.S = a.T * a.N;
    for (int64_t t = 0; t < a.T; ++t) a.offset.push_back(t * a.N), a.size.push_back(a.N);
    return;
  }
  const Tensor& bs = *batch_sizes;
  TORCH_CHECK_VALUE(bs.dim() == 1 && bs.scalar_type() == at::kLong && bs.device().is_cpu(),
                    "batch_sizes: expected a 1-D int64 CPU tensor, got ", bs.dim(), "-D ", bs.scalar_type(), " on ",
                    bs.device());
  TORCH_CHECK_VALUE(seq.dim() == 2 && seq.size(1) == width, name, ": expected packed shape (S, ", width,
                    ") with batch_sizes (H = ", a.H, "), got ", seq.sizes());
  const Tensor sizes = bs.contiguous();
  const int64_t* b = sizes.data_ptr<int64_t>();
  a.T = bs.numel(), a.S = 0;
  for (int64_t t = 0; t < a.T; ++t) {
    TORCH_CHECK_VALUE(b[t] > 0 && b[t] <= (t ? b[t - 1] : a.N) && (t || b[0] == a.N),
                      "batch_sizes: expected positive, non-increasing sizes starting at N = ", a.N,
                      " (h0's first dim), got ", bs);
    a.offset.push_back(a.S), a.size.push_back(b[t]);
    a.S += b[t];
  }
  TORCH_CHECK_VALUE(seq.size(0) == a.S, name, ": expected ", a.S, " rows (the sum of batch_sizes), got ",
                    seq.size(0));
}

// Checks rnn_forward's arguments and lays out the steps.
inline Args check_forward(const Tensor& gates_x, const OptTensor& batch_sizes, const Tensor& h0, const OptTensor& c0,
                          const Tensor& w_hh, const OptTensor& b_hh, const std::string& mode) {
  Args a = check_states(h0, c0, w_hh, mode);
  check_same(gates_x, "gates_x", h0, "h0");
  if (b_hh.has_value()) {
    check_same(*b_hh, "b_hh", h0, "h0");
    check_shape(*b_hh, "b_hh", {a.G * a.H});
  }
  lay_out(a, gates_x, "gates_x", a.G * a.H, batch_sizes);
  return a;
}

// The shape of a layer output (or its gradient) for these args: (T, N, H), or (S, H) packed.
inline std::vector<int64_t> output_shape(const Args& a) {
  return a.packed ? std::vector<int64_t>{a.S, a.H} : std::vector<int64_t>{a.T, a.N, a.H};
}

template <typename T>
T* ptr(const Tensor& t) {
  return t.numel() ? reinterpret_cast<T*>(t.data_ptr()) : nullptr;
}

// A new (rows, cols) tensor for a per-step array. On the CPU, a large one is first marked for
// transparent huge pages (where the kernel honours madvise): fresh large blocks come straight from
// mmap, and faulting them in 4 KiB at a time costs about a tenth of an LSTM layer's time.
inline Tensor empty_steps(int64_t rows, int64_t cols, const at::TensorOptions& opts) {
  Tensor t = at::empty({rows, cols}, opts);
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  const auto begin = reinterpret_cast<uintptr_t>(t.data_ptr()), end = begin + t.nbytes();
  const uintptr_t first = (begin + kHuge - 1) & ~(kHuge - 1), last = end & ~(kHuge - 1);
  if (t.is_cpu() && last > first) madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
#endif
  return t;
}

// (S, H): the rows each step's cell read as its previous state: the step before it in the loop
// (t - 1, or t + 1 when reverse) where that step ran the sequence, else `init` (h0 or c0).
inline Tensor previous(const Args& a, const Tensor& seq, const Tensor& init, bool reverse) {
  Tensor prev = empty_steps(a.S, seq.size(1), seq.options());
  if (!a.packed && a.T > 0) {
    const int64_t rest = a.S - a.N;
    prev.narrow(0, reverse ? rest : 0, a.N).copy_(init);
    prev.narrow(0, reverse ? 0 : a.N, rest).copy_(seq.narrow(0, reverse ? a.N : 0, rest));
    return prev;
  }
  for (int64_t t = 0; t < a.T; ++t) {
    const int64_t p = reverse ? t + 1 : t - 1, B = a.size[t];
    const int64_t from_seq = (p < 0 || p >= a.T) ? 0 : std::min(B, a.size[p]);
    if (from_seq) prev.narrow(0, a.offset[t], from_seq).copy_(seq.narrow(0, a.offset[p], from_seq));
    if (B > from_seq) prev.narrow(0, a.offset[t] + from_seq, B - from_seq).copy_(init.narrow(0, from_seq, B - from_seq));
  }
  return prev;
}

// The GEMMs. CPU float32 runs them through oneDNN, the library nn.LSTM's CPU kernel is built on,
// reached through two ops PyTorch registers for it: `mkldnn::_reorder_linear_weight` packs W_hh
// once per call into oneDNN's blocked layout, `mkldnn::_linear_pointwise` computes x w^T (+ b)
// (x made contiguous; w packed, or dense and read in place, strided or not). At large shapes that
// is ~2x MKL's sgemm where MKL takes a slow path (AMD CPUs: 150 vs 300-400 GFLOP/s on 2 cores);
// small GEMMs stay on MKL (use_onednn).
// Everything else (double, CUDA, a torch without the ops or with another C++ signature for them,
// torch.backends.mkldnn.enabled = False) runs ATen's mm (MKL / cuBLAS).
using LinearFn = Tensor(const Tensor&, const Tensor&, const OptTensor&, c10::string_view,
                        c10::List<std::optional<c10::Scalar>>, std::optional<c10::string_view>);
using PackFn = Tensor(const Tensor&, std::optional<int64_t>);

template <typename Fn>
std::optional<c10::TypedOperatorHandle<Fn>> find_cpu_op(const char* name) {
  const auto handle = c10::Dispatcher::singleton().findSchema({name, ""});
  if (!handle || !handle->hasKernelForDispatchKey(c10::DispatchKey::CPU)) return std::nullopt;
  try {
    return handle->template typed<Fn>();
  } catch (const c10::Error&) {
    return std::nullopt;
  }
}

struct OneDnnOps {
  std::optional<c10::TypedOperatorHandle<LinearFn>> linear;
  std::optional<c10::TypedOperatorHandle<PackFn>> pack;
};

inline const OneDnnOps& onednn_ops() {
  static const OneDnnOps ops{find_cpu_op<LinearFn>("mkldnn::_linear_pointwise"),
                             find_cpu_op<PackFn>("mkldnn::_reorder_linear_weight")};
  return ops;
}

// Whether a (rows x inner) by (inner x cols) GEMM on t's device and dtype runs on oneDNN. Each
// oneDNN call costs a fixed ~30-40 us (measured on a 2-core AVX2 AMD EPYC, w packed or not), and
// at an inner size below 256 it is slower than MKL even past that: it pays from 2^21
// multiply-adds at inner >= 256 (8 rows at H = 256 for an LSTM step); smaller GEMMs run ATen's mm.
inline bool use_onednn(const Tensor& t, int64_t rows, int64_t cols, int64_t inner) {
  constexpr int64_t kMinMacs = int64_t(1) << 21, kMinInner = 256;
  return t.is_cpu() && t.scalar_type() == at::kFloat && inner >= kMinInner && rows * cols * inner >= kMinMacs &&
         at::globalContext().userEnabledMkldnn() && onednn_ops().linear && onednn_ops().pack;
}

// w (out, in) packed for x w^T with x of about `rows` rows (use_onednn must hold).
// A single step (a cell) reads w once: packing it would cost about what it saves, so oneDNN then
// reads it in place, strided or not.
inline Tensor onednn_pack(const Tensor& w, int64_t rows, int64_t steps) {
  if (steps < 2) return w;
  const at::NoGradGuard no_grad;
  const c10::impl::ExcludeDispatchKeyGuard no_autograd(c10::autograd_dispatch_keyset);
  return onednn_ops().pack->call(w.contiguous(), std::max<int64_t>(rows, 1));
}

// x w^T (+ b): a new (x.size(0), w.size(0)) tensor (use_onednn must hold).
inline Tensor onednn_linear(const Tensor& x, const Tensor& w, const OptTensor& b) {
  const at::NoGradGuard no_grad;
  const c10::impl::ExcludeDispatchKeyGuard no_autograd(c10::autograd_dispatch_keyset);
  return onednn_ops().linear->call(x, w, b, "none", c10::List<std::optional<c10::Scalar>>(), std::nullopt);
}

// g^T x for g (S, M) and x (S, K) (use_onednn must hold): a new (M, K) tensor. oneDNN's first
// operand is made contiguous: x^T (and the (K, M) result transposed) or g^T, whichever copies less.
inline Tensor onednn_weight_grad(const Tensor& g, const Tensor& x) {
  const int64_t S = g.size(0), M = g.size(1), K = x.size(1);
  if (S * M <= S * K + M * K) return onednn_linear(g.t(), x.t(), std::nullopt);
  return onednn_linear(x.t(), g.t(), std::nullopt).t().contiguous();
}

// rnn_forward: for each step (in loop order), gh = h W_hh^T + b_hh on its rows, then step(params).
// T is the kernels' element type (same size as the tensors' dtype).
template <typename T, typename Step>
std::tuple<Tensor, Tensor, Tensor, Tensor> scan_forward(const Args& a, const Tensor& gates_x, const Tensor& h0,
                                                        const OptTensor& c0, const Tensor& w_hh, const OptTensor& b_hh,
                                                        bool reverse, bool save_workspace, Step step) {
  const int64_t GH = a.G * a.H, W = workspace_of(a.mode, a.H);
  const Tensor gx = gates_x.reshape({a.S, GH}).contiguous(), w_t = w_hh.t();
  const auto opts = gates_x.options();
  const bool onednn = use_onednn(h0, a.N, GH, a.H);
  const Tensor w = onednn ? onednn_pack(w_hh, a.N, a.T) : w_hh;
  const OptTensor b = onednn && b_hh.has_value() ? OptTensor(b_hh->contiguous()) : b_hh;
  Tensor out = empty_steps(a.S, a.H, opts), h = h0.contiguous().clone();
  Tensor c = a.mode == Mode::Lstm ? c0->contiguous().clone() : at::empty({0}, opts);
  Tensor ws = empty_steps(save_workspace ? a.S : 0, W, opts), gh = at::empty({onednn ? 0 : a.N, GH}, opts);
  for (int64_t k = 0; k < a.T; ++k) {
    const int64_t t = reverse ? a.T - 1 - k : k, off = a.offset[t], B = a.size[t];
    if (onednn) {
      gh = onednn_linear(h.narrow(0, 0, B), w, b);  // a new (B, G*H) tensor
    } else {
      Tensor ghB = gh.narrow(0, 0, B);
      b_hh.has_value() ? at::addmm_out(ghB, *b_hh, h.narrow(0, 0, B), w_t) : at::mm_out(ghB, h.narrow(0, 0, B), w_t);
    }
    step(StepForward<T>{a.mode, B, a.H, ptr<T>(gx) + off * GH, ptr<T>(gh), ptr<T>(h), ptr<T>(c),
                        ptr<T>(out) + off * a.H, save_workspace ? ptr<T>(ws) + off * W : nullptr});
  }
  return {out.view(output_shape(a)), h, c, ws};
}

// Checks rnn_backward's arguments and lays out the steps.
inline Args check_backward(const Tensor& grad_output, const Tensor& grad_h_n, const OptTensor& grad_c_n,
                           const OptTensor& batch_sizes, const Tensor& h0, const OptTensor& c0, const Tensor& w_hh,
                           const Tensor& output, const Tensor& workspace, const std::string& mode) {
  Args a = check_states(h0, c0, w_hh, mode);
  lay_out(a, output, "output", a.H, batch_sizes);
  check_shape(grad_output, "grad_output", output.sizes());
  check_shape(grad_h_n, "grad_h_n", {a.N, a.H});
  check_shape(workspace, "workspace", {a.S, workspace_of(a.mode, a.H)});
  for (auto [t, name] : {std::pair{&grad_output, "grad_output"}, {&grad_h_n, "grad_h_n"}, {&output, "output"},
                         {&workspace, "workspace"}}) {
    check_same(*t, name, h0, "h0");
  }
  if (a.mode == Mode::Lstm) {
    TORCH_CHECK_VALUE(grad_c_n.has_value(), "grad_c_n: expected an (N, H) tensor for mode 'lstm', got None");
    check_same(*grad_c_n, "grad_c_n", h0, "h0");
    check_shape(*grad_c_n, "grad_c_n", {a.N, a.H});
  }
  return a;
}

// rnn_backward: the steps in reverse loop order; per step the pointwise gradients, then the
// carry dh = (Gru: dh' z +) dgh W_hh; after the loop grad_w_hh = dgh^T h_prev, grad_b_hh = sum dgh.
template <typename T, typename Step>
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> scan_backward(
    const Args& a, const Tensor& grad_output, const Tensor& grad_h_n, const OptTensor& grad_c_n, const Tensor& h0,
    const OptTensor& c0, const Tensor& w_hh, const Tensor& output, const Tensor& workspace, bool reverse, Step step) {
  const int64_t GH = a.G * a.H, W = workspace_of(a.mode, a.H);
  const bool lstm = a.mode == Mode::Lstm, gru = a.mode == Mode::Gru;
  const auto opts = output.options();
  const Tensor go = grad_output.reshape({a.S, a.H}).contiguous(), out = output.reshape({a.S, a.H}).contiguous();
  const bool onednn = use_onednn(h0, a.N, a.H, GH);
  // oneDNN computes x w^T: the carry dgx W_hh is dgx (W_hh^T)^T.
  const Tensor ws = workspace.contiguous(), w = onednn ? onednn_pack(w_hh.t(), a.N, a.T) : w_hh.contiguous();
  const Tensor h_prev = previous(a, out, h0, reverse);
  const Tensor c_prev = lstm ? previous(a, ws.narrow(1, 4 * a.H, a.H), *c0, reverse) : at::empty({0}, opts);
  Tensor dgx = empty_steps(a.S, GH, opts), dgh = gru ? empty_steps(a.S, GH, opts) : dgx;
  Tensor dh = grad_h_n.contiguous().clone();
  Tensor dc = lstm ? grad_c_n->contiguous().clone() : at::empty({0}, opts);
  for (int64_t k = 0; k < a.T; ++k) {
    const int64_t t = reverse ? k : a.T - 1 - k, off = a.offset[t], B = a.size[t];
    step(StepBackward<T>{a.mode, B, a.H, ptr<T>(go) + off * a.H, ptr<T>(dh), ptr<T>(dc),
                         ptr<T>(h_prev) + off * a.H, lstm ? ptr<T>(c_prev) + off * a.H : nullptr,
                         ptr<T>(out) + off * a.H, ptr<T>(ws) + off * W, ptr<T>(dgx) + off * GH,
                         ptr<T>(dgh) + off * GH});
    Tensor dhB = dh.narrow(0, 0, B);
    if (onednn) {
      const Tensor carry = onednn_linear(dgh.narrow(0, off, B), w, std::nullopt);
      gru ? dhB.add_(carry) : dhB.copy_(carry);
    } else if (gru) {
      dhB.addmm_(dgh.narrow(0, off, B), w);
    } else {
      at::mm_out(dhB, dgx.narrow(0, off, B), w);
    }
  }
  Tensor grad_w_hh = use_onednn(h0, GH, a.H, a.S) ? onednn_weight_grad(dgh, h_prev) : dgh.t().mm(h_prev);
  Tensor grad_b_hh = dgh.sum(0);
  return {dgx.view(a.packed ? std::vector<int64_t>{a.S, GH} : std::vector<int64_t>{a.T, a.N, GH}), dh, dc,
          grad_w_hh, grad_b_hh};
}

}  // namespace fastdl::rnn
