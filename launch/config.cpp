#include "launch/config.h"

#include <google/protobuf/descriptor.h>
#include <google/protobuf/io/tokenizer.h>
#include <google/protobuf/text_format.h>

#include <cerrno>
#include <charconv>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <initializer_list>
#include <limits>
#include <map>
#include <memory>
#include <string_view>
#include <type_traits>

namespace moeforge {

namespace {

namespace pb = google::protobuf;
using config::RunConfig;

// ---- where each value came from ----------------------------------------------------------------

// The place that last set each field, by dotted path ("model.top_k"). `order` is 0 for the file
// and i + 1 for the i-th override, so a later override outranks the file and earlier overrides.
class Origins {
 public:
  explicit Origins(std::string source) : source_(std::move(source)) {}

  const std::string& source() const { return source_; }

  void record_file(const pb::Message& msg, const pb::TextFormat::ParseInfoTree& tree, const std::string& prefix) {
    const pb::Reflection* refl = msg.GetReflection();
    std::vector<const pb::FieldDescriptor*> fields;
    refl->ListFields(msg, &fields);
    for (const pb::FieldDescriptor* f : fields) {
      const std::string path = prefix + f->name();
      if (f->cpp_type() == pb::FieldDescriptor::CPPTYPE_MESSAGE) {
        if (const pb::TextFormat::ParseInfoTree* nested = tree.GetTreeForNested(f, -1)) {
          record_file(refl->GetMessage(msg, f), *nested, path + ".");
        }
      } else if (const auto loc = tree.GetLocation(f, -1); loc.line >= 0) {
        places_[path] = {fmt::format("{}:{}", source_, loc.line + 1), 0};
      }
    }
  }

  void record_override(const std::string& path, const std::string& where, int order) { places_[path] = {where, order}; }

  // Throws the one-line error for a rule over `fields`; fields.begin() is the field the message
  // names. The place is the last one that set any of the fields (the named field wins ties);
  // when none was set, the source with " (default value)" unless `note_default` is false.
  [[noreturn]] void fail(std::initializer_list<std::string_view> fields, const std::string& reason,
                         bool note_default = true) const {
    const Place* best = nullptr;
    for (std::string_view f : fields) {
      const auto it = places_.find(std::string(f));
      if (it != places_.end() && (best == nullptr || it->second.order > best->order)) best = &it->second;
    }
    const std::string_view named = *fields.begin();
    if (best != nullptr) throw ConfigError(fmt::format("{}: {}: {}", best->where, named, reason));
    throw ConfigError(fmt::format("{}: {}: {}{}", source_, named, reason, note_default ? " (default value)" : ""));
  }

 private:
  struct Place {
    std::string where;  // "file:line" or "--set path=value"
    int order = 0;
  };
  std::string source_;
  std::map<std::string, Place> places_;
};

// ---- parsing -----------------------------------------------------------------------------------

// Keeps protobuf's first syntax error (0-based line and column; the tokenizer advances the column
// to the next multiple of 8 at a tab).
class FirstErrorCollector : public pb::io::ErrorCollector {
 public:
  void AddError(int line, pb::io::ColumnNumber column, const std::string& message) override {
    if (has_error_) return;
    has_error_ = true;
    line_ = line;
    column_ = column;
    message_ = message;
  }
  bool has_error() const { return has_error_; }
  int line() const { return line_; }
  int column() const { return column_; }
  const std::string& message() const { return message_; }

