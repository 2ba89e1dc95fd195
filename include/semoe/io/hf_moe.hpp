// semoe/io/hf_moe.hpp: the MoE blocks of Hugging Face checkpoints in and out.
//
// A checkpoint directory as `save_pretrained` writes it (config.json, then
// model.safetensors or shards named by model.safetensors.index.json) is read
// tensor by tensor, so only the blocks asked for are touched. The families
// and what they map to:
//
//   family       block prefix (layer l)                experts          router / gating
//   mixtral      model.layers.l.block_sparse_moe.      w1, w3, w2       gate: softmax top-k, normalized
//   qwen2_moe    model.layers.l.mlp.                   gate/up/down_proj softmax top-k (norm_topk_prob),
//                + shared_expert.*, shared_expert_gate  (sigmoid-gated shared expert)
//   qwen3_moe    model.layers.l.mlp.                   gate/up/down_proj softmax top-k (norm_topk_prob)
//   olmoe        model.layers.l.mlp.                   gate/up/down_proj softmax top-k (norm_topk_prob)
//   deepseek_v3  model.layers.l.mlp.                   gate/up/down_proj sigmoid top-k within groups,
//                + shared_experts.*                                      gate.e_score_correction_bias
//
// Every routed expert is a SwiGLU FFN without bias, down(silu(gate x) * up x):
// semoe's expert::ffn<act::swiglu> with W1 [hidden, 2 ffn] = [gate^T | up^T]
// and W2 [ffn, hidden] = down^T. The router weight [experts, hidden] is the
// layer's router [hidden, experts] transposed. Softmax families route with
// gate::top_k<K>, DeepSeek-V3 with gate::sigmoid_top_k<K>; shared experts
// come with layer::with_shared_experts. gate_options<Gate>(config) gives the
// gate options a family needs; loading checks the layer against the config
// and names any field that differs. Tensors may be F32, BF16, F16 or F64.
#pragma once

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <span>
#include <sstream>
#include <string>
#include <type_traits>
#include <vector>

#include <nlohmann/json.hpp>

#include "semoe/core/error.hpp"
#include "semoe/core/tensor.hpp"
#include "semoe/expert/activation.hpp"
#include "semoe/expert/ffn.hpp"
#include "semoe/gate/sigmoid_top_k.hpp"
#include "semoe/gate/top_k.hpp"
#include "semoe/io/model_file.hpp"
#include "semoe/io/safetensors.hpp"
#include "semoe/storage/concepts.hpp"

namespace semoe::io::hf {

enum class moe_family { mixtral, qwen2_moe, qwen3_moe, olmoe, deepseek_v3 };

inline const char* family_name(moe_family f) {
  switch (f) {
    case moe_family::mixtral: return "mixtral";
    case moe_family::qwen2_moe: return "qwen2_moe";
    case moe_family::qwen3_moe: return "qwen3_moe";
    case moe_family::olmoe: return "olmoe";
    case moe_family::deepseek_v3: return "deepseek_v3";
  }
  return "?";
}

/// What semoe needs from a config.json: the MoE block's shape and routing.
struct moe_config {
  moe_family family = moe_family::mixtral;
  index_t hidden = 0;
  index_t ffn = 0;  ///< one routed expert's width
  index_t experts = 0;
  index_t top_k = 0;
  index_t layers = 0;     ///< decoder layers (dense ones included)
  bool normalize = true;  ///< routed weights / their sum
  bool sigmoid = false;   ///< sigmoid scores with a selection bias (DeepSeek-V3); else softmax
  double scaling = 1.0;   ///< routed weights times this
  index_t groups = 1, top_groups = 1;
  index_t shared_ffn = 0;           ///< width of all shared experts together; 0: none
  bool shared_gated = false;        ///< shared output scaled by sigmoid(x . w) (Qwen2-MoE)
  std::vector<index_t> moe_layers;  ///< decoder layers that have a MoE block
  nlohmann::json raw;               ///< config.json as read (written back by save)

