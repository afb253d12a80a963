// CUDA kernels of the DiT's fused ops: adaLN normalisation (forward, backward) and RoPE application.
// Raw pointers only; the torch binding is csrc/cuda/ops_cuda.cpp. Compute in float32 for every storage dtype.
//
// adaln_norm: one block per row (token); the block reduces sum and sum of squares, then writes the row.
// adaln_norm_backward: one block per row; two block reductions (statistics, then sum(g_hat) and
// sum(g_hat * x_hat)); grad_shift / grad_scale are float atomics into [batch, d] (one add per token and channel).
// rope: one thread per channel pair.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "device_math.cuh"
#include "kernels.h"

namespace deepfusion_ref {
namespace cuda {
namespace {

constexpr int kRowThreads = 256;

__device__ __forceinline__ void row_stats(float sum, float sumsq, int64_t d, bool rms, float eps, float& mean,
                                          float& rstd) {
  mean = rms ? 0.f : sum / static_cast<float>(d);
  const float var = fmaxf(sumsq / static_cast<float>(d) - mean * mean, 0.f);
  rstd = rsqrtf(var + eps);
}

template <typename T>
__global__ void __launch_bounds__(kRowThreads)
    adaln_norm_kernel(const T* __restrict__ x, const T* __restrict__ shift, const T* __restrict__ scale,
                      T* __restrict__ y, int64_t n, int64_t d, float eps, bool rms) {
  __shared__ float shared[2 * kRowThreads / 32];
  const int64_t row = blockIdx.x, b = row / n;
  const T* xr = x + row * d;
  float sum = 0.f, sumsq = 0.f;
  for (int64_t j = threadIdx.x; j < d; j += blockDim.x) {
    const float v = to_float(xr[j]);
    sum += v;
    sumsq += v * v;
  }
  const float2 s = block_sum2(sum, sumsq, shared);
  float mean, rstd;
  row_stats(s.x, s.y, d, rms, eps, mean, rstd);
  for (int64_t j = threadIdx.x; j < d; j += blockDim.x) {
    const float xhat = (to_float(xr[j]) - mean) * rstd;
    y[row * d + j] = from_float<T>(xhat * (1.f + to_float(scale[b * d + j])) + to_float(shift[b * d + j]));
  }
}

template <typename T>
__global__ void __launch_bounds__(kRowThreads)
    adaln_norm_backward_kernel(const T* __restrict__ grad, const T* __restrict__ x, const T* __restrict__ scale,
                               T* __restrict__ grad_x, float* __restrict__ grad_shift, float* __restrict__ grad_scale,
                               int64_t n, int64_t d, float eps, bool rms) {
  __shared__ float shared[2 * kRowThreads / 32];
  const int64_t row = blockIdx.x, b = row / n;
  const T *xr = x + row * d, *gr = grad + row * d;
  float sum = 0.f, sumsq = 0.f;
  for (int64_t j = threadIdx.x; j < d; j += blockDim.x) {
    const float v = to_float(xr[j]);
    sum += v;
    sumsq += v * v;
  }
  float2 s = block_sum2(sum, sumsq, shared);
  float mean, rstd;
  row_stats(s.x, s.y, d, rms, eps, mean, rstd);
  float sum_gh = 0.f, sum_gh_xhat = 0.f;
  for (int64_t j = threadIdx.x; j < d; j += blockDim.x) {
    const float g = to_float(gr[j]);
    const float xhat = (to_float(xr[j]) - mean) * rstd;
    const float gh = g * (1.f + to_float(scale[b * d + j]));
    sum_gh += gh;
    sum_gh_xhat += gh * xhat;
    atomicAdd(grad_shift + b * d + j, g);
    atomicAdd(grad_scale + b * d + j, g * xhat);
  }
  s = block_sum2(sum_gh, sum_gh_xhat, shared);
  const float mean_gh = rms ? 0.f : s.x / static_cast<float>(d), mean_gh_xhat = s.y / static_cast<float>(d);
  for (int64_t j = threadIdx.x; j < d; j += blockDim.x) {
    const float xhat = (to_float(xr[j]) - mean) * rstd;
    const float gh = to_float(gr[j]) * (1.f + to_float(scale[b * d + j]));
    grad_x[row * d + j] = from_float<T>(rstd * (gh - mean_gh - xhat * mean_gh_xhat));
  }
}

template <typename T>
__global__ void rope_kernel(const T* __restrict__ x, const float* __restrict__ cos, const float* __restrict__ sin,
                            T* __restrict__ y, int64_t pairs, int64_t n, int64_t dh) {
  const int64_t half = dh / 2;
  for (int64_t p = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; p < pairs;
       p += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t row = p / half, j = (p % half) * 2, t = row % n;
    const float x1 = to_float(x[row * dh + j]), x2 = to_float(x[row * dh + j + 1]);
    const float c = cos[t * dh + j], s = sin[t * dh + j];
    y[row * dh + j] = from_float<T>(x1 * c - x2 * s);
    y[row * dh + j + 1] = from_float<T>(x2 * c + x1 * s);
  }
}

template <typename F>
cudaError_t dispatch(DType dtype, F&& f) {
  switch (dtype) {
    case DType::Float32: return f(float{});
    case DType::Float16: return f(__half{});
    case DType::BFloat16: return f(__nv_bfloat16{});
  }
  return cudaErrorInvalidValue;
}

}  // namespace

cudaError_t adaln_norm_launch(const void* x, const void* shift, const void* scale, void* y, int64_t batch, int64_t n,
                              int64_t d, DType dtype, double eps, bool rms, cudaStream_t stream) {
  if (batch * n == 0) return cudaSuccess;
  if (batch * n > 0x7FFFFFFF || d <= 0) return cudaErrorInvalidValue;
  return dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    adaln_norm_kernel<T><<<static_cast<unsigned int>(batch * n), kRowThreads, 0, stream>>>(
        static_cast<const T*>(x), static_cast<const T*>(shift), static_cast<const T*>(scale), static_cast<T*>(y), n,
        d, static_cast<float>(eps), rms);
    return cudaGetLastError();
  });
}

