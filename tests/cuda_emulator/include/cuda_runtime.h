// A host-only stand-in for the CUDA runtime, so that bnkernels' kernels (csrc/) run on the CPU
// in tests on machines without a GPU (BNK_CPU_EMULATION; built by tests/cuda_emulator).
// Every CUDA thread is a coroutine (emu.h): barriers, warp shuffles, shared memory and the
// cooperative grid barrier keep their semantics, the memory is the CPU's. It checks the
// kernels' logic (indexing, reductions, merges, noise), not GPU performance or memory-model
// subtleties.
#pragma once

#include <math.h>

#include <cstddef>
#include <cstdint>
#include <cstring>

#define CUDART_VERSION 13000

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)

struct dim3 {
  unsigned x, y, z;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct alignas(8) uint2 { unsigned x, y; };
struct alignas(16) uint4 { unsigned x, y, z, w; };

enum cudaError_t {
  cudaSuccess = 0,
  cudaErrorLaunchFailure = 4,
  cudaErrorCooperativeLaunchTooLarge = 720,
  cudaErrorNotPermitted = 800,
  cudaErrorNotSupported = 801
};
struct CUstream_st;
typedef CUstream_st* cudaStream_t;
enum cudaDeviceAttr { cudaDevAttrMultiProcessorCount = 16, cudaDevAttrCooperativeLaunch = 95 };
enum cudaStreamCaptureStatus { cudaStreamCaptureStatusNone = 0 };

#include "emu.h"

inline cudaError_t cudaGetLastError() { return cudaSuccess; }
inline const char* cudaGetErrorString(cudaError_t e) {
  return e == cudaSuccess ? "no error" : "emulated launch failure";
}
inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int) {
  *value = attr == cudaDevAttrMultiProcessorCount ? emu::num_sms() : 1;
  return cudaSuccess;
}
template <class K>
cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* n, K, int, size_t) {
  *n = emu::blocks_per_sm();
  return cudaSuccess;
}
inline cudaError_t cudaStreamIsCapturing(cudaStream_t, cudaStreamCaptureStatus* s) {
  *s = cudaStreamCaptureStatusNone;
  return cudaSuccess;
}

#define threadIdx (::emu::self().tid)
#define blockIdx (::emu::self().bid)
#define blockDim (::emu::run().block)
#define gridDim (::emu::run().grid)

inline void __syncthreads() { emu::barrier(emu::kBlock); }
template <class T> T __shfl_down_sync(unsigned, T v, int offset) {
  return emu::shfl_down(v, offset);
}
template <class T> T __ldg(const T* p) { return *p; }
template <class T> T __ldcg(const T* p) { return *p; }
// Blocks of an ordinary launch run one after another, and the memory is the CPU's: a fence
// has nothing to order, and an atomic is a plain read-modify-write.
inline void __threadfence() {}
inline unsigned atomicAdd(unsigned* p, unsigned v) {
  const unsigned old = *p;
  *p = old + v;
  return old;
}
inline float __fmul_rn(float a, float b) { return a * b; }  // built with -ffp-contract=off
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline double __dmul_rn(double a, double b) { return a * b; }
