#include "launch/cluster.h"

#include <google/protobuf/descriptor.h>
#include <google/protobuf/io/tokenizer.h>
#include <google/protobuf/text_format.h>

#include <cerrno>
#include <cmath>
#include <cstring>
#include <fstream>
#include <sstream>

#include <fmt/format.h>

#include "launch/config.h"

namespace moeforge {

namespace {

namespace pb = google::protobuf;

class FirstError : public pb::io::ErrorCollector {
 public:
  void AddError(int line, pb::io::ColumnNumber column, const std::string& message) override {
    if (!message_.empty()) return;
    line_ = line;
    column_ = column;
    message_ = message;
  }
  void AddWarning(int, pb::io::ColumnNumber, const std::string&) override {}
  int line_ = 0, column_ = 0;
  std::string message_;
};

// What each field means, for "required" messages.
struct FieldRule {
  const char* name;
  const char* meaning;
  bool at_most_one;  // a fraction in (0, 1]
};
constexpr FieldRule kRules[] = {
    {"gpus_per_node", "ranks per node", false},
    {"max_nodes", "the largest allocation, in nodes", false},
    {"gpu_memory_gib", "usable memory per GPU, GiB", false},
    {"peak_tflops_bf16", "dense bf16 peak per GPU, TFLOP/s", false},
    {"compute_efficiency", "fraction of the peak reached, in (0, 1]", true},
    {"hbm_gbps", "device memory bandwidth, GB/s", false},
    {"intra_node_gbps", "per-GPU bandwidth inside a node, GB/s", false},
    {"intra_node_latency_us", "per-message latency inside a node, microseconds", false},
    {"inter_node_gbps", "per-GPU bandwidth between nodes, GB/s", false},
    {"inter_node_latency_us", "per-message latency between nodes, microseconds", false},
};

double number(const pb::Message& msg, const pb::FieldDescriptor* f) {
  const pb::Reflection* r = msg.GetReflection();
  return f->cpp_type() == pb::FieldDescriptor::CPPTYPE_INT32 ? static_cast<double>(r->GetInt32(msg, f))
                                                             : r->GetDouble(msg, f);
}

}  // namespace

Cluster parse_cluster(const std::string& text, const std::string& source) {
  config::ClusterConfig c;
  pb::TextFormat::Parser parser;
  FirstError errors;
  pb::TextFormat::ParseInfoTree tree;
  parser.RecordErrorsTo(&errors);
  parser.WriteLocationsTo(&tree);
  if (!parser.ParseFromString(text, &c)) {
    throw ConfigError(fmt::format("{}:{}:{}: {}", source, errors.line_ + 1, errors.column_ + 1, errors.message_));
  }
  const pb::Descriptor* d = c.GetDescriptor();
  for (const FieldRule& rule : kRules) {
    const pb::FieldDescriptor* f = d->FindFieldByName(rule.name);
    if (!c.GetReflection()->HasField(c, f)) {
      throw ConfigError(fmt::format("{}: {}: required ({})", source, rule.name, rule.meaning));
    }
    const double v = number(c, f);
    const bool ok = std::isfinite(v) && v > 0 && (!rule.at_most_one || v <= 1);
    if (!ok) {
      const int line = tree.GetLocation(f, -1).line + 1;
      throw ConfigError(fmt::format("{}:{}: {}: must be {}, got {}", source, line, rule.name,
                                    rule.at_most_one ? "in (0, 1]" : "> 0", v));
    }
  }
  return Cluster{.name = c.name().empty() ? source : c.name(),
                 .gpus_per_node = c.gpus_per_node(),
                 .max_nodes = c.max_nodes(),
                 .gpu_memory_bytes = c.gpu_memory_gib() * 1073741824.0,
                 .peak_flops = c.peak_tflops_bf16() * 1e12,
                 .compute_efficiency = c.compute_efficiency(),
                 .hbm_bytes_per_s = c.hbm_gbps() * 1e9,
                 .intra_bytes_per_s = c.intra_node_gbps() * 1e9,
                 .intra_latency_s = c.intra_node_latency_us() * 1e-6,
                 .inter_bytes_per_s = c.inter_node_gbps() * 1e9,
                 .inter_latency_s = c.inter_node_latency_us() * 1e-6};
}

Cluster load_cluster(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw ConfigError(fmt::format("{}: cannot read cluster file ({})", path, std::strerror(errno)));
  std::ostringstream text;
  text << in.rdbuf();
  if (in.bad()) throw ConfigError(fmt::format("{}: cannot read cluster file ({})", path, std::strerror(errno)));
  return parse_cluster(text.str(), path);
}

}  // namespace moeforge
