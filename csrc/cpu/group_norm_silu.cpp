// CPU kernel (OpenMP through at::parallel_for); the op's schema and registration are in csrc/ops.cpp.
// ---------------------------------------------------------------------------------------------------------
// GroupNorm + FiLM + SiLU (U-Net residual blocks): y = silu(((x - mean) rstd w + b) (1 + scale) + shift), with
// mean/rstd per (sample, group), w/b per channel (GroupNorm's affine), scale/shift per (sample, channel) (FiLM).
// Per (n, c) the whole thing is y = f(a x + b') with a = rstd w (1 + s), b' = (b - mean rstd w)(1 + s) + t, so
// after the statistics it is one multiply-add and the activation per element.
//
// Layouts: contiguous x is [N, C, HW] and one task owns one (n, group), whose D * HW elements are contiguous
// (statistics and output in one sweep while the group is in cache). Channels-last x is [N, HW, C]: statistics
// are per-channel partial sums over chunks of rows (parallel over (n, chunk)), merged per group; the output
// pass is parallel over rows. Optional params (weight, bias, scale, shift) are in the compute dtype.
//
// Accuracy: per-channel sums are *shifted* by the channel's first value (sum (v - k), sum (v - k)^2), so large
// means do not cancel the variance away; channels are merged with the parallel-variance formula.
//
// The loops are in group_norm_silu_kernels.h, compiled for the baseline, AVX2 and AVX-512; isa.h picks one
// at run time.
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

template <typename acc_t>
struct GroupNormParams {
  const acc_t *weight, *bias, *scale, *shift;  // nullptr when absent
  int64_t channels;
  acc_t w(int64_t c) const { return weight ? weight[c] : acc_t(1); }
  acc_t b(int64_t c) const { return bias ? bias[c] : acc_t(0); }
  acc_t film(int64_t n, int64_t c) const { return scale ? acc_t(1) + scale[n * channels + c] : acc_t(1); }
  acc_t t(int64_t n, int64_t c) const { return shift ? shift[n * channels + c] : acc_t(0); }
  // y = f(a x + b') for channel c of sample n
  void coefficients(int64_t n, int64_t c, acc_t mean, acc_t rstd, acc_t& a, acc_t& b_) const {
    const acc_t f = film(n, c);
    a = rstd * w(c) * f;
    b_ = (b(c) - mean * rstd * w(c)) * f + t(n, c);
  }
};

struct GroupNormShape {
  int64_t n, c, hw, groups, d;  // d = channels per group
  bool channels_last;
};

// Whether x is processed as [N, HW, C]: its channel dim is innermost and it is not plain contiguous.
bool gn_channels_last(const at::Tensor& x) {
  return x.dim() >= 3 && !x.is_contiguous() && x.movedim(1, -1).is_contiguous();
}

// A tensor of x's shape with the kernel's layout (the fake implementation in ops.py follows the same rule).
at::Tensor gn_empty_like(const at::Tensor& x, bool channels_last) {
  if (channels_last) return at::empty(x.movedim(1, -1).sizes(), x.options()).movedim(-1, 1);
  return at::empty(x.sizes(), x.options());
}

// x in the kernel's layout (a no-op when it already has it).
at::Tensor gn_in_layout(const at::Tensor& t, bool channels_last) {
  return channels_last ? t.movedim(1, -1).contiguous().movedim(-1, 1) : t.contiguous();
}

