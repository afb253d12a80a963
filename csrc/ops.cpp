// deepfusion_ref compiled core: operator schemas and CPU kernels.
//
// Every op is declared once here with TORCH_LIBRARY and gets a CPU kernel; CUDA kernels register for the
// same schema in csrc/cuda/. The Python front (deepfusion_ref/ops.py) adds fake (meta) and autograd
// registrations and holds the pure-PyTorch reference each kernel is tested against.
//
// Parallelism: at::parallel_for, torch's OpenMP front (setup.py compiles with -fopenmp, which that header template
// needs to expand into `#pragma omp parallel` here). It respects torch.set_num_threads and, because our libgomp
// dependency resolves to the runtime torch has already loaded, shares torch's thread pool.

#include <Python.h>

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

// `import deepfusion_ref._C` loads this library, which runs the registrations below. The module itself
// exposes nothing: the ops live in torch.ops.deepfusion_ref.
extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

namespace deepfusion_ref {
namespace {

// ---------------------------------------------------------------------------------------------------------
// Dynamic thresholding (Imagen): per sample, s = max(quantile(|x|, percentile), 1) [min max_value];
// y = clamp(x, -s, s) / s.
//
// The quantile uses linear interpolation between the order statistics k0 = floor(p (n - 1)) and k0 + 1, as
// torch.quantile and numpy do. Only those two order statistics are needed, so we *select* instead of sort.
// Values are compared through the bit patterns of |x|: for non-negative IEEE floats the unsigned integer
// order equals the numeric order, NaN sorts above +inf, and integer comparisons keep std::nth_element's
// strict-weak-ordering contract even when NaNs are present.
// ---------------------------------------------------------------------------------------------------------

template <typename acc_t>
using key_of_t = std::conditional_t<sizeof(acc_t) == 4, uint32_t, uint64_t>;

template <typename acc_t>
inline key_of_t<acc_t> abs_key(acc_t v) {
  acc_t a = std::fabs(v);
  key_of_t<acc_t> k;
  std::memcpy(&k, &a, sizeof(k));
  return k;
}

template <typename acc_t>
inline acc_t key_value(key_of_t<acc_t> k) {
  acc_t v;
  std::memcpy(&v, &k, sizeof(v));
  return v;
}

struct QuantilePlan {
  int64_t k0, k1;  // the two order statistics (0-based) to interpolate
  double weight;   // interpolation weight of the upper one
  double max_value;
  bool has_max;

  QuantilePlan(int64_t n, double percentile, std::optional<double> max_value_)
      : max_value(max_value_.value_or(0.0)), has_max(max_value_.has_value()) {
    const double pos = percentile * static_cast<double>(n - 1);
    k0 = std::min<int64_t>(static_cast<int64_t>(std::floor(pos)), n - 1);
    k1 = std::min<int64_t>(k0 + 1, n - 1);
    weight = pos - static_cast<double>(k0);
  }

