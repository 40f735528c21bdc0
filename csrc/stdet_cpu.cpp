// C++ CPU kernels of the STDET ops: reconstruction, its backward, reconstruction fused with the SMA
// update, and the multi-tensor moving average. Parallel with ATen's OpenMP pool; the inner loops are
// branch-free and contiguous so the compiler can vectorise them.
//
// The Python layer (stdet_kernels) validates arguments and makes inputs contiguous; the checks here
// only guard memory safety.
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/extension.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <type_traits>
#include <vector>
#if defined(__SSE2__)
#include <emmintrin.h>
#endif
#if defined(__x86_64__)
#include <immintrin.h>
#define STDET_AVX2 1
#endif

#include "stdet_element.h"

namespace {

// Elements per grain of the element-wise loops.
constexpr int64_t kGrain = 1 << 15;
// Elements per partial sum of the refs gradient. Fixed (not per thread) so the result does not
// depend on the number of threads.
constexpr int64_t kReduceChunk = 1 << 14;

using RefTable = std::array<float, stdet::kTableSize>;

void check_contiguous_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, ": expected a CPU tensor, got ", t.device());
  TORCH_CHECK(t.is_contiguous(), name, ": expected a contiguous tensor");
}

RefTable make_ref_table(const at::Tensor& refs) {
  TORCH_CHECK(refs.dim() == 1, "refs: expected a 1-D tensor, got ", refs.dim(), " dimensions");
  TORCH_CHECK(refs.numel() <= stdet::kDummy, "refs: at most ", int(stdet::kDummy),
              " modes, got ", refs.numel());
  RefTable table{};
  const at::Tensor refs_f32 = refs.to(at::kFloat).contiguous();
  const float* src = refs_f32.data_ptr<float>();
  for (int64_t m = 0; m < refs_f32.numel(); ++m) table[m] = src[m];
  return table;
}

void check_elementwise(const at::Tensor& value, const at::Tensor& code, const at::Tensor& a,
                       const at::Tensor& b) {
  check_contiguous_cpu(value, "value");
  check_contiguous_cpu(code, "code");
  check_contiguous_cpu(a, "a");
  check_contiguous_cpu(b, "b");
  TORCH_CHECK(code.scalar_type() == at::kByte, "code: expected uint8");
  TORCH_CHECK(code.numel() == value.numel() && a.numel() == value.numel() &&
                  b.numel() == value.numel(),
              "value, code, a, b: expected the same number of elements");
  TORCH_CHECK(a.scalar_type() == value.scalar_type() && b.scalar_type() == value.scalar_type(),
              "a, b: expected the dtype of value");
}

// w[i] (and, when kWithAverage, sma[i] += alpha * (w[i] - sma[i])) for i in [begin, end).
template <typename scalar_t, bool kWithAverage>
void reconstruct_range(const scalar_t* __restrict__ value, const uint8_t* __restrict__ code,
                       const scalar_t* __restrict__ a, const scalar_t* __restrict__ b,
                       const RefTable& table, scalar_t* __restrict__ out,
                       scalar_t* __restrict__ sma, float alpha, int64_t begin, int64_t end) {
#pragma omp simd
  for (int64_t i = begin; i < end; ++i) {
    const uint8_t c = code[i];
    const float w = stdet::reconstruct_element(c, static_cast<float>(value[i]),
                                               static_cast<float>(a[i]),
                                               static_cast<float>(b[i]), table[c]);
    out[i] = static_cast<scalar_t>(w);
    if constexpr (kWithAverage) {
      sma[i] = static_cast<scalar_t>(
          stdet::moving_average(static_cast<float>(sma[i]), w, alpha));
    }
  }
}

// dL/dvalue for [begin, end), and that range's sum of a * grad for each of the num_modes modes.
template <typename scalar_t>
void backward_chunk(const scalar_t* __restrict__ grad, const uint8_t* __restrict__ code,
                    const scalar_t* __restrict__ a, scalar_t* __restrict__ grad_value,
                    float* __restrict__ partial, int64_t num_modes, int64_t begin, int64_t end) {
#pragma omp simd
  for (int64_t i = begin; i < end; ++i) {
    grad_value[i] = static_cast<scalar_t>(stdet::value_grad(code[i], static_cast<float>(grad[i])));
  }
  if (num_modes == 0) return;
  std::array<float, stdet::kTableSize> by_code{};
  for (int64_t i = begin; i < end; ++i) {
    const uint8_t c = code[i];
    by_code[c] += stdet::ref_grad_contribution(c, static_cast<float>(a[i]),
                                               static_cast<float>(grad[i]));
  }
  std::copy(by_code.begin(), by_code.begin() + num_modes, partial);
}

template <typename scalar_t>
void lerp_range(scalar_t* __restrict__ average, const scalar_t* __restrict__ sample, float alpha,
                int64_t begin, int64_t end) {
#pragma omp simd
  for (int64_t i = begin; i < end; ++i) {
    average[i] = static_cast<scalar_t>(stdet::moving_average(
        static_cast<float>(average[i]), static_cast<float>(sample[i]), alpha));
  }
}

template <bool kWithAverage>
at::Tensor reconstruct_impl(const at::Tensor& value, const at::Tensor& code, const at::Tensor& a,
                            const at::Tensor& b, const at::Tensor& refs, at::Tensor* sma,
                            double alpha) {
  check_elementwise(value, code, a, b);
  const RefTable table = make_ref_table(refs);
  at::Tensor out = at::empty(value.sizes(), value.options());
  const int64_t n = value.numel();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value.scalar_type(), "reconstruct",
                                  [&] {
    scalar_t* sma_ptr = nullptr;
    if constexpr (kWithAverage) sma_ptr = sma->data_ptr<scalar_t>();
    const scalar_t* value_ptr = value.data_ptr<scalar_t>();
    const uint8_t* code_ptr = code.data_ptr<uint8_t>();
    const scalar_t* a_ptr = a.data_ptr<scalar_t>();
    const scalar_t* b_ptr = b.data_ptr<scalar_t>();
    scalar_t* out_ptr = out.data_ptr<scalar_t>();
    const float alpha_f = static_cast<float>(alpha);
    at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
      reconstruct_range<scalar_t, kWithAverage>(value_ptr, code_ptr, a_ptr, b_ptr, table,
                                                out_ptr, sma_ptr, alpha_f, begin, end);
    });
  });
  return out;
}

at::Tensor reconstruct(const at::Tensor& value, const at::Tensor& code, const at::Tensor& a,
                       const at::Tensor& b, const at::Tensor& refs) {
  return reconstruct_impl<false>(value, code, a, b, refs, nullptr, 0.0);
}

at::Tensor reconstruct_sma_(const at::Tensor& value, const at::Tensor& code, const at::Tensor& a,
                            const at::Tensor& b, const at::Tensor& refs, at::Tensor sma,
                            double alpha) {
  check_contiguous_cpu(sma, "sma");
  TORCH_CHECK(sma.scalar_type() == value.scalar_type() && sma.numel() == value.numel(),
              "sma: expected the dtype and number of elements of value");
  return reconstruct_impl<true>(value, code, a, b, refs, &sma, alpha);
}

