// semoe/prefetch/expert_prediction.hpp: which experts of a layer the next
// forward will route rows to, the vertical half of 2D prefetch's guess. The
// gate's counts of a layer's latest forward (rows per local expert, which the
// all-to-all exchanged anyway: no extra communication) are kept by the store,
// shared by all layers; the prediction from them lives here. Experts that
// got rows last time are expected to get rows again (routing changes slowly
// from step to step); before anything is recorded, every expert is.
#pragma once

#include <span>
#include <vector>

#include "semoe/core/config.hpp"

namespace semoe::prefetch {

/// The experts 0..experts-1 expected to get rows, given the counts recorded
/// in the layer's latest forward (empty: none recorded yet).
inline std::vector<index_t> predict_experts(std::span<const std::int32_t> recorded, index_t experts) {
  std::vector<index_t> out;
  for (index_t e = 0; e < experts; ++e)
    if (recorded.empty() || (static_cast<std::size_t>(e) < recorded.size() && recorded[static_cast<std::size_t>(e)] > 0))
      out.push_back(e);
  return out;
}

}  // namespace semoe::prefetch
