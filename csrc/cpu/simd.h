// What the ISA a kernel copy is compiled for offers (csrc/cpu/isa.h): the width of a vector
// register and how many there are, read from the compiler's own macros for the target. The kernels
// size their vectors and register tiles from these, so no copy's micro-kernel spills.
#pragma once

#ifndef FASTDL_ISA
#error "csrc/cpu/<op>.cpp is compiled once per ISA by setup.py, with -DFASTDL_ISA=<namespace>"
#endif

namespace fastdl::cpu::FASTDL_ISA {

#if defined(__AVX512F__)
constexpr int kVectorBytes = 64, kVectorRegisters = 32;  // zmm0-31
#elif defined(__AVX__)
constexpr int kVectorBytes = 32, kVectorRegisters = 16;  // ymm0-15
#elif defined(__aarch64__)
constexpr int kVectorBytes = 16, kVectorRegisters = 32;  // NEON v0-31
#else
constexpr int kVectorBytes = 16, kVectorRegisters = 16;  // xmm0-15 (SSE)
#endif

}  // namespace fastdl::cpu::FASTDL_ISA
