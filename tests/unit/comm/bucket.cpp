#include "semoe/comm/bucket.hpp"

#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "semoe/comm/local.hpp"
#include "semoe/train/optimizer.hpp"

using semoe::index_t;
using semoe::param_kind;
using semoe::param_list;
using semoe::param_scope;
using semoe::comm::local;
using semoe::comm::reduce_op;
using semoe::comm::request;
namespace comm = semoe::comm;

namespace {

/// A communicator that forwards to comm::local and records, per rank, the
/// size of every all_reduce and all_gather it was asked for: a test sees how
/// many collectives a fused component really launched, and when.
struct counting {
  using policy_kind = comm::comm_tag;
  struct log {
    std::vector<std::size_t> all_reduces, all_gathers, reduce_scatters;
  };
  local inner;
  std::shared_ptr<log> seen = std::make_shared<log>();

  int rank() const { return inner.rank(); }
  int size() const { return inner.size(); }
  int local_rank() const { return inner.local_rank(); }
  int local_size() const { return inner.local_size(); }
  template <class T>
  request all_to_all_v_async(std::span<const T> s, std::span<const index_t> sc, std::span<T> r,
                             std::span<const index_t> rc) {
    return inner.all_to_all_v_async(s, sc, r, rc);
  }
  template <class T>
  request all_reduce_async(std::span<T> d, reduce_op op = reduce_op::sum) {
    seen->all_reduces.push_back(d.size());
    return inner.all_reduce_async(d, op);
  }
  template <class T>
  request all_gather_async(std::span<const T> mine, std::span<T> all) {
    seen->all_gathers.push_back(all.size());
    return inner.all_gather_async(mine, all);
  }
  template <class T>
  request reduce_scatter_async(std::span<const T> in, std::span<T> out, reduce_op op = reduce_op::sum) {
    seen->reduce_scatters.push_back(in.size());
    return inner.reduce_scatter_async(in, out, op);
  }
  template <class T>
  request broadcast_async(std::span<T> d, int root) {
    return inner.broadcast_async(d, root);
  }
  void barrier() { inner.barrier(); }
  counting split(int color, int key) { return {inner.split(color, key), std::make_shared<log>()}; }
};
static_assert(comm::Communicator<counting>);

/// Parameters with owned storage; parameters() is all reduce_dense_grads needs.
template <class T>
struct toy_model {
  std::vector<std::vector<T>> values, grads;
  std::vector<param_scope> scopes;
  explicit toy_model(const std::vector<std::size_t>& sizes, std::vector<param_scope> sc = {}) : scopes(std::move(sc)) {
    scopes.resize(sizes.size(), param_scope::replicated);
    for (std::size_t i = 0; i < sizes.size(); ++i) {
      values.emplace_back(sizes[i], T(0.5) * T(i + 1));
      grads.emplace_back(sizes[i]);
    }
  }
  param_list<T> parameters() {
    param_list<T> ps;
    for (std::size_t i = 0; i < values.size(); ++i) {
      std::string name(1, 'p');  // not "p" + to_string: GCC 12 warns falsely (-Wrestrict)
      name += std::to_string(i);
      ps.push_back({std::move(name), values[i], grads[i], param_kind::dense, scopes[i]});
    }
    return ps;
  }
  /// Mixed signs and magnitudes, so a float sum depends on its order.
  void fill_grads(int rank, int step) {
    std::mt19937_64 rng(977 * rank + step);
    for (auto& g : grads)
      for (auto& x : g)
        x = static_cast<T>(std::uniform_real_distribution<double>(-1, 1)(rng) * std::pow(10.0, int(rng() % 7) - 3));
  }
};

template <class T>
bool same_bits(const std::vector<std::vector<T>>& a, const std::vector<std::vector<T>>& b) {
  if (a.size() != b.size()) return false;
  for (std::size_t i = 0; i < a.size(); ++i)
    if (a[i].size() != b[i].size() || (!a[i].empty() && std::memcmp(a[i].data(), b[i].data(), sizeof(T) * a[i].size())))
      return false;
  return true;
}

// Capacity 16 elements. Reverse order packs {p6 8, p5 1} | {p4 40, oversized} |
// {p3 3} | {p2 17, oversized} | {p1 0, p0 5}; p7 is sharded and not bucketed.
const std::vector<std::size_t> sizes{5, 0, 17, 3, 40, 1, 8, 4};
const std::vector<index_t> bucket_elems{9, 40, 3, 17, 5};

std::vector<param_scope> with_sharded_last() {
  std::vector<param_scope> s(sizes.size(), param_scope::replicated);
  s.back() = param_scope::sharded;
  return s;
}

}  // namespace

