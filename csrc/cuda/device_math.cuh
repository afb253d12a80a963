// Device helpers the CUDA kernels share: storage <-> float32 conversion and a two-value block reduction.
// CUDA headers only (no torch), included by the .cu files after cuda_runtime.h.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

namespace deepfusion_ref {
namespace cuda {

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// Sum of (a, b) over the block (blockDim.x a multiple of 32); every thread gets the result. `shared` holds
// 2 * (blockDim.x / 32) floats; it may be reused right after the call (the leading barrier protects it).
__device__ __forceinline__ float2 block_sum2(float a, float b, float* shared) {
  for (int offset = 16; offset > 0; offset >>= 1) {
    a += __shfl_xor_sync(0xFFFFFFFFu, a, offset);
    b += __shfl_xor_sync(0xFFFFFFFFu, b, offset);
  }
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, warps = blockDim.x >> 5;
  __syncthreads();  // shared may still be read by a previous call
  if (lane == 0) {
    shared[warp] = a;
    shared[warps + warp] = b;
  }
  __syncthreads();
  a = 0.f;
  b = 0.f;
  for (int w = 0; w < warps; ++w) {
    a += shared[w];
    b += shared[warps + w];
  }
  return make_float2(a, b);
}

}  // namespace cuda
}  // namespace deepfusion_ref
