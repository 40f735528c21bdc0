// CUDA kernels of the STDET ops. The per-element arithmetic lives in stdet_element.h (tested on the
// CPU through the C++ extension); this file only adds indexing, launch configuration and the
// deterministic per-mode reduction of the refs gradient. No float atomics anywhere.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>

#include <cub/block/block_scan.cuh>
#include <vector>

#include "stdet_element.h"

namespace {

constexpr int kThreads = 256;
// Elements per tile of the backward pass; each tile writes one partial sum per mode.
constexpr int kTile = 1024;
constexpr int kWarp = 32;
// Threads of sum_partials_kernel: 32 warps, so one warp adds the warp sums.
constexpr int kSumThreads = kWarp * kWarp;

void check_cuda(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), name, ": expected a CUDA tensor, got ", t.device());
  TORCH_CHECK(t.is_contiguous(), name, ": expected a contiguous tensor");
}

int blocks_for(int64_t n) {
  const int64_t wanted = (n + kThreads - 1) / kThreads;
  const int64_t cap = static_cast<int64_t>(at::cuda::getCurrentDeviceProperties()->multiProcessorCount) * 32;
  return static_cast<int>(std::max<int64_t>(1, std::min(wanted, cap)));
}

// Fills a shared table: refs[m] for m < num_modes, 0 for every other code.
__device__ void load_ref_table(float* table, const float* refs, int num_modes) {
  for (int c = threadIdx.x; c < stdet::kTableSize; c += blockDim.x) {
    table[c] = c < num_modes ? refs[c] : 0.0f;
  }
  __syncthreads();
}

template <typename scalar_t, bool kWithAverage>
__global__ void reconstruct_kernel(const scalar_t* __restrict__ value,
                                   const uint8_t* __restrict__ code,
                                   const scalar_t* __restrict__ a,
                                   const scalar_t* __restrict__ b,
                                   const float* __restrict__ refs, int num_modes,
                                   scalar_t* __restrict__ out, scalar_t* __restrict__ sma,
                                   float alpha, int64_t n) {
  __shared__ float table[stdet::kTableSize];
  load_ref_table(table, refs, num_modes);
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += stride) {
    const uint8_t c = code[i];
    const float w = stdet::reconstruct_element(c, static_cast<float>(value[i]),
                                               static_cast<float>(a[i]),
                                               static_cast<float>(b[i]), table[c]);
    out[i] = static_cast<scalar_t>(w);
    if constexpr (kWithAverage) {
      sma[i] = static_cast<scalar_t>(stdet::moving_average(static_cast<float>(sma[i]), w, alpha));
    }
  }
}

// Sum over the warp by a fixed shuffle tree; lane 0 gets the total. All 32 lanes must call it.
__device__ float warp_sum(float v) {
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset /= 2) {
    v += __shfl_down_sync(0xffffffffu, v, offset);
  }
  return v;
}

// The tile's partial sum of a * grad for every mode, by the whole block (blockDim.x a multiple of
// 32): warp w takes modes w, w + num_warps, ...; lane l adds the mode's contributions at elements
// l, l + 32, ... in that order, then warp_sum. A fixed order, so the same bits every run.
// partials is mode-major, partials[m * num_tiles + tile], so that sum_partials_kernel reads it
// coalesced; one block per tile, so num_tiles is gridDim.x. Ends the kernel: no barrier after it.
template <int kElements>
__device__ void write_tile_partials(const uint8_t* tile_code, const float* tile_contribution,
                                    int num_modes, float* __restrict__ partials) {
  const int lane = threadIdx.x % kWarp;
  const int num_warps = blockDim.x / kWarp;
  for (int m = threadIdx.x / kWarp; m < num_modes; m += num_warps) {
    float sum = 0.0f;
#pragma unroll 8
    for (int j = lane; j < kElements; j += kWarp) {
      sum += tile_code[j] == m ? tile_contribution[j] : 0.0f;
    }
    sum = warp_sum(sum);
    if (lane == 0) partials[static_cast<int64_t>(m) * gridDim.x + blockIdx.x] = sum;
  }
}

