// semoe/io/model_file.hpp: a model's weights as one safetensors file, so a
// model trained with one storage policy is served with another (a ring for
// inference). Dense parameters keep their module names ("0.weight",
// "1.3.0.gamma"); each expert block is one tensor named per layer and expert
// in the style of Hugging Face MoE checkpoints:
// "model.layers.{l}.mlp.experts.{e}.block", l counting MoE layers in model
// order and e the global expert index. The file is written atomically.
#pragma once

#include <filesystem>
#include <string>
#include <vector>

#include "semoe/io/safetensors.hpp"
#include "semoe/train/optimizer.hpp"

namespace semoe::io {

namespace detail {

/// f(moe_layer_index, layer) over the model's MoE layers in order.
template <class Model, class F>
void for_each_indexed_moe_layer(Model& m, F&& f) {
  index_t i = 0;
  train::for_each_moe_layer(m, [&](auto& layer) { f(i++, layer); });
}

/// f(block) on a block, telling stores that can tell that f only reads it.
template <class Store, class F>
void visit_reading(Store& s, index_t layer, index_t expert, F&& f) {
  if constexpr (requires { s.visit(layer, expert, f, false); })
    s.visit(layer, expert, std::forward<F>(f), false);
  else
    s.visit(layer, expert, std::forward<F>(f));
}

}  // namespace detail

/// Write every dense parameter and this rank's expert blocks to `path`.
template <class Model>
void save_model(const std::filesystem::path& path, Model& model) {
  using T = typename decltype(model.parameters())::value_type::value_type;
  safetensors_writer w;
  for (auto& p : model.parameters())
    w.add(p.name, {static_cast<std::int64_t>(p.value.size())}, std::span<const T>(p.value));
  index_t layers = 0;
  detail::for_each_indexed_moe_layer(model, [&](index_t l, auto& layer) {
    ++layers;
    for (index_t e = 0; e < layer.local_experts(); ++e)
      detail::visit_reading(layer.store(), layer.layer_id(), e, [&](storage::block_ref<T> b) {
        w.add(expert_tensor_name(l, layer.first_expert() + e, "block"), {static_cast<std::int64_t>(b.params.size())},
              std::span<const T>(b.params));
      });
  });
  w.set_metadata("format", "semoe");
  w.set_metadata("moe_layers", std::to_string(layers));
  w.write(path);
}

/// Read `path` into a model built the same way (any storage policy): every
/// tensor the model has must be in the file with its exact size.
template <class Model>
void load_model(const std::filesystem::path& path, Model& model) {
  using T = typename decltype(model.parameters())::value_type::value_type;
  const auto file = safetensors_file::open(path);
  for (auto& p : model.parameters()) {
    SEMOE_CHECK(file.contains(p.name), "semoe::io::load_model: '", path.string(), "' has no tensor '", p.name, "'");
    file.read_as<T>(p.name, p.value);
  }
  detail::for_each_indexed_moe_layer(model, [&](index_t l, auto& layer) {
    for (index_t e = 0; e < layer.local_experts(); ++e) {
      const std::string name = expert_tensor_name(l, layer.first_expert() + e, "block");
      SEMOE_CHECK(file.contains(name), "semoe::io::load_model: '", path.string(), "' has no tensor '", name, "'");
      layer.store().visit(layer.layer_id(), e, [&](storage::block_ref<T> b) { file.read_as<T>(name, b.params); });
    }
  });
}

}  // namespace semoe::io