  // s from the two order statistics. NaN propagates (std::max/min keep their first argument when the
  // comparison is false), so a sample holding a NaN comes out all NaN, as the reference does.
  template <typename acc_t>
  acc_t scale(acc_t lo, acc_t hi) const {
    const double q = static_cast<double>(lo) + weight * (static_cast<double>(hi) - static_cast<double>(lo));
    double s = std::max(q, 1.0);
    if (has_max) s = std::min(s, max_value);
    return static_cast<acc_t>(s);
  }
};

template <typename scalar_t, typename acc_t>
inline void apply_threshold(const scalar_t* x, scalar_t* y, int64_t begin, int64_t end, acc_t s) {
  for (int64_t i = begin; i < end; ++i) {
    const acc_t v = static_cast<acc_t>(x[i]);
    y[i] = static_cast<scalar_t>(std::min(std::max(v, -s), s) / s);
  }
}

// One sample, one thread (float64 keys): copy the keys, nth_element for k0, then the minimum of the upper part is k0 + 1.
template <typename scalar_t, typename acc_t>
acc_t select_scale_serial(const scalar_t* x, int64_t n, const QuantilePlan& plan,
                          std::vector<key_of_t<acc_t>>& keys) {
  keys.resize(n);
  for (int64_t i = 0; i < n; ++i) keys[i] = abs_key<acc_t>(static_cast<acc_t>(x[i]));
  std::nth_element(keys.begin(), keys.begin() + plan.k0, keys.end());
  const auto lo = keys[plan.k0];
  const auto hi = plan.k1 > plan.k0 ? *std::min_element(keys.begin() + plan.k0 + 1, keys.end()) : lo;
  return plan.scale(key_value<acc_t>(lo), key_value<acc_t>(hi));
}

// One sample; parallel inside when called outside a parallel region (a batch smaller than the thread count),
// serial inside one. A radix-select step: a
// histogram of the top 11 bits of the 32-bit keys (sign bit is 0) is built in parallel, which locates the
// bins holding k0 and k1; only the elements of those bins are gathered and selected among. The CUDA kernel
// follows the same plan with two more histogram passes in place of the final nth_element.
constexpr int kTopShift = 20;
constexpr int kTopBins = 1 << (31 - kTopShift);
constexpr int64_t kParallelGrain = 1 << 15;

template <typename scalar_t>
float select_scale_histogram(const scalar_t* x, int64_t n, const QuantilePlan& plan) {
  const int threads = at::get_num_threads();
  std::vector<std::array<int64_t, kTopBins>> local(threads);
  for (auto& h : local) h.fill(0);
  at::parallel_for(0, n, kParallelGrain, [&](int64_t begin, int64_t end) {
    // Four interleaved 32-bit sub-histograms: neighbouring elements usually fall in the same bin, and
    // incrementing one counter back to back serialises on store-to-load forwarding. Flushed every 2^30
    // elements so the 32-bit counters cannot overflow.
    auto& h = local[at::get_thread_num()];
    std::vector<uint32_t> sub(4 * kTopBins);
    for (int64_t block = begin; block < end; block += int64_t(1) << 30) {
      const int64_t stop = std::min(end, block + (int64_t(1) << 30));
      std::fill(sub.begin(), sub.end(), 0u);
      int64_t i = block;
      for (; i + 4 <= stop; i += 4) {
        ++sub[0 * kTopBins + (abs_key<float>(static_cast<float>(x[i + 0])) >> kTopShift)];
        ++sub[1 * kTopBins + (abs_key<float>(static_cast<float>(x[i + 1])) >> kTopShift)];
        ++sub[2 * kTopBins + (abs_key<float>(static_cast<float>(x[i + 2])) >> kTopShift)];
        ++sub[3 * kTopBins + (abs_key<float>(static_cast<float>(x[i + 3])) >> kTopShift)];
      }
      for (; i < stop; ++i) ++sub[abs_key<float>(static_cast<float>(x[i])) >> kTopShift];
      for (int b = 0; b < kTopBins; ++b)
        h[b] += int64_t(sub[b]) + sub[kTopBins + b] + sub[2 * kTopBins + b] + sub[3 * kTopBins + b];
    }
  });
  std::array<int64_t, kTopBins> hist{};
  for (const auto& h : local)
    for (int b = 0; b < kTopBins; ++b) hist[b] += h[b];

  // Bins of k0 and k1, and the number of elements below bin0.
  int bin0 = -1, bin1 = -1;
  int64_t below0 = 0, seen = 0;
  for (int b = 0; b < kTopBins && bin1 < 0; ++b) {
    if (bin0 < 0 && seen + hist[b] > plan.k0) { bin0 = b; below0 = seen; }
    if (seen + hist[b] > plan.k1) bin1 = b;
    seen += hist[b];
  }

  std::vector<std::vector<uint32_t>> gathered(threads);
  at::parallel_for(0, n, kParallelGrain, [&](int64_t begin, int64_t end) {
    auto& out = gathered[at::get_thread_num()];
    for (int64_t i = begin; i < end; ++i) {
      const uint32_t k = abs_key<float>(static_cast<float>(x[i]));
      const int b = static_cast<int>(k >> kTopShift);
      if (b == bin0 || b == bin1) out.push_back(k);
    }
  });
  std::vector<uint32_t> cand;
  for (auto& g : gathered) cand.insert(cand.end(), g.begin(), g.end());

  uint32_t lo, hi;
  if (bin0 == bin1) {
    const int64_t r0 = plan.k0 - below0;
    std::nth_element(cand.begin(), cand.begin() + r0, cand.end());
    lo = cand[r0];
    hi = plan.k1 > plan.k0 ? *std::min_element(cand.begin() + r0 + 1, cand.end()) : lo;
  } else {
    // k1 = k0 + 1 lies in a later bin, so k0 is the largest element of bin0 and k1 the smallest of bin1.
    lo = 0;
    hi = UINT32_MAX;
    for (uint32_t k : cand) {
      if (static_cast<int>(k >> kTopShift) == bin0) lo = std::max(lo, k);
      else hi = std::min(hi, k);
    }
  }
  return plan.scale(key_value<float>(lo), key_value<float>(hi));
}

std::tuple<at::Tensor, at::Tensor> dynamic_threshold_cpu(const at::Tensor& x, double percentile,
                                                         std::optional<double> max_value) {
  TORCH_CHECK(x.device().is_cpu(), "dynamic_threshold_cpu: x must be a CPU tensor, got ", x.device());
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), "dynamic_threshold: x must be a floating-point tensor, got ",
              x.scalar_type());
  TORCH_CHECK(x.dim() >= 1, "dynamic_threshold: x must have a batch dimension (dim >= 1), got a 0-d tensor");
  TORCH_CHECK(percentile >= 0.0 && percentile <= 1.0, "dynamic_threshold: percentile must be in [0, 1], got ",
              percentile);
  TORCH_CHECK(!max_value.has_value() || *max_value >= 1.0,
              "dynamic_threshold: max_value must be >= 1 (or None), got ", max_value.value_or(0.0));
  const int64_t batch = x.size(0);
  auto scale = at::empty({batch}, x.options().dtype(at::kFloat));
  if (batch == 0) return {at::empty_like(x, at::MemoryFormat::Contiguous), scale};
  const int64_t n = x.numel() / batch;
  TORCH_CHECK(n > 0, "dynamic_threshold: each sample of x must have at least one element, got shape ",
              x.sizes());