cudaError_t adaln_norm_backward_launch(const void* grad, const void* x, const void* scale, void* grad_x,
                                       float* grad_shift, float* grad_scale, int64_t batch, int64_t n, int64_t d,
                                       DType dtype, double eps, bool rms, cudaStream_t stream) {
  if (batch * n == 0) return cudaSuccess;
  if (batch * n > 0x7FFFFFFF || d <= 0) return cudaErrorInvalidValue;
  return dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    adaln_norm_backward_kernel<T><<<static_cast<unsigned int>(batch * n), kRowThreads, 0, stream>>>(
        static_cast<const T*>(grad), static_cast<const T*>(x), static_cast<const T*>(scale), static_cast<T*>(grad_x),
        grad_shift, grad_scale, n, d, static_cast<float>(eps), rms);
    return cudaGetLastError();
  });
}

cudaError_t rope_launch(const void* x, const float* cos, const float* sin, void* y, int64_t rows, int64_t n,
                        int64_t dh, DType dtype, cudaStream_t stream) {
  const int64_t pairs = rows * (dh / 2);
  if (pairs == 0) return cudaSuccess;
  if (dh % 2 || n <= 0) return cudaErrorInvalidValue;
  const int64_t blocks = (pairs + 255) / 256 < 65535 * 8 ? (pairs + 255) / 256 : 65535 * 8;
  return dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    rope_kernel<T><<<static_cast<unsigned int>(blocks), 256, 0, stream>>>(static_cast<const T*>(x), cos, sin,
                                                                          static_cast<T*>(y), pairs, n, dh);
    return cudaGetLastError();
  });
}

}  // namespace cuda
}  // namespace deepfusion_ref
