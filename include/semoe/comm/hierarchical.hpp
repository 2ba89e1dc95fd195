// semoe/comm/hierarchical.hpp: the rail-aware hierarchical all-to-all of
// SE-MoE §4 (Shen et al., arXiv 2205.10034). Local rank r
// of every node first gathers, inside its node, everything the node sends to
// local rank r on any node; then the ranks with the same local rank (a
// "rail") exchange one message per other node. Inter-node messages become
// local_size-fold fewer and local_size-fold larger than the flat algorithm's.
#pragma once

#include <algorithm>
#include <concepts>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <span>
#include <type_traits>
#include <utility>
#include <vector>

#include "semoe/comm/concepts.hpp"
#include "semoe/core/buffer.hpp"
#include "semoe/core/config.hpp"
#include "semoe/core/error.hpp"

namespace semoe::comm {

/// Messages this rank would send to another node in a flat all_to_all_v with
/// these send counts: one per destination on another node with a nonzero
/// count. Ranks are laid out node-major (rank = node * local_size + local_rank),
/// as in comm::local and the launcher. Summed over ranks (an all_reduce), it
/// is the job's flat inter-node message count, the baseline of
/// hierarchical::inter_node_messages().
inline std::int64_t flat_inter_node_messages(std::span<const index_t> send_counts, int rank, int local_size) {
  SEMOE_CHECK(local_size >= 1, "semoe::comm::flat_inter_node_messages: local_size = ", local_size,
              ": expected >= 1");
  const auto P = static_cast<int>(send_counts.size());
  SEMOE_CHECK(P % local_size == 0, "semoe::comm::flat_inter_node_messages: local_size = ", local_size,
              " does not divide the ", P, " send counts");
  SEMOE_CHECK(rank >= 0 && rank < P, "semoe::comm::flat_inter_node_messages: rank = ", rank, " is not one of ", P,
              " ranks");
  std::int64_t n = 0;
  for (int dst = 0; dst < P; ++dst) {
    SEMOE_CHECK(send_counts[dst] >= 0, "semoe::comm::flat_inter_node_messages: send_counts[", dst, "] = ",
                send_counts[dst], ": expected >= 0");
    n += dst / local_size != rank / local_size && send_counts[dst] > 0;
  }
  return n;
}

/// Options of comm::hierarchical (outside the class so `= {}` defaults work).
struct hierarchical_options {
  /// Also send each rail peer the per-source counts behind its message, so a
  /// recv_counts that is wrong only in how a node's total splits among the
  /// node's ranks is reported as the flat algorithm would. Costs one more
  /// (tiny) inter-node message per peer node; off by default because the
  /// caller's recv_counts usually come from an all-to-all of counts already.
  bool verify_counts = false;
};

namespace detail {

/// What every copy of one rank's hierarchical handle shares: the groups, the
/// in-order completion queue, the message counter and reusable staging memory.
template <class Intra, class Inter, class World>
struct hierarchical_state {
  hierarchical_state(World w, Intra i, Inter r) : world(std::move(w)), intra(std::move(i)), rail(std::move(r)) {}
  World world;
  Intra intra;  ///< this node's ranks, ordered by local rank
  Inter rail;   ///< one rank per node, all with this rank's local rank, ordered by node
  int nodes = 1, local_size = 1, node = 0, local_rank = 0;
  bool verify_counts = false;

  std::uint64_t next_seq = 0;
  std::map<std::uint64_t, std::function<void()>> pending;
  std::int64_t inter_node_messages = 0;
  // Staging (what this rank relays between the steps) grows to the largest
  // exchange seen, so steady-state steps allocate nothing.
  buffer<std::byte> stage;

  /// Collectives complete in issue order, whichever request is waited first,
  /// so every rank runs the same sub-collectives in the same order.
  void complete_through(std::uint64_t seq) {
    while (!pending.empty() && pending.begin()->first <= seq) {
      auto f = std::move(pending.begin()->second);
      pending.erase(pending.begin());
      f();
    }
  }

  template <class T>
  static T* staging(buffer<std::byte>& b, index_t n) {
    const auto bytes = static_cast<index_t>(static_cast<std::size_t>(n) * sizeof(T));
    if (b.size() < bytes) b.resize_discard(bytes);
    // buffer memory is 64-byte aligned and T trivially copyable: a valid T array.
    return reinterpret_cast<T*>(b.data());
  }
};

inline index_t sum_counts(std::span<const index_t> c) {
  index_t s = 0;
  for (index_t x : c) s += x;
  return s;
}

}  // namespace detail

/// A communicator whose all_to_all_v is the two-step hierarchical algorithm
/// and whose other collectives forward to the world communicator, so it can
/// be any layer's Comm. Intra carries the intra-node step, Inter the rail
/// step, World the rest; built from one world they are all its split groups.
/// A cheap handle like comm::local: copies share state.
template <Communicator Intra, Communicator Inter = Intra, Communicator World = Intra>
class hierarchical {
 public:
  using policy_kind = comm_tag;
  using intra_type = Intra;
  using inter_type = Inter;
  using world_type = World;

