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
