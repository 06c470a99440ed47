// The element types of the CUDA kernels: each one's arithmetic type (float for fp16 / bf16 / fp32,
// double for fp64) and the conversions to and from it, shared by the .cu files.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#define FASTDL_CUDA_HD __host__ __device__ __forceinline__

namespace fastdl::cuda {

template <typename T>
struct AccOf {
  using type = float;
};
template <>
struct AccOf<double> {
  using type = double;
};
template <typename T>
using Acc = typename AccOf<T>::type;

FASTDL_CUDA_HD float to_acc(float v) { return v; }
FASTDL_CUDA_HD double to_acc(double v) { return v; }
FASTDL_CUDA_HD float to_acc(__half v) { return __half2float(v); }
FASTDL_CUDA_HD float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }

FASTDL_CUDA_HD void store(float* p, float v) { *p = v; }
FASTDL_CUDA_HD void store(double* p, double v) { *p = v; }
FASTDL_CUDA_HD void store(__half* p, float v) { *p = __float2half_rn(v); }
FASTDL_CUDA_HD void store(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }

}  // namespace fastdl::cuda
