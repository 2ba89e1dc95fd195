// semoe/train/checkpoint.hpp: save and restore a training run: dense
// parameters, the optimizer's state and step count, and every expert block.
// Blocks of an SSD-tiered store stay in its file: the checkpoint holds the
// records (slot, version, checksum) of the versions it committed, so saving
// writes back only dirty blocks and restoring verifies each block by checksum.
// Blocks of other stores are written into the checkpoint itself.
//
// File: "SEMOECKP" | u32 version | u64 header bytes | JSON header | payload |
// u64 XXH3 of everything before it. Written to a temporary name, fsynced and
// renamed, then the directory fsynced: a crash leaves the old checkpoint or
// the new one, never half of one.
#pragma once

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <string>
#include <vector>

#include <fcntl.h>
#include <unistd.h>

#include <nlohmann/json.hpp>
#include <xxhash.h>

#include "semoe/core/error.hpp"
#include "semoe/storage/ssd_tier.hpp"
#include "semoe/train/optimizer.hpp"
#include "semoe/train/trainer.hpp"

namespace semoe::train {

namespace detail {

inline constexpr char ckpt_magic[8] = {'S', 'E', 'M', 'O', 'E', 'C', 'K', 'P'};
inline constexpr std::uint32_t ckpt_version = 1;
inline constexpr std::uint64_t ckpt_max_header = std::uint64_t{1} << 30;

template <class Store>
constexpr bool ssd_backed = requires(Store& s, std::span<const storage::ssd_block_record> r,
                                     const storage::ssd_options& o) { s.restore(r, o); };

inline void fsync_path(const std::filesystem::path& p, int flags) {
  const int fd = ::open(p.c_str(), flags | O_CLOEXEC);
  SEMOE_CHECK(fd >= 0, "semoe::train::checkpoint: cannot open '", p.string(), "': ", std::strerror(errno));
  const int rc = ::fsync(fd);
  const int e = errno;
  ::close(fd);
  SEMOE_CHECK(rc == 0, "semoe::train::checkpoint: fsync('", p.string(), "'): ", std::strerror(e));
}

/// Every distinct store of the model's MoE layers, in layer order.
template <class Model, class F>
void for_each_store(Model& m, F&& f) {
  std::vector<const void*> seen;
  for_each_moe_layer(m, [&](auto& layer) {
    auto& s = layer.store();
    if (std::find(seen.begin(), seen.end(), &s) != seen.end()) return;
    seen.push_back(&s);
    f(s);
  });
}

class payload_writer {
 public:
  template <class T>
  void put(std::span<const T> v) {
    const auto* b = reinterpret_cast<const char*>(v.data());
    bytes_.insert(bytes_.end(), b, b + v.size_bytes());
  }
  const std::vector<char>& bytes() const { return bytes_; }

 private:
  std::vector<char> bytes_;
};

class payload_reader {
 public:
  payload_reader(const char* data, std::size_t size, std::string path) : p_(data), n_(size), path_(std::move(path)) {}
  template <class T>
  void get(std::span<T> v, const std::string& what) {
    SEMOE_CHECK(v.size_bytes() <= n_ - at_, "semoe::train::checkpoint: '", path_, "': ", what, " needs ",
                v.size_bytes(), " bytes, the file has ", n_ - at_, " left");
    std::memcpy(v.data(), p_ + at_, v.size_bytes());
    at_ += v.size_bytes();
  }
  std::size_t left() const { return n_ - at_; }

