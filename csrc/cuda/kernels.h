// Plain C++ interface of the CUDA dynamic-thresholding kernels.
// Deliberately torch-free so the .cu file can be compiled by nvcc without ATen.
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime_api.h>

namespace deepfusion_ref {
namespace cuda {

enum class DType : int { Float32 = 0, Float16 = 1, BFloat16 = 2 };

// Bytes of device workspace dynamic_threshold_launch needs for `batch` samples of `n` elements.
size_t dynamic_threshold_workspace_bytes(int64_t batch, int64_t n);

// x, y: device pointers to contiguous [batch, n] arrays of `dtype` (y may not alias x).
// scale_out: device float[batch] or nullptr. max_value <= 0 means no upper bound.
// workspace: device buffer of at least dynamic_threshold_workspace_bytes(batch, n) bytes,
// any content, 256-byte aligned.
// Everything is enqueued on `stream`; no host synchronisation, no allocation.
cudaError_t dynamic_threshold_launch(const void* x, void* y, float* scale_out, int64_t batch, int64_t n,
                                     DType dtype, double percentile, double max_value,
                                     void* workspace, cudaStream_t stream);

}  // namespace cuda
}  // namespace deepfusion_ref

namespace deepfusion_ref { namespace cuda {
// adaLN normalisation of DiT blocks: y = norm(x) * (1 + scale[b]) + shift[b] over the last dim, x [batch, n, d]
// contiguous, shift/scale [batch, d] in x's dtype; norm = LayerNorm (rms = false) or RMSNorm, without affine.
cudaError_t adaln_norm_launch(const void* x, const void* shift, const void* scale, void* y, int64_t batch, int64_t n,
                              int64_t d, DType dtype, double eps, bool rms, cudaStream_t stream);
// Its gradients: grad_x in x's dtype; grad_shift and grad_scale are float32 [batch, d] accumulators the caller
// zeroes beforehand (they receive sums over the n tokens).
cudaError_t adaln_norm_backward_launch(const void* grad, const void* x, const void* scale, void* grad_x,
                                       float* grad_shift, float* grad_scale, int64_t batch, int64_t n, int64_t d,
                                       DType dtype, double eps, bool rms, cudaStream_t stream);
// RoPE on channel pairs: x [rows, dh] with token index (row % n), cos/sin float32 [n, dh]; y may not alias x.
cudaError_t rope_launch(const void* x, const float* cos, const float* sin, void* y, int64_t rows, int64_t n,
                        int64_t dh, DType dtype, cudaStream_t stream);
}}  // namespace deepfusion_ref::cuda

namespace deepfusion_ref { namespace cuda {
// GroupNorm + FiLM + SiLU of U-Net blocks: y = silu(((x - mean) rstd w + b) (1 + scale) + shift) (act = false:
// no silu). x, y: [n, c, hw] contiguous or, with channels_last, [n, hw, c]; weight, bias float32 [c], scale,
// shift float32 [n, c], each may be null; mean, rstd: float32 [n, groups] outputs. c % groups == 0.
cudaError_t group_norm_silu_launch(const void* x, const float* weight, const float* bias, const float* scale,
                                   const float* shift, void* y, float* mean, float* rstd, int64_t n, int64_t c,
                                   int64_t hw, int64_t groups, bool channels_last, DType dtype, double eps, bool act,
                                   cudaStream_t stream);
// Its backward: grad_x (x's dtype and layout) and the float32 [n, c] sums over hw of delta = dL/d(pre-activation)
// and of delta * xhat (every entry written). Needs c / groups <= 4096 (cudaErrorInvalidValue otherwise).
cudaError_t group_norm_silu_backward_launch(const void* grad, const void* x, const float* mean, const float* rstd,
                                            const float* weight, const float* bias, const float* scale,
                                            const float* shift, void* grad_x, float* sum_delta,
                                            float* sum_delta_xhat, int64_t n, int64_t c, int64_t hw, int64_t groups,
                                            bool channels_last, DType dtype, bool act, cudaStream_t stream);
}}  // namespace deepfusion_ref::cuda
