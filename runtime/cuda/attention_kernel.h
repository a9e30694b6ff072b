// Which kernel runs the fused bf16 attention (runtime/cuda/ops_flash_attention.cpp): our mma.sync
// kernels, our Hopper wgmma kernels, or cuDNN's fused attention (runtime/cuda/cudnn_attention.h,
// a baseline to measure ours against). Plain C++, compiled in every build, so that the choice's
// parsing and precedence are CPU-tested (tests/runtime/test_attention_kernel.cpp) and launch/ can
// set it without the CUDA backend.
//
// Precedence: the environment variable MOEFORGE_ATTENTION_KERNEL=mma|wgmma|cudnn (benchmarks,
// tests) overrides the process-wide setting, which the Trainer takes from train.attention_kernel
// (configs/moeforge.proto); kAuto in both is the default: wgmma where it can run, else mma. cuDNN
// is never chosen automatically.
//
// Why a process-wide setting: the op catalog's signatures carry no context (runtime/ops.h, like
// the per-device DeviceContext of device.h), and the choice it makes is the one the environment
// variable already made process-wide. It is written once, before training, and read by every
// attention call; reads and writes are thread-safe.
#pragma once

#include <string>
#include <string_view>

namespace moeforge::cuda {

enum class AttentionKernel { kAuto, kMma, kWgmma, kCudnn };

// "auto", "mma", "wgmma", "cudnn".
const char* attention_kernel_name(AttentionKernel kernel);

// A choice and where it came from, e.g. "MOEFORGE_ATTENTION_KERNEL=wgmma" or
// "train.attention_kernel: CUDNN": the error of a choice that cannot run names its origin.
struct AttentionKernelChoice {
  AttentionKernel kernel = AttentionKernel::kAuto;
  std::string origin;  // empty for kAuto
};

// The choice of an environment value: nullptr or "" is kAuto; "mma", "wgmma", "cudnn" select one;
// anything else throws Error "<op>: MOEFORGE_ATTENTION_KERNEL is '<value>', expected mma, wgmma or
// cudnn (or unset)".
AttentionKernelChoice parse_attention_kernel_env(const char* value, const char* op);

// The effective choice: the environment value when it selects a kernel, else `configured`.
AttentionKernelChoice resolve_attention_kernel(const char* env_value, const AttentionKernelChoice& configured,
                                               const char* op);

// The process-wide setting (kAuto until set).
void set_attention_kernel(AttentionKernelChoice choice);
AttentionKernelChoice attention_kernel_setting();

// The choice for one attention call: resolve_attention_kernel(getenv("MOEFORGE_ATTENTION_KERNEL"),
// attention_kernel_setting(), op).
AttentionKernelChoice attention_kernel_for(const char* op);

// Whether this build has the cuDNN attention (MOEFORGE_WITH_CUDNN: the CUDA backend with cuDNN 9
// found at configure time).
bool cudnn_attention_built();

}  // namespace moeforge::cuda
