/*
 * Dynamic thresholding (Imagen), CUDA implementation.
 *
 * For every sample b of x viewed as [B, n]:
 *   a   = |x| in fp32;  key(a) = bit pattern of a with the sign bit cleared. For a >= 0 the key
 *         is monotonic in the value (NaN keys sort above +inf, no special handling).
 *   v0, v1 = order statistics of rank k0, k1 (0-based), q = v0 + w (v1 - v0) in double,
 *   s   = max(float(q), 1), then min(s, max_value) if a bound is given,
 *   y   = clamp(x, -s, s) / s in fp32 (IEEE division), stored in x's dtype.
 *
 * Both order statistics are found by a multi-block radix select over the 32-bit keys
 * (12 + 10 + 10 bits; the top digit has only 2048 bins because the sign bit is 0).
 * Per launch, for each chunk of <= 65535 samples (gridDim.y limit), in stream order:
 *   memset  : zero hist_top, hist_ref, cand_count (the workspace arrives with garbage)
 *   top     : grid (bx, B). shared 2048-bin histogram of key >> 20, nonzero bins atomically
 *             added into hist_top[b].
 *   find L0 : one block per sample. Block scan of hist_top[b] locates, for each target t
 *             (t=0: rank k0, t=1: rank k1), the bin holding it and the rank left inside the
 *             bin -> state[b].prefix[t] = bin << 20, state[b].rank[t].
 *   compact : grid (bx, B). Keys whose top bin equals either target's bin are appended to
 *             cand[b][*]; one atomicAdd per warp on cand_count[b] (ballot aggregation).
 *   refine1 : grid (bx, B) over cand[b][0 .. cand_count[b]). For each target t, candidates
 *             with key >> 20 == prefix[t] >> 20 are counted by bits 19..10 into hist_ref[b][t].
 *   find L1 : extends prefix[t] by bits 19..10, reduces rank[t]; also clears hist_ref[b]
 *             (each bin is cleared by the thread that read it) so refine2 can reuse it.
 *   refine2 : as refine1 with known bits key >> 10 and digit bits 9..0.
 *   find L2 : prefix[t] is now exactly the key of order statistic t. Computes s and stores
 *             it in scale[b] (and scale_out[b] if given).
 *   apply   : grid (bx, B). Elementwise; 16-byte vector loads/stores for the aligned body,
 *             scalar head/tail (scalar kernel if x and y are mutually misaligned).
 *
 * Workspace layout (C = uint32 if n <= UINT32_MAX else uint64; every section starts at a
 * 256-byte aligned offset from the workspace base):
 *   hist_top   C[B][2048]
 *   hist_ref   C[B][2][1024]
 *   cand_count u64[B]
 *     ---- bytes [0, end of cand_count) are cleared by one cudaMemsetAsync per launch ----
 *   state      SampleState[B] = {u64 rank[2]; u32 prefix[2];}   (written before it is read)
 *   scale      float[B]                                         (written before it is read)
 *   cand       u32[B][n]  (row b holds cand_count[b] <= n valid keys)
 *
 * Shared-memory histograms use 32-bit counters; the launcher keeps the per-block element
 * count below 2^31 so they cannot overflow. Global counts use C, which holds n.
 */

#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>

#include <cub/block/block_scan.cuh>

#include "kernels.h"