TEST_CASE_TEMPLATE("bucket: gradient_buckets reverse-order packing, oversized parameters alone, sharded ones skipped", T,
                   float, double) {
  local::run(2, [](local& c) {
    toy_model<T> m(sizes, with_sharded_last());
    comm::gradient_buckets<T, local> b(m.parameters(), c, {.bucket_bytes = 16 * sizeof(T)});
    REQUIRE(b.bucket_count() == bucket_elems.size());
    for (std::size_t k = 0; k < bucket_elems.size(); ++k) CHECK(b.bucket_elements(k) == bucket_elems[k]);
    const std::size_t want_bucket[] = {4, 4, 3, 2, 1, 0, 0, std::size_t(-1)};
    for (std::size_t i = 0; i < sizes.size(); ++i) CHECK(b.bucket_of(i) == want_bucket[i]);
    CHECK(b.workspace_bytes() == 74 * sizeof(T));
  });
}

TEST_CASE_TEMPLATE("bucket: gradient_buckets equal to reduce_dense_grads bit for bit, readiness in any order, over steps", T,
                   float, double) {
  for (int P : {1, 2, 3, 4})
    for (std::size_t bucket_elements : {std::size_t{1}, std::size_t{16}, std::size_t{1000}}) {
      CAPTURE(P);
      CAPTURE(bucket_elements);
      local::run(P, [&](local& c) {
        counting cc{c};
        const int me = c.rank();
        toy_model<T> fused(sizes, with_sharded_last()), ref(sizes, with_sharded_last());
        comm::gradient_buckets<T, counting> b(fused.parameters(), cc, {.bucket_bytes = bucket_elements * sizeof(T)});
        std::mt19937 rng(static_cast<unsigned>(me) * 7 + 1);
        std::vector<std::size_t> order(sizes.size());
        for (int step = 0; step < 3; ++step) {
          CAPTURE(step);
          fused.fill_grads(me, step);
          ref.fill_grads(me, step);
          semoe::train::reduce_dense_grads(ref, c);
          // Each rank (and step) finishes its gradients in its own order.
          for (std::size_t i = 0; i < order.size(); ++i) order[i] = i;
          std::shuffle(order.begin(), order.end(), rng);
          cc.seen->all_reduces.clear();
          for (std::size_t i : order) b.mark_ready(i);
          CHECK(b.launched() == (P > 1 ? b.bucket_count() : 0));
          b.finish();
          CHECK(b.launched() == 0);
          CHECK(same_bits(fused.grads, ref.grads));
          // One all_reduce per bucket, in bucket order, each the bucket's size.
          if (P > 1) {
            REQUIRE(cc.seen->all_reduces.size() == b.bucket_count());
            for (std::size_t k = 0; k < b.bucket_count(); ++k)
              CHECK(cc.seen->all_reduces[k] == static_cast<std::size_t>(b.bucket_elements(k)));
          } else {
            CHECK(cc.seen->all_reduces.empty());
          }
        }
      });
    }
}

TEST_CASE("bucket: gradient_buckets a bucket's all_reduce is launched as soon as its last gradient is ready") {
  local::run(2, [](local& c) {
    counting cc{c};
    toy_model<float> m(sizes, with_sharded_last());
    comm::gradient_buckets<float, counting> b(m.parameters(), cc, {.bucket_bytes = 16 * sizeof(float)});
    auto launched = [&] { return cc.seen->all_reduces.size(); };
    // Backward order: last parameter first.
    b.mark_ready(7);  // sharded: nothing to reduce
    CHECK(launched() == 0);
    b.mark_ready(6);
    CHECK(launched() == 0);  // bucket 0 still waits for p5
    b.mark_ready(5);
    CHECK(launched() == 1);
    b.mark_ready(4);
    CHECK(launched() == 2);
    // Out of order: bucket 4 is complete before buckets 2 and 3, but launches
    // only after them, so every rank issues the same sequence.
    b.mark_ready(0);
    b.mark_ready(1);
    CHECK(launched() == 2);
    b.mark_ready(3);
    CHECK(launched() == 3);
    b.mark_ready(2);
    CHECK(launched() == 5);
    b.finish();
    // A caller without hooks: mark everything at once, still one per bucket.
    cc.seen->all_reduces.clear();
    b.mark_all_ready();
    CHECK(launched() == 5);
    b.finish();
  });
}

