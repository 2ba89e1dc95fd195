// semoe/train/portable_checkpoint.hpp: checkpoints that do not depend on the
// parallel layout. Saved on W ranks with expert-parallel size EP, a checkpoint
// loads on any number of ranks with any expert-parallel size: each rank reads
// the experts it owns now from whichever files hold them.
//
// A checkpoint is a directory:
//   dense.safetensors                   dense parameters, their optimizer
//                                       state and gate state (world rank 0)
//   experts-00001-of-00004.safetensors  the expert blocks of one expert-
//                                       parallel rank and their optimizer
//                                       state (the ranks of replica 0)
//   manifest.json                       step, optimizer step count, data
//                                       position, the layout it was saved on,
//                                       which file holds which expert, and
//                                       each file's size and XXH3 checksum
// Tensors have Hugging Face-style names: dense parameters their module names
// ("0.weight", "1.3.0.gamma"), expert e of MoE layer l
// "model.layers.{l}.mlp.experts.{e}.block", the aux-loss-free gate bias
// "model.layers.{l}.mlp.gate.aux_free_bias", and optimizer slot s of tensor N
// "optimizer.state.{s}.N" (AdamW: 0 = first moment, 1 = second).
//
// Every file goes to a temporary name, is fsynced and renamed; the manifest
// is written last by rank 0, after every rank has written its file, so a
// directory with a manifest is a complete checkpoint and a crash leaves none.
// The directory must be one every rank can read and write (a shared file
// system across hosts). Loading checks each file's checksum before reading
// it and refuses a missing expert, a wrong shape or a bad checksum with an
// error naming the tensor and the file.
#pragma once

#include <algorithm>
#include <charconv>
#include <cstdint>
#include <cstdio>
#include <exception>
#include <filesystem>
#include <fstream>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>
#include <xxhash.h>

#include "semoe/core/error.hpp"
#include "semoe/io/model_file.hpp"
#include "semoe/io/safetensors.hpp"
#include "semoe/train/optimizer.hpp"
#include "semoe/train/trainer.hpp"

