// The CPU kernels' instruction sets and the dispatcher that picks one at run time (the way ATen's
// DispatchStub does). Each kernel file csrc/cpu/<op>.cpp is compiled once per ISA (setup.py), into
// namespace fastdl::cpu::<isa> (FASTDL_ISA is that name while it compiles):
//   baseline  x86-64-v2 (SSE4.2) on x86, the compiler's default elsewhere: no x86-only code;
//   avx2      x86-64-v3 (AVX2, FMA, BMI2, F16C);
//   avx512    x86-64-v4 (AVX-512 F/BW/CD/DQ/VL).
// The callers (csrc/cpu/<op>_api.cpp) go through FASTDL_CPU_DISPATCH, which runs the copy of
// kernel_isa(): the best ISA the CPU (and OS) supports, or a lower one asked for with
// FASTDL_CPU_ISA=baseline|avx2|avx512 or fastdl.set_cpu_isa().
#pragma once
#include <string>

namespace fastdl::cpu {

enum class Isa : int { Baseline = 0, Avx2 = 1, Avx512 = 2 };

const char* isa_name(Isa isa);

// The ISA the kernels run with now; throws (a clear RuntimeError) when this CPU cannot run even
// the baseline copy.
Isa kernel_isa();

// "key=value;..." for fastdl.info(): active, supported, compiled, reason, features.
std::string isa_info();

// Sets the ISA the kernels run with: a name (at most what the CPU supports, else a ValueError
// saying what it supports), or "" / "auto" for the start-up choice again (FASTDL_CPU_ISA, else the
// best supported). Returns the previous name.
std::string set_kernel_isa(const std::string& name);

// The ISA that `name` asks for on a CPU that supports up to `supported` ("baseline", "avx2" or
// "avx512"): the rule set_kernel_isa() and FASTDL_CPU_ISA follow, a ValueError naming `what` (the
// setting) for an unknown name or one above `supported`. Separate so that tests check it on any CPU.
Isa resolve_isa(const std::string& what, const std::string& name, const std::string& supported);

}  // namespace fastdl::cpu

// Declares the kernels of a header once per ISA namespace (a copy that setup.py does not build is
// declared but never referenced).
#define FASTDL_ISA_DECLARE(...)      \
  namespace baseline {               \
  __VA_ARGS__                        \
  }                                  \
  namespace avx2 {                   \
  __VA_ARGS__                        \
  }                                  \
  namespace avx512 {                 \
  __VA_ARGS__                        \
  }

// One case of FASTDL_CPU_DISPATCH: the copy of namespace `ns` for Isa::`isa`, where it is built.
#define FASTDL_ISA_CASE(isa, ns, fn, ...) \
  case ::fastdl::cpu::Isa::isa:           \
    ::fastdl::cpu::ns::fn(__VA_ARGS__);   \
    break;
#ifdef FASTDL_HAVE_AVX512
#define FASTDL_ISA_CASE_AVX512(fn, ...) FASTDL_ISA_CASE(Avx512, avx512, fn, __VA_ARGS__)
#else
#define FASTDL_ISA_CASE_AVX512(fn, ...)
#endif
#ifdef FASTDL_HAVE_AVX2
#define FASTDL_ISA_CASE_AVX2(fn, ...) FASTDL_ISA_CASE(Avx2, avx2, fn, __VA_ARGS__)
#else
#define FASTDL_ISA_CASE_AVX2(fn, ...)
#endif

// Calls the kernel_isa() copy of kernel `fn` (a void function of fastdl::cpu::<isa>).
#define FASTDL_CPU_DISPATCH(fn, ...)                  \
  do {                                                \
    switch (::fastdl::cpu::kernel_isa()) {            \
      FASTDL_ISA_CASE_AVX512(fn, __VA_ARGS__)         \
      FASTDL_ISA_CASE_AVX2(fn, __VA_ARGS__)           \
      default:                                        \
        ::fastdl::cpu::baseline::fn(__VA_ARGS__);     \
    }                                                 \
  } while (0)
