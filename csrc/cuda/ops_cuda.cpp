// Thin torch binding of the CUDA kernels (csrc/cuda/kernels.h): dynamic_threshold, adaln_norm(+backward), rope,
// group_norm_silu(+backward).
// The schemas are declared in csrc/ops.cpp; this file only registers the CUDA implementations.
//
// ATen/cuda/CUDAContext.h is deliberately not included: it pulls in cuBLAS/cuSPARSE headers.
// The c10/cuda headers give the current stream and the device guard without them.

#include <cstdint>
#include <optional>
#include <tuple>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <cuda_runtime_api.h>

#include "kernels.h"

namespace deepfusion_ref {
namespace {

// The kernels' storage dtypes; float64 is left to the Python reference (the dispatcher never sends it here).
cuda::DType cuda_dtype(const at::Tensor& x, const char* op) {
  switch (x.scalar_type()) {
    case at::kFloat: return cuda::DType::Float32;
    case at::kHalf: return cuda::DType::Float16;
    case at::kBFloat16: return cuda::DType::BFloat16;
    default:
      TORCH_CHECK(false, op, " (CUDA): unsupported dtype ", x.scalar_type(),
                  "; supported are float32, float16 and bfloat16 (float64 uses the Python reference)");
  }
}

void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, op, " (CUDA): kernel launch failed: ", cudaGetErrorString(err));
}

std::tuple<at::Tensor, at::Tensor> dynamic_threshold_cuda(const at::Tensor& x, double percentile, std::optional<double> max_value) {
  TORCH_CHECK(x.is_cuda(), "dynamic_threshold (CUDA): x must be a CUDA tensor, got device ", x.device());
  TORCH_CHECK(x.dim() >= 1, "dynamic_threshold: x must have at least 1 dimension (batch first), got a 0-d tensor");

  const cuda::DType dtype = cuda_dtype(x, "dynamic_threshold");

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
  check_launch(cuda::dynamic_threshold_launch(
      xc.const_data_ptr(), y.mutable_data_ptr(), scale.mutable_data_ptr<float>(), batch, n, dtype, percentile,
      max_value.has_value() ? *max_value : -1.0, workspace.mutable_data_ptr(), stream), "dynamic_threshold");
  return {y, scale};
}


at::Tensor adaln_norm_cuda(const at::Tensor& x_, const at::Tensor& shift_, const at::Tensor& scale_, double eps,
                           bool rms) {
  TORCH_CHECK(x_.is_cuda() && x_.dim() == 3, "adaln_norm (CUDA): x must be a [batch, tokens, dim] CUDA tensor");
  TORCH_CHECK(shift_.sizes() == scale_.sizes() && shift_.dim() == 2 && shift_.size(0) == x_.size(0) &&
                  shift_.size(1) == x_.size(2) && shift_.scalar_type() == x_.scalar_type() &&
                  scale_.scalar_type() == x_.scalar_type(),
              "adaln_norm: shift and scale must be [batch, dim] tensors of x's dtype");
  const cuda::DType dtype = cuda_dtype(x_, "adaln_norm");
  c10::cuda::CUDAGuard device_guard(x_.device());
  const at::Tensor x = x_.contiguous(), shift = shift_.contiguous(), scale = scale_.contiguous();
  at::Tensor y = at::empty_like(x, at::MemoryFormat::Contiguous);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.get_device()).stream();
  check_launch(cuda::adaln_norm_launch(x.const_data_ptr(), shift.const_data_ptr(), scale.const_data_ptr(),
                                       y.mutable_data_ptr(), x.size(0), x.size(1), x.size(2), dtype, eps, rms, stream),
               "adaln_norm");
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> adaln_norm_backward_cuda(const at::Tensor& grad_, const at::Tensor& x_,
                                                                        const at::Tensor& scale_, double eps,
                                                                        bool rms) {
  TORCH_CHECK(x_.is_cuda() && x_.dim() == 3 && grad_.sizes() == x_.sizes(),
              "adaln_norm_backward (CUDA): grad and x must be [batch, tokens, dim] CUDA tensors of one shape");
  const cuda::DType dtype = cuda_dtype(x_, "adaln_norm_backward");
  c10::cuda::CUDAGuard device_guard(x_.device());
  const at::Tensor grad = grad_.contiguous(), x = x_.contiguous(), scale = scale_.contiguous();
  at::Tensor grad_x = at::empty_like(x, at::MemoryFormat::Contiguous);
  at::Tensor sums = at::zeros({2, x.size(0), x.size(2)}, x.options().dtype(at::kFloat));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.get_device()).stream();
  check_launch(cuda::adaln_norm_backward_launch(grad.const_data_ptr(), x.const_data_ptr(), scale.const_data_ptr(),
                                                grad_x.mutable_data_ptr(), sums[0].mutable_data_ptr<float>(),
                                                sums[1].mutable_data_ptr<float>(), x.size(0), x.size(1), x.size(2),
                                                dtype, eps, rms, stream),
               "adaln_norm_backward");
  sums = sums.to(x.scalar_type());
  return {grad_x, sums[0], sums[1]};
}

