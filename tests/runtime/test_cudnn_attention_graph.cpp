// Tests runtime/cuda/cudnn_attention_graph.{h,cpp}, the cuDNN attention's operation graphs as
// data, on the CPU: the exact dims and strides of the tensors cuDNN reads and writes (our BSHD
// memory as cuDNN's (B, H, S, D), K^T and V^T as views, the stats as our lse), the unique ids the
// variant pack binds, the graphs' well-formedness, the GQA reductions and window band, the
// problems they refuse, the plan-cache key; and, by evaluating the graphs on the CPU with the
// semantics cuDNN documents for each operation, that they compute the CPU attention op's out,
// lse, dq, dk and dv (causal, GQA 1/2/4, odd T) and a naive reference's with a sliding window.
#include <gtest/gtest.h>

#include <cmath>
#include <functional>
#include <limits>
#include <map>
#include <set>
#include <string>
#include <unordered_map>
#include <vector>

#include "runtime/cuda/cudnn_attention_graph.h"
#include "runtime/ops.h"
#include "tests/testing.h"

namespace moeforge {
namespace {

using namespace cuda::cudnn_graph;
using cuda::flash::Problem;
using Dims = std::vector<int64_t>;

Problem dense(int64_t b, int64_t t, int64_t h, int64_t hkv, int64_t d, int64_t window = 0) {
  return {b, t, h, hkv, d, window, false, b * t};
}

std::set<int64_t> memory_uids(const Graph& g) {
  std::set<int64_t> out;
  for (const TensorDesc* t : g.memory_tensors()) out.insert(t->uid);
  return out;
}

TEST(CudnnAttentionGraph, ForwardLayoutsAreOurDenseMemory) {
  const int64_t B = 2, T = 77, H = 8, Hkv = 2, D = 64;
  const Graph g = forward_graph(dense(B, T, H, Hkv, D));
  EXPECT_EQ(g.tensor(uid::kQ).dims, (Dims{B, H, T, D}));
  EXPECT_EQ(g.tensor(uid::kQ).strides, (Dims{T * H * D, D, H * D, 1}));
  EXPECT_EQ(g.tensor(uid::kO).dims, (Dims{B, H, T, D}));
  EXPECT_EQ(g.tensor(uid::kO).strides, (Dims{T * H * D, D, H * D, 1}));
  // K enters the first matmul transposed: (B, Hkv, D, T) over the (B, T, Hkv, D) memory.
  EXPECT_EQ(g.tensor(uid::kK).dims, (Dims{B, Hkv, D, T}));
  EXPECT_EQ(g.tensor(uid::kK).strides, (Dims{T * Hkv * D, D, 1, Hkv * D}));
  EXPECT_EQ(g.tensor(uid::kV).dims, (Dims{B, Hkv, T, D}));
  EXPECT_EQ(g.tensor(uid::kV).strides, (Dims{T * Hkv * D, D, Hkv * D, 1}));
  // The stats are our lse (B, H, T).
  EXPECT_EQ(g.tensor(uid::kStats).dims, (Dims{B, H, T, 1}));
  EXPECT_EQ(g.tensor(uid::kStats).strides, (Dims{H * T, T, 1, 1}));
  EXPECT_EQ(g.tensor(uid::kStats).dtype, DataType::kF32);
  for (const int64_t id : {uid::kQ, uid::kK, uid::kV, uid::kO}) EXPECT_EQ(g.tensor(id).dtype, DataType::kBF16);
  EXPECT_EQ(memory_uids(g), (std::set<int64_t>{uid::kQ, uid::kK, uid::kV, uid::kO, uid::kStats, uid::kScale,
                                               uid::kNegInf}));
  EXPECT_TRUE(g.tensor(uid::kScale).by_value);
  EXPECT_EQ(g.tensor(uid::kNegInf).value, -std::numeric_limits<float>::infinity());
  // The bytes each memory tensor spans: exactly our tensors' sizes.
  EXPECT_EQ(span_bytes(g.tensor(uid::kQ)), B * T * H * D * 2);
  EXPECT_EQ(span_bytes(g.tensor(uid::kK)), B * T * Hkv * D * 2);
  EXPECT_EQ(span_bytes(g.tensor(uid::kStats)), B * H * T * 4);
}

TEST(CudnnAttentionGraph, BackwardLayoutsAndScratch) {
  const int64_t B = 3, T = 200, H = 8, Hkv = 1, D = 128;
  const Graph g = backward_graph(dense(B, T, H, Hkv, D));
  for (const int64_t id : {uid::kQ, uid::kO, uid::kDO, uid::kDQ}) {
    EXPECT_EQ(g.tensor(id).dims, (Dims{B, H, T, D})) << g.tensor(id).name;
    EXPECT_EQ(g.tensor(id).strides, (Dims{T * H * D, D, H * D, 1})) << g.tensor(id).name;
  }
  for (const int64_t id : {uid::kDK, uid::kDV}) {
    EXPECT_EQ(g.tensor(id).dims, (Dims{B, Hkv, T, D})) << g.tensor(id).name;
    EXPECT_EQ(g.tensor(id).strides, (Dims{T * Hkv * D, D, Hkv * D, 1})) << g.tensor(id).name;
  }
  // The backward reads both K and V transposed.
  for (const int64_t id : {uid::kK, uid::kV}) {
    EXPECT_EQ(g.tensor(id).dims, (Dims{B, Hkv, D, T})) << g.tensor(id).name;
    EXPECT_EQ(g.tensor(id).strides, (Dims{T * Hkv * D, D, 1, Hkv * D})) << g.tensor(id).name;
  }
  EXPECT_EQ(g.tensor(uid::kStats).strides, (Dims{H * T, T, 1, 1}));
  EXPECT_EQ(g.tensor(uid::kSoftmaxSum).dims, (Dims{B, H, T, 1}));
  EXPECT_EQ(g.tensor(uid::kDQAccum).strides, (Dims{H * T * D, T * D, D, 1}));
  EXPECT_EQ(span_bytes(g.tensor(uid::kSoftmaxSum)), B * H * T * 4);
  EXPECT_EQ(span_bytes(g.tensor(uid::kDQAccum)), B * H * T * D * 4);
  // The fp32 dq accumulator in cuDNN's F16x16 layout, as cudnn-frontend declares it; nothing else.
  for (const TensorDesc& t : g.tensors) EXPECT_EQ(t.reorder_f16x16, t.uid == uid::kDQAccum) << t.name;
  EXPECT_EQ(memory_uids(g), (std::set<int64_t>{uid::kQ, uid::kK, uid::kV, uid::kO, uid::kStats, uid::kDO, uid::kDQ,
                                               uid::kDK, uid::kDV, uid::kScale, uid::kNegInf, uid::kOne,
                                               uid::kSoftmaxSum, uid::kDQAccum}));
  EXPECT_EQ(g.tensor(uid::kOne).value, 1.0f);
}

// Every operation reads tensors that exist and are already computed; every virtual tensor is
// written once and read; the memory tensors written are exactly `outputs`.
void expect_well_formed(const Graph& g, const std::set<int64_t>& outputs) {
  std::set<int64_t> ready, written, read;
  for (const TensorDesc& t : g.tensors) {
    EXPECT_TRUE(t.uid < uid::kFirstVirtual ? !t.is_virtual : t.is_virtual) << t.name;
    if (!t.is_virtual && !outputs.count(t.uid)) ready.insert(t.uid);
    // 4-D everywhere: cuDNN rejects a pointwise operation whose operands differ in rank.
    EXPECT_EQ(t.dims.size(), 4u) << t.name;
    if (t.by_value) {
      EXPECT_EQ(t.dims, (Dims{1, 1, 1, 1})) << t.name;
    }
    EXPECT_EQ(t.dims.size(), t.strides.size()) << t.name;
  }
  for (const OpDesc& op : g.ops) {
    for (const int64_t in : {op.x, op.b, op.t}) {
      if (in < 0) continue;
      EXPECT_TRUE(ready.count(in)) << op.name << " reads " << g.tensor(in).name << " before it is computed";
      read.insert(in);
    }
    EXPECT_TRUE(written.insert(op.y).second) << op.name << " writes " << g.tensor(op.y).name << " a second time";
    ready.insert(op.y);
  }
  for (const TensorDesc& t : g.tensors) {
    if (t.is_virtual) {
      EXPECT_TRUE(written.count(t.uid)) << t.name << " is never computed";
      EXPECT_TRUE(read.count(t.uid)) << t.name << " is never read";
    } else {
      EXPECT_EQ(written.count(t.uid) == 1, outputs.count(t.uid) == 1) << t.name;
    }
  }
}

int count_ops(const Graph& g, OpKind kind) {
  int n = 0;
  for (const OpDesc& op : g.ops) n += op.kind == kind;
  return n;
}

TEST(CudnnAttentionGraph, GraphsAreWellFormed) {
  for (const Problem& p : {dense(1, 5, 4, 4, 8), dense(2, 9, 4, 1, 16), dense(1, 7, 8, 2, 8, 3)}) {
    expect_well_formed(forward_graph(p), {uid::kO, uid::kStats});
    expect_well_formed(backward_graph(p), {uid::kDQ, uid::kDK, uid::kDV, uid::kSoftmaxSum, uid::kDQAccum});
  }
}

TEST(CudnnAttentionGraph, GqaReducesEachGroupAndTheWindowAddsABand) {
  const Graph mha = backward_graph(dense(1, 9, 4, 4, 8)), gqa = backward_graph(dense(1, 9, 4, 2, 8));
  // Softmax's max and sum, the dO.O row sum; with GQA also dk's and dv's group sums.
  EXPECT_EQ(count_ops(mha, OpKind::kReduction), 1);
  EXPECT_EQ(count_ops(gqa, OpKind::kReduction), 3);
  EXPECT_EQ(count_ops(forward_graph(dense(1, 9, 4, 2, 8)), OpKind::kReduction), 2);
  EXPECT_EQ(count_ops(gqa, OpKind::kMatmul), 5);
  EXPECT_EQ(count_ops(gqa, OpKind::kReshape), 3);
  // The window: two index generators, col + W, the comparison and the select, once per direction.
  const Graph fwd = forward_graph(dense(1, 9, 4, 2, 8)), windowed = forward_graph(dense(1, 9, 4, 2, 8, 3));
  EXPECT_EQ(windowed.ops.size(), fwd.ops.size() + 5);
  EXPECT_EQ(backward_graph(dense(1, 9, 4, 2, 8, 3)).ops.size(), gqa.ops.size() + 5);
  EXPECT_EQ(windowed.tensor(uid::kWindow).value, 3.0f);
  EXPECT_TRUE(windowed.tensor(uid::kWindow).by_value);
  EXPECT_FALSE(memory_uids(fwd).count(uid::kWindow));
}

TEST(CudnnAttentionGraph, UnsupportedProblemsAreNamed) {
  EXPECT_EQ(unsupported_reason(dense(2, 77, 8, 2, 64), true), "");
  EXPECT_EQ(unsupported_reason(dense(1, 1, 8, 2, 64), false), "");
  EXPECT_EQ(unsupported_reason(dense(1, 1, 8, 2, 64), true),
            "cuDNN's fused attention backward does not take sequence length 1 (s_q = s_kv = 1)");
  EXPECT_EQ(unsupported_reason(dense(1, 8, 8, 2, 80), false), "");
  EXPECT_EQ(unsupported_reason(dense(1, 8, 8, 2, 60), false), "head dim 60 is not a multiple of 8 up to 128");
  EXPECT_EQ(unsupported_reason(dense(1, 8, 8, 2, 136), false), "head dim 136 is not a multiple of 8 up to 128");
  EXPECT_EQ(unsupported_reason(dense(1, 8, 6, 4, 64), false), "H=6 is not a multiple of Hkv=4");
  Problem packed = dense(3, 100, 8, 2, 64);
  packed.varlen = true;
  EXPECT_EQ(unsupported_reason(packed, false),
            "packed variable-length sequences (cu_seqlens) are not implemented on the cuDNN path (dense (B, T, H, "
            "D) only)");
  EXPECT_EQ(testing::error_of([&] { forward_graph(packed); }),
            "cudnn attention forward: packed variable-length sequences (cu_seqlens) are not implemented on the cuDNN "
            "path (dense (B, T, H, D) only)");
}

TEST(CudnnAttentionGraph, PlanKeys) {
  const PlanKey a = plan_key(dense(2, 77, 8, 2, 64), false, 0);
  EXPECT_EQ(a, plan_key(dense(2, 77, 8, 2, 64), false, 0));
  EXPECT_EQ(PlanKeyHash()(a), PlanKeyHash()(plan_key(dense(2, 77, 8, 2, 64), false, 0)));
  for (const PlanKey& other :
       {plan_key(dense(3, 77, 8, 2, 64), false, 0), plan_key(dense(2, 78, 8, 2, 64), false, 0),
        plan_key(dense(2, 77, 16, 2, 64), false, 0), plan_key(dense(2, 77, 8, 4, 64), false, 0),
        plan_key(dense(2, 77, 8, 2, 128), false, 0), plan_key(dense(2, 77, 8, 2, 64, 32), false, 0),
        plan_key(dense(2, 77, 8, 2, 64), true, 0), plan_key(dense(2, 77, 8, 2, 64), false, 1)})
    EXPECT_FALSE(a == other);
  std::unordered_map<PlanKey, int, PlanKeyHash> cache{{a, 1}};
  EXPECT_EQ(cache.count(plan_key(dense(2, 77, 8, 2, 64), false, 0)), 1u);
  EXPECT_EQ(cache.count(plan_key(dense(2, 77, 8, 2, 64), true, 0)), 0u);
}

// ---- the graphs evaluated on the CPU ---------------------------------------------------------

// Runs a Graph in double precision with the semantics cuDNN gives each operation (broadcast of
// size-1 dims, grouped broadcast and reduction for GQA, reshape as a view of the same memory).
// Every tensor is held as a dense row-major array over its dims; memory tensors are read from
// and written to flat buffers through their strides, as cuDNN does.
class Evaluator {
 public:
  explicit Evaluator(const Graph& g) : g_(g) {}

