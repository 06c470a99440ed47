// fastdl::rnn_cell: one step of nn.LSTMCell / GRUCell / RNNCell in one call from Python: the
// checks (messages naming the module's arguments: input, hx, hx[0] (h), hx[1] (c)), the input
// projection (at::linear), then rnn_forward over one step (its Autograd kernel: csrc/autograd/rnn.cpp).
// CompositeImplicitAutograd: its gradient is linear's and rnn_forward's, and torch.compile traces
// through it to those ops. fastdl/nn/rnn.py calls it when no autocast applies and a kernel does.
#include <torch/library.h>

#include <sstream>
#include <string>

#include "autograd/autograd.h"

namespace fastdl::autograd {
namespace {

using ForwardFn = std::tuple<Tensor, Tensor, Tensor, Tensor>(const Tensor&, const OptTensor&, const Tensor&,
                                                             const OptTensor&, const Tensor&, const OptTensor&,
                                                             std::string, bool, bool);

// How Python prints a shape and a dtype, so the messages read as the module's Python checks'.
std::string py_shape(at::IntArrayRef s) {
  std::ostringstream out;
  out << "(";
  for (size_t i = 0; i < s.size(); ++i) out << (i ? ", " : "") << s[i];
  out << (s.size() == 1 ? ",)" : ")");
  return out.str();
}

std::string py_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return "torch.float32";
    case at::kDouble: return "torch.float64";
    case at::kHalf: return "torch.float16";
    case at::kBFloat16: return "torch.bfloat16";
    default: return std::string("torch.") + c10::toString(t);
  }
}

void check_input(const Tensor& x, const Tensor& w_ih) {
  TORCH_CHECK_VALUE(x.dim() == 1 || x.dim() == 2, "input: expected 1-D or 2-D, got ", x.dim(), "-D");
  TORCH_CHECK_VALUE(x.size(-1) == w_ih.size(1), "input: expected size ", w_ih.size(1),
                    " (input_size) in its last dim, got ", x.size(-1));
  TORCH_CHECK_TYPE(x.scalar_type() == w_ih.scalar_type(), "input: expected dtype ", py_dtype(w_ih.scalar_type()),
                   " (the module's parameters'), got ", py_dtype(x.scalar_type()));
  TORCH_CHECK_VALUE(x.device() == w_ih.device(), "input: expected device ", w_ih.device(),
                    " (the module's parameters'), got ", x.device());
}

// A state given as hx: the shape (N, H) (H unbatched), x's dtype and device; (1, H) as the kernel takes it.
Tensor checked_state(const Tensor& t, const char* name, at::IntArrayRef shape, const Tensor& x) {
  TORCH_CHECK_VALUE(t.sizes() == shape, name, ": expected shape ", py_shape(shape), ", got ", py_shape(t.sizes()));
  TORCH_CHECK_TYPE(t.scalar_type() == x.scalar_type(), name, ": expected dtype ", py_dtype(x.scalar_type()),
                   " (input's), got ", py_dtype(t.scalar_type()));
  TORCH_CHECK_VALUE(t.device() == x.device(), name, ": expected device ", x.device(), " (input's), got ", t.device());
  return x.dim() == 1 ? t.unsqueeze(0) : t;
}

// input (N, I) or (I,); h0, c0 (c0 for "lstm" only): (N, H) or (H,) like input, or None for zeros;
// w_ih (G*H, I), w_hh (G*H, H), b_ih, b_hh (G*H,) or None. Returns (h', c' for "lstm" else empty),
// (N, H) or (H,) like input.
std::tuple<Tensor, Tensor> rnn_cell(const Tensor& input, const OptTensor& h0, const OptTensor& c0,
                                    const Tensor& w_ih, const Tensor& w_hh, const OptTensor& b_ih,
                                    const OptTensor& b_hh, std::string mode) {
  static const auto forward = op<ForwardFn>("fastdl::rnn_forward");
  check_input(input, w_ih);
  const bool batched = input.dim() == 2, lstm = mode == "lstm";
  const Tensor x = batched ? input : input.unsqueeze(0);
  const int64_t H = w_hh.size(1);
  const std::vector<int64_t> shape = batched ? std::vector<int64_t>{x.size(0), H} : std::vector<int64_t>{H};
  Tensor h, c;
  if (h0.has_value()) {
    h = checked_state(*h0, lstm ? "hx[0] (h)" : "hx", shape, input);
    if (lstm) {
      TORCH_CHECK_VALUE(c0.has_value(), "hx: expected a pair (h, c) for an LSTM cell, got h alone");
      c = checked_state(*c0, "hx[1] (c)", shape, input);
    }
  } else {
    h = at::zeros({x.size(0), H}, x.options());
    if (lstm) c = h;
  }
  const Tensor gates_x = at::linear(x, w_ih, b_ih).unsqueeze(0);
  const bool save = needs_grad(x, h, c, w_ih, w_hh, b_ih, b_hh);
  auto [out, h_new, c_new, ws] =
      forward.call(gates_x, std::nullopt, h, lstm ? OptTensor(c) : std::nullopt, w_hh, b_hh, mode, false, save);
  if (batched) return {h_new, c_new};
  return {h_new.squeeze(0), lstm ? c_new.squeeze(0) : c_new};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastdl, CompositeImplicitAutograd, m) { m.impl("rnn_cell", &rnn_cell); }

}  // namespace fastdl::autograd
