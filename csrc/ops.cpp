// deepfusion_ref compiled core: operator schemas and the registration of their CPU kernels.
//
// Every op is declared once here with TORCH_LIBRARY; its CPU kernel is in csrc/cpu/<op>.cpp, its CUDA kernel
// registers for the same schema in csrc/cuda/. The Python front (deepfusion_ref/ops.py) adds fake (meta) and autograd
// registrations and holds the pure-PyTorch reference each kernel is tested against.
//
// Parallelism: at::parallel_for, torch's OpenMP front (setup.py compiles with -fopenmp, which that header template
// needs to expand into `#pragma omp parallel` in csrc/cpu/). It respects torch.set_num_threads and, because our libgomp
// dependency resolves to the runtime torch has already loaded, shares torch's thread pool.

#include <Python.h>

#include <torch/library.h>

#include "cpu/isa.h"
#include "cpu/ops.h"

// `import deepfusion_ref._C` loads this library, which runs the registrations below. The module itself
// exposes nothing: the ops live in torch.ops.deepfusion_ref.
extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

namespace deepfusion_ref {

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
  // The instruction set the CPU kernels run with on this machine: "avx512", "avx2" or "base" (csrc/cpu/isa.h).
  m.def("cpu_isa() -> str", []() { return std::string(cpu::cpu_isa_name()); });
}

TORCH_LIBRARY_IMPL(deepfusion_ref, CPU, m) {
  m.impl("dynamic_threshold", &cpu::dynamic_threshold_cpu);
  m.impl("adaln_norm", &cpu::adaln_norm_cpu);
  m.impl("adaln_norm_backward", &cpu::adaln_norm_backward_cpu);
  m.impl("rope", &cpu::rope_cpu);
  m.impl("group_norm_silu", &cpu::group_norm_silu_cpu);
  m.impl("group_norm_silu_backward", &cpu::group_norm_silu_backward_cpu);
}

}  // namespace deepfusion_ref