 private:
  bool has_error_ = false;
  int line_ = -1, column_ = 0;
  std::string message_;
};

struct TextPosition {
  int line = 0, column = 0;  // 0-based, columns as protobuf's tokenizer counts them
};

// Moves `p` past byte `c` the way protobuf's tokenizer counts.
void advance(TextPosition& p, char c) {
  if (c == '\n') {
    ++p.line;
    p.column = 0;
  } else {
    p.column = c == '\t' ? p.column + 8 - p.column % 8 : p.column + 1;
  }
}

TextPosition position_at(std::string_view text, size_t offset) {
  TextPosition p;
  for (size_t i = 0; i < offset; ++i) advance(p, text[i]);
  return p;
}

size_t offset_of(std::string_view text, TextPosition want) {
  TextPosition p;
  size_t i = 0;
  while (i < text.size() && (p.line < want.line || (p.line == want.line && p.column < want.column)))
    advance(p, text[i++]);
  return i;
}

// "<source>:<line>:<col>: <protobuf's message>", 1-based. protobuf reports an unknown field or
// enum name, and a repeated singular field, at the token after the name (often on the next line);
// point at the name itself instead.
std::string syntax_error(std::string_view text, const std::string& source, const FirstErrorCollector& e) {
  if (e.line() < 0) return fmt::format("{}: {}", source, e.message());
  TextPosition at{e.line(), e.column()};
  for (std::string_view marker :
       {"has no field named \"", "Unknown enumeration value of \"", "Non-repeated field \""}) {
    const size_t begin = e.message().find(marker);
    if (begin == std::string::npos) continue;
    const size_t name_begin = begin + marker.size();
    const std::string name = e.message().substr(name_begin, e.message().find('"', name_begin) - name_begin);
    if (const size_t found = text.substr(0, offset_of(text, at)).rfind(name); found != std::string_view::npos) {
      at = position_at(text, found);
    }
    break;
  }
  return fmt::format("{}:{}:{}: {}", source, at.line + 1, at.column + 1, e.message());
}

void parse_text(const std::string& text, RunConfig& cfg, Origins& origins) {
  FirstErrorCollector errors;
  pb::TextFormat::ParseInfoTree tree;
  pb::TextFormat::Parser parser;
  parser.RecordErrorsTo(&errors);
  parser.WriteLocationsTo(&tree);
  if (!parser.ParseFromString(text, &cfg)) {
    MOE_CHECK(errors.has_error(), "parse_run_config: protobuf rejected {} without saying why", origins.source());
    throw ConfigError(syntax_error(text, origins.source(), errors));
  }
  origins.record_file(cfg, tree, "");
}

// ---- overrides ---------------------------------------------------------------------------------

template <typename T>
T parse_integer(const std::string& value, const pb::FieldDescriptor* f, const std::string& where) {
  T v{};
  const char* end = value.data() + value.size();
  const auto [ptr, ec] = std::from_chars(value.data(), end, v);
  if (ec == std::errc::result_out_of_range)
    throw ConfigError(fmt::format("{}: out of range for {}", where, f->type_name()));
  if (ec != std::errc() || ptr != end) {
    throw ConfigError(
        fmt::format("{}: {}", where, std::is_signed_v<T> ? "not an integer" : "not a non-negative integer"));
  }
  return v;
}

template <typename T>
T parse_real(const std::string& value, const pb::FieldDescriptor* f, const std::string& where) {
  double v = 0.0;
  const char* end = value.data() + value.size();
  const auto [ptr, ec] = std::from_chars(value.data(), end, v);
  if (ec == std::errc::invalid_argument || ptr != end) throw ConfigError(fmt::format("{}: not a number", where));
  if (ec == std::errc() && !std::isfinite(v)) throw ConfigError(fmt::format("{}: not a finite number", where));
  if (ec != std::errc() || std::fabs(v) > static_cast<double>(std::numeric_limits<T>::max())) {
    throw ConfigError(fmt::format("{}: out of range for {}", where, f->type_name()));
  }
  return static_cast<T>(v);
}

void set_scalar(pb::Message& msg, const pb::FieldDescriptor* f, const std::string& value, const std::string& where) {
  const pb::Reflection* refl = msg.GetReflection();
  switch (f->cpp_type()) {
    case pb::FieldDescriptor::CPPTYPE_INT32: refl->SetInt32(&msg, f, parse_integer<int32_t>(value, f, where)); return;
    case pb::FieldDescriptor::CPPTYPE_INT64: refl->SetInt64(&msg, f, parse_integer<int64_t>(value, f, where)); return;
    case pb::FieldDescriptor::CPPTYPE_UINT32:
      refl->SetUInt32(&msg, f, parse_integer<uint32_t>(value, f, where));
      return;
    case pb::FieldDescriptor::CPPTYPE_UINT64:
      refl->SetUInt64(&msg, f, parse_integer<uint64_t>(value, f, where));
      return;
    case pb::FieldDescriptor::CPPTYPE_FLOAT: refl->SetFloat(&msg, f, parse_real<float>(value, f, where)); return;
    case pb::FieldDescriptor::CPPTYPE_DOUBLE: refl->SetDouble(&msg, f, parse_real<double>(value, f, where)); return;
    case pb::FieldDescriptor::CPPTYPE_STRING: refl->SetString(&msg, f, value); return;
    case pb::FieldDescriptor::CPPTYPE_BOOL:
      if (value != "true" && value != "false" && value != "1" && value != "0") {
        throw ConfigError(fmt::format("{}: not a bool (true, false, 1 or 0)", where));
      }
      refl->SetBool(&msg, f, value == "true" || value == "1");
      return;
    case pb::FieldDescriptor::CPPTYPE_ENUM: {
      const pb::EnumDescriptor* type = f->enum_type();
      if (const pb::EnumValueDescriptor* v = type->FindValueByName(value)) {
        refl->SetEnum(&msg, f, v);
        return;
      }
      std::string names;
      for (int i = 0; i < type->value_count(); ++i) names += (i ? ", " : "") + type->value(i)->name();
      throw ConfigError(fmt::format("{}: not a value of {} ({})", where, type->full_name(), names));
    }
    case pb::FieldDescriptor::CPPTYPE_MESSAGE: break;
  }
  MOE_THROW("set_scalar: {} is a message", f->full_name());
}

// Applies "path.to.field=value": the path is resolved through the descriptors, the value parsed
// for the field's type.
void apply_override(RunConfig& cfg, const std::string& text, int order, Origins& origins) {
  const std::string where = "--set " + text;
  const size_t eq = text.find('=');
  if (eq == std::string::npos || eq == 0) throw ConfigError(where + ": expected path.to.field=value");
  const std::string path = text.substr(0, eq), value = text.substr(eq + 1);

  pb::Message* msg = &cfg;
  size_t begin = 0;
  while (true) {
    const size_t dot = path.find('.', begin);
    const std::string name = path.substr(begin, dot == std::string::npos ? std::string::npos : dot - begin);
    const pb::Descriptor* type = msg->GetDescriptor();
    const pb::FieldDescriptor* f = type->FindFieldByName(name);
    if (f == nullptr) throw ConfigError(fmt::format("{}: unknown field \"{}\" in {}", where, name, type->full_name()));
    if (f->is_repeated())
      throw ConfigError(fmt::format("{}: {} is a repeated field; --set sets single values", where, name));
    const bool is_message = f->cpp_type() == pb::FieldDescriptor::CPPTYPE_MESSAGE;
    if (dot == std::string::npos) {
      if (is_message) {
        throw ConfigError(fmt::format("{}: \"{}\" is a message; set one of its fields, e.g. {}.{}", where, name, path,
                                      f->message_type()->field(0)->name()));
      }
      set_scalar(*msg, f, value, where);
      break;
    }
    if (!is_message)
      throw ConfigError(fmt::format("{}: \"{}\" is a field of type {}, not a message", where, name, f->type_name()));
    msg = msg->GetReflection()->MutableMessage(msg, f);
    begin = dot + 1;
  }
  origins.record_override(path, where, order);
}

// ---- validation --------------------------------------------------------------------------------

template <typename T>
bool finite(T v) {
  if constexpr (std::is_floating_point_v<T>) {
    return std::isfinite(v);
  } else {
    return true;
  }
}

// "a * b = c", or "a * b" when the product does not fit in 64 bits.
std::string product_text(int64_t a, int64_t b) {
  int64_t c = 0;
  if (__builtin_mul_overflow(a, b, &c)) return fmt::format("{} * {}", a, b);
  return fmt::format("{} * {} = {}", a, b, c);
}

// The rules, in schema order; each failure names the field, the other fields of a cross-field
// rule with their values, and the reason. Fills head_dim and dp as soon as they are known good.
class Validator {
 public:
  Validator(RunConfig& cfg, const Origins& origins, int world_size)
      : cfg_(cfg), origins_(origins), world_(world_size) {}

