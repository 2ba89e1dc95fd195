// The embedding partition (SE-MoE §4.3) against the unpartitioned table:
// same outputs, same gradient columns, same AdamW step, 1/n of the bytes.
#include <doctest/doctest.h>

#include <cstdint>
#include <string>
#include <vector>

#include "gradcheck.hpp"
#include "semoe/comm/local.hpp"
#include "semoe/layer/embedding.hpp"
#include "semoe/train/optimizer.hpp"

using semoe::index_t;
using semoe::matrix;
using semoe::comm::local;
using semoe::layer::embedding;
using semoe::layer::partitioned_embedding;

// A communicator is required, not any type.
template <class C>
concept partitions_over = requires { typename partitioned_embedding<float, C>; };
static_assert(partitions_over<local>);
static_assert(!partitions_over<int>);
static_assert(!partitions_over<std::vector<float>>);

namespace {

/// Tokens per rank: uneven, and one rank with none whenever P > 1.
std::vector<index_t> token_counts(int P) {
  switch (P) {
    case 1: return {23};
    case 2: return {0, 29};
    default: return {11, 0, 31, 4};
  }
}

/// A model holding one partitioned embedding, as the optimizer sees it.
template <class E>
struct holder {
  E* e;
  auto parameters() { return e->parameters(); }
};

}  // namespace

TEST_CASE_TEMPLATE("partitioned_embedding: outputs, gradients and AdamW steps equal the unpartitioned table bitwise",
                   T, float, double) {
  const index_t vocab = 37, dim = 192;  // dim/2 = 96 > 64: columns split across threads
  const std::uint64_t seed = 11;
  const int steps = 2;
  const typename semoe::train::adamw<T>::options aopt{.lr = 0.05, .weight_decay = 0.1};

  for (int P : {1, 2, 4}) {
    CAPTURE(P);
    const auto counts = token_counts(P);
    std::vector<index_t> offset(static_cast<std::size_t>(P) + 1, 0);
    for (int r = 0; r < P; ++r) offset[r + 1] = offset[r] + counts[r];
    const index_t N = offset[P];

    // All ranks' tokens in rank order, with many repeats across and within ranks.
    std::vector<std::int32_t> ids(static_cast<std::size_t>(N));
    for (index_t t = 0; t < N; ++t) ids[t] = static_cast<std::int32_t>((t * 7 + 3) % 13 + (t % 3 == 0 ? 20 : 0));
    std::vector<matrix<T>> dy;
    for (int s = 0; s < steps; ++s) {
      dy.emplace_back(N, dim);
      semoe::test::fill_uniform(dy.back().span(), 100 + static_cast<std::uint64_t>(s));
    }

    // The unpartitioned reference sees every rank's tokens as one batch.
    semoe::cpu_executor ex({.threads = 2});
    embedding<T> full(ex, {.vocab = vocab, .dim = dim}, seed);
    holder<embedding<T>> full_model{&full};
    semoe::train::adamw<T> full_opt(ex, aopt);
    std::vector<matrix<T>> y_ref, g_ref, w_ref;  // w_ref[s]: the table before step s
    w_ref.emplace_back(vocab, dim);
    std::copy_n(full.weight().data(), vocab * dim, w_ref.back().data());
    for (int s = 0; s < steps; ++s) {
      y_ref.emplace_back(N, dim);
      full.forward(ids, y_ref.back().view());
      full.backward(dy[s].view());
      g_ref.emplace_back(vocab, dim);
      std::copy_n(full.weight_grad().data(), vocab * dim, g_ref.back().data());
      full_opt.step(full_model);
      full.zero_grad();
      w_ref.emplace_back(vocab, dim);
      std::copy_n(full.weight().data(), vocab * dim, w_ref.back().data());
    }

    // Mismatch counts per rank, checked on the main thread.
    std::vector<index_t> bad_init(P), bad_y(P), bad_grad(P), bad_w(P), param_size(P);
    local::run(P, [&](local& comm) {
      const int r = comm.rank();
      semoe::cpu_executor rex({.threads = 2});
      partitioned_embedding<T, local> pe(rex, comm, {.vocab = vocab, .dim = dim}, seed);
      holder<partitioned_embedding<T, local>> model{&pe};
      semoe::train::adamw<T> opt(rex, aopt);
      const index_t h = pe.local_dim(), c0 = pe.column_begin();
      const auto cmp = [&](semoe::matrix_view<T> slice, const matrix<T>& ref) {
        index_t bad = 0;
        for (index_t v = 0; v < vocab; ++v)
          for (index_t j = 0; j < h; ++j) bad += slice(v, j) != ref(v, c0 + j);
        return bad;
      };
      bad_init[r] = cmp(pe.weight(), w_ref[0]);
      param_size[r] = static_cast<index_t>(pe.parameters()[0].value.size());

      const index_t n = counts[r];
      const std::span<const std::int32_t> mine(ids.data() + offset[r], static_cast<std::size_t>(n));
      matrix<T> y(n, dim);
      for (int s = 0; s < steps; ++s) {
        y.fill(T(-7));
        pe.forward(mine, y.view());
        for (index_t i = 0; i < n; ++i)
          for (index_t j = 0; j < dim; ++j) bad_y[r] += y(i, j) != y_ref[s](offset[r] + i, j);
        pe.backward(dy[s].view().row_slice(offset[r], offset[r] + n));
        bad_grad[r] += cmp(pe.weight_grad(), g_ref[s]);
        opt.step(model);
        pe.zero_grad();
        bad_w[r] += cmp(pe.weight(), w_ref[s + 1]);
      }
    });
    for (int r = 0; r < P; ++r) {
      CAPTURE(r);
      CHECK(bad_init[r] == 0);
      CHECK(bad_y[r] == 0);
      CHECK(bad_grad[r] == 0);
      CHECK(bad_w[r] == 0);
      CHECK(param_size[r] == vocab * dim / P);
    }
  }
}

