// What every instruction-set build of the kernels (isa_kernels.h) includes *before* its target
// region: standard and shared headers stay compiled for the baseline target, so no variant's code
// leaks into them.
#pragma once

#include <math.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <utility>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>  // philox.h: the AVX2 / AVX-512 widening multiplies (GCC target regions)
#endif

#include "../common/params.h"
#include "convert.h"
#include "philox.h"  // its scalar part (the vector part comes with isa_kernels.h)
#include "work.h"
