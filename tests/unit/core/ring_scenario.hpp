// One ring-memory inference run, written once for every backend: three MoE
// layers served through a ring of two slots (so the ring turns), the input
// passed through them twice, the output brought back to the host. Tests run
// it on the cpu backend and on a device backend and compare.
#pragma once

#include <filesystem>
#include <memory>
#include <vector>

#include "semoe/comm/local.hpp"
#include "semoe/gate/top_k.hpp"
#include "semoe/infer/ring_engine.hpp"
#include "semoe/layer/moe_layer.hpp"

namespace semoe::test {

template <class B>
std::vector<float> ring_scenario(typename B::executor& ex, infer::ring_source source, const std::filesystem::path& dir,
                                 const std::vector<float>& x, index_t tokens, index_t hidden, index_t ffn,
                                 index_t experts) {
  using layer_t = basic_moe_layer<float, B, gate::top_k<2>, expert::ffn<act::gelu>, comm::local, infer::ring,
                                  infer::ring_release>;
  infer::ring::store_options o;
  o.slots = 2;
  o.source = source;
  o.ssd.dir = dir;
  auto ring = std::make_shared<typename layer_t::store_type>(o);
  auto world = comm::local::make_world(1);
  std::vector<std::unique_ptr<layer_t>> layers;
  for (int l = 0; l < 3; ++l) {
    layers.push_back(std::make_unique<layer_t>(
        ex, world[0],
        typename layer_t::options{.hidden = hidden, .ffn = ffn, .experts = experts, .seed = 20u + l}, ring));
    layers.back()->train(false);
  }
  buffer<float, typename B::memory_space> a(tokens * hidden), b(tokens * hidden);
  ex.copy(a.data(), x.data(), a.bytes());
  for (int pass = 0; pass < 2; ++pass)  // twice round: slots are reused
    for (auto& l : layers) {
      l->forward(matrix_view<const float>(a.matrix(tokens, hidden)), b.matrix(tokens, hidden));
      std::swap(a, b);
    }
  std::vector<float> out(static_cast<std::size_t>(tokens * hidden));
  ex.copy(out.data(), a.data(), a.bytes());
  return out;
}

}  // namespace semoe::test