  void bind(int64_t id, std::vector<double>* memory) { memory_[id] = memory; }

  void run(double scale) {
    for (const TensorDesc& t : g_.tensors) {
      if (t.is_virtual || memory_.count(t.uid) || t.by_value) continue;
      memory_[t.uid] = &scratch_[t.uid];
      scratch_[t.uid].assign(static_cast<size_t>(span_bytes(t)), 0.0);
    }
    for (const TensorDesc& t : g_.tensors) {
      if (t.by_value) values_[t.uid] = {t.uid == uid::kScale ? scale : static_cast<double>(t.value)};
      else if (!t.is_virtual && !written_by_op(t.uid)) values_[t.uid] = load(t);
    }
    for (const OpDesc& op : g_.ops) {
      const TensorDesc& y = g_.tensor(op.y);
      std::vector<double> out(static_cast<size_t>(count(y.dims)));
      switch (op.kind) {
        case OpKind::kPointwise: pointwise(op, y, out); break;
        case OpKind::kMatmul: matmul(op, y, out); break;
        case OpKind::kReduction: reduction(op, y, out); break;
        case OpKind::kReshape: reshape(op, y, out); break;
      }
      values_[op.y] = out;
      if (!y.is_virtual) store(y, out);
    }
  }

 private:
  static int64_t count(const Dims& d) {
    int64_t n = 1;
    for (const int64_t x : d) n *= x;
    return n;
  }
  // Row-major multi-index of flat index i over dims d.
  static Dims index_of(int64_t i, const Dims& d) {
    Dims idx(d.size());
    for (size_t k = d.size(); k-- > 0;) {
      idx[k] = i % d[k];
      i /= d[k];
    }
    return idx;
  }
  static int64_t flat(const Dims& idx, const Dims& d) {
    int64_t i = 0;
    for (size_t k = 0; k < d.size(); ++k) i = i * d[k] + idx[k];
    return i;
  }
  static int64_t offset(const Dims& idx, const Dims& strides) {
    int64_t o = 0;
    for (size_t k = 0; k < idx.size(); ++k) o += idx[k] * strides[k];
    return o;
  }
  // The index into input dims `in` that output index `out_idx` (dims `out`) reads: equal dims map
  // one to one, size 1 broadcasts, a divisor groups (GQA: query head h reads kv head h / group).
  static Dims source_index(const Dims& out_idx, const Dims& out, const Dims& in) {
    Dims idx(in.size());
    const size_t shift = out.size() - in.size();
    for (size_t k = 0; k < in.size(); ++k) {
      const int64_t o = out_idx[k + shift], n_out = out[k + shift];
      EXPECT_TRUE(in[k] == n_out || in[k] == 1 || n_out % in[k] == 0);
      idx[k] = in[k] == n_out ? o : in[k] == 1 ? 0 : o / (n_out / in[k]);
    }
    return idx;
  }
  bool written_by_op(int64_t id) const {
    for (const OpDesc& op : g_.ops)
      if (op.y == id) return true;
    return false;
  }
  std::vector<double> load(const TensorDesc& t) const {
    const std::vector<double>& mem = *memory_.at(t.uid);
    std::vector<double> out(static_cast<size_t>(count(t.dims)));
    for (int64_t i = 0; i < count(t.dims); ++i) out[i] = mem.at(offset(index_of(i, t.dims), t.strides));
    return out;
  }
  void store(const TensorDesc& t, const std::vector<double>& v) {
    std::vector<double>& mem = *memory_.at(t.uid);
    for (int64_t i = 0; i < count(t.dims); ++i) mem.at(offset(index_of(i, t.dims), t.strides)) = v[i];
  }
  double read(int64_t id, const Dims& out_idx, const Dims& out) const {
    const TensorDesc& t = g_.tensor(id);
    return values_.at(id)[flat(source_index(out_idx, out, t.dims), t.dims)];
  }

