// CPU kernel (OpenMP through at::parallel_for); the op's schema and registration are in csrc/ops.cpp.
// ---------------------------------------------------------------------------------------------------------
// RoPE application: channel pairs (x[2j], x[2j+1]) of x [..., N, Dh] rotated by the angle behind cos/sin [N, Dh]
// (FLUX layout: both entries of a pair carry the same cos/sin). The backward is the same op with -sin.
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

void check_rope_args(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  TORCH_CHECK(x.dim() >= 2 && x.size(-1) % 2 == 0, "rope: x must be [..., tokens, head_dim] with an even head_dim, "
              "got ", x.sizes());
  TORCH_CHECK(cos.dim() == 2 && cos.sizes() == sin.sizes() && cos.size(0) == x.size(-2) && cos.size(1) == x.size(-1),
              "rope: cos and sin must be [tokens, head_dim] = [", x.size(-2), ", ", x.size(-1), "], got ",
              cos.sizes(), " and ", sin.sizes());
  TORCH_CHECK(cos.scalar_type() == at::kFloat && sin.scalar_type() == at::kFloat, "rope: cos and sin must be float32");
}

}  // namespace

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

}  // namespace cpu
}  // namespace deepfusion_ref