  void run() {
    model();
    parallel();
    train();
    optim();
    data_checkpoint_logging();
  }

 private:
  template <typename T>
  void positive(std::string_view path, T v) const {
    if (!(finite(v) && v > 0)) origins_.fail({path}, fmt::format("must be > 0, got {}", v));
  }
  template <typename T>
  void non_negative(std::string_view path, T v) const {
    if (!(finite(v) && v >= 0)) origins_.fail({path}, fmt::format("must be >= 0, got {}", v));
  }
  // [0, 1) for Adam's betas.
  void unit_interval(std::string_view path, float v) const {
    if (!(v >= 0.0f && v < 1.0f)) origins_.fail({path}, fmt::format("must be in [0, 1), got {}", v));
  }
  // The field at `path` (value `value`) is a multiple of `other` (value `by`).
  void divisible(std::string_view path, int64_t value, std::string_view other, int64_t by) const {
    if (value % by != 0) {
      origins_.fail({path, other}, fmt::format("{} is not divisible by {} = {}", value, other, by));
    }
  }
  // The field at `path` (value `by`) divides `other` (value `value`).
  void divides(std::string_view path, int64_t by, std::string_view other, int64_t value) const {
    if (value % by != 0) origins_.fail({path, other}, fmt::format("{} does not divide {} = {}", by, other, value));
  }

