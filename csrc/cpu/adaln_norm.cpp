// CPU kernel (OpenMP through at::parallel_for); the op's schema and registration are in csrc/ops.cpp.
// ---------------------------------------------------------------------------------------------------------
// adaLN normalisation (DiT blocks): y = norm(x) * (1 + scale[b]) + shift[b], norm = LayerNorm (no affine) or
// RMSNorm, over the last dim of x [B, N, D]; shift/scale [B, D]. One pass over each row for the statistics,
// one for the output, in the compute dtype (float for half/bf16/float, double for double). The loops are in
// adaln_norm_kernels.h, compiled for the baseline, AVX2 and AVX-512; isa.h picks one at run time.
// ---------------------------------------------------------------------------------------------------------

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

#include "isa.h"
#include "ops.h"

namespace deepfusion_ref {
namespace cpu {

namespace {

void check_adaln_args(const at::Tensor& x, const at::Tensor& shift, const at::Tensor& scale) {
  TORCH_CHECK(x.dim() == 3, "adaln_norm: x must be [batch, tokens, dim], got ", x.sizes());
  TORCH_CHECK(shift.sizes() == scale.sizes() && shift.dim() == 2 && shift.size(0) == x.size(0) &&
                  shift.size(1) == x.size(2),
              "adaln_norm: shift and scale must be [batch, dim] = [", x.size(0), ", ", x.size(2), "], got ",
              shift.sizes(), " and ", scale.sizes());
  TORCH_CHECK(shift.scalar_type() == x.scalar_type() && scale.scalar_type() == x.scalar_type(),
              "adaln_norm: shift and scale must have x's dtype ", x.scalar_type());
}

}  // namespace

#define DEEPFUSION_REF_KERNELS "adaln_norm_kernels.h"
#include "isa_copies.h"

at::Tensor adaln_norm_cpu(const at::Tensor& x_, const at::Tensor& shift_, const at::Tensor& scale_, double eps,
                          bool rms) {
  check_adaln_args(x_, shift_, scale_);
  const auto x = x_.contiguous(), shift = shift_.contiguous(), scale = scale_.contiguous();
  auto y = at::empty_like(x, at::MemoryFormat::Contiguous);
  DEEPFUSION_REF_ISA_CALL(forward, x, shift, scale, y, eps, rms);
  return y;
}

// Gradients of adaln_norm: grad_x row by row; grad_shift = sum_n g and grad_scale = sum_n g * xhat per sample,
// accumulated in per-thread buffers and reduced at the end.
std::tuple<at::Tensor, at::Tensor, at::Tensor> adaln_norm_backward_cpu(const at::Tensor& grad_, const at::Tensor& x_,
                                                                       const at::Tensor& scale_, double eps,
                                                                       bool rms) {
  check_adaln_args(x_, scale_, scale_);
  TORCH_CHECK(grad_.sizes() == x_.sizes(), "adaln_norm_backward: grad must be shaped like x");
  const auto grad = grad_.contiguous(), x = x_.contiguous(), scale = scale_.contiguous();
  auto grad_x = at::empty_like(x, at::MemoryFormat::Contiguous);
  const int64_t batch = x.size(0), d = x.size(2);
  const int threads = at::get_num_threads();
  const auto acc_dtype = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto partial = at::zeros({threads, 2, batch, d}, x.options().dtype(acc_dtype));
  DEEPFUSION_REF_ISA_CALL(backward, grad, x, scale, grad_x, partial, eps, rms);
  auto sums = partial.sum(0).to(x.scalar_type());
  return {grad_x, sums[0], sums[1]};
}

}  // namespace cpu
}  // namespace deepfusion_ref