  using options = hierarchical_options;

  /// Build the intra-node and rail groups from the world (a collective on it).
  explicit hierarchical(World world, options opt = {})
    requires std::same_as<Intra, World> && std::same_as<Inter, World>
      : state_(make_state(std::move(world), opt)) {}

  /// Use groups the caller made (say, an intra-node communicator of another
  /// type): intra must be this node's ranks by local rank, rail this local
  /// rank's ranks by node.
  hierarchical(World world, Intra intra, Inter rail, options opt = {})
      : state_(std::make_shared<state>(std::move(world), std::move(intra), std::move(rail))) {
    init_topology(*state_, opt);
  }

  int rank() const { return state_->world.rank(); }
  int size() const { return state_->world.size(); }
  int local_rank() const { return state_->local_rank; }
  int local_size() const { return state_->local_size; }
  int node() const { return state_->node; }
  int nodes() const { return state_->nodes; }

  World& world() { return state_->world; }
  Intra& intra() { return state_->intra; }
  Inter& rail() { return state_->rail; }

  /// Nonzero-length payload messages this rank sent to another node in
  /// all_to_all_v calls completed since construction or the last reset (the
  /// small count messages of options.verify_counts are not included).
  std::int64_t inter_node_messages() const { return state_->inter_node_messages; }
  void reset_inter_node_messages() { state_->inter_node_messages = 0; }

  /// Same contract and result as the flat all_to_all_v: send grouped by
  /// destination rank, recv by source rank, both in rank order. The exchange
  /// runs inside wait() (several dependent sub-collectives); requests complete
  /// in issue order, so buffers and counts must live until then.
  template <class T>
  request all_to_all_v_async(std::span<const T> send, std::span<const index_t> send_counts, std::span<T> recv,
                             std::span<const index_t> recv_counts) {
    static_assert(std::is_trivially_copyable_v<T>, "semoe::comm::hierarchical: T must be trivially copyable");
    const int P = size();
    SEMOE_CHECK(static_cast<int>(send_counts.size()) == P, "semoe::comm::hierarchical::all_to_all_v: send_counts has ",
                send_counts.size(), " entries, expected one per rank (", P, ")");
    SEMOE_CHECK(static_cast<int>(recv_counts.size()) == P, "semoe::comm::hierarchical::all_to_all_v: recv_counts has ",
                recv_counts.size(), " entries, expected one per rank (", P, ")");
    check_total(send_counts, send.size(), "send_counts", "send");
    check_total(recv_counts, recv.size(), "recv_counts", "recv");
    std::vector<index_t> sc(send_counts.begin(), send_counts.end()), rc(recv_counts.begin(), recv_counts.end());
    return enqueue([st = state_, send, recv, sc = std::move(sc), rc = std::move(rc)] {
      exchange<T>(*st, send, sc, recv, rc);
    });
  }

  template <class T>
  request all_reduce_async(std::span<T> data, reduce_op op = reduce_op::sum) {
    return forward(state_->world.all_reduce_async(data, op));
  }
  template <class T>
  request all_gather_async(std::span<const T> mine, std::span<T> all) {
    return forward(state_->world.all_gather_async(mine, all));
  }
  template <class T>
  request reduce_scatter_async(std::span<const T> in, std::span<T> out, reduce_op op = reduce_op::sum) {
    return forward(state_->world.reduce_scatter_async(in, out, op));
  }
  template <class T>
  request broadcast_async(std::span<T> data, int root) {
    return forward(state_->world.broadcast_async(data, root));
  }
  void barrier() {
    drain();
    state_->world.barrier();
  }

  /// A hierarchical communicator over the world's (color, key) group; the
  /// group's own topology decides its nodes.
  hierarchical split(int color, int key)
    requires std::same_as<Intra, World> && std::same_as<Inter, World>
  {
    drain();
    return hierarchical(state_->world.split(color, key), options{.verify_counts = state_->verify_counts});
  }

  /// Complete every collective issued through this handle.
  void drain() { state_->complete_through(state_->next_seq); }

 private:
  using state = detail::hierarchical_state<Intra, Inter, World>;

  static std::shared_ptr<state> make_state(World world, options opt) {
    const int P = world.size(), L = world.local_size(), r = world.rank(), lr = world.local_rank();
    check_layout(P, L, r, lr);
    const int node = r / L;
    Intra intra = world.split(node, lr);  // key = local rank: intra rank == local rank
    Inter rail = world.split(lr, node);   // key = node: rail rank == node
    auto st = std::make_shared<state>(std::move(world), std::move(intra), std::move(rail));
    init_topology(*st, opt);
    return st;
  }