  void model() {
    config::ModelConfig& m = *cfg_.mutable_model();
    if (m.vocab_size() < 259) {
      origins_.fail({"model.vocab_size"},
                    fmt::format("must be at least 259 (the byte-level tokenizer's 256 bytes + BOS, EOS, PAD), got {}",
                                m.vocab_size()));
    }
    positive("model.dim", m.dim());
    positive("model.n_layers", m.n_layers());
    positive("model.n_heads", m.n_heads());
    positive("model.n_kv_heads", m.n_kv_heads());
    divisible("model.n_heads", m.n_heads(), "model.n_kv_heads", m.n_kv_heads());
    if (m.head_dim() < 0)
      origins_.fail({"model.head_dim"},
                    fmt::format("must be >= 0 (0: model.dim / model.n_heads), got {}", m.head_dim()));
    if (m.head_dim() == 0) {
      if (m.dim() % m.n_heads() != 0) {
        origins_.fail(
            {"model.dim", "model.n_heads", "model.head_dim"},
            fmt::format("{} is not divisible by model.n_heads = {} (model.head_dim is 0, meaning dim / n_heads)",
                        m.dim(), m.n_heads()));
      }
      if ((m.dim() / m.n_heads()) % 2 != 0) {
        origins_.fail(
            {"model.head_dim", "model.dim", "model.n_heads"},
            fmt::format("model.dim / model.n_heads = {} / {} = {} must be even (RoPE rotates pairs of features)",
                        m.dim(), m.n_heads(), m.dim() / m.n_heads()));
      }
      m.set_head_dim(m.dim() / m.n_heads());
    } else if (m.head_dim() % 2 != 0) {
      origins_.fail({"model.head_dim"},
                    fmt::format("must be even (RoPE rotates pairs of features), got {}", m.head_dim()));
    }
    positive("model.n_experts", m.n_experts());
    if (m.top_k() < 1 || m.top_k() > m.n_experts()) {
      origins_.fail({"model.top_k", "model.n_experts"},
                    fmt::format("must be in [1, model.n_experts = {}], got {}", m.n_experts(), m.top_k()));
    }
    positive("model.expert_hidden", m.expert_hidden());
    non_negative("model.n_shared_experts", m.n_shared_experts());
    if (m.n_dense_layers() < 0 || m.n_dense_layers() > m.n_layers()) {
      origins_.fail({"model.n_dense_layers", "model.n_layers"},
                    fmt::format("must be in [0, model.n_layers = {}], got {}", m.n_layers(), m.n_dense_layers()));
    }
    non_negative("model.dense_hidden", m.dense_hidden());
    positive("model.rope_theta", m.rope_theta());
    positive("model.norm_eps", m.norm_eps());
    non_negative("model.aux_loss_coef", m.aux_loss_coef());
    non_negative("model.z_loss_coef", m.z_loss_coef());
    non_negative("model.capacity_factor", m.capacity_factor());
    non_negative("model.expert_bias_update_rate", m.expert_bias_update_rate());
    positive("model.init_std", m.init_std());
    positive("model.max_seq_len", m.max_seq_len());
    non_negative("model.sliding_window", m.sliding_window());
    if (m.document_start_token() < -1 || m.document_start_token() >= m.vocab_size()) {
      origins_.fail({"model.document_start_token", "model.vocab_size"},
                    fmt::format("must be -1 (off) or a token id in [0, model.vocab_size = {}), got {}", m.vocab_size(),
                                m.document_start_token()));
    }
    const config::TrainConfig& t = cfg_.train();
    if ((m.sliding_window() > 0 || m.document_start_token() >= 0) && t.device() == config::TrainConfig::CUDA &&
        t.precision() != config::TrainConfig::BF16) {
      origins_.fail({m.sliding_window() > 0 ? "model.sliding_window" : "model.document_start_token", "train.precision"},
                    "a sliding window or document masking on CUDA runs on the fused bf16 attention kernels: set "
                    "train.precision: BF16 (the f32 CUDA attention is plain causal)");
    }
  }