namespace deepfusion_ref {
namespace cuda {
namespace {

constexpr int kThreads = 256;      // block size of the streaming kernels (multiple of 32)
constexpr int kFindThreads = 256;  // block size of the per-sample find kernels
constexpr int kBlocksPerSM = 8;    // 8 x 256 threads = full occupancy on sm_80/sm_90
constexpr int kTopShift = 20;
constexpr int kTopBins = 2048;  // key >> 20 < 2^11 because the sign bit is cleared
constexpr int kRefBits = 10;
constexpr int kRefBins = 1 << kRefBits;
constexpr int64_t kMaxGridY = 65535;
constexpr int64_t kMaxElemsPerBlock = int64_t(1) << 30;  // keeps 32-bit shared counters safe

static_assert(kThreads % 32 == 0, "warp-uniform loops need whole warps");
static_assert(kTopBins % kFindThreads == 0 && kRefBins % kFindThreads == 0, "bins per thread");
static_assert(kTopShift == 2 * kRefBits, "12 + 10 + 10 bit split");

struct SampleState {
  unsigned long long rank[2];  // rank of target t among the keys that share prefix[t]'s known bits
  unsigned int prefix[2];      // known high bits of target t's key (unknown low bits are 0)
};

// ----------------------------------------------------------------------------------------
// Element access. Vector paths move 16 bytes (uint4) and unpack by bit manipulation.
// ----------------------------------------------------------------------------------------
template <typename T>
struct Elem;

template <>
struct Elem<float> {
  static constexpr int kVec = 4;
  static __device__ __forceinline__ float load(const float* p, int64_t i) { return __ldg(p + i); }
  static __device__ __forceinline__ void store(float* p, int64_t i, float v) { p[i] = v; }
  static __device__ __forceinline__ void unpack(const uint4& r, float (&o)[kVec]) {
    o[0] = __uint_as_float(r.x);
    o[1] = __uint_as_float(r.y);
    o[2] = __uint_as_float(r.z);
    o[3] = __uint_as_float(r.w);
  }
  static __device__ __forceinline__ uint4 pack(const float (&v)[kVec]) {
    return make_uint4(__float_as_uint(v[0]), __float_as_uint(v[1]), __float_as_uint(v[2]),
                      __float_as_uint(v[3]));
  }
};

struct HalfConv {
  using T = __half;
  static __device__ __forceinline__ float to_f(unsigned short b) { return __half2float(__ushort_as_half(b)); }
  static __device__ __forceinline__ unsigned short from_f(float v) { return __half_as_ushort(__float2half_rn(v)); }
};

struct BF16Conv {
  using T = __nv_bfloat16;
  static __device__ __forceinline__ float to_f(unsigned short b) {
    return __bfloat162float(__ushort_as_bfloat16(b));
  }
  static __device__ __forceinline__ unsigned short from_f(float v) {
    return __bfloat16_as_ushort(__float2bfloat16_rn(v));
  }
};

// 16-bit types are handled through their raw bits so no __half/__nv_bfloat16 arithmetic is needed.
template <typename Conv>
struct Elem16 {
  using T = typename Conv::T;
  static constexpr int kVec = 8;
  static __device__ __forceinline__ float load(const T* p, int64_t i) {
    return Conv::to_f(__ldg(reinterpret_cast<const unsigned short*>(p) + i));
  }
  static __device__ __forceinline__ void store(T* p, int64_t i, float v) {
    reinterpret_cast<unsigned short*>(p)[i] = Conv::from_f(v);
  }
  static __device__ __forceinline__ void unpack(const uint4& r, float (&o)[kVec]) {
    const unsigned int w[4] = {r.x, r.y, r.z, r.w};
#pragma unroll
    for (int k = 0; k < 4; ++k) {  // little endian: lower address = low half of the word
      o[2 * k] = Conv::to_f(static_cast<unsigned short>(w[k] & 0xFFFFu));
      o[2 * k + 1] = Conv::to_f(static_cast<unsigned short>(w[k] >> 16));
    }
  }
  static __device__ __forceinline__ uint4 pack(const float (&v)[kVec]) {
    unsigned int w[4];
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      w[k] = static_cast<unsigned int>(Conv::from_f(v[2 * k])) |
             (static_cast<unsigned int>(Conv::from_f(v[2 * k + 1])) << 16);
    }
    return make_uint4(w[0], w[1], w[2], w[3]);
  }
};

template <>
struct Elem<__half> : Elem16<HalfConv> {};
template <>
struct Elem<__nv_bfloat16> : Elem16<BF16Conv> {};

// Bits of |v|: clearing the sign bit is exactly fabsf, and for non-negative floats the
// unsigned bit pattern orders like the value.
__device__ __forceinline__ unsigned int abs_key(float v) { return __float_as_uint(v) & 0x7FFFFFFFu; }

// clamp(v, -s, s) / s. Ternaries rather than fminf/fmaxf so a NaN v stays NaN (as torch.clamp);
// __fdiv_rn keeps the division IEEE-exact even if someone builds with --use_fast_math.
__device__ __forceinline__ float clamp_div(float v, float s) {
  const float c = v < -s ? -s : (v > s ? s : v);
  return __fdiv_rn(c, s);
}

// A row = [head scalars][nvec aligned 16-byte vectors][tail scalars].
struct RowSplit {
  int64_t head;        // scalar elements before the first 16-byte boundary (< kVec)
  int64_t nvec;        // number of full vectors
  int64_t tail_start;  // first element after the vectors (tail has < kVec elements)
};

template <typename T>
__device__ __forceinline__ RowSplit split_row(const T* row, int64_t n) {
  constexpr int kVec = Elem<T>::kVec;
  const unsigned int mis = static_cast<unsigned int>(reinterpret_cast<uintptr_t>(row) & 15u);
  int64_t head = static_cast<int64_t>(((16u - mis) & 15u) / sizeof(T));  // row is sizeof(T)-aligned
  if (head > n) head = n;
  RowSplit s;
  s.head = head;
  s.nvec = (n - head) / kVec;
  s.tail_start = head + s.nvec * kVec;
  return s;
}

// Calls f(idx, v, valid) for every element of the row owned by this block (blockIdx.x of
// gridDim.x blocks per row). All 32 lanes of a warp make the same sequence of calls (lanes
// without an element pass valid = false and must ignore idx/v), so f may use full-warp
// intrinsics such as __ballot_sync(0xffffffff, ...).
template <typename T, typename F>
__device__ __forceinline__ void visit_row(const T* row, int64_t n, F& f) {
  using E = Elem<T>;
  constexpr int kVec = E::kVec;
  const RowSplit sp = split_row(row, n);
  const int lane = static_cast<int>(threadIdx.x & 31u);

  // Head + tail together hold at most 2 * (kVec - 1) <= 14 elements: warp 0 of block 0
  // takes them, one per lane. The condition is warp-uniform.
  if (blockIdx.x == 0 && threadIdx.x < 32) {
    const int64_t n_edge = sp.head + (n - sp.tail_start);
    const bool valid = lane < n_edge;
    const int64_t idx = lane < sp.head ? static_cast<int64_t>(lane) : sp.tail_start + (lane - sp.head);
    const float v = valid ? E::load(row, idx) : 0.0f;
    f(idx, v, valid);
  }

  const uint4* vrow = reinterpret_cast<const uint4*>(row + sp.head);
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  // base is the vector index of lane 0 of this warp, so the trip count is warp-uniform.
  for (int64_t base = static_cast<int64_t>(blockIdx.x) * blockDim.x + (threadIdx.x & ~31u);
       base < sp.nvec; base += stride) {
    const int64_t i = base + lane;
    const bool valid = i < sp.nvec;
    float v[kVec];
    if (valid) {
      E::unpack(__ldg(vrow + i), v);
    } else {
#pragma unroll
      for (int j = 0; j < kVec; ++j) v[j] = 0.0f;
    }
#pragma unroll
    for (int j = 0; j < kVec; ++j) f(sp.head + i * kVec + j, v[j], valid);
  }
}

// ----------------------------------------------------------------------------------------
// Pass "top": histogram of key >> 20.
// ----------------------------------------------------------------------------------------
template <typename T, typename CountT>
__global__ void __launch_bounds__(kThreads)
    top_hist_kernel(const T* __restrict__ x, int64_t n, int64_t b0, CountT* __restrict__ hist_top) {
  __shared__ unsigned int sh[kTopBins];
  for (int i = threadIdx.x; i < kTopBins; i += blockDim.x) sh[i] = 0u;
  __syncthreads();

  const int64_t b = b0 + blockIdx.y;
  const T* row = x + b * n;
  auto f = [&](int64_t, float v, bool valid) {
    if (valid) atomicAdd(&sh[abs_key(v) >> kTopShift], 1u);
  };
  visit_row(row, n, f);
  __syncthreads();

  CountT* g = hist_top + b * kTopBins;
  for (int i = threadIdx.x; i < kTopBins; i += blockDim.x) {
    const unsigned int c = sh[i];
    if (c != 0u) atomicAdd(&g[i], static_cast<CountT>(c));
  }
}

// ----------------------------------------------------------------------------------------
// Pass "compact": gather the keys of the (at most two) top bins holding the targets.
// ----------------------------------------------------------------------------------------
template <typename T>
__global__ void __launch_bounds__(kThreads)
    compact_kernel(const T* __restrict__ x, int64_t n, int64_t b0, const SampleState* __restrict__ state,
                   unsigned int* __restrict__ cand, unsigned long long* __restrict__ cand_count) {
  const int64_t b = b0 + blockIdx.y;
  const unsigned int bin0 = state[b].prefix[0] >> kTopShift;
  const unsigned int bin1 = state[b].prefix[1] >> kTopShift;
  const T* row = x + b * n;
  unsigned int* out = cand + b * n;
  unsigned long long* counter = cand_count + b;
  const unsigned int lane = threadIdx.x & 31u;
  const unsigned int lanes_below = (1u << lane) - 1u;

  auto f = [&](int64_t, float v, bool valid) {
    const unsigned int key = abs_key(v);
    const unsigned int top = key >> kTopShift;
    const bool take = valid && (top == bin0 || top == bin1);
    // Warp-aggregated append: one atomicAdd per warp, lanes get consecutive slots.
    const unsigned int mask = __ballot_sync(0xFFFFFFFFu, take);
    if (mask == 0u) return;  // warp-uniform
    const int leader = __ffs(static_cast<int>(mask)) - 1;
    unsigned long long base = 0ull;
    if (static_cast<int>(lane) == leader) base = atomicAdd(counter, static_cast<unsigned long long>(__popc(mask)));
    base = __shfl_sync(0xFFFFFFFFu, base, leader);
    if (take) out[base + static_cast<unsigned long long>(__popc(mask & lanes_below))] = key;
  };
  visit_row(row, n, f);
}

// ----------------------------------------------------------------------------------------
// Refinement pass: per-target 1024-bin histogram of one 10-bit digit over the candidates
// whose already known high bits (key >> known_shift) match that target's prefix.
// ----------------------------------------------------------------------------------------
template <typename CountT>
__global__ void __launch_bounds__(kThreads)
    refine_hist_kernel(const unsigned int* __restrict__ cand, const unsigned long long* __restrict__ cand_count,
                       int64_t n, int64_t b0, const SampleState* __restrict__ state,
                       CountT* __restrict__ hist_ref, int known_shift, int digit_shift) {
  const int64_t b = b0 + blockIdx.y;
  const int64_t count = static_cast<int64_t>(cand_count[b]);
  // Whole block past the candidates: nothing to count. Block-uniform, so returning before
  // the __syncthreads below is safe; its (all-zero) histogram need not be flushed.
  if (static_cast<int64_t>(blockIdx.x) * blockDim.x >= count) return;

  __shared__ unsigned int sh[2 * kRefBins];  // [target][digit]
  for (int i = threadIdx.x; i < 2 * kRefBins; i += blockDim.x) sh[i] = 0u;
  __syncthreads();

  const unsigned int p0 = state[b].prefix[0] >> known_shift;
  const unsigned int p1 = state[b].prefix[1] >> known_shift;
  const unsigned int* c = cand + b * n;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < count; i += stride) {
    const unsigned int key = c[i];
    const unsigned int hi = key >> known_shift;
    const unsigned int d = (key >> digit_shift) & (kRefBins - 1);
    // Both targets may share a prefix; then the key is counted in both histograms.
    if (hi == p0) atomicAdd(&sh[d], 1u);
    if (hi == p1) atomicAdd(&sh[kRefBins + d], 1u);
  }
  __syncthreads();

