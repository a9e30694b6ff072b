// The operation graphs of the cuDNN fused attention (runtime/cuda/cudnn_attention.cpp) as plain
// data: tensors (unique id, dims, strides, dtype, virtual or not) and operations (matmul,
// pointwise, reduction, reshape) over them. cudnn_attention.cpp turns each record into one cuDNN
// backend descriptor, one for one; keeping the graphs here, in plain C++ compiled in every build,
// lets the CPU tests check the layouts and evaluate the graphs on the CPU against the attention
// op (tests/runtime/test_cudnn_attention_graph.cpp).
//
// The graphs are cuDNN's fused flash-attention pattern as cudnn-frontend lowers its SDPA node for
// cuDNN 9.19 (the "composite" node: the native SDPA operation takes masks only from 9.21): node
// for node, with its dtypes, so that cuDNN's fused engines recognise them.
//
// Layout. cuDNN's logical dims are (B, H, S, D); our dense tensors are (B, T, H, D) in memory, so
// q, out, dout, dq have strides (T*H*D, D, H*D, 1) and k, v, dk, dv (T*Hkv*D, D, Hkv*D, 1). The
// first matmul takes K^T: dims (B, Hkv, D, T), strides (T*Hkv*D, D, 1, Hkv*D), the same memory;
// the backward takes V^T likewise. GQA is the matmuls' broadcast over heads (query head h reads
// kv head h / (H / Hkv)) and, in the backward, a reduction of per-query-head dk and dv over each
// group. The stats output is (B, H, T, 1) with strides (H*T, T, 1, 1): our lse (B, H, T), which
// it equals: max + log(sum exp(s - max)) of the scaled, masked scores s, natural log.
//
// Mask: query i sees key j when j <= i (GEN_INDEX rows and columns, CMP_GE, BINARY_SELECT of
// -inf) and, with a window W > 0, when j + W > i (a second band, CMP_GT on the float column + W).
//
// The backward also writes two float buffers the caller provides (cuDNN's frontend carves them
// from its workspace): softmax_sum = rowsum(dO * O) (B, H, T, 1) and the fp32 dq accumulator
// (B, H, T, D), contiguous. Packed variable-length sequences are not expressed (see
// cudnn_attention.h).
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "runtime/cuda/attention_plan.h"

namespace moeforge::cuda::cudnn_graph {

enum class DataType { kF32, kBF16, kI32, kBool };

struct TensorDesc {
  int64_t uid = 0;
  std::string name;
  std::vector<int64_t> dims, strides;  // 4-D in cuDNN's (B, H, S, D) order; all 1 for a scalar
  DataType dtype = DataType::kF32;
  bool is_virtual = true;  // lives only inside the fused kernel
  bool by_value = false;   // a host scalar passed in the variant pack (value below, or the scale)
  float value = 0.0f;      // a by-value constant; the scale (uid kScale) is supplied per call
  // Stored in cuDNN's F16x16 reordered layout (the backward's fp32 dq accumulator, as
  // cudnn-frontend declares it; the caller zeroes it before every run).
  bool reorder_f16x16 = false;
};

enum class OpKind { kMatmul, kPointwise, kReduction, kReshape };
enum class PointwiseMode { kAdd, kSub, kMul, kDiv, kExp, kLog, kIdentity, kGenIndex, kCmpGe, kCmpGt, kBinarySelect };
enum class ReduceMode { kAdd, kMax };

// Matmul: y = x @ b (batch dims broadcast, grouped for GQA). Pointwise: y = mode(x, b, t), b and
// t broadcast (-1 when the mode takes fewer inputs); BINARY_SELECT is y = t ? x : b; GEN_INDEX is
// y = the index along `axis`. Reduction: y = reduce of x over the elements that map to each y
// element (a dim of size 1 in y reduces all of x's; H -> Hkv reduces each group). Reshape: y views
// x's memory with y's dims and strides.
struct OpDesc {
  std::string name;
  OpKind kind = OpKind::kPointwise;
  PointwiseMode pointwise = PointwiseMode::kIdentity;
  ReduceMode reduce = ReduceMode::kAdd;
  int64_t x = -1, b = -1, t = -1, y = -1;  // tensor uids
  DataType compute = DataType::kF32;
  int64_t axis = -1;  // GEN_INDEX only
};

// The unique ids of the tensors that live in memory (the variant pack); virtual ones count up
// from kFirstVirtual.
namespace uid {
constexpr int64_t kQ = 1, kK = 2, kV = 3, kO = 4, kStats = 5, kDO = 6, kDQ = 7, kDK = 8, kDV = 9;
constexpr int64_t kScale = 10, kNegInf = 11, kOne = 12, kWindow = 13;  // by-value scalars
constexpr int64_t kSoftmaxSum = 14, kDQAccum = 15;                      // backward scratch
constexpr int64_t kFirstVirtual = 100;
}  // namespace uid

struct Graph {
  std::vector<TensorDesc> tensors;
  std::vector<OpDesc> ops;
  // The tensor with this uid; throws if there is none.
  const TensorDesc& tensor(int64_t uid) const;
  // The non-virtual tensors, in uid order: what the variant pack binds.
  std::vector<const TensorDesc*> memory_tensors() const;
};

// Why the graphs here cannot express problem p (e.g. packed sequences, a head dim cuDNN's fused
// attention does not take); empty when they can. Names the field and the value.
std::string unsupported_reason(const flash::Problem& p, bool backward);

// The forward: reads q, k, v (and the scale), writes out and stats (= lse).
Graph forward_graph(const flash::Problem& p);
// The backward: reads q, k, v, out, dout, stats (and the scale), writes dq, dk, dv and the two
// scratch buffers.
Graph backward_graph(const flash::Problem& p);

// Bytes a non-virtual tensor spans in memory (the largest offset + 1, times the element size).
int64_t span_bytes(const TensorDesc& t);

// What a finalized plan is specialised for: sizes, window, direction and device. The scale is a
// by-value input of each execution, so one plan serves every scale.
struct PlanKey {
  int64_t B = 0, T = 0, H = 0, Hkv = 0, D = 0, window = 0;
  bool backward = false;
  int device = 0;
  bool operator==(const PlanKey&) const = default;
};
struct PlanKeyHash {
  size_t operator()(const PlanKey& k) const;
};
PlanKey plan_key(const flash::Problem& p, bool backward, int device);

}  // namespace moeforge::cuda::cudnn_graph