  bool is_moe_layer(index_t l) const { return std::find(moe_layers.begin(), moe_layers.end(), l) != moe_layers.end(); }
};

namespace detail {

using json = nlohmann::json;

inline std::string who(const std::string& source) { return "semoe::io::hf: '" + source + "': "; }

template <class V>
V field(const json& j, const char* key, const std::string& source) {
  SEMOE_CHECK(j.contains(key), who(source), "config has no \"", key, "\"");
  try {
    return j.at(key).get<V>();
  } catch (const json::exception& e) {
    ::semoe::detail::fail(who(source), "config field \"", key, "\" = ", j.at(key).dump(), ": ", e.what());
  }
}
template <class V>
V field_or(const json& j, const char* key, V fallback, const std::string& source) {
  return j.contains(key) && !j.at(key).is_null() ? field<V>(j, key, source) : fallback;
}

inline index_t positive(index_t v, const char* key, const std::string& source) {
  SEMOE_CHECK(v > 0 && v < (index_t{1} << 31), who(source), "config field \"", key, "\" = ", v,
              ": expected a positive size");
  return v;
}

/// Element i of a tensor's raw little-endian bytes as double.
inline double element(const std::byte* p, dtype t, std::size_t i) {
  switch (t) {
    case dtype::f32: {
      float v;
      std::memcpy(&v, p + 4 * i, 4);
      return v;
    }
    case dtype::f64: {
      double v;
      std::memcpy(&v, p + 8 * i, 8);
      return v;
    }
    case dtype::bf16: {
      std::uint16_t h;
      std::memcpy(&h, p + 2 * i, 2);
      return std::bit_cast<float>(static_cast<std::uint32_t>(h) << 16);
    }
    case dtype::f16: {
      std::uint16_t h;
      std::memcpy(&h, p + 2 * i, 2);
      const int sign = h >> 15, exp = (h >> 10) & 0x1f, man = h & 0x3ff;
      const double mag = exp == 0    ? std::ldexp(man, -24)
                         : exp == 31 ? (man ? NAN : INFINITY)
                                     : std::ldexp(1024 + man, exp - 25);
      return sign ? -mag : mag;
    }
    default: return NAN;  // refused by the caller
  }
}

/// The name of a block's tensors in `family` at decoder layer l.
inline std::string block_prefix(moe_family f, index_t l) {
  return "model.layers." + std::to_string(l) + (f == moe_family::mixtral ? ".block_sparse_moe." : ".mlp.");
}

/// An expert's three projections: gate (W1's first half), up (its second), down (W2).
struct projection_names {
  std::string gate, up, down;
};
inline projection_names expert_names(moe_family f, const std::string& base) {
  if (f == moe_family::mixtral) return {base + "w1.weight", base + "w3.weight", base + "w2.weight"};
  return {base + "gate_proj.weight", base + "up_proj.weight", base + "down_proj.weight"};
}
inline std::string shared_base(moe_family f, index_t l) {
  return block_prefix(f, l) + (f == moe_family::deepseek_v3 ? "shared_experts." : "shared_expert.");
}

}  // namespace detail

/// Reads the MoE fields of a config.json (as parsed JSON); `source` names it
/// in errors. Refuses model types and activations it does not map.
inline moe_config parse_config(const nlohmann::json& j, const std::string& source = "config.json") {
  using detail::field;
  using detail::field_or;
  using detail::positive;
  moe_config c;
  c.raw = j;
  const auto type = field<std::string>(j, "model_type", source);
  if (type == "mixtral") c.family = moe_family::mixtral;
  else if (type == "qwen2_moe") c.family = moe_family::qwen2_moe;
  else if (type == "qwen3_moe") c.family = moe_family::qwen3_moe;
  else if (type == "olmoe") c.family = moe_family::olmoe;
  else if (type == "deepseek_v3") c.family = moe_family::deepseek_v3;
  else
    ::semoe::detail::fail(detail::who(source), "model_type \"", type,
                          "\" is not a MoE family semoe maps; expected "
                          "mixtral, qwen2_moe, qwen3_moe, olmoe or deepseek_v3");
  const auto act = field_or<std::string>(j, "hidden_act", "silu", source);
  SEMOE_CHECK(act == "silu", detail::who(source), "hidden_act \"", act, "\": semoe maps SwiGLU (silu) experts only");
  c.hidden = positive(field<index_t>(j, "hidden_size", source), "hidden_size", source);
  c.layers = positive(field<index_t>(j, "num_hidden_layers", source), "num_hidden_layers", source);
  c.top_k = positive(field<index_t>(j, "num_experts_per_tok", source), "num_experts_per_tok", source);
  switch (c.family) {
    case moe_family::mixtral:
      c.ffn = positive(field<index_t>(j, "intermediate_size", source), "intermediate_size", source);
      c.experts = positive(field<index_t>(j, "num_local_experts", source), "num_local_experts", source);
      for (index_t l = 0; l < c.layers; ++l) c.moe_layers.push_back(l);
      break;
    case moe_family::olmoe:
      c.ffn = positive(field<index_t>(j, "intermediate_size", source), "intermediate_size", source);
      c.experts = positive(field<index_t>(j, "num_experts", source), "num_experts", source);
      c.normalize = field_or<bool>(j, "norm_topk_prob", false, source);
      for (index_t l = 0; l < c.layers; ++l) c.moe_layers.push_back(l);
      break;
    case moe_family::qwen2_moe:
    case moe_family::qwen3_moe: {
      c.ffn = positive(field<index_t>(j, "moe_intermediate_size", source), "moe_intermediate_size", source);
      c.experts = positive(field<index_t>(j, "num_experts", source), "num_experts", source);
      c.normalize = field_or<bool>(j, "norm_topk_prob", c.family == moe_family::qwen3_moe, source);
      if (c.family == moe_family::qwen2_moe) {
        c.shared_ffn = field_or<index_t>(j, "shared_expert_intermediate_size", 0, source);
        c.shared_gated = c.shared_ffn > 0;
      }
      const auto step = positive(field_or<index_t>(j, "decoder_sparse_step", 1, source), "decoder_sparse_step", source);
      const auto dense = field_or<std::vector<index_t>>(j, "mlp_only_layers", {}, source);
      for (index_t l = 0; l < c.layers; ++l)
        if (std::find(dense.begin(), dense.end(), l) == dense.end() && (l + 1) % step == 0) c.moe_layers.push_back(l);
      break;
    }
    case moe_family::deepseek_v3: {
      c.ffn = positive(field<index_t>(j, "moe_intermediate_size", source), "moe_intermediate_size", source);
      c.experts = positive(field<index_t>(j, "n_routed_experts", source), "n_routed_experts", source);
      c.sigmoid = true;
      c.normalize = field_or<bool>(j, "norm_topk_prob", true, source);
      c.scaling = field_or<double>(j, "routed_scaling_factor", 1.0, source);
      c.groups = positive(field_or<index_t>(j, "n_group", 1, source), "n_group", source);
      c.top_groups = positive(field_or<index_t>(j, "topk_group", 1, source), "topk_group", source);
      c.shared_ffn = field_or<index_t>(j, "n_shared_experts", 0, source) * c.ffn;
      const auto first = field_or<index_t>(j, "first_k_dense_replace", 0, source);
      const auto freq = positive(field_or<index_t>(j, "moe_layer_freq", 1, source), "moe_layer_freq", source);
      for (index_t l = first; l < c.layers; ++l)
        if (l % freq == 0) c.moe_layers.push_back(l);
      break;
    }
  }
  SEMOE_CHECK(c.top_k <= c.experts, detail::who(source), "num_experts_per_tok = ", c.top_k, " exceeds the ", c.experts,
              " experts");
  SEMOE_CHECK(c.shared_ffn >= 0 && std::isfinite(c.scaling) && c.scaling > 0, detail::who(source),
              "shared expert width ", c.shared_ffn, " or routed_scaling_factor ", c.scaling, " is out of range");
  return c;
}

/// The options of `Gate` that route as the config says: dropless (the
/// published blocks drop nothing), no auxiliary losses, the family's
/// normalization; DeepSeek-V3's groups, scaling and aux-free bias.
template <class Gate>
typename Gate::options gate_options(const moe_config& c) {
  typename Gate::options o{};
  o.dropless = true;
  o.aux_loss_coef = 0;
  o.z_loss_coef = 0;
  o.normalize = c.normalize;
  if constexpr (requires {
                  o.groups;
                  o.scaling;
                }) {
    o.balance = gate::balance_mode::aux_free;
    o.scaling = c.scaling;
    o.groups = c.groups;
    o.top_groups = c.top_groups;
  } else {
    o.balance = gate::balance_mode::none;
  }
  return o;
}

/// A checkpoint directory, opened once: its config and, for every tensor,
/// the file that holds it (from model.safetensors.index.json when sharded).
class checkpoint {
 public:
  static checkpoint open(const std::filesystem::path& dir) {
    checkpoint ck;
    ck.dir_ = dir;
    const auto cfg_path = dir / "config.json";
    ck.config_ = parse_config(read_json(cfg_path), cfg_path.string());
    const auto index = dir / "model.safetensors.index.json";
    if (std::filesystem::exists(index)) {
      const auto j = read_json(index);
      SEMOE_CHECK(j.contains("weight_map") && j.at("weight_map").is_object(), detail::who(index.string()),
                  "no \"weight_map\" object");
      std::map<std::string, std::size_t> file_of;
      for (const auto& [name, file] : j.at("weight_map").items()) {
        SEMOE_CHECK(file.is_string(), detail::who(index.string()), "weight_map[\"", name, "\"] is not a file name");
        const auto f = file.get<std::string>();
        SEMOE_CHECK(!f.empty() && f.find('/') == std::string::npos && f != "." && f != "..",
                    detail::who(index.string()), "weight_map[\"", name, "\"] = \"", f,
                    "\": expected a file name in the checkpoint's directory");
        auto [it, fresh] = file_of.emplace(f, ck.files_.size());
        if (fresh) ck.files_.push_back(safetensors_file::open(dir / f));
        SEMOE_CHECK(ck.files_[it->second].contains(name), detail::who(index.string()), "tensor '", name,
                    "' is mapped to '", f, "', which does not hold it");
        ck.where_.emplace(name, it->second);
      }
    } else {
      const auto single = dir / "model.safetensors";
      SEMOE_CHECK(std::filesystem::exists(single), "semoe::io::hf: '", dir.string(),
                  "' holds neither model.safetensors nor model.safetensors.index.json");
      ck.files_.push_back(safetensors_file::open(single));
      for (const auto& t : ck.files_[0].tensors()) ck.where_.emplace(t.name, 0);
    }
    return ck;
  }

