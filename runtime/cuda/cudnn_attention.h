// cuDNN's fused flash attention as a baseline beside our kernels: causal GQA attention forward
// (out and lse) and backward (dq, dk, dv) on bf16 q, k, v in our dense layout (q (B, T, H, D),
// k and v (B, T, Hkv, D), lse (B, H, T) f32), fp32 compute, with an optional sliding window.
// ops_flash_attention.cpp calls it when MOEFORGE_ATTENTION_KERNEL=cudnn or train.attention_kernel
// is CUDNN (runtime/cuda/attention_kernel.h). Built only with the CUDA backend and cuDNN 9
// (MOEFORGE_WITH_CUDNN).
//
// Approach: cuDNN's backend graph API (cudnnBackend* descriptors: tensors, operations, operation
// graph, heuristics mode A, engine config, execution plan, variant pack), with the graphs of
// runtime/cuda/cudnn_attention_graph.h: cuDNN's fused flash-attention pattern of matmuls,
// pointwise ops (scale, GEN_INDEX + CMP + BINARY_SELECT masks), reductions (softmax, stats) and
// reshapes, as cudnn-frontend builds it for cuDNN 9.19. Not the native
// CUDNN_BACKEND_OPERATION_SDPA_FWD/BWD_DESCRIPTOR: in 9.19 its attributes have no causal or
// diagonal-band mask (only a block mask; masks come through a score subgraph from 9.21, and
// cudnn-frontend itself uses the native operation for masked attention only from 9.21), so
// causal attention in 9.19 is the composite pattern.
//
// The stats output is our lse exactly (log-sum-exp of the scaled, masked scores, natural log),
// so either backward reads the lse either forward wrote.
//
// Not supported, each an Error naming the op and the reason, never a silent fallback: packed
// variable-length sequences (cu_seqlens; the graphs take dense tensors only), head dims that are
// not a multiple of 8 up to 128, a backward with T = 1, pointers not 16-byte aligned, cuDNN
// older than 9.6 or 9.10.0/9.10.1 (known SDPA bugs), and problems for which cuDNN's heuristics
// find no engine.
//
// Plans: the finalized execution plan of each (B, T, H, Hkv, D, window, direction, device) is
// built once and kept for the life of the process (like the DeviceContext of device.h), so a
// training step rebuilds nothing; the scale is a by-value input of each execution. One cuDNN
// handle per device runs on the device's compute stream. Workspace and the backward's fp32
// scratch are allocated per call from the stream-ordered caching allocator. Thread-safe.
#pragma once

#include <cstddef>

#include "runtime/cuda/attention_plan.h"

namespace moeforge::cuda::cudnn_attention {

// Writes args.out and args.lse from args.q, k, v, scale. `op` names the caller in errors.
void forward(const char* op, const flash::Problem& p, const flash::FlashArgs& args, int device);
// Writes args.dq, dk, dv from args.q, k, v, out, lse, dout, scale.
void backward(const char* op, const flash::Problem& p, const flash::FlashArgs& args, int device);

// Builds the backend descriptors of p's graph (every tensor and operation) and finalizes its
// operation graph, without a device: cuDNN's own check of every attribute, dims and dtype. What a
// GPU adds is the engine that runs it. Throws an Error naming the descriptor cuDNN rejected.
void validate_graph(const flash::Problem& p, bool backward);

// Finalized plans held (tests check that a second call with the same sizes builds none).
size_t cached_plans();

}  // namespace moeforge::cuda::cudnn_attention
