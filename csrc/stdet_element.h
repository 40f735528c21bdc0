// Per-element arithmetic of the STDET ops, shared by the C++ (CPU) and CUDA kernels.
//
// Everything here is the METHOD.md contract for a single element, computed in float32. The CPU
// tests exercise exactly these functions, so the CUDA sources only add indexing, launch
// configuration and reductions on top of code that is already tested.
#pragma once

#include <c10/macros/Macros.h>

#include <cmath>
#include <cstdint>
#if !defined(__CUDA_ARCH__)
#include <cstring>
#endif

namespace stdet {

// Codes 0..253 name a mode; these two are special.
constexpr uint8_t kDummy = 254;  // frozen: w = b
constexpr uint8_t kFree = 255;   // trainable: w = value

// Reference-table size: one float per possible code, so a lookup by code never leaves the table.
// Entries for DUMMY, FREE and modes that refs does not have hold 0.
constexpr int kTableSize = 256;

#if !defined(__CUDA_ARCH__)
// std::bit_cast is C++20; torch before 2.13 builds extensions as C++17. memcpy compiles to the same move.
template <typename To, typename From>
inline To bit_cast(const From& from) {
  static_assert(sizeof(To) == sizeof(From), "bit_cast: sizes differ");
  To to;
  std::memcpy(&to, &from, sizeof(To));
  return to;
}
#endif

// cond ? x : y. On the host as a bitwise blend: GCC does not if-convert the nested float ternary of
// reconstruct_element, and a blend lets it vectorise the loop. Exact for every value (NaN, inf).
C10_HOST_DEVICE inline float select(bool cond, float x, float y) {
#if defined(__CUDA_ARCH__)
  return cond ? x : y;
#else
  const uint32_t mask = 0u - static_cast<uint32_t>(cond);
  return bit_cast<float>((bit_cast<uint32_t>(x) & mask) | (bit_cast<uint32_t>(y) & ~mask));
#endif
}

// w = value (FREE), b (DUMMY), a * ref + b (embedded). `ref` is refs[code] for an embedded element
// and anything finite otherwise (it is not used).
C10_HOST_DEVICE inline float reconstruct_element(uint8_t code, float value, float a, float b,
                                                 float ref) {
  const float embedded = a * ref + b;
  return select(code == kFree, value, select(code == kDummy, b, embedded));
}

// The moving average of SMA: avg + alpha * (sample - avg).
C10_HOST_DEVICE inline float moving_average(float average, float sample, float alpha) {
  return average + alpha * (sample - average);
}

// dL/dvalue: the upstream gradient where the element is FREE, 0 elsewhere.
C10_HOST_DEVICE inline float value_grad(uint8_t code, float grad) {
  return select(code == kFree, grad, 0.0f);
}

// The contribution of one element to dL/drefs[code]: a * grad where embedded, 0 elsewhere.
C10_HOST_DEVICE inline float ref_grad_contribution(uint8_t code, float a, float grad) {
  return select(code < kDummy, a * grad, 0.0f);
}

// The sensitivity score of a FREE element from its upstream gradient and its value: |grad * value|
// (first-order Taylor saliency) or, when `fisher`, grad^2.
C10_HOST_DEVICE inline float sensitivity_score(float grad, float value, bool fisher) {
  return select(fisher, grad * grad, fabsf(grad * value));
}

// The sensitivity's running mean: decay * mean + (1 - decay) * score, with decay in [0, 1).
// `complement` is 1 - decay computed in double on the host and rounded once, as every backend does.
C10_HOST_DEVICE inline float running_mean(float mean, float score, float decay, float complement) {
  return decay * mean + complement * score;
}

// The online refit's Welford update of one element's running moments by its value w, in place:
// delta = w - mean, mean += delta * inv_count, moment2 += delta * (w - mean) and, with modes,
// comoment += delta * deviation (deviation: its reference's value minus the reference's updated
// mean). Each product and sum rounded once, in this order (refit_update_ in the reference).
C10_HOST_DEVICE inline void refit_moments(float w, float inv_count, bool with_modes, float deviation,
                                          float& mean, float& moment2, float& comoment) {
  const float delta = w - mean;
  const float updated = mean + delta * inv_count;
  mean = updated;
  moment2 = moment2 + delta * (w - updated);
  if (with_modes) comoment = comoment + delta * deviation;
}

}  // namespace stdet