  CountT* g = hist_ref + b * (2 * kRefBins);
  for (int i = threadIdx.x; i < 2 * kRefBins; i += blockDim.x) {
    const unsigned int cnt = sh[i];
    if (cnt != 0u) atomicAdd(&g[i], static_cast<CountT>(cnt));
  }
}

// ----------------------------------------------------------------------------------------
// Find: locate the bin holding rank `rank` in histogram h (kBins bins) of one sample.
// Thread j owns bins [j*kItems, (j+1)*kItems). Exactly one thread satisfies
// cum <= rank < cum + h[bin] when rank < sum(h); that thread writes the result.
// ----------------------------------------------------------------------------------------
using FindScan = cub::BlockScan<unsigned long long, kFindThreads>;

template <int kBins, typename CountT>
__device__ __forceinline__ void scan_find(CountT* h, bool clear_after_read, unsigned long long rank,
                                          typename FindScan::TempStorage& tmp, unsigned int* out_bin,
                                          unsigned long long* out_rem) {
  constexpr int kItems = kBins / kFindThreads;
  const int first = static_cast<int>(threadIdx.x) * kItems;
  unsigned long long c[kItems];
  unsigned long long total = 0ull;
#pragma unroll
  for (int i = 0; i < kItems; ++i) {
    c[i] = static_cast<unsigned long long>(h[first + i]);
    total += c[i];
  }
  if (clear_after_read) {
    // Only this thread ever reads these bins in this kernel, so clearing them here is race-free.
#pragma unroll
    for (int i = 0; i < kItems; ++i) h[first + i] = CountT(0);
  }
  unsigned long long cum = 0ull;
  FindScan(tmp).ExclusiveSum(total, cum);
#pragma unroll
  for (int i = 0; i < kItems; ++i) {
    if (rank >= cum && rank - cum < c[i]) {
      *out_bin = static_cast<unsigned int>(first + i);
      *out_rem = rank - cum;
    }
    cum += c[i];
  }
}

// level 0: hist = hist_top [B][2048], both targets use the same histogram, ranks k0/k1.
// level 1/2: hist = hist_ref [B][2][1024], ranks/prefixes from state; level 1 clears hist_ref,
// level 2 produces the scale.
template <int kBins, typename CountT>
__global__ void __launch_bounds__(kFindThreads)
    find_kernel(CountT* __restrict__ hist, int64_t b0, SampleState* __restrict__ state, int level,
                unsigned long long k0, unsigned long long k1, double w, bool has_max, float max_value,
                float* __restrict__ scale, float* __restrict__ scale_out) {
  __shared__ typename FindScan::TempStorage tmp;
  __shared__ unsigned int s_bin[2];
  __shared__ unsigned long long s_rem[2];

  const int64_t b = b0 + blockIdx.x;
  if (threadIdx.x == 0) {
    // Defined values even if a target were not found (cannot happen with exact counts).
    s_bin[0] = s_bin[1] = 0u;
    s_rem[0] = s_rem[1] = 0ull;
  }

  unsigned int old_prefix[2];
  unsigned long long rank[2];
  CountT* h[2];
  int shift;
  if (level == 0) {
    old_prefix[0] = old_prefix[1] = 0u;  // state[b] still holds garbage here
    rank[0] = k0;
    rank[1] = k1;
    h[0] = h[1] = hist + b * kBins;
    shift = kTopShift;
  } else {
    old_prefix[0] = state[b].prefix[0];
    old_prefix[1] = state[b].prefix[1];
    rank[0] = state[b].rank[0];
    rank[1] = state[b].rank[1];
    h[0] = hist + b * (2 * kBins);
    h[1] = h[0] + kBins;
    shift = (level == 1) ? kRefBits : 0;
  }
  const bool clear = (level == 1);  // hist_ref is reused by refinement pass 2
  __syncthreads();                  // s_bin/s_rem initialised before any finder writes

  scan_find<kBins>(h[0], clear, rank[0], tmp, &s_bin[0], &s_rem[0]);
  __syncthreads();  // TempStorage reuse
  scan_find<kBins>(h[1], clear, rank[1], tmp, &s_bin[1], &s_rem[1]);
  __syncthreads();  // results visible to thread 0; all state[b] reads are done

  if (threadIdx.x == 0) {
    unsigned int key[2];
#pragma unroll
    for (int t = 0; t < 2; ++t) {
      key[t] = old_prefix[t] | (s_bin[t] << shift);
      state[b].prefix[t] = key[t];
      state[b].rank[t] = s_rem[t];
    }
    if (level == 2) {
      const float v0 = __uint_as_float(key[0]);
      const float v1 = __uint_as_float(key[1]);
      const double q = static_cast<double>(v0) + w * (static_cast<double>(v1) - static_cast<double>(v0));
      float s = __double2float_rn(q);
      s = (s < 1.0f) ? 1.0f : s;  // max(q, 1); a NaN q stays NaN
      if (has_max && s > max_value) s = max_value;
      scale[b] = s;
      if (scale_out != nullptr) scale_out[b] = s;
    }
  }
}

// ----------------------------------------------------------------------------------------
// Pass "apply".
// ----------------------------------------------------------------------------------------
// Requires x and y to have the same address modulo 16, so both rows align at the same index.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    apply_vec_kernel(const T* __restrict__ x, T* __restrict__ y, int64_t n, int64_t b0,
                     const float* __restrict__ scale) {
  using E = Elem<T>;
  constexpr int kVec = E::kVec;
  const int64_t b = b0 + blockIdx.y;
  const float s = scale[b];
  const T* xr = x + b * n;
  T* yr = y + b * n;
  const RowSplit sp = split_row(xr, n);

  if (blockIdx.x == 0) {
    const int64_t n_edge = sp.head + (n - sp.tail_start);
    for (int64_t e = threadIdx.x; e < n_edge; e += blockDim.x) {
      const int64_t idx = e < sp.head ? e : sp.tail_start + (e - sp.head);
      E::store(yr, idx, clamp_div(E::load(xr, idx), s));
    }
  }

  const uint4* vx = reinterpret_cast<const uint4*>(xr + sp.head);
  uint4* vy = reinterpret_cast<uint4*>(yr + sp.head);
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < sp.nvec; i += stride) {
    float v[kVec];
    E::unpack(__ldg(vx + i), v);
#pragma unroll
    for (int j = 0; j < kVec; ++j) v[j] = clamp_div(v[j], s);
    vy[i] = E::pack(v);
  }
}

