// The dispatcher of csrc/cpu/isa.h: what the CPU supports (cpuid, read once), which ISA the
// kernels run with and why. Compiled once, for the default target (no -march): it runs on any CPU.
#include "cpu/isa.h"

#include <c10/util/Exception.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <mutex>

namespace fastdl::cpu {
namespace {

constexpr const char* kNames[] = {"baseline", "avx2", "avx512"};

// The best copy setup.py built.
constexpr int kCompiled =
#if defined(FASTDL_HAVE_AVX512)
    2;
#elif defined(FASTDL_HAVE_AVX2)
    1;
#else
    0;
#endif

// What the CPU supports: the best ISA (-1: not even the baseline) and its features, by name.
struct Cpu {
  int supported;
  std::string features;
};

Cpu detect() {
  Cpu c{0, ""};
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  // __builtin_cpu_supports checks the OS saves the vector state too (XCR0), not only cpuid.
#define FASTDL_FEATURE(name) \
  if (__builtin_cpu_supports(name)) c.features += std::string(c.features.empty() ? "" : ",") + name;
  FASTDL_FEATURE("sse4.2") FASTDL_FEATURE("popcnt") FASTDL_FEATURE("avx") FASTDL_FEATURE("avx2")
  FASTDL_FEATURE("fma") FASTDL_FEATURE("bmi2") FASTDL_FEATURE("f16c") FASTDL_FEATURE("avx512f")
  FASTDL_FEATURE("avx512bw") FASTDL_FEATURE("avx512cd") FASTDL_FEATURE("avx512dq") FASTDL_FEATURE("avx512vl")
  FASTDL_FEATURE("avx512vnni") FASTDL_FEATURE("avx512bf16") FASTDL_FEATURE("amx-bf16")
#undef FASTDL_FEATURE
  c.supported = __builtin_cpu_supports("x86-64-v4")   ? 2
                : __builtin_cpu_supports("x86-64-v3") ? 1
                : __builtin_cpu_supports("x86-64-v2") ? 0
                                                      : -1;
#endif
  return c;
}

const Cpu& cpu() {
  static const Cpu c = detect();
  return c;
}

const char* supported_name() { return cpu().supported < 0 ? "none" : kNames[cpu().supported]; }

// The ISA in force (-1 until set), and why; the reason is written under the mutex, before the ISA.
std::atomic<int> g_active{-1};
std::mutex g_mutex;
std::string g_reason;

// Sets the ISA from a resolved request (the copy is the best built one at or below it).
void activate(int asked, const std::string& why) {
  const int isa = std::min(asked, kCompiled);
  g_reason = why + (isa < asked ? std::string(" (") + kNames[asked] + " asked, but its copy is not built)" : "");
  g_active.store(isa, std::memory_order_release);
}

int index_of(const std::string& what, const std::string& name) {
  for (int i = 0; i < 3; ++i)
    if (name == kNames[i]) return i;
  TORCH_CHECK_VALUE(false, what, ": expected one of baseline, avx2, avx512 (or auto), got '", name, "'");
  return -1;
}

// The start-up choice (g_mutex held): FASTDL_CPU_ISA, else the best the CPU supports.
void choose_at_start() {
  TORCH_CHECK(cpu().supported >= 0,
              "fastdl's C++ CPU kernels need an x86-64-v2 CPU (SSE4.2, SSSE3, POPCNT); this one has: ", cpu().features);
  const char* env = std::getenv("FASTDL_CPU_ISA");
  if (env && *env && std::string(env) != "auto") {
    activate(static_cast<int>(resolve_isa("FASTDL_CPU_ISA", env, supported_name())),
             std::string("FASTDL_CPU_ISA=") + env);
  } else {
    activate(cpu().supported, "the best this CPU supports");
  }
}

int init() {
  std::lock_guard<std::mutex> lock(g_mutex);
  if (g_active.load(std::memory_order_acquire) < 0) choose_at_start();
  return g_active.load(std::memory_order_acquire);
}

}  // namespace

const char* isa_name(Isa isa) { return kNames[static_cast<int>(isa)]; }

Isa resolve_isa(const std::string& what, const std::string& name, const std::string& supported) {
  const int asked = index_of(what, name), best = supported == "none" ? -1 : index_of("supported", supported);
  TORCH_CHECK_VALUE(asked <= best, what, ": '", name, "' is more than this CPU supports (",
                    best < 0 ? std::string("none") : std::string(kNames[best]), "); it can only be lowered");
  return static_cast<Isa>(asked);
}

Isa kernel_isa() {
  const int isa = g_active.load(std::memory_order_acquire);
  return static_cast<Isa>(isa >= 0 ? isa : init());
}

std::string set_kernel_isa(const std::string& name) {
  const std::string previous = isa_name(kernel_isa());
  std::lock_guard<std::mutex> lock(g_mutex);
  if (name.empty() || name == "auto") {
    choose_at_start();
  } else {
    activate(static_cast<int>(resolve_isa("isa", name, supported_name())), "set by fastdl.set_cpu_isa('" + name + "')");
  }
  return previous;
}

std::string isa_info() {
  std::string compiled;
  for (int i = 0; i <= kCompiled; ++i) compiled += std::string(i ? "," : "") + kNames[i];
  const std::string head = std::string("supported=") + supported_name() + ";compiled=" + compiled +
                           ";features=" + cpu().features;
  if (cpu().supported < 0) return head + ";active=none;reason=this CPU lacks x86-64-v2";
  const Isa isa = kernel_isa();
  std::lock_guard<std::mutex> lock(g_mutex);
  return head + ";active=" + isa_name(isa) + ";reason=" + g_reason;
}

}  // namespace fastdl::cpu
