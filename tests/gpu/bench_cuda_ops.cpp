// Benchmark (a program, not a test) of the CUDA backend on one device: device-to-device copy
// bandwidth (the yardstick), cuBLASLt GEMM TFLOP/s in bf16 (all four transpose combinations) and
// fp32 (and bf16 on the fp32 shape), the memory-bound ops' effective GB/s in fp32 and in bf16 (bytes each op must read and write, over its time)
// as a fraction of the copy (routing: the fused gating with the losses' statistics, the fused
// router backward, the counting-sort plan, permute and unpermute both ways), and the fused bf16
// attention's TFLOP/s for T = 1k..16k (our mma.sync and wgmma kernels, and cuDNN's fused
// attention beside them when built with cuDNN). Inputs are random (token ids spread over the
// vocabulary); times are medians of event-timed runs on the compute stream after warm-up. Prints one table;
// scripts/gpu-check.sh runs it.
//
//   bench_cuda_ops [--quick]
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <string>
#include <vector>

#include "runtime/cuda/adamw.h"
#include "runtime/cuda/attention_kernel.h"
#include "runtime/cuda/device.h"
#include "runtime/cuda/device_alloc.h"
#include "runtime/cuda/kernels.h"
#include "runtime/ops.h"

namespace moeforge {
namespace {

const Device kGpu = Device::cuda(0);

Tensor filled(const Shape& s, float v, DType dtype = DType::kF32) {
  Tensor t = Tensor::empty(s, dtype, kGpu);
  ops::fill(t, v);
  return t;
}

// Inputs: uniform in [-scale, scale) from a per-tensor seed (splitmix64), made on the host and
// copied over. Constant inputs would make every router score tie (all tokens to the same
// experts) and let the GPU run cooler than on real data.
Tensor random(const Shape& s, uint64_t seed, float scale, DType dtype = DType::kF32) {
  std::vector<float> v(static_cast<size_t>(s.numel()));
  uint64_t x = seed * 0x9E3779B97F4A7C15ull + 1;
  for (float& f : v) {
    uint64_t z = (x += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z ^= z >> 31;
    f = scale * (2.0f * static_cast<float>(z >> 40) / static_cast<float>(1 << 24) - 1.0f);
  }
  const Tensor host = Tensor::from_floats(s, v);
  return (dtype == DType::kF32 ? host : host.to(dtype)).to_device(kGpu);
}

// n token ids spread over [0, vocab) (a multiplicative hash: every row of the table is read).
Tensor spread_ids(int64_t n, int64_t vocab) {
  std::vector<int32_t> v(static_cast<size_t>(n));
  for (size_t i = 0; i < v.size(); ++i) v[i] = static_cast<int32_t>((i * 2654435761u >> 5) % static_cast<uint64_t>(vocab));
  return Tensor::from_ints({n}, v).to_device(kGpu);
}

// Median milliseconds of fn over `iters` timed runs after 2 warm-up runs.
double time_ms(const std::function<void()>& fn, int iters) {
  const cudaStream_t s = cuda::stream(0);
  for (int i = 0; i < 2; ++i) fn();
  std::vector<double> ms;
  for (int i = 0; i < iters; ++i) {
    cuda::Event start(true), stop(true);
    start.record(s);
    fn();
    stop.record(s);
    stop.synchronize();
    ms.push_back(stop.elapsed_ms(start));
  }
  std::sort(ms.begin(), ms.end());
  return ms[ms.size() / 2];
}

struct Row {
  std::string name, size;
  double ms, rate;
  const char* unit;
  double of_copy;  // fraction of the copy bandwidth, < 0 when not a bandwidth
};

}  // namespace
}  // namespace moeforge

int main(int argc, char** argv) {
  using namespace moeforge;
  const bool quick = argc > 1 && std::strcmp(argv[1], "--quick") == 0;
  if (cuda::device_count() == 0) {
    std::printf("bench_cuda_ops: no CUDA device\n");
    return 1;
  }
  const int iters = quick ? 5 : 20;
  std::vector<Row> rows;
  cudaDeviceProp prop{};
  cudaGetDeviceProperties(&prop, 0);

  // ---- copy: the bandwidth yardstick ----
  const int64_t copy_n = int64_t{1} << 28;  // 1 GiB of f32
  double copy_gbs = 0;
  {
    const Tensor a = filled({copy_n}, 1.0f), b = filled({copy_n}, 0.0f);
    const double ms = time_ms([&] { ops::copy(a, b); }, iters);
    copy_gbs = 2.0 * a.nbytes() / ms / 1e6;
    rows.push_back({"d2d copy", "1 GiB", ms, copy_gbs, "GB/s", 1.0});
  }
  const auto bandwidth = [&](const std::string& name, const std::string& size, double bytes,
                             const std::function<void()>& fn) {
    const double ms = time_ms(fn, iters);
    const double gbs = bytes / ms / 1e6;
    rows.push_back({name, size, ms, gbs, "GB/s", gbs / copy_gbs});
  };

  // ---- GEMM ----
  {
    const int64_t n = quick ? 4096 : 8192;
    const Tensor a = random({n, n}, 1, 1.0f, DType::kBF16), b = random({n, n}, 2, 1.0f, DType::kBF16);
    const Tensor c = filled({n, n}, 0.0f, DType::kBF16);
    for (int t = 0; t < 4; ++t) {
      const bool ta = t & 1, tb = t & 2;
      const double ms = time_ms([&] { cuda::gemm(a, ta, b, tb, c, false, 1.0f); }, iters);
      rows.push_back({std::string("gemm bf16 ") + (ta ? "T" : "N") + (tb ? "T" : "N"),
                      std::to_string(n) + "^3", ms, 2.0 * n * n * n / ms / 1e9, "TFLOP/s", -1});
    }
    const int64_t m = 4096;
    const Tensor af = random({m, m}, 3, 1.0f), bf = random({m, m}, 4, 1.0f), cf = filled({m, m}, 0.0f);
    const double ms = time_ms([&] { ops::gemm(af, false, bf, false, cf); }, iters);
    rows.push_back({"gemm fp32 NN", "4096^3", ms, 2.0 * m * m * m / ms / 1e9, "TFLOP/s", -1});
    // bf16 on the fp32 row's shape, into bf16 and into f32 (the router's logits).
    const Tensor ab = random({m, m}, 5, 1.0f, DType::kBF16), bb = random({m, m}, 6, 1.0f, DType::kBF16);
    const Tensor cb = filled({m, m}, 0.0f, DType::kBF16);
    const double ms16 = time_ms([&] { ops::gemm(ab, false, bb, false, cb); }, iters);
    rows.push_back({"gemm bf16 NN -> bf16", "4096^3", ms16, 2.0 * m * m * m / ms16 / 1e9, "TFLOP/s", -1});
    const double ms32 = time_ms([&] { ops::gemm(ab, false, bb, false, cf); }, iters);
    rows.push_back({"gemm bf16 NN -> f32", "4096^3", ms32, 2.0 * m * m * m / ms32 / 1e9, "TFLOP/s", -1});
  }

  // ---- memory-bound ops ----
  const int64_t n = quick ? 4096 : 16384, c = 4096;
  {
    const Tensor x = random({n, c}, 7, 1.0f), w = random({c}, 8, 1.0f), out = filled({n, c}, 0.0f), rstd = filled({n}, 0.0f);
    bandwidth("rmsnorm_fwd", "16k x 4096", 2.0 * x.nbytes(), [&] { ops::rmsnorm_fwd(x, w, 1e-5f, out, rstd); });
    const Tensor dx = filled({n, c}, 0.0f), dw = filled({c}, 0.0f);
    bandwidth("rmsnorm_bwd", "16k x 4096", 4.0 * x.nbytes(), [&] { ops::rmsnorm_bwd(x, w, rstd, out, dx, dw); });
    bandwidth("swiglu_fwd", "16k x 4096", 3.0 * x.nbytes(), [&] { ops::swiglu_fwd(x, out, dx); });
    const Tensor q = x.reshape({n / 512, 512, 32, 128});
    bandwidth("rope_fwd (in place)", "16k x 32 x 128", 2.0 * x.nbytes(), [&] { ops::rope_fwd(q, 10000.0f, q); });
    const Tensor ids = spread_ids(n, 32768), table = random({32768, c}, 18, 1.0f);
    bandwidth("embedding_fwd", "16k x 4096", 2.0 * out.nbytes(), [&] { ops::embedding_fwd(ids, table, out); });
    // The router (fused_router.cu) at DeepSeek-V3's size: E = 256, k = 8; reads logits, writes
    // probs (and the small weights and ids); the backward reads logits and dprobs, writes dlogits.
    {
      const int64_t e = 256;
      const int kr = 8;
      const Tensor logits = random({n, e}, 9, 3.0f), probs = filled({n, e}, 0.0f);
      const Tensor rw = filled({n, kr}, 0.0f), rex = filled({n, kr}, 0.0f, DType::kI32);
      bandwidth("router_fwd sigmoid", "16k x 256, k=8", 2.0 * logits.nbytes() + rw.nbytes() + rex.nbytes(),
                [&] { ops::router_fwd(logits, ops::Gating::kSigmoidTopK, kr, Tensor(), rw, rex, probs); });
      ops::router_fwd(logits, ops::Gating::kSoftmaxTopK, kr, Tensor(), rw, rex, probs);
      const Tensor dlogits = filled({n, e}, 0.0f);
      bandwidth("router_bwd softmax", "16k x 256, k=8", 3.0 * logits.nbytes() + 2.0 * rw.nbytes(),
                [&] { ops::router_bwd(logits, ops::Gating::kSoftmaxTopK, rex, rw, probs, dlogits); });
    }
    // Routing at DeepSeek-V3's shape (E = 256, k = 8): the fused gating with the losses'
    // statistics and the fused backward with both loss terms (bytes as above, plus the lse).
    {
      const int64_t e = 256;
      const int kr = 8;
      const Tensor logits = random({n, e}, 10, 3.0f), probs = filled({n, e}, 0.0f), dlogits = filled({n, e}, 0.0f);
      const Tensor rw = filled({n, kr}, 0.0f), rex = filled({n, kr}, 0.0f, DType::kI32);
      const ops::RouterStats st = ops::RouterStats::allocate(n, e, kGpu);
      bandwidth("router_fwd_with_stats softmax", "16k x 256, k=8",
                2.0 * logits.nbytes() + rw.nbytes() + rex.nbytes() + st.lse.nbytes(),
                [&] { ops::router_fwd_with_stats(logits, ops::Gating::kSoftmaxTopK, kr, Tensor(), rw, rex, probs, st); });
      ops::RouterLossGrads terms;
      terms.counts = st.selected;
      terms.k = kr;
      terms.aux_scale = 0.01f;
      terms.lse = st.lse;
      terms.z_scale = 0.001f;
      terms.num_tokens = n;
      bandwidth("router_bwd_fused (aux + z)", "16k x 256, k=8",
                2.0 * logits.nbytes() + 2.0 * rw.nbytes() + st.lse.nbytes(),
                [&] { ops::router_bwd_fused(logits, ops::Gating::kSoftmaxTopK, rex, rw, Tensor(), terms, dlogits); });
    }
    // The dispatch plan (counting sort) and the row gathers. Bytes = bytes read + written: the
    // plan reads the ids and writes the positions; permute reads each token row once and writes
    // its k copies; unpermute reads the k copies and writes the token row (+ weights, positions);
    // the backwards the same with the roles swapped (unpermute_bwd also reads y and writes dy).
    for (const int64_t kk : {int64_t{2}, int64_t{8}}) {
      const int ne = kk == 2 ? 8 : 256;
      const int64_t cc = kk == 2 ? c : 2048;
      const std::string tag = std::to_string(n / 1024) + "k x " + std::to_string(kk) + " -> " + std::to_string(ne);
      std::vector<int32_t> route_ids(static_cast<size_t>(n * kk));
      for (size_t i = 0; i < route_ids.size(); ++i) route_ids[i] = static_cast<int32_t>((i * 2654435761u >> 7) % ne);
      const Tensor ex = Tensor::from_ints({n, kk}, route_ids).to_device(kGpu);
      const Tensor pos = Tensor::empty({n, kk}, DType::kI32, kGpu), off = Tensor::empty({ne + 1}, DType::kI64, kGpu);
      bandwidth("moe_plan", tag, 2.0 * ex.nbytes(), [&] { ops::moe_plan(ex, ne, pos, off); });
      const Tensor xt = random({n, cc}, 11, 1.0f), xc = filled({n * kk, cc}, 0.0f), dxc = filled({n * kk, cc}, 0.0f);
      const Tensor wts = filled({n, kk}, 0.5f), ot = filled({n, cc}, 0.0f), dwts = filled({n, kk}, 0.0f);
      const double tok = xt.nbytes(), copies = xc.nbytes(), idx = pos.nbytes();
      const std::string size = tag + " x " + std::to_string(cc);
      bandwidth("moe_permute_fwd", size, tok + copies + idx, [&] { ops::moe_permute_fwd(xt, pos, xc); });
      bandwidth("moe_permute_bwd", size, copies + tok + idx, [&] { ops::moe_permute_bwd(xc, pos, ot); });
      bandwidth("moe_unpermute_fwd", size, copies + tok + idx + wts.nbytes(),
                [&] { ops::moe_unpermute_fwd(xc, pos, wts, ot); });
      bandwidth("moe_unpermute_bwd", size, 2.0 * copies + tok + idx + 2.0 * wts.nbytes(),
                [&] { ops::moe_unpermute_bwd(xc, pos, wts, xt, dxc, dwts); });
    }
  }
  // ---- the same memory-bound ops in bf16 (mixed precision's activations; bytes at 2 per element) ----
  {
    const DType h = DType::kBF16;
    const Tensor x = random({n, c}, 19, 1.0f, h), w = random({c}, 20, 1.0f, h), out = filled({n, c}, 0.0f, h);
    const Tensor rstd = filled({n}, 0.0f), dx = filled({n, c}, 0.0f, h), dw = filled({c}, 0.0f);
    const Tensor x32 = filled({n, c}, 0.0f);
    const std::string size = "16k x 4096 bf16";
    bandwidth("cast f32 -> bf16", size, 6.0 * n * c, [&] { ops::cast(x32, out); });
    bandwidth("add bf16", size, 3.0 * x.nbytes(), [&] { ops::add(x, out, dx); });
    bandwidth("add_ f32 += bf16", size, 2.0 * x32.nbytes() + x.nbytes(), [&] { ops::add_(x32, x, 1.0f); });
    bandwidth("rmsnorm_fwd bf16", size, 2.0 * x.nbytes(), [&] { ops::rmsnorm_fwd(x, w, 1e-5f, out, rstd); });
    bandwidth("rmsnorm_bwd bf16 (dw f32)", size, 4.0 * x.nbytes(), [&] { ops::rmsnorm_bwd(x, w, rstd, out, dx, dw); });
    bandwidth("swiglu_fwd bf16", size, 3.0 * x.nbytes(), [&] { ops::swiglu_fwd(x, out, dx); });
    const Tensor q = x.reshape({n / 512, 512, 32, 128});
    bandwidth("rope_fwd bf16 (in place)", size, 2.0 * x.nbytes(), [&] { ops::rope_fwd(q, 10000.0f, q); });
    const Tensor ids = spread_ids(n, 32768), table = random({32768, c}, 21, 1.0f, h);
    bandwidth("embedding_fwd bf16", size, 2.0 * out.nbytes(), [&] { ops::embedding_fwd(ids, table, out); });
    const Tensor pos = Tensor::empty({n, 2}, DType::kI32, kGpu), off = Tensor::empty({9}, DType::kI64, kGpu);
    std::vector<int32_t> route_ids(static_cast<size_t>(n * 2));
    for (size_t i = 0; i < route_ids.size(); ++i) route_ids[i] = static_cast<int32_t>((i * 2654435761u >> 7) % 8);
    ops::moe_plan(Tensor::from_ints({n, 2}, route_ids).to_device(kGpu), 8, pos, off);
    const Tensor xc = filled({n * 2, c}, 0.0f, h);
    bandwidth("moe_permute_fwd bf16 k=2", size, x.nbytes() + xc.nbytes() + pos.nbytes(),
              [&] { ops::moe_permute_fwd(x, pos, xc); });
    const Tensor wts = filled({n, 2}, 0.5f);
    bandwidth("moe_unpermute_fwd bf16 k=2", size, xc.nbytes() + out.nbytes() + pos.nbytes() + wts.nbytes(),
              [&] { ops::moe_unpermute_fwd(xc, pos, wts, out); });
    // The grouped expert GEMM (8 experts of 2k rows each; the fp32-style tiled kernel, templated).
    const int64_t cin = 2048, cout = 2048;
    std::vector<int64_t> offs(9);
    for (int i = 0; i <= 8; ++i) offs[i] = i * (n / 8);
    Tensor offsets = Tensor::empty({9}, DType::kI64);
    std::memcpy(offsets.raw_data(), offs.data(), sizeof(int64_t) * offs.size());
    const Tensor goff = offsets.to_device(kGpu);
    for (const DType dt : {DType::kF32, DType::kBF16}) {
      const Tensor gx = random({n, cin}, 22, 1.0f, dt), gw = random({8, cout, cin}, 23, 0.05f, dt);
      const Tensor gy = filled({n, cout}, 0.0f, dt);
      const double ms = time_ms([&] { ops::grouped_gemm_fwd(gx, gw, goff, gy); }, iters);
      rows.push_back({std::string("grouped_gemm_fwd ") + dtype_name(dt), "16k x 2048 x 2048, E=8", ms,
                      2.0 * n * cin * cout / ms / 1e9, "TFLOP/s", -1});
    }
  }
  {
    const int64_t rows_ce = quick ? 1024 : 4096, v = 32768;
    const Tensor logits16 = random({rows_ce, v}, 24, 3.0f, DType::kBF16), targets16 = spread_ids(rows_ce, v);
    const Tensor losses16 = filled({rows_ce}, 0.0f), lse16 = filled({rows_ce}, 0.0f);
    bandwidth("cross_entropy_fwd bf16", "4k x 32k", logits16.nbytes(),
              [&] { ops::cross_entropy_fwd(logits16, targets16, losses16, lse16); });
    bandwidth("cross_entropy_bwd bf16 (in place)", "4k x 32k", 2.0 * logits16.nbytes(),
              [&] { ops::cross_entropy_bwd(logits16, targets16, lse16, 1.0f, logits16); });
  }
  {
    const int64_t rows_ce = quick ? 1024 : 4096, v = 32768;
    const Tensor logits = random({rows_ce, v}, 25, 3.0f), targets = spread_ids(rows_ce, v);
    const Tensor losses = filled({rows_ce}, 0.0f), lse = filled({rows_ce}, 0.0f);
    bandwidth("cross_entropy_fwd", "4k x 32k", logits.nbytes(), [&] { ops::cross_entropy_fwd(logits, targets, losses, lse); });
    bandwidth("cross_entropy_bwd (in place)", "4k x 32k", 2.0 * logits.nbytes(),
              [&] { ops::cross_entropy_bwd(logits, targets, lse, 1.0f, logits); });
  }
  {
    const int64_t params = quick ? int64_t{1} << 24 : int64_t{1} << 27;
    std::vector<cuda::AdamWEntry> entries;
    for (int i = 0; i < 8; ++i) {
      const Shape s{params / 8};
      entries.push_back({filled(s, 0.1f), filled(s, 0.01f), filled(s, 0.0f), filled(s, 0.0f),
                         filled(s, 0.0f, DType::kBF16), true});
    }
    const cuda::AdamWCoefficients coef{0.9999f, 0.9f, 0.1f, 0.95f, 0.05f, 1e-4f, 0.2f, 1e-8f};
    // reads p, g, m, v; writes p, m, v (f32) and the bf16 copy
    bandwidth("adamw (multi-tensor)", std::to_string(params >> 20) + "M params", params * (7.0 * 4 + 2),
              [&] { cuda::adamw_step(entries, coef); });
  }
  {
    const int64_t t = quick ? 512 : 1024;
    const Tensor q = random({1, t, 16, 128}, 12, 1.0f), kv = random({1, t, 4, 128}, 13, 1.0f);
    const Tensor out = filled({1, t, 16, 128}, 0.0f), lse = filled({1, 16, t}, 0.0f);
    const double ms = time_ms([&] { ops::attention_fwd(q, kv, kv, 0.088f, out, lse); }, quick ? 3 : 5);
    const double flops = 4.0 * 16 * 128 * t * t / 2;  // causal: half the score matrix
    rows.push_back({"attention_fwd (plain fp32)", "T=" + std::to_string(t) + " H=16/4 D=128", ms, flops / ms / 1e9,
                    "TFLOP/s", -1});
  }

  {
    // The fused bf16 attention (flash_attention*.cu) at head dim 128, 16k tokens per call (B = 16k
    // / T), H = Hkv = 16 as scripts/bench_sdpa.py runs PyTorch's SDPA. FLOPs as FlashAttention
    // counts them: forward 4 B H D T^2, halved for the causal mask; backward 2.5 x the forward.
    const int64_t h = 16, d = 128, tokens = 16384;
#if MOEFORGE_WITH_SM90_ATTENTION
    const bool wgmma = prop.major == 9 && prop.minor == 0;
#else
    const bool wgmma = false;
#endif
    // Random inputs made once: every T has the same number of tokens, so each is a view of these.
    const Tensor q_all = random({tokens, h, d}, 14, 1.0f, DType::kBF16), k_all = random({tokens, h, d}, 15, 1.0f, DType::kBF16);
    const Tensor v_all = random({tokens, h, d}, 16, 1.0f, DType::kBF16), dout_all = random({tokens, h, d}, 17, 0.1f, DType::kBF16);
    for (const int64_t t : quick ? std::vector<int64_t>{1024, 8192} : std::vector<int64_t>{1024, 2048, 4096, 8192, 16384}) {
      const int64_t b = tokens / t;
      const Shape qs{b, t, h, d};
      const Tensor q = q_all.reshape(qs), k = k_all.reshape(qs);
      const Tensor v = v_all.reshape(qs), out = filled(qs, 0.0f, DType::kBF16);
      const Tensor lse = filled({b, h, t}, 0.0f), dout = dout_all.reshape(qs);
      const Tensor dq = filled(qs, 0.0f, DType::kBF16), dk = filled(qs, 0.0f, DType::kBF16);
      const Tensor dv = filled(qs, 0.0f, DType::kBF16);
      const double flops = 4.0 * b * h * d * t * t / 2;
      const std::string size = "T=" + std::to_string(t) + " B=" + std::to_string(b) + " H=16 D=128";
      // Each kernel kind the device runs (MOEFORGE_ATTENTION_KERNEL): mma.sync everywhere, wgmma
      // on compute capability 9.0 when built, and cuDNN's fused attention (the baseline) when
      // built with cuDNN; the first timed warm-up builds cuDNN's plan.
      std::vector<const char*> kernels{"mma"};
      if (wgmma) kernels.push_back("wgmma");
      if (cuda::cudnn_attention_built()) kernels.push_back("cudnn");
      for (const char* kernel : kernels) {
        setenv("MOEFORGE_ATTENTION_KERNEL", kernel, 1);
        // A size cuDNN cannot run (no engine) is reported and skipped: the baseline's gaps must not
        // cost the rest of the table. Our kernels failing stays fatal.
        try {
          const double fwd = time_ms([&] { ops::attention_fwd(q, k, v, 0.088f, out, lse); }, quick ? 3 : 10);
          rows.push_back({std::string("flash attn fwd bf16 ") + kernel, size, fwd, flops / fwd / 1e9, "TFLOP/s", -1});
          const double bwd =
              time_ms([&] { ops::attention_bwd(q, k, v, out, lse, dout, 0.088f, dq, dk, dv); }, quick ? 3 : 10);
          rows.push_back({std::string("flash attn bwd bf16 ") + kernel, size, bwd, 2.5 * flops / bwd / 1e9,
                          "TFLOP/s", -1});
        } catch (const Error& e) {
          if (std::strcmp(kernel, "cudnn") != 0) throw;
          std::fprintf(stderr, "bench_cuda_ops: no cuDNN attention row for %s: %s\n", size.c_str(), e.what());
        }
      }
      unsetenv("MOEFORGE_ATTENTION_KERNEL");
    }
  }

  std::printf("\nCUDA backend benchmark on %s (%d SMs)%s\n", prop.name, prop.multiProcessorCount,
              quick ? " [quick]" : "");
  std::printf("%-34s %-24s %10s %12s %-8s %8s\n", "op", "size", "ms", "rate", "unit", "of copy");
  for (const Row& r : rows) {
    char frac[16] = "";
    if (r.of_copy >= 0) std::snprintf(frac, sizeof(frac), "%.0f%%", 100.0 * r.of_copy);
    std::printf("%-34s %-24s %10.3f %12.1f %-8s %8s\n", r.name.c_str(), r.size.c_str(), r.ms, r.rate, r.unit, frac);
  }
  return 0;
}
