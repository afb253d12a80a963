// CUDA kernels of the fused GroupNorm + FiLM + SiLU op (U-Net blocks), forward and backward.
// Raw pointers only; the torch binding is csrc/cuda/ops_cuda.cpp. Storage float32/float16/bfloat16, compute and
// parameters (weight, bias [C]; scale, shift [N, C]; any may be null) in float32.
//
// One block per (sample, group) for both passes. Forward: the block reduces the group's shifted sums (shift =
// the group's first element, so a large mean does not cancel the variance), then writes y = f(a x + b) with the
// per-channel a, b; the second read of the group mostly hits L2. Backward: the block accumulates per-channel
// A = sum delta and sum delta (x - mean) in shared memory, writes them to [N, C], reduces the two group sums of
// the normalisation backward from them, and writes grad_x in a second sweep.
// Layouts: contiguous [N, C, HW] (the group is one contiguous run of D * HW elements) or channels-last
// [N, HW, C] (element i of the group is row i / D, channel i % D).

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "device_math.cuh"
#include "kernels.h"

namespace deepfusion_ref {
namespace cuda {
namespace {

constexpr int kGroupThreads = 512;
constexpr int kMaxSharedChannels = 4096;  // channels per group the backward keeps in shared memory (32 KiB)

struct GroupGeometry {
  int64_t c, hw, d, groups;
  bool channels_last;
  // Offset of element i (0 <= i < d * hw) of group g of sample n, and its channel within the group.
  __device__ __forceinline__ int64_t offset(int64_t n, int64_t g, int64_t i, int64_t& ci) const {
    if (channels_last) {
      const int64_t row = i / d;
      ci = i - row * d;
      return (n * hw + row) * c + g * d + ci;
    }
    ci = i / hw;
    return (n * c + g * d) * hw + i;
  }
};

struct FilmParams {
  const float *weight, *bias, *scale, *shift;
  __device__ __forceinline__ float w(int64_t c) const { return weight ? weight[c] : 1.f; }
  __device__ __forceinline__ float b(int64_t c) const { return bias ? bias[c] : 0.f; }
  __device__ __forceinline__ float film(int64_t nc) const { return scale ? 1.f + scale[nc] : 1.f; }
  __device__ __forceinline__ float t(int64_t nc) const { return shift ? shift[nc] : 0.f; }
};

__device__ __forceinline__ float gn_sigmoid(float u) { return 1.f / (1.f + __expf(-u)); }

template <typename T>
__global__ void __launch_bounds__(kGroupThreads)
    group_norm_silu_kernel(const T* __restrict__ x, T* __restrict__ y, float* __restrict__ mean_out,
                           float* __restrict__ rstd_out, FilmParams p, GroupGeometry geo, float eps, bool act) {
  __shared__ float shared[64];
  const int64_t n = blockIdx.x / geo.groups, g = blockIdx.x % geo.groups, m = geo.d * geo.hw;
  int64_t ci;
  const float k = to_float(x[geo.offset(n, g, 0, ci)]);
  float s1 = 0.f, s2 = 0.f;
  for (int64_t i = threadIdx.x; i < m; i += blockDim.x) {
    const float v = to_float(x[geo.offset(n, g, i, ci)]) - k;
    s1 += v;
    s2 += v * v;
  }
  const float2 s = block_sum2(s1, s2, shared);
  const float dm = s.x / static_cast<float>(m);
  const float mean = k + dm, rstd = rsqrtf(fmaxf(s.y / static_cast<float>(m) - dm * dm, 0.f) + eps);
  if (threadIdx.x == 0) {
    mean_out[blockIdx.x] = mean;
    rstd_out[blockIdx.x] = rstd;
  }
  for (int64_t i = threadIdx.x; i < m; i += blockDim.x) {
    const int64_t off = geo.offset(n, g, i, ci);
    const int64_t c = g * geo.d + ci, nc = n * geo.c + c;
    const float f = p.film(nc), a = rstd * p.w(c) * f;
    const float u = a * to_float(x[off]) + (p.b(c) - mean * rstd * p.w(c)) * f + p.t(nc);
    y[off] = from_float<T>(act ? u * gn_sigmoid(u) : u);
  }
}

template <typename T>
__global__ void __launch_bounds__(kGroupThreads)
    group_norm_silu_backward_kernel(const T* __restrict__ grad, const T* __restrict__ x,
                                    const float* __restrict__ mean_in, const float* __restrict__ rstd_in,
                                    T* __restrict__ grad_x, float* __restrict__ sum_delta,
                                    float* __restrict__ sum_delta_xhat, FilmParams p, GroupGeometry geo, bool act) {
  extern __shared__ float channel_sums[];  // [2, d]: sum delta, sum delta (x - mean)
  __shared__ float shared[64];
  const int64_t n = blockIdx.x / geo.groups, g = blockIdx.x % geo.groups, m = geo.d * geo.hw;
  const float mean = mean_in[blockIdx.x], rstd = rstd_in[blockIdx.x];
  for (int64_t ci = threadIdx.x; ci < 2 * geo.d; ci += blockDim.x) channel_sums[ci] = 0.f;
  __syncthreads();
  int64_t ci;
  // delta = dL/du at element i, with u = a x + b recomputed from the statistics
  auto delta_at = [&](int64_t off, int64_t c, int64_t nc, float v) {
    const float gv = to_float(grad[off]);
    if (!act) return gv;
    const float f = p.film(nc);
    const float u = rstd * p.w(c) * f * v + (p.b(c) - mean * rstd * p.w(c)) * f + p.t(nc);
    const float sig = gn_sigmoid(u);
    return gv * sig * (1.f + u * (1.f - sig));
  };
  // A thread's channel changes rarely (contiguous: every hw / blockDim steps; channels-last: never when blockDim
  // is a multiple of d), so it accumulates in registers and flushes to shared memory on a change.
  int64_t held = -1;
  float acc_a = 0.f, acc_b = 0.f;
  for (int64_t i = threadIdx.x; i < m; i += blockDim.x) {
    const int64_t off = geo.offset(n, g, i, ci);
    const int64_t c = g * geo.d + ci, nc = n * geo.c + c;
    const float v = to_float(x[off]);
    const float delta = delta_at(off, c, nc, v);
    if (ci != held) {
      if (held >= 0) {
        atomicAdd(channel_sums + held, acc_a);
        atomicAdd(channel_sums + geo.d + held, acc_b);
      }
      held = ci, acc_a = 0.f, acc_b = 0.f;
    }
    acc_a += delta;
    acc_b += delta * (v - mean);
  }
  if (held >= 0) {
    atomicAdd(channel_sums + held, acc_a);
    atomicAdd(channel_sums + geo.d + held, acc_b);
  }
  __syncthreads();
  float m1 = 0.f, m2 = 0.f;  // sum over the group's channels of k_c A_c and k_c B_c, k_c = w_c (1 + s_nc)
  for (int64_t cj = threadIdx.x; cj < geo.d; cj += blockDim.x) {
    const int64_t c = g * geo.d + cj, nc = n * geo.c + c;
    const float A = channel_sums[cj], B = rstd * channel_sums[geo.d + cj], kc = p.w(c) * p.film(nc);
    sum_delta[nc] = A;
    sum_delta_xhat[nc] = B;
    m1 += kc * A;
    m2 += kc * B;
  }
  const float2 s = block_sum2(m1, m2, shared);
  const float inv_m = 1.f / static_cast<float>(m);
  const float q = -rstd * rstd * s.y * inv_m, r = -rstd * s.x * inv_m + mean * rstd * rstd * s.y * inv_m;
  for (int64_t i = threadIdx.x; i < m; i += blockDim.x) {
    const int64_t off = geo.offset(n, g, i, ci);
    const int64_t c = g * geo.d + ci, nc = n * geo.c + c;
    const float v = to_float(x[off]);
    const float delta = delta_at(off, c, nc, v);
    grad_x[off] = from_float<T>(rstd * p.w(c) * p.film(nc) * delta + q * v + r);
  }
}

int group_threads(int64_t m) {
  int threads = 64;
  while (threads < kGroupThreads && threads < m) threads *= 2;
  return threads;
}

}  // namespace

cudaError_t group_norm_silu_launch(const void* x, const float* weight, const float* bias, const float* scale,
                                   const float* shift, void* y, float* mean, float* rstd, int64_t n, int64_t c,
                                   int64_t hw, int64_t groups, bool channels_last, DType dtype, double eps, bool act,
                                   cudaStream_t stream) {
  if (n * c * hw == 0) return cudaSuccess;
  const GroupGeometry geo{c, hw, c / groups, groups, channels_last};
  const FilmParams p{weight, bias, scale, shift};
  const unsigned blocks = static_cast<unsigned>(n * groups);
  const int threads = group_threads(geo.d * hw);
  const float e = static_cast<float>(eps);
  switch (dtype) {
    case DType::Float32:
      group_norm_silu_kernel<float><<<blocks, threads, 0, stream>>>(static_cast<const float*>(x),
                                                                    static_cast<float*>(y), mean, rstd, p, geo, e, act);
      break;
    case DType::Float16:
      group_norm_silu_kernel<__half><<<blocks, threads, 0, stream>>>(static_cast<const __half*>(x),
                                                                     static_cast<__half*>(y), mean, rstd, p, geo, e, act);
      break;
    case DType::BFloat16:
      group_norm_silu_kernel<__nv_bfloat16><<<blocks, threads, 0, stream>>>(
          static_cast<const __nv_bfloat16*>(x), static_cast<__nv_bfloat16*>(y), mean, rstd, p, geo, e, act);
      break;
  }
  return cudaGetLastError();
}

cudaError_t group_norm_silu_backward_launch(const void* grad, const void* x, const float* mean, const float* rstd,
                                            const float* weight, const float* bias, const float* scale,
                                            const float* shift, void* grad_x, float* sum_delta,
                                            float* sum_delta_xhat, int64_t n, int64_t c, int64_t hw, int64_t groups,
                                            bool channels_last, DType dtype, bool act, cudaStream_t stream) {
  if (n * c * hw == 0) return cudaSuccess;
  const GroupGeometry geo{c, hw, c / groups, groups, channels_last};
  if (geo.d > kMaxSharedChannels) return cudaErrorInvalidValue;
  const FilmParams p{weight, bias, scale, shift};
  const unsigned blocks = static_cast<unsigned>(n * groups);
  const int threads = group_threads(geo.d * hw);
  const size_t smem = static_cast<size_t>(2 * geo.d) * sizeof(float);
  switch (dtype) {
    case DType::Float32:
      group_norm_silu_backward_kernel<float><<<blocks, threads, smem, stream>>>(
          static_cast<const float*>(grad), static_cast<const float*>(x), mean, rstd, static_cast<float*>(grad_x),
          sum_delta, sum_delta_xhat, p, geo, act);
      break;
    case DType::Float16:
      group_norm_silu_backward_kernel<__half><<<blocks, threads, smem, stream>>>(
          static_cast<const __half*>(grad), static_cast<const __half*>(x), mean, rstd, static_cast<__half*>(grad_x),
          sum_delta, sum_delta_xhat, p, geo, act);
      break;
    case DType::BFloat16:
      group_norm_silu_backward_kernel<__nv_bfloat16><<<blocks, threads, smem, stream>>>(
          static_cast<const __nv_bfloat16*>(grad), static_cast<const __nv_bfloat16*>(x), mean, rstd,
          static_cast<__nv_bfloat16*>(grad_x), sum_delta, sum_delta_xhat, p, geo, act);
      break;
  }
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace deepfusion_ref
