// What every instruction-set build of the kernels (isa_kernels.h) includes *before* its target
// region: standard and shared headers stay compiled for the baseline target, so no variant's code
// leaks into them.
#pragma once

#include <math.h>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <utility>

#include "../common/params.h"
#include "convert.h"
#include "work.h"
