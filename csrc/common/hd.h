// FNEVR_HD marks the per-element math the CPU and CUDA kernels share (csrc/<op>/<op>_math.h):
// __host__ __device__ under nvcc, plain inline functions in the C++ build.
#pragma once

#if defined(__CUDACC__) || defined(__HIPCC__)
#define FNEVR_HD __host__ __device__ __forceinline__
#else
#define FNEVR_HD inline
#endif