// dL/drefs from per-chunk partial sums (chunk-major), added in chunk order: the same bits for any
// number of threads. Returned in refs' dtype.
at::Tensor sum_partials(const std::vector<float>& partials, int64_t num_chunks,
                        const at::Tensor& refs) {
  const int64_t num_modes = refs.numel();
  at::Tensor sums = at::zeros({num_modes}, refs.options().dtype(at::kFloat));
  float* sums_ptr = sums.data_ptr<float>();
  for (int64_t chunk = 0; chunk < num_chunks; ++chunk) {
    for (int64_t m = 0; m < num_modes; ++m) sums_ptr[m] += partials[chunk * num_modes + m];
  }
  return sums.to(refs.scalar_type());
}

// Returns (dL/dvalue, dL/drefs). dL/drefs is reduced per fixed chunk into float partial sums, then
// the partials are added in chunk order: deterministic for any thread count.
std::tuple<at::Tensor, at::Tensor> reconstruct_backward(const at::Tensor& grad,
                                                        const at::Tensor& code,
                                                        const at::Tensor& a,
                                                        const at::Tensor& refs) {
  check_contiguous_cpu(grad, "grad");
  check_contiguous_cpu(code, "code");
  check_contiguous_cpu(a, "a");
  TORCH_CHECK(code.numel() == grad.numel() && a.numel() == grad.numel(),
              "grad, code, a: expected the same number of elements");
  TORCH_CHECK(refs.dim() == 1, "refs: expected a 1-D tensor");
  const int64_t n = grad.numel();
  const int64_t num_modes = refs.numel();
  const int64_t num_chunks = (n + kReduceChunk - 1) / kReduceChunk;
  at::Tensor grad_value = at::empty(grad.sizes(), grad.options());
  std::vector<float> partials(static_cast<size_t>(num_chunks * num_modes), 0.0f);

  TORCH_CHECK(a.scalar_type() == grad.scalar_type(), "a: expected the dtype of grad");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(),
                                  "reconstruct_backward", [&] {
    const scalar_t* grad_ptr = grad.data_ptr<scalar_t>();
    const uint8_t* code_ptr = code.data_ptr<uint8_t>();
    const scalar_t* a_ptr = a.data_ptr<scalar_t>();
    scalar_t* grad_value_ptr = grad_value.data_ptr<scalar_t>();
    at::parallel_for(0, num_chunks, 1, [&](int64_t chunk_begin, int64_t chunk_end) {
      for (int64_t chunk = chunk_begin; chunk < chunk_end; ++chunk) {
        backward_chunk<scalar_t>(grad_ptr, code_ptr, a_ptr, grad_value_ptr,
                                 partials.data() + chunk * num_modes, num_modes,
                                 chunk * kReduceChunk, std::min(n, (chunk + 1) * kReduceChunk));
      }
    });
  });

  return {grad_value, sum_partials(partials, num_chunks, refs)};
}

// The online refit's tensors: its running moments (float32, one per tracked value), each value's
// mode, each reference's deviation from its updated mean, and the number of snapshots so far.
struct RefitInput {
  at::Tensor mean, moment2, comoment, mode, ref_deviation;
  int64_t count;
};

// The kernels' view of a RefitInput: each mode's deviation in a table of 256 (a mode past the
// references' reads 0: the Python layer checks the modes' range, this only keeps memory safe).
struct RefitUpdate {
  float* __restrict__ mean;
  float* __restrict__ moment2;
  float* __restrict__ comoment;
  const uint8_t* __restrict__ mode;
  std::array<float, 256> deviation;
  bool with_modes;
  float inv_count;
};

// Checks the refit's tensors against the number of tracked values (those of refit_update_, the FREE
// elements of the fused backward) and returns the kernels' view of them.
RefitUpdate refit_update_of(const RefitInput& input, int64_t values) {
  for (const at::Tensor* t : {&input.mean, &input.moment2, &input.comoment}) {
    check_contiguous_cpu(*t, "moments");
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->numel() == values,
                "moments: expected float32 tensors of one element per value");
  }
  check_contiguous_cpu(input.mode, "mode");
  check_contiguous_cpu(input.ref_deviation, "ref_deviation");
  TORCH_CHECK(input.mode.scalar_type() == at::kByte && input.mode.numel() == values,
              "mode: expected uint8 of one element per value");
  TORCH_CHECK(input.ref_deviation.scalar_type() == at::kFloat && input.ref_deviation.numel() <= 256,
              "ref_deviation: expected float32, at most 256 modes");
  TORCH_CHECK(input.count >= 1, "count: expected at least 1");
  RefitUpdate refit{input.mean.data_ptr<float>(), input.moment2.data_ptr<float>(),
                    input.comoment.data_ptr<float>(), input.mode.data_ptr<uint8_t>(), {},
                    input.ref_deviation.numel() > 0,
                    static_cast<float>(1.0 / static_cast<double>(input.count))};
  for (int64_t m = 0; m < input.ref_deviation.numel(); ++m) {
    refit.deviation[m] = input.ref_deviation.data_ptr<float>()[m];
  }
  return refit;
}

// The online refit's running moments (Welford, stdet::refit_moments), one snapshot of values
// [begin, end) in place. One pass over memory instead of a pass per operation; each product and sum
// rounded once (no contraction: -ffp-contract=off), as in the reference. The arrays come as
// restrict parameters (GCC vectorises on those, not on a struct's members or local restrict
// pointers: 20% slower at 1e7 elements), with or without modes (no branch, no table read it does
// not need).
template <typename scalar_t, bool kWithModes>
void refit_update_loop(const scalar_t* __restrict__ values, float* __restrict__ mean,
                       float* __restrict__ moment2, float* __restrict__ comoment,
                       const uint8_t* __restrict__ mode, const float* __restrict__ deviation,
                       float inv_count, int64_t begin, int64_t end) {
  for (int64_t i = begin; i < end; ++i) {
    stdet::refit_moments(static_cast<float>(values[i]), inv_count, kWithModes,
                         kWithModes ? deviation[mode[i]] : 0.0f, mean[i], moment2[i], comoment[i]);
  }
}

template <typename scalar_t>
void refit_update_range(const scalar_t* values, const RefitUpdate& refit, int64_t begin,
                        int64_t end) {
  const auto loop =
      refit.with_modes ? refit_update_loop<scalar_t, true> : refit_update_loop<scalar_t, false>;
  loop(values, refit.mean, refit.moment2, refit.comoment, refit.mode, refit.deviation.data(),
       refit.inv_count, begin, end);
}

void refit_update_(const at::Tensor& values, at::Tensor mean, at::Tensor moment2,
                   at::Tensor comoment, const at::Tensor& mode, const at::Tensor& ref_deviation,
                   int64_t count) {
  check_contiguous_cpu(values, "values");
  const RefitUpdate refit =
      refit_update_of(RefitInput{mean, moment2, comoment, mode, ref_deviation, count}, values.numel());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, values.scalar_type(), "refit_update_",
                                  [&] {
    const scalar_t* values_p = values.data_ptr<scalar_t>();
    at::parallel_for(0, values.numel(), kGrain, [&](int64_t begin, int64_t end) {
      refit_update_range<scalar_t>(values_p, refit, begin, end);
    });
  });
}

// A grain of a multi-tensor op: elements [begin, end) of tensor `tensor` of the op's lists. The
// grains of all the tensors make one parallel region.
struct Piece {
  size_t tensor;
  int64_t begin;
  int64_t end;
};

