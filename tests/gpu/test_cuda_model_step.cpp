// The real model on the GPU against the same model on the CPU: MoeTransformer (GQA attention, top-2
// of 4 experts, optionally a dense first layer, capacity drops, a shared expert and the
// aux-loss-free bias) with the DistributedOptimizer's grad norm, clipping and AdamW, three
// training steps of two accumulated micro-batches each, in fp32 mode. Both models start from the
// registry's initialisation (the same numbers on both devices) and see the same batches; the
// losses (ce, aux, z, total), the grad norms and the expert loads of every step, and every
// parameter after the last, must agree: 1e-5 relative (normwise for tensors).
//
// This exercises everything the device path of the model touches: parameters and optimizer
// state allocated on the GPU, activations on the device of their inputs, ids copied to the device
// per micro-batch, the host reads of routing counts and losses, cuda::adamw_step through AdamW,
// sum_squares / scale_ for the norm, and the expert-bias update of a device tensor.
#include <gtest/gtest.h>

#include <cmath>
#include <ostream>
#include <string>
#include <vector>

#include "models/transformer.h"
#include "optim/distributed_optimizer.h"
#include "tests/gpu/gpu_testing.h"
#include "tests/testing.h"

namespace moeforge {
namespace {

using namespace gpu_testing;

constexpr int64_t kBatch = 2, kSeq = 16;
constexpr int kSteps = 3, kMicroBatches = 2;

struct Variant {
  std::string name;
  ModelConfig cfg;
};
// What ctest's discovered test names show of a variant.
void PrintTo(const Variant& v, std::ostream* os) { *os << v.name; }

ModelConfig base_config() {
  ModelConfig c;
  c.vocab_size = 61;
  c.dim = 32;
  c.n_layers = 2;
  c.n_heads = 4;
  c.n_kv_heads = 2;  // grouped-query attention
  c.head_dim = 8;
  c.n_experts = 4;
  c.top_k = 2;
  c.expert_hidden = 24;
  c.dense_hidden = 48;
  c.aux_loss_coef = 0.01f;
  c.z_loss_coef = 0.001f;
  // Larger than a training init: every gradient term is far from rounding noise and the router's
  // scores are well separated, so both devices pick the same experts.
  c.init_std = 0.2f;
  return c;
}

std::vector<Variant> variants() {
  std::vector<Variant> v;
  v.push_back({"moe_dropless", base_config()});
  ModelConfig d = base_config();
  d.n_dense_layers = 1;          // layer 0: dense SwiGLU FFN
  d.n_layers = 3;
  d.n_shared_experts = 1;
  d.capacity_factor = 1.0f;      // drops copies: the capacity ranking runs on the host
  d.expert_bias_update_rate = 0.01f;
  d.tie_embeddings = true;
  v.push_back({"dense_capacity_shared_bias_tied", d});
  return v;
}

// bf16 mixed precision: the GPU (cuBLASLt bf16 GEMMs, the fused bf16 attention, the other ops
// on widened copies) against the CPU reference in bf16 (every op widened), 1e-2.
std::vector<Variant> bf16_variants() {
  std::vector<Variant> v;
  for (Variant x : variants()) {
    x.name += "_bf16";
    x.cfg.compute_dtype = DType::kBF16;
    x.cfg.capacity_factor = 0.0f;  // a rounding-level score difference may move a copy over capacity
    v.push_back(x);
  }
  return v;
}

double rel(double got, double want) { return std::abs(got - want) / std::max(std::abs(want), 1e-30); }

struct Training {
  MoeTransformer model;
  DistributedOptimizer optimizer;
  Training(const ModelConfig& cfg, Device dev)
      : model(cfg, ProcessGrid::single(dev)),
        optimizer(model.registry(), ProcessGrid::single(dev), AdamWOptions{}, /*zero_stage=*/0) {}
};

// The same model and optimizer on the CPU and on the GPU, from the same initialisation.
struct TrainingPair {
  Training cpu, dev;
  explicit TrainingPair(const ModelConfig& cfg) : cpu(cfg, Device::cpu()), dev(cfg, gpu()) {
    cpu.model.registry().init(7);
    dev.model.registry().init(7);
  }
};

struct StepResult {
  LossReport loss;  // summed over the micro-batches
  double grad_norm = 0.0;
  std::vector<int64_t> load;
};

// One optimizer step: kMicroBatches forward/backward passes with loss scale 1/kMicroBatches, the
// grad norm with clipping at 1.0, one AdamW step, the expert-bias update from the step's loads.
StepResult train_step(Training& r, int step) {
  StepResult out;
  r.model.registry().zero_grad();
  r.model.reset_load();
  for (int mb = 0; mb < kMicroBatches; ++mb) {
    const uint64_t seed = 1000 + 10 * static_cast<uint64_t>(step) + static_cast<uint64_t>(mb);
    const int32_t V = static_cast<int32_t>(r.model.config().vocab_size);
    // Host batches, as the data loader gives them; one target is ignored (-1).
    const Tensor tokens = testing::random_ints({kBatch, kSeq}, seed, 0, V);
    const Tensor targets = testing::random_ints({kBatch, kSeq}, seed + 500, 0, V);
    targets.data<int32_t>()[3] = -1;
    const LossReport l = r.model.forward(tokens, targets);
    r.model.backward(1.0f / kMicroBatches);
    out.loss.loss += l.loss;
    out.loss.ce += l.ce;
    out.loss.aux += l.aux;
    out.loss.z += l.z;
    out.loss.targets += l.targets;
  }
  r.optimizer.reduce_gradients();
  out.grad_norm = r.optimizer.clip_grad_norm(1.0);
  r.optimizer.step(1e-3f);
  const Tensor load = r.model.load();
  EXPECT_TRUE(load.device().is_cpu()) << "the expert loads are host telemetry";
  r.model.update_expert_bias(load);
  const int64_t* l = load.data<int64_t>();
  out.load.assign(l, l + load.numel());
  return out;
}

class GpuModelStep : public ::testing::TestWithParam<Variant> {};

class GpuModelStepBf16 : public ::testing::TestWithParam<Variant> {};

TEST_P(GpuModelStepBf16, ThreeStepsMatchTheCpu) {
  MOE_REQUIRE_GPU();
  TrainingPair pair(GetParam().cfg);
  Training& cpu = pair.cpu;
  Training& dev = pair.dev;
  const auto& pc = cpu.model.registry().params();
  const auto& pg = dev.model.registry().params();
  for (size_t i = 0; i < pc.size(); ++i) {
    if (pc[i].spec.trainable) {
      ASSERT_EQ(pg[i].compute.dtype(), DType::kBF16) << pg[i].spec.name;
    }
  }
  for (int step = 1; step <= kSteps; ++step) {
    const StepResult c = train_step(cpu, step);
    const StepResult g = train_step(dev, step);
    SCOPED_TRACE("step " + std::to_string(step));
    EXPECT_LE(rel(g.loss.loss, c.loss.loss), kBF16Tol) << "loss " << g.loss.loss << " vs " << c.loss.loss;
    EXPECT_LE(rel(g.loss.ce, c.loss.ce), kBF16Tol) << "ce " << g.loss.ce << " vs " << c.loss.ce;
    EXPECT_LE(rel(g.grad_norm, c.grad_norm), kBF16Tol) << "grad norm " << g.grad_norm << " vs " << c.grad_norm;
  }
  for (size_t i = 0; i < pc.size(); ++i) {
    EXPECT_GPU_CLOSE(pg[i].value, pc[i].value, kBF16Tol) << " parameter " << pg[i].spec.name;
    if (pc[i].spec.trainable) {
      EXPECT_GPU_CLOSE(pg[i].compute, pc[i].compute, kBF16Tol) << " copy " << pg[i].spec.name;
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Models, GpuModelStepBf16, ::testing::ValuesIn(bf16_variants()),
                         [](const ::testing::TestParamInfo<Variant>& i) { return i.param.name; });

TEST_P(GpuModelStep, ThreeStepsMatchTheCpu) {
  MOE_REQUIRE_GPU();
  TrainingPair pair(GetParam().cfg);
  Training& cpu = pair.cpu;
  Training& dev = pair.dev;

  const auto& pc = cpu.model.registry().params();
  const auto& pg = dev.model.registry().params();
  ASSERT_EQ(pc.size(), pg.size());
  for (size_t i = 0; i < pc.size(); ++i) {
    ASSERT_TRUE(pg[i].value.device().is_cuda()) << pg[i].spec.name << " is not on the GPU";
    ASSERT_TRUE(pg[i].grad.device().is_cuda()) << pg[i].spec.name << " gradient is not on the GPU";
    // The initialisation is drawn on the host and copied: identical bits.
    EXPECT_EQ(rel_err(pg[i].value, pc[i].value), 0.0) << pg[i].spec.name << " initial value";
  }

  for (int step = 1; step <= kSteps; ++step) {
    const StepResult c = train_step(cpu, step);
    const StepResult g = train_step(dev, step);
    SCOPED_TRACE("step " + std::to_string(step));
    EXPECT_LE(rel(g.loss.loss, c.loss.loss), 1e-5) << "loss " << g.loss.loss << " vs " << c.loss.loss;
    EXPECT_LE(rel(g.loss.ce, c.loss.ce), 1e-5) << "ce " << g.loss.ce << " vs " << c.loss.ce;
    EXPECT_LE(rel(g.loss.aux, c.loss.aux), 1e-5) << "aux " << g.loss.aux << " vs " << c.loss.aux;
    EXPECT_LE(rel(g.loss.z, c.loss.z), 1e-5) << "z " << g.loss.z << " vs " << c.loss.z;
    EXPECT_EQ(g.loss.targets, c.loss.targets);
    EXPECT_LE(rel(g.grad_norm, c.grad_norm), 1e-5) << "grad norm " << g.grad_norm << " vs " << c.grad_norm;
    EXPECT_EQ(g.load, c.load) << "expert loads (routing) differ";
  }
  for (size_t i = 0; i < pc.size(); ++i) {
    EXPECT_GPU_CLOSE(pg[i].value, pc[i].value, kF32Tol) << " parameter " << pg[i].spec.name;
    EXPECT_GPU_CLOSE(pg[i].grad, pc[i].grad, 1e-4) << " last gradient of " << pg[i].spec.name;
  }
  // The optimizer state is on the device too, and agrees.
  for (size_t i = 0; i < pc.size(); ++i) {
    if (!pc[i].spec.trainable) continue;
    const std::string& name = pc[i].spec.name;
    ASSERT_TRUE(dev.optimizer.adamw().exp_avg(name).device().is_cuda()) << name;
    EXPECT_GPU_CLOSE(dev.optimizer.adamw().exp_avg(name), cpu.optimizer.adamw().exp_avg(name), 1e-4) << name;
    EXPECT_GPU_CLOSE(dev.optimizer.adamw().exp_avg_sq(name), cpu.optimizer.adamw().exp_avg_sq(name), 1e-4) << name;
  }
}

// The logits of a trained model (the generate path: host logits whatever the device).
TEST_P(GpuModelStep, LogitsMatchTheCpu) {
  MOE_REQUIRE_GPU();
  const ModelConfig& cfg = GetParam().cfg;
  MoeTransformer cpu(cfg, ProcessGrid::single());
  MoeTransformer dev(cfg, ProcessGrid::single(gpu()));
  cpu.registry().init(11);
  dev.registry().init(11);
  const Tensor tokens = testing::random_ints({kBatch, kSeq}, 77, 0, static_cast<int32_t>(cfg.vocab_size));
  const Tensor lc = cpu.logits(tokens);
  const Tensor lg = dev.logits(tokens);
  ASSERT_TRUE(lg.device().is_cpu());
  EXPECT_GPU_CLOSE(lg, lc, kF32Tol);
}

INSTANTIATE_TEST_SUITE_P(Models, GpuModelStep, ::testing::ValuesIn(variants()),
                         [](const ::testing::TestParamInfo<Variant>& i) { return i.param.name; });

}  // namespace
}  // namespace moeforge
