// Helpers shared by the CPU (.cpp) and CUDA (.cu) kernels. Device-independent:
// everything here compiles for the host with g++ and for both sides with nvcc.
#pragma once

#if defined(__CUDACC__)
#define FAM_HD __host__ __device__ __forceinline__
#else
#define FAM_HD inline
#endif