void add_pieces(std::vector<Piece>& pieces, size_t tensor, int64_t numel) {
  for (int64_t begin = 0; begin < numel; begin += kGrain) {
    pieces.push_back({tensor, begin, std::min(numel, begin + kGrain)});
  }
}

// The sensitivity's running mean at every element of dense tensors (a model's layers before STDET
// lays it out): sensitivities[k] = decay * s + (1 - decay) * score, score |g * v| or g^2 (fisher),
// the arithmetic of the fused backward's update at its FREE elements; one parallel region over all
// the tensors' elements.
void sensitivity_update_(const std::vector<at::Tensor>& grads, const std::vector<at::Tensor>& values,
                         std::vector<at::Tensor> sensitivities, double decay, bool fisher) {
  TORCH_CHECK(grads.size() == values.size() && grads.size() == sensitivities.size(),
              "grads, values, sensitivities: expected lists of one length");
  std::vector<Piece> pieces;
  for (size_t k = 0; k < grads.size(); ++k) {
    check_contiguous_cpu(grads[k], "grads");
    check_contiguous_cpu(values[k], "values");
    check_contiguous_cpu(sensitivities[k], "sensitivities");
    TORCH_CHECK(sensitivities[k].scalar_type() == at::kFloat, "sensitivities: expected float32");
    TORCH_CHECK(grads[k].scalar_type() == grads[0].scalar_type() &&
                    values[k].scalar_type() == grads[0].scalar_type() &&
                    values[k].numel() == grads[k].numel() &&
                    sensitivities[k].numel() == grads[k].numel(),
                "grads[", k, "], values[", k, "], sensitivities[", k,
                "]: expected one size, grads and values one dtype");
    add_pieces(pieces, k, grads[k].numel());
  }
  if (pieces.empty()) return;
  const float keep = static_cast<float>(decay);
  const float complement = static_cast<float>(1.0 - decay);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grads[0].scalar_type(),
                                  "sensitivity_update_", [&] {
    at::parallel_for(0, static_cast<int64_t>(pieces.size()), 1, [&](int64_t first, int64_t last) {
      for (int64_t p = first; p < last; ++p) {
        const Piece& piece = pieces[p];
        const scalar_t* g = grads[piece.tensor].data_ptr<scalar_t>();
        const scalar_t* v = values[piece.tensor].data_ptr<scalar_t>();
        float* s = sensitivities[piece.tensor].data_ptr<float>();
        for (int64_t i = piece.begin; i < piece.end; ++i) {
          const float score =
              stdet::sensitivity_score(static_cast<float>(g[i]), static_cast<float>(v[i]), fisher);
          s[i] = stdet::running_mean(s[i], score, keep, complement);
        }
      }
    });
  });
}

// averages[k] += alpha * (samples[k] - averages[k]) for every k, in one parallel region over all
// the tensors' elements.
void lerp_(std::vector<at::Tensor> averages, const std::vector<at::Tensor>& samples,
           double alpha) {
  TORCH_CHECK(averages.size() == samples.size(), "averages, samples: expected lists of one length");
  std::vector<Piece> pieces;
  for (size_t k = 0; k < averages.size(); ++k) {
    check_contiguous_cpu(averages[k], "averages");
    check_contiguous_cpu(samples[k], "samples");
    TORCH_CHECK(averages[k].scalar_type() == samples[k].scalar_type() &&
                    averages[k].numel() == samples[k].numel(),
                "averages[", k, "], samples[", k, "]: expected one dtype and size");
    add_pieces(pieces, k, averages[k].numel());
  }
  const float alpha_f = static_cast<float>(alpha);
  at::parallel_for(0, static_cast<int64_t>(pieces.size()), 1, [&](int64_t first, int64_t last) {
    for (int64_t p = first; p < last; ++p) {
      const Piece& piece = pieces[p];
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16,
                                      averages[piece.tensor].scalar_type(), "lerp_", [&] {
        lerp_range<scalar_t>(averages[piece.tensor].data_ptr<scalar_t>(),
                             samples[piece.tensor].data_ptr<scalar_t>(), alpha_f, piece.begin,
                             piece.end);
      });
    }
  });
}


// ---------------------------------------------------------------------------------------------
// Compact layout: free_values holds only the FREE elements, a and b only the others, each in element
// order. offsets[k] = FREE elements before block k of kCompactBlock elements; inside a block the slots
// follow by counting. The Python layer has checked offsets against code (once per code version).

constexpr int64_t kCompactBlock = 1024;  // reference.COMPACT_BLOCK

// Bit k set where code[k] is FREE, for the `length` (at most 64) codes from `code`.
inline uint64_t free_mask(const uint8_t* __restrict__ code, int64_t length) {
  uint64_t mask = 0;
#if defined(__SSE2__)
  if (length == 64) {
    const __m128i free_code = _mm_set1_epi8(static_cast<char>(stdet::kFree));
    for (int quarter = 0; quarter < 4; ++quarter) {
      const __m128i codes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(code + 16 * quarter));
      const auto bits = static_cast<uint32_t>(_mm_movemask_epi8(_mm_cmpeq_epi8(codes, free_code)));
      mask |= static_cast<uint64_t>(bits) << (16 * quarter);
    }
    return mask;
  }
#endif
  for (int64_t k = 0; k < length; ++k) mask |= static_cast<uint64_t>(code[k] == stdet::kFree) << k;
  return mask;
}

// The FREE elements (set bits) and the others of the word of up to 64 codes from code[word], the
// codes from `end` on left out.
struct WordMasks {
  uint64_t free_bits;
  uint64_t other_bits;
};

inline WordMasks word_masks(const uint8_t* __restrict__ code, int64_t word, int64_t end) {
  const int64_t length = std::min<int64_t>(64, end - word);
  const uint64_t valid = length == 64 ? ~uint64_t{0} : (uint64_t{1} << length) - 1;
  const uint64_t free_bits = free_mask(code + word, length);
  return {free_bits, ~free_bits & valid};
}

// ---------------------------------------------------------------------------------------------
// AVX2 paths for blocks with embedded elements, float32 values (float32 or bfloat16 coefficients,
// the default), forward and backward, taken when the CPU has AVX2 (a run-time check: the extension
// is built for any x86-64). A group of 8 elements at a time: a mask of its FREE codes picks, by a
// permutation from a table of 256, the next FREE values into the FREE lanes and the next
// coefficients into the others (AVX2 has no expanding load or compressing store). Same arithmetic and rounding as the element-by-element path, and the same
// order of the refs gradient's additions: the same bits (tests/test_compact.py compares the two).
// On 7M elements with 80% embedded at random, one core: forward 14.8 -> 6.4 ms, backward 12.0 ->
// 6.2 ms (a copy of the 7M floats: 3.2 ms).

#if defined(STDET_AVX2)
struct LaneTables {
  // expand[m][lane]: the rank of `lane` among the set bits of m (where it is set; 0 elsewhere).
  alignas(32) int32_t expand[256][8];
  // compress[m][k]: the lane of the k-th set bit of m (k < popcount(m); 0 beyond).
  alignas(32) int32_t compress[256][8];
};

