// Expert-parallel token dispatch: the all-to-all dispatcher of models/token_dispatcher.h against
// an all-gather dispatcher (Megatron's AllGather dispatcher, the simple alternative) measured in
// the same run on the same routing (scripts/bench-ep.sh runs it on 4 ranks). A benchmark, not a
// test: it checks that both produce the same combined output (exits with an error otherwise)
// and prints times.
//
// One "step" here is what one MoE layer's token traffic costs in a training step: forward
// dispatch + combine, and backward's transposed pair, with identity experts (y = x) so only the
// movement of tokens is timed. Per rank: N tokens of width C, top-K of E experts, E / ep experts
// per rank, random routing.
//   all-to-all:  plan (moe_plan, count exchange), permute, all_to_all_v, regroup; and back.
//   all-gather:  all_gather tokens and routing (N*ep rows to every rank), pick the copies of the
//                local experts; combine by a weighted scatter-add into (N*ep, C) and a
//                reduce_scatter back to the owners of the tokens.
//
//   mpirun -np 4 bench_ep [tokens_per_rank] [dim] [experts] [top_k] [steps]
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <random>
#include <string>
#include <vector>

#include <fmt/format.h>

#include "models/token_dispatcher.h"
#include "parallel/mpi_runtime.h"
#include "parallel/process_grid.h"
#include "runtime/ops.h"
#include "runtime/rng.h"

using namespace moeforge;

namespace {

double now() { return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count(); }

double median(std::vector<double> v) {
  std::nth_element(v.begin(), v.begin() + v.size() / 2, v.end());
  return v[v.size() / 2];
}

struct Routing {
  Tensor experts;  // (N, K) i32, distinct per token
  Tensor weights;  // (N, K) f32
};

Routing random_routing(int64_t n, int k, int e, uint64_t seed) {
  Routing r{Tensor::empty({n, k}, DType::kI32), Tensor::empty({n, k}, DType::kF32)};
  std::mt19937_64 rng(seed);
  for (int64_t t = 0; t < n; ++t) {
    std::vector<int> ids(static_cast<size_t>(e));
    for (int i = 0; i < e; ++i) ids[static_cast<size_t>(i)] = i;
    for (int j = 0; j < k; ++j) {  // partial Fisher-Yates
      const int pick = j + static_cast<int>(rng() % static_cast<uint64_t>(e - j));
      std::swap(ids[static_cast<size_t>(j)], ids[static_cast<size_t>(pick)]);
      r.experts.data<int32_t>()[t * k + j] = ids[static_cast<size_t>(j)];
      r.weights.data<float>()[t * k + j] = 0.5f + 0.5f * static_cast<float>(rng() % 1000) / 1000.0f;
    }
  }
  return r;
}

// All-to-all: x (N, C) -> combined (N, C) with identity experts.
Tensor all_to_all_pass(Comm& ep, const Routing& r, int e, const Tensor& x) {
  const int64_t n = x.dim(0), c = x.dim(1), k = r.experts.dim(1);
  const Tensor positions = Tensor::empty({n, k}, DType::kI32);
  const Tensor offsets = Tensor::empty({e + 1}, DType::kI64);
  ops::moe_plan(r.experts, e, positions, offsets);
  const Tensor xp = Tensor::empty({n * k, c}, DType::kF32);
  ops::moe_permute_fwd(x, positions, xp);
  const DispatchPlan plan = plan_dispatch(ep, offsets);
  const Tensor local = to_experts(ep, plan, xp);  // the experts would run here
  const Tensor back = from_experts(ep, plan, local);
  const Tensor out = Tensor::empty({n, c}, DType::kF32);
  ops::moe_unpermute_fwd(back, positions, r.weights, out);
  return out;
}

// All-gather: every rank sees every token of the group and keeps the copies of its experts.
Tensor all_gather_pass(Comm& ep, const Routing& r, int e, const Tensor& x) {
  const int members = ep.size();
  const int64_t n = x.dim(0), c = x.dim(1), k = r.experts.dim(1), el = e / members, first = ep.rank() * el;
  const Tensor xs = Tensor::empty({n * members, c}, DType::kF32);
  const Tensor ids = Tensor::empty({n * members, k}, DType::kI32);
  const Tensor ws = Tensor::empty({n * members, k}, DType::kF32);
  ep.all_gather(x, xs);
  ep.all_gather(r.experts, ids);
  ep.all_gather(r.weights, ws);
  // Local copies as a dispatch with every other expert's copies dropped.
  const Tensor mine = Tensor::empty({n * members, k}, DType::kI32);
  for (int64_t i = 0; i < n * members * k; ++i) {
    const int32_t id = ids.data<int32_t>()[i];
    mine.data<int32_t>()[i] = id >= first && id < first + el ? static_cast<int32_t>(id - first) : -1;
  }
  const Tensor positions = Tensor::empty({n * members, k}, DType::kI32);
  const Tensor offsets = Tensor::empty({el + 1}, DType::kI64);
  ops::moe_plan(mine, static_cast<int>(el), positions, offsets);
  const Tensor local = Tensor::empty({offsets.data<int64_t>()[el], c}, DType::kF32);
  ops::moe_permute_fwd(xs, positions, local);  // the experts would run here
  const Tensor partial = Tensor::empty({n * members, c}, DType::kF32);
  ops::moe_unpermute_fwd(local, positions, ws, partial);
  const Tensor out = Tensor::empty({n, c}, DType::kF32);
  ep.reduce_scatter(partial, out);
  return out;
}

}  // namespace

