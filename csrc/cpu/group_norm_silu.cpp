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

// exp for the SiLU: Cephes' expf (range reduction by ln 2, degree-6 polynomial, 2^k built from bits), about
// 1 ulp, written branch-free so that `omp simd` loops vectorise it (std::exp would stay scalar without
// -ffast-math). float64 uses std::exp.
inline float exp_approx(float x) {
  x = std::min(std::max(x, -87.3f), 88.3f);
  float kf = x * 1.44269504088896341f + 12582912.f;  // + 1.5 * 2^23 rounds to the nearest integer
  kf -= 12582912.f;
  float r = x - kf * 0.693359375f;
  r = r - kf * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.f;
  const int32_t bits = (static_cast<int32_t>(kf) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}
inline double exp_approx(double x) { return std::exp(x); }

template <typename acc_t>
inline acc_t silu_of(acc_t u) { return u / (acc_t(1) + exp_approx(-u)); }

// d silu / du = sigmoid(u) (1 + u (1 - sigmoid(u)))
template <typename acc_t>
inline acc_t silu_grad_of(acc_t u) {
  const acc_t sig = acc_t(1) / (acc_t(1) + exp_approx(-u));
  return sig * (acc_t(1) + u * (acc_t(1) - sig));
}

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

template <typename scalar_t, typename acc_t>
void group_norm_silu_nchw(const scalar_t* xp, scalar_t* yp, acc_t* mean_out, acc_t* rstd_out,
                          const GroupNormParams<acc_t>& p, const GroupNormShape& s, double eps, bool act) {
  at::parallel_for(0, s.n * s.groups, 1, [&](int64_t t0, int64_t t1) {
    std::vector<acc_t> k(s.d), s1(s.d), s2(s.d);
    for (int64_t task = t0; task < t1; ++task) {
      const int64_t n = task / s.groups, g = task % s.groups;
      for (int64_t ci = 0; ci < s.d; ++ci) {
        const scalar_t* xc = xp + (n * s.c + g * s.d + ci) * s.hw;
        const acc_t shift = static_cast<acc_t>(xc[0]);
        acc_t a = 0, b = 0;
        _Pragma("omp simd reduction(+ : a, b)")
        for (int64_t i = 0; i < s.hw; ++i) {
          const acc_t v = static_cast<acc_t>(xc[i]) - shift;
          a += v;
          b += v * v;
        }
        k[ci] = shift, s1[ci] = a, s2[ci] = b;
      }
      acc_t mean, rstd;
      merge_channel_sums(k.data(), s1.data(), s2.data(), s.d, s.hw, eps, mean, rstd);
      mean_out[task] = mean, rstd_out[task] = rstd;
      for (int64_t ci = 0; ci < s.d; ++ci) {
        const int64_t c = g * s.d + ci;
        const scalar_t* xc = xp + (n * s.c + c) * s.hw;
        scalar_t* yc = yp + (n * s.c + c) * s.hw;
        acc_t a, b;
        p.coefficients(n, c, mean, rstd, a, b);
        if (act) {
          _Pragma("omp simd")
          for (int64_t i = 0; i < s.hw; ++i) yc[i] = static_cast<scalar_t>(silu_of(a * static_cast<acc_t>(xc[i]) + b));
        } else {
          _Pragma("omp simd")
          for (int64_t i = 0; i < s.hw; ++i) yc[i] = static_cast<scalar_t>(a * static_cast<acc_t>(xc[i]) + b);
        }
      }
    }
  });
}

// Rows [N * HW] of C channels are split into (n, chunk) tasks for the reductions, so that a small batch
// still uses every thread.
inline int64_t gn_row_chunks(const GroupNormShape& s) {
  const int64_t want = (2 * at::get_num_threads() + s.n - 1) / s.n;
  return std::max<int64_t>(1, std::min<int64_t>(want, s.hw / 16));
}

template <typename scalar_t, typename acc_t>
void group_norm_silu_nhwc(const scalar_t* xp, scalar_t* yp, acc_t* mean_out, acc_t* rstd_out,
                          const GroupNormParams<acc_t>& p, const GroupNormShape& s, double eps, bool act) {
  const int64_t chunks = gn_row_chunks(s), rows_per_chunk = (s.hw + chunks - 1) / chunks, C = s.c;
  std::vector<acc_t> partial(static_cast<size_t>(s.n * chunks * 2 * C), acc_t(0));
  at::parallel_for(0, s.n * chunks, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t task = t0; task < t1; ++task) {
      const int64_t n = task / chunks, r0 = (task % chunks) * rows_per_chunk;
      const int64_t r1 = std::min(s.hw, r0 + rows_per_chunk);
      acc_t *s1 = partial.data() + task * 2 * C, *s2 = s1 + C;
      const scalar_t* k = xp + n * s.hw * C;  // shift: the first row of the sample
      for (int64_t r = r0; r < r1; ++r) {
        const scalar_t* row = xp + (n * s.hw + r) * C;
        _Pragma("omp simd")
        for (int64_t c = 0; c < C; ++c) {
          const acc_t v = static_cast<acc_t>(row[c]) - static_cast<acc_t>(k[c]);
          s1[c] += v;
          s2[c] += v * v;
        }
      }
    }
  });
  // Per sample: sum the chunks, merge per group, and the per-channel coefficients of the output pass.
  std::vector<acc_t> coef(static_cast<size_t>(s.n * 2 * C));
  at::parallel_for(0, s.n, 1, [&](int64_t n0, int64_t n1) {
    std::vector<acc_t> k(C), s1(C, 0), s2(C, 0);
    for (int64_t n = n0; n < n1; ++n) {
      std::fill(s1.begin(), s1.end(), acc_t(0));
      std::fill(s2.begin(), s2.end(), acc_t(0));
      for (int64_t ch = 0; ch < chunks; ++ch) {
        const acc_t* part = partial.data() + (n * chunks + ch) * 2 * C;
        for (int64_t c = 0; c < C; ++c) s1[c] += part[c], s2[c] += part[C + c];
      }
      for (int64_t c = 0; c < C; ++c) k[c] = static_cast<acc_t>(xp[n * s.hw * C + c]);
      for (int64_t g = 0; g < s.groups; ++g) {
        acc_t mean, rstd;
        merge_channel_sums(k.data() + g * s.d, s1.data() + g * s.d, s2.data() + g * s.d, s.d, s.hw, eps, mean, rstd);
        mean_out[n * s.groups + g] = mean, rstd_out[n * s.groups + g] = rstd;
        for (int64_t c = g * s.d; c < (g + 1) * s.d; ++c)
          p.coefficients(n, c, mean, rstd, coef[(n * 2) * C + c], coef[(n * 2 + 1) * C + c]);
      }
    }
  });
  at::parallel_for(0, s.n * s.hw, std::max<int64_t>(1, 16384 / std::max<int64_t>(C, 1)), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t n = r / s.hw;
      const acc_t *a = coef.data() + n * 2 * C, *b = a + C;
      const scalar_t* row = xp + r * C;
      scalar_t* out = yp + r * C;
      if (act) {
        _Pragma("omp simd")
        for (int64_t c = 0; c < C; ++c) out[c] = static_cast<scalar_t>(silu_of(a[c] * static_cast<acc_t>(row[c]) + b[c]));
      } else {
        _Pragma("omp simd")
        for (int64_t c = 0; c < C; ++c) out[c] = static_cast<scalar_t>(a[c] * static_cast<acc_t>(row[c]) + b[c]);
      }
    }
  });
}

}  // namespace

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
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "group_norm_silu_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    std::vector<at::Tensor> keep;
    const GroupNormParams<acc_t> p{opt_ptr<acc_t>(weight, keep), opt_ptr<acc_t>(bias, keep),
                                   opt_ptr<acc_t>(scale, keep), opt_ptr<acc_t>(shift, keep), s.c};
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* yp = y.mutable_data_ptr<scalar_t>();
    if (s.channels_last)
      group_norm_silu_nhwc<scalar_t, acc_t>(xp, yp, mean.mutable_data_ptr<acc_t>(), rstd.mutable_data_ptr<acc_t>(), p,
                                            s, eps, act);
    else
      group_norm_silu_nchw<scalar_t, acc_t>(xp, yp, mean.mutable_data_ptr<acc_t>(), rstd.mutable_data_ptr<acc_t>(), p,
                                            s, eps, act);
  });
  return {y, mean, rstd};
}