LaneTables make_lane_tables() {
  LaneTables t{};
  for (int m = 0; m < 256; ++m) {
    int rank = 0;
    for (int lane = 0; lane < 8; ++lane) {
      if (m & (1 << lane)) {
        t.compress[m][rank] = lane;
        t.expand[m][lane] = rank++;
      }
    }
  }
  return t;
}

const LaneTables kLaneTables = make_lane_tables();

bool cpu_has_avx2() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("popcnt");
}

// Whether the AVX2 paths run (on a CPU that has AVX2, unless switched off by `set_simd`).
std::atomic<bool> g_simd{cpu_has_avx2()};
#else
std::atomic<bool> g_simd{false};
#endif

// Switch the AVX2 paths on or off (on only where the CPU has AVX2); returns the previous setting.
bool set_simd(bool enabled) {
#if defined(STDET_AVX2)
  return g_simd.exchange(enabled && cpu_has_avx2());
#else
  (void)enabled;
  return g_simd.load();
#endif
}

bool simd_enabled() { return g_simd.load(); }

// Groups of 8 elements the AVX2 paths have computed since the extension loaded (one relaxed atomic
// add per block): lets a test see that the path it compares really ran.
std::atomic<int64_t> g_avx2_groups{0};

int64_t avx2_groups() { return g_avx2_groups.load(); }

#if defined(STDET_AVX2)
// Eight coefficients from p as float32: float32 as they are, bfloat16 by its exact widening (the
// upper 16 bits of a float32), as static_cast<float> does.
template <typename coef_t>
__attribute__((target("avx2,popcnt"))) inline __m256 load8_as_float(const coef_t* p) {
  if constexpr (std::is_same_v<coef_t, float>) {
    return _mm256_loadu_ps(p);
  } else {
    static_assert(std::is_same_v<coef_t, c10::BFloat16>, "float32 or bfloat16 coefficients");
    const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));
  }
}

// The coefficient dtypes the AVX2 paths take (with float32 values).
template <typename value_t, typename coef_t>
constexpr bool kAvx2Types =
    std::is_same_v<value_t, float> &&
    (std::is_same_v<coef_t, float> || std::is_same_v<coef_t, c10::BFloat16>);

// w, and when kWithAverage the SMA's average, for the block [begin, end) of float32 values (float32
// or bfloat16 coefficients). Returns the first element it left to the caller (the groups whose loads
// would run past the end of a, b: at most the last few of the whole axis).
template <typename coef_t, bool kWithAverage>
__attribute__((target("avx2,popcnt"))) int64_t reconstruct_mixed_avx2(
    const float* __restrict__ free_values, int64_t& free_slot, const uint8_t* __restrict__ code,
    const coef_t* __restrict__ a, const coef_t* __restrict__ b, int64_t& embedded_slot,
    int64_t embedded_total, const float* __restrict__ table, int64_t num_modes,
    float* __restrict__ out, float* __restrict__ sma, float alpha, int64_t begin, int64_t end) {
  const __m128i free_code = _mm_set1_epi8(static_cast<char>(stdet::kFree));
  // Up to 16 modes (the default is 10) the references are two registers and a code's is a permute
  // by its low 3 bits, blended by bit 3: a gather costs several times as much. FREE and DUMMY codes
  // read some entry there, blended away below as they are on the gather's path.
  const bool small_table = num_modes <= 16;
  const __m256 table_low = _mm256_loadu_ps(table);
  const __m256 table_high = _mm256_loadu_ps(table + 8);
  const __m256i lane_index = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i free32 = _mm256_set1_epi32(stdet::kFree);
  const __m256i dummy32 = _mm256_set1_epi32(stdet::kDummy);
  const __m256 alpha8 = _mm256_set1_ps(alpha);
  int64_t i = begin;
  for (; i + 8 <= end && embedded_slot + 8 <= embedded_total; i += 8) {
    const __m128i codes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(code + i));
    const int free_bits = _mm_movemask_epi8(_mm_cmpeq_epi8(codes, free_code)) & 0xff;
    const int free_here = __builtin_popcount(free_bits);
    // The group's FREE values: a masked load of as many as it has (no branch, which on a mixed
    // layout mispredicts; no read past free_values' end), spread to their lanes.
    const __m256i first_lanes = _mm256_cmpgt_epi32(_mm256_set1_epi32(free_here), lane_index);
    const __m256i to_free =
        _mm256_load_si256(reinterpret_cast<const __m256i*>(kLaneTables.expand[free_bits]));
    const __m256 value = _mm256_permutevar8x32_ps(
        _mm256_maskload_ps(free_values + free_slot, first_lanes), to_free);
    const __m256i codes32 = _mm256_cvtepu8_epi32(codes);
    const __m256i to_other =
        _mm256_load_si256(reinterpret_cast<const __m256i*>(kLaneTables.expand[~free_bits & 0xff]));
    const __m256 av = _mm256_permutevar8x32_ps(load8_as_float(a + embedded_slot), to_other);
    const __m256 bv = _mm256_permutevar8x32_ps(load8_as_float(b + embedded_slot), to_other);
    const __m256 ref =
        small_table
            ? _mm256_blendv_ps(_mm256_permutevar8x32_ps(table_low, codes32),
                               _mm256_permutevar8x32_ps(table_high, codes32),
                               _mm256_castsi256_ps(_mm256_slli_epi32(codes32, 28)))
            : _mm256_i32gather_ps(table, codes32, 4);
    const __m256 embedded = _mm256_add_ps(_mm256_mul_ps(av, ref), bv);  // a * ref + b, two roundings
    const __m256 is_free = _mm256_castsi256_ps(_mm256_cmpeq_epi32(codes32, free32));
    const __m256 is_dummy = _mm256_castsi256_ps(_mm256_cmpeq_epi32(codes32, dummy32));
    const __m256 w = _mm256_blendv_ps(_mm256_blendv_ps(embedded, bv, is_dummy), value, is_free);
    _mm256_storeu_ps(out + i, w);
    if constexpr (kWithAverage) {
      const __m256 average = _mm256_loadu_ps(sma + i);
      _mm256_storeu_ps(sma + i,
                       _mm256_add_ps(average, _mm256_mul_ps(alpha8, _mm256_sub_ps(w, average))));
    }
    free_slot += free_here;
    embedded_slot += 8 - free_here;
  }
  g_avx2_groups.fetch_add((i - begin) / 8, std::memory_order_relaxed);
  return i;
}

