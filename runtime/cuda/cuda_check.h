// The one way to call CUDA, cuBLAS(Lt) and to launch a kernel: a failed call throws
// moeforge::Error naming the statement, the library's error name and (via MOE_CHECK) the source
// location:
//   MOE_CUDA_CHECK(cudaMemsetAsync(p, 0, bytes, stream));
//   my_kernel<<<grid, block, 0, stream>>>(...); MOE_CUDA_LAUNCH_CHECK("my_kernel");
#pragma once

#include <cublasLt.h>
#include <cuda_runtime.h>

#include "runtime/error.h"

#define MOE_CUDA_CHECK(stmt)                                                                                   \
  do {                                                                                                         \
    const cudaError_t moe_cuda_status_ = (stmt);                                                               \
    MOE_CHECK(moe_cuda_status_ == cudaSuccess, "CUDA error {} ({}) in `{}`", cudaGetErrorName(moe_cuda_status_), \
              cudaGetErrorString(moe_cuda_status_), #stmt);                                                    \
  } while (0)

#define MOE_CUBLAS_CHECK(stmt)                                                                           \
  do {                                                                                                   \
    const cublasStatus_t moe_cublas_status_ = (stmt);                                                    \
    MOE_CHECK(moe_cublas_status_ == CUBLAS_STATUS_SUCCESS, "cuBLAS error {} ({}) in `{}`",               \
              cublasLtGetStatusName(moe_cublas_status_), cublasLtGetStatusString(moe_cublas_status_), #stmt); \
  } while (0)

// After a <<<>>> launch: reports a bad launch configuration at once (the kernel's own faults
// surface at the next synchronising call).
#define MOE_CUDA_LAUNCH_CHECK(name)                                                                    \
  do {                                                                                                 \
    const cudaError_t moe_launch_status_ = cudaGetLastError();                                         \
    MOE_CHECK(moe_launch_status_ == cudaSuccess, "CUDA kernel {} failed to launch: {} ({})", (name),   \
              cudaGetErrorName(moe_launch_status_), cudaGetErrorString(moe_launch_status_));           \
  } while (0)

// The Tensor-level CUDA ops dispatch on their tensors' dtypes; a dtype their kernels do not
// implement (the catalog's checks normally reject it first) fails here, naming op and argument.
#define MOE_CUDA_CHECK_COMPUTE_DTYPE(op, arg, t)                                                              \
  MOE_CHECK((t).dtype() == ::moeforge::DType::kF32 || (t).dtype() == ::moeforge::DType::kBF16,               \
            "{}: the CUDA kernel takes {} as f32 or bf16, got {}", (op), (arg), (t).str())
#define MOE_CUDA_CHECK_SAME_DTYPE(op, arg, t, ref_arg, ref)                                                   \
  MOE_CHECK((t).dtype() == (ref).dtype(), "{}: the CUDA kernel needs {} with the dtype of {} ({}), got {}", \
            (op), (arg), (ref_arg), (ref).str(), (t).str())