TEST_CASE("partitioned_embedding: per-rank table + AdamW state is 1/n of the unpartitioned") {
  using T = float;
  // A byte-level LM's table: 256 symbols x 512 wide.
  const semoe::layer::embedding<T>::options o{.vocab = 256, .dim = 512};
  semoe::cpu_executor ex({.threads = 1});
  auto& ledger = semoe::memory_ledger::instance();

  // Ledger bytes of table + gradient + AdamW moments (allocated by the first
  // step; forward's scratch is not in yet), and table + AdamW state from the
  // buffer sizes alone.
  const auto measure = [&](auto make, std::size_t& ledger_bytes, std::size_t& state_bytes) {
    const std::size_t before = ledger.current();
    auto layer = make();
    holder<decltype(layer)> model{&layer};
    semoe::train::adamw<T> opt(ex, {});
    opt.step(model);
    ledger_bytes = ledger.current() - before;
    state_bytes = layer.parameters()[0].value.size() * sizeof(T) * (1 + semoe::train::adamw<T>::state_slots);
  };
  std::size_t full_ledger = 0, full_state = 0;
  measure([&] { return embedding<T>(ex, o, 3); }, full_ledger, full_state);
  CHECK(full_state == 3 * 256 * 512 * sizeof(T));

  for (int n : {1, 2, 4}) {
    auto world = local::make_world(n);
    std::vector<std::size_t> ledger_bytes(n), state_bytes(n);
    for (int r = 0; r < n; ++r)
      measure([&] { return partitioned_embedding<T, local>(ex, world[r], o, 3); }, ledger_bytes[r], state_bytes[r]);
    MESSAGE("embedding partition, vocab 256 x dim 512 float, n = ", n, ": per-rank table + AdamW state = ",
            state_bytes[0], " bytes (unpartitioned ", full_state, "); with the gradient (memory_ledger) = ",
            ledger_bytes[0], " bytes (unpartitioned ", full_ledger, ")");
    for (int r = 0; r < n; ++r) {
      CAPTURE(r);
      CHECK(state_bytes[r] * static_cast<std::size_t>(n) == full_state);
      CHECK(ledger_bytes[r] * static_cast<std::size_t>(n) == full_ledger);
    }
  }
}