GroupNormShape check_group_norm_args(const char* op, const at::Tensor& x, const std::optional<at::Tensor>& weight,
                                     const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& scale,
                                     const std::optional<at::Tensor>& shift, int64_t num_groups) {
  TORCH_CHECK(x.dim() >= 3, op, ": x must be [N, C, *spatial] with at least one spatial dim, got ", x.sizes());
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), op, ": x must be floating point, got ", x.scalar_type());
  const int64_t n = x.size(0), c = x.size(1);
  TORCH_CHECK(num_groups >= 1 && c % num_groups == 0, op, ": num_groups must divide the ", c,
              " channels, got ", num_groups);
  const auto acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto check = [&](const std::optional<at::Tensor>& t, const char* name, std::vector<int64_t> shape) {
    if (!t.has_value()) return;
    TORCH_CHECK(t->sizes() == at::IntArrayRef(shape) && t->scalar_type() == acc && t->device() == x.device(), op,
                ": ", name, " must be a ", acc, " tensor of shape ", at::IntArrayRef(shape), " on x's device, got ",
                t->scalar_type(), " ", t->sizes());
  };
  check(weight, "weight", {c});
  check(bias, "bias", {c});
  check(scale, "scale", {n, c});
  check(shift, "shift", {n, c});
  const int64_t hw = n * c == 0 ? 0 : x.numel() / (n * c);
  return {n, c, hw, num_groups, c / num_groups, gn_channels_last(x)};
}

template <typename acc_t>
const acc_t* opt_ptr(const std::optional<at::Tensor>& t, std::vector<at::Tensor>& keep) {
  if (!t.has_value()) return nullptr;
  keep.push_back(t->contiguous());
  return keep.back().const_data_ptr<acc_t>();
}

// Mean and rstd of one group from per-channel shifted sums s1 = sum (v - k_c), s2 = sum (v - k_c)^2 over hw.
template <typename acc_t>
void merge_channel_sums(const acc_t* k, const acc_t* s1, const acc_t* s2, int64_t d, int64_t hw, double eps,
                        acc_t& mean, acc_t& rstd) {
  acc_t sum_means = 0;
  for (int64_t c = 0; c < d; ++c) sum_means += k[c] + s1[c] / hw;
  mean = sum_means / d;
  acc_t m2 = 0;
  for (int64_t c = 0; c < d; ++c) {
    const acc_t cm = k[c] + s1[c] / hw;  // channel mean
    m2 += std::max(s2[c] - s1[c] * s1[c] / hw, acc_t(0)) + hw * (cm - mean) * (cm - mean);
  }
  rstd = acc_t(1) / std::sqrt(m2 / (d * hw) + static_cast<acc_t>(eps));
}

// Tasks per parallel_for chunk such that each holds about torch's grain (32768 elements): a small tensor then runs
// on the calling thread instead of paying for an OpenMP fork and join (measured: 10 us of a 12 us call at 512 elements).
inline int64_t gn_grain(int64_t elements_per_task) {
  return std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(elements_per_task, 1));
}

// Rows [N * HW] of C channels are split into (n, chunk) tasks for the reductions, so that a small batch
// still uses every thread.
inline int64_t gn_row_chunks(const GroupNormShape& s) {
  const int64_t want = (2 * at::get_num_threads() + s.n - 1) / s.n;
  return std::max<int64_t>(1, std::min<int64_t>(want, s.hw / 16));
}

// Backward. delta = g silu'(u) (or g), per (n, c): A = sum delta, B = rstd sum delta (x - mean); with
// k_c = w_c (1 + s_nc), m1 = sum_{c in g} k_c A_c / M, m2 = sum_{c in g} k_c B_c / M (M = D * HW):
// grad_x = rstd (k_c delta - m1 - xhat m2) = P_c delta + Q x + R per (n, group).
template <typename acc_t>
struct GroupNormBackwardCoef {
  // From A, B of the channels of group g of sample n: P per channel into p_out, and Q, R.
  static void of(const GroupNormParams<acc_t>& p, const GroupNormShape& s, int64_t n, int64_t g, acc_t mean,
                 acc_t rstd, const acc_t* A, const acc_t* B, acc_t* p_out, acc_t& q, acc_t& r) {
    acc_t m1 = 0, m2 = 0;
    for (int64_t c = g * s.d; c < (g + 1) * s.d; ++c) {
      const acc_t k = p.w(c) * p.film(n, c);
      m1 += k * A[c];
      m2 += k * B[c];
      p_out[c] = rstd * k;
    }
    const acc_t inv_m = acc_t(1) / (s.d * s.hw);
    m1 *= inv_m, m2 *= inv_m;
    q = -rstd * rstd * m2;
    r = -rstd * m1 + mean * rstd * rstd * m2;
  }
};


