// The cuDNN fused-attention graphs as data (see cudnn_attention_graph.h). The order of the
// operations and every dtype follow cudnn-frontend's composite SDPA nodes
// (CompositeSDPANode, CompositeSDPABackwardNode, CompositeSoftmaxNode,
// CompositeDiagonalBandMaskNode) for cuDNN 9.19 without dropout, bias or padding.
#include "runtime/cuda/cudnn_attention_graph.h"

#include <algorithm>
#include <functional>
#include <limits>

#include "runtime/error.h"

namespace moeforge::cuda::cudnn_graph {
namespace {

using Dims = std::vector<int64_t>;

// Builds a Graph: tensors get uids, operations append in order.
class Builder {
 public:
  explicit Builder(const flash::Problem& p) : p_(p) {}

  int64_t memory(int64_t uid, std::string name, Dims dims, Dims strides, DataType dtype) {
    g_.tensors.push_back({uid, std::move(name), std::move(dims), std::move(strides), dtype, false, false, 0.0f});
    return uid;
  }
  // The tensor `uid` is stored in cuDNN's F16x16 reordered layout.
  void reorder_f16x16(int64_t uid) {
    for (TensorDesc& t : g_.tensors)
      if (t.uid == uid) t.reorder_f16x16 = true;
  }
  int64_t scalar(int64_t uid, std::string name, float value) {
    g_.tensors.push_back({uid, std::move(name), {1, 1, 1, 1}, {1, 1, 1, 1}, DataType::kF32, false, true, value});
    return uid;
  }
  int64_t virt(std::string name, Dims dims, Dims strides, DataType dtype = DataType::kF32) {
    const int64_t id = next_virtual_++;
    g_.tensors.push_back({id, std::move(name), std::move(dims), std::move(strides), dtype, true, false, 0.0f});
    return id;
  }
  // A virtual tensor shaped like `like`.
  int64_t virt_like(std::string name, int64_t like, DataType dtype = DataType::kF32) {
    const TensorDesc t = g_.tensor(like);
    return virt(std::move(name), t.dims, t.strides, dtype);
  }

  void matmul(std::string name, int64_t a, int64_t b, int64_t y) {
    OpDesc op;
    op.name = std::move(name);
    op.kind = OpKind::kMatmul;
    op.x = a;
    op.b = b;
    op.y = y;
    g_.ops.push_back(op);
  }
  void pointwise(std::string name, PointwiseMode mode, int64_t x, int64_t b, int64_t t, int64_t y,
                 DataType compute = DataType::kF32, int64_t axis = -1) {
    OpDesc op;
    op.name = std::move(name);
    op.kind = OpKind::kPointwise;
    op.pointwise = mode;
    op.x = x;
    op.b = b;
    op.t = t;
    op.y = y;
    op.compute = compute;
    op.axis = axis;
    g_.ops.push_back(op);
  }
  void reduction(std::string name, ReduceMode mode, int64_t x, int64_t y) {
    OpDesc op;
    op.name = std::move(name);
    op.kind = OpKind::kReduction;
    op.reduce = mode;
    op.x = x;
    op.y = y;
    g_.ops.push_back(op);
  }
  void reshape(std::string name, int64_t x, int64_t y) {
    OpDesc op;
    op.name = std::move(name);
    op.kind = OpKind::kReshape;
    op.x = x;
    op.y = y;
    g_.ops.push_back(op);
  }

