// Instruction sets of the CPU kernels, chosen at run time.
// ---------------------------------------------------------------------------------------------------------
// The extension is built once, with the compiler's baseline x86-64 flags (SSE2), and must run on any x86-64
// CPU; the PyTorch reference it competes with dispatches to AVX2 or AVX-512 kernels at run time. So each kernel
// file includes its loops (a `*_kernels.h` with no include guard) three times through isa_copies.h, in the
// namespaces isa_base, isa_avx2 and isa_avx512, the last two under `#pragma GCC target`, and calls the one
// `cpu_isa()` names.
//
// The pragma regions open only *after* every system and ATen header is included: an inline function or
// template that a header defines is then compiled for the baseline wherever it is used, so the linker can never
// keep an AVX copy of a shared (weak) symbol that a baseline caller would run. Only our own loops, whose
// symbols are distinct per namespace, carry the wider instruction sets (tests/test_isa.py checks the object).
//
// GCC on x86-64 only; elsewhere (clang, aarch64) only isa_base is built and `cpu_isa()` says "base".
// ATEN_CPU_CAPABILITY, torch's own override (default / avx2 / avx512), caps our choice as it caps torch's.
// ---------------------------------------------------------------------------------------------------------
#pragma once

#include <cstdlib>
#include <cstring>

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define DEEPFUSION_REF_X86_ISAS 1
#define DEEPFUSION_REF_BEGIN_AVX2 _Pragma("GCC push_options") _Pragma("GCC target(\"avx2,fma,f16c\")")
#define DEEPFUSION_REF_BEGIN_AVX512 \
  _Pragma("GCC push_options") _Pragma("GCC target(\"avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c\")")
#define DEEPFUSION_REF_END_ISA _Pragma("GCC pop_options")
#else
#define DEEPFUSION_REF_X86_ISAS 0
#endif

namespace deepfusion_ref {
namespace cpu {

enum class Isa { base = 0, avx2 = 1, avx512 = 2 };

inline Isa detect_cpu_isa() {
  Isa best = Isa::base;
#if DEEPFUSION_REF_X86_ISAS
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"))
    best = Isa::avx2;
  if (best == Isa::avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))
    best = Isa::avx512;
#endif
  if (const char* cap = std::getenv("ATEN_CPU_CAPABILITY")) {
    if (std::strcmp(cap, "default") == 0) best = Isa::base;
    else if (std::strcmp(cap, "avx2") == 0 && best == Isa::avx512) best = Isa::avx2;
  }
  return best;
}

// Read once per process: kernels dispatch on it at every call.
inline Isa cpu_isa() {
  static const Isa isa = detect_cpu_isa();
  return isa;
}

inline const char* cpu_isa_name() {
  switch (cpu_isa()) {
    case Isa::avx512: return "avx512";
    case Isa::avx2: return "avx2";
    default: return "base";
  }
}

}  // namespace cpu
}  // namespace deepfusion_ref

// ISA_CALL(fn, args...): the call of isa_<best>::fn(args...) for the running CPU.
#if DEEPFUSION_REF_X86_ISAS
#define DEEPFUSION_REF_ISA_CALL(fn, ...)                                              \
  do {                                                                               \
    switch (::deepfusion_ref::cpu::cpu_isa()) {                                      \
      case ::deepfusion_ref::cpu::Isa::avx512: isa_avx512::fn(__VA_ARGS__); break;   \
      case ::deepfusion_ref::cpu::Isa::avx2: isa_avx2::fn(__VA_ARGS__); break;       \
      default: isa_base::fn(__VA_ARGS__);                                            \
    }                                                                                \
  } while (0)
#else
#define DEEPFUSION_REF_ISA_CALL(fn, ...) isa_base::fn(__VA_ARGS__)
#endif