// One block per tile: dL/dvalue for the tile's elements, and the tile's partial sum of
// a * grad for every mode (write_tile_partials).
template <typename scalar_t>
__global__ void reconstruct_backward_kernel(const scalar_t* __restrict__ grad,
                                            const uint8_t* __restrict__ code,
                                            const scalar_t* __restrict__ a,
                                            scalar_t* __restrict__ grad_value,
                                            float* __restrict__ partials, int num_modes,
                                            int64_t n) {
  __shared__ uint8_t tile_code[kTile];
  __shared__ float tile_contribution[kTile];
  const int64_t tile_begin = static_cast<int64_t>(blockIdx.x) * kTile;
  for (int j = threadIdx.x; j < kTile; j += blockDim.x) {
    const int64_t i = tile_begin + j;
    uint8_t c = stdet::kFree;
    float contribution = 0.0f;
    if (i < n) {
      c = code[i];
      const float g = static_cast<float>(grad[i]);
      grad_value[i] = static_cast<scalar_t>(stdet::value_grad(c, g));
      contribution = stdet::ref_grad_contribution(c, static_cast<float>(a[i]), g);
    }
    tile_code[j] = c;
    tile_contribution[j] = contribution;
  }
  __syncthreads();
  write_tile_partials<kTile>(tile_code, tile_contribution, num_modes, partials);
}

// grad_refs[m] = sum over tiles of partials[m, tile]: one block of kSumThreads per mode. Thread t
// adds tiles t, t + kSumThreads, ... in order (coalesced across the warp), then warp_sum and one
// warp over the warp sums. Fixed block size and order, so the same bits every run.
__global__ void __launch_bounds__(kSumThreads)
    sum_partials_kernel(const float* __restrict__ partials, int64_t num_tiles,
                        float* __restrict__ grad_refs) {
  static_assert(kSumThreads == kWarp * kWarp, "one warp adds the warp sums");
  __shared__ float warp_sums[kWarp];
  const float* row = partials + static_cast<int64_t>(blockIdx.x) * num_tiles;
  const int lane = threadIdx.x % kWarp;
  float sum = 0.0f;
#pragma unroll 4
  for (int64_t t = threadIdx.x; t < num_tiles; t += kSumThreads) sum += row[t];
  sum = warp_sum(sum);
  if (lane == 0) warp_sums[threadIdx.x / kWarp] = sum;
  __syncthreads();
  if (threadIdx.x < kWarp) {
    sum = warp_sum(warp_sums[lane]);
    if (lane == 0) grad_refs[blockIdx.x] = sum;
  }
}

// One launch for a whole list of tensors: block k updates chunk chunk_offset[k] of tensor
// chunk_tensor[k], addressed through tables of raw pointers.
template <typename scalar_t>
__global__ void lerp_kernel(scalar_t* const* __restrict__ averages,
                            const scalar_t* const* __restrict__ samples,
                            const int64_t* __restrict__ sizes,
                            const int64_t* __restrict__ chunk_tensor,
                            const int64_t* __restrict__ chunk_offset, int64_t chunk_size,
                            float alpha) {
  const int64_t k = chunk_tensor[blockIdx.x];
  const int64_t begin = chunk_offset[blockIdx.x];
  const int64_t end = min(sizes[k], begin + chunk_size);
  scalar_t* average = averages[k];
  const scalar_t* sample = samples[k];
  for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) {
    average[i] = static_cast<scalar_t>(stdet::moving_average(
        static_cast<float>(average[i]), static_cast<float>(sample[i]), alpha));
  }
}