// The backward of the block [begin, end) of float32 gradients, element i's at
// block_source[i - begin] (float32 or bfloat16 coefficients):
// the FREE elements' gradients in order into block_grad (room for kCompactBlock + 8), and every element's
// refs-gradient term (a * grad where embedded, 0 elsewhere) added to by_code[i % 4][code] in
// increasing i, as the element-by-element path adds them (FREE elements add 0 to the FREE code's
// entry, which is no mode). Returns the first element it left to the caller.
template <typename coef_t, size_t kLanes>
__attribute__((target("avx2,popcnt"))) int64_t backward_mixed_avx2(
    const float* __restrict__ block_source, const uint8_t* __restrict__ code,
    const coef_t* __restrict__ a,
    int64_t& embedded_slot, int64_t embedded_total, float* __restrict__ block_grad,
    int64_t& free_so_far, std::array<std::array<float, stdet::kTableSize>, kLanes>& by_code,
    int64_t begin, int64_t end) {
  static_assert(8 % kLanes == 0, "a group of 8 starts on lane table 0");
  const __m128i free_code = _mm_set1_epi8(static_cast<char>(stdet::kFree));
  const __m256i mode_limit = _mm256_set1_epi32(stdet::kDummy);
  alignas(32) float term[8];
  int64_t i = begin;
  for (; i + 8 <= end && embedded_slot + 8 <= embedded_total; i += 8) {
    const __m128i codes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(code + i));
    const int free_bits = _mm_movemask_epi8(_mm_cmpeq_epi8(codes, free_code)) & 0xff;
    const __m256 g = _mm256_loadu_ps(block_source + (i - begin));
    const __m256i to_slots =
        _mm256_load_si256(reinterpret_cast<const __m256i*>(kLaneTables.compress[free_bits]));
    _mm256_storeu_ps(block_grad + free_so_far, _mm256_permutevar8x32_ps(g, to_slots));
    const __m256i to_other =
        _mm256_load_si256(reinterpret_cast<const __m256i*>(kLaneTables.expand[~free_bits & 0xff]));
    const __m256 av = _mm256_permutevar8x32_ps(load8_as_float(a + embedded_slot), to_other);
    const __m256 is_mode =
        _mm256_castsi256_ps(_mm256_cmpgt_epi32(mode_limit, _mm256_cvtepu8_epi32(codes)));
    _mm256_store_ps(term, _mm256_and_ps(_mm256_mul_ps(av, g), is_mode));
    for (int lane = 0; lane < 8; ++lane) by_code[lane % kLanes][code[i + lane]] += term[lane];
    const int free_here = __builtin_popcount(free_bits);
    free_so_far += free_here;
    embedded_slot += 8 - free_here;
  }
  g_avx2_groups.fetch_add((i - begin) / 8, std::memory_order_relaxed);
  return i;
}
#endif

// out[i] = w and, when kWithAverage, the SMA's moving average at i.
template <typename value_t, bool kWithAverage>
inline void store_weight(value_t* __restrict__ out, value_t* __restrict__ sma, int64_t i, float w,
                         float alpha) {
  out[i] = static_cast<value_t>(w);
  if constexpr (kWithAverage) {
    sma[i] = static_cast<value_t>(stdet::moving_average(static_cast<float>(sma[i]), w, alpha));
  }
}

// w for blocks [block_begin, block_end), and when kWithAverage sma += alpha * (w - sma) there.
//
// As in the backward: a block all FREE is a contiguous conversion and a block with none FREE a
// contiguous loop over its coefficients, both vectorised. A mixed block has no branch per element:
// on a mixed layout a FREE-or-embedded branch mispredicts about half the time (mbt2018-mean's 7M
// elements at 50% embedded took 20 ms that way, ten times a copy of the same bytes). It goes a word
// of 64 codes at a time: a mask of the FREE ones, then the set bits in order take the next FREE
// values and the clear bits the next coefficients (measured on one core against a branch-free
// compaction into position lists: 25-30% faster at 5-95% embedded).
template <typename value_t, typename coef_t, bool kWithAverage>
void reconstruct_compact_blocks(const value_t* __restrict__ free_values,
                                const uint8_t* __restrict__ code,
                                const int32_t* __restrict__ offsets,
                                const coef_t* __restrict__ a, const coef_t* __restrict__ b,
                                const RefTable& table, int64_t num_modes,
                                value_t* __restrict__ out, value_t* __restrict__ sma, float alpha,
                                int64_t n, int64_t free_count, int64_t block_begin,
                                int64_t block_end) {
  bool use_avx2 = false;  // blocks with none FREE then take it too: faster than their loop below
#if defined(STDET_AVX2)
  if constexpr (kAvx2Types<value_t, coef_t>) use_avx2 = g_simd.load(std::memory_order_relaxed);
#endif
  for (int64_t block = block_begin; block < block_end; ++block) {
    const int64_t free_begin = offsets[block];
    const int64_t block_free = offsets[block + 1] - free_begin;
    const int64_t begin = block * kCompactBlock;
    const int64_t end = std::min(n, begin + kCompactBlock);
    const int64_t embedded_begin = begin - free_begin;
    if (block_free == end - begin) {
      const value_t* __restrict__ values = free_values + free_begin;
#pragma omp simd
      for (int64_t i = begin; i < end; ++i) {
        const float w = static_cast<float>(values[i - begin]);
        store_weight<value_t, kWithAverage>(out, sma, i, w, alpha);
      }
    } else if (block_free == 0 && !use_avx2) {
      const coef_t* __restrict__ block_a = a + embedded_begin;
      const coef_t* __restrict__ block_b = b + embedded_begin;
#pragma omp simd
      for (int64_t i = begin; i < end; ++i) {
        const uint8_t c = code[i];
        const float w = stdet::reconstruct_element(c, 0.0f, static_cast<float>(block_a[i - begin]),
                                                   static_cast<float>(block_b[i - begin]),
                                                   table[c]);
        store_weight<value_t, kWithAverage>(out, sma, i, w, alpha);
      }
    } else {
      // A word of 64 elements at a time: a bit mask of its FREE elements, then one loop over the
      // set bits (the FREE values, in order) and one over the clear ones (the coefficients).
      int64_t free_slot = free_begin;
      int64_t embedded_slot = embedded_begin;
      int64_t first = begin;
#if defined(STDET_AVX2)
      if constexpr (kAvx2Types<value_t, coef_t>) {
        if (use_avx2) {
          first = reconstruct_mixed_avx2<coef_t, kWithAverage>(
              free_values, free_slot, code, a, b, embedded_slot, n - free_count, table.data(),
              num_modes, out, sma, alpha, begin, end);
        }
      }
#endif
      for (int64_t word = first; word < end; word += 64) {
        auto [free_bits, other_bits] = word_masks(code, word, end);
        while (free_bits != 0) {
          const int64_t i = word + __builtin_ctzll(free_bits);
          free_bits &= free_bits - 1;
          const float w = static_cast<float>(free_values[free_slot++]);
          store_weight<value_t, kWithAverage>(out, sma, i, w, alpha);
        }
        while (other_bits != 0) {
          const int64_t i = word + __builtin_ctzll(other_bits);
          other_bits &= other_bits - 1;
          const uint8_t c = code[i];
          const float w = stdet::reconstruct_element(c, 0.0f, static_cast<float>(a[embedded_slot]),
                                                     static_cast<float>(b[embedded_slot]), table[c]);
          ++embedded_slot;
          store_weight<value_t, kWithAverage>(out, sma, i, w, alpha);
        }
      }
    }
  }
}

// Checks the layout's sizes and returns the number of FREE elements.
int64_t check_compact(const at::Tensor& code, const at::Tensor& offsets, const at::Tensor& a,
                      const at::Tensor& b) {
  check_contiguous_cpu(code, "code");
  check_contiguous_cpu(offsets, "offsets");
  check_contiguous_cpu(a, "a");
  check_contiguous_cpu(b, "b");
  TORCH_CHECK(code.scalar_type() == at::kByte, "code: expected uint8");
  TORCH_CHECK(offsets.scalar_type() == at::kInt, "offsets: expected int32");
  const int64_t blocks = (code.numel() + kCompactBlock - 1) / kCompactBlock;
  TORCH_CHECK(offsets.numel() == blocks + 1, "offsets: expected ", blocks + 1, " entries");
  const int64_t free_count = offsets.data_ptr<int32_t>()[blocks];
  TORCH_CHECK(a.numel() == code.numel() - free_count && b.numel() == a.numel(),
              "a, b: expected ", code.numel() - free_count, " elements");
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), "a, b: expected one dtype");
  return free_count;
}

