// FNEVR_CPU_CLONES: compile a hot CPU function also for AVX2 + FMA machines (x86-64-v3) and pick
// the version at load time (GCC function multi-versioning). The build targets baseline x86-64
// (SSE2), whose 4-wide vectors and missing SSE4.1 rounding (floor, rint) leave arithmetic-heavy
// loops far short of what the machine can do. -ffp-contract=off keeps both versions' rounding
// identical: the clone may use wider vectors, not fused multiply-adds.
#pragma once

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define FNEVR_CPU_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define FNEVR_CPU_CLONES
#endif
