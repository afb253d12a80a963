// CPU kernel (OpenMP through at::parallel_for); the op's schema and registration are in csrc/ops.cpp.
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

}  // namespace

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

}  // namespace cpu
}  // namespace deepfusion_ref