  // Layouts, in cuDNN's (B, H, S, D) order over our (B, T, H, D) memory.
  Dims q_dims() const { return {p_.B, p_.H, p_.T, p_.D}; }
  Dims q_strides() const { return {p_.T * p_.H * p_.D, p_.D, p_.H * p_.D, 1}; }
  Dims kv_dims() const { return {p_.B, p_.Hkv, p_.T, p_.D}; }
  Dims kv_strides() const { return {p_.T * p_.Hkv * p_.D, p_.D, p_.Hkv * p_.D, 1}; }
  // K^T (and V^T): dims and strides of the last two axes swapped.
  Dims kt_dims() const { return {p_.B, p_.Hkv, p_.D, p_.T}; }
  Dims kt_strides() const { return {p_.T * p_.Hkv * p_.D, p_.D, 1, p_.Hkv * p_.D}; }
  Dims score_dims() const { return {p_.B, p_.H, p_.T, p_.T}; }
  Dims score_strides() const { return {p_.H * p_.T * p_.T, p_.T * p_.T, p_.T, 1}; }
  // (B, H, T, T) read transposed: (B, H, T_kv, T_q) over the same memory.
  Dims score_t_strides() const { return {p_.H * p_.T * p_.T, p_.T * p_.T, 1, p_.T}; }
  Dims row_dims() const { return {p_.B, p_.H, p_.T, 1}; }
  Dims row_strides() const { return {p_.H * p_.T, p_.T, 1, 1}; }

  // The causal mask and the optional window band on the scores s (cudnn-frontend's
  // sliding_window_mask with right bound 0, top-left diagonal, and left bound W).
  int64_t mask(int64_t s, const std::string& prefix) {
    const int64_t row = virt_like(prefix + "row", s, DataType::kI32);
    pointwise(prefix + "gen_row_index", PointwiseMode::kGenIndex, s, -1, -1, row, DataType::kF32, 2);
    const int64_t col = virt_like(prefix + "col", s, DataType::kI32);
    pointwise(prefix + "gen_col_index", PointwiseMode::kGenIndex, s, -1, -1, col, DataType::kF32, 3);
    const int64_t causal = virt_like(prefix + "row>=col", s, DataType::kBool);
    pointwise(prefix + "row>=col", PointwiseMode::kCmpGe, row, col, -1, causal, DataType::kBool);
    int64_t out = virt_like(prefix + "causal_masked", s);
    pointwise(prefix + "causal_select", PointwiseMode::kBinarySelect, s, neg_inf_, causal, out);
    if (p_.window > 0) {
      const int64_t wrow = virt_like(prefix + "window_row", out, DataType::kI32);
      pointwise(prefix + "window_gen_row_index", PointwiseMode::kGenIndex, out, -1, -1, wrow, DataType::kF32, 2);
      const int64_t wcol = virt_like(prefix + "window_col", out, DataType::kI32);
      pointwise(prefix + "window_gen_col_index", PointwiseMode::kGenIndex, out, -1, -1, wcol, DataType::kF32, 3);
      const int64_t shifted = virt_like(prefix + "col+window", out);
      pointwise(prefix + "col+window", PointwiseMode::kAdd, wcol, window_, -1, shifted);
      const int64_t band = virt_like(prefix + "col+window>row", out, DataType::kBool);
      pointwise(prefix + "col+window>row", PointwiseMode::kCmpGt, shifted, wrow, -1, band, DataType::kBool);
      const int64_t windowed = virt_like(prefix + "window_masked", out);
      pointwise(prefix + "window_select", PointwiseMode::kBinarySelect, out, neg_inf_, band, windowed);
      out = windowed;
    }
    return out;
  }

  void add_mask_scalars() {
    neg_inf_ = scalar(uid::kNegInf, "neg_inf", -std::numeric_limits<float>::infinity());
    if (p_.window > 0) window_ = scalar(uid::kWindow, "window", static_cast<float>(p_.window));
  }

  Graph take() {
    std::sort(g_.tensors.begin(), g_.tensors.end(),
              [](const TensorDesc& a, const TensorDesc& b) { return a.uid < b.uid; });
    return std::move(g_);
  }