// Fallback for x/y with different alignment modulo 16 (never the case for torch allocations).
template <typename T>
__global__ void __launch_bounds__(kThreads)
    apply_scalar_kernel(const T* __restrict__ x, T* __restrict__ y, int64_t n, int64_t b0,
                        const float* __restrict__ scale) {
  using E = Elem<T>;
  const int64_t b = b0 + blockIdx.y;
  const float s = scale[b];
  const T* xr = x + b * n;
  T* yr = y + b * n;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    E::store(yr, i, clamp_div(E::load(xr, i), s));
  }
}

// ----------------------------------------------------------------------------------------
// Host side.
// ----------------------------------------------------------------------------------------
inline size_t align256(size_t v) { return (v + 255u) & ~static_cast<size_t>(255u); }
inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline bool use_wide_counts(int64_t n) { return n > static_cast<int64_t>(0xFFFFFFFFu); }

struct Layout {
  size_t hist_top, hist_ref, cand_count, zero_end, state, scale, cand, total;
};

Layout make_layout(int64_t batch, int64_t n) {
  const size_t B = static_cast<size_t>(batch);
  const size_t N = static_cast<size_t>(n);
  const size_t cb = use_wide_counts(n) ? sizeof(unsigned long long) : sizeof(unsigned int);
  Layout L;
  L.hist_top = 0;
  L.hist_ref = L.hist_top + align256(B * kTopBins * cb);
  L.cand_count = L.hist_ref + align256(B * 2 * kRefBins * cb);
  L.zero_end = L.cand_count + B * sizeof(unsigned long long);
  L.state = align256(L.zero_end);
  L.scale = L.state + align256(B * sizeof(SampleState));
  L.cand = L.scale + align256(B * sizeof(float));
  L.total = L.cand + align256(B * N * sizeof(unsigned int));
  return L;
}