  const auto xc = x.contiguous();
  auto y = at::empty_like(xc, at::MemoryFormat::Contiguous);
  const QuantilePlan plan(n, percentile, max_value);
  float* scale_ptr = scale.data_ptr<float>();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "dynamic_threshold_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = xc.const_data_ptr<scalar_t>();
    scalar_t* yp = y.mutable_data_ptr<scalar_t>();
    // float keys: histogram selection; float64 keys: nth_element.
    auto select_scale = [&](const scalar_t* xs, std::vector<key_of_t<acc_t>>& keys) -> acc_t {
      if constexpr (std::is_same_v<acc_t, float>) return select_scale_histogram<scalar_t>(xs, n, plan);
      else return select_scale_serial<scalar_t, acc_t>(xs, n, plan, keys);
    };
    if (batch >= at::get_num_threads() || n < 2 * kParallelGrain) {
      // Enough samples to keep every thread busy (or samples too small to split): one sample per task; the
      // parallel_for calls inside the selection run inline within a parallel region.
      at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
        std::vector<key_of_t<acc_t>> keys;
        for (int64_t b = begin; b < end; ++b) {
          const acc_t s = select_scale(xp + b * n, keys);
          scale_ptr[b] = static_cast<float>(s);
          apply_threshold<scalar_t, acc_t>(xp + b * n, yp + b * n, 0, n, s);
        }
      });
    } else {
      // Fewer samples than threads: parallel within each sample.
      std::vector<key_of_t<acc_t>> keys;
      for (int64_t b = 0; b < batch; ++b) {
        const scalar_t* xs = xp + b * n;
        const acc_t s = select_scale(xs, keys);
        scale_ptr[b] = static_cast<float>(s);
        at::parallel_for(0, n, kParallelGrain, [&](int64_t begin, int64_t end) {
          apply_threshold<scalar_t, acc_t>(xs, yp + b * n, begin, end, s);
        });
      }
    }
  });
  return {y.view(x.sizes()), scale};
}


// ---------------------------------------------------------------------------------------------------------
// adaLN normalisation (DiT blocks): y = norm(x) * (1 + scale[b]) + shift[b], norm = LayerNorm (no affine) or
// RMSNorm, over the last dim of x [B, N, D]; shift/scale [B, D]. One pass over each row for the statistics,
// one for the output, in the compute dtype (float for half/bf16/float, double for double).
// ---------------------------------------------------------------------------------------------------------

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

// ---------------------------------------------------------------------------------------------------------
// RoPE application: channel pairs (x[2j], x[2j+1]) of x [..., N, Dh] rotated by the angle behind cos/sin [N, Dh]
// (FLUX layout: both entries of a pair carry the same cos/sin). The backward is the same op with -sin.
// ---------------------------------------------------------------------------------------------------------