  const flash::Problem& p_;
  Graph g_;
  int64_t next_virtual_ = uid::kFirstVirtual;
  int64_t neg_inf_ = -1, window_ = -1;
};

void check_expressible(const flash::Problem& p, bool backward) {
  const std::string why = unsupported_reason(p, backward);
  MOE_CHECK(why.empty(), "cudnn attention {}: {}", backward ? "backward" : "forward", why);
}

}  // namespace

const TensorDesc& Graph::tensor(int64_t id) const {
  for (const TensorDesc& t : tensors)
    if (t.uid == id) return t;
  MOE_THROW("cudnn attention graph: no tensor with uid {}", id);
}

std::vector<const TensorDesc*> Graph::memory_tensors() const {
  std::vector<const TensorDesc*> out;
  for (const TensorDesc& t : tensors)
    if (!t.is_virtual) out.push_back(&t);
  std::sort(out.begin(), out.end(), [](const TensorDesc* a, const TensorDesc* b) { return a->uid < b->uid; });
  return out;
}

std::string unsupported_reason(const flash::Problem& p, bool backward) {
  if (p.varlen)
    return "packed variable-length sequences (cu_seqlens) are not implemented on the cuDNN path (dense (B, T, H, D) "
           "only)";
  if (p.B < 1 || p.T < 1 || p.H < 1 || p.Hkv < 1 || p.D < 1)
    return fmt::format("sizes must be positive, got B={} T={} H={} Hkv={} D={}", p.B, p.T, p.H, p.Hkv, p.D);
  if (p.H % p.Hkv != 0) return fmt::format("H={} is not a multiple of Hkv={}", p.H, p.Hkv);
  // The head dims cuDNN's fused bf16 attention takes forward and backward on sm_80..sm_90.
  if (p.D % 8 != 0 || p.D > 128) return fmt::format("head dim {} is not a multiple of 8 up to 128", p.D);
  if (p.window < 0) return fmt::format("window {} is negative", p.window);
  if (backward && p.T == 1) return "cuDNN's fused attention backward does not take sequence length 1 (s_q = s_kv = 1)";
  // cuDNN's int32 index arithmetic (GEN_INDEX) and the float column + window comparison.
  if (p.T > (int64_t{1} << 24)) return fmt::format("sequence length {} exceeds 2^24", p.T);
  return {};
}

Graph forward_graph(const flash::Problem& p) {
  check_expressible(p, false);
  Builder g(p);
  const int64_t q = g.memory(uid::kQ, "q", g.q_dims(), g.q_strides(), DataType::kBF16);
  const int64_t kt = g.memory(uid::kK, "k^T", g.kt_dims(), g.kt_strides(), DataType::kBF16);
  const int64_t v = g.memory(uid::kV, "v", g.kv_dims(), g.kv_strides(), DataType::kBF16);
  const int64_t o = g.memory(uid::kO, "out", g.q_dims(), g.q_strides(), DataType::kBF16);
  const int64_t stats = g.memory(uid::kStats, "stats", g.row_dims(), g.row_strides(), DataType::kF32);
  const int64_t scale = g.scalar(uid::kScale, "scale", 0.0f);
  g.add_mask_scalars();

  const int64_t s = g.virt("q@k^T", g.score_dims(), g.score_strides());
  g.matmul("bmm1", q, kt, s);
  const int64_t scaled = g.virt_like("scaled", s);
  g.pointwise("attn_scale", PointwiseMode::kMul, s, scale, -1, scaled);
  const int64_t masked = g.mask(scaled, "");
  // Softmax with stats (CompositeSoftmaxNode): max, exp(s - max), sum, stats = max + log(sum).
  const int64_t mx = g.virt("max", g.row_dims(), g.row_strides());
  g.reduction("max", ReduceMode::kMax, masked, mx);
  const int64_t centered = g.virt_like("s-max", masked);
  g.pointwise("sub", PointwiseMode::kSub, masked, mx, -1, centered);
  const int64_t e = g.virt_like("exp", masked);
  g.pointwise("exp", PointwiseMode::kExp, centered, -1, -1, e);
  const int64_t sum = g.virt("sum_exp", g.row_dims(), g.row_strides());
  g.reduction("sum", ReduceMode::kAdd, e, sum);
  const int64_t log_sum = g.virt("log_sum_exp", g.row_dims(), g.row_strides());
  g.pointwise("log", PointwiseMode::kLog, sum, -1, -1, log_sum);
  g.pointwise("add", PointwiseMode::kAdd, mx, log_sum, -1, stats);
  // P goes into the second matmul in the I/O dtype (cuDNN takes bmm2's A operand as bf16).
  const int64_t prob = g.virt_like("p", masked, DataType::kBF16);
  g.pointwise("div", PointwiseMode::kDiv, e, sum, -1, prob);
  g.matmul("bmm2", prob, v, o);
  return g.take();
}

Graph backward_graph(const flash::Problem& p) {
  check_expressible(p, true);
  Builder g(p);
  const int64_t q = g.memory(uid::kQ, "q", g.q_dims(), g.q_strides(), DataType::kBF16);
  const int64_t kt = g.memory(uid::kK, "k^T", g.kt_dims(), g.kt_strides(), DataType::kBF16);
  const int64_t vt = g.memory(uid::kV, "v^T", g.kt_dims(), g.kt_strides(), DataType::kBF16);
  const int64_t o = g.memory(uid::kO, "out", g.q_dims(), g.q_strides(), DataType::kBF16);
  const int64_t stats = g.memory(uid::kStats, "stats", g.row_dims(), g.row_strides(), DataType::kF32);
  const int64_t d_o = g.memory(uid::kDO, "dout", g.q_dims(), g.q_strides(), DataType::kBF16);
  const int64_t dq = g.memory(uid::kDQ, "dq", g.q_dims(), g.q_strides(), DataType::kBF16);
  const int64_t dk = g.memory(uid::kDK, "dk", g.kv_dims(), g.kv_strides(), DataType::kBF16);
  const int64_t dv = g.memory(uid::kDV, "dv", g.kv_dims(), g.kv_strides(), DataType::kBF16);
  const int64_t softmax_sum = g.memory(uid::kSoftmaxSum, "softmax_sum", g.row_dims(), g.row_strides(), DataType::kF32);
  const int64_t dq_accum = g.memory(uid::kDQAccum, "dq_accum", g.q_dims(),
                                    {p.H * p.T * p.D, p.T * p.D, p.D, 1}, DataType::kF32);
  g.reorder_f16x16(dq_accum);
  const int64_t scale = g.scalar(uid::kScale, "scale", 0.0f);
  const int64_t one = g.scalar(uid::kOne, "one", 1.0f);
  g.add_mask_scalars();
  const bool gqa = p.H != p.Hkv;

  // softmax_sum = rowsum(dO * O) (FlashAttention-2's D), times the dropout scale 1.
  const int64_t d_o_o = g.virt("dout*out", g.q_dims(), {p.H * p.T * p.D, p.T * p.D, p.H * p.D, 1});
  g.pointwise("mul_dO_O", PointwiseMode::kMul, d_o, o, -1, d_o_o);
  const int64_t row_sum = g.virt("rowsum(dout*out)", g.row_dims(), g.row_strides());
  g.reduction("reduce_dO_O", ReduceMode::kAdd, d_o_o, row_sum);
  g.pointwise("scale_dropout_inv", PointwiseMode::kMul, row_sum, one, -1, softmax_sum);

  // P = exp(scale * q@k^T - stats), masked: the forward's probabilities from its stats.
  const int64_t s = g.virt("q@k^T", g.score_dims(), g.score_strides());
  g.matmul("matmul_Q_KT", q, kt, s);
  const int64_t scaled = g.virt_like("scaled", s);
  g.pointwise("mul_s_attn_scale", PointwiseMode::kMul, s, scale, -1, scaled);
  const int64_t centered = g.virt_like("s-stats", s);
  g.pointwise("sub_s_m", PointwiseMode::kSub, scaled, stats, -1, centered);
  const int64_t masked = g.mask(centered, "");
  const int64_t prob = g.virt_like("p", masked);
  g.pointwise("exp_s", PointwiseMode::kExp, masked, -1, -1, prob);

  // dV = P^T @ dO (per query head, then summed over each kv head's group).
  const int64_t prob_t = g.virt("p^T", {p.B, p.H, p.T, p.T}, g.score_t_strides(), DataType::kBF16);
  g.reshape("reshape_p", prob, prob_t);
  // A kv-head gradient: the product per query head, then (GQA) summed over each kv head's group.
  const auto kv_grad = [&](const std::string& name, int64_t a, int64_t b, int64_t out, const std::string& what) {
    if (!gqa) {
      g.matmul("matmul_" + name, a, b, out);
      return;
    }
    const int64_t full = g.virt(what + "_fullhead", {p.B, p.H, p.T, p.D}, {p.H * p.T * p.D, p.T * p.D, p.D, 1},
                                DataType::kBF16);
    g.matmul("matmul_" + name, a, b, full);
    g.reduction("red_" + what + "_head", ReduceMode::kAdd, full, out);
  };
  kv_grad("pT_dO", prob_t, d_o, dv, "dv");

  // dS = P * (dO @ V^T - softmax_sum) * scale.
  const int64_t dp = g.virt("dout@v^T", g.score_dims(), g.score_strides());
  g.matmul("matmul_dO_VT", d_o, vt, dp);
  const int64_t dp_centered = g.virt_like("dp-softmax_sum", dp);
  g.pointwise("sub_dP_softmax_sum", PointwiseMode::kSub, dp, softmax_sum, -1, dp_centered);
  const int64_t dp_prob = g.virt_like("p*(dp-softmax_sum)", dp);
  g.pointwise("mul_dP_exp_s", PointwiseMode::kMul, dp_centered, prob, -1, dp_prob);
  const int64_t ds = g.virt_like("ds", dp);
  g.pointwise("mul_dS_attn_scale", PointwiseMode::kMul, dp_prob, scale, -1, ds);

  // dK = dS^T @ Q (per query head, then summed over each group).
  const int64_t ds_t = g.virt("ds^T", {p.B, p.H, p.T, p.T}, g.score_t_strides(), DataType::kBF16);
  g.reshape("reshape_dS", ds, ds_t);
  kv_grad("dST_Q", ds_t, q, dk, "dk");

  // dQ = dS @ K, accumulated in fp32, then rounded into dq.
  const int64_t k = g.virt("k", g.kv_dims(), g.kv_strides());
  g.reshape("reshape_k", kt, k);
  g.matmul("matmul_dS_K", ds, k, dq_accum);
  g.pointwise("identity_dQ", PointwiseMode::kIdentity, dq_accum, -1, -1, dq);
  return g.take();
}

int64_t span_bytes(const TensorDesc& t) {
  int64_t last = 0;
  for (size_t i = 0; i < t.dims.size(); ++i) last += (t.dims[i] - 1) * t.strides[i];
  const int64_t element = t.dtype == DataType::kBF16 ? 2 : t.dtype == DataType::kBool ? 1 : 4;
  return (last + 1) * element;
}

size_t PlanKeyHash::operator()(const PlanKey& k) const {
  size_t h = 0;
  for (const int64_t v : {k.B, k.T, k.H, k.Hkv, k.D, k.window, int64_t{k.backward}, int64_t{k.device}})
    h = h * 1000003u ^ std::hash<int64_t>()(v);
  return h;
}

PlanKey plan_key(const flash::Problem& p, bool backward, int device) {
  return {p.B, p.T, p.H, p.Hkv, p.D, p.window, backward, device};
}

}  // namespace moeforge::cuda::cudnn_graph
