// Compiles isa_kernels.h (the kernels) for one x86-64 instruction set inside a target region, so that only the
// kernels (namespace flashlite::cpu::FL_ISA) use its instructions. Define FL_ISA, FL_ISA_NAME,
// FL_LANES, FL_MR and FL_TARGET (the target features, e.g. "avx2,fma,f16c") after including
// prelude.h, then include this file.
#define FL_STRINGIFY(x) #x
#define FL_PRAGMA(x) _Pragma(FL_STRINGIFY(x))

#if defined(__clang__)
FL_PRAGMA(clang attribute push(__attribute__((target(FL_TARGET))), apply_to = function))
#else
#pragma GCC push_options
FL_PRAGMA(GCC target(FL_TARGET))
#endif

#include "isa_kernels.h"

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