  const moe_config& config() const { return config_; }
  const std::filesystem::path& dir() const { return dir_; }
  bool contains(const std::string& name) const { return where_.contains(name); }
  /// Every tensor name, sorted.
  std::vector<std::string> names() const {
    std::vector<std::string> v;
    for (const auto& [n, f] : where_) v.push_back(n);
    return v;
  }
  /// The tensor's file, shape and dtype.
  const tensor_info& info(const std::string& name) const { return file(name).at(name); }
  const safetensors_file& file(const std::string& name) const {
    const auto it = where_.find(name);
    SEMOE_CHECK(it != where_.end(), "semoe::io::hf: the checkpoint in '", dir_.string(), "' has no tensor '", name,
                "'");
    return files_[it->second];
  }

  /// The tensor `name`, which must have exactly `shape`, as T (F32, F64,
  /// BF16 and F16 convert; each value must be finite).
  template <class T>
  std::vector<T> read(const std::string& name, const std::vector<std::int64_t>& shape) const {
    const safetensors_file& f = file(name);
    const tensor_info& t = f.at(name);
    SEMOE_CHECK(t.shape == shape, "semoe::io::hf: '", f.source(), "': tensor '", name, "' has shape ",
                nlohmann::json(t.shape).dump(), "; expected ", nlohmann::json(shape).dump());
    SEMOE_CHECK(t.type == dtype::f32 || t.type == dtype::f64 || t.type == dtype::bf16 || t.type == dtype::f16,
                "semoe::io::hf: '", f.source(), "': tensor '", name, "' is ", dtype_name(t.type),
                "; expected F32, F64, BF16 or F16");
    std::vector<std::byte> raw(static_cast<std::size_t>(t.bytes()));
    f.read(name, raw);
    std::vector<T> out(static_cast<std::size_t>(t.elements()));
    for (std::size_t i = 0; i < out.size(); ++i) {
      const double v = detail::element(raw.data(), t.type, i);
      SEMOE_CHECK(std::isfinite(v), "semoe::io::hf: '", f.source(), "': tensor '", name, "' element ", i, " is ", v);
      out[i] = static_cast<T>(v);
    }
    return out;
  }