template <bool kWithAverage>
at::Tensor reconstruct_compact_impl(const at::Tensor& free_values, const at::Tensor& code,
                                    const at::Tensor& offsets, const at::Tensor& a,
                                    const at::Tensor& b, const at::Tensor& refs, at::Tensor* sma,
                                    double alpha) {
  check_contiguous_cpu(free_values, "free_values");
  TORCH_CHECK(free_values.numel() == check_compact(code, offsets, a, b),
              "free_values: expected one element per FREE code");
  const RefTable table = make_ref_table(refs);
  at::Tensor out = at::empty(code.sizes(), free_values.options());
  const int64_t n = code.numel();
  const int64_t blocks = (n + kCompactBlock - 1) / kCompactBlock;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, free_values.scalar_type(),
                                  "reconstruct_compact", [&] {
    using value_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(),
                                    "reconstruct_compact", [&] {
      using coef_t = scalar_t;
      value_t* sma_ptr = nullptr;
      if constexpr (kWithAverage) sma_ptr = sma->data_ptr<value_t>();
      const value_t* free_ptr = free_values.data_ptr<value_t>();
      const uint8_t* code_ptr = code.data_ptr<uint8_t>();
      const int32_t* offsets_ptr = offsets.data_ptr<int32_t>();
      const coef_t* a_ptr = a.data_ptr<coef_t>();
      const coef_t* b_ptr = b.data_ptr<coef_t>();
      value_t* out_ptr = out.data_ptr<value_t>();
      const float alpha_f = static_cast<float>(alpha);
      at::parallel_for(0, blocks, kGrain / kCompactBlock, [&](int64_t first, int64_t last) {
        reconstruct_compact_blocks<value_t, coef_t, kWithAverage>(
            free_ptr, code_ptr, offsets_ptr, a_ptr, b_ptr, table, refs.numel(), out_ptr, sma_ptr,
            alpha_f, n, free_values.numel(), first, last);
      });
    });
  });
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
  check_contiguous_cpu(sma, "sma");
  TORCH_CHECK(sma.scalar_type() == free_values.scalar_type() && sma.numel() == code.numel(),
              "sma: expected the dtype of free_values and the number of elements of code");
  return reconstruct_compact_impl<true>(free_values, code, offsets, a, b, refs, &sma, alpha);
}

// Where the fused backward keeps the sensitivity's running mean: one float per FREE element,
// updated in place from the FREE elements' gradients and values.
template <typename value_t>
struct SensitivityUpdate {
  const value_t* __restrict__ free_values;
  float* __restrict__ sensitivity;
  float decay;
  float complement;  // 1 - decay, rounded once from double
  bool fisher;
};

// Where the backward reads dL/dw: one flat gradient, or the layers' own gradients laid end to end
// (the pieces of the flat weight's views, read in place: no concatenation first). `block` returns
// the gradients of elements [begin, end) (one block) contiguously: a pointer into a piece when the
// block lies inside one, else a copy into `scratch` (a block across pieces, or inside a piece that
// got no gradient: zeros).
template <typename value_t>
struct FlatGradient {
  const value_t* __restrict__ grad;
  const value_t* block(int64_t begin, int64_t, value_t*) const { return grad + begin; }
};

template <typename value_t>
struct PieceGradients {
  std::vector<const value_t*> pieces;  // nullptr: a piece with no gradient (zeros)
  std::vector<int64_t> starts;         // first element of each piece, then the total

  const value_t* block(int64_t begin, int64_t end, value_t* scratch) const {
    // The last piece starting at or before begin (pieces of no elements are skipped by this).
    int64_t p = std::upper_bound(starts.begin(), starts.end(), begin) - starts.begin() - 1;
    if (end <= starts[p + 1] && pieces[p] != nullptr) return pieces[p] + (begin - starts[p]);
    for (int64_t i = begin; i < end; ++p) {
      const int64_t stop = std::min(end, starts[p + 1]);
      for (; i < stop; ++i) {
        scratch[i - begin] = pieces[p] != nullptr ? pieces[p][i - starts[p]] : value_t(0);
      }
    }
    return scratch;
  }
};

// (dL/dfree_values, dL/drefs) and, when kWithSensitivity, the sensitivity's update; the refs
// gradient in fixed chunks of kReduceChunk elements, as in the dense backward.
//
// A block all FREE is a copy, a block with none FREE a loop over contiguous coefficients. A mixed
// block has no branch per element (one per FREE-or-embedded element mispredicts about half the time
// on a mixed layout and costs more than the arithmetic): as in the forward, a word of 64 codes at a
// time, a mask of its FREE elements, whose set bits copy the gradients into a block-local buffer in
// order and whose clear bits add a * grad to their code's sum (DUMMY adds 0 to an entry that is not a
// mode). Then one contiguous loop over the block's FREE slots stores the gradients and updates the
// sensitivity. The per-code sums rotate over kLanes tables by element index, so a run of one mode is
// kLanes independent chains of additions, not one; each mode sums the same terms in the same order
// on every path, and the tables are added in a fixed order.
//
// When kWithRefit, each block's FREE values, already in cache from the sensitivity's update (or read
// here), also go into the online refit's running moments (`refit_update_range`, the same arithmetic
// as `refit_update_`): the refit's snapshot costs no pass over memory of its own.
template <typename value_t, typename coef_t, bool kWithSensitivity, bool kWithRefit, typename Source>
void compact_backward_blocks(const Source& source, const uint8_t* __restrict__ code,
                             const int32_t* __restrict__ offsets, const coef_t* __restrict__ a,
                             value_t* __restrict__ grad_free,
                             float* __restrict__ partial, const SensitivityUpdate<value_t>& update,
                             const RefitUpdate& refit, int64_t num_modes, int64_t n,
                             int64_t free_count, int64_t block_begin, int64_t block_end) {
  constexpr size_t kLanes = 4;
  std::array<std::array<float, stdet::kTableSize>, kLanes> by_code{};
  std::array<float, kCompactBlock + 8> block_grad;  // + 8: the AVX2 path stores 8 at a time
  std::array<value_t, kCompactBlock> scratch;       // a block's gradients gathered across pieces
  bool use_avx2 = false;  // blocks with none FREE then take it too: faster than their loop below
#if defined(STDET_AVX2)
  if constexpr (kAvx2Types<value_t, coef_t>) use_avx2 = g_simd.load(std::memory_order_relaxed);
#endif
  for (int64_t block = block_begin; block < block_end; ++block) {
    const int64_t free_begin = offsets[block];
    const int64_t block_free = offsets[block + 1] - free_begin;
    const int64_t begin = block * kCompactBlock;
    const int64_t end = std::min(n, begin + kCompactBlock);
    const value_t* __restrict__ grad = source.block(begin, end, scratch.data());  // element begin + k at k
    int64_t embedded_slot = begin - free_begin;
    if (block_free == end - begin) {
#pragma omp simd
      for (int64_t k = 0; k < block_free; ++k) block_grad[k] = static_cast<float>(grad[k]);
    } else if (block_free == 0 && !use_avx2) {
      for (int64_t i = begin; i < end; ++i) {
        const uint8_t c = code[i];
        by_code[i % kLanes][c] += stdet::ref_grad_contribution(
            c, static_cast<float>(a[embedded_slot++]), static_cast<float>(grad[i - begin]));
      }
    } else {
      int64_t free_so_far = 0;
      int64_t first = begin;
#if defined(STDET_AVX2)
      if constexpr (kAvx2Types<value_t, coef_t>) {
        if (use_avx2) {
          first = backward_mixed_avx2<coef_t, kLanes>(grad, code, a, embedded_slot, n - free_count,
                                                      block_grad.data(), free_so_far, by_code,
                                                      begin, end);
        }
      }
#endif
      for (int64_t word = first; word < end; word += 64) {
        auto [free_bits, other_bits] = word_masks(code, word, end);
        while (free_bits != 0) {
          block_grad[free_so_far++] =
              static_cast<float>(grad[word - begin + __builtin_ctzll(free_bits)]);
          free_bits &= free_bits - 1;
        }
        while (other_bits != 0) {
          const int64_t i = word + __builtin_ctzll(other_bits);
          other_bits &= other_bits - 1;
          const uint8_t c = code[i];
          by_code[i % kLanes][c] += stdet::ref_grad_contribution(
              c, static_cast<float>(a[embedded_slot++]), static_cast<float>(grad[i - begin]));
        }
      }
    }
    value_t* __restrict__ block_grad_free = grad_free + free_begin;
#pragma omp simd
    for (int64_t k = 0; k < block_free; ++k) {
      const float g = block_grad[k];
      block_grad_free[k] = static_cast<value_t>(g);
      if constexpr (kWithSensitivity) {
        const int64_t slot = free_begin + k;
        const float score = stdet::sensitivity_score(
            g, static_cast<float>(update.free_values[slot]), update.fisher);
        update.sensitivity[slot] =
            stdet::running_mean(update.sensitivity[slot], score, update.decay, update.complement);
      }
    }
    if constexpr (kWithRefit) {
      refit_update_range<value_t>(update.free_values, refit, free_begin, free_begin + block_free);
    }
  }
  for (int64_t m = 0; m < num_modes; ++m) {
    partial[m] = (by_code[0][m] + by_code[1][m]) + (by_code[2][m] + by_code[3][m]);
  }
}