  void parallel() {
    const config::ModelConfig& m = cfg_.model();
    config::ParallelConfig& p = *cfg_.mutable_parallel();
    positive("parallel.tp", p.tp());
    positive("parallel.pp", p.pp());
    positive("parallel.ep", p.ep());
    non_negative("parallel.dp", p.dp());
    const int64_t tp_pp = int64_t{p.tp()} * p.pp();
    if (world_ % tp_pp != 0) {
      origins_.fail({"parallel.tp", "parallel.pp"},
                    fmt::format("parallel.tp * parallel.pp = {} does not divide the world size {}",
                                product_text(p.tp(), p.pp()), world_));
    }
    if (p.dp() == 0) {
      p.set_dp(static_cast<int32_t>(world_ / tp_pp));
    } else if (tp_pp * p.dp() != world_) {
      origins_.fail({"parallel.dp", "parallel.tp", "parallel.pp"},
                    fmt::format("parallel.tp * parallel.pp * parallel.dp = {} * {} * {} = {} does not equal the world "
                                "size {}",
                                p.tp(), p.pp(), p.dp(), tp_pp * p.dp(), world_));
    }
    // Expert parallelism regroups the TP x DP ranks of a stage (DESIGN.md, Parallelism).
    if ((int64_t{p.tp()} * p.dp()) % p.ep() != 0) {
      origins_.fail(
          {"parallel.ep", "parallel.tp", "parallel.dp"},
          fmt::format("{} does not divide parallel.tp * parallel.dp = {}", p.ep(), product_text(p.tp(), p.dp())));
    }
    divides("parallel.ep", p.ep(), "model.n_experts", m.n_experts());
    positive("parallel.virtual_stages", p.virtual_stages());
    const bool interleaved = p.pp_schedule() == config::ParallelConfig::INTERLEAVED_1F1B;
    if (interleaved != (p.virtual_stages() > 1)) {
      origins_.fail({"parallel.pp_schedule", "parallel.virtual_stages"},
                    interleaved ? std::string("INTERLEAVED_1F1B needs parallel.virtual_stages >= 2 model chunks per rank")
                                : fmt::format("parallel.virtual_stages = {} needs pp_schedule: INTERLEAVED_1F1B",
                                              p.virtual_stages()));
    }
    if (interleaved && p.pp() < 2) {
      origins_.fail({"parallel.pp_schedule", "parallel.pp"}, "INTERLEAVED_1F1B needs parallel.pp >= 2");
    }
    try {
      split_layers(m.n_layers(), p.pp(), p.virtual_stages(), p.pp_split());
    } catch (const Error& e) {
      const std::string_view what = e.what();
      if (what.starts_with("parallel.pp_split")) {
        origins_.fail({"parallel.pp_split"}, e.what());
      } else if (what.starts_with("parallel.virtual_stages")) {
        origins_.fail({"parallel.virtual_stages", "model.n_layers"}, e.what());
      } else {
        origins_.fail({"parallel.pp", "parallel.virtual_stages", "model.n_layers"}, e.what());
      }
    }
    divides("parallel.tp", p.tp(), "model.n_heads", m.n_heads());
    divides("parallel.tp", p.tp(), "model.n_kv_heads", m.n_kv_heads());
    // The vocabulary is padded up to a multiple of tp (models/transformer.h); the shared experts
    // are whole on every rank, like the routed ones: neither constrains tp.
    if ((cfg_.train().micro_batch() * cfg_.train().seq_len()) % p.tp() != 0) {
      origins_.fail({"parallel.tp", "train.micro_batch", "train.seq_len"},
                    fmt::format("{} does not divide the {} tokens of a micro-batch (train.micro_batch * "
                                "train.seq_len; sequence parallelism splits them over TP)",
                                p.tp(), cfg_.train().micro_batch() * cfg_.train().seq_len()));
    }
    if (p.zero_stage() != 0 && p.zero_stage() != 1) {
      origins_.fail({"parallel.zero_stage"}, fmt::format("must be 0 or 1, got {}", p.zero_stage()));
    }
    positive("parallel.collective_timeout_s", p.collective_timeout_s());
  }

