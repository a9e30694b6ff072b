#!/usr/bin/env python3
"""PyTorch scaled_dot_product_attention, the baselines of the fused attention benchmark.

Runs causal bf16 SDPA through each of PyTorch's fused backends that the GPU supports: its
flash-attention kernels ("torch flash") and cuDNN's fused attention ("cudnn", the cuDNN
baseline; PyTorch < 2.3 runs its default backend only, "torch sdpa"), at head dim 128 with the sizes of tests/gpu/bench_cuda_ops.cpp (16k tokens
per call, B = 16k / T, H = 16) and prints rows in that program's table format, FLOPs counted the
same way (forward 4 B H D T^2 / 2 for the causal mask, backward 2.5 x the forward). Median of
event-timed runs after warm-up. scripts/gpu-check.sh runs it when torch is importable.

    scripts/bench_sdpa.py [--quick]
"""
import sys

import torch
import torch.nn.functional as F

try:  # PyTorch >= 2.3 selects backends this way; older ones get their default backend only
    from torch.nn.attention import SDPBackend, sdpa_kernel

    BACKENDS = [("torch flash", lambda: sdpa_kernel(SDPBackend.FLASH_ATTENTION)),
                ("cudnn", lambda: sdpa_kernel(SDPBackend.CUDNN_ATTENTION))]
except ImportError:
    import contextlib

    BACKENDS = [("torch sdpa", contextlib.nullcontext)]


def time_ms(fn, iters):
    for _ in range(2):
        fn()
    times = []
    for _ in range(iters):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop))
    return sorted(times)[len(times) // 2]


def main():
    quick = "--quick" in sys.argv[1:]
    h, d, tokens = 16, 128, 16384
    iters = 3 if quick else 10
    for t in [1024, 8192] if quick else [1024, 2048, 4096, 8192, 16384]:
        b = tokens // t
        # SDPA takes (B, H, T, D); the layout moeforge uses is (B, T, H, D), a transposed view.
        q, k, v = (torch.randn(b, t, h, d, device="cuda", dtype=torch.bfloat16).transpose(1, 2).requires_grad_()
                   for _ in range(3))
        flops = 4.0 * b * h * d * t * t / 2
        size = f"T={t} B={b} H=16 D=128"
        for name, backend in BACKENDS:
            try:
                with backend():
                    fwd = time_ms(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True), iters)
                    out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
                    dout = torch.randn_like(out)
                    bwd = time_ms(lambda: torch.autograd.grad(out, (q, k, v), dout, retain_graph=True), iters)
            except RuntimeError as e:  # the backend does not support this GPU or size
                print(f"{name + ' sdpa':<30} {size:<24} unavailable: {str(e).splitlines()[0][:60]}")
                continue
            print(f"{name + ' fwd bf16':<30} {size:<24} {fwd:10.3f} {flops / fwd / 1e9:12.1f} {'TFLOP/s':<8}")
            print(f"{name + ' bwd bf16':<30} {size:<24} {bwd:10.3f} {2.5 * flops / bwd / 1e9:12.1f} {'TFLOP/s':<8}")

if __name__ == "__main__":
    main()
