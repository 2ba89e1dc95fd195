// semoe/storage/detail/tiered_checkpoint.hpp: a tiered store's checkpoint
// I/O: committing the SSD file's current block versions for a checkpoint,
// and restarting every block from the versions a checkpoint names. Part of
// storage/tiered_store.hpp, which includes it last.
#pragma once

#include "semoe/storage/tiered_store.hpp"

namespace semoe::storage::detail {

template <bool HasSsd>
template <class T, MemorySpace Space>
template <class Persist>
void tiered_policy<HasSsd>::store<T, Space>::checkpoint(Persist&& persist)
  requires HasSsd
{
  std::unique_lock lk(m_);
  cv_.wait(lk, [&] { return queue_.empty() && writebacks_.empty() && active_movers_ == 0; });
  for (auto& b : blocks_) {
    cv_.wait(lk, [&] { return !b.busy; });
    if (b.host && (b.host_dirty || !b.on_ssd)) write_back(lk, b);
  }
  ensure_ssd();
  const auto records = ssd_->commit();
  keep_file_ = true;  // a checkpoint names it now
  // Callers of this store are this thread (inside checkpoint) and the
  // movers, which have no work: nothing writes until persist returns.
  ssd_options where = opt_.ssd;  // the file this store really writes
  where.file = ssd_->path().filename().string();
  persist(std::span<const ssd_block_record>(records), std::as_const(where));
}

template <bool HasSsd>
template <class T, MemorySpace Space>
void tiered_policy<HasSsd>::store<T, Space>::restore(std::span<const ssd_block_record> records,
                                                     const ssd_options& where)
  requires HasSsd
{
  std::unique_lock lk(m_);
  SEMOE_CHECK(records.size() == blocks_.size(), "semoe::storage::tiered: the checkpoint has ", records.size(),
              " block records, this model has ", blocks_.size(), " blocks");
  cv_.wait(lk, [&] { return queue_.empty() && writebacks_.empty() && active_movers_ == 0; });
  for (auto& b : blocks_) {
    SEMOE_CHECK(b.pins == 0 && !b.busy, "semoe::storage::tiered: restore while ", label(b), " is in use");
    if (auto done = std::exchange(b.compute_done, nullptr)) done();
    device_.deallocate(b.dev, dev_bytes(b));
    host_.deallocate(b.host, host_bytes(b));
    b.dev = b.host = nullptr;
    b.on_ssd = true;
    b.host_dirty = b.dev_dirty = b.dev_grads = b.grads_zero = false;
  }
  std::filesystem::path fresh;  // a file this store made before the restore: not the checkpoint's
  if (ssd_) fresh = ssd_->path();
  ssd_.reset();
  ssd_.emplace(ssd_tier::reopen(where, ssd_block_bytes(), records));
  if (!fresh.empty() && fresh != ssd_->path()) std::filesystem::remove(fresh);
  opt_.ssd = where;
  keep_file_ = true;
  ssd_base_ = {ssd_->bytes_written(), ssd_->bytes_read()};
}

}  // namespace semoe::storage::detail