 private:
  const char* p_;
  std::size_t n_, at_ = 0;
  std::string path_;
};

/// `stepped`: the tensors the optimizer keeps dense state for, in its order
/// (the model's parameters, or a sharding trainer's shards).
template <class Model, class Optimizer, class T>
void save_checkpoint(const std::filesystem::path& path, Model& model, Optimizer& opt, const param_list<T>& stepped,
                     std::uint64_t step) {
  nlohmann::json head;
  detail::payload_writer out;
  head["step"] = step;
  head["optimizer_steps"] = opt.step_count();
  head["dense"] = nlohmann::json::array();
  auto params = model.parameters();
  for (auto& p : params) {
    head["dense"].push_back({{"name", p.name}, {"elems", p.value.size()}});
    out.put(std::span<const T>(p.value));
  }
  auto& st = opt.dense_state();
  SEMOE_CHECK(st.empty() || st.size() == stepped.size(), "semoe::train::save_checkpoint: the optimizer keeps state "
              "for ", st.size(), " tensors, expected ", stepped.size(), " (", params.size(), " model parameters); a "
              "trainer with sharded dense parameters (prefetch::two_d) saves with save_checkpoint(path, trainer)");
  head["dense_state"] = nlohmann::json::array();
  for (auto& s : st) {
    head["dense_state"].push_back(s.size());
    out.put(std::span<const T>(s.data(), static_cast<std::size_t>(s.size())));
  }

  // Expert blocks: SSD stores commit and persist their records inside the
  // store's checkpoint(), so the file below is written from there.
  head["stores"] = nlohmann::json::array();
  auto write_file = [&] {
    const std::string h = head.dump();
    const std::filesystem::path tmp = path.string() + ".tmp";
    try {
      const int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
      SEMOE_CHECK(fd >= 0, "semoe::train::save_checkpoint: cannot open '", tmp.string(),
                  "' for writing: ", std::strerror(errno));
      XXH3_state_t* xs = XXH3_createState();
      XXH3_64bits_reset(xs);
      auto put = [&](const void* d, std::size_t n) {  // every byte, or errno named
        for (auto* p = static_cast<const char*>(d); n > 0;) {
          const ssize_t w = ::write(fd, p, n);
          if (w < 0 && errno == EINTR) continue;
          if (w <= 0) {
            const int e = w < 0 ? errno : EIO;
            XXH3_freeState(xs);
            ::close(fd);
            ::semoe::detail::fail("semoe::train::save_checkpoint: writing '", tmp.string(), "' failed: ",
                                  std::strerror(e));
          }
          p += w;
          n -= static_cast<std::size_t>(w);
        }
      };
      auto emit = [&](const void* d, std::size_t n) {
        put(d, n);
        XXH3_64bits_update(xs, d, n);
      };
      const std::uint32_t ver = detail::ckpt_version;
      const std::uint64_t hn = h.size();
      emit(detail::ckpt_magic, 8);
      emit(&ver, sizeof ver);
      emit(&hn, sizeof hn);
      emit(h.data(), h.size());
      emit(out.bytes().data(), out.bytes().size());
      const std::uint64_t sum = XXH3_64bits_digest(xs);
      put(&sum, sizeof sum);
      XXH3_freeState(xs);
      const int rc = ::fsync(fd), e = errno;
      ::close(fd);
      SEMOE_CHECK(rc == 0, "semoe::train::save_checkpoint: fsync('", tmp.string(), "'): ", std::strerror(e));
    } catch (...) {  // nothing half-written is left behind; the previous checkpoint stands
      std::error_code ec;
      std::filesystem::remove(tmp, ec);
      throw;
    }
    std::error_code ec;
    std::filesystem::rename(tmp, path, ec);
    SEMOE_CHECK(!ec, "semoe::train::save_checkpoint: rename '", tmp.string(), "' -> '", path.string(),
                "': ", ec.message());
    detail::fsync_path(path.has_parent_path() ? path.parent_path() : std::filesystem::path("."), O_RDONLY | O_DIRECTORY);
  };

  std::vector<std::function<void(std::function<void()>)>> ssd_stores;
  detail::for_each_store(model, [&](auto& s) {
    using S = std::remove_cvref_t<decltype(s)>;
    if constexpr (detail::ssd_backed<S>) {
      const std::size_t slot = head["stores"].size();
      head["stores"].push_back({{"kind", "ssd"}});
      ssd_stores.push_back([&s, &head, slot](std::function<void()> next) {
        s.checkpoint([&](std::span<const storage::ssd_block_record> recs, const storage::ssd_options& where) {
          auto& j = head["stores"][slot];
          j["dir"] = where.dir.string();
          j["rank"] = where.rank;
          j["file"] = where.file;
          nlohmann::json r = nlohmann::json::array();
          for (const auto& x : recs) r.push_back({x.version, x.checksum, x.slot});
          j["records"] = std::move(r);
          next();  // the remaining stores, then the file: before this store writes again
        });
      });
    } else {
      s.reserve_state(Optimizer::slots());  // state is in the file even before the first step
      index_t blocks = 0;
      for (index_t l = 0; l < s.layers(); ++l)
        for (index_t e = 0; e < s.experts(l); ++e, ++blocks)
          s.visit(l, e, [&](storage::block_ref<T> b) {
            out.put(std::span<const T>(b.params));
            out.put(std::span<const T>(b.state));
          });
      head["stores"].push_back({{"kind", "inline"}, {"blocks", blocks}});
    }
  });
  // Nest the SSD stores' checkpoints so the file is written while every one
  // of them holds its writes back.
  std::function<void(std::size_t)> chain = [&](std::size_t i) {
    if (i == ssd_stores.size())
      write_file();
    else
      ssd_stores[i]([&, i] { chain(i + 1); });
  };
  chain(0);
}

template <class Model, class Optimizer, class T>
std::uint64_t load_checkpoint(const std::filesystem::path& path, Model& model, Optimizer& opt,
                              const param_list<T>& stepped) {
  const std::string who = "semoe::train::load_checkpoint: '" + path.string() + "'";
  std::ifstream f(path, std::ios::binary);
  SEMOE_CHECK(f.good(), who, ": cannot open");
  std::vector<char> all((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  const std::size_t fixed = 8 + sizeof(std::uint32_t) + sizeof(std::uint64_t);
  SEMOE_CHECK(all.size() >= fixed + sizeof(std::uint64_t), who, ": ", all.size(), " bytes is too short for a checkpoint");
  SEMOE_CHECK(std::memcmp(all.data(), detail::ckpt_magic, 8) == 0, who, ": not a semoe checkpoint (bad magic)");
  std::uint64_t sum;
  std::memcpy(&sum, all.data() + all.size() - sizeof sum, sizeof sum);
  SEMOE_CHECK(XXH3_64bits(all.data(), all.size() - sizeof sum) == sum, who, ": checksum mismatch (file corrupted)");
  std::uint32_t ver;
  std::uint64_t hn;
  std::memcpy(&ver, all.data() + 8, sizeof ver);
  std::memcpy(&hn, all.data() + 12, sizeof hn);
  SEMOE_CHECK(ver == detail::ckpt_version, who, ": format version ", ver, ", expected ", detail::ckpt_version);
  SEMOE_CHECK(hn <= detail::ckpt_max_header && hn <= all.size() - fixed - sizeof sum, who, ": header length ", hn,
              " runs past the end of the file");
  nlohmann::json head;
  try {
    head = nlohmann::json::parse(all.begin() + fixed, all.begin() + static_cast<std::ptrdiff_t>(fixed + hn));
  } catch (const std::exception& e) {
    ::semoe::detail::fail(who, ": header is not valid JSON: ", e.what());
  }
  detail::payload_reader in(all.data() + fixed + hn, all.size() - fixed - hn - sizeof sum, path.string());
  try {
    auto params = model.parameters();
    SEMOE_CHECK(head.at("dense").size() == params.size(), who, ": ", head.at("dense").size(),
                " dense tensors, the model has ", params.size());
    for (std::size_t i = 0; i < params.size(); ++i) {
      const auto& d = head["dense"][i];
      SEMOE_CHECK(d.at("elems").get<std::size_t>() == params[i].value.size(), who, ": tensor '", params[i].name,
                  "' has ", d.at("elems").get<std::size_t>(), " elements in the file, ", params[i].value.size(),
                  " in the model");
      in.get(std::span<T>(params[i].value), "tensor '" + params[i].name + "'");
    }
    auto& st = opt.dense_state();
    const auto& ds = head.at("dense_state");
    SEMOE_CHECK(ds.empty() || ds.size() == stepped.size(), who, ": optimizer state for ", ds.size(),
                " tensors, the optimizer here steps ", stepped.size(),
                " (saved by a trainer that shards dense parameters differently, or on another number of ranks?)");
    st.assign(ds.size(), buffer<T>());
    for (std::size_t i = 0; i < ds.size(); ++i) {
      const auto n = ds[i].get<index_t>();
      const index_t want = Optimizer::slots() * static_cast<index_t>(stepped[i].value.size());
      SEMOE_CHECK(n == want, who, ": optimizer state of tensor '", stepped[i].name, "' has ", n,
                  " elements, expected ", want);
      st[i].assign(n, T(0));
      in.get(st[i].span(), "optimizer state of '" + stepped[i].name + "'");
    }
    opt.step_count() = head.at("optimizer_steps").get<std::uint64_t>();

    std::size_t k = 0;
    const auto& stores = head.at("stores");
    detail::for_each_store(model, [&](auto& s) {
      using S = std::remove_cvref_t<decltype(s)>;
      SEMOE_CHECK(k < stores.size(), who, ": the model has more expert stores than the file (", stores.size(), ")");
      const auto& j = stores[k++];
      if constexpr (detail::ssd_backed<S>) {
        SEMOE_CHECK(j.at("kind") == "ssd", who, ": store ", k - 1, " is '", j.at("kind").get<std::string>(),
                    "' in the file, an SSD-tiered store in the model");
        std::vector<storage::ssd_block_record> recs;
        for (const auto& r : j.at("records"))
          recs.push_back({r.at(0).get<std::uint64_t>(), r.at(1).get<std::uint64_t>(), r.at(2).get<std::uint32_t>()});
        storage::ssd_options where = s.opts().ssd;
        where.dir = j.at("dir").get<std::string>();
        where.rank = j.at("rank").get<int>();
        where.file = j.value("file", std::string());  // files before names were recorded: the default name
        s.restore(recs, where);
      } else {
        SEMOE_CHECK(j.at("kind") == "inline", who, ": store ", k - 1, " is '", j.at("kind").get<std::string>(),
                    "' in the file, a store with blocks in memory in the model");
        s.reserve_state(Optimizer::slots());
        for (index_t l = 0; l < s.layers(); ++l)
          for (index_t e = 0; e < s.experts(l); ++e)
            s.visit(l, e, [&](storage::block_ref<T> b) {
              const std::string what = "expert block (" + std::to_string(l) + ", " + std::to_string(e) + ")";
              in.get(b.params, what);
              in.get(b.state, what);
            });
      }
    });
    SEMOE_CHECK(k == stores.size(), who, ": the file has ", stores.size(), " expert stores, the model ", k);
    SEMOE_CHECK(in.left() == 0, who, ": ", in.left(), " bytes left over after the last tensor");
    return head.at("step").get<std::uint64_t>();
  } catch (const nlohmann::json::exception& e) {
    ::semoe::detail::fail(who, ": malformed header: ", e.what());
  }
}

}  // namespace detail

/// Save model + optimizer at training step `step` to `path` (atomically).
/// For a run driven by a trainer, save_checkpoint(path, trainer) below is the
/// one that works whatever the trainer shards.
template <class Model, class Optimizer>
void save_checkpoint(const std::filesystem::path& path, Model& model, Optimizer& opt, std::uint64_t step) {
  detail::save_checkpoint(path, model, opt, model.parameters(), step);
}

/// Restore what save_checkpoint wrote into a model and optimizer built the
/// same way; returns the step it was saved at. Every size, offset and
/// checksum is checked: a damaged file is an error naming what is wrong.
template <class Model, class Optimizer>
std::uint64_t load_checkpoint(const std::filesystem::path& path, Model& model, Optimizer& opt) {
  return detail::load_checkpoint(path, model, opt, model.parameters());
}

/// Save a trainer's run at its current step. With sharded dense parameters
/// (prefetch::two_d) the parameters are gathered whole first and the file
/// holds this rank's shard of their optimizer state: each rank saves its
/// own file, and restores it on the same number of ranks.
template <class Model, class Optimizer, class Comm>
void save_checkpoint(const std::filesystem::path& path, trainer<Model, Optimizer, Comm>& t) {
  t.gather_dense();
  detail::save_checkpoint(path, t.model(), t.optimizer(), t.optimizer_parameters(), t.steps());
}

/// Restore a trainer's run (model, optimizer, step count, the shards of
/// dense parameters) from what save_checkpoint(path, trainer) wrote; returns
/// the step it was saved at.
template <class Model, class Optimizer, class Comm>
std::uint64_t load_checkpoint(const std::filesystem::path& path, trainer<Model, Optimizer, Comm>& t) {
  const std::uint64_t step = detail::load_checkpoint(path, t.model(), t.optimizer(), t.optimizer_parameters());
  t.reload_dense_shards();
  t.set_steps(step);
  return step;
}

}  // namespace semoe::train
