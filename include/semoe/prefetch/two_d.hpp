// semoe/prefetch/two_d.hpp: SE-MoE's 2D prefetch (§3.2). Vertically, the
// experts of the next Depth layers move SSD -> DRAM -> device as in
// vertical<Depth>; horizontally, dense parameters stay sharded over the
// data-parallel ranks (each keeps 1/n of them and of their optimizer state,
// ZeRO-3 style) and layer i+1's are all-gathered in one fused buffer while
// layer i computes; gradients are reduce-scattered layer by layer while
// backward runs. The two halves live beside this file: vertical.hpp (with
// expert_prediction.hpp) and dense_shards.hpp. The trainer sees `horizontal`
// on a layer's prefetch policy and installs dense_shards on the model.
#pragma once

#include "semoe/prefetch/vertical.hpp"

namespace semoe::prefetch {

template <int Depth = 2>
struct two_d : vertical<Depth> {
  static constexpr bool horizontal = true;
};

static_assert(Prefetcher<two_d<1>> && Prefetcher<two_d<2>>);

}  // namespace semoe::prefetch