  void pointwise(const OpDesc& op, const TensorDesc& y, std::vector<double>& out) const {
    for (int64_t i = 0; i < count(y.dims); ++i) {
      const Dims idx = index_of(i, y.dims);
      const double x = read(op.x, idx, y.dims);
      const double b = op.b >= 0 ? read(op.b, idx, y.dims) : 0.0;
      switch (op.pointwise) {
        case PointwiseMode::kAdd: out[i] = x + b; break;
        case PointwiseMode::kSub: out[i] = x - b; break;
        case PointwiseMode::kMul: out[i] = x * b; break;
        case PointwiseMode::kDiv: out[i] = x / b; break;
        case PointwiseMode::kExp: out[i] = std::exp(x); break;
        case PointwiseMode::kLog: out[i] = std::log(x); break;
        case PointwiseMode::kIdentity: out[i] = x; break;
        case PointwiseMode::kGenIndex: out[i] = static_cast<double>(idx.at(static_cast<size_t>(op.axis))); break;
        case PointwiseMode::kCmpGe: out[i] = x >= b; break;
        case PointwiseMode::kCmpGt: out[i] = x > b; break;
        case PointwiseMode::kBinarySelect: out[i] = read(op.t, idx, y.dims) != 0.0 ? x : b; break;
      }
    }
  }
  // C (..., M, N) = A (..., M, K) @ B (..., K, N), batch dims broadcast.
  void matmul(const OpDesc& op, const TensorDesc& y, std::vector<double>& out) const {
    const TensorDesc &a = g_.tensor(op.x), &b = g_.tensor(op.b);
    const int64_t K = a.dims[3];
    EXPECT_EQ(b.dims[2], K) << op.name;
    EXPECT_EQ(a.dims[2], y.dims[2]) << op.name;
    EXPECT_EQ(b.dims[3], y.dims[3]) << op.name;
    const Dims batch{y.dims[0], y.dims[1]};
    for (int64_t i = 0; i < count(y.dims); ++i) {
      const Dims idx = index_of(i, y.dims);
      const Dims ab = source_index({idx[0], idx[1]}, batch, {a.dims[0], a.dims[1]});
      const Dims bb = source_index({idx[0], idx[1]}, batch, {b.dims[0], b.dims[1]});
      double sum = 0;
      for (int64_t k = 0; k < K; ++k)
        sum += values_.at(op.x)[flat({ab[0], ab[1], idx[2], k}, a.dims)] *
               values_.at(op.b)[flat({bb[0], bb[1], k, idx[3]}, b.dims)];
      out[i] = sum;
    }
  }
  void reduction(const OpDesc& op, const TensorDesc& y, std::vector<double>& out) const {
    const TensorDesc& x = g_.tensor(op.x);
    const bool max = op.reduce == ReduceMode::kMax;
    std::fill(out.begin(), out.end(), max ? -std::numeric_limits<double>::infinity() : 0.0);
    for (int64_t i = 0; i < count(x.dims); ++i) {
      const Dims xi = index_of(i, x.dims);
      Dims yi(y.dims.size());
      for (size_t k = 0; k < yi.size(); ++k) {
        EXPECT_TRUE(x.dims[k] % y.dims[k] == 0) << op.name;
        yi[k] = y.dims[k] == x.dims[k] ? xi[k] : y.dims[k] == 1 ? 0 : xi[k] / (x.dims[k] / y.dims[k]);
      }
      double& o = out[flat(yi, y.dims)];
      o = max ? std::max(o, values_.at(op.x)[i]) : o + values_.at(op.x)[i];
    }
  }
  // y views x's memory: the element of y at memory offset o is the element of x there.
  void reshape(const OpDesc& op, const TensorDesc& y, std::vector<double>& out) const {
    const TensorDesc& x = g_.tensor(op.x);
    std::map<int64_t, double> at;
    for (int64_t i = 0; i < count(x.dims); ++i)
      EXPECT_TRUE(at.emplace(offset(index_of(i, x.dims), x.strides), values_.at(op.x)[i]).second) << op.name;
    for (int64_t i = 0; i < count(y.dims); ++i) out[i] = at.at(offset(index_of(i, y.dims), y.strides));
  }