namespace semoe::train {

/// What a portable checkpoint records besides the tensors.
struct checkpoint_info {
  std::uint64_t step = 0;           ///< trainer steps taken when it was saved
  std::uint64_t data_position = 0;  ///< the caller's place in its data order (samples consumed)
  int world_size = 0;               ///< ranks it was saved on
  int expert_parallel = 0;          ///< expert-parallel size it was saved with
};

namespace detail {

inline constexpr const char* portable_format = "semoe.portable_checkpoint";
inline constexpr int portable_version = 1;

inline std::string expert_file_name(int rank, int ranks) {
  char b[64];
  std::snprintf(b, sizeof b, "experts-%05d-of-%05d.safetensors", rank, ranks);
  return b;
}

inline std::string state_name(index_t slot, const std::string& tensor) {
  return "optimizer.state." + std::to_string(slot) + "." + tensor;
}

inline std::string gate_bias_name(index_t layer) {
  return "model.layers." + std::to_string(layer) + ".mlp.gate.aux_free_bias";
}

/// Bytes and XXH3-64 of a whole file, read in 1 MiB pieces.
struct file_digest {
  std::uint64_t bytes = 0, xxh3 = 0;
};
inline file_digest digest_file(const std::filesystem::path& p, const std::string& who) {
  std::ifstream f(p, std::ios::binary);
  SEMOE_CHECK(f.good(), who, ": cannot open '", p.string(), "'");
  XXH3_state_t* s = XXH3_createState();
  XXH3_64bits_reset(s);
  std::vector<char> buf(std::size_t{1} << 20);
  file_digest d;
  while (f) {
    f.read(buf.data(), static_cast<std::streamsize>(buf.size()));
    const auto n = static_cast<std::size_t>(f.gcount());
    XXH3_64bits_update(s, buf.data(), n);
    d.bytes += n;
  }
  const bool bad = f.bad();
  d.xxh3 = XXH3_64bits_digest(s);
  XXH3_freeState(s);
  SEMOE_CHECK(!bad, who, ": reading '", p.string(), "' failed");
  return d;
}

inline std::string hex64(std::uint64_t v) {
  char b[17];
  std::snprintf(b, sizeof b, "%016llx", static_cast<unsigned long long>(v));
  return b;
}

/// Every rank learns whether every rank got through a phase: a rank that
/// failed rethrows its own error, the others fail with the first failed
/// rank's message. No rank is left waiting in a later collective for one that
/// threw.
template <class Comm>
void agree(Comm& world, std::exception_ptr mine, const std::string& who, const char* phase) {
  constexpr std::size_t room = 1024;  // of each rank's message
  const auto W = static_cast<std::size_t>(world.size());
  std::vector<std::uint8_t> msg(room, 0), all(room * W);
  if (mine) {
    std::string text = "(not a semoe::error)";
    try {
      std::rethrow_exception(mine);
    } catch (const std::exception& e) {
      text = e.what();
    } catch (...) {
    }
    msg[0] = 1;
    std::copy_n(text.begin(), std::min(text.size(), room - 2), msg.begin() + 1);
  }
  comm::all_gather(world, std::span<const std::uint8_t>(msg), std::span<std::uint8_t>(all));
  if (mine) std::rethrow_exception(mine);
  for (std::size_t r = 0; r < W; ++r)
    if (all[r * room] != 0)
      ::semoe::detail::fail(who, ": rank ", r, " failed while ", phase, ": ",
                            reinterpret_cast<const char*>(all.data() + r * room + 1));
}

template <class F>
std::exception_ptr attempt(F&& f) {
  try {
    f();
    return nullptr;
  } catch (...) {
    return std::current_exception();
  }
}

/// f(module) for the model and every module nested in it.
template <class M, class F>
void for_each_module(M& m, F&& f) {
  f(m);
  if constexpr (requires { m.moe(); }) for_each_module(m.moe(), f);
  if constexpr (requires { m.for_each_layer(detail::probe_layer_visitor{}); })
    m.for_each_layer([&](auto& l) { for_each_module(l, f); });
}

inline void write_manifest(const std::filesystem::path& dir, const nlohmann::json& m) {
  const std::string text = m.dump(1) + "\n";
  io::detail::write_atomically(dir / "manifest.json", "semoe::train::save_portable_checkpoint",
                               [&](int fd, const std::string& who) { io::detail::write_all(fd, text.data(), text.size(), who); });
}

/// The step of a directory named "step-N", or nullopt.
inline std::optional<std::uint64_t> step_of(const std::string& name) {
  std::uint64_t step = 0;
  if (name.size() <= 5 || name.compare(0, 5, "step-") != 0) return std::nullopt;
  const auto [end, err] = std::from_chars(name.data() + 5, name.data() + name.size(), step);
  if (err != std::errc() || end != name.data() + name.size()) return std::nullopt;
  return step;
}

/// The manifest of `dir`, parsed, or an error naming what is wrong with it.
inline nlohmann::json read_manifest(const std::filesystem::path& dir, const std::string& who) {
  const auto path = dir / "manifest.json";
  std::ifstream f(path);
  SEMOE_CHECK(f.good(), who, ": no '", path.string(), "' (not a checkpoint, or one whose save did not finish)");
  nlohmann::json m;
  try {
    m = nlohmann::json::parse(f);
  } catch (const std::exception& e) {
    ::semoe::detail::fail(who, ": '", path.string(), "' is not valid JSON: ", e.what());
  }
  SEMOE_CHECK(m.is_object() && m.value("format", std::string()) == portable_format, who, ": '", path.string(),
              "' is not a semoe portable checkpoint manifest");
  SEMOE_CHECK(m.value("version", 0) == portable_version, who, ": manifest version ", m.value("version", 0),
              ", expected ", portable_version);
  return m;
}

}  // namespace detail

/// The directory of the checkpoint at `step` under `root`: root/step-000000000123.
inline std::filesystem::path checkpoint_dir(const std::filesystem::path& root, std::uint64_t step) {
  char b[32];
  std::snprintf(b, sizeof b, "step-%012llu", static_cast<unsigned long long>(step));
  return root / b;
}

/// The newest complete checkpoint under `root` (a step-N directory with a
/// manifest); nullopt when there is none. Files are verified when loaded.
inline std::optional<std::filesystem::path> latest_checkpoint(const std::filesystem::path& root) {
  std::error_code ec;
  if (!std::filesystem::is_directory(root, ec)) return std::nullopt;
  std::optional<std::filesystem::path> best;
  std::uint64_t best_step = 0;
  for (const auto& e : std::filesystem::directory_iterator(root, ec)) {
    const auto step = detail::step_of(e.path().filename().string());
    if (!step || !std::filesystem::is_regular_file(e.path() / "manifest.json", ec)) continue;
    if (!best || *step > best_step) best = e.path(), best_step = *step;
  }
  return best;
}

/// Remove all but the newest `keep` complete checkpoints under `root`, and
/// any incomplete step-N directory older than the newest complete one (a
/// save that a crash cut short). Call it from one rank, after a save.
inline void prune_checkpoints(const std::filesystem::path& root, std::size_t keep) {
  SEMOE_CHECK(keep >= 1, "semoe::train::prune_checkpoints: keep = 0 would remove the checkpoint just saved");
  std::vector<std::pair<std::uint64_t, std::filesystem::path>> complete, partial;
  std::error_code ec;
  for (const auto& e : std::filesystem::directory_iterator(root, ec))
    if (const auto step = detail::step_of(e.path().filename().string()))
      (std::filesystem::is_regular_file(e.path() / "manifest.json", ec) ? complete : partial).emplace_back(*step, e.path());
  std::sort(complete.rbegin(), complete.rend());
  if (complete.empty()) return;
  for (std::size_t i = keep; i < complete.size(); ++i) {  // the manifest first: never a complete-looking remnant
    std::filesystem::remove(complete[i].second / "manifest.json", ec);
    std::filesystem::remove_all(complete[i].second, ec);
  }
  for (const auto& [step, path] : partial)
    if (step < complete.front().first) std::filesystem::remove_all(path, ec);
}

/// Save a trainer's run into `dir` on every rank of its world (a collective:
/// every rank calls it). `data_position` is stored for the caller (where its
/// data order stands) and handed back by load_portable_checkpoint. A
/// directory that already holds a complete checkpoint is refused, not
/// overwritten.
template <class Model, class Optimizer, class Comm>
void save_portable_checkpoint(const std::filesystem::path& dir, trainer<Model, Optimizer, Comm>& t,
                              std::uint64_t data_position = 0) {
  using T = typename trainer<Model, Optimizer, Comm>::value_type;
  const std::string who = "semoe::train::save_portable_checkpoint: '" + dir.string() + "'";
  auto& world = t.world();
  auto& groups = t.groups();
  Model& model = t.model();
  Optimizer& opt = t.optimizer();
  const bool root = world.rank() == 0, writes_experts = groups.replica.rank() == 0;
  const int ep = groups.expert.size();

  detail::agree(world, detail::attempt([&] {
    SEMOE_CHECK(!t.shards_dense(), who, ": dense parameters sharded over the ranks (prefetch::two_d) have their "
                "optimizer state in shards; save those runs with save_checkpoint(path, trainer), one file per rank");
    if (!root) return;
    SEMOE_CHECK(!std::filesystem::exists(dir / "manifest.json"), who, ": already holds a complete checkpoint; save "
                "into a new directory (checkpoint_dir(root, step)) or remove it first");
    std::filesystem::create_directories(dir);
  }), who, "preparing the directory");

  // Expert blocks of this expert-parallel rank, every MoE layer.
  detail::file_digest expert_digest, dense_digest;
  std::vector<nlohmann::json> layers;
  detail::agree(world, detail::attempt([&] {
    io::detail::for_each_indexed_moe_layer(model, [&](index_t, auto& layer) {
      layers.push_back({{"experts", layer.opts().experts}, {"block_elems", layer.store().block_elems(layer.layer_id())}});
    });
    if (writes_experts) {
      io::safetensors_writer w;
      io::detail::for_each_indexed_moe_layer(model, [&](index_t l, auto& layer) {
        auto& s = layer.store();
        s.reserve_state(Optimizer::slots());  // state is saved even before the first step
        for (index_t e = 0; e < layer.local_experts(); ++e)
          io::detail::visit_reading(s, layer.layer_id(), e, [&](storage::block_ref<T> b) {
            const std::string name = io::expert_tensor_name(l, layer.first_expert() + e, "block");
            const auto n = static_cast<std::int64_t>(b.params.size());
            w.add(name, {n}, std::span<const T>(b.params));
            for (index_t k = 0; k < Optimizer::slots(); ++k)
              w.add(detail::state_name(k, name), {n}, std::span<const T>(b.state.subspan(k * n, n)));
          });
      });
      w.set_metadata("format", "semoe");
      const auto path = dir / detail::expert_file_name(groups.expert.rank(), ep);
      w.write(path);
      expert_digest = detail::digest_file(path, who);
    }
    if (root) {
      io::safetensors_writer w;
      auto params = model.parameters();
      auto& st = opt.dense_state();
      SEMOE_CHECK(st.empty() || st.size() == params.size(), who, ": the optimizer keeps state for ", st.size(),
                  " tensors, the model has ", params.size());
      for (std::size_t i = 0; i < params.size(); ++i) {
        const auto& p = params[i];
        const auto n = static_cast<std::int64_t>(p.value.size());
        w.add(p.name, {n}, std::span<const T>(p.value));
        for (index_t k = 0; !st.empty() && k < Optimizer::slots(); ++k)
          w.add(detail::state_name(k, p.name), {n}, std::span<const T>(st[i].data() + k * n, static_cast<std::size_t>(n)));
      }
      io::detail::for_each_indexed_moe_layer(model, [&](index_t l, auto& layer) {
        if constexpr (requires { layer.gate().bias().values(); }) {
          const auto b = layer.gate().bias().values();
          if (!b.empty()) w.add(detail::gate_bias_name(l), {static_cast<std::int64_t>(b.size())}, b);
        }
      });
      w.set_metadata("format", "semoe");
      const auto path = dir / "dense.safetensors";
      w.write(path);
      dense_digest = detail::digest_file(path, who);
    }
  }), who, "writing its tensors");

  // Rank 0 learns every file's size and checksum, then commits the manifest.
  const std::uint64_t mine[3] = {writes_experts ? static_cast<std::uint64_t>(groups.expert.rank()) + 1 : 0,
                                 expert_digest.bytes, expert_digest.xxh3};
  std::vector<std::uint64_t> all(3 * static_cast<std::size_t>(world.size()));
  comm::all_gather(world, std::span<const std::uint64_t>(mine, 3), std::span<std::uint64_t>(all));
  detail::agree(world, detail::attempt([&] {
    if (!root) return;
    nlohmann::json m;
    m["format"] = detail::portable_format;
    m["version"] = detail::portable_version;
    m["dtype"] = std::string(io::dtype_name(io::dtype_of_v<T>));
    m["step"] = t.steps();
    m["optimizer_steps"] = opt.step_count();
    m["optimizer_slots"] = Optimizer::slots();
    m["data_position"] = data_position;
    m["world_size"] = world.size();
    m["expert_parallel"] = ep;
    nlohmann::json files = nlohmann::json::array();
    files.push_back({{"name", "dense.safetensors"}, {"bytes", dense_digest.bytes}, {"xxh3", detail::hex64(dense_digest.xxh3)}});
    std::vector<nlohmann::json> experts(static_cast<std::size_t>(ep));
    for (int r = 0; r < world.size(); ++r) {
      const auto* a = all.data() + 3 * r;
      if (a[0] == 0) continue;
      experts[a[0] - 1] = {{"name", detail::expert_file_name(static_cast<int>(a[0] - 1), ep)}, {"bytes", a[1]},
                           {"xxh3", detail::hex64(a[2])}};
    }
    for (auto& e : experts) files.push_back(std::move(e));
    m["files"] = std::move(files);
    // Layer l's expert e is in expert file e / (experts / ep): files[1 + that].
    for (auto& l : layers) {
      const index_t E = l["experts"].get<index_t>(), per = E / ep;
      nlohmann::json where = nlohmann::json::array();
      for (index_t e = 0; e < E; ++e) where.push_back(1 + e / per);
      l["expert_file"] = std::move(where);
    }
    m["moe_layers"] = layers;
    detail::write_manifest(dir, m);
  }), who, "committing the manifest");
}

/// Restore a run saved by save_portable_checkpoint into a trainer on any
/// number of ranks with any expert-parallel size (a collective). The model
/// must be built as the saved one was (same tensors and MoE layer sizes);
/// its storage policy may differ. Returns what the manifest recorded.
template <class Model, class Optimizer, class Comm>
checkpoint_info load_portable_checkpoint(const std::filesystem::path& dir, trainer<Model, Optimizer, Comm>& t) {
  using T = typename trainer<Model, Optimizer, Comm>::value_type;
  const std::string who = "semoe::train::load_portable_checkpoint: '" + dir.string() + "'";
  auto& world = t.world();
  Model& model = t.model();
  Optimizer& opt = t.optimizer();
  checkpoint_info info;
  detail::agree(world, detail::attempt([&] {
    SEMOE_CHECK(!t.shards_dense(), who, ": dense parameters sharded over the ranks (prefetch::two_d) are restored "
                "with load_checkpoint(path, trainer)");
    const nlohmann::json m = detail::read_manifest(dir, who);
    try {
      const std::string dtype = m.at("dtype").get<std::string>();
      SEMOE_CHECK(dtype == io::dtype_name(io::dtype_of_v<T>), who, ": tensors are ", dtype, ", the model's are ",
                  io::dtype_name(io::dtype_of_v<T>));
      SEMOE_CHECK(m.at("optimizer_slots").get<index_t>() == Optimizer::slots(), who, ": saved with an optimizer of ",
                  m.at("optimizer_slots").get<index_t>(), " state slots, this one has ", Optimizer::slots());
      const auto& files = m.at("files");
      // Each file this rank reads is checked whole once, before its first tensor.
      std::map<std::size_t, io::safetensors_file> open;
      auto file = [&](std::size_t k) -> const io::safetensors_file& {
        if (auto it = open.find(k); it != open.end()) return it->second;
        SEMOE_CHECK(k < files.size(), who, ": manifest names file ", k, " of ", files.size());
        const auto& f = files[k];
        const std::string name = f.at("name").get<std::string>();
        SEMOE_CHECK(name.find('/') == std::string::npos && name != ".." && !name.empty(), who,
                    ": manifest names file '", name, "' outside the checkpoint");
        const auto path = dir / name;
        const auto d = detail::digest_file(path, who);
        SEMOE_CHECK(d.bytes == f.at("bytes").get<std::uint64_t>() && detail::hex64(d.xxh3) == f.at("xxh3"), who,
                    ": '", path.string(), "' does not match its checksum in the manifest (", d.bytes, " bytes, xxh3 ",
                    detail::hex64(d.xxh3), "; manifest: ", f.at("bytes").get<std::uint64_t>(), " bytes, xxh3 ",
                    f.at("xxh3").get<std::string>(), ")");
        return open.emplace(k, io::safetensors_file::open(path)).first->second;
      };
      auto read = [&](const io::safetensors_file& f, const std::string& name, auto out) {
        SEMOE_CHECK(f.contains(name), who, ": tensor '", name, "' is not in '", f.source(), "'");
        f.read_as(name, out);  // names tensor and file on a wrong shape or dtype
      };

      const io::safetensors_file& dense = file(0);
      auto params = model.parameters();
      for (auto& p : params) read(dense, p.name, std::span<T>(p.value));
      auto& st = opt.dense_state();
      const bool has_state = !params.empty() && dense.contains(detail::state_name(0, params[0].name));
      st.assign(has_state ? params.size() : 0, buffer<T>());
      for (std::size_t i = 0; i < st.size(); ++i) {
        const auto n = static_cast<index_t>(params[i].value.size());
        st[i].assign(Optimizer::slots() * n, T(0));
        for (index_t k = 0; k < Optimizer::slots(); ++k)
          read(dense, detail::state_name(k, params[i].name), st[i].span().subspan(k * n, n));
      }
      opt.step_count() = m.at("optimizer_steps").get<std::uint64_t>();

      const auto& layers = m.at("moe_layers");
      index_t count = 0;
      io::detail::for_each_indexed_moe_layer(model, [&](index_t l, auto& layer) {
        ++count;
        SEMOE_CHECK(static_cast<std::size_t>(l) < layers.size(), who, ": the model has more MoE layers than the ",
                    layers.size(), " saved");
        const auto& j = layers[static_cast<std::size_t>(l)];
        auto& s = layer.store();
        const index_t id = layer.layer_id(), E = j.at("experts").get<index_t>();
        SEMOE_CHECK(E == layer.opts().experts, who, ": MoE layer ", l, " was saved with ", E, " experts, the model has ",
                    layer.opts().experts);
        SEMOE_CHECK(j.at("block_elems").get<index_t>() == s.block_elems(id), who, ": MoE layer ", l, " was saved "
                    "with expert blocks of ", j.at("block_elems").get<index_t>(), " elements, the model's have ",
                    s.block_elems(id));
        s.reserve_state(Optimizer::slots());
        const auto& where = j.at("expert_file");
        for (index_t e = 0; e < layer.local_experts(); ++e) {
          const index_t g = layer.first_expert() + e;
          const std::size_t which = where.at(static_cast<std::size_t>(g));
          const io::safetensors_file& f = file(which);
          const std::string name = io::expert_tensor_name(l, g, "block");
          s.visit(id, e, [&](storage::block_ref<T> b) {
            const index_t n = static_cast<index_t>(b.params.size());
            read(f, name, b.params);
            for (index_t k = 0; k < Optimizer::slots(); ++k) read(f, detail::state_name(k, name), b.state.subspan(k * n, n));
          });
        }
        if constexpr (requires { layer.gate().bias().assign(std::span<const double>()); }) {
          std::vector<double> b;
          if (dense.contains(detail::gate_bias_name(l))) {
            b.resize(dense.at(detail::gate_bias_name(l)).elements());
            read(dense, detail::gate_bias_name(l), std::span<double>(b));
          }
          layer.gate().bias().assign(b);
        }
      });
      SEMOE_CHECK(static_cast<std::size_t>(count) == layers.size(), who, ": ", layers.size(),
                  " MoE layers were saved, the model has ", count);
      info.step = m.at("step").get<std::uint64_t>();
      info.data_position = m.at("data_position").get<std::uint64_t>();
      info.world_size = m.at("world_size").get<int>();
      info.expert_parallel = m.at("expert_parallel").get<int>();
    } catch (const nlohmann::json::exception& e) {
      ::semoe::detail::fail(who, ": malformed manifest: ", e.what());
    }
    // Steps key the noise of gates, jitter and dropout: they go on from here.
    detail::for_each_module(model, [&](auto& mod) {
      if constexpr (requires { mod.set_step(info.step); }) mod.set_step(info.step);
    });
    t.set_steps(info.step);
  }), who, "loading");
  return info;
}

}  // namespace semoe::train