  static void check_layout(int P, int L, int r, int lr) {
    SEMOE_CHECK(L >= 1 && P % L == 0, "semoe::comm::hierarchical: local_size = ", L, " does not divide size = ", P);
    // Node-major ranks are what makes the rail step's output land in flat order.
    SEMOE_CHECK(lr == r % L, "semoe::comm::hierarchical: rank ", r, " has local_rank ", lr,
                "; expected rank % local_size = ", r % L, " (ranks numbered node by node)");
  }

  static void init_topology(state& st, options opt) {
    const int P = st.world.size(), L = st.world.local_size(), r = st.world.rank(), lr = st.world.local_rank();
    check_layout(P, L, r, lr);
    st.local_size = L;
    st.nodes = P / L;
    st.node = r / L;
    st.local_rank = lr;
    st.verify_counts = opt.verify_counts;
    SEMOE_CHECK(st.intra.size() == L && st.intra.rank() == lr, "semoe::comm::hierarchical: the intra-node group has ",
                st.intra.size(), " ranks and puts rank ", r, " at ", st.intra.rank(), "; expected ", L, " and ", lr,
                " (every node must hold local_size ranks)");
    SEMOE_CHECK(st.rail.size() == P / L && st.rail.rank() == r / L, "semoe::comm::hierarchical: the rail group has ",
                st.rail.size(), " ranks and puts rank ", r, " at ", st.rail.rank(), "; expected ", P / L, " and ",
                r / L);
  }

  static void check_total(std::span<const index_t> counts, std::size_t have, const char* counts_name,
                          const char* buffer_name) {
    index_t total = 0;
    for (std::size_t i = 0; i < counts.size(); ++i) {
      SEMOE_CHECK(counts[i] >= 0, "semoe::comm::hierarchical::all_to_all_v: ", counts_name, "[", i, "] = ", counts[i],
                  ": expected >= 0");
      total += counts[i];
    }
    SEMOE_CHECK(static_cast<std::size_t>(total) <= have, "semoe::comm::hierarchical::all_to_all_v: ", counts_name,
                " total ", total, " elements but ", buffer_name, " holds ", have);
  }

  request enqueue(std::function<void()> work) {
    const std::uint64_t seq = state_->next_seq++;
    state_->pending.emplace(seq, std::move(work));
    return request([st = state_, seq] { st->complete_through(seq); });
  }
  /// A world collective joins the same queue, so waiting on it first completes
  /// earlier all-to-alls: every rank then interleaves the groups identically.
  request forward(request r) {
    return enqueue([r = std::make_shared<request>(std::move(r))] { r->wait(); });
  }

  /// Run one sub-collective; a failure names the step and the world rank,
  /// since the group's own message speaks of group ranks.
  template <class F>
  static void step(const state& st, const char* what, F f) {
    try {
      f();
    } catch (const error& e) {
      semoe::detail::fail("semoe::comm::hierarchical::all_to_all_v (", what, " step, world rank ", st.world.rank(),
                          "): ", e.what());
    }
  }