  const Graph& g_;
  std::map<int64_t, std::vector<double>*> memory_;
  std::map<int64_t, std::vector<double>> scratch_;
  std::map<int64_t, std::vector<double>> values_;
};

// Naive double attention over dense (B, T, H, D) with causal mask and window w.
struct Reference {
  std::vector<double> out, lse, dq, dk, dv;  // lse (B, H, T)
};
Reference reference(const Problem& p, double scale, const std::vector<double>& q, const std::vector<double>& k,
                    const std::vector<double>& v, const std::vector<double>& dout) {
  const int64_t B = p.B, T = p.T, H = p.H, Hkv = p.Hkv, D = p.D, group = H / Hkv;
  Reference r{std::vector<double>(q.size()), std::vector<double>(B * H * T), std::vector<double>(q.size()),
              std::vector<double>(k.size()), std::vector<double>(k.size())};
  const auto qi = [&](int64_t b, int64_t t, int64_t h) { return ((b * T + t) * H + h) * D; };
  const auto kj = [&](int64_t b, int64_t t, int64_t g) { return ((b * T + t) * Hkv + g) * D; };
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h)
      for (int64_t i = 0; i < T; ++i) {
        std::vector<int64_t> js;
        std::vector<double> pr;
        double mx = -INFINITY;
        for (int64_t j = 0; j <= i; ++j) {
          if (p.window > 0 && i - j >= p.window) continue;
          double s = 0;
          for (int64_t c = 0; c < D; ++c) s += q[qi(b, i, h) + c] * k[kj(b, j, h / group) + c];
          js.push_back(j);
          pr.push_back(s * scale);
          mx = std::max(mx, s * scale);
        }
        double sum = 0;
        for (double& x : pr) sum += (x = std::exp(x - mx));
        r.lse[(b * H + h) * T + i] = mx + std::log(sum);
        for (double& x : pr) x /= sum;
        std::vector<double> dp(js.size());
        double delta = 0;
        for (size_t n = 0; n < js.size(); ++n) {
          for (int64_t c = 0; c < D; ++c) {
            r.out[qi(b, i, h) + c] += pr[n] * v[kj(b, js[n], h / group) + c];
            dp[n] += dout[qi(b, i, h) + c] * v[kj(b, js[n], h / group) + c];
          }
          delta += pr[n] * dp[n];
        }
        for (size_t n = 0; n < js.size(); ++n) {
          const double ds = pr[n] * (dp[n] - delta);
          for (int64_t c = 0; c < D; ++c) {
            r.dv[kj(b, js[n], h / group) + c] += pr[n] * dout[qi(b, i, h) + c];
            r.dq[qi(b, i, h) + c] += scale * ds * k[kj(b, js[n], h / group) + c];
            r.dk[kj(b, js[n], h / group) + c] += scale * ds * q[qi(b, i, h) + c];
          }
        }
      }
  return r;
}

struct Evaluated {
  std::vector<double> out, lse, dq, dk, dv;
};

// The forward graph, then the backward graph on its out and lse, evaluated on the CPU.
Evaluated evaluate(const Problem& p, double scale, std::vector<double> q, std::vector<double> k, std::vector<double> v,
             std::vector<double> dout) {
  Evaluated r{std::vector<double>(q.size()), std::vector<double>(p.B * p.H * p.T), std::vector<double>(q.size()),
        std::vector<double>(k.size()), std::vector<double>(k.size())};
  const Graph fwd = forward_graph(p);
  Evaluator f(fwd);
  f.bind(uid::kQ, &q);
  f.bind(uid::kK, &k);
  f.bind(uid::kV, &v);
  f.bind(uid::kO, &r.out);
  f.bind(uid::kStats, &r.lse);
  f.run(scale);
  const Graph bwd = backward_graph(p);
  Evaluator b(bwd);
  b.bind(uid::kQ, &q);
  b.bind(uid::kK, &k);
  b.bind(uid::kV, &v);
  b.bind(uid::kO, &r.out);
  b.bind(uid::kStats, &r.lse);
  b.bind(uid::kDO, &dout);
  b.bind(uid::kDQ, &r.dq);
  b.bind(uid::kDK, &r.dk);
  b.bind(uid::kDV, &r.dv);
  b.run(scale);
  return r;
}

TEST(CudnnAttentionGraph, EvaluatedGraphsComputeTheCpuAttentionOp) {
  for (const Problem& p : {dense(2, 7, 4, 4, 8), dense(1, 9, 4, 1, 8), dense(2, 5, 8, 2, 16)}) {
    const Shape qs{p.B, p.T, p.H, p.D}, ks{p.B, p.T, p.Hkv, p.D}, ls{p.B, p.H, p.T};
    const Tensor q = testing::random_tensor(qs, 1), k = testing::random_tensor(ks, 2), v = testing::random_tensor(ks, 3);
    const Tensor dout = testing::random_tensor(qs, 4);
    const float scale = 1.0f / std::sqrt(static_cast<float>(p.D));
    Tensor out = Tensor::empty(qs, DType::kF32), lse = Tensor::empty(ls, DType::kF32);
    ops::attention_fwd(q, k, v, scale, out, lse);
    Tensor dq = Tensor::empty(qs, DType::kF32), dk = Tensor::empty(ks, DType::kF32), dv = Tensor::empty(ks, DType::kF32);
    ops::attention_bwd(q, k, v, out, lse, dout, scale, dq, dk, dv);

    const Evaluated r = evaluate(p, scale, testing::to_double(q), testing::to_double(k), testing::to_double(v),
                           testing::to_double(dout));
    const std::string at = " B=" + std::to_string(p.B) + " T=" + std::to_string(p.T) + " H=" + std::to_string(p.H) +
                           " Hkv=" + std::to_string(p.Hkv) + " D=" + std::to_string(p.D);
    testing::expect_close(r.out, testing::to_double(out), 1e-5, 1e-6, "out" + at);
    testing::expect_close(r.lse, testing::to_double(lse), 1e-5, 1e-6, "lse" + at);
    testing::expect_close(r.dq, testing::to_double(dq), 1e-5, 1e-6, "dq" + at);
    testing::expect_close(r.dk, testing::to_double(dk), 1e-5, 1e-6, "dk" + at);
    testing::expect_close(r.dv, testing::to_double(dv), 1e-5, 1e-6, "dv" + at);
  }
}

TEST(CudnnAttentionGraph, EvaluatedGraphsApplyTheSlidingWindow) {
  for (const Problem& p : {dense(1, 9, 4, 2, 8, 1), dense(2, 11, 4, 4, 8, 3), dense(1, 10, 8, 2, 16, 4)}) {
    const Shape qs{p.B, p.T, p.H, p.D}, ks{p.B, p.T, p.Hkv, p.D};
    const std::vector<double> q = testing::to_double(testing::random_tensor(qs, 5)),
                              k = testing::to_double(testing::random_tensor(ks, 6)),
                              v = testing::to_double(testing::random_tensor(ks, 7)),
                              dout = testing::to_double(testing::random_tensor(qs, 8));
    const double scale = 0.3;
    const Reference want = reference(p, scale, q, k, v, dout);
    const Evaluated got = evaluate(p, scale, q, k, v, dout);
    const std::string at = " T=" + std::to_string(p.T) + " window=" + std::to_string(p.window);
    testing::expect_close(got.out, want.out, 1e-9, 1e-12, "out" + at);
    testing::expect_close(got.lse, want.lse, 1e-9, 1e-12, "lse" + at);
    testing::expect_close(got.dq, want.dq, 1e-9, 1e-12, "dq" + at);
    testing::expect_close(got.dk, want.dk, 1e-9, 1e-12, "dk" + at);
    testing::expect_close(got.dv, want.dv, 1e-9, 1e-12, "dv" + at);
  }
}

}  // namespace
}  // namespace moeforge
