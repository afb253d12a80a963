// CPU kernel (OpenMP through at::parallel_for); the op's schema and registration are in csrc/ops.cpp.
// ---------------------------------------------------------------------------------------------------------
// adaLN normalisation (DiT blocks): y = norm(x) * (1 + scale[b]) + shift[b], norm = LayerNorm (no affine) or
// RMSNorm, over the last dim of x [B, N, D]; shift/scale [B, D]. One pass over each row for the statistics,
// one for the output, in the compute dtype (float for half/bf16/float, double for double).
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

#include "ops.h"

namespace deepfusion_ref {
namespace cpu {

namespace {

template <typename acc_t, typename scalar_t>
inline void row_stats(const scalar_t* row, int64_t d, bool rms, double eps, acc_t& mean, acc_t& rstd) {
  acc_t sum = 0, sumsq = 0;
#pragma omp simd reduction(+ : sum, sumsq)
  for (int64_t j = 0; j < d; ++j) {
    const acc_t v = static_cast<acc_t>(row[j]);
    sum += v;
    sumsq += v * v;
  }
  mean = rms ? acc_t(0) : sum / d;
  const acc_t var = sumsq / d - mean * mean;
  rstd = acc_t(1) / std::sqrt(std::max(var, acc_t(0)) + static_cast<acc_t>(eps));
}

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

at::Tensor adaln_norm_cpu(const at::Tensor& x_, const at::Tensor& shift_, const at::Tensor& scale_, double eps,
                          bool rms) {
  check_adaln_args(x_, shift_, scale_);
  const auto x = x_.contiguous(), shift = shift_.contiguous(), scale = scale_.contiguous();
  auto y = at::empty_like(x, at::MemoryFormat::Contiguous);
  const int64_t n = x.size(1), d = x.size(2), rows = x.size(0) * n;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "adaln_norm_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t *xp = x.const_data_ptr<scalar_t>(), *sh = shift.const_data_ptr<scalar_t>(),
                   *sc = scale.const_data_ptr<scalar_t>();
    scalar_t* yp = y.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / std::max<int64_t>(d, 1)), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t b = r / n;
        const scalar_t* row = xp + r * d;
        acc_t mean, rstd;
        row_stats<acc_t>(row, d, rms, eps, mean, rstd);
        _Pragma("omp simd")
        for (int64_t j = 0; j < d; ++j) {
          const acc_t xhat = (static_cast<acc_t>(row[j]) - mean) * rstd;
          yp[r * d + j] = static_cast<scalar_t>(xhat * (acc_t(1) + static_cast<acc_t>(sc[b * d + j])) +
                                                static_cast<acc_t>(sh[b * d + j]));
        }
      }
    });
  });
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
  const int64_t batch = x.size(0), n = x.size(1), d = x.size(2), rows = batch * n;
  const int threads = at::get_num_threads();
  const auto acc_dtype = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto partial = at::zeros({threads, 2, batch, d}, x.options().dtype(acc_dtype));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "adaln_norm_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t *gp = grad.const_data_ptr<scalar_t>(), *xp = x.const_data_ptr<scalar_t>(),
                   *sc = scale.const_data_ptr<scalar_t>();
    scalar_t* gx = grad_x.mutable_data_ptr<scalar_t>();
    acc_t* part = partial.mutable_data_ptr<acc_t>();
    at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / std::max<int64_t>(d, 1)), [&](int64_t r0, int64_t r1) {
      acc_t* gshift = part + static_cast<int64_t>(at::get_thread_num()) * 2 * batch * d;
      acc_t* gscale = gshift + batch * d;
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t b = r / n;
        const scalar_t *row = xp + r * d, *g = gp + r * d;
        acc_t mean, rstd;
        row_stats<acc_t>(row, d, rms, eps, mean, rstd);
        acc_t sum_gh = 0, sum_gh_xhat = 0;  // over the row, of g_hat = g * (1 + scale)
        _Pragma("omp simd reduction(+ : sum_gh, sum_gh_xhat)")
        for (int64_t j = 0; j < d; ++j) {
          const acc_t gj = static_cast<acc_t>(g[j]);
          const acc_t xhat = (static_cast<acc_t>(row[j]) - mean) * rstd;
          const acc_t gh = gj * (acc_t(1) + static_cast<acc_t>(sc[b * d + j]));
          sum_gh += gh;
          sum_gh_xhat += gh * xhat;
          gshift[b * d + j] += gj;
          gscale[b * d + j] += gj * xhat;
        }
        const acc_t mean_gh = rms ? acc_t(0) : sum_gh / d, mean_gh_xhat = sum_gh_xhat / d;
        _Pragma("omp simd")
        for (int64_t j = 0; j < d; ++j) {
          const acc_t xhat = (static_cast<acc_t>(row[j]) - mean) * rstd;
          const acc_t gh = static_cast<acc_t>(g[j]) * (acc_t(1) + static_cast<acc_t>(sc[b * d + j]));
          gx[r * d + j] = static_cast<scalar_t>(rstd * (gh - mean_gh - xhat * mean_gh_xhat));
        }
      }
    });
  });
  auto sums = partial.sum(0).to(x.scalar_type());
  return {grad_x, sums[0], sums[1]};
}

}  // namespace cpu
}  // namespace deepfusion_ref
