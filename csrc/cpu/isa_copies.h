// The three copies of a kernel file's loops (see isa.h): `#define DEEPFUSION_REF_KERNELS "<op>_kernels.h"`, then
// include this after every other header. No include guard: each kernel file includes it once, for its own loops.
namespace isa_base {
#include DEEPFUSION_REF_KERNELS
}  // namespace isa_base
#if DEEPFUSION_REF_X86_ISAS
DEEPFUSION_REF_BEGIN_AVX2
namespace isa_avx2 {
#include DEEPFUSION_REF_KERNELS
}  // namespace isa_avx2
DEEPFUSION_REF_END_ISA
DEEPFUSION_REF_BEGIN_AVX512
namespace isa_avx512 {
#include DEEPFUSION_REF_KERNELS
}  // namespace isa_avx512
DEEPFUSION_REF_END_ISA
#endif
#undef DEEPFUSION_REF_KERNELS