  void train() {
    const config::TrainConfig& t = cfg_.train();
    const int64_t dp = cfg_.parallel().dp();
    positive("train.steps", t.steps());
    positive("train.global_batch", t.global_batch());
    positive("train.micro_batch", t.micro_batch());
    if (t.seq_len() < 1 || t.seq_len() > cfg_.model().max_seq_len()) {
      origins_.fail(
          {"train.seq_len", "model.max_seq_len"},
          fmt::format("must be in [1, model.max_seq_len = {}], got {}", cfg_.model().max_seq_len(), t.seq_len()));
    }
    divisible("train.global_batch", t.global_batch(), "train.micro_batch", t.micro_batch());
    // Every DP rank runs the same number of whole micro-batches per step.
    if ((t.global_batch() / t.micro_batch()) % dp != 0) {
      origins_.fail({"train.global_batch", "train.micro_batch", "parallel.dp"},
                    fmt::format("{} is not divisible by train.micro_batch * parallel.dp = {}", t.global_batch(),
                                product_text(t.micro_batch(), dp)));
    } else if (cfg_.parallel().pp_schedule() == config::ParallelConfig::INTERLEAVED_1F1B &&
               (t.global_batch() / t.micro_batch() / dp) % cfg_.parallel().pp() != 0) {
      origins_.fail({"train.global_batch", "train.micro_batch", "parallel.pp_schedule"},
                    fmt::format("the interleaved schedule runs micro-batches in groups of parallel.pp = {}; the {} "
                                "micro-batches per step and DP rank are not a multiple",
                                cfg_.parallel().pp(), t.global_batch() / t.micro_batch() / dp));
    }
    positive("train.log_every", t.log_every());
    non_negative("train.eval_every", t.eval_every());
    positive("train.eval_batches", t.eval_batches());
    non_negative("train.sample_tokens", t.sample_tokens());
    non_negative("train.sample_temperature", t.sample_temperature());
    non_negative("train.threads", t.threads());
    // (train.device CUDA is checked where the GPU is chosen, launch/trainer.h: run_device.)
    // A kernel choice applies to the fused bf16 attention on the GPU only; elsewhere it would be
    // silently ignored.
    if (t.attention_kernel() != config::TrainConfig::AUTO) {
      const std::string kernel(config::TrainConfig::AttentionKernel_Name(t.attention_kernel()));
      if (t.device() != config::TrainConfig::CUDA) {
        origins_.fail({"train.attention_kernel", "train.device"},
                      fmt::format("{} selects a kernel of the fused GPU attention and needs train.device: CUDA, got {}",
                                  kernel, config::TrainConfig::Device_Name(t.device())));
      }
      if (t.precision() != config::TrainConfig::BF16) {
        origins_.fail({"train.attention_kernel", "train.precision"},
                      fmt::format("{} selects a kernel of the fused bf16 attention and needs train.precision: BF16, "
                                  "got {} (fp32 attention runs the exact fp32 kernels)",
                                  kernel, config::TrainConfig::Precision_Name(t.precision())));
      }
      if (t.attention_kernel() == config::TrainConfig::CUDNN && cfg_.model().document_start_token() >= 0) {
        origins_.fail({"train.attention_kernel", "model.document_start_token"},
                      "CUDNN runs no packed documents (cuDNN's fused attention here has no variable-length mode); "
                      "use AUTO or set model.document_start_token: -1");
      }
      if (t.attention_kernel() == config::TrainConfig::CUDNN && !cuda::cudnn_attention_built()) {
        origins_.fail({"train.attention_kernel"},
                      "CUDNN needs a moeforge built with cuDNN 9 (the CUDA backend with cudnn.h and libcudnn found at "
                      "configure time); this one was built without it");
      }
    }
  }

