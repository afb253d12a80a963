// Thin torch binding of the CUDA dynamic-thresholding kernels (csrc/cuda/kernels.h).
// The schema `dynamic_threshold(Tensor x, float percentile, float? max_value) -> (Tensor, Tensor)` is
// declared in csrc/ops.cpp; this file only registers the CUDA implementation.
//
// ATen/cuda/CUDAContext.h is deliberately not included: it pulls in cuBLAS/cuSPARSE headers.
// The c10/cuda headers give the current stream and the device guard without them.

#include <cstdint>
#include <optional>
#include <tuple>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <cuda_runtime_api.h>

#include "kernels.h"

namespace deepfusion_ref {
namespace {

std::tuple<at::Tensor, at::Tensor> dynamic_threshold_cuda(const at::Tensor& x, double percentile, std::optional<double> max_value) {
  TORCH_CHECK(x.is_cuda(), "dynamic_threshold (CUDA): x must be a CUDA tensor, got device ", x.device());
  TORCH_CHECK(x.dim() >= 1, "dynamic_threshold: x must have at least 1 dimension (batch first), got a 0-d tensor");

  cuda::DType dtype = cuda::DType::Float32;
  switch (x.scalar_type()) {
    case at::kFloat:
      dtype = cuda::DType::Float32;
      break;
    case at::kHalf:
      dtype = cuda::DType::Float16;
      break;
    case at::kBFloat16:
      dtype = cuda::DType::BFloat16;
      break;
    default:
      TORCH_CHECK(false, "dynamic_threshold (CUDA): unsupported dtype ", x.scalar_type(),
                  "; supported are float32, float16 and bfloat16 (float64 is handled by the Python reference "
                  "implementation)");
  }

  // Written so that NaN fails the checks.
  TORCH_CHECK(percentile >= 0.0 && percentile <= 1.0, "dynamic_threshold: percentile must be in [0, 1], got ",
              percentile);
  if (max_value.has_value()) {
    TORCH_CHECK(*max_value >= 1.0, "dynamic_threshold: max_value must be >= 1 when given, got ", *max_value);
  }

  c10::cuda::CUDAGuard device_guard(x.device());
  const at::Tensor xc = x.contiguous();
  // Same shape as x, contiguous, so [batch, n] indexing matches xc.
  at::Tensor y = at::empty_like(xc, at::MemoryFormat::Contiguous);
  const int64_t batch = xc.size(0);
  at::Tensor scale = at::empty({batch}, xc.options().dtype(at::kFloat));

  if (batch == 0 || xc.numel() == 0) {
    TORCH_CHECK(batch == 0, "dynamic_threshold: every sample must have at least one element, got shape ",
                x.sizes());
    return {y, scale};
  }
  const int64_t n = xc.numel() / batch;

  const size_t ws_bytes = cuda::dynamic_threshold_workspace_bytes(batch, n);
  // The caching allocator returns blocks aligned to at least 512 bytes.
  at::Tensor workspace = at::empty({static_cast<int64_t>(ws_bytes)}, xc.options().dtype(at::kByte));

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(xc.get_device()).stream();
  const cudaError_t err = cuda::dynamic_threshold_launch(
      xc.const_data_ptr(), y.mutable_data_ptr(), scale.mutable_data_ptr<float>(), batch, n, dtype, percentile,
      max_value.has_value() ? *max_value : -1.0, workspace.mutable_data_ptr(), stream);
  TORCH_CHECK(err == cudaSuccess, "dynamic_threshold (CUDA): kernel launch failed: ", cudaGetErrorString(err));
  return {y, scale};
}

}  // namespace
}  // namespace deepfusion_ref

TORCH_LIBRARY_IMPL(deepfusion_ref, CUDA, m) {
  m.impl("dynamic_threshold", &deepfusion_ref::dynamic_threshold_cuda);
}