at::Tensor rope_cuda(const at::Tensor& x_, const at::Tensor& cos_, const at::Tensor& sin_) {
  TORCH_CHECK(x_.is_cuda() && x_.dim() >= 2 && x_.size(-1) % 2 == 0,
              "rope (CUDA): x must be a [..., tokens, head_dim] CUDA tensor with an even head_dim");
  TORCH_CHECK(cos_.sizes() == sin_.sizes() && cos_.dim() == 2 && cos_.size(0) == x_.size(-2) &&
                  cos_.size(1) == x_.size(-1) && cos_.scalar_type() == at::kFloat && sin_.scalar_type() == at::kFloat,
              "rope: cos and sin must be float32 [tokens, head_dim]");
  const cuda::DType dtype = cuda_dtype(x_, "rope");
  c10::cuda::CUDAGuard device_guard(x_.device());
  const at::Tensor x = x_.contiguous(), cos = cos_.contiguous(), sin = sin_.contiguous();
  at::Tensor y = at::empty_like(x, at::MemoryFormat::Contiguous);
  const int64_t dh = x.size(-1);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.get_device()).stream();
  check_launch(cuda::rope_launch(x.const_data_ptr(), cos.const_data_ptr<float>(), sin.const_data_ptr<float>(),
                                 y.mutable_data_ptr(), x.numel() / dh, x.size(-2), dh, dtype, stream),
               "rope");
  return y;
}

// group_norm_silu: the layout rule of csrc/ops.cpp (and of the fake in ops.py): channel dim innermost and x not
// plain contiguous -> [N, HW, C]; otherwise contiguous [N, C, HW].
bool gn_channels_last(const at::Tensor& x) {
  return x.dim() >= 3 && !x.is_contiguous() && x.movedim(1, -1).is_contiguous();
}

at::Tensor gn_in_layout(const at::Tensor& t, bool channels_last) {
  return channels_last ? t.movedim(1, -1).contiguous().movedim(-1, 1) : t.contiguous();
}

at::Tensor gn_empty_like(const at::Tensor& x, bool channels_last) {
  if (channels_last) return at::empty(x.movedim(1, -1).sizes(), x.options()).movedim(-1, 1);
  return at::empty(x.sizes(), x.options());
}

void check_gn_param(const std::optional<at::Tensor>& t, const char* name, at::IntArrayRef shape, const at::Tensor& x) {
  if (!t.has_value()) return;
  TORCH_CHECK(t->sizes() == shape && t->scalar_type() == at::kFloat && t->device() == x.device(), "group_norm_silu: ",
              name, " must be a float32 tensor of shape ", shape, " on x's device, got ", t->scalar_type(), " ",
              t->sizes(), " on ", t->device());
}

const float* gn_param_ptr(const std::optional<at::Tensor>& t, std::optional<at::Tensor>& keep) {
  if (!t.has_value()) return nullptr;
  keep = t->contiguous();
  return keep->const_data_ptr<float>();
}

struct GnArgs {
  int64_t n, c, hw;
  bool channels_last;
};