namespace {

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

template <typename scalar_t, typename acc_t>
void group_norm_silu_backward_nchw(const scalar_t* gp, const scalar_t* xp, const acc_t* mean_p, const acc_t* rstd_p,
                                   scalar_t* gxp, acc_t* A, acc_t* B, const GroupNormParams<acc_t>& p,
                                   const GroupNormShape& s, bool act) {
  at::parallel_for(0, s.n * s.groups, 1, [&](int64_t t0, int64_t t1) {
    std::vector<acc_t> pc(s.c);
    for (int64_t task = t0; task < t1; ++task) {
      const int64_t n = task / s.groups, g = task % s.groups;
      const acc_t mean = mean_p[task], rstd = rstd_p[task];
      acc_t* An = A + n * s.c;
      acc_t* Bn = B + n * s.c;
      for (int64_t c = g * s.d; c < (g + 1) * s.d; ++c) {
        const scalar_t *xc = xp + (n * s.c + c) * s.hw, *gc = gp + (n * s.c + c) * s.hw;
        acc_t a, b, sum_d = 0, sum_dx = 0;
        p.coefficients(n, c, mean, rstd, a, b);
        _Pragma("omp simd reduction(+ : sum_d, sum_dx)")
        for (int64_t i = 0; i < s.hw; ++i) {
          const acc_t v = static_cast<acc_t>(xc[i]);
          const acc_t delta = act ? static_cast<acc_t>(gc[i]) * silu_grad_of(a * v + b) : static_cast<acc_t>(gc[i]);
          sum_d += delta;
          sum_dx += delta * (v - mean);
        }
        An[c] = sum_d, Bn[c] = rstd * sum_dx;
      }
      acc_t q, r;
      GroupNormBackwardCoef<acc_t>::of(p, s, n, g, mean, rstd, An, Bn, pc.data(), q, r);
      for (int64_t c = g * s.d; c < (g + 1) * s.d; ++c) {
        const scalar_t *xc = xp + (n * s.c + c) * s.hw, *gc = gp + (n * s.c + c) * s.hw;
        scalar_t* out = gxp + (n * s.c + c) * s.hw;
        acc_t a, b;
        p.coefficients(n, c, mean, rstd, a, b);
        const acc_t pk = pc[c];
        _Pragma("omp simd")
        for (int64_t i = 0; i < s.hw; ++i) {
          const acc_t v = static_cast<acc_t>(xc[i]);
          const acc_t delta = act ? static_cast<acc_t>(gc[i]) * silu_grad_of(a * v + b) : static_cast<acc_t>(gc[i]);
          out[i] = static_cast<scalar_t>(pk * delta + q * v + r);
        }
      }
    }
  });
}

template <typename scalar_t, typename acc_t>
void group_norm_silu_backward_nhwc(const scalar_t* gp, const scalar_t* xp, const acc_t* mean_p, const acc_t* rstd_p,
                                   scalar_t* gxp, acc_t* A, acc_t* B, const GroupNormParams<acc_t>& p,
                                   const GroupNormShape& s, bool act) {
  const int64_t chunks = gn_row_chunks(s), rows_per_chunk = (s.hw + chunks - 1) / chunks, C = s.c, G = s.groups;
  // Per-channel coefficients of u = a x + b and the per-channel mean (of the channel's group).
  std::vector<acc_t> coef(static_cast<size_t>(s.n * 3 * C));
  for (int64_t n = 0; n < s.n; ++n)
    for (int64_t c = 0; c < C; ++c) {
      const int64_t ng = n * G + c / s.d;
      p.coefficients(n, c, mean_p[ng], rstd_p[ng], coef[n * 3 * C + c], coef[n * 3 * C + C + c]);
      coef[n * 3 * C + 2 * C + c] = mean_p[ng];
    }
  std::vector<acc_t> partial(static_cast<size_t>(s.n * chunks * 2 * C), acc_t(0));
  at::parallel_for(0, s.n * chunks, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t task = t0; task < t1; ++task) {
      const int64_t n = task / chunks, r0 = (task % chunks) * rows_per_chunk;
      const int64_t r1 = std::min(s.hw, r0 + rows_per_chunk);
      acc_t *sd = partial.data() + task * 2 * C, *sdx = sd + C;
      const acc_t *a = coef.data() + n * 3 * C, *b = a + C, *m = b + C;
      for (int64_t r = r0; r < r1; ++r) {
        const scalar_t *row = xp + (n * s.hw + r) * C, *grow = gp + (n * s.hw + r) * C;
        _Pragma("omp simd")
        for (int64_t c = 0; c < C; ++c) {
          const acc_t v = static_cast<acc_t>(row[c]);
          const acc_t delta = act ? static_cast<acc_t>(grow[c]) * silu_grad_of(a[c] * v + b[c]) : static_cast<acc_t>(grow[c]);
          sd[c] += delta;
          sdx[c] += delta * (v - m[c]);
        }
      }
    }
  });
  // A, B per sample, then P (per channel), Q and R (per group) of grad_x.
  std::vector<acc_t> pqr(static_cast<size_t>(s.n * 3 * C));
  for (int64_t n = 0; n < s.n; ++n) {
    acc_t *An = A + n * C, *Bn = B + n * C;
    for (int64_t c = 0; c < C; ++c) An[c] = 0, Bn[c] = 0;
    for (int64_t ch = 0; ch < chunks; ++ch) {
      const acc_t* part = partial.data() + (n * chunks + ch) * 2 * C;
      for (int64_t c = 0; c < C; ++c) An[c] += part[c], Bn[c] += part[C + c];
    }
    for (int64_t c = 0; c < C; ++c) Bn[c] *= rstd_p[n * G + c / s.d];
    acc_t* P = pqr.data() + n * 3 * C;
    for (int64_t g = 0; g < G; ++g) {
      acc_t q, r;
      GroupNormBackwardCoef<acc_t>::of(p, s, n, g, mean_p[n * G + g], rstd_p[n * G + g], An, Bn, P, q, r);
      for (int64_t c = g * s.d; c < (g + 1) * s.d; ++c) P[C + c] = q, P[2 * C + c] = r;
    }
  }
  at::parallel_for(0, s.n * s.hw, std::max<int64_t>(1, 16384 / std::max<int64_t>(C, 1)), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t n = r / s.hw;
      const acc_t *a = coef.data() + n * 3 * C, *b = a + C;
      const acc_t *P = pqr.data() + n * 3 * C, *Q = P + C, *R = Q + C;
      const scalar_t *row = xp + r * C, *grow = gp + r * C;
      scalar_t* out = gxp + r * C;
      _Pragma("omp simd")
      for (int64_t c = 0; c < C; ++c) {
        const acc_t v = static_cast<acc_t>(row[c]);
        const acc_t delta = act ? static_cast<acc_t>(grow[c]) * silu_grad_of(a[c] * v + b[c]) : static_cast<acc_t>(grow[c]);
        out[c] = static_cast<scalar_t>(P[c] * delta + Q[c] * v + R[c]);
      }
    }
  });
}

}  // namespace

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
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "group_norm_silu_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    std::vector<at::Tensor> keep;
    const GroupNormParams<acc_t> p{opt_ptr<acc_t>(weight, keep), opt_ptr<acc_t>(bias, keep),
                                   opt_ptr<acc_t>(scale, keep), opt_ptr<acc_t>(shift, keep), s.c};
    auto run = s.channels_last ? &group_norm_silu_backward_nhwc<scalar_t, acc_t>
                               : &group_norm_silu_backward_nchw<scalar_t, acc_t>;
    run(grad.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), mean.const_data_ptr<acc_t>(),
        rstd.const_data_ptr<acc_t>(), grad_x.mutable_data_ptr<scalar_t>(), sum_delta.mutable_data_ptr<acc_t>(),
        sum_delta_xhat.mutable_data_ptr<acc_t>(), p, s, act);
  });
  return {grad_x, sum_delta, sum_delta_xhat};
}

}  // namespace cpu
}  // namespace deepfusion_ref