  void optim() {
    const config::OptimConfig& o = cfg_.optim();
    positive("optim.lr", o.lr());
    if (!(o.min_lr() >= 0.0f && o.min_lr() <= o.lr())) {
      origins_.fail({"optim.min_lr", "optim.lr"},
                    fmt::format("must be in [0, optim.lr = {}], got {}", o.lr(), o.min_lr()));
    }
    if (o.warmup_steps() < 0 || o.warmup_steps() > cfg_.train().steps()) {
      origins_.fail({"optim.warmup_steps", "train.steps"},
                    fmt::format("must be in [0, train.steps = {}], got {}", cfg_.train().steps(), o.warmup_steps()));
    }
    if (!(o.decay_fraction() > 0.0f && o.decay_fraction() <= 1.0f)) {
      origins_.fail({"optim.decay_fraction"}, fmt::format("must be in (0, 1], got {}", o.decay_fraction()));
    }
    unit_interval("optim.beta1", o.beta1());
    unit_interval("optim.beta2", o.beta2());
    positive("optim.eps", o.eps());
    non_negative("optim.weight_decay", o.weight_decay());
    non_negative("optim.grad_clip", o.grad_clip());
  }

  void data_checkpoint_logging() {
    if (cfg_.data().train().empty()) {
      origins_.fail({"data.train"}, "required (a directory written by `moeforge data prepare`)", false);
    }
    non_negative("checkpoint.every", cfg_.checkpoint().every());
    if (cfg_.checkpoint().keep_last() < 1) {
      origins_.fail({"checkpoint.keep_last"}, fmt::format("must be >= 1, got {}", cfg_.checkpoint().keep_last()));
    }
    const config::LoggingConfig& l = cfg_.logging();
    if (l.dir().empty() && (l.jsonl() || l.tensorboard())) {
      origins_.fail({"logging.dir", "logging.jsonl", "logging.tensorboard"},
                    "required while logging.jsonl or logging.tensorboard is on");
    }
  }