// The backward's gradient: `grad` (one flat tensor), or with `pieces` the layers' gradients in order
// (an undefined or empty tensor for a piece of sizes[k] > 0 elements that got none).
struct GradientInput {
  const at::Tensor* grad = nullptr;
  const std::vector<at::Tensor>* pieces = nullptr;
  const std::vector<int64_t>* sizes = nullptr;
};

// The gradient's dtype, after checking it covers code's elements.
at::ScalarType check_gradient_input(const GradientInput& input, const at::Tensor& code) {
  if (input.grad != nullptr) {
    check_contiguous_cpu(*input.grad, "grad");
    TORCH_CHECK(input.grad->numel() == code.numel(), "grad: expected the number of elements of code");
    return input.grad->scalar_type();
  }
  const auto& pieces = *input.pieces;
  const auto& sizes = *input.sizes;
  TORCH_CHECK(pieces.size() == sizes.size(), "pieces: expected one per size");
  int64_t total = 0;
  c10::optional<at::ScalarType> dtype;
  for (size_t k = 0; k < pieces.size(); ++k) {
    TORCH_CHECK(sizes[k] >= 0, "sizes: expected no negative size");
    total += sizes[k];
    if (!pieces[k].defined() || (pieces[k].numel() == 0 && sizes[k] > 0)) continue;
    check_contiguous_cpu(pieces[k], "pieces");
    TORCH_CHECK(pieces[k].numel() == sizes[k], "pieces: piece ", k, " has ", pieces[k].numel(),
                " elements, its size is ", sizes[k]);
    TORCH_CHECK(!dtype || *dtype == pieces[k].scalar_type(), "pieces: expected one dtype");
    dtype = pieces[k].scalar_type();
  }
  TORCH_CHECK(total == code.numel(), "sizes: expected ", code.numel(), " elements in all, got ",
              total);
  TORCH_CHECK(dtype.has_value(), "pieces: expected at least one gradient");
  return *dtype;
}

template <bool kWithSensitivity, bool kWithRefit = false>
std::tuple<at::Tensor, at::Tensor> reconstruct_compact_backward_impl(
    const GradientInput& input, const at::Tensor& code, const at::Tensor& offsets,
    const at::Tensor& a, const at::Tensor& refs, const at::Tensor* free_values,
    at::Tensor* sensitivity, double decay, bool fisher, const RefitInput* refit_input = nullptr) {
  const at::ScalarType grad_dtype = check_gradient_input(input, code);
  TORCH_CHECK(refs.dim() == 1, "refs: expected a 1-D tensor");
  const int64_t n = code.numel();
  const int64_t blocks = (n + kCompactBlock - 1) / kCompactBlock;
  const int64_t free_count = check_compact(code, offsets, a, a);
  if constexpr (kWithSensitivity || kWithRefit) {
    check_contiguous_cpu(*free_values, "free_values");
    TORCH_CHECK(free_values->scalar_type() == grad_dtype && free_values->numel() == free_count,
                "free_values: expected the dtype of grad and one element per FREE code");
  }
  if constexpr (kWithSensitivity) {
    check_contiguous_cpu(*sensitivity, "sensitivity");
    TORCH_CHECK(sensitivity->scalar_type() == at::kFloat && sensitivity->numel() == free_count,
                "sensitivity: expected float32 and one element per FREE code");
  }
  RefitUpdate refit{};
  if constexpr (kWithRefit) refit = refit_update_of(*refit_input, free_count);
  const int64_t num_modes = refs.numel();
  constexpr int64_t kBlocksPerChunk = kReduceChunk / kCompactBlock;
  const int64_t num_chunks = (blocks + kBlocksPerChunk - 1) / kBlocksPerChunk;
  at::Tensor grad_free = at::empty({n - a.numel()}, code.options().dtype(grad_dtype));
  std::vector<float> partials(static_cast<size_t>(num_chunks * num_modes), 0.0f);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_dtype,
                                  "reconstruct_compact_backward", [&] {
    using value_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(),
                                    "reconstruct_compact_backward", [&] {
      using coef_t = scalar_t;
      const uint8_t* code_ptr = code.data_ptr<uint8_t>();
      const int32_t* offsets_ptr = offsets.data_ptr<int32_t>();
      const coef_t* a_ptr = a.data_ptr<coef_t>();
      value_t* grad_free_ptr = grad_free.data_ptr<value_t>();
      SensitivityUpdate<value_t> update{nullptr, nullptr, static_cast<float>(decay),
                                        static_cast<float>(1.0 - decay), fisher};
      if constexpr (kWithSensitivity || kWithRefit) {
        update.free_values = free_values->data_ptr<value_t>();
      }
      if constexpr (kWithSensitivity) update.sensitivity = sensitivity->data_ptr<float>();
      auto run = [&](const auto& source) {
        at::parallel_for(0, num_chunks, 1, [&](int64_t chunk_begin, int64_t chunk_end) {
          for (int64_t chunk = chunk_begin; chunk < chunk_end; ++chunk) {
            compact_backward_blocks<value_t, coef_t, kWithSensitivity, kWithRefit>(
                source, code_ptr, offsets_ptr, a_ptr, grad_free_ptr,
                partials.data() + chunk * num_modes, update, refit, num_modes, n, free_count,
                chunk * kBlocksPerChunk, std::min(blocks, (chunk + 1) * kBlocksPerChunk));
          }
        });
      };
      if (input.grad != nullptr) {
        run(FlatGradient<value_t>{input.grad->data_ptr<value_t>()});
      } else {
        PieceGradients<value_t> source;
        int64_t start = 0;
        for (size_t k = 0; k < input.pieces->size(); ++k) {
          const at::Tensor& piece = (*input.pieces)[k];
          const bool given = piece.defined() && piece.numel() > 0;
          source.pieces.push_back(given ? piece.data_ptr<value_t>() : nullptr);
          source.starts.push_back(start);
          start += (*input.sizes)[k];
        }
        source.starts.push_back(start);
        run(source);
      }
    });
  });
  return {grad_free, sum_partials(partials, num_chunks, refs)};
}