GnArgs check_gn(const char* op, const at::Tensor& x, const std::optional<at::Tensor>& weight,
                const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& scale,
                const std::optional<at::Tensor>& shift, int64_t num_groups) {
  TORCH_CHECK(x.is_cuda() && x.dim() >= 3, op, " (CUDA): x must be a [N, C, *spatial] CUDA tensor, got ", x.sizes());
  const int64_t n = x.size(0), c = x.size(1);
  TORCH_CHECK(num_groups >= 1 && c % num_groups == 0, op, ": num_groups must divide the ", c, " channels, got ",
              num_groups);
  check_gn_param(weight, "weight", {c}, x);
  check_gn_param(bias, "bias", {c}, x);
  check_gn_param(scale, "scale", {n, c}, x);
  check_gn_param(shift, "shift", {n, c}, x);
  return {n, c, n * c == 0 ? 0 : x.numel() / (n * c), gn_channels_last(x)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> group_norm_silu_cuda(
    const at::Tensor& x_, const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& scale, const std::optional<at::Tensor>& shift, int64_t num_groups, double eps,
    bool act) {
  const GnArgs a = check_gn("group_norm_silu", x_, weight, bias, scale, shift, num_groups);
  const cuda::DType dtype = cuda_dtype(x_, "group_norm_silu");
  c10::cuda::CUDAGuard device_guard(x_.device());
  const at::Tensor x = gn_in_layout(x_, a.channels_last);
  at::Tensor y = gn_empty_like(x, a.channels_last);
  at::Tensor mean = at::zeros({a.n, num_groups}, x.options().dtype(at::kFloat)), rstd = at::zeros({a.n, num_groups}, x.options().dtype(at::kFloat));
  std::optional<at::Tensor> kw, kb, ks, kt;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.get_device()).stream();
  check_launch(cuda::group_norm_silu_launch(x.const_data_ptr(), gn_param_ptr(weight, kw), gn_param_ptr(bias, kb),
                                            gn_param_ptr(scale, ks), gn_param_ptr(shift, kt), y.mutable_data_ptr(),
                                            mean.mutable_data_ptr<float>(), rstd.mutable_data_ptr<float>(), a.n, a.c,
                                            a.hw, num_groups, a.channels_last, dtype, eps, act, stream),
               "group_norm_silu");
  return {y, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> group_norm_silu_backward_cuda(
    const at::Tensor& grad_, const at::Tensor& x_, const at::Tensor& mean_, const at::Tensor& rstd_,
    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& scale, const std::optional<at::Tensor>& shift, int64_t num_groups, bool act) {
  const GnArgs a = check_gn("group_norm_silu_backward", x_, weight, bias, scale, shift, num_groups);
  TORCH_CHECK(grad_.sizes() == x_.sizes() && grad_.scalar_type() == x_.scalar_type() && grad_.device() == x_.device(),
              "group_norm_silu_backward: grad must have x's shape, dtype and device");
  TORCH_CHECK(mean_.sizes() == at::IntArrayRef({a.n, num_groups}) && rstd_.sizes() == mean_.sizes() &&
                  mean_.scalar_type() == at::kFloat && rstd_.scalar_type() == at::kFloat,
              "group_norm_silu_backward: mean and rstd must be float32 [N, num_groups]");
  TORCH_CHECK(a.c / num_groups <= 4096, "group_norm_silu_backward (CUDA): at most 4096 channels per group, got ",
              a.c / num_groups);
  const cuda::DType dtype = cuda_dtype(x_, "group_norm_silu_backward");
  c10::cuda::CUDAGuard device_guard(x_.device());
  const at::Tensor x = gn_in_layout(x_, a.channels_last), grad = gn_in_layout(grad_, a.channels_last);
  const at::Tensor mean = mean_.contiguous(), rstd = rstd_.contiguous();
  at::Tensor grad_x = gn_empty_like(x, a.channels_last);
  at::Tensor sums = at::zeros({2, a.n, a.c}, x.options().dtype(at::kFloat));
  std::optional<at::Tensor> kw, kb, ks, kt;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.get_device()).stream();
  check_launch(cuda::group_norm_silu_backward_launch(
                   grad.const_data_ptr(), x.const_data_ptr(), mean.const_data_ptr<float>(),
                   rstd.const_data_ptr<float>(), gn_param_ptr(weight, kw), gn_param_ptr(bias, kb),
                   gn_param_ptr(scale, ks), gn_param_ptr(shift, kt), grad_x.mutable_data_ptr(),
                   sums[0].mutable_data_ptr<float>(), sums[1].mutable_data_ptr<float>(), a.n, a.c, a.hw, num_groups,
                   a.channels_last, dtype, act, stream),
               "group_norm_silu_backward");
  return {grad_x, sums[0], sums[1]};
}

}  // namespace
}  // namespace deepfusion_ref

TORCH_LIBRARY_IMPL(deepfusion_ref, CUDA, m) {
  m.impl("dynamic_threshold", &deepfusion_ref::dynamic_threshold_cuda);
  m.impl("adaln_norm", &deepfusion_ref::adaln_norm_cuda);
  m.impl("adaln_norm_backward", &deepfusion_ref::adaln_norm_backward_cuda);
  m.impl("rope", &deepfusion_ref::rope_cuda);
  m.impl("group_norm_silu", &deepfusion_ref::group_norm_silu_cuda);
  m.impl("group_norm_silu_backward", &deepfusion_ref::group_norm_silu_backward_cuda);
}
