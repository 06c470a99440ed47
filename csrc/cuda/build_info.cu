// Compiled by nvcc: reports the CUDA version and the architectures the CUDA objects target.
#include <cuda_runtime_api.h>

#include "build_info.h"

#define FASTDL_STR2(...) #__VA_ARGS__
#define FASTDL_STR(...) FASTDL_STR2(__VA_ARGS__)

namespace fastdl::cuda {

std::string build_info() {
  std::string info = "cuda=" + std::to_string(CUDART_VERSION / 1000) + "." +
                     std::to_string(CUDART_VERSION % 1000 / 10);
  return info + ";cuda_archs=" FASTDL_STR(__CUDA_ARCH_LIST__);
}

}  // namespace fastdl::cuda
