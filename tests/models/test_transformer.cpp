// Tests models/transformer.cpp against an independent PyTorch implementation of the same model
// (tests/reference/moe_reference.py, gradients from torch autograd). Both sides load the same
// weights and batch; the loss must agree to 1e-5 relative and every parameter gradient to 1e-4
// (normwise relative), in fp32. Also: recomputation on and off give identical gradients.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "models/transformer.h"
#include "tests/testing.h"

namespace moeforge {
namespace {

namespace fs = std::filesystem;
using testing::random_ints;
using testing::read_npy;
using testing::rel_error;
using testing::to_double;
using testing::write_npy;

struct RefCase {
  std::string name;
  ModelConfig cfg;
  int64_t batch, seq;
};

ModelConfig base_config() {
  ModelConfig c;
  c.vocab_size = 37;
  c.dim = 32;
  c.n_layers = 2;
  c.n_heads = 4;
  c.n_kv_heads = 2;
  c.head_dim = 8;
  c.n_experts = 4;
  c.top_k = 2;
  c.expert_hidden = 24;
  c.rope_theta = 10000.0f;
  c.norm_eps = 1e-5f;
  c.aux_loss_coef = 0.01f;
  c.z_loss_coef = 0.001f;
  // Larger than a training init so that every term of the gradient is far from rounding noise
  // and router scores are well separated (top-k is stable between the two implementations).
  c.init_std = 0.2f;
  return c;
}

std::vector<RefCase> reference_cases() {
  std::vector<RefCase> cases;
  ModelConfig a = base_config();
  cases.push_back({"gqa_top2_no_shared", a, 2, 9});
  ModelConfig b = base_config();
  b.n_shared_experts = 1;
  cases.push_back({"gqa_top2_shared", b, 2, 9});
  ModelConfig c = base_config();
  c.n_layers = 3;
  c.n_experts = 6;
  c.top_k = 2;
  c.n_shared_experts = 2;
  c.n_heads = 6;
  c.n_kv_heads = 2;
  c.tie_embeddings = true;
  cases.push_back({"tied_6experts_2shared", c, 3, 17});
  ModelConfig d = base_config();
  d.gating = ops::Gating::kSigmoidTopK;
  d.top_k = 3;
  d.n_experts = 5;
  cases.push_back({"sigmoid_top3", d, 2, 11});
  // Attention masks: a window of 5 and documents started by token 3 (the test puts it at
  // positions 4 and 11 of every row, besides where the random tokens hold it).
  ModelConfig e = base_config();
  e.sliding_window = 5;
  e.document_start_token = 3;
  cases.push_back({"window5_documents", e, 2, 17});
  return cases;
}

nlohmann::json config_json(const ModelConfig& c) {
  return {{"vocab_size", c.vocab_size},
          {"dim", c.dim},
          {"n_layers", c.n_layers},
          {"n_heads", c.n_heads},
          {"n_kv_heads", c.n_kv_heads},
          {"head_dim", c.head_dim},
          {"n_experts", c.n_experts},
          {"top_k", c.top_k},
          {"expert_hidden", c.expert_hidden},
          {"n_shared_experts", c.n_shared_experts},
          {"gating", ops::gating_name(c.gating)},
          {"rope_theta", c.rope_theta},
          {"norm_eps", c.norm_eps},
          {"tie_embeddings", c.tie_embeddings},
          {"aux_loss_coef", c.aux_loss_coef},
          {"z_loss_coef", c.z_loss_coef},
          {"sliding_window", c.sliding_window},
          {"document_start_token", c.document_start_token}};
}

void PrintTo(const RefCase& c, std::ostream* os) { *os << c.name; }

class TransformerReference : public ::testing::TestWithParam<RefCase> {};

TEST_P(TransformerReference, LossAndGradientsMatchPyTorch) {
  const RefCase& rc = GetParam();
  MoeTransformer model(rc.cfg);
  model.registry().init(1234);
  const Tensor tokens = random_ints({rc.batch, rc.seq}, 7, 0, static_cast<int32_t>(rc.cfg.vocab_size));
  if (rc.cfg.document_start_token >= 0)
    for (int64_t b = 0; b < rc.batch; ++b)
      for (const int64_t t : {int64_t{4}, int64_t{11}})
        if (t < rc.seq) tokens.data<int32_t>()[b * rc.seq + t] = rc.cfg.document_start_token;
  Tensor targets = random_ints({rc.batch, rc.seq}, 8, 0, static_cast<int32_t>(rc.cfg.vocab_size));
  targets.data<int32_t>()[3] = -1;  // one ignored position

  const LossReport ours = model.forward(tokens, targets);
  const std::vector<Tensor> routing = model.last_routing();
  model.backward();

  const fs::path dir = fs::temp_directory_path() / ("moeforge_ref_" + rc.name + "_" + std::to_string(::getpid()));
  fs::remove_all(dir);
  fs::create_directories(dir / "params");
  std::ofstream(dir / "config.json") << config_json(rc.cfg).dump(2);
  write_npy(dir / "tokens.npy", tokens);
  write_npy(dir / "targets.npy", targets);
  for (const Param& p : model.registry().params()) write_npy(dir / "params" / (p.spec.name + ".npy"), p.value);

  const std::string cmd = "OMP_NUM_THREADS=2 /usr/bin/python3 " + testing::source_path("tests/reference/moe_reference.py") +
                          " --dir " + dir.string();
  ASSERT_EQ(std::system(cmd.c_str()), 0) << cmd;

  nlohmann::json ref;
  std::ifstream(dir / "torch" / "loss.json") >> ref;
  // Both implementations must have routed every token to the same experts; otherwise the
  // comparison below would be meaningless.
  ASSERT_EQ(ref["experts"].size(), routing.size());
  for (size_t l = 0; l < routing.size(); ++l) {
    const std::vector<int> want = ref["experts"][l].get<std::vector<int>>();
    const int32_t* got = routing[l].data<int32_t>();
    ASSERT_EQ(static_cast<int64_t>(want.size()), routing[l].numel());
    for (size_t i = 0; i < want.size(); ++i) ASSERT_EQ(got[i], want[i]) << "layer " << l << " copy " << i;
  }
  // The two fp32 implementations' router scores differ by ~1e-7; a gap between the last chosen
  // and the best unchosen score of 1e-5 or more cannot flip, so the routing match is not luck.
  EXPECT_GT(ref["min_margin"].get<double>(), 1e-5) << "routing too close to a tie for a stable comparison";

  const double want_loss = ref["loss"].get<double>();
  EXPECT_LE(std::abs(ours.loss - want_loss) / std::abs(want_loss), 1e-5) << ours.loss << " vs " << want_loss;
  EXPECT_LE(std::abs(ours.ce - ref["ce"].get<double>()) / ref["ce"].get<double>(), 1e-5);
  EXPECT_LE(std::abs(ours.aux - ref["aux"].get<double>()) / ref["aux"].get<double>(), 1e-5);
  EXPECT_LE(std::abs(ours.z - ref["z"].get<double>()) / ref["z"].get<double>(), 1e-5);

  for (const Param& p : model.registry().params()) {
    const Tensor want = read_npy(dir / "torch" / "grads" / (p.spec.name + ".npy"));
    ASSERT_EQ(want.shape(), p.grad.shape()) << p.spec.name;
    const double err = rel_error(p.grad, to_double(want));
    EXPECT_LE(err, 1e-4) << p.spec.name << " gradient differs from torch autograd";
  }
  fs::remove_all(dir);
}

INSTANTIATE_TEST_SUITE_P(Configs, TransformerReference, ::testing::ValuesIn(reference_cases()),
                         [](const ::testing::TestParamInfo<RefCase>& p) { return p.param.name; });

TEST(Transformer, RecomputationGivesIdenticalGradients) {
  ModelConfig cfg = base_config();
  cfg.n_shared_experts = 1;
  const Tensor tokens = random_ints({2, 13}, 3, 0, 37);
  const Tensor targets = random_ints({2, 13}, 4, 0, 37);

  MoeTransformer plain(cfg);
  plain.registry().init(99);
  const LossReport a = plain.forward(tokens, targets);
  plain.backward();

  cfg.recompute = true;
  MoeTransformer recompute(cfg);
  recompute.registry().init(99);
  const LossReport b = recompute.forward(tokens, targets);
  recompute.backward();

  EXPECT_EQ(a.loss, b.loss);
  for (const Param& p : plain.registry().params()) {
    const Param& q = recompute.registry().get(p.spec.name);
    const std::vector<float> ga = p.grad.to_floats(), gb = q.grad.to_floats();
    ASSERT_EQ(ga.size(), gb.size());
    for (size_t i = 0; i < ga.size(); ++i) ASSERT_EQ(ga[i], gb[i]) << p.spec.name << " element " << i;
  }
}

TEST(Transformer, GradientsAccumulateAcrossBackwardCalls) {
  const ModelConfig cfg = base_config();
  const Tensor tokens = random_ints({1, 8}, 3, 0, 37);
  const Tensor targets = random_ints({1, 8}, 4, 0, 37);
  MoeTransformer model(cfg);
  model.registry().init(5);
  model.forward(tokens, targets);
  model.backward();
  std::vector<std::vector<float>> once;
  for (const Param& p : model.registry().params()) once.push_back(p.grad.to_floats());
  model.forward(tokens, targets);
  model.backward();
  size_t i = 0;
  for (const Param& p : model.registry().params()) {
    const std::vector<float> twice = p.grad.to_floats();
    for (size_t j = 0; j < twice.size(); ++j) ASSERT_FLOAT_EQ(twice[j], 2.0f * once[i][j]) << p.spec.name;
    ++i;
  }
}

TEST(Transformer, LossScaleScalesEveryGradient) {
  ModelConfig cfg = base_config();
  cfg.n_shared_experts = 1;
  const Tensor tokens = random_ints({2, 7}, 3, 0, 37);
  const Tensor targets = random_ints({2, 7}, 4, 0, 37);
  MoeTransformer a(cfg), b(cfg);
  a.registry().init(11);
  b.registry().init(11);
  a.forward(tokens, targets);
  a.backward(1.0f);
  b.forward(tokens, targets);
  b.backward(0.25f);
  for (const Param& p : a.registry().params()) {
    std::vector<double> want = to_double(p.grad);
    for (double& w : want) w *= 0.25;
    testing::expect_close(b.registry().get(p.spec.name).grad, want, 1e-6, 1e-9, p.spec.name);
  }
}

TEST(Transformer, LogitsAgreeWithTheTrainingForward) {
  const ModelConfig cfg = base_config();
  const Tensor tokens = random_ints({2, 9}, 5, 0, 37);
  const Tensor targets = random_ints({2, 9}, 6, 0, 37);
  MoeTransformer model(cfg);
  model.registry().init(3);
  const Tensor logits = model.logits(tokens);
  ASSERT_EQ(logits.shape(), Shape({2, 9, 37}));
  // Cross-entropy recomputed in double from the returned logits equals the forward's CE.
  const std::vector<double> l = to_double(logits);
  const int32_t* t = targets.data<int32_t>();
  double ce = 0.0;
  for (int n = 0; n < 18; ++n) {
    double mx = -1e300, sum = 0.0;
    for (int v = 0; v < 37; ++v) mx = std::max(mx, l[n * 37 + v]);
    for (int v = 0; v < 37; ++v) sum += std::exp(l[n * 37 + v] - mx);
    ce += mx + std::log(sum) - l[n * 37 + t[n]];
  }
  EXPECT_NEAR(model.forward(tokens, targets).ce, ce / 18.0, 1e-5);
  // Causality: changing the last token leaves every earlier position's logits unchanged (up to
  // rounding: the changed token's routing changes the row count of the experts' GEMMs, and
  // OpenBLAS may block other rows differently).
  Tensor changed = tokens.clone();
  changed.data<int32_t>()[8] = (changed.data<int32_t>()[8] + 1) % 37;
  const std::vector<double> l2 = to_double(model.logits(changed));
  for (int v = 0; v < 8 * 37; ++v) ASSERT_NEAR(l[v], l2[v], 1e-5) << v;
  double moved = 0.0;
  for (int v = 8 * 37; v < 9 * 37; ++v) moved += std::abs(l[v] - l2[v]);
  EXPECT_GT(moved, 1e-3) << "the changed position's own logits must change";
}

TEST(Transformer, BadBatchIsRejected) {
  MoeTransformer model(base_config());
  model.registry().init(1);
  const Tensor tokens = random_ints({2, 5}, 1, 0, 37);
  const Tensor targets = random_ints({2, 6}, 2, 0, 37);
  try {
    model.forward(tokens, targets);
    FAIL() << "expected an error";
  } catch (const Error& e) {
    EXPECT_STREQ(e.what(), "MoeTransformer::forward: targets i32(2, 6) cpu must match tokens i32(2, 5) cpu");
  }
}

}  // namespace
}  // namespace moeforge
