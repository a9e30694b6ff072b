// cuDNN's fused attention through the backend graph API (see cudnn_attention.h): the graphs of
// cudnn_attention_graph.h turned into backend descriptors, one per tensor and operation,
// finalized into an execution plan by heuristics mode A, cached per problem, executed with a
// variant pack on the device's compute stream.
#include "runtime/cuda/cudnn_attention.h"

#include <cudnn_graph.h>

#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include "runtime/cuda/cudnn_attention_graph.h"
#include "runtime/cuda/cuda_check.h"
#include "runtime/cuda/device.h"
#include "runtime/cuda/device_alloc.h"

namespace moeforge::cuda::cudnn_attention {
namespace {

namespace cg = cudnn_graph;

// The failed call, cuDNN's name for the status and its last error message (which says which
// attribute or engine constraint failed).
[[noreturn]] void cudnn_failed(cudnnStatus_t status, const std::string& call, const char* file, int line) {
  char last[2048] = "";
  cudnnGetLastErrorString(last, sizeof last);
  ::moeforge::detail::check_failed(
      file, line,
      fmt::format("cuDNN error {} in {}{}{}", cudnnGetErrorString(status), call, last[0] != '\0' ? ": " : "", last));
}

#define MOE_CUDNN_CHECK(stmt)                                                                     \
  do {                                                                                            \
    const cudnnStatus_t moe_cudnn_status_ = (stmt);                                               \
    if (moe_cudnn_status_ != CUDNN_STATUS_SUCCESS) [[unlikely]]                                   \
      cudnn_failed(moe_cudnn_status_, "`" #stmt "`", __FILE__, __LINE__);                         \
  } while (0)

// An owned backend descriptor. `what` names it in errors ("tensor q", "operation bmm1").
class Descriptor {
 public:
  Descriptor(cudnnBackendDescriptorType_t type, std::string what) : what_(std::move(what)) {
    MOE_CUDNN_CHECK(cudnnBackendCreateDescriptor(type, &d_));
  }
  ~Descriptor() {
    if (d_ != nullptr) (void)cudnnBackendDestroyDescriptor(d_);
  }
  Descriptor(Descriptor&& o) noexcept : d_(std::exchange(o.d_, nullptr)), what_(std::move(o.what_)) {}
  Descriptor& operator=(Descriptor&&) = delete;
  Descriptor(const Descriptor&) = delete;
  Descriptor& operator=(const Descriptor&) = delete;

  cudnnBackendDescriptor_t get() const { return d_; }
  const std::string& what() const { return what_; }

  void set(cudnnBackendAttributeName_t name, const char* name_text, cudnnBackendAttributeType_t type, int64_t count,
           const void* values) {
    const cudnnStatus_t status = cudnnBackendSetAttribute(d_, name, type, count, values);
    if (status != CUDNN_STATUS_SUCCESS)
      cudnn_failed(status, fmt::format("cudnnBackendSetAttribute({}) of {}", name_text, what_), __FILE__, __LINE__);
  }
  void set_desc(cudnnBackendAttributeName_t name, const char* name_text, const Descriptor& value) {
    cudnnBackendDescriptor_t raw = value.get();
    set(name, name_text, CUDNN_TYPE_BACKEND_DESCRIPTOR, 1, &raw);
  }
  // The status of cudnnBackendFinalize, for the callers that try alternatives (engine configs).
  cudnnStatus_t try_finalize() { return cudnnBackendFinalize(d_); }
  void finalize() {
    const cudnnStatus_t status = try_finalize();
    if (status != CUDNN_STATUS_SUCCESS)
      cudnn_failed(status, fmt::format("cudnnBackendFinalize of {}", what_), __FILE__, __LINE__);
  }

 private:
  cudnnBackendDescriptor_t d_ = nullptr;
  std::string what_;
};

#define MOE_CUDNN_SET(desc, attr, type, count, values) (desc).set(attr, #attr, type, count, values)
#define MOE_CUDNN_SET_DESC(desc, attr, value) (desc).set_desc(attr, #attr, value)

cudnnDataType_t cudnn_type(cg::DataType t) {
  switch (t) {
    case cg::DataType::kF32: return CUDNN_DATA_FLOAT;
    case cg::DataType::kBF16: return CUDNN_DATA_BFLOAT16;
    case cg::DataType::kI32: return CUDNN_DATA_INT32;
    case cg::DataType::kBool: return CUDNN_DATA_BOOLEAN;
  }
  MOE_THROW("cudnn attention: unknown data type {}", static_cast<int>(t));
}

cudnnPointwiseMode_t cudnn_mode(cg::PointwiseMode m) {
  switch (m) {
    case cg::PointwiseMode::kAdd: return CUDNN_POINTWISE_ADD;
    case cg::PointwiseMode::kSub: return CUDNN_POINTWISE_SUB;
    case cg::PointwiseMode::kMul: return CUDNN_POINTWISE_MUL;
    case cg::PointwiseMode::kDiv: return CUDNN_POINTWISE_DIV;
    case cg::PointwiseMode::kExp: return CUDNN_POINTWISE_EXP;
    case cg::PointwiseMode::kLog: return CUDNN_POINTWISE_LOG;
    case cg::PointwiseMode::kIdentity: return CUDNN_POINTWISE_IDENTITY;
    case cg::PointwiseMode::kGenIndex: return CUDNN_POINTWISE_GEN_INDEX;
    case cg::PointwiseMode::kCmpGe: return CUDNN_POINTWISE_CMP_GE;
    case cg::PointwiseMode::kCmpGt: return CUDNN_POINTWISE_CMP_GT;
    case cg::PointwiseMode::kBinarySelect: return CUDNN_POINTWISE_BINARY_SELECT;
  }
  MOE_THROW("cudnn attention: unknown pointwise mode {}", static_cast<int>(m));
}

// Every tensor is declared 16-byte aligned, which the fused (tensor-core) engines need; the
// callers' pointers are checked against it.
constexpr int64_t kAlignment = 16;

Descriptor make_tensor(const cg::TensorDesc& t) {
  Descriptor d(CUDNN_BACKEND_TENSOR_DESCRIPTOR, "tensor " + t.name);
  const cudnnDataType_t type = cudnn_type(t.dtype);
  MOE_CUDNN_SET(d, CUDNN_ATTR_TENSOR_DATA_TYPE, CUDNN_TYPE_DATA_TYPE, 1, &type);
  MOE_CUDNN_SET(d, CUDNN_ATTR_TENSOR_DIMENSIONS, CUDNN_TYPE_INT64, static_cast<int64_t>(t.dims.size()), t.dims.data());
  MOE_CUDNN_SET(d, CUDNN_ATTR_TENSOR_STRIDES, CUDNN_TYPE_INT64, static_cast<int64_t>(t.strides.size()),
                t.strides.data());
  MOE_CUDNN_SET(d, CUDNN_ATTR_TENSOR_UNIQUE_ID, CUDNN_TYPE_INT64, 1, &t.uid);
  MOE_CUDNN_SET(d, CUDNN_ATTR_TENSOR_BYTE_ALIGNMENT, CUDNN_TYPE_INT64, 1, &kAlignment);
  const bool yes = true;
  if (t.is_virtual) MOE_CUDNN_SET(d, CUDNN_ATTR_TENSOR_IS_VIRTUAL, CUDNN_TYPE_BOOLEAN, 1, &yes);
  if (t.by_value) MOE_CUDNN_SET(d, CUDNN_ATTR_TENSOR_IS_BY_VALUE, CUDNN_TYPE_BOOLEAN, 1, &yes);
  if (t.reorder_f16x16) {
    const cudnnBackendTensorReordering_t reorder = CUDNN_TENSOR_REORDERING_F16x16;
    MOE_CUDNN_SET(d, CUDNN_ATTR_TENSOR_REORDERING_MODE, CUDNN_TYPE_TENSOR_REORDERING_MODE, 1, &reorder);
  }
  d.finalize();
  return d;
}

// The operation descriptor of `op`, plus the descriptor it configures (matmul, pointwise,
// reduction), both appended to `keep`; returns the operation's index in `keep`.
size_t make_operation(const cg::OpDesc& op, const std::unordered_map<int64_t, size_t>& tensor_at,
                      std::vector<Descriptor>& keep) {
  const auto tensor = [&](int64_t uid) -> const Descriptor& { return keep[tensor_at.at(uid)]; };
  const cudnnDataType_t compute = cudnn_type(op.compute);
  switch (op.kind) {
    case cg::OpKind::kMatmul: {
      Descriptor mm(CUDNN_BACKEND_MATMUL_DESCRIPTOR, "matmul descriptor of " + op.name);
      const cudnnDataType_t f32 = CUDNN_DATA_FLOAT;
      MOE_CUDNN_SET(mm, CUDNN_ATTR_MATMUL_COMP_TYPE, CUDNN_TYPE_DATA_TYPE, 1, &f32);
      mm.finalize();
      Descriptor o(CUDNN_BACKEND_OPERATION_MATMUL_DESCRIPTOR, "operation " + op.name);
      MOE_CUDNN_SET_DESC(o, CUDNN_ATTR_OPERATION_MATMUL_ADESC, tensor(op.x));
      MOE_CUDNN_SET_DESC(o, CUDNN_ATTR_OPERATION_MATMUL_BDESC, tensor(op.b));
      MOE_CUDNN_SET_DESC(o, CUDNN_ATTR_OPERATION_MATMUL_CDESC, tensor(op.y));
      MOE_CUDNN_SET_DESC(o, CUDNN_ATTR_OPERATION_MATMUL_DESC, mm);
      o.finalize();
      keep.push_back(std::move(mm));
      keep.push_back(std::move(o));
      break;
    }
    case cg::OpKind::kPointwise: {
      Descriptor pw(CUDNN_BACKEND_POINTWISE_DESCRIPTOR, "pointwise descriptor of " + op.name);
      const cudnnPointwiseMode_t mode = cudnn_mode(op.pointwise);
      MOE_CUDNN_SET(pw, CUDNN_ATTR_POINTWISE_MODE, CUDNN_TYPE_POINTWISE_MODE, 1, &mode);
      MOE_CUDNN_SET(pw, CUDNN_ATTR_POINTWISE_MATH_PREC, CUDNN_TYPE_DATA_TYPE, 1, &compute);
      if (op.pointwise == cg::PointwiseMode::kGenIndex)
        MOE_CUDNN_SET(pw, CUDNN_ATTR_POINTWISE_AXIS, CUDNN_TYPE_INT64, 1, &op.axis);
      pw.finalize();
      Descriptor o(CUDNN_BACKEND_OPERATION_POINTWISE_DESCRIPTOR, "operation " + op.name);
      MOE_CUDNN_SET_DESC(o, CUDNN_ATTR_OPERATION_POINTWISE_PW_DESCRIPTOR, pw);
      MOE_CUDNN_SET_DESC(o, CUDNN_ATTR_OPERATION_POINTWISE_XDESC, tensor(op.x));
      if (op.b >= 0) MOE_CUDNN_SET_DESC(o, CUDNN_ATTR_OPERATION_POINTWISE_BDESC, tensor(op.b));
      if (op.t >= 0) MOE_CUDNN_SET_DESC(o, CUDNN_ATTR_OPERATION_POINTWISE_TDESC, tensor(op.t));
      MOE_CUDNN_SET_DESC(o, CUDNN_ATTR_OPERATION_POINTWISE_YDESC, tensor(op.y));
      const float one = 1.0f;
      MOE_CUDNN_SET(o, CUDNN_ATTR_OPERATION_POINTWISE_ALPHA1, CUDNN_TYPE_FLOAT, 1, &one);
      MOE_CUDNN_SET(o, CUDNN_ATTR_OPERATION_POINTWISE_ALPHA2, CUDNN_TYPE_FLOAT, 1, &one);
      o.finalize();
      keep.push_back(std::move(pw));
      keep.push_back(std::move(o));
      break;
    }
    case cg::OpKind::kReduction: {
      Descriptor red(CUDNN_BACKEND_REDUCTION_DESCRIPTOR, "reduction descriptor of " + op.name);
      const cudnnReduceTensorOp_t reduce =
          op.reduce == cg::ReduceMode::kMax ? CUDNN_REDUCE_TENSOR_MAX : CUDNN_REDUCE_TENSOR_ADD;
      MOE_CUDNN_SET(red, CUDNN_ATTR_REDUCTION_COMP_TYPE, CUDNN_TYPE_DATA_TYPE, 1, &compute);
      MOE_CUDNN_SET(red, CUDNN_ATTR_REDUCTION_OPERATOR, CUDNN_TYPE_REDUCTION_OPERATOR_TYPE, 1, &reduce);
      red.finalize();
      Descriptor o(CUDNN_BACKEND_OPERATION_REDUCTION_DESCRIPTOR, "operation " + op.name);
      MOE_CUDNN_SET_DESC(o, CUDNN_ATTR_OPERATION_REDUCTION_DESC, red);
      MOE_CUDNN_SET_DESC(o, CUDNN_ATTR_OPERATION_REDUCTION_XDESC, tensor(op.x));
      MOE_CUDNN_SET_DESC(o, CUDNN_ATTR_OPERATION_REDUCTION_YDESC, tensor(op.y));
      o.finalize();
      keep.push_back(std::move(red));
      keep.push_back(std::move(o));
      break;
    }
    case cg::OpKind::kReshape: {
      Descriptor o(CUDNN_BACKEND_OPERATION_RESHAPE_DESCRIPTOR, "operation " + op.name);
      MOE_CUDNN_SET_DESC(o, CUDNN_ATTR_OPERATION_RESHAPE_XDESC, tensor(op.x));
      MOE_CUDNN_SET_DESC(o, CUDNN_ATTR_OPERATION_RESHAPE_YDESC, tensor(op.y));
      o.finalize();
      keep.push_back(std::move(o));
      break;
    }
  }
  return keep.size() - 1;
}

// A finalized execution plan and everything it was built from (kept alive with it).
struct Plan {
  cg::Graph graph;
  std::vector<Descriptor> keep;  // tensors, operations, the operation graph, heuristics, configs
  size_t operation_graph = 0;    // its index in keep
  std::unique_ptr<Descriptor> plan;
  int64_t workspace_bytes = 0;
};

// The backend descriptors of `graph`, every tensor and operation, and its finalized operation
// graph: cuDNN's own validation of the graph, which needs no device (engines do).
std::unique_ptr<Plan> build_operation_graph(cg::Graph graph, const char* direction) {
  auto plan = std::make_unique<Plan>();
  plan->graph = std::move(graph);
  std::vector<Descriptor>& keep = plan->keep;
  keep.reserve(4 * (plan->graph.tensors.size() + plan->graph.ops.size()) + 8);

  std::unordered_map<int64_t, size_t> tensor_at;
  for (const cg::TensorDesc& t : plan->graph.tensors) {
    keep.push_back(make_tensor(t));
    tensor_at[t.uid] = keep.size() - 1;
  }
  std::vector<size_t> op_at;
  for (const cg::OpDesc& op : plan->graph.ops) op_at.push_back(make_operation(op, tensor_at, keep));
  std::vector<cudnnBackendDescriptor_t> ops;
  for (const size_t i : op_at) ops.push_back(keep[i].get());

  // No handle: cuDNN >= 9.8 does not need one (the attribute is deprecated).
  Descriptor graph_desc(CUDNN_BACKEND_OPERATIONGRAPH_DESCRIPTOR, fmt::format("the {} operation graph", direction));
  MOE_CUDNN_SET(graph_desc, CUDNN_ATTR_OPERATIONGRAPH_OPS, CUDNN_TYPE_BACKEND_DESCRIPTOR,
                static_cast<int64_t>(ops.size()), ops.data());
  graph_desc.finalize();
  keep.push_back(std::move(graph_desc));
  plan->operation_graph = keep.size() - 1;
  return plan;
}

// The operation graph, then the first engine config of heuristics mode A that finalizes into an
// execution plan.
std::unique_ptr<Plan> build_plan(cg::Graph graph, const char* direction) {
  std::unique_ptr<Plan> plan = build_operation_graph(std::move(graph), direction);
  std::vector<Descriptor>& keep = plan->keep;
  const Descriptor& graph_desc = keep[plan->operation_graph];

  // Heuristics mode A: the engine configs cuDNN recommends for this graph, best first.
  Descriptor heur(CUDNN_BACKEND_ENGINEHEUR_DESCRIPTOR, fmt::format("the {} heuristics (mode A)", direction));
  MOE_CUDNN_SET_DESC(heur, CUDNN_ATTR_ENGINEHEUR_OPERATION_GRAPH, graph_desc);
  const cudnnBackendHeurMode_t mode = CUDNN_HEUR_MODE_A;
  MOE_CUDNN_SET(heur, CUDNN_ATTR_ENGINEHEUR_MODE, CUDNN_TYPE_HEUR_MODE, 1, &mode);
  heur.finalize();
  int64_t count = 0;
  MOE_CUDNN_CHECK(cudnnBackendGetAttribute(heur.get(), CUDNN_ATTR_ENGINEHEUR_RESULTS, CUDNN_TYPE_BACKEND_DESCRIPTOR,
                                           0, &count, nullptr));
  if (count <= 0) {
    char last[1024] = "";
    cudnnGetLastErrorString(last, sizeof last);
    MOE_THROW("cuDNN's heuristics (mode A) found no engine for the {} attention graph{}{}", direction,
              last[0] != '\0' ? ": " : "", last);
  }
  std::vector<Descriptor> configs;
  std::vector<cudnnBackendDescriptor_t> raw_configs;
  for (int64_t i = 0; i < count; ++i) {
    configs.emplace_back(CUDNN_BACKEND_ENGINECFG_DESCRIPTOR, fmt::format("engine config {} of {}", i, direction));
    raw_configs.push_back(configs.back().get());
  }
  int64_t returned = 0;
  MOE_CUDNN_CHECK(cudnnBackendGetAttribute(heur.get(), CUDNN_ATTR_ENGINEHEUR_RESULTS, CUDNN_TYPE_BACKEND_DESCRIPTOR,
                                           count, &returned, raw_configs.data()));

  // The first recommended config that finalizes into a plan.
  std::string rejected;
  for (int64_t i = 0; i < returned && plan->plan == nullptr; ++i) {
    auto candidate = std::make_unique<Descriptor>(CUDNN_BACKEND_EXECUTION_PLAN_DESCRIPTOR,
                                                  fmt::format("the {} execution plan", direction));
    MOE_CUDNN_SET_DESC(*candidate, CUDNN_ATTR_EXECUTION_PLAN_ENGINE_CONFIG, configs[static_cast<size_t>(i)]);
    const cudnnStatus_t status = candidate->try_finalize();
    if (status == CUDNN_STATUS_SUCCESS) {
      plan->plan = std::move(candidate);
      break;
    }
    char last[1024] = "";
    cudnnGetLastErrorString(last, sizeof last);
    rejected += fmt::format("; config {}: {}{}{}", i, cudnnGetErrorString(status), last[0] != '\0' ? " " : "", last);
  }
  MOE_CHECK(plan->plan != nullptr, "none of the {} engine configs cuDNN's heuristics recommend for the {} attention "
            "graph finalizes into a plan{}", returned, direction, rejected);
  MOE_CUDNN_CHECK(cudnnBackendGetAttribute(plan->plan->get(), CUDNN_ATTR_EXECUTION_PLAN_WORKSPACE_SIZE,
                                           CUDNN_TYPE_INT64, 1, &count, &plan->workspace_bytes));
  keep.push_back(std::move(heur));
  for (Descriptor& c : configs) keep.push_back(std::move(c));
  return plan;
}

// The process-wide state: one handle per device (on its compute stream) and the plans. Never
// destroyed, like the DeviceContexts (destroying them at exit would race the driver's teardown).
struct State {
  std::mutex mu;
  std::unordered_map<int, cudnnHandle_t> handles;
  std::unordered_map<cg::PlanKey, std::unique_ptr<Plan>, cg::PlanKeyHash> plans;
};
State& state() {
  static State* s = new State;
  return *s;
}

// cuDNN 9.8 or newer (the operation graph without a handle), and not 9.10.0/9.10.1, whose fused
// bf16 attention has known bugs (cudnn-frontend refuses them too).
void check_version(const char* op) {
  const size_t v = cudnnGetVersion();
  MOE_CHECK(v >= 90800, "{}: cuDNN's fused attention needs cuDNN 9.8 or newer; the loaded libcudnn is version {}",
            op, v);
  MOE_CHECK(v < 91000 || v >= 91002,
            "{}: cuDNN {} has known bugs in its fused bf16 attention; use 9.10.2 or newer", op, v);
}

cudnnHandle_t handle_locked(State& s, int device) {
  const auto it = s.handles.find(device);
  if (it != s.handles.end()) return it->second;
  cudnnHandle_t h = nullptr;
  MOE_CUDNN_CHECK(cudnnCreate(&h));
  MOE_CUDNN_CHECK(cudnnSetStream(h, stream(device)));
  s.handles.emplace(device, h);
  return h;
}

// Device scratch from the caching allocator for one call (stream-ordered, see device_alloc.h).
class Scratch {
 public:
  Scratch(size_t bytes, int device) : bytes_(bytes), device_(device) {
    if (bytes_ > 0) ptr_ = device_alloc(bytes_, device_);
  }
  ~Scratch() {
    if (ptr_ != nullptr) device_free(ptr_, bytes_, device_);
  }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
  char* get() const { return static_cast<char*>(ptr_); }

 private:
  void* ptr_ = nullptr;
  size_t bytes_;
  int device_;
};

constexpr int64_t kScratchAlign = 256;
int64_t aligned(int64_t bytes) { return (bytes + kScratchAlign - 1) / kScratchAlign * kScratchAlign; }

void run(const char* op, bool backward, const flash::Problem& p, const flash::FlashArgs& a, int device) {
  const char* direction = backward ? "backward" : "forward";
  check_version(op);
  const std::string why = cg::unsupported_reason(p, backward);
  MOE_CHECK(why.empty(), "{}: cuDNN's fused attention cannot run this problem: {}", op, why);

  // The caller's tensors by graph uid.
  struct Bound {
    int64_t uid;
    const char* name;
    const void* ptr;
  };
  std::vector<Bound> bound{{cg::uid::kQ, "q", a.q},
                           {cg::uid::kK, "k", a.k},
                           {cg::uid::kV, "v", a.v},
                           {cg::uid::kO, "out", a.out},
                           {cg::uid::kStats, "lse", a.lse}};
  if (backward) {
    bound.push_back({cg::uid::kDO, "dout", a.dout});
    bound.push_back({cg::uid::kDQ, "dq", a.dq});
    bound.push_back({cg::uid::kDK, "dk", a.dk});
    bound.push_back({cg::uid::kDV, "dv", a.dv});
  }
  for (const Bound& b : bound)
    MOE_CHECK(reinterpret_cast<uintptr_t>(b.ptr) % kAlignment == 0,
              "{}: cuDNN's fused attention needs 16-byte aligned tensors; {} is at {}", op, b.name, b.ptr);

  const DeviceContext& ctx = context(device);  // makes `device` current for the plan build too
  State& s = state();
  const std::lock_guard<std::mutex> lock(s.mu);
  const cudnnHandle_t handle = handle_locked(s, device);
  const cg::PlanKey key = cg::plan_key(p, backward, device);
  auto it = s.plans.find(key);
  if (it == s.plans.end()) {
    std::unique_ptr<Plan> built;
    try {
      built = build_plan(backward ? cg::backward_graph(p) : cg::forward_graph(p), direction);
    } catch (const Error& e) {
      MOE_THROW("{}: building cuDNN's fused attention {} plan for B={} T={} H={} Hkv={} D={} window={} on device "
                "{} (compute capability {}.{}): {}",
                op, direction, p.B, p.T, p.H, p.Hkv, p.D, p.window, device, ctx.cc_major, ctx.cc_minor, e.what());
    }
    it = s.plans.emplace(key, std::move(built)).first;
  }
  const Plan& plan = *it->second;

  // Scratch: cuDNN's workspace, then (backward) softmax_sum and the fp32 dq accumulator.
  int64_t scratch_bytes = aligned(plan.workspace_bytes);
  std::vector<std::pair<int64_t, int64_t>> scratch_at;  // (uid, byte offset)
  for (const int64_t id : {cg::uid::kSoftmaxSum, cg::uid::kDQAccum}) {
    if (!backward) break;
    scratch_at.emplace_back(id, scratch_bytes);
    scratch_bytes += aligned(cg::span_bytes(plan.graph.tensor(id)));
  }
  const Scratch scratch(static_cast<size_t>(scratch_bytes), device);
  // The dq accumulator is summed into across key tiles: zero it first (the caching allocator
  // hands back used memory; cudnn-frontend clears it the same way).
  for (const auto& [id, offset] : scratch_at)
    if (id == cg::uid::kDQAccum)
      MOE_CUDA_CHECK(cudaMemsetAsync(scratch.get() + offset, 0,
                                     static_cast<size_t>(cg::span_bytes(plan.graph.tensor(id))), stream(device)));

  std::vector<int64_t> uids;
  std::vector<void*> pointers;
  std::vector<float> values;  // the by-value scalars, stable while cuDNN reads them
  values.reserve(plan.graph.tensors.size());
  for (const cg::TensorDesc* t : plan.graph.memory_tensors()) {
    void* ptr = nullptr;
    if (t->by_value) {
      values.push_back(t->uid == cg::uid::kScale ? a.scale : t->value);
      ptr = &values.back();
    } else {
      for (const Bound& b : bound)
        if (b.uid == t->uid) ptr = const_cast<void*>(b.ptr);
      for (const auto& [id, offset] : scratch_at)
        if (id == t->uid) ptr = scratch.get() + offset;
    }
    MOE_CHECK(ptr != nullptr, "{}: no memory bound to the {} graph's tensor {} (uid {})", op, direction, t->name,
              t->uid);
    uids.push_back(t->uid);
    pointers.push_back(ptr);
  }
  void* workspace = plan.workspace_bytes > 0 ? scratch.get() : nullptr;
  Descriptor pack(CUDNN_BACKEND_VARIANT_PACK_DESCRIPTOR, fmt::format("the {} variant pack", direction));
  MOE_CUDNN_SET(pack, CUDNN_ATTR_VARIANT_PACK_UNIQUE_IDS, CUDNN_TYPE_INT64, static_cast<int64_t>(uids.size()),
                uids.data());
  MOE_CUDNN_SET(pack, CUDNN_ATTR_VARIANT_PACK_DATA_POINTERS, CUDNN_TYPE_VOID_PTR,
                static_cast<int64_t>(pointers.size()), pointers.data());
  MOE_CUDNN_SET(pack, CUDNN_ATTR_VARIANT_PACK_WORKSPACE, CUDNN_TYPE_VOID_PTR, 1, &workspace);
  pack.finalize();
  const cudnnStatus_t status = cudnnBackendExecute(handle, plan.plan->get(), pack.get());
  if (status != CUDNN_STATUS_SUCCESS)
    cudnn_failed(status, fmt::format("cudnnBackendExecute of the {} plan ({})", direction, op), __FILE__, __LINE__);
}

}  // namespace

void forward(const char* op, const flash::Problem& p, const flash::FlashArgs& args, int device) {
  run(op, false, p, args, device);
}

void backward(const char* op, const flash::Problem& p, const flash::FlashArgs& args, int device) {
  run(op, true, p, args, device);
}

void validate_graph(const flash::Problem& p, bool backward) {
  const char* direction = backward ? "backward" : "forward";
  build_operation_graph(backward ? cg::backward_graph(p) : cg::forward_graph(p), direction);
}

size_t cached_plans() {
  State& s = state();
  const std::lock_guard<std::mutex> lock(s.mu);
  return s.plans.size();
}

}  // namespace moeforge::cuda::cudnn_attention