 private:
  static nlohmann::json read_json(const std::filesystem::path& p) {
    std::ifstream in(p);
    SEMOE_CHECK(in, "semoe::io::hf: cannot open '", p.string(), "'");
    std::stringstream s;
    s << in.rdbuf();
    try {
      return nlohmann::json::parse(s.str());
    } catch (const nlohmann::json::exception& e) {
      ::semoe::detail::fail("semoe::io::hf: '", p.string(), "' is not valid JSON: ", e.what());
    }
  }

  std::filesystem::path dir_;
  moe_config config_;
  std::vector<safetensors_file> files_;
  std::map<std::string, std::size_t> where_;
};

namespace detail {

/// An expert block of ffn<swiglu> (no bias) from the three projections:
/// W1 [H, 2F] = [gate^T | up^T], then W2 [F, H] = down^T.
template <class T>
void expert_block_from(const checkpoint& ck, const projection_names& n, index_t H, index_t F, std::span<T> block) {
  SEMOE_CHECK(static_cast<index_t>(block.size()) == H * 2 * F + F * H, "semoe::io::hf: the expert block holds ",
              block.size(), " values; a SwiGLU expert of hidden ", H, " and width ", F, " needs ", 3 * H * F);
  const auto gate = ck.read<T>(n.gate, {F, H}), up = ck.read<T>(n.up, {F, H}), down = ck.read<T>(n.down, {H, F});
  T* w1 = block.data();
  T* w2 = w1 + H * 2 * F;
  for (index_t j = 0; j < F; ++j)
    for (index_t i = 0; i < H; ++i) {
      w1[i * 2 * F + j] = gate[static_cast<std::size_t>(j * H + i)];
      w1[i * 2 * F + F + j] = up[static_cast<std::size_t>(j * H + i)];
    }
  for (index_t o = 0; o < H; ++o)
    for (index_t j = 0; j < F; ++j) w2[j * H + o] = down[static_cast<std::size_t>(o * F + j)];
}

/// The inverse: the three projections of a block, in the checkpoint's layout.
template <class T>
void projections_of(std::span<const T> block, index_t H, index_t F, std::vector<T>& gate, std::vector<T>& up,
                    std::vector<T>& down) {
  const T* w1 = block.data();
  const T* w2 = w1 + H * 2 * F;
  gate.resize(static_cast<std::size_t>(F * H));
  up.resize(gate.size());
  down.resize(gate.size());
  for (index_t j = 0; j < F; ++j)
    for (index_t i = 0; i < H; ++i) {
      gate[static_cast<std::size_t>(j * H + i)] = w1[i * 2 * F + j];
      up[static_cast<std::size_t>(j * H + i)] = w1[i * 2 * F + F + j];
    }
  for (index_t o = 0; o < H; ++o)
    for (index_t j = 0; j < F; ++j) down[static_cast<std::size_t>(o * F + j)] = w2[j * H + o];
}

/// The routed MoE layer of a block: itself, or the one a wrapper holds.
template <class L>
auto& routed(L& l) {
  if constexpr (requires { l.moe(); }) return l.moe();
  else return l;
}

/// The checks every load and save makes: SwiGLU experts without bias, and
/// the layer's sizes and gate options equal to the config's.
template <class L>
void check_layer(const moe_config& c, L& l, index_t layer, const std::string& who) {
  auto& m = routed(l);
  using M = std::remove_reference_t<decltype(m)>;
  static_assert(std::is_same_v<typename M::expert_type, expert::ffn<act::swiglu>>,
                "semoe::io::hf: Hugging Face MoE experts are SwiGLU FFNs: use expert::ffn<act::swiglu>");
  SEMOE_CHECK(c.is_moe_layer(layer), who, "decoder layer ", layer, " of this ", family_name(c.family),
              " model has no MoE block");
  const auto& o = m.opts();
  SEMOE_CHECK(!o.expert.bias, who, "the layer's experts have biases; Hugging Face MoE experts have none");
  SEMOE_CHECK(o.hidden == c.hidden && o.ffn == c.ffn && o.experts == c.experts, who, "the layer has hidden ", o.hidden,
              ", ffn ", o.ffn, ", ", o.experts, " experts; the checkpoint's block has ", c.hidden, ", ", c.ffn, ", ",
              c.experts);
  const auto& g = m.gate();
  SEMOE_CHECK(g.choices(c.experts) == c.top_k, who, "the layer's gate picks ", g.choices(c.experts),
              " experts per token; the config says num_experts_per_tok = ", c.top_k);
  const auto& go = g.opts();
  constexpr bool sigmoid = requires {
    go.groups;
    go.scaling;
  };
  SEMOE_CHECK(sigmoid == c.sigmoid, who, "the layer's gate is ", std::remove_cvref_t<decltype(g)>::name, "; ",
              family_name(c.family), " routes with ", c.sigmoid ? "gate::sigmoid_top_k" : "gate::top_k");
  SEMOE_CHECK(go.normalize == c.normalize, who, "the gate's options.normalize = ", go.normalize,
              "; the config's norm_topk_prob = ", c.normalize, " (use io::hf::gate_options)");
  if constexpr (sigmoid)
    SEMOE_CHECK(go.scaling == c.scaling && go.groups == c.groups && go.top_groups == c.top_groups &&
                    go.balance == gate::balance_mode::aux_free,
                who,
                "the gate's scaling, groups, top_groups or balance differ from the config's "
                "routed_scaling_factor, n_group, topk_group (and the selection bias needs balance_mode::aux_free); "
                "use io::hf::gate_options");
  constexpr bool wrapped = requires { l.moe(); };
  if constexpr (wrapped) {
    SEMOE_CHECK(c.shared_ffn > 0, who, "the layer has shared experts; this ", family_name(c.family), " block has none");
    SEMOE_CHECK(l.shared_expert().opts().ffn == c.shared_ffn && l.gated() == c.shared_gated, who,
                "the shared expert has width ", l.shared_expert().opts().ffn, (l.gated() ? ", gated" : ", ungated"),
                "; the checkpoint's has width ", c.shared_ffn, (c.shared_gated ? ", gated" : ", ungated"));
  } else {
    SEMOE_CHECK(c.shared_ffn == 0, who, "this ", family_name(c.family), " block has shared experts of width ",
                c.shared_ffn, ": wrap the layer in layer::with_shared_experts");
  }
}

}  // namespace detail

/// Loads decoder layer `layer`'s MoE block of `ck` into `l`: a basic_moe_layer
/// (this rank's experts only), or a layer::with_shared_experts around one.
/// Errors name the field or tensor that does not fit. Load before the first
/// forward (a ring store takes its weights then).
template <class Layer>
void load_moe_block(const checkpoint& ck, index_t layer, Layer& l) {
  const moe_config& c = ck.config();
  const std::string who =
      "semoe::io::hf::load_moe_block: '" + ck.dir().string() + "' layer " + std::to_string(layer) + ": ";
  detail::check_layer(c, l, layer, who);
  auto& m = detail::routed(l);
  using M = std::remove_reference_t<decltype(m)>;
  using T = typename M::value_type;
  static_assert(storage::visit_space_t<typename M::store_type>::host_accessible,
                "semoe::io::hf::load_moe_block: the layer's store must be visited in host memory");
  static_assert(!M::on_device, "semoe::io::hf::load_moe_block: load into a host layer; copy to a device layer after");
  const std::string prefix = detail::block_prefix(c.family, layer);
  const index_t H = c.hidden, E = c.experts, F = c.ffn;

  const auto router = ck.read<T>(prefix + "gate.weight", {E, H});
  auto params = m.parameters();
  std::span<T> wg = params[0].value;  // [H, E]
  for (index_t e = 0; e < E; ++e)
    for (index_t i = 0; i < H; ++i)
      wg[static_cast<std::size_t>(i * E + e)] = router[static_cast<std::size_t>(e * H + i)];
  if (c.sigmoid) {
    const auto bias = ck.read<double>(prefix + "gate.e_score_correction_bias", {E});
    m.gate().bias().assign(bias);
  }
  for (index_t i = 0; i < m.local_experts(); ++i) {
    const index_t e = m.first_expert() + i;
    const auto names = detail::expert_names(c.family, prefix + "experts." + std::to_string(e) + ".");
    m.store().visit(m.layer_id(), i,
                    [&](storage::block_ref<T> b) { detail::expert_block_from(ck, names, H, F, b.params); });
  }
  if constexpr (requires { l.moe(); }) {
    const auto base = detail::shared_base(c.family, layer);
    std::vector<T> block(l.shared_block().size());
    detail::expert_block_from(ck, detail::expert_names(c.family, base), H, c.shared_ffn, std::span<T>(block));
    std::copy(block.begin(), block.end(), l.shared_block().begin());
    if (c.shared_gated) {
      const auto w = ck.read<T>(prefix + "shared_expert_gate.weight", {1, H});
      std::copy(w.begin(), w.end(), l.shared_gate().begin());
    }
  }
}

/// Collects MoE blocks in a family's layout and writes them as a checkpoint
/// directory: config.json (the config's raw JSON), the tensors as F32 in
/// shards of at most max_shard_bytes (model.safetensors when one is enough)
/// and model.safetensors.index.json. Each file is written atomically; the
/// index comes last. Blocks must hold all their experts (one rank).
class writer {
 public:
  explicit writer(moe_config c) : c_(std::move(c)) {}