// What the entry points turn into GroupNormParams: the optional tensors, made contiguous.
struct GroupNormInputs {
  const std::optional<at::Tensor>&weight, &bias, &scale, &shift;
  template <typename acc_t>
  GroupNormParams<acc_t> params(int64_t channels, std::vector<at::Tensor>& keep) const {
    return {opt_ptr<acc_t>(weight, keep), opt_ptr<acc_t>(bias, keep), opt_ptr<acc_t>(scale, keep),
            opt_ptr<acc_t>(shift, keep), channels};
  }
};

}  // namespace

#define DEEPFUSION_REF_KERNELS "group_norm_silu_kernels.h"
#include "isa_copies.h"

std::tuple<at::Tensor, at::Tensor, at::Tensor> group_norm_silu_cpu(
    const at::Tensor& x_, const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& scale, const std::optional<at::Tensor>& shift, int64_t num_groups, double eps,
    bool act) {
  const GroupNormShape s = check_group_norm_args("group_norm_silu", x_, weight, bias, scale, shift, num_groups);
  const at::Tensor x = gn_in_layout(x_, s.channels_last);
  at::Tensor y = gn_empty_like(x, s.channels_last);
  const auto acc_dtype = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor mean = at::empty({s.n, s.groups}, x.options().dtype(acc_dtype)), rstd = at::empty_like(mean);
  if (x.numel() == 0) return {y, mean.fill_(0), rstd.fill_(0)};
  DEEPFUSION_REF_ISA_CALL(forward, x, y, mean, rstd, GroupNormInputs{weight, bias, scale, shift}, s, eps, act);
  return {y, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> group_norm_silu_backward_cpu(
    const at::Tensor& grad_, const at::Tensor& x_, const at::Tensor& mean_, const at::Tensor& rstd_,
    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& scale, const std::optional<at::Tensor>& shift, int64_t num_groups, bool act) {
  const GroupNormShape s =
      check_group_norm_args("group_norm_silu_backward", x_, weight, bias, scale, shift, num_groups);
  TORCH_CHECK(grad_.sizes() == x_.sizes() && grad_.scalar_type() == x_.scalar_type(),
              "group_norm_silu_backward: grad must have x's shape and dtype, got ", grad_.sizes());
  const auto acc_dtype = x_.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(mean_.sizes() == at::IntArrayRef({s.n, s.groups}) && rstd_.sizes() == mean_.sizes() &&
                  mean_.scalar_type() == acc_dtype && rstd_.scalar_type() == acc_dtype,
              "group_norm_silu_backward: mean and rstd must be ", acc_dtype, " [N, num_groups]");
  const at::Tensor x = gn_in_layout(x_, s.channels_last), grad = gn_in_layout(grad_, s.channels_last);
  const at::Tensor mean = mean_.contiguous(), rstd = rstd_.contiguous();
  at::Tensor grad_x = gn_empty_like(x, s.channels_last);
  at::Tensor sum_delta = at::zeros({s.n, s.c}, x.options().dtype(acc_dtype)), sum_delta_xhat = at::zeros_like(sum_delta);
  if (x.numel() == 0) return {grad_x, sum_delta, sum_delta_xhat};
  DEEPFUSION_REF_ISA_CALL(backward, grad, x, mean, rstd, grad_x, sum_delta, sum_delta_xhat,
                          GroupNormInputs{weight, bias, scale, shift}, s, act);
  return {grad_x, sum_delta, sum_delta_xhat};
}

}  // namespace cpu
}  // namespace deepfusion_ref