int main(int argc, char** argv) {
  MpiRuntime mpi;
  try {
    const int64_t n = argc > 1 ? std::stoll(argv[1]) : 4096;
    const int64_t c = argc > 2 ? std::stoll(argv[2]) : 1024;
    const int e = argc > 3 ? std::stoi(argv[3]) : 8;
    const int k = argc > 4 ? std::stoi(argv[4]) : 2;
    const int steps = argc > 5 ? std::stoi(argv[5]) : 20;
    const int world = mpi.world_size();
    const ProcessGrid grid = ProcessGrid::create(mpi, ParallelSizes{.dp = world, .ep = world}, 300.0);
    Comm& ep = grid.ep();
    MOE_CHECK(e % world == 0, "bench_ep: {} experts do not split over {} ranks", e, world);

    const Routing r = random_routing(n, k, e, 1000 + static_cast<uint64_t>(grid.world_rank()));
    const Tensor x = Tensor::empty({n, c}, DType::kF32);
    init_normal(x, 7, fmt::format("x{}", grid.world_rank()), ShardSlice::whole(x.shape()), 1.0f);

    // Same answer from both (sums of the same terms; K copies may add in another order).
    const Tensor a = all_to_all_pass(ep, r, e, x), b = all_gather_pass(ep, r, e, x);
    double diff = 0.0;
    for (int64_t i = 0; i < a.numel(); ++i)
      diff = std::max(diff, static_cast<double>(std::abs(a.data<float>()[i] - b.data<float>()[i])));
    const Tensor worst = Tensor::from_floats({1}, std::vector<float>{static_cast<float>(diff)});
    ep.all_reduce(worst, ReduceOp::kMax);
    // A dispatcher that loses or misroutes a copy is not worth timing: stop with an error.
    MOE_CHECK(worst.data<float>()[0] <= 1e-5f, "bench_ep: the dispatchers disagree by {} (max |difference|)",
              worst.data<float>()[0]);

    // Alternate the two, forward + backward (the backward is the same movement transposed: one
    // more pass of each), and keep the slowest rank's time of each step.
    std::vector<double> t_a2a, t_ag;
    for (int s = 0; s < steps + 2; ++s) {
      for (int side = 0; side < 2; ++side) {
        ep.barrier();
        const double t0 = now();
        for (int pass = 0; pass < 2; ++pass) (side == 0 ? all_to_all_pass : all_gather_pass)(ep, r, e, x);
        const Tensor dt = Tensor::from_floats({1}, std::vector<float>{static_cast<float>(now() - t0)});
        ep.all_reduce(dt, ReduceOp::kMax);
        if (s >= 2) (side == 0 ? t_a2a : t_ag).push_back(dt.data<float>()[0]);
      }
    }
    if (grid.world_rank() == 0) {
      const double ma = median(t_a2a), mg = median(t_ag);
      const double bytes = static_cast<double>(n * k * c * 4);
      std::printf("EP dispatch + combine, forward and backward, %d ranks: %lld tokens/rank x dim %lld, top-%d of %d experts, "
                  "median of %d steps\n",
                  world, static_cast<long long>(n), static_cast<long long>(c), k, e, steps);
      std::printf("outputs agree: max |all-to-all - all-gather| = %.3g\n", worst.data<float>()[0]);
      std::printf("%-28s %10s %14s\n", "dispatcher", "ms/step", "copies GB/s");
      std::printf("%-28s %10.2f %14.2f\n", "all-to-all (moeforge)", 1e3 * ma, 4 * bytes / ma / 1e9);
      std::printf("%-28s %10.2f %14.2f\n", "all-gather (baseline)", 1e3 * mg, 4 * bytes / mg / 1e9);
      std::printf("speedup of all-to-all over all-gather: %.2fx\n", mg / ma);
    }
    return 0;
  } catch (const std::exception& ex) {
    mpi.abort(1, ex.what());
  }
}
