// GroupNorm + FiLM + SiLU loops, included once per instruction set by group_norm_silu.cpp (see isa.h):
// no include guard, no includes; everything it uses is declared before the first inclusion.

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

template <typename scalar_t, typename acc_t>
void group_norm_silu_nchw(const scalar_t* xp, scalar_t* yp, acc_t* mean_out, acc_t* rstd_out,
                          const GroupNormParams<acc_t>& p, const GroupNormShape& s, double eps, bool act) {
  at::parallel_for(0, s.n * s.groups, gn_grain(s.d * s.hw), [&](int64_t t0, int64_t t1) {
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

// Channels-last reductions: body(task, n, r0, r1) for each (sample n, chunk of rows [r0, r1)) task, in parallel.
template <typename F>
void for_row_chunks(const GroupNormShape& s, int64_t chunks, int64_t rows_per_chunk, const F& body) {
  at::parallel_for(0, s.n * chunks, gn_grain(rows_per_chunk * s.c), [&](int64_t t0, int64_t t1) {
    for (int64_t task = t0; task < t1; ++task) {
      const int64_t n = task / chunks, r0 = (task % chunks) * rows_per_chunk;
      body(task, n, r0, std::min(s.hw, r0 + rows_per_chunk));
    }
  });
}

template <typename scalar_t, typename acc_t>
void group_norm_silu_nhwc(const scalar_t* xp, scalar_t* yp, acc_t* mean_out, acc_t* rstd_out,
                          const GroupNormParams<acc_t>& p, const GroupNormShape& s, double eps, bool act) {
  const int64_t chunks = gn_row_chunks(s), rows_per_chunk = (s.hw + chunks - 1) / chunks, C = s.c;
  std::vector<acc_t> partial(static_cast<size_t>(s.n * chunks * 2 * C), acc_t(0));
  for_row_chunks(s, chunks, rows_per_chunk, [&](int64_t task, int64_t n, int64_t r0, int64_t r1) {
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
  });
  // Per sample: sum the chunks, merge per group, and the per-channel coefficients of the output pass.
  std::vector<acc_t> coef(static_cast<size_t>(s.n * 2 * C));
  at::parallel_for(0, s.n, gn_grain(chunks * C), [&](int64_t n0, int64_t n1) {
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

template <typename scalar_t, typename acc_t, bool act>
void group_norm_silu_backward_nchw(const scalar_t* gp, const scalar_t* xp, const acc_t* mean_p, const acc_t* rstd_p,
                                   scalar_t* gxp, acc_t* A, acc_t* B, const GroupNormParams<acc_t>& p,
                                   const GroupNormShape& s) {
  at::parallel_for(0, s.n * s.groups, gn_grain(s.d * s.hw), [&](int64_t t0, int64_t t1) {
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

template <typename scalar_t, typename acc_t, bool act>
void group_norm_silu_backward_nhwc(const scalar_t* gp, const scalar_t* xp, const acc_t* mean_p, const acc_t* rstd_p,
                                   scalar_t* gxp, acc_t* A, acc_t* B, const GroupNormParams<acc_t>& p,
                                   const GroupNormShape& s) {
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
  for_row_chunks(s, chunks, rows_per_chunk, [&](int64_t task, int64_t n, int64_t r0, int64_t r1) {
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

// The op's entry points for this instruction set: the dtype dispatch, then the layout's loops.
void forward(const at::Tensor& x, at::Tensor& y, at::Tensor& mean, at::Tensor& rstd, const GroupNormInputs& in,
             const GroupNormShape& s, double eps, bool act) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "group_norm_silu_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    std::vector<at::Tensor> keep;
    const GroupNormParams<acc_t> p = in.params<acc_t>(s.c, keep);
    auto run = s.channels_last ? &group_norm_silu_nhwc<scalar_t, acc_t> : &group_norm_silu_nchw<scalar_t, acc_t>;
    run(x.const_data_ptr<scalar_t>(), y.mutable_data_ptr<scalar_t>(), mean.mutable_data_ptr<acc_t>(),
        rstd.mutable_data_ptr<acc_t>(), p, s, eps, act);
  });
}

void backward(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& mean, const at::Tensor& rstd,
              at::Tensor& grad_x, at::Tensor& sum_delta, at::Tensor& sum_delta_xhat, const GroupNormInputs& in,
              const GroupNormShape& s, bool act) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "group_norm_silu_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    std::vector<at::Tensor> keep;
    const GroupNormParams<acc_t> p = in.params<acc_t>(s.c, keep);
    // act as a template argument: GCC does not unswitch these loops on a run-time flag, and would not vectorise
    // the loop that holds both branches.
    auto run = s.channels_last ? (act ? &group_norm_silu_backward_nhwc<scalar_t, acc_t, true>
                                      : &group_norm_silu_backward_nhwc<scalar_t, acc_t, false>)
                               : (act ? &group_norm_silu_backward_nchw<scalar_t, acc_t, true>
                                      : &group_norm_silu_backward_nchw<scalar_t, acc_t, false>);
    run(grad.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), mean.const_data_ptr<acc_t>(),
        rstd.const_data_ptr<acc_t>(), grad_x.mutable_data_ptr<scalar_t>(), sum_delta.mutable_data_ptr<acc_t>(),
        sum_delta_xhat.mutable_data_ptr<acc_t>(), p, s);
  });
}

}  // namespace