TEST_CASE("bucket: gradient_buckets finish scales, an empty list is a no-op, mistakes are semoe::errors") {
  for (int P : {1, 3}) {
    CAPTURE(P);
    local::run(P, [&](local& c) {
      toy_model<double> fused(sizes), ref(sizes);
      comm::gradient_buckets<double, local> b(fused.parameters(), c, {.bucket_bytes = 64});
      fused.fill_grads(c.rank(), 0);
      ref.fill_grads(c.rank(), 0);
      semoe::train::reduce_dense_grads(ref, c);
      b.mark_all_ready();
      b.finish(1.0 / P);
      for (std::size_t i = 0; i < sizes.size(); ++i)
        for (std::size_t e = 0; e < sizes[i]; ++e) CHECK(fused.grads[i][e] == ref.grads[i][e] * (1.0 / P));
    });
  }

  local::run(2, [](local& c) {
    counting cc{c};
    comm::gradient_buckets<float, counting> empty(param_list<float>{}, cc);
    CHECK(empty.bucket_count() == 0);
    CHECK(empty.workspace_bytes() == 0);
    empty.mark_all_ready();
    empty.finish();
    empty.finish(0.5f);
    CHECK(cc.seen->all_reduces.empty());

    toy_model<float> m(sizes);
    comm::gradient_buckets<float, local> b(m.parameters(), c, {.bucket_bytes = 64});
    CHECK_THROWS_WITH_AS(b.mark_ready(8), "semoe::comm::gradient_buckets::mark_ready: param = 8: expected < 8",
                         semoe::error);
    b.mark_ready(6);
    CHECK_THROWS_WITH_AS(b.mark_ready(6), doctest::Contains("params[6] ('p6') was already marked ready"),
                         semoe::error);
    CHECK_THROWS_WITH_AS(b.finish(), doctest::Contains("params[0] ('p0') was never marked ready"), semoe::error);
    b.mark_all_ready();  // the step can still be completed
    b.finish();
  });

  local::run(1, [](local& c) {
    toy_model<float> m(sizes);
    CHECK_THROWS_WITH_AS((comm::gradient_buckets<float, local>(m.parameters(), c, {.bucket_bytes = 3})),
                         "semoe::comm::gradient_buckets: options.bucket_bytes = 3: expected at least one element "
                         "(4 bytes)",
                         semoe::error);
    auto ps = m.parameters();
    ps[2].kind = param_kind::expert;
    CHECK_THROWS_WITH_AS((comm::gradient_buckets<float, local>(ps, c)),
                         doctest::Contains("params[2] ('p2') is an expert parameter"), semoe::error);
  });
}