std::tuple<at::Tensor, at::Tensor> reconstruct_compact_backward(const at::Tensor& grad,
                                                                const at::Tensor& code,
                                                                const at::Tensor& offsets,
                                                                const at::Tensor& a,
                                                                const at::Tensor& refs) {
  return reconstruct_compact_backward_impl<false>(GradientInput{&grad}, code, offsets, a, refs,
                                                  nullptr, nullptr, 0.0, false);
}

// reconstruct_compact_backward, and in the same pass sensitivity = decay * sensitivity +
// (1 - decay) * score at every FREE element (score: |g * v|, or g^2 when fisher).
std::tuple<at::Tensor, at::Tensor> reconstruct_compact_backward_sensitivity_(
    const at::Tensor& grad, const at::Tensor& free_values, const at::Tensor& code,
    const at::Tensor& offsets, const at::Tensor& a, const at::Tensor& refs, at::Tensor sensitivity,
    double decay, bool fisher) {
  return reconstruct_compact_backward_impl<true>(GradientInput{&grad}, code, offsets, a, refs,
                                                 &free_values, &sensitivity, decay, fisher);
}

// The two backwards above from the layers' gradients (`pieces`, sizes elements each, in the flat
// axis's order; an empty tensor for a layer that got none) read in place, instead of one flat
// gradient: the flat weight's views need no concatenation of their gradients first.
std::tuple<at::Tensor, at::Tensor> reconstruct_compact_backward_pieces(
    const std::vector<at::Tensor>& pieces, const std::vector<int64_t>& sizes,
    const at::Tensor& code, const at::Tensor& offsets, const at::Tensor& a, const at::Tensor& refs) {
  return reconstruct_compact_backward_impl<false>(GradientInput{nullptr, &pieces, &sizes}, code,
                                                  offsets, a, refs, nullptr, nullptr, 0.0, false);
}

std::tuple<at::Tensor, at::Tensor> reconstruct_compact_backward_pieces_sensitivity_(
    const std::vector<at::Tensor>& pieces, const std::vector<int64_t>& sizes,
    const at::Tensor& free_values, const at::Tensor& code, const at::Tensor& offsets,
    const at::Tensor& a, const at::Tensor& refs, at::Tensor sensitivity, double decay,
    bool fisher) {
  return reconstruct_compact_backward_impl<true>(GradientInput{nullptr, &pieces, &sizes}, code,
                                                 offsets, a, refs, &free_values, &sensitivity,
                                                 decay, fisher);
}

// The two pieces backwards above (the sensitivity's when `sensitivity` is given), and in the same
// pass the online refit's snapshot of the FREE elements' values (refit_update_ of free_values).
std::tuple<at::Tensor, at::Tensor> reconstruct_compact_backward_pieces_refit_(
    const std::vector<at::Tensor>& pieces, const std::vector<int64_t>& sizes,
    const at::Tensor& free_values, const at::Tensor& code, const at::Tensor& offsets,
    const at::Tensor& a, const at::Tensor& refs, c10::optional<at::Tensor> sensitivity,
    double decay, bool fisher, at::Tensor mean, at::Tensor moment2, at::Tensor comoment,
    const at::Tensor& mode, const at::Tensor& ref_deviation, int64_t count) {
  const GradientInput input{nullptr, &pieces, &sizes};
  const RefitInput refit{mean, moment2, comoment, mode, ref_deviation, count};
  if (sensitivity.has_value()) {
    return reconstruct_compact_backward_impl<true, true>(input, code, offsets, a, refs, &free_values,
                                                         &*sensitivity, decay, fisher, &refit);
  }
  return reconstruct_compact_backward_impl<false, true>(input, code, offsets, a, refs, &free_values,
                                                        nullptr, 0.0, false, &refit);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "STDET ops, C++ CPU kernels";
  m.def("reconstruct", &reconstruct, "w = value | b | a * refs[code] + b, by code");
  m.def("reconstruct_sma_", &reconstruct_sma_, "reconstruct, and sma += alpha * (w - sma)");
  m.def("reconstruct_backward", &reconstruct_backward, "(dL/dvalue, dL/drefs) from dL/dw");
  m.def("lerp_", &lerp_, "averages[k] += alpha * (samples[k] - averages[k])");
  m.def("refit_update_", &refit_update_, "one snapshot into the online refit's running moments");
  m.def("sensitivity_update_", &sensitivity_update_,
        "the sensitivity's running mean at every element of dense tensors");
  m.def("reconstruct_compact", &reconstruct_compact, "reconstruct, compact layout");
  m.def("set_simd", &set_simd,
        "switch the AVX2 paths on (where the CPU has AVX2) or off; returns the previous setting");
  m.def("simd_enabled", &simd_enabled, "whether the AVX2 paths run");
  m.def("avx2_groups", &avx2_groups, "groups of 8 elements the AVX2 paths have computed so far");
  m.def("reconstruct_compact_sma_", &reconstruct_compact_sma_,
        "reconstruct_compact, and sma += alpha * (w - sma)");
  m.def("reconstruct_compact_backward", &reconstruct_compact_backward,
        "(dL/dfree_values, dL/drefs) from dL/dw, compact layout");
  m.def("reconstruct_compact_backward_sensitivity_", &reconstruct_compact_backward_sensitivity_,
        "reconstruct_compact_backward, and the sensitivity's running mean at the FREE elements");
  m.def("reconstruct_compact_backward_pieces", &reconstruct_compact_backward_pieces,
        "reconstruct_compact_backward from the layers' gradients, read in place");
  m.def("reconstruct_compact_backward_pieces_sensitivity_",
        &reconstruct_compact_backward_pieces_sensitivity_,
        "reconstruct_compact_backward_sensitivity_ from the layers' gradients, read in place");
  m.def("reconstruct_compact_backward_pieces_refit_", &reconstruct_compact_backward_pieces_refit_,
        "the pieces backward (with the sensitivity's update when given), and the online refit's "
        "snapshot of the FREE values in the same pass");
}