  template <class Layer>
  void add_block(index_t layer, Layer& l) {
    const std::string who = "semoe::io::hf::writer::add_block: layer " + std::to_string(layer) + ": ";
    detail::check_layer(c_, l, layer, who);
    auto& m = detail::routed(l);
    using M = std::remove_reference_t<decltype(m)>;
    using T = typename M::value_type;
    static_assert(storage::visit_space_t<typename M::store_type>::host_accessible && !M::on_device,
                  "semoe::io::hf::writer: save from a host layer");
    SEMOE_CHECK(m.local_experts() == c_.experts, who, "this rank holds ", m.local_experts(), " of the ", c_.experts,
                " experts; save from a model with all experts on one rank");
    const std::string prefix = detail::block_prefix(c_.family, layer);
    const index_t H = c_.hidden, E = c_.experts, F = c_.ffn;
    auto params = m.parameters();
    std::vector<float> router(static_cast<std::size_t>(E * H));
    for (index_t e = 0; e < E; ++e)
      for (index_t i = 0; i < H; ++i)
        router[static_cast<std::size_t>(e * H + i)] = static_cast<float>(params[0].value[i * E + e]);
    add(prefix + "gate.weight", {E, H}, std::move(router));
    if (c_.sigmoid) {
      const auto b = m.gate().bias().values();
      std::vector<float> bias(static_cast<std::size_t>(E), 0.0f);
      for (std::size_t e = 0; e < b.size() && e < bias.size(); ++e) bias[e] = static_cast<float>(b[e]);
      add(prefix + "gate.e_score_correction_bias", {E}, std::move(bias));
    }
    std::vector<T> g, u, d;
    auto add_expert = [&](const std::string& base, std::span<const T> block, index_t width) {
      detail::projections_of(block, H, width, g, u, d);
      const auto n = detail::expert_names(c_.family, base);
      add(n.gate, {width, H}, std::vector<float>(g.begin(), g.end()));
      add(n.up, {width, H}, std::vector<float>(u.begin(), u.end()));
      add(n.down, {H, width}, std::vector<float>(d.begin(), d.end()));
    };
    for (index_t e = 0; e < E; ++e)
      ::semoe::io::detail::visit_reading(m.store(), m.layer_id(), e, [&](storage::block_ref<T> b) {
        add_expert(prefix + "experts." + std::to_string(e) + ".", std::span<const T>(b.params), F);
      });
    if constexpr (requires { l.moe(); }) {
      add_expert(detail::shared_base(c_.family, layer), std::span<const T>(l.shared_block()), c_.shared_ffn);
      if (c_.shared_gated) {
        auto w = l.shared_gate();
        add(prefix + "shared_expert_gate.weight", {1, H}, std::vector<float>(w.begin(), w.end()));
      }
    }
  }