TEST_CASE_TEMPLATE("bucket: flat_shards one all_gather rebuilds the layer; reduce_scatter equals all_reduce + slicing", T,
                   float, double) {
  const std::vector<std::size_t> layer{5, 0, 7, 3, 2};  // 17 elements: padded for P = 2, 3, 4
  for (int P : {1, 2, 3, 4}) {
    CAPTURE(P);
    local::run(P, [&](local& c) {
      counting cc{c};
      const int me = c.rank();
      toy_model<T> m(layer);
      comm::flat_shards<T, counting> fs(m.parameters(), cc);
      const index_t S = (17 + P - 1) / P;
      CHECK(fs.total_elements() == 17);
      CHECK(fs.shard_elements() == S);
      CHECK(fs.padded_elements() == S * P);
      // The shard starts as this rank's slice of the replicated values.
      std::vector<T> flat_values;
      for (auto& v : m.values) flat_values.insert(flat_values.end(), v.begin(), v.end());
      for (index_t k = 0; k < S; ++k) {
        const index_t g = me * S + k;
        CHECK(fs.shard()[k] == (g < 17 ? flat_values[g] : T(0)));
      }

      for (int step = 0; step < 2; ++step) {
        // An optimizer step on the shard, then one collective for the layer.
        for (index_t k = 0; k < S; ++k) fs.shard()[k] = T(1000 * step + 100 * me + k);
        cc.seen->all_gathers.clear();
        if (step == 0)
          fs.all_gather();
        else
          fs.all_gather_async().wait();
        REQUIRE(cc.seen->all_gathers.size() == 1);
        CHECK(cc.seen->all_gathers[0] == static_cast<std::size_t>(S * P));
        for (index_t g = 0; g < 17; ++g) CHECK(fs.full()[g] == T(1000 * step + 100 * (g / S) + g % S));
        std::size_t off = 0;
        for (std::size_t i = 0; i < layer.size(); ++i) {
          REQUIRE(fs.view(i).size() == layer[i]);
          for (std::size_t e = 0; e < layer[i]; ++e) CHECK(fs.view(i)[e] == fs.full()[off + e]);
          off += layer[i];
        }
        fs.copy_to_params();
        for (std::size_t i = 0; i < layer.size(); ++i)
          CHECK(std::equal(m.values[i].begin(), m.values[i].end(), fs.view(i).begin()));
      }

      // Reference: one all_reduce per tensor, then this rank's slice.
      m.fill_grads(me, 5);
      std::vector<T> want;
      for (auto g : m.grads) {
        comm::all_reduce(c, std::span<T>(g));
        want.insert(want.end(), g.begin(), g.end());
      }
      want.resize(static_cast<std::size_t>(S * P), T(0));
      const std::vector<T> mine(want.begin() + me * S, want.begin() + (me + 1) * S);
      auto got = [&] { return std::vector<T>(fs.grad_shard().begin(), fs.grad_shard().end()); };
      auto same = [](const std::vector<T>& a, const std::vector<T>& b) {
        return a.size() == b.size() && (a.empty() || !std::memcmp(a.data(), b.data(), sizeof(T) * a.size()));
      };

      fs.reduce_scatter();  // from the registered gradients
      CHECK(same(got(), mine));
      std::vector<T> flat_grads;
      for (auto& g : m.grads) flat_grads.insert(flat_grads.end(), g.begin(), g.end());
      std::fill(fs.grad_shard().begin(), fs.grad_shard().end(), T(-7));
      fs.reduce_scatter(std::span<const T>(flat_grads));  // flat, unpadded
      CHECK(same(got(), mine));
      flat_grads.resize(static_cast<std::size_t>(S * P), T(0));
      std::fill(fs.grad_shard().begin(), fs.grad_shard().end(), T(-7));
      fs.reduce_scatter_async(std::span<const T>(flat_grads)).wait();  // padded, used in place
      CHECK(same(got(), mine));
      CHECK(cc.seen->reduce_scatters.size() == 3);

      flat_grads.push_back(T(0));
      CHECK_THROWS_WITH_AS(fs.reduce_scatter(std::span<const T>(flat_grads)),
                           doctest::Contains("reduce_scatter: grads holds"), semoe::error);
      CHECK_THROWS_WITH_AS(fs.view(5), "semoe::comm::flat_shards::view: param = 5: expected < 5", semoe::error);
    });
  }

  local::run(2, [](local& c) {
    toy_model<float> m({3, 4});
    auto ps = m.parameters();
    ps[1].grad = ps[1].grad.first(2);
    CHECK_THROWS_WITH_AS((comm::flat_shards<float, local>(ps, c)),
                         "semoe::comm::flat_shards: params[1] ('p1') has 4 values but 2 gradients", semoe::error);
    ps = m.parameters();
    ps[0].scope = param_scope::sharded;
    CHECK_THROWS_WITH_AS((comm::flat_shards<float, local>(ps, c)), doctest::Contains("is already sharded"),
                         semoe::error);
    comm::flat_shards<float, local> none(param_list<float>{}, c);
    CHECK(none.padded_elements() == 0);
    none.all_gather();
    none.reduce_scatter();
  });
}