  /// The two-step exchange, for ranks numbered node-major: rank = n * L + l.
  /// Counts travel only the intra-node step: after it, local rank l of node n
  /// knows c[(n,j) -> (m,l)] for every j, m, which sizes its rail messages; the
  /// rail step's receive sizes are node sums of the caller's recv_counts, so
  /// neither an all_gather of counts nor a second inter-node round is needed
  /// (unless options.verify_counts asks for the per-source check).
  template <class T>
  static void exchange(state& st, std::span<const T> send, const std::vector<index_t>& sc, std::span<T> recv,
                       const std::vector<index_t>& rc) {
    const int L = st.local_size, N = st.nodes, n = st.node;
    const auto P = static_cast<std::size_t>(L) * static_cast<std::size_t>(N);
    const std::span<const index_t> scs(sc), rcs(rc);
    // Degenerate shapes: one node, or one rank per node, are already flat.
    if (N == 1) {
      step(st, "one node", [&] { st.intra.all_to_all_v_async(send, scs, recv, rcs).wait(); });
      return;
    }
    if (L == 1) {
      for (int m = 0; m < N; ++m) st.inter_node_messages += m != n && sc[m] > 0;
      step(st, "one rank per node", [&] { st.rail.all_to_all_v_async(send, scs, recv, rcs).wait(); });
      return;
    }
    auto dst = [L](int m, int j) { return static_cast<std::size_t>(m) * L + j; };
    auto blk = [N](int j, int m) { return static_cast<std::size_t>(j) * N + m; };  // [intra source][node]

    // Step 0 (intra): tell local rank j what it will receive from me, per node.
    std::vector<index_t> cnt_send(P), cnt_recv(P), per_peer(L, N);
    for (int j = 0; j < L; ++j)
      for (int m = 0; m < N; ++m) cnt_send[blk(j, m)] = sc[dst(m, j)];
    step(st, "intra-node counts", [&] {
      st.intra
          .all_to_all_v_async(std::span<const index_t>(cnt_send), std::span<const index_t>(per_peer),
                              std::span<index_t>(cnt_recv), std::span<const index_t>(per_peer))
          .wait();
    });

    if (st.verify_counts) {
      // Tell rail peer m what each rank of my node sends it; compare with rc.
      std::vector<index_t> vsend(P), vrecv(P), per_node(N, L);
      for (int m = 0; m < N; ++m)
        for (int j = 0; j < L; ++j) vsend[dst(m, j)] = cnt_recv[blk(j, m)];
      step(st, "rail counts", [&] {
        st.rail
            .all_to_all_v_async(std::span<const index_t>(vsend), std::span<const index_t>(per_node),
                                std::span<index_t>(vrecv), std::span<const index_t>(per_node))
            .wait();
      });
      std::size_t bad = P;
      for (std::size_t src = 0; src < P && bad == P; ++src)
        if (vrecv[src] != rc[src]) bad = src;
      // Agree on the verdict in one world collective, so no rank goes on into
      // a data step whose peer has thrown, and no rank throws (aborting the
      // job) while another still waits for the verdict and would lose the
      // root cause to an "aborted" error.
      int failed = bad != P;
      step(st, "verdict", [&] { st.world.all_reduce_async(std::span<int>(&failed, 1), reduce_op::max).wait(); });
      SEMOE_CHECK(bad == P, "semoe::comm::hierarchical::all_to_all_v: rank ", bad, " sends ", vrecv[bad],
                  " elements to rank ", st.world.rank(), ", which expects ", bad < P ? rc[bad] : 0);
      SEMOE_CHECK(!failed, "semoe::comm::hierarchical::all_to_all_v was aborted: another rank's recv_counts "
                           "disagree with what its peers send (options.verify_counts)");
    }

    // Step 1 (intra): one all-to-all per destination node m hands local rank j
    // my part for rank (m, j). Node m's ranks are consecutive, so those parts
    // are one contiguous span of send; what arrives from local rank j lands
    // at block [m][j] of b, which is the rail step's layout: nothing is packed
    // or regrouped. The N exchanges are all in flight at once.
    std::vector<index_t> soff(P + 1, 0);
    for (std::size_t d = 0; d < P; ++d) soff[d + 1] = soff[d] + sc[d];
    std::vector<std::vector<index_t>> isc(N, std::vector<index_t>(L)), irc(N, std::vector<index_t>(L));
    std::vector<index_t> rsc(N, 0), rrc(N, 0);
    for (int m = 0; m < N; ++m)
      for (int j = 0; j < L; ++j) {
        isc[m][j] = sc[dst(m, j)];
        irc[m][j] = cnt_recv[blk(j, m)];
        rsc[m] += irc[m][j];
        rrc[m] += rc[dst(m, j)];
      }
    const index_t b_n = detail::sum_counts(rsc);
    T* b = state::template staging<T>(st.stage, b_n);
    step(st, "intra-node data", [&] {
      std::vector<request> parts;
      parts.reserve(static_cast<std::size_t>(N));
      index_t at = 0;
      for (int m = 0; m < N; ++m) {
        const auto from = static_cast<std::size_t>(soff[dst(m, 0)]);
        const auto len = static_cast<std::size_t>(soff[dst(m, 0) + L]) - from;
        parts.push_back(st.intra.all_to_all_v_async(send.subspan(from, len), std::span<const index_t>(isc[m]),
                                                    std::span<T>(b + at, static_cast<std::size_t>(rsc[m])),
                                                    std::span<const index_t>(irc[m])));
        at += rsc[m];
      }
      for (auto& r : parts) r.wait();
    });

    // Step 2 (rail): the message to node m is block m of b; since sources
    // n * L + j arrive node by node, recv ends up in flat rank order.
    for (int m = 0; m < N; ++m) st.inter_node_messages += m != n && rsc[m] > 0;
    step(st, "rail data", [&] {
      st.rail
          .all_to_all_v_async(std::span<const T>(b, static_cast<std::size_t>(b_n)), std::span<const index_t>(rsc),
                              recv, std::span<const index_t>(rrc))
          .wait();
    });
  }

  std::shared_ptr<state> state_;
};

template <Communicator C>
hierarchical(C) -> hierarchical<C, C, C>;

}  // namespace semoe::comm
