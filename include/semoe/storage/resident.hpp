// semoe/storage/resident.hpp: every expert block in fast memory, the default.
// store<T> keeps blocks in host memory (the cpu backend's fast memory);
// store<T, device_space> keeps them in device memory, where visit() hands out
// device spans for the backend's kernels (the optimizer) to work on.
#pragma once

#include <vector>

#include "semoe/core/buffer.hpp"
#include "semoe/storage/concepts.hpp"

namespace semoe::storage {

struct resident {
  using policy_kind = storage_tag;

  /// All blocks of a layer in one allocation each for params, grads, state.
  template <class T, MemorySpace Space = host_space>
  class store {
   public:
    using value_type = T;
    using memory_space = Space;
    static constexpr bool moves_blocks = false;  ///< a block stays where it was made
    struct options {};  ///< nothing to configure: every block in fast memory
    store() = default;
    explicit store(options) {}
    index_t add_layer(index_t experts, index_t block_elems) {
      SEMOE_CHECK(experts >= 0 && block_elems > 0, "semoe::storage::resident: add_layer(experts = ", experts,
                  ", block_elems = ", block_elems, "): expected experts >= 0 and block_elems > 0");
      layer_data l;
      l.experts = experts;
      l.block = block_elems;
      zeroed(l.params, experts * block_elems);
      zeroed(l.grads, experts * block_elems);
      zeroed(l.state, state_slots_ * experts * block_elems);
      layers_.push_back(std::move(l));
      return static_cast<index_t>(layers_.size()) - 1;
    }
    index_t layers() const { return static_cast<index_t>(layers_.size()); }
    index_t experts(index_t layer) const { return at(layer).experts; }
    index_t block_elems(index_t layer) const { return at(layer).block; }
    index_t state_slots() const { return state_slots_; }

    /// Make room for `slots` optimizer-state arrays per block (zeroed).
    void reserve_state(index_t slots) {
      if (slots <= state_slots_) return;
      state_slots_ = slots;
      for (auto& l : layers_) zeroed(l.state, slots * l.experts * l.block);
    }

    block_ref<T> acquire(index_t layer, index_t expert) {
      auto& l = at(layer);
      SEMOE_CHECK(expert >= 0 && expert < l.experts, "semoe::storage::resident: expert ", expert,
                  " is not one of the ", l.experts, " local experts of layer ", layer);
      const auto b = static_cast<std::size_t>(l.block), e = static_cast<std::size_t>(expert);
      return {std::span<T>(l.params.data() + e * b, b), std::span<T>(l.grads.data() + e * b, b),
              std::span<T>(l.state.data() + e * b * static_cast<std::size_t>(state_slots_),
                           b * static_cast<std::size_t>(state_slots_))};
    }
    void release(index_t, index_t) {}

    template <class F>
    void visit(index_t layer, index_t expert, F&& f) {
      f(acquire(layer, expert));
    }

    /// Zero the gradients of one layer's blocks.
    void zero_grads(index_t layer) { at(layer).grads.zero(); }
    /// Zero every gradient block.
    void zero_grads() {
      for (auto& l : layers_) l.grads.zero();
    }

    /// Bytes held for params + grads + state.
    std::size_t bytes() const {
      std::size_t n = 0;
      for (const auto& l : layers_) n += l.params.bytes() + l.grads.bytes() + l.state.bytes();
      return n;
    }

   private:
    struct layer_data {
      index_t experts = 0, block = 0;
      buffer<T, Space> params, grads, state;
    };
    static void zeroed(buffer<T, Space>& b, index_t n) {
      b.resize_discard(n);
      b.zero();
    }
    layer_data& at(index_t layer) {
      SEMOE_CHECK(layer >= 0 && layer < layers(), "semoe::storage::resident: no layer ", layer);
      return layers_[static_cast<std::size_t>(layer)];
    }
    const layer_data& at(index_t layer) const {
      SEMOE_CHECK(layer >= 0 && layer < layers(), "semoe::storage::resident: no layer ", layer);
      return layers_[static_cast<std::size_t>(layer)];
    }
    std::vector<layer_data> layers_;
    index_t state_slots_ = 0;
  };
};

static_assert(Storage<resident>);

}  // namespace semoe::storage
