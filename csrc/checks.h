// Argument checks shared by the CPU and CUDA API files: each message names the argument and what
// was expected, and raises ValueError / TypeError in Python.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <optional>

namespace fastdl {

// An optional per-channel tensor: 1-D of size C, on x's device, of dtype `dtype`.
inline void check_per_channel(const std::optional<at::Tensor>& t, const char* name, int64_t C,
                              const at::Tensor& x, at::ScalarType dtype) {
  if (!t.has_value()) return;
  TORCH_CHECK_VALUE(t->dim() == 1 && t->size(0) == C, name, ": expected shape (", C,
                    ",) (one value per channel of x), got ", t->sizes());
  TORCH_CHECK_VALUE(t->device() == x.device(), name, ": expected device ", x.device(), " (x's), got ",
                    t->device());
  TORCH_CHECK_TYPE(t->scalar_type() == dtype, name, ": expected dtype ", dtype, ", got ",
                   t->scalar_type());
}

// A tensor that must match x in shape, dtype and device.
inline void check_like_x(const at::Tensor& t, const char* name, const at::Tensor& x) {
  TORCH_CHECK_VALUE(t.sizes() == x.sizes(), name, ": expected shape ", x.sizes(), " (x's), got ",
                    t.sizes());
  TORCH_CHECK_TYPE(t.scalar_type() == x.scalar_type(), name, ": expected dtype ", x.scalar_type(),
                   " (x's), got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.device() == x.device(), name, ": expected device ", x.device(), " (x's), got ",
                    t.device());
}

// NCHW-style tensors keep their memory format: channels_last when x is (N, C, H, W) stored so.
inline at::MemoryFormat memory_format_of(const at::Tensor& x) {
  return x.dim() == 4 ? x.suggest_memory_format() : at::MemoryFormat::Contiguous;
}

}  // namespace fastdl
