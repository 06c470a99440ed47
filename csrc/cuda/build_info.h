#pragma once
#include <string>

namespace fastdl::cuda {
// "cuda=<runtime version the objects were compiled against>;cuda_archs=<SM list>".
std::string build_info();
}  // namespace fastdl::cuda