TEST_CASE("partitioned_embedding: configuration errors name the values") {
  semoe::cpu_executor ex({.threads = 1});
  auto world = local::make_world(4);
  CHECK_THROWS_WITH_AS((partitioned_embedding<float, local>(ex, world[1], {.vocab = 10, .dim = 6}, 1)),
                       doctest::Contains("options.dim = 6 is not divisible by the 4 ranks"), semoe::error);
  CHECK_THROWS_WITH_AS((partitioned_embedding<float, local>(ex, world[0], {.vocab = 0, .dim = 8}, 1)),
                       doctest::Contains("options.vocab = 0"), semoe::error);
  partitioned_embedding<float, local> ok(ex, world[3], {.vocab = 10, .dim = 8}, 1);
  CHECK(ok.local_dim() == 2);
  CHECK(ok.column_begin() == 6);
  matrix<float> dy(0, 8);
  CHECK_THROWS_WITH_AS(ok.backward(dy.view()), doctest::Contains("called before forward"), semoe::error);

  // workspace_bytes is what forward + backward allocate (one rank: no peers allocating meanwhile).
  auto solo = local::make_world(1);
  partitioned_embedding<float, local> pe(ex, solo[0], {.vocab = 10, .dim = 8}, 1);
  const std::vector<std::int32_t> ids{3, 1, 3, 9, 0};
  matrix<float> y(5, 8);
  const std::size_t before = semoe::memory_ledger::instance().current();
  pe.forward(ids, y.view());
  pe.backward(y.view());
  CHECK(semoe::memory_ledger::instance().current() - before ==
        partitioned_embedding<float, local>::workspace_bytes({.vocab = 10, .dim = 8}, 1, 5, 5));
}

TEST_CASE("partitioned_embedding: a bad id or y on one rank is an error on every rank") {
  const int P = 2;
  const std::vector<std::vector<std::int32_t>> ids{{1, 2, 3}, {4, 5, 10, 0}};  // rank 1, position 2: 10 >= vocab
  std::vector<std::string> why(P);
  local::run(P, [&](local& comm) {
    const int r = comm.rank();
    semoe::cpu_executor ex({.threads = 1});
    partitioned_embedding<double, local> pe(ex, comm, {.vocab = 10, .dim = 4}, 1);
    matrix<double> y(static_cast<index_t>(ids[r].size()), 4);
    try {
      pe.forward(ids[r], y.view());
    } catch (const semoe::error& e) {
      why[r] = e.what();
    }
  });
  for (int r = 0; r < P; ++r) {
    CAPTURE(r);
    CHECK(why[r].find("rank 1: ids[2] = 10 is out of range; expected 0 <= id < vocab = 10") != std::string::npos);
  }

  // A y of the wrong shape on rank 0: rank 0 says how, rank 1 says who.
  std::vector<std::string> shape(P);
  local::run(P, [&](local& comm) {
    const int r = comm.rank();
    semoe::cpu_executor ex({.threads = 1});
    partitioned_embedding<float, local> pe(ex, comm, {.vocab = 10, .dim = 4}, 1);
    const std::vector<std::int32_t> mine{1, 2};
    matrix<float> y(2, r == 0 ? 5 : 4);
    try {
      pe.forward(mine, y.view());
    } catch (const semoe::error& e) {
      shape[r] = e.what();
    }
  });
  CHECK(shape[0].find("forward: y: expected shape [2, 4], got [2, 5]") != std::string::npos);
  CHECK(shape[1].find("rank 0 passed y of the wrong shape") != std::string::npos);
}