  RunConfig& cfg_;
  const Origins& origins_;
  int world_;
};

// Sets every unset scalar field to its default, recursively, so the printed text is the whole
// effective configuration rather than only what the file happened to mention.
void set_every_field(pb::Message& msg) {
  const pb::Descriptor* type = msg.GetDescriptor();
  const pb::Reflection* refl = msg.GetReflection();
  for (int i = 0; i < type->field_count(); ++i) {
    const pb::FieldDescriptor* f = type->field(i);
    if (f->is_repeated()) continue;
    switch (f->cpp_type()) {
      case pb::FieldDescriptor::CPPTYPE_MESSAGE: set_every_field(*refl->MutableMessage(&msg, f)); break;
      case pb::FieldDescriptor::CPPTYPE_INT32: refl->SetInt32(&msg, f, refl->GetInt32(msg, f)); break;
      case pb::FieldDescriptor::CPPTYPE_INT64: refl->SetInt64(&msg, f, refl->GetInt64(msg, f)); break;
      case pb::FieldDescriptor::CPPTYPE_UINT32: refl->SetUInt32(&msg, f, refl->GetUInt32(msg, f)); break;
      case pb::FieldDescriptor::CPPTYPE_UINT64: refl->SetUInt64(&msg, f, refl->GetUInt64(msg, f)); break;
      case pb::FieldDescriptor::CPPTYPE_FLOAT: refl->SetFloat(&msg, f, refl->GetFloat(msg, f)); break;
      case pb::FieldDescriptor::CPPTYPE_DOUBLE: refl->SetDouble(&msg, f, refl->GetDouble(msg, f)); break;
      case pb::FieldDescriptor::CPPTYPE_BOOL: refl->SetBool(&msg, f, refl->GetBool(msg, f)); break;
      case pb::FieldDescriptor::CPPTYPE_ENUM: refl->SetEnum(&msg, f, refl->GetEnum(msg, f)); break;
      case pb::FieldDescriptor::CPPTYPE_STRING: refl->SetString(&msg, f, refl->GetString(msg, f)); break;
    }
  }
}

}  // namespace

config::RunConfig parse_run_config(const std::string& text, const std::string& source_name,
                                   const std::vector<std::string>& overrides, int world_size) {
  MOE_CHECK(world_size >= 1, "parse_run_config: world size must be >= 1, got {}", world_size);
  RunConfig cfg;
  Origins origins(source_name);
  parse_text(text, cfg, origins);
  for (size_t i = 0; i < overrides.size(); ++i) apply_override(cfg, overrides[i], static_cast<int>(i) + 1, origins);
  Validator(cfg, origins, world_size).run();
  return cfg;
}

config::RunConfig load_run_config(const std::string& path, const std::vector<std::string>& overrides, int world_size) {
  std::unique_ptr<std::FILE, int (*)(std::FILE*)> file(std::fopen(path.c_str(), "rb"), &std::fclose);
  if (!file) throw ConfigError(fmt::format("{}: cannot read config file ({})", path, std::strerror(errno)));
  std::string text;
  char buf[1 << 16];
  size_t n = 0;
  while ((n = std::fread(buf, 1, sizeof buf, file.get())) > 0) text.append(buf, n);
  // A directory opens but does not read (EISDIR).
  if (std::ferror(file.get()))
    throw ConfigError(fmt::format("{}: cannot read config file ({})", path, std::strerror(errno)));
  return parse_run_config(text, path, overrides, world_size);
}

PipelineSplit pipeline_split_from(const config::RunConfig& run) {
  const config::ParallelConfig& p = run.parallel();
  return split_layers(run.model().n_layers(), p.pp(), p.virtual_stages(), p.pp_split());
}

PipelineSchedule pipeline_schedule_from(const config::RunConfig& run) {
  switch (run.parallel().pp_schedule()) {
    case config::ParallelConfig::ONE_F_ONE_B: return PipelineSchedule::k1F1B;
    case config::ParallelConfig::GPIPE: return PipelineSchedule::kGPipe;
    case config::ParallelConfig::INTERLEAVED_1F1B: return PipelineSchedule::kInterleaved;
  }
  MOE_THROW("parallel.pp_schedule: unknown value {}", static_cast<int>(run.parallel().pp_schedule()));
}

ModelConfig model_config_from(const config::RunConfig& run) {
  const config::ModelConfig& p = run.model();
  MOE_CHECK(p.n_heads() > 0, "model_config_from: model.n_heads must be > 0, got {}", p.n_heads());
  ModelConfig m;
  m.vocab_size = p.vocab_size();
  m.dim = p.dim();
  m.n_layers = p.n_layers();
  m.n_heads = p.n_heads();
  m.n_kv_heads = p.n_kv_heads();
  m.head_dim = p.head_dim() != 0 ? p.head_dim() : p.dim() / p.n_heads();
  m.n_experts = p.n_experts();
  m.top_k = p.top_k();
  m.expert_hidden = p.expert_hidden();
  m.n_shared_experts = p.n_shared_experts();
  m.n_dense_layers = p.n_dense_layers();
  m.dense_hidden = p.dense_hidden() > 0 ? p.dense_hidden() : int64_t{p.top_k()} * p.expert_hidden();
  switch (p.gating()) {
    case config::ModelConfig::SOFTMAX_TOPK: m.gating = ops::Gating::kSoftmaxTopK; break;
    case config::ModelConfig::SIGMOID_TOPK: m.gating = ops::Gating::kSigmoidTopK; break;
  }
  m.rope_theta = p.rope_theta();
  m.norm_eps = p.norm_eps();
  m.tie_embeddings = p.tie_embeddings();
  m.aux_loss_coef = p.aux_loss_coef();
  m.z_loss_coef = p.z_loss_coef();
  m.init_std = p.init_std();
  m.recompute = p.recompute();
  m.capacity_factor = p.capacity_factor();
  m.expert_bias_update_rate = p.expert_bias_update_rate();
  m.sliding_window = p.sliding_window();
  m.document_start_token = p.document_start_token();
  return m;
}

cuda::AttentionKernelChoice attention_kernel_from(const config::RunConfig& run) {
  const config::TrainConfig::AttentionKernel k = run.train().attention_kernel();
  const std::string origin = "train.attention_kernel: " + std::string(config::TrainConfig::AttentionKernel_Name(k));
  switch (k) {
    case config::TrainConfig::AUTO: return {};
    case config::TrainConfig::MMA: return {cuda::AttentionKernel::kMma, origin};
    case config::TrainConfig::WGMMA: return {cuda::AttentionKernel::kWgmma, origin};
    case config::TrainConfig::CUDNN: return {cuda::AttentionKernel::kCudnn, origin};
  }
  MOE_THROW("train.attention_kernel: unknown value {}", static_cast<int>(k));
}

std::string to_text(const config::RunConfig& run) {
  RunConfig full = run;
  set_every_field(full);
  std::string text;
  MOE_CHECK(pb::TextFormat::PrintToString(full, &text), "to_text: cannot print the run config");
  return text;
}

}  // namespace moeforge