void check_rope_args(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  TORCH_CHECK(x.dim() >= 2 && x.size(-1) % 2 == 0, "rope: x must be [..., tokens, head_dim] with an even head_dim, "
              "got ", x.sizes());
  TORCH_CHECK(cos.dim() == 2 && cos.sizes() == sin.sizes() && cos.size(0) == x.size(-2) && cos.size(1) == x.size(-1),
              "rope: cos and sin must be [tokens, head_dim] = [", x.size(-2), ", ", x.size(-1), "], got ",
              cos.sizes(), " and ", sin.sizes());
  TORCH_CHECK(cos.scalar_type() == at::kFloat && sin.scalar_type() == at::kFloat, "rope: cos and sin must be float32");
}

at::Tensor rope_cpu(const at::Tensor& x_, const at::Tensor& cos_, const at::Tensor& sin_) {
  check_rope_args(x_, cos_, sin_);
  const auto x = x_.contiguous(), cos = cos_.contiguous(), sin = sin_.contiguous();
  auto y = at::empty_like(x, at::MemoryFormat::Contiguous);
  const int64_t n = x.size(-2), dh = x.size(-1), rows = x.numel() / dh;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "rope_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const float *cp = cos.const_data_ptr<float>(), *sp = sin.const_data_ptr<float>();
    scalar_t* yp = y.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / dh), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t t = r % n;
        const scalar_t* row = xp + r * dh;
        _Pragma("omp simd")
        for (int64_t j = 0; j < dh; j += 2) {
          const acc_t x1 = static_cast<acc_t>(row[j]), x2 = static_cast<acc_t>(row[j + 1]);
          const acc_t c = cp[t * dh + j], s = sp[t * dh + j];
          yp[r * dh + j] = static_cast<scalar_t>(x1 * c - x2 * s);
          yp[r * dh + j + 1] = static_cast<scalar_t>(x2 * c + x1 * s);
        }
      }
    });
  });
  return y;
}


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

}  // namespace

TORCH_LIBRARY(deepfusion_ref, m) {
  // y = clamp(x, -s, s) / s with s the per-sample dynamic threshold; also returns s (float32, [batch]).
  m.def("dynamic_threshold(Tensor x, float percentile, float? max_value) -> (Tensor, Tensor)");
  // adaLN of DiT blocks: norm(x) * (1 + scale) + shift, norm = LayerNorm (rms=False) or RMSNorm, no affine.
  m.def("adaln_norm(Tensor x, Tensor shift, Tensor scale, float eps, bool rms) -> Tensor");
  m.def("adaln_norm_backward(Tensor grad, Tensor x, Tensor scale, float eps, bool rms) -> (Tensor, Tensor, Tensor)");
  // Rotary embedding of channel pairs; rope(x, cos, -sin) is its backward.
  m.def("rope(Tensor x, Tensor cos, Tensor sin) -> Tensor");
  // U-Net blocks: silu(group_norm(x) * (1 + scale) + shift) (act=False: no silu); returns (y, mean, rstd), the
  // statistics [N, num_groups] in the compute dtype. Optional weight/bias [C], scale/shift [N, C], compute dtype.
  m.def("group_norm_silu(Tensor x, Tensor? weight, Tensor? bias, Tensor? scale, Tensor? shift, int num_groups, "
        "float eps, bool act) -> (Tensor, Tensor, Tensor)");
  // Its backward: (grad_x, A = sum_hw delta, B = sum_hw delta * xhat) with delta = dL/d(pre-activation), A and B
  // [N, C] in the compute dtype; the parameter gradients follow from A and B in Python.
  m.def("group_norm_silu_backward(Tensor grad, Tensor x, Tensor mean, Tensor rstd, Tensor? weight, Tensor? bias, "
        "Tensor? scale, Tensor? shift, int num_groups, bool act) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(deepfusion_ref, CPU, m) {
  m.impl("dynamic_threshold", &dynamic_threshold_cpu);
  m.impl("adaln_norm", &adaln_norm_cpu);
  m.impl("adaln_norm_backward", &adaln_norm_backward_cpu);
  m.impl("rope", &rope_cpu);
  m.impl("group_norm_silu", &group_norm_silu_cpu);
  m.impl("group_norm_silu_backward", &group_norm_silu_backward_cpu);
}

}  // namespace deepfusion_ref