template <bool kWithAverage>
at::Tensor reconstruct_impl(const at::Tensor& value, const at::Tensor& code, const at::Tensor& a,
                            const at::Tensor& b, const at::Tensor& refs, at::Tensor* sma,
                            double alpha) {
  check_cuda(value, "value");
  check_cuda(code, "code");
  check_cuda(a, "a");
  check_cuda(b, "b");
  TORCH_CHECK(refs.dim() == 1 && refs.numel() <= stdet::kDummy, "refs: expected a 1-D tensor of at most 254 modes");
  const c10::cuda::CUDAGuard guard(value.device());
  const at::Tensor refs_f32 = refs.to(at::kFloat).contiguous();
  at::Tensor out = at::empty(value.sizes(), value.options());
  const int64_t n = value.numel();
  if (n == 0) return out;
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value.scalar_type(), "reconstruct",
                                  [&] {
    scalar_t* sma_ptr = nullptr;
    if constexpr (kWithAverage) sma_ptr = sma->data_ptr<scalar_t>();
    reconstruct_kernel<scalar_t, kWithAverage><<<blocks_for(n), kThreads, 0, stream>>>(
        value.data_ptr<scalar_t>(), code.data_ptr<uint8_t>(), a.data_ptr<scalar_t>(),
        b.data_ptr<scalar_t>(), refs_f32.data_ptr<float>(), static_cast<int>(refs.numel()),
        out.data_ptr<scalar_t>(), sma_ptr, static_cast<float>(alpha), n);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor reconstruct(const at::Tensor& value, const at::Tensor& code, const at::Tensor& a,
                       const at::Tensor& b, const at::Tensor& refs) {
  return reconstruct_impl<false>(value, code, a, b, refs, nullptr, 0.0);
}

at::Tensor reconstruct_sma_(const at::Tensor& value, const at::Tensor& code, const at::Tensor& a,
                            const at::Tensor& b, const at::Tensor& refs, at::Tensor sma,
                            double alpha) {
  check_cuda(sma, "sma");
  TORCH_CHECK(sma.scalar_type() == value.scalar_type() && sma.numel() == value.numel(),
              "sma: expected the dtype and number of elements of value");
  return reconstruct_impl<true>(value, code, a, b, refs, &sma, alpha);
}

std::tuple<at::Tensor, at::Tensor> reconstruct_backward(const at::Tensor& grad,
                                                        const at::Tensor& code,
                                                        const at::Tensor& a,
                                                        const at::Tensor& refs) {
  check_cuda(grad, "grad");
  check_cuda(code, "code");
  check_cuda(a, "a");
  TORCH_CHECK(refs.dim() == 1, "refs: expected a 1-D tensor");
  const c10::cuda::CUDAGuard guard(grad.device());
  const int64_t n = grad.numel();
  const int num_modes = static_cast<int>(refs.numel());
  const int64_t num_tiles = (n + kTile - 1) / kTile;
  at::Tensor grad_value = at::empty(grad.sizes(), grad.options());
  at::Tensor grad_refs = at::zeros({num_modes}, grad.options().dtype(at::kFloat));
  if (n == 0) return {grad_value, grad_refs.to(refs.scalar_type())};
  at::Tensor partials = at::empty({std::max(num_modes, 1), num_tiles}, grad_refs.options());
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(),
                                  "reconstruct_backward", [&] {
    reconstruct_backward_kernel<scalar_t><<<num_tiles, kThreads, 0, stream>>>(
        grad.data_ptr<scalar_t>(), code.data_ptr<uint8_t>(), a.data_ptr<scalar_t>(),
        grad_value.data_ptr<scalar_t>(), partials.data_ptr<float>(), num_modes, n);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (num_modes > 0) {
    sum_partials_kernel<<<num_modes, kSumThreads, 0, stream>>>(
        partials.data_ptr<float>(), num_tiles, grad_refs.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return {grad_value, grad_refs.to(refs.scalar_type())};
}

void lerp_(std::vector<at::Tensor> averages, const std::vector<at::Tensor>& samples,
           double alpha) {
  TORCH_CHECK(averages.size() == samples.size(), "averages, samples: expected lists of one length");
  if (averages.empty()) return;
  const c10::cuda::CUDAGuard guard(averages[0].device());
  const int64_t chunk_size = static_cast<int64_t>(kThreads) * 16;
  std::vector<int64_t> average_ptrs, sample_ptrs, sizes, chunk_tensor, chunk_offset;
  for (size_t k = 0; k < averages.size(); ++k) {
    check_cuda(averages[k], "averages");
    check_cuda(samples[k], "samples");
    TORCH_CHECK(averages[k].scalar_type() == averages[0].scalar_type() &&
                    samples[k].scalar_type() == averages[0].scalar_type() &&
                    averages[k].numel() == samples[k].numel(),
                "averages[", k, "], samples[", k, "]: expected one dtype and size");
    average_ptrs.push_back(reinterpret_cast<int64_t>(averages[k].data_ptr()));
    sample_ptrs.push_back(reinterpret_cast<int64_t>(samples[k].data_ptr()));
    sizes.push_back(averages[k].numel());
    for (int64_t begin = 0; begin < averages[k].numel(); begin += chunk_size) {
      chunk_tensor.push_back(static_cast<int64_t>(k));
      chunk_offset.push_back(begin);
    }
  }
  if (chunk_tensor.empty()) return;
  // One host-to-device copy of all the metadata.
  const int64_t num_tensors = static_cast<int64_t>(averages.size());
  const int64_t num_chunks = static_cast<int64_t>(chunk_tensor.size());
  std::vector<int64_t> packed;
  packed.reserve(3 * num_tensors + 2 * num_chunks);
  for (const auto* part : {&average_ptrs, &sample_ptrs, &sizes, &chunk_tensor, &chunk_offset}) {
    packed.insert(packed.end(), part->begin(), part->end());
  }
  const at::Tensor metadata =
      at::from_blob(packed.data(), {static_cast<int64_t>(packed.size())}, at::kLong)
          .to(averages[0].device(), /*non_blocking=*/false, /*copy=*/true);
  const int64_t* meta = metadata.data_ptr<int64_t>();
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, averages[0].scalar_type(), "lerp_",
                                  [&] {
    lerp_kernel<scalar_t><<<num_chunks, kThreads, 0, stream>>>(
        reinterpret_cast<scalar_t* const*>(meta),
        reinterpret_cast<const scalar_t* const*>(meta + num_tensors), meta + 2 * num_tensors,
        meta + 3 * num_tensors, meta + 3 * num_tensors + num_chunks, chunk_size,
        static_cast<float>(alpha));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}


// ---------------------------------------------------------------------------------------------
// Compact layout (see stdet_kernels/compact.py): one CUDA block per layout block of kCompactBlock
// elements, each thread kItems consecutive elements. A block-wide exclusive scan of the threads' FREE
// counts, on top of the block's offset, gives every element its slot.

constexpr int kCompactBlock = 1024;  // reference.COMPACT_BLOCK
constexpr int kCompactThreads = 256;
constexpr int kItems = kCompactBlock / kCompactThreads;
using CompactScan = cub::BlockScan<int, kCompactThreads>;

struct CompactSlots {
  int64_t free_slot;
  int64_t embedded_slot;
};

// Loads the thread's codes (DUMMY past the end) and returns its first free and embedded slots.
__device__ CompactSlots compact_slots(const uint8_t* code, const int32_t* offsets, int64_t n,
                                      uint8_t (&codes)[kItems],
                                      typename CompactScan::TempStorage& scan_storage) {
  const int64_t first = static_cast<int64_t>(blockIdx.x) * kCompactBlock + threadIdx.x * kItems;
  int free_count = 0;
#pragma unroll
  for (int k = 0; k < kItems; ++k) {
    codes[k] = first + k < n ? code[first + k] : stdet::kDummy;
    free_count += codes[k] == stdet::kFree;
  }
  int free_before;
  CompactScan(scan_storage).ExclusiveSum(free_count, free_before);
  const int64_t block_free = offsets[blockIdx.x];
  return {block_free + free_before,
          static_cast<int64_t>(blockIdx.x) * kCompactBlock - block_free +
              (threadIdx.x * kItems - free_before)};
}

template <typename value_t, typename coef_t, bool kWithAverage>
__global__ void reconstruct_compact_kernel(const value_t* __restrict__ free_values,
                                           const uint8_t* __restrict__ code,
                                           const int32_t* __restrict__ offsets,
                                           const coef_t* __restrict__ a,
                                           const coef_t* __restrict__ b,
                                           const float* __restrict__ refs, int num_modes,
                                           value_t* __restrict__ out, value_t* __restrict__ sma,
                                           float alpha, int64_t n) {
  __shared__ float table[stdet::kTableSize];
  __shared__ typename CompactScan::TempStorage scan_storage;
  load_ref_table(table, refs, num_modes);
  uint8_t codes[kItems];
  CompactSlots slots = compact_slots(code, offsets, n, codes, scan_storage);
  const int64_t first = static_cast<int64_t>(blockIdx.x) * kCompactBlock + threadIdx.x * kItems;
#pragma unroll
  for (int k = 0; k < kItems; ++k) {
    const int64_t i = first + k;
    if (i >= n) break;
    float w;
    if (codes[k] == stdet::kFree) {
      w = static_cast<float>(free_values[slots.free_slot++]);
    } else {
      w = stdet::reconstruct_element(codes[k], 0.0f, static_cast<float>(a[slots.embedded_slot]),
                                     static_cast<float>(b[slots.embedded_slot]), table[codes[k]]);
      ++slots.embedded_slot;
    }
    out[i] = static_cast<value_t>(w);
    if constexpr (kWithAverage) {
      sma[i] = static_cast<value_t>(stdet::moving_average(static_cast<float>(sma[i]), w, alpha));
    }
  }
}

// The fused backward's running mean of the sensitivity, one float per FREE element (see
// stdet_element.h); unused (null pointers) by the plain backward.
template <typename value_t>
struct SensitivityUpdate {
  const value_t* __restrict__ free_values;
  float* __restrict__ sensitivity;
  float decay;
  float complement;  // 1 - decay, rounded once from double
  bool fisher;
};

// The online refit's running moments (Welford), one float per FREE element, and each mode's
// reference deviation (num_deviations of them: 0 means no modes); unused by the other backwards.
struct RefitUpdate {
  float* __restrict__ mean;
  float* __restrict__ moment2;
  float* __restrict__ comoment;
  const uint8_t* __restrict__ mode;
  const float* __restrict__ deviation;
  int num_deviations;
  float inv_count;
};

// With kWithRefit, each FREE value also goes into the refit's moments, the arithmetic of
// refit_update_ (no contraction: --fmad=false): the refit's snapshot in the backward's pass.
template <typename value_t, typename coef_t, bool kWithSensitivity, bool kWithRefit>
__global__ void reconstruct_compact_backward_kernel(const value_t* __restrict__ grad,
                                                    const uint8_t* __restrict__ code,
                                                    const int32_t* __restrict__ offsets,
                                                    const coef_t* __restrict__ a,
                                                    value_t* __restrict__ grad_free,
                                                    float* __restrict__ partials, int num_modes,
                                                    SensitivityUpdate<value_t> update,
                                                    RefitUpdate refit, int64_t n) {
  __shared__ typename CompactScan::TempStorage scan_storage;
  __shared__ uint8_t tile_code[kCompactBlock];
  __shared__ float tile_contribution[kCompactBlock];
  uint8_t codes[kItems];
  CompactSlots slots = compact_slots(code, offsets, n, codes, scan_storage);
  const int64_t first = static_cast<int64_t>(blockIdx.x) * kCompactBlock + threadIdx.x * kItems;
#pragma unroll
  for (int k = 0; k < kItems; ++k) {
    const int64_t i = first + k;
    float contribution = 0.0f;
    if (i < n) {
      const float g = static_cast<float>(grad[i]);
      if (codes[k] == stdet::kFree) {
        const int64_t slot = slots.free_slot++;
        grad_free[slot] = static_cast<value_t>(g);
        if constexpr (kWithSensitivity) {
          const float score = stdet::sensitivity_score(
              g, static_cast<float>(update.free_values[slot]), update.fisher);
          update.sensitivity[slot] = stdet::running_mean(update.sensitivity[slot], score,
                                                         update.decay, update.complement);
        }
        if constexpr (kWithRefit) {
          const bool with_modes = refit.num_deviations > 0;
          const int m = with_modes ? refit.mode[slot] : 0;
          stdet::refit_moments(static_cast<float>(update.free_values[slot]), refit.inv_count,
                               with_modes, m < refit.num_deviations ? refit.deviation[m] : 0.0f,
                               refit.mean[slot], refit.moment2[slot], refit.comoment[slot]);
        }
      } else {
        contribution = stdet::ref_grad_contribution(
            codes[k], static_cast<float>(a[slots.embedded_slot++]), g);
      }
    }
    tile_code[threadIdx.x * kItems + k] = codes[k];
    tile_contribution[threadIdx.x * kItems + k] = contribution;
  }
  __syncthreads();
  write_tile_partials<kCompactBlock>(tile_code, tile_contribution, num_modes, partials);
}

void check_compact(const at::Tensor& code, const at::Tensor& offsets, const at::Tensor& a,
                   const at::Tensor& b) {
  check_cuda(code, "code");
  check_cuda(offsets, "offsets");
  check_cuda(a, "a");
  check_cuda(b, "b");
  TORCH_CHECK(offsets.scalar_type() == at::kInt, "offsets: expected int32");
  TORCH_CHECK(offsets.numel() == (code.numel() + kCompactBlock - 1) / kCompactBlock + 1,
              "offsets: expected one entry per block of ", kCompactBlock, " elements, plus one");
  TORCH_CHECK(a.scalar_type() == b.scalar_type() && a.numel() == b.numel(),
              "a, b: expected one dtype and size");
}

template <bool kWithAverage>
at::Tensor reconstruct_compact_impl(const at::Tensor& free_values, const at::Tensor& code,
                                    const at::Tensor& offsets, const at::Tensor& a,
                                    const at::Tensor& b, const at::Tensor& refs, at::Tensor* sma,
                                    double alpha) {
  check_cuda(free_values, "free_values");
  check_compact(code, offsets, a, b);
  TORCH_CHECK(free_values.numel() + a.numel() == code.numel(),
              "free_values, a: expected one element of either per code");
  const c10::cuda::CUDAGuard guard(code.device());
  const at::Tensor refs_f32 = refs.to(at::kFloat).contiguous();
  at::Tensor out = at::empty(code.sizes(), free_values.options());
  const int64_t n = code.numel();
  if (n == 0) return out;
  const int64_t blocks = offsets.numel() - 1;
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, free_values.scalar_type(),
                                  "reconstruct_compact", [&] {
    using value_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(),
                                    "reconstruct_compact", [&] {
      using coef_t = scalar_t;
      value_t* sma_ptr = nullptr;
      if constexpr (kWithAverage) sma_ptr = sma->data_ptr<value_t>();
      reconstruct_compact_kernel<value_t, coef_t, kWithAverage>
          <<<blocks, kCompactThreads, 0, stream>>>(
              free_values.data_ptr<value_t>(), code.data_ptr<uint8_t>(),
              offsets.data_ptr<int32_t>(), a.data_ptr<coef_t>(), b.data_ptr<coef_t>(),
              refs_f32.data_ptr<float>(), static_cast<int>(refs.numel()),
              out.data_ptr<value_t>(), sma_ptr, static_cast<float>(alpha), n);
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor reconstruct_compact(const at::Tensor& free_values, const at::Tensor& code,
                               const at::Tensor& offsets, const at::Tensor& a, const at::Tensor& b,
                               const at::Tensor& refs) {
  return reconstruct_compact_impl<false>(free_values, code, offsets, a, b, refs, nullptr, 0.0);
}

at::Tensor reconstruct_compact_sma_(const at::Tensor& free_values, const at::Tensor& code,
                                    const at::Tensor& offsets, const at::Tensor& a,
                                    const at::Tensor& b, const at::Tensor& refs, at::Tensor sma,
                                    double alpha) {
  check_cuda(sma, "sma");
  TORCH_CHECK(sma.scalar_type() == free_values.scalar_type() && sma.numel() == code.numel(),
              "sma: expected the dtype of free_values and the number of elements of code");
  return reconstruct_compact_impl<true>(free_values, code, offsets, a, b, refs, &sma, alpha);
}

// The online refit's tensors of a fused backward (see refit_update_ in the C++ CPU extension).
struct RefitInput {
  at::Tensor mean, moment2, comoment, mode, ref_deviation;
  int64_t count;
};

RefitUpdate refit_update_of(const RefitInput& input, int64_t free_count) {
  for (const at::Tensor* t : {&input.mean, &input.moment2, &input.comoment}) {
    check_cuda(*t, "moments");
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->numel() == free_count,
                "moments: expected float32 tensors of one element per FREE code");
  }
  check_cuda(input.mode, "mode");
  check_cuda(input.ref_deviation, "ref_deviation");
  TORCH_CHECK(input.mode.scalar_type() == at::kByte && input.mode.numel() == free_count,
              "mode: expected uint8 of one element per FREE code");
  TORCH_CHECK(input.ref_deviation.scalar_type() == at::kFloat && input.ref_deviation.numel() <= 256,
              "ref_deviation: expected float32, at most 256 modes");
  TORCH_CHECK(input.count >= 1, "count: expected at least 1");
  return {input.mean.data_ptr<float>(), input.moment2.data_ptr<float>(),
          input.comoment.data_ptr<float>(), input.mode.data_ptr<uint8_t>(),
          input.ref_deviation.data_ptr<float>(), static_cast<int>(input.ref_deviation.numel()),
          static_cast<float>(1.0 / static_cast<double>(input.count))};
}

template <bool kWithSensitivity, bool kWithRefit = false>
std::tuple<at::Tensor, at::Tensor> reconstruct_compact_backward_impl(
    const at::Tensor& grad, const at::Tensor& code, const at::Tensor& offsets, const at::Tensor& a,
    const at::Tensor& refs, const at::Tensor* free_values, at::Tensor* sensitivity, double decay,
    bool fisher, const RefitInput* refit_input = nullptr) {
  check_cuda(grad, "grad");
  check_compact(code, offsets, a, a);
  TORCH_CHECK(grad.numel() == code.numel(), "grad: expected the number of elements of code");
  const int64_t n = code.numel();
  if constexpr (kWithSensitivity || kWithRefit) {
    check_cuda(*free_values, "free_values");
    TORCH_CHECK(free_values->scalar_type() == grad.scalar_type() &&
                    free_values->numel() == n - a.numel(),
                "free_values: expected the dtype of grad and one element per FREE code");
  }
  if constexpr (kWithSensitivity) {
    check_cuda(*sensitivity, "sensitivity");
    TORCH_CHECK(sensitivity->scalar_type() == at::kFloat && sensitivity->numel() == n - a.numel(),
                "sensitivity: expected float32 and one element per FREE code");
  }
  RefitUpdate refit{};
  if constexpr (kWithRefit) refit = refit_update_of(*refit_input, n - a.numel());
  const c10::cuda::CUDAGuard guard(code.device());
  const int num_modes = static_cast<int>(refs.numel());
  const int64_t blocks = offsets.numel() - 1;
  at::Tensor grad_free = at::empty({n - a.numel()}, grad.options());
  at::Tensor grad_refs = at::zeros({num_modes}, grad.options().dtype(at::kFloat));
  if (n == 0) return {grad_free, grad_refs.to(refs.scalar_type())};
  at::Tensor partials = at::empty({std::max(num_modes, 1), blocks}, grad_refs.options());
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(),
                                  "reconstruct_compact_backward", [&] {
    using value_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(),
                                    "reconstruct_compact_backward", [&] {
      using coef_t = scalar_t;
      SensitivityUpdate<value_t> update{nullptr, nullptr, static_cast<float>(decay),
                                        static_cast<float>(1.0 - decay), fisher};
      if constexpr (kWithSensitivity || kWithRefit) {
        update.free_values = free_values->data_ptr<value_t>();
      }
      if constexpr (kWithSensitivity) update.sensitivity = sensitivity->data_ptr<float>();
      reconstruct_compact_backward_kernel<value_t, coef_t, kWithSensitivity, kWithRefit>
          <<<blocks, kCompactThreads, 0, stream>>>(
              grad.data_ptr<value_t>(), code.data_ptr<uint8_t>(), offsets.data_ptr<int32_t>(),
              a.data_ptr<coef_t>(), grad_free.data_ptr<value_t>(), partials.data_ptr<float>(),
              num_modes, update, refit, n);
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (num_modes > 0) {
    sum_partials_kernel<<<num_modes, kSumThreads, 0, stream>>>(
        partials.data_ptr<float>(), blocks, grad_refs.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return {grad_free, grad_refs.to(refs.scalar_type())};
}

std::tuple<at::Tensor, at::Tensor> reconstruct_compact_backward(const at::Tensor& grad,
                                                                const at::Tensor& code,
                                                                const at::Tensor& offsets,
                                                                const at::Tensor& a,
                                                                const at::Tensor& refs) {
  return reconstruct_compact_backward_impl<false>(grad, code, offsets, a, refs, nullptr, nullptr,
                                                  0.0, false);
}

// reconstruct_compact_backward, and in the same pass sensitivity = decay * sensitivity +
// (1 - decay) * score at every FREE element (score: |g * v|, or g^2 when fisher).
std::tuple<at::Tensor, at::Tensor> reconstruct_compact_backward_sensitivity_(
    const at::Tensor& grad, const at::Tensor& free_values, const at::Tensor& code,
    const at::Tensor& offsets, const at::Tensor& a, const at::Tensor& refs, at::Tensor sensitivity,
    double decay, bool fisher) {
  return reconstruct_compact_backward_impl<true>(grad, code, offsets, a, refs, &free_values,
                                                 &sensitivity, decay, fisher);
}

// The layers' gradients (`pieces`, sizes elements each; an empty tensor for one that got none) laid
// end to end, for the two backwards above. On a GPU the concatenation is a small share of the
// backward; the C++ CPU backend reads the pieces in place instead.
at::Tensor concatenated(const std::vector<at::Tensor>& pieces, const std::vector<int64_t>& sizes,
                        const at::Tensor& code) {
  TORCH_CHECK(pieces.size() == sizes.size(), "pieces: expected one per size");
  const at::Tensor* like = nullptr;
  for (const auto& piece : pieces) {
    if (piece.defined() && piece.numel() > 0) like = &piece;
  }
  TORCH_CHECK(like != nullptr, "pieces: expected at least one gradient");
  std::vector<at::Tensor> parts;
  for (size_t k = 0; k < pieces.size(); ++k) {
    const bool given = pieces[k].defined() && pieces[k].numel() > 0;
    TORCH_CHECK(!given || pieces[k].numel() == sizes[k], "pieces: piece ", k, " has ",
                pieces[k].numel(), " elements, its size is ", sizes[k]);
    parts.push_back(given ? pieces[k].reshape({-1}) : at::zeros({sizes[k]}, like->options()));
  }
  at::Tensor flat = at::cat(parts);
  TORCH_CHECK(flat.numel() == code.numel(), "sizes: expected ", code.numel(), " elements in all");
  return flat.view(code.sizes());
}

std::tuple<at::Tensor, at::Tensor> reconstruct_compact_backward_pieces(
    const std::vector<at::Tensor>& pieces, const std::vector<int64_t>& sizes,
    const at::Tensor& code, const at::Tensor& offsets, const at::Tensor& a, const at::Tensor& refs) {
  return reconstruct_compact_backward(concatenated(pieces, sizes, code), code, offsets, a, refs);
}

std::tuple<at::Tensor, at::Tensor> reconstruct_compact_backward_pieces_sensitivity_(
    const std::vector<at::Tensor>& pieces, const std::vector<int64_t>& sizes,
    const at::Tensor& free_values, const at::Tensor& code, const at::Tensor& offsets,
    const at::Tensor& a, const at::Tensor& refs, at::Tensor sensitivity, double decay,
    bool fisher) {
  return reconstruct_compact_backward_sensitivity_(concatenated(pieces, sizes, code), free_values,
                                                   code, offsets, a, refs, sensitivity, decay,
                                                   fisher);
}

// The two pieces backwards above (the sensitivity's when `sensitivity` is given), and in the same
// pass the online refit's snapshot of the FREE elements' values (refit_update_ of free_values).
std::tuple<at::Tensor, at::Tensor> reconstruct_compact_backward_pieces_refit_(
    const std::vector<at::Tensor>& pieces, const std::vector<int64_t>& sizes,
    const at::Tensor& free_values, const at::Tensor& code, const at::Tensor& offsets,
    const at::Tensor& a, const at::Tensor& refs, c10::optional<at::Tensor> sensitivity,
    double decay, bool fisher, at::Tensor mean, at::Tensor moment2, at::Tensor comoment,
    const at::Tensor& mode, const at::Tensor& ref_deviation, int64_t count) {
  const at::Tensor grad = concatenated(pieces, sizes, code);
  const RefitInput refit{mean, moment2, comoment, mode, ref_deviation, count};
  if (sensitivity.has_value()) {
    return reconstruct_compact_backward_impl<true, true>(grad, code, offsets, a, refs, &free_values,
                                                         &*sensitivity, decay, fisher, &refit);
  }
  return reconstruct_compact_backward_impl<false, true>(grad, code, offsets, a, refs, &free_values,
                                                        nullptr, 0.0, false, &refit);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "STDET ops, CUDA kernels";
  m.def("reconstruct", &reconstruct, "w = value | b | a * refs[code] + b, by code");
  m.def("reconstruct_sma_", &reconstruct_sma_, "reconstruct, and sma += alpha * (w - sma)");
  m.def("reconstruct_backward", &reconstruct_backward, "(dL/dvalue, dL/drefs) from dL/dw");
  m.def("lerp_", &lerp_, "averages[k] += alpha * (samples[k] - averages[k])");
  m.def("reconstruct_compact", &reconstruct_compact, "reconstruct, compact layout");
  m.def("reconstruct_compact_sma_", &reconstruct_compact_sma_,
        "reconstruct_compact, and sma += alpha * (w - sma)");
  m.def("reconstruct_compact_backward", &reconstruct_compact_backward,
        "(dL/dfree_values, dL/drefs) from dL/dw, compact layout");
  m.def("reconstruct_compact_backward_sensitivity_", &reconstruct_compact_backward_sensitivity_,
        "reconstruct_compact_backward, and the sensitivity's running mean at the FREE elements");
  m.def("reconstruct_compact_backward_pieces", &reconstruct_compact_backward_pieces,
        "reconstruct_compact_backward from the layers' gradients (concatenated first)");
  m.def("reconstruct_compact_backward_pieces_sensitivity_",
        &reconstruct_compact_backward_pieces_sensitivity_,
        "reconstruct_compact_backward_sensitivity_ from the layers' gradients (concatenated first)");
  m.def("reconstruct_compact_backward_pieces_refit_", &reconstruct_compact_backward_pieces_refit_,
        "the pieces backward (with the sensitivity's update when given), and the online refit's "
        "snapshot of the FREE values in the same pass");
}
