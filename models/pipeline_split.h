// How the layers are cut into pipeline model chunks (DESIGN.md, Parallelism: PP).
//
// G = pp * virtual_stages model chunks of contiguous layers; chunk g lives on pipeline rank
// g % pp as its virtual chunk g / pp (parallel/pipeline_schedule.h). The embedding belongs to
// chunk 0, the final norm, LM head and loss to chunk G - 1.
#pragma once

#include <string>
#include <vector>

namespace moeforge {

struct PipelineSplit {
  int pp = 1;
  int virtual_stages = 1;
  std::vector<int> first_layer;  // (G + 1) boundaries: chunk g holds [first_layer[g], first_layer[g+1])

  int chunks() const { return pp * virtual_stages; }
  // The model chunk of virtual chunk c on pipeline rank s.
  int model_chunk(int s, int c) const { return c * pp + s; }
};

// Cuts n_layers layers into pp * virtual_stages chunks: `spec` is "" (balanced: every chunk
// n_layers / G layers, the first n_layers % G chunks one more; with virtual stages the layers must
// divide evenly) or comma-separated counts ("3,1"). Throws moeforge::Error naming the rule broken.
PipelineSplit split_layers(int n_layers, int pp, int virtual_stages, const std::string& spec);

}  // namespace moeforge