template <typename T, typename CountT>
cudaError_t launch_typed(const T* x, T* y, float* scale_out, int64_t batch, int64_t n, double percentile,
                         double max_value, unsigned char* ws, cudaStream_t stream) {
  constexpr int kVec = Elem<T>::kVec;
  const Layout L = make_layout(batch, n);
  CountT* hist_top = reinterpret_cast<CountT*>(ws + L.hist_top);
  CountT* hist_ref = reinterpret_cast<CountT*>(ws + L.hist_ref);
  unsigned long long* cand_count = reinterpret_cast<unsigned long long*>(ws + L.cand_count);
  SampleState* state = reinterpret_cast<SampleState*>(ws + L.state);
  float* scale = reinterpret_cast<float*>(ws + L.scale);
  unsigned int* cand = reinterpret_cast<unsigned int*>(ws + L.cand);

  // Ranks of the two order statistics (double, as the reference).
  double pos = percentile * static_cast<double>(n - 1);
  if (!(pos >= 0.0)) pos = 0.0;  // also catches NaN
  if (pos > static_cast<double>(n - 1)) pos = static_cast<double>(n - 1);
  int64_t k0 = static_cast<int64_t>(pos);  // pos >= 0, so truncation == floor
  if (k0 > n - 1) k0 = n - 1;
  const int64_t k1 = (k0 + 1 < n - 1) ? k0 + 1 : n - 1;
  const double w = pos - static_cast<double>(k0);
  const bool has_max = max_value > 0.0;
  const float max_f = has_max ? static_cast<float>(max_value) : 0.0f;

  int dev = 0, sms = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err != cudaSuccess) return err;
  err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
  if (err != cudaSuccess) return err;
  if (sms < 1) sms = 1;

  // The workspace is garbage: clear every global histogram and counter before accumulation.
  err = cudaMemsetAsync(ws, 0, L.zero_end, stream);
  if (err != cudaSuccess) return err;

  const bool vec_apply = ((reinterpret_cast<uintptr_t>(x) ^ reinterpret_cast<uintptr_t>(y)) & 15u) == 0u;

  for (int64_t b0 = 0; b0 < batch; b0 += kMaxGridY) {
    const int64_t nb = (batch - b0 < kMaxGridY) ? batch - b0 : kMaxGridY;
    // Enough blocks per sample to fill the GPU even for B == 1, but not more than there
    // are 16-byte vectors to hand out; and enough that no block sees >= 2^30 elements.
    const int64_t work_blocks = ceil_div(ceil_div(n, kVec), kThreads);
    int64_t bx = ceil_div(static_cast<int64_t>(sms) * kBlocksPerSM, nb);
    if (bx > work_blocks) bx = work_blocks;
    const int64_t min_bx = ceil_div(n, kMaxElemsPerBlock);
    if (bx < min_bx) bx = min_bx;
    if (bx < 1) bx = 1;
    if (bx > 0x7FFFFFFF) bx = 0x7FFFFFFF;
    const dim3 grid(static_cast<unsigned int>(bx), static_cast<unsigned int>(nb));
    const unsigned int find_grid = static_cast<unsigned int>(nb);

    top_hist_kernel<T, CountT><<<grid, kThreads, 0, stream>>>(x, n, b0, hist_top);
    if ((err = cudaGetLastError()) != cudaSuccess) return err;
    find_kernel<kTopBins, CountT><<<find_grid, kFindThreads, 0, stream>>>(
        hist_top, b0, state, 0, static_cast<unsigned long long>(k0), static_cast<unsigned long long>(k1), w,
        has_max, max_f, scale, scale_out);
    if ((err = cudaGetLastError()) != cudaSuccess) return err;
    compact_kernel<T><<<grid, kThreads, 0, stream>>>(x, n, b0, state, cand, cand_count);
    if ((err = cudaGetLastError()) != cudaSuccess) return err;
    refine_hist_kernel<CountT><<<grid, kThreads, 0, stream>>>(cand, cand_count, n, b0, state, hist_ref,
                                                              kTopShift, kRefBits);
    if ((err = cudaGetLastError()) != cudaSuccess) return err;
    find_kernel<kRefBins, CountT><<<find_grid, kFindThreads, 0, stream>>>(
        hist_ref, b0, state, 1, 0ull, 0ull, w, has_max, max_f, scale, scale_out);
    if ((err = cudaGetLastError()) != cudaSuccess) return err;
    refine_hist_kernel<CountT><<<grid, kThreads, 0, stream>>>(cand, cand_count, n, b0, state, hist_ref,
                                                              kRefBits, 0);
    if ((err = cudaGetLastError()) != cudaSuccess) return err;
    find_kernel<kRefBins, CountT><<<find_grid, kFindThreads, 0, stream>>>(
        hist_ref, b0, state, 2, 0ull, 0ull, w, has_max, max_f, scale, scale_out);
    if ((err = cudaGetLastError()) != cudaSuccess) return err;
    if (vec_apply) {
      apply_vec_kernel<T><<<grid, kThreads, 0, stream>>>(x, y, n, b0, scale);
    } else {
      apply_scalar_kernel<T><<<grid, kThreads, 0, stream>>>(x, y, n, b0, scale);
    }
    if ((err = cudaGetLastError()) != cudaSuccess) return err;
  }
  return cudaSuccess;
}

