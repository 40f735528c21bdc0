// Per-element arithmetic of the STDET ops, shared by the C++ (CPU) and CUDA kernels.
//
// Everything here is the METHOD.md contract for a single element, computed in float32. The CPU
// tests exercise exactly these functions, so the CUDA sources only add indexing, launch
// configuration and reductions on top of code that is already tested.
#pragma once

#include <c10/macros/Macros.h>

#include <cstdint>

namespace stdet {

// Codes 0..253 name a mode; these two are special.
constexpr uint8_t kDummy = 254;  // frozen: w = b
constexpr uint8_t kFree = 255;   // trainable: w = value

// Reference-table size: one float per possible code, so a lookup by code never leaves the table.
// Entries for DUMMY, FREE and modes that refs does not have hold 0.
constexpr int kTableSize = 256;

// w = value (FREE), b (DUMMY), a * ref + b (embedded). `ref` is refs[code] for an embedded element
// and anything finite otherwise (it is not used).
C10_HOST_DEVICE inline float reconstruct_element(uint8_t code, float value, float a, float b,
                                                 float ref) {
  const float embedded = a * ref + b;
  return code == kFree ? value : (code == kDummy ? b : embedded);
}

// The moving average of SMA: avg + alpha * (sample - avg).
C10_HOST_DEVICE inline float moving_average(float average, float sample, float alpha) {
  return average + alpha * (sample - average);
}

// dL/dvalue: the upstream gradient where the element is FREE, 0 elsewhere.
C10_HOST_DEVICE inline float value_grad(uint8_t code, float grad) {
  return code == kFree ? grad : 0.0f;
}

// The contribution of one element to dL/drefs[code]: a * grad where embedded, 0 elsewhere.
C10_HOST_DEVICE inline float ref_grad_contribution(uint8_t code, float a, float grad) {
  return code < kDummy ? a * grad : 0.0f;
}

}  // namespace stdet
