#include "models/pipeline_split.h"

#include <numeric>

#include "runtime/error.h"

namespace moeforge {

PipelineSplit split_layers(int n_layers, int pp, int v, const std::string& spec) {
  MOE_CHECK(pp >= 1 && v >= 1, "pipeline: pp ({}) and virtual_stages ({}) must be >= 1", pp, v);
  const int G = pp * v;
  MOE_CHECK(G <= n_layers,
            "parallel.pp * parallel.virtual_stages = {} * {} = {} model chunks exceed model.n_layers = {} (every chunk "
            "needs a layer)",
            pp, v, G, n_layers);
  std::vector<int> counts;
  if (spec.empty()) {
    MOE_CHECK(v == 1 || n_layers % G == 0,
              "parallel.virtual_stages = {} does not divide the layers: model.n_layers = {} is not a multiple of "
              "parallel.pp * parallel.virtual_stages = {}; set parallel.pp_split for an uneven split",
              v, n_layers, G);
    for (int g = 0; g < G; ++g) counts.push_back(n_layers / G + (g < n_layers % G ? 1 : 0));
  } else {
    size_t at = 0;
    while (at <= spec.size()) {
      const size_t comma = spec.find(',', at);
      const std::string item = spec.substr(at, comma == std::string::npos ? std::string::npos : comma - at);
      size_t used = 0;
      int n = 0;
      try {
        n = std::stoi(item, &used);
      } catch (const std::exception&) {
        used = 0;
      }
      MOE_CHECK(used == item.size() && !item.empty() && n >= 1,
                "parallel.pp_split \"{}\": \"{}\" is not a positive layer count", spec, item);
      counts.push_back(n);
      if (comma == std::string::npos) break;
      at = comma + 1;
    }
    MOE_CHECK(static_cast<int>(counts.size()) == G,
              "parallel.pp_split \"{}\" has {} entries; it needs one per model chunk: parallel.pp * "
              "parallel.virtual_stages = {}",
              spec, counts.size(), G);
    const int total = std::accumulate(counts.begin(), counts.end(), 0);
    MOE_CHECK(total == n_layers, "parallel.pp_split \"{}\" sums to {} layers but model.n_layers = {}", spec, total,
              n_layers);
  }
  PipelineSplit s{pp, v, {0}};
  for (int n : counts) s.first_layer.push_back(s.first_layer.back() + n);
  return s;
}

}  // namespace moeforge
