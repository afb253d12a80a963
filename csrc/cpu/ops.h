// CPU kernels of the deepfusion_ref ops, one file per op in csrc/cpu/; csrc/ops.cpp registers them.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

namespace deepfusion_ref {
namespace cpu {

std::tuple<at::Tensor, at::Tensor> dynamic_threshold_cpu(const at::Tensor& x, double percentile,
                                                         std::optional<double> max_value);

at::Tensor adaln_norm_cpu(const at::Tensor& x_, const at::Tensor& shift_, const at::Tensor& scale_, double eps,
                          bool rms);

std::tuple<at::Tensor, at::Tensor, at::Tensor> adaln_norm_backward_cpu(const at::Tensor& grad_, const at::Tensor& x_,
                                                                       const at::Tensor& scale_, double eps,
                                                                       bool rms);

at::Tensor rope_cpu(const at::Tensor& x_, const at::Tensor& cos_, const at::Tensor& sin_);

std::tuple<at::Tensor, at::Tensor, at::Tensor> group_norm_silu_cpu(
    const at::Tensor& x_, const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& scale, const std::optional<at::Tensor>& shift, int64_t num_groups, double eps,
    bool act);

std::tuple<at::Tensor, at::Tensor, at::Tensor> group_norm_silu_backward_cpu(
    const at::Tensor& grad_, const at::Tensor& x_, const at::Tensor& mean_, const at::Tensor& rstd_,
    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& scale, const std::optional<at::Tensor>& shift, int64_t num_groups, bool act);

}  // namespace cpu
}  // namespace deepfusion_ref
