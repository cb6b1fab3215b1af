// harness_common.cuh -- included by harness_ok.cu with #include "..." (tests include-path handling).
#pragma once

#ifndef SCALE
#define SCALE 1
#endif

__constant__ float c_coeffs[4];

__device__ __forceinline__ float scaled(float v) { return SCALE * v; }
