// adaLN normalisation loops, included once per instruction set by adaln_norm.cpp (see isa.h): no include
// guard, no includes.

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

void forward(const at::Tensor& x, const at::Tensor& shift, const at::Tensor& scale, at::Tensor& y, double eps,
             bool rms) {
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
}

// grad_x row by row; grad_shift = sum_n g and grad_scale = sum_n g * xhat per sample into per-thread rows of
// partial [threads, 2, batch, dim], reduced by the caller.
void backward(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& scale, at::Tensor& grad_x,
              at::Tensor& partial, double eps, bool rms) {
  const int64_t batch = x.size(0), n = x.size(1), d = x.size(2), rows = batch * n;
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
}

}  // namespace