  /// Writes the directory (created if missing). Returns the files written.
  std::vector<std::string> write(const std::filesystem::path& dir,
                                 std::uint64_t max_shard_bytes = std::uint64_t{5} << 30) const {
    SEMOE_CHECK(!tensors_.empty(), "semoe::io::hf::writer::write: no block was added");
    SEMOE_CHECK(max_shard_bytes > 0, "semoe::io::hf::writer::write: max_shard_bytes = 0");
    std::filesystem::create_directories(dir);
    std::vector<std::vector<const std::pair<const std::string, tensor>*>> shards(1);
    std::uint64_t in_shard = 0, total = 0;
    for (const auto& kv : tensors_) {
      const std::uint64_t bytes = kv.second.values.size() * sizeof(float);
      if (!shards.back().empty() && in_shard + bytes > max_shard_bytes) {
        shards.emplace_back();
        in_shard = 0;
      }
      shards.back().push_back(&kv);
      in_shard += bytes;
      total += bytes;
    }
    std::vector<std::string> files;
    nlohmann::ordered_json map = nlohmann::ordered_json::object();
    for (std::size_t s = 0; s < shards.size(); ++s) {
      const std::string name = shards.size() == 1 ? "model.safetensors" : shard_name(s + 1, shards.size());
      safetensors_writer w;
      for (const auto* kv : shards[s]) {
        w.add(kv->first, kv->second.shape, kv->second.values);
        map[kv->first] = name;
      }
      w.set_metadata("format", "pt");
      w.write(dir / name);
      files.push_back(name);
    }
    write_text(dir / "config.json", c_.raw.dump(2) + "\n");
    files.push_back("config.json");
    if (shards.size() > 1) {
      nlohmann::ordered_json index;
      index["metadata"] = {{"total_size", total}};
      index["weight_map"] = std::move(map);
      write_text(dir / "model.safetensors.index.json", index.dump(2) + "\n");
      files.push_back("model.safetensors.index.json");
    }
    return files;
  }

 private:
  struct tensor {
    std::vector<std::int64_t> shape;
    std::vector<float> values;
  };

  void add(std::string name, std::vector<std::int64_t> shape, std::vector<float> values) {
    SEMOE_CHECK(!tensors_.contains(name), "semoe::io::hf::writer: tensor '", name, "' added twice");
    tensors_.emplace(std::move(name), tensor{std::move(shape), std::move(values)});
  }

  static std::string shard_name(std::size_t i, std::size_t n) {
    char buf[64];
    std::snprintf(buf, sizeof buf, "model-%05zu-of-%05zu.safetensors", i, n);
    return buf;
  }

  static void write_text(const std::filesystem::path& p, const std::string& text) {
    ::semoe::io::detail::write_atomically(p, "semoe::io::hf::writer::write", [&](int fd, const std::string& who) {
      ::semoe::io::detail::write_all(fd, text.data(), text.size(), who);
    });
  }

  moe_config c_;
  std::map<std::string, tensor> tensors_;
};

}  // namespace semoe::io::hf
