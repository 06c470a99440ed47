// Shared by the Autograd-key kernels of csrc/autograd/<op>.cpp: typed handles to the fastdl ops,
// for redispatching below autograd to the CPU / CUDA kernels (the Triton ones included).
//
// Each forward op's Autograd kernel is a torch::autograd::Function: its forward calls the op below
// autograd, so a training call goes from the module's Python straight to the kernel; its backward
// runs in the autograd engine without Python. With create_graph=True (grad mode on during
// backward) it calls the backward op through the dispatcher instead, reaching that op's autograd,
// registered from Python (fastdl/ops/<op>.py): its derivative formula, or a NotImplementedError.
#pragma once
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>

#include <optional>

namespace fastdl::autograd {

using at::Tensor;
using OptTensor = std::optional<Tensor>;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// The typed handle of fastdl::<name> (looked up once per call site: keep it in a static).
template <typename Fn>
c10::TypedOperatorHandle<Fn> op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Fn>();
}

inline bool requires_grad(const Tensor& t) { return t.defined() && t.requires_grad(); }
inline bool requires_grad(const OptTensor& t) { return t.has_value() && requires_grad(*t); }

// Whether a call will record a gradient: grad mode on and one of `tensors` requires grad.
template <typename... Ts>
bool needs_grad(const Ts&... tensors) {
  return at::GradMode::is_enabled() && (requires_grad(tensors) || ...);
}

// A saved optional tensor: undefined when absent.
inline OptTensor optional(const Tensor& t) { return t.defined() ? OptTensor(t) : std::nullopt; }

}  // namespace fastdl::autograd