template <typename T>
cudaError_t dispatch_counts(const void* x, void* y, float* scale_out, int64_t batch, int64_t n, double percentile,
                            double max_value, void* ws, cudaStream_t stream) {
  if ((reinterpret_cast<uintptr_t>(x) % sizeof(T)) != 0u || (reinterpret_cast<uintptr_t>(y) % sizeof(T)) != 0u) {
    return cudaErrorMisalignedAddress;
  }
  const T* xt = static_cast<const T*>(x);
  T* yt = static_cast<T*>(y);
  unsigned char* w = static_cast<unsigned char*>(ws);
  if (use_wide_counts(n)) {
    return launch_typed<T, unsigned long long>(xt, yt, scale_out, batch, n, percentile, max_value, w, stream);
  }
  return launch_typed<T, unsigned int>(xt, yt, scale_out, batch, n, percentile, max_value, w, stream);
}

}  // namespace

size_t dynamic_threshold_workspace_bytes(int64_t batch, int64_t n) {
  if (batch <= 0 || n <= 0) return 0;
  return make_layout(batch, n).total;
}

cudaError_t dynamic_threshold_launch(const void* x, void* y, float* scale_out, int64_t batch, int64_t n,
                                     DType dtype, double percentile, double max_value, void* workspace,
                                     cudaStream_t stream) {
  if (batch < 0) return cudaErrorInvalidValue;
  if (batch == 0) return cudaSuccess;
  if (n <= 0 || x == nullptr || y == nullptr || workspace == nullptr) return cudaErrorInvalidValue;
  if (!(percentile >= 0.0 && percentile <= 1.0)) return cudaErrorInvalidValue;
  // Sections are 256-byte aligned relative to the base; 8 bytes is what the u64 data needs.
  if ((reinterpret_cast<uintptr_t>(workspace) & 7u) != 0u) return cudaErrorMisalignedAddress;
  switch (dtype) {
    case DType::Float32:
      return dispatch_counts<float>(x, y, scale_out, batch, n, percentile, max_value, workspace, stream);
    case DType::Float16:
      return dispatch_counts<__half>(x, y, scale_out, batch, n, percentile, max_value, workspace, stream);
    case DType::BFloat16:
      return dispatch_counts<__nv_bfloat16>(x, y, scale_out, batch, n, percentile, max_value, workspace, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace deepfusion_ref
