// semoe/layer/moe_layer.hpp: the MoE layer of SE-MoE (§3.1), expert-parallel
// over the ranks of a communicator. Forward: router GEMM -> gate (routing
// plan) -> permute expert-major -> all-to-all -> grouped expert FFN ->
// all-to-all back -> weighted combine. Backward mirrors it exactly; gate
// gradients flow through the combine weights and the aux losses.
//
// On a device backend (semoe::cuda) activations, the router and the expert
// blocks live in device memory and every step above runs there. Gates that
// route on an executor (gate::executor_routed_gate: top_k, switch_gate) build
// the routing plan there too, the very plan the cpu backend builds; the
// others get the logits in pinned host memory, route on the host, and their
// rows and weights go back to the device (gate backward likewise). Across
// GPUs comm::nccl moves device rows; host communicators stage them.
#pragma once

#include <algorithm>
#include <cmath>
#include <functional>
#include <memory>
#include <tuple>
#include <type_traits>
#include <vector>

#include "semoe/comm/concepts.hpp"
#include "semoe/comm/local.hpp"
#include "semoe/core/backend.hpp"
#include "semoe/core/blas.hpp"
#include "semoe/core/parameter.hpp"
#include "semoe/core/random.hpp"
#include "semoe/core/trace.hpp"
#include "semoe/expert/concepts.hpp"
#include "semoe/expert/ffn.hpp"
#include "semoe/gate/concepts.hpp"
#include "semoe/gate/routing.hpp"
#include "semoe/layer/concepts.hpp"
#include "semoe/layer/dispatch.hpp"
#include "semoe/layer/expert_backward.hpp"
#include "semoe/layer/expert_exchange.hpp"
#include "semoe/layer/load_monitor.hpp"
#include "semoe/placement/static_placement.hpp"
#include "semoe/prefetch/on_demand.hpp"
#include "semoe/storage/resident.hpp"

namespace semoe {

namespace detail {
/// out = in * u (or out += in * u), u ~ U(1-eps, 1+eps) keyed by (step,
/// global token, feature): the router's input jitter, one row per index.
template <class T>
struct jitter_kernel {
  philox rng;
  T eps;
  index_t cols, base;
  const T* in;
  index_t in_ld;
  T* out;
  index_t out_ld;
  bool accumulate;
  SEMOE_HD void operator()(index_t t, index_t j0, index_t j1) const {
    const T* src = in + t * in_ld;
    T* dst = out + t * out_ld;
    for (index_t j = j0; j < j1; ++j) {
      const auto c = static_cast<std::uint64_t>((base + t) * cols + j);
      const T u = T(1) - eps + T(2) * eps * T(rng.uniform(c));
      dst[j] = accumulate ? dst[j] + src[j] * u : src[j] * u;
    }
  }
};
}  // namespace detail

/// The layer for scalar T. Most code names `moe_layer` (T = float) below.
template <class T, Backend B, class Gate, class Expert = expert::ffn<act::gelu>, class Comm = comm::local,
          class Storage = storage::resident, class Prefetch = prefetch::on_demand,
          class Placement = placement::static_placement>
class basic_moe_layer {
  static_assert(gate::check_gate<Gate, T>());  // each check names what a policy lacks
  static_assert(expert::check_expert<Expert, typename B::executor, T>());
  static_assert(comm::check_communicator<Comm>());
  static_assert(storage::check_storage<Storage, T>());
  static_assert(prefetch::check_prefetcher<Prefetch>());
  static_assert(prefetch::check_pairing<Storage, Prefetch>());  // a policy that needs a partner names it
  static_assert(placement::check_placement<Placement>());
  /// Experts with copies on other ranks (placement::replicate_hot).
  static constexpr bool replicates = Placement::replica_slots > 0;
  static_assert(!replicates || !B::executor::on_device, "semoe::moe_layer: placement::replicate_hot runs on host "
                "backends only; on a device backend use placement::static_placement");

 public:
  using value_type = T;
  using policy_kind = layer::module_tag;
  using backend = B;
  using gate_type = Gate;
  using expert_type = Expert;
  using comm_type = Comm;
  using memory_space = typename B::memory_space;
  using store_type = typename storage::store_for<Storage, T, memory_space>::type;
  using prefetch_type = Prefetch;
  using placement_type = Placement;
  /// Activations, router and expert blocks in device memory.
  static constexpr bool on_device = B::executor::on_device;
  /// The gate routes on the layer's executor (else on the host, staged).
  static constexpr bool routes_on_executor = gate::executor_routed_gate<Gate, typename B::executor, T>;
  using plan_type = gate::routing_plan<T, std::conditional_t<routes_on_executor, memory_space, host_space>>;

  struct options {
    index_t hidden = 0;   ///< model width
    index_t ffn = 0;      ///< expert hidden width
    index_t experts = 0;  ///< experts over the whole expert-parallel group
    typename Gate::options gate{};
    typename Expert::options expert{};  ///< hidden and ffn are filled in from above
    std::uint64_t seed = 0;             ///< parameter init and gate noise; same on every rank
    typename Placement::options placement{};
  };

  static void validate(const options& o, int ranks) {
    SEMOE_CHECK(o.hidden > 0, "semoe::moe_layer: options.hidden = ", o.hidden, ": expected > 0");
    SEMOE_CHECK(o.ffn > 0, "semoe::moe_layer: options.ffn = ", o.ffn, ": expected > 0");
    SEMOE_CHECK(o.experts > 0, "semoe::moe_layer: options.experts = ", o.experts, ": expected > 0");
    SEMOE_CHECK(o.experts % ranks == 0, "semoe::moe_layer: options.experts = ", o.experts,
                " must be a multiple of the expert-parallel ranks (", ranks, ")");
    Gate::validate(o.gate);
  }

  /// `store` may be shared by several layers (one model-wide budget); by
  /// default the layer makes its own.
  basic_moe_layer(typename B::executor& ex, Comm& comm, options opt, std::shared_ptr<store_type> store = nullptr)
      : ex_(&ex), comm_(&comm), opt_(fill(opt)), gate_(opt_.gate), expert_(opt_.expert),
        store_(store ? std::move(store) : std::make_shared<store_type>()), placement_(opt_.placement) {
    validate(opt_, comm.size());
    (void)gate_.choices(opt_.experts);  // k > experts fails here, not mid-step
    local_experts_ = opt_.experts / comm.size();
    first_expert_ = comm.rank() * local_experts_;
    layer_id_ = store_->add_layer(local_experts_ + Placement::replica_slots, expert_.block_elems());
    const philox rng(opt_.seed, 0x5e30e);
    buffer<T> staged;  // a device block is initialized on the host, then copied
    for (index_t i = 0; i < local_experts_; ++i)
      store_->visit(layer_id_, i, [&](storage::block_ref<T> blk) {
        if constexpr (storage::visit_space_t<store_type>::host_accessible) {
          expert_.init(blk.params, rng, first_expert_ + i);
        } else {
          staged.resize_discard(static_cast<index_t>(blk.params.size()));
          expert_.init(staged.span(), rng, first_expert_ + i);
          ex_->copy(blk.params.data(), staged.data(), staged.bytes());
        }
      });
    // Router: small uniform init, identical on every rank (seeded, not sent).
    buffer<T> router(opt_.hidden * opt_.experts);
    const philox rrng(opt_.seed, 0x7047e);
    const T scale = T(1) / std::sqrt(T(opt_.hidden));
    for (index_t i = 0; i < router.size(); ++i)
      router[i] = scale * (T(2) * T(rrng.uniform(static_cast<std::uint64_t>(i))) - T(1));
    router_.resize_discard(router.size());
    ex_->copy(router_.data(), router.data(), router.bytes());
    router_grad_.resize_discard(router.size());
    router_grad_.zero();
  }

  // -- Module interface ---------------------------------------------------

  index_t output_cols(index_t input_cols) const {
    SEMOE_CHECK(input_cols == opt_.hidden, "semoe::moe_layer: input has ", input_cols, " columns, expected hidden = ",
                opt_.hidden);
    return opt_.hidden;
  }

  void forward(matrix_view<const T> x, matrix_view<T> y) {
    const index_t tokens = x.rows(), H = opt_.hidden, E = opt_.experts;
    SEMOE_CHECK(tokens > 0 || comm_->size() > 1, "semoe::moe_layer::forward: empty batch (x has 0 rows)");
    check_shape(x, tokens, H, "semoe::moe_layer::forward: x");
    check_shape(matrix_view<const T>(y), tokens, H, "semoe::moe_layer::forward: y");
    x_ = x;
    // Uneven batches are fine, a rank with no tokens included: every rank
    // learns every rank's count here, and capacity is computed from the total.
    std::tie(global_tokens_, token_offset_) = layer::group_tokens(*comm_, tokens);
    SEMOE_CHECK(global_tokens_ > 0, "semoe::moe_layer::forward: empty batch (0 tokens on every one of the ",
                comm_->size(), " ranks)");
    has_forward_ = training_;  // eval mode keeps nothing for a backward

    {  // Router: logits = x' Wg, with x' = x * jitter when the gate asks for it.
      phase ts("router", *this);
      matrix_view<const T> xr = x;
      if (jitter() > 0) {
        xj_.resize_discard(tokens * H);
        apply_jitter(x, xj_.matrix(tokens, H), false);
        xr = xj_.matrix(tokens, H);
      }
      logits_.resize_discard(tokens * E);
      blas::gemm(*ex_, blas::op::n, blas::op::n, T(1), xr, matrix_view<const T>(router_.matrix(H, E)), T(0),
                 logits_.matrix(tokens, E));
    }
    {
      phase ts("gate", *this);
      const auto ctx = context();
      if constexpr (routes_on_executor) {
        gate_.route(*ex_, ctx, matrix_view<const T>(logits_.matrix(tokens, E)), plan_);
        layer::dispatch_rows(*ex_, plan_, row_dev_);
        if constexpr (replicates) placement_.assign(plan_, row_dev_.span(), comm_->size(), local_experts_, slots_);
      } else {
        gate_.route(ctx, host_logits(tokens), plan_);
        layer::dispatch_rows(plan_, row_);
        if constexpr (replicates) placement_.assign(plan_, row_.span(), comm_->size(), local_experts_, slots_);
        if constexpr (on_device) {  // the kernels read the plan's rows and weights on the device
          to_device(row_dev_, row_);
          to_device(weight_dev_, plan_.weight);
        }
      }
    }
#ifdef NDEBUG
    if (!plan_checked_)  // a gate's plan is checked on the first call (every call in debug builds)
#endif
      gate::check_plan(plan_, E, tokens, gate::gate_name<Gate>());
    plan_checked_ = true;
    const index_t R = plan_.kept();
    if (training_) load_.record_sent(plan_.counts.span());  // eval forwards are not steps
    x_disp_.resize_discard(R * H);
    y_disp_.resize_discard(R * H);
    {
      phase ts("permute", *this);
      layer::permute(*ex_, map(), x, x_disp_.matrix(R, H));
    }
    if (comm_->size() == 1) {
      if (training_) load_.record_received(plan_.offsets.span());
      run_experts_forward(plan_.offsets.span(), x_disp_.matrix(R, H), y_disp_.matrix(R, H));
    } else {
      if constexpr (replicates)  // rows per slot: each rank's experts, then its replicas
        exchange_.plan(*ex_, *comm_, std::span<const std::int32_t>(slots_), local_experts_ + Placement::replica_slots, H);
      else
        exchange_.plan(*ex_, *comm_, plan_.counts.span(), local_experts_, H);
      if (training_) load_.record_received(exchange_.expert_offsets());
      const index_t Rr = exchange_.rows();
      expert_in_.resize_discard(Rr * H);
      expert_out_.resize_discard(Rr * H);
      exchange_.to_experts(*ex_, *comm_, x_disp_.data(), expert_in_.data());
      run_experts_forward(exchange_.expert_offsets(), expert_in_.matrix(Rr, H), expert_out_.matrix(Rr, H));
      exchange_.from_experts(*ex_, *comm_, expert_out_.data(), y_disp_.data());
    }
    {
      phase ts("combine", *this);
      layer::combine(*ex_, map(), matrix_view<const T>(y_disp_.matrix(R, H)), y);
    }
  }

  void backward(matrix_view<const T> dy, matrix_view<T> dx) {
    const index_t tokens = plan_.tokens, H = opt_.hidden, E = opt_.experts, R = plan_.kept();
    SEMOE_CHECK(has_forward_ && x_.rows() == tokens, "semoe::moe_layer::backward: no forward to go back through",
                training_ ? "" : " (the layer is in eval mode, train(false), whose forward keeps no activations)");
    check_shape(dy, tokens, H, "semoe::moe_layer::backward: dy");
    const bool want_dx = dx.rows() > 0;
    if (want_dx) check_shape(matrix_view<const T>(dx), tokens, H, "semoe::moe_layer::backward: dx");
    dweight_.resize_discard(plan_.assignments());
    {  // dy_disp overwrites y_disp row by row: each row is read before it is written.
      phase ts("combine_backward", *this);
      layer::combine_backward(*ex_, map(), dy, matrix_view<const T>(y_disp_.matrix(R, H)),
                              y_disp_.matrix(R, H), dweight_.data());
    }
    if (comm_->size() == 1) {
      run_experts_backward(plan_.offsets.span(), x_disp_.matrix(R, H), y_disp_.matrix(R, H));
    } else {
      const index_t Rr = exchange_.rows();
      exchange_.to_experts(*ex_, *comm_, y_disp_.data(), expert_out_.data());
      run_experts_backward(exchange_.expert_offsets(), expert_in_.matrix(Rr, H), expert_out_.matrix(Rr, H));
      exchange_.from_experts(*ex_, *comm_, expert_out_.data(), y_disp_.data());
      if constexpr (replicates) placement_.template reduce_grads<T>(*store_, layer_id_, *comm_, local_experts_);
    }
    if (want_dx) {
      phase ts("unpermute", *this);
      layer::unpermute_sum(*ex_, map(), matrix_view<const T>(y_disp_.matrix(R, H)), dx);
    }
    {  // Gate: dlogits from the combine weights and aux losses.
      phase ts("gate_backward", *this);
      dlogits_.resize_discard(tokens * E);
      const auto ctx = context();
      if constexpr (routes_on_executor) {
        gate_.backward(*ex_, ctx, matrix_view<const T>(logits_.matrix(tokens, E)), plan_,
                       std::span<const T>(dweight_.span()), dlogits_.matrix(tokens, E));
      } else {
        // The gate's backward runs where its forward did: on the host (device
        // backends stage its inputs and output through host buffers).
        const T *logits = logits_.data(), *dweight = dweight_.data();
        T* dlogits = dlogits_.data();
        if constexpr (on_device) {
          dweight_host_.resize_discard(dweight_.size());
          dlogits_host_.resize_discard(tokens * E);
          ex_->copy(dweight_host_.data(), dweight_.data(), dweight_.bytes());
          logits = logits_host_.data();
          dweight = dweight_host_.data();
          dlogits = dlogits_host_.data();
        }
        gate_.backward(ctx, as_matrix(logits, tokens, E), plan_,
                       std::span<const T>(dweight, static_cast<std::size_t>(plan_.assignments())),
                       as_matrix(dlogits, tokens, E));
        if constexpr (on_device) ex_->copy(dlogits_.data(), dlogits, dlogits_host_.bytes());
      }
    }
    {  // The router GEMMs: dWg += x'^T dlogits, dx += dlogits Wg^T.
      phase ts("router_backward", *this);
      const bool jit = jitter() > 0;
      matrix_view<const T> xr = jit ? matrix_view<const T>(xj_.matrix(tokens, H)) : x_;
      const blas::gemm_problem<T> dwg{blas::op::t, blas::op::n, H, E, tokens, T(1), xr.data(), xr.ld(),
                                      dlogits_.data(), E, T(1), router_grad_.data(), E};
      const blas::gemm_problem<T> both[2] = {dwg, {blas::op::n, blas::op::t, tokens, H, E, T(1), dlogits_.data(), E,
                                                   router_.data(), E, T(1), dx.data(), dx.ld()}};
      // Side by side (two threads where ex runs the GEMMs); with jitter, dx += (dlogits Wg^T) * noise comes
      // after dWg, through xj_.
      blas::grouped_gemm(*ex_, std::span<const blas::gemm_problem<T>>(both, want_dx && !jit ? 2 : 1));
      if (want_dx && jit) {
        blas::gemm(*ex_, blas::op::n, blas::op::t, T(1), matrix_view<const T>(dlogits_.matrix(tokens, E)),
                   matrix_view<const T>(router_.matrix(H, E)), T(0), xj_.matrix(tokens, H));
        apply_jitter(matrix_view<const T>(xj_.matrix(tokens, H)), dx, true);
      }
    }
  }

  /// The router weight is the only dense parameter; expert blocks live in the store.
  param_list<T> parameters() {
    return {{"router.weight", router_.span(), router_grad_.span(), param_kind::dense}};
  }

  void zero_grad() {
    router_grad_.zero();
    store_->zero_grads(layer_id_);
  }

  /// Training mode (the default) keeps each routed row's expert activations
  /// for backward. Eval mode, train(false), is forward-only: activations are
  /// computed one expert at a time in scratch as large as the busiest
  /// expert's rows and dropped, and a backward is refused. Outputs are the
  /// same bits in both modes for the same routing (the gate's eval capacity
  /// may route differently; see gate options).
  void train(bool on) { training_ = on; }
  bool training() const { return training_; }

  /// Bytes of expert activations the layer holds now: the last training
  /// forward's rows x saved/work columns, or eval mode's one-expert scratch.
  std::size_t activation_bytes() const { return sizeof(T) * static_cast<std::size_t>(saved_.size() + work_.size()); }

  /// Called in backward with each local expert once its gradients of this
  /// step are final, every expert once (a trainer updates it right then, while
  /// its block is still near compute; see trainer options).
  void set_expert_backward_hook(std::function<void(index_t)> f) {
    SEMOE_CHECK(!replicates, "semoe::moe_layer: experts updated in backward need placement::static_placement: "
                "replicated experts' gradients are summed after backward");
    expert_done_ = std::move(f);
  }
  T aux_loss() const { return plan_.aux_loss(); }

  /// Call once per optimizer step: gate state (aux-free bias), fresh noise,
  /// and the prefetcher's predictions move on.
  void end_step() {
    if constexpr (requires(Gate& g, const gate::route_context& c) { g.end_step(c); }) gate_.end_step(context());
    if constexpr (requires { store_->end_step(layer_id_); }) store_->end_step(layer_id_);
    prefetch_.end_step(*store_);
    load_.end_step();
    load_.trace(layer_id_, comm_->rank(), first_expert_, local_experts_);
    if constexpr (replicates) placement_.template end_step<T>(*store_, layer_id_, *comm_, local_experts_, load_);
    ++step_;
  }

  // -- Introspection --------------------------------------------------------

  const options& opts() const { return opt_; }
  /// The last routing plan; its per-assignment arrays are in the executor's
  /// memory when the gate routes there (gate::copy_to_host brings them over).
  const plan_type& plan() const { return plan_; }
  Gate& gate() { return gate_; }
  const Expert& expert_policy() const { return expert_; }
  store_type& store() { return *store_; }
  std::shared_ptr<store_type> shared_store() const { return store_; }
  index_t layer_id() const { return layer_id_; }
  index_t local_experts() const { return local_experts_; }
  index_t first_expert() const { return first_expert_; }
  Comm& communicator() { return *comm_; }
  /// Steps taken; keys gate noise and jitter. A restored run sets it back.
  std::uint64_t step() const { return step_; }
  void set_step(std::uint64_t s) { step_ = s; }

  /// Routed rows per global expert over the whole group in the last forward.
  std::vector<index_t> expert_load() {
    std::vector<double> load(static_cast<std::size_t>(opt_.experts));
    for (index_t e = 0; e < opt_.experts; ++e) load[e] = static_cast<double>(plan_.counts[e]);
    comm::all_reduce(*comm_, std::span<double>(load));
    return {load.begin(), load.end()};
  }
  /// This rank's rows and expert seconds, step by step (layer/load_monitor.hpp);
  /// assign a load_monitor(window) to change its window (16 steps).
  layer::load_monitor& load() { return load_; }
  /// The group's load over the window, on every rank: one small all-gather.
  layer::load_report gather_load() {
    return layer::gather_load(*comm_, load_, local_experts_, Placement::replica_slots);
  }
  Placement& placement() { return placement_; }

 private:
  /// A traced phase of the step. On a device backend with tracing on it
  /// waits for the device work issued inside before it closes, so the Chrome
  /// trace shows how long the device took, not how long the launches did.
  struct phase {
    phase(const char* name, basic_moe_layer& l) : layer(l), ts(name, "compute", l.comm_->rank()) {}
    phase(const phase&) = delete;
    phase& operator=(const phase&) = delete;
    ~phase() {
      if constexpr (on_device)
        if (trace::recorder::instance().enabled()) {
          try {
            layer.ex_->synchronize();
          } catch (...) {  // a failed kernel: the layer's next device call reports it
          }
        }
    }
    basic_moe_layer& layer;
    trace::scope ts;
  };

  static options fill(options o) {
    o.expert = expert::with_layer_sizes(o.expert, o.hidden, o.ffn);
    return o;
  }

  float jitter() const {
    if constexpr (requires(const Gate& g) { g.input_jitter(); })
      return training_ ? static_cast<float>(gate_.input_jitter()) : 0.0f;
    else
      return 0.0f;
  }

  /// out = in * u (or out += in * u when accumulate), u ~ U(1-eps, 1+eps),
  /// keyed by (step, global token, feature) so the split never changes it.
  void apply_jitter(matrix_view<const T> in, matrix_view<T> out, bool accumulate) {
    ex_->parallel_rows(in.rows(), in.cols(),
                      detail::jitter_kernel<T>{philox(opt_.seed ^ 0x717e4ull, step_), T(jitter()), in.cols(),
                                               token_offset_, in.data(), in.ld(), out.data(), out.ld(), accumulate},
                      layer::row_grain);
  }

  /// The logits where the gate reads them: on the host.
  matrix_view<const T> host_logits(index_t tokens) {
    const index_t E = opt_.experts;
    if constexpr (on_device) {
      logits_host_.resize_discard(tokens * E);
      ex_->copy(logits_host_.data(), logits_.data(), static_cast<std::size_t>(tokens * E) * sizeof(T));
      return logits_host_.matrix(tokens, E);
    } else {
      return logits_.matrix(tokens, E);
    }
  }

  template <class U>
  void to_device(buffer<U, memory_space>& dst, const buffer<U>& src) {
    dst.resize_discard(src.size());
    ex_->copy(dst.data(), src.data(), src.bytes());
  }

  /// The plan's rows and weights in the memory the row kernels run on.
  layer::dispatch_map<T> map() const {
    if constexpr (routes_on_executor)
      return {row_dev_.data(), plan_.weight.data(), plan_.k, plan_.tokens};
    else if constexpr (on_device)
      return {row_dev_.data(), weight_dev_.data(), plan_.k, plan_.tokens};
    else
      return layer::host_map(plan_, row_);
  }

  gate::route_context context() {
    gate::route_context c;
    c.rank = comm_->rank();
    c.ranks = comm_->size();
    c.global_tokens = global_tokens_;
    c.token_offset = token_offset_;
    c.seed = opt_.seed;
    c.step = step_;
    c.training = training_;
    if (comm_->size() > 1) {
      Comm* cm = comm_;
      c.all_reduce_sum = [cm](std::span<double> v) { comm::all_reduce(*cm, v); };
      c.all_reduce_sum_u64 = [cm](std::span<std::uint64_t> v) { comm::all_reduce(*cm, v); };
      c.all_gather = [cm](std::span<const std::uint64_t> mine, std::span<std::uint64_t> all) {
        comm::all_gather(*cm, mine, all);
      };
    }
    return c;
  }

  /// Local expert counts in the layout the prefetcher expects.
  std::vector<std::int32_t> local_counts(std::span<const index_t> offsets) const {
    std::vector<std::int32_t> c(offsets.size() - 1);  // local experts, then replica slots
    for (std::size_t i = 0; i < c.size(); ++i) c[i] = static_cast<std::int32_t>(offsets[i + 1] - offsets[i]);
    return c;
  }

  template <class F>
  void with_blocks(std::span<const index_t> offsets, prefetch::phase ph, F f) {
    const auto counts = local_counts(offsets);
    prefetch_.before(*store_, layer_id_, ph, std::span<const std::int32_t>(counts));
    const auto n = static_cast<index_t>(counts.size());
    params_.resize(counts.size());
    grads_.resize(counts.size());
    // An expert without rows this step is not brought into fast memory.
    for (index_t i = 0; i < n; ++i) {
      params_[i] = grads_[i] = nullptr;
      if (counts[i] == 0) continue;
      auto blk = acquire(i, ph == prefetch::phase::backward);
      params_[i] = blk.params.data();
      grads_[i] = blk.grads.data();
    }
    f();
    for (index_t i = 0; i < n; ++i)
      if (counts[i] > 0) release_block(i);
    prefetch_.after(*store_, layer_id_, ph);
  }

  /// Hands local expert i's block back to the store. On a device the
  /// kernels just launched may still read it: a store that moves blocks gets
  /// an event recorded after them, and waits for it before it moves the
  /// block, while the host thread runs on to the next expert (a store
  /// without that form gets a stream synchronize first).
  void release_block(index_t i) {
    if constexpr (on_device && storage::moves_blocks_v<store_type>) {
      if constexpr (storage::event_released<store_type>) {
        auto done = std::make_shared<typename B::event>();
        ex_->record(*done);
        store_->release(layer_id_, i, [done] { done->synchronize(); });
        return;
      } else {
        ex_->synchronize();
      }
    }
    store_->release(layer_id_, i);
  }

  /// Forward needs an expert's weights only; a store that can tell the two
  /// apart then moves half the bytes.
  storage::block_ref<T> acquire(index_t expert, bool grads) {
    if constexpr (requires { store_->acquire(layer_id_, expert, grads); })
      return store_->acquire(layer_id_, expert, grads);
    else
      return store_->acquire(layer_id_, expert);
  }

  expert::expert_batch<T> batch(std::span<const index_t> offsets, matrix_view<const T> x) {
    const index_t R = offsets.back();
    saved_.resize_discard(R * expert_.saved_cols());
    work_.resize_discard(R * expert_.work_cols());
    return {offsets, std::span<T* const>(params_), std::span<T* const>(grads_), x,
            saved_.matrix(R, expert_.saved_cols()), work_.matrix(R, expert_.work_cols())};
  }

  /// A store that moves blocks (acquire with a gradients flag) gets one
  /// expert at a time: fast memory then needs room for the block in use and
  /// what the prefetcher brings, not for a whole layer. Same arithmetic.
  static constexpr bool streams_experts = requires(store_type& s, index_t i) { s.acquire(i, i, true); };

  /// The sub-batch of local expert e alone (its rows keep their place in x).
  expert::expert_batch<T> one_expert(std::span<const index_t> offsets, index_t e, matrix_view<const T> x) {
    const index_t R = offsets.back();
    return {offsets.subspan(static_cast<std::size_t>(e), 2), std::span<T* const>(params_.data() + e, 1),
            std::span<T* const>(grads_.data() + e, 1), x, saved_.matrix(R, expert_.saved_cols()),
            work_.matrix(R, expert_.work_cols())};
  }

  /// f(e) for each local expert with rows, its block acquired around the call.
  template <class F>
  void stream_blocks(std::span<const index_t> offsets, prefetch::phase ph, F f) {
    const bool done_hook = ph == prefetch::phase::backward && expert_done_;
    const auto counts = local_counts(offsets);
    prefetch_.before(*store_, layer_id_, ph, std::span<const std::int32_t>(counts));
    params_.assign(counts.size(), nullptr);
    grads_.assign(counts.size(), nullptr);
    for (index_t i = 0; i < static_cast<index_t>(counts.size()); ++i) {
      if (counts[i] == 0) continue;
      auto blk = acquire(i, ph == prefetch::phase::backward);
      params_[i] = blk.params.data();
      grads_[i] = blk.grads.data();
      try {
        f(i);
      } catch (...) {
        if constexpr (on_device) ex_->synchronize();  // nothing may still read the block
        store_->release(layer_id_, i);
        throw;
      }
      release_block(i);
      if (done_hook) expert_done_(i);
    }
    if (done_hook)
      for (index_t i = 0; i < local_experts_; ++i)
        if (counts[i] == 0) expert_done_(i);  // no rows, but AdamW still moves it (decay, momentum)
    prefetch_.after(*store_, layer_id_, ph);
  }

  void run_experts_forward(std::span<const index_t> offsets, matrix_view<const T> x, matrix_view<T> y) {
    phase ts("experts_forward", *this);
    if (!training_) {
      forward_only(offsets, x, y);
      return;
    }
    const auto timed = load_.time();
    if constexpr (streams_experts) {
      (void)batch(offsets, x);  // sizes saved_ and work_ for every row
      stream_blocks(offsets, prefetch::phase::forward,
                    [&](index_t e) { expert_.forward(*ex_, one_expert(offsets, e, x), y); });
    } else {
      with_blocks(offsets, prefetch::phase::forward, [&] { expert_.forward(*ex_, batch(offsets, x), y); });
    }
  }

  /// Eval mode: each expert runs alone on its rows, its activations in
  /// scratch sized for the busiest expert and overwritten by the next one.
  /// Each expert's GEMMs are the ones the grouped call would run: same bits.
  void forward_only(std::span<const index_t> offsets, matrix_view<const T> x, matrix_view<T> y) {
    index_t widest = 0;
    const auto slots = static_cast<index_t>(offsets.size()) - 1;
    for (index_t i = 0; i < slots; ++i) widest = std::max(widest, offsets[i + 1] - offsets[i]);
    const index_t sc = expert_.saved_cols(), wc = expert_.work_cols();
    saved_.resize_discard(widest * sc);
    work_.resize_discard(widest * wc);
    auto one = [&](index_t e) {
      const index_t first = offsets[e], n = offsets[e + 1] - first;
      const index_t local[2] = {0, n};
      expert::expert_batch<T> b{std::span<const index_t>(local), std::span<T* const>(params_.data() + e, 1),
                                std::span<T* const>(grads_.data() + e, 1),
                                matrix_view<const T>(x.row(first), {n, x.cols()}, {x.ld(), 1}),
                                saved_.matrix(n, sc), work_.matrix(n, wc), /*backward_follows=*/false};
      expert_.forward(*ex_, b, matrix_view<T>(y.row(first), {n, y.cols()}, {y.ld(), 1}));
    };
    if constexpr (streams_experts) {
      stream_blocks(offsets, prefetch::phase::forward, one);
    } else {
      with_blocks(offsets, prefetch::phase::forward, [&] {
        for (index_t e = 0; e < slots; ++e)
          if (offsets[e + 1] > offsets[e]) one(e);
      });
    }
  }

  /// dx goes into dy's rows; dy moves to a buffer of its own first unless the
  /// expert allows in-place backward (layer/expert_backward.hpp).
  void run_experts_backward(std::span<const index_t> offsets, matrix_view<const T> x, matrix_view<T> dy_dx) {
    phase ts("experts_backward", *this);
    const auto timed = load_.time();
    const matrix_view<const T> dy = layer::expert_dy<Expert>(*ex_, dy_dx, dy_own_);
    if constexpr (streams_experts) {
      stream_blocks(offsets, prefetch::phase::backward,
                    [&](index_t e) { expert_.backward(*ex_, one_expert(offsets, e, x), dy, dy_dx); });
      return;
    }
    with_blocks(offsets, prefetch::phase::backward, [&] {
      // saved_/work_ keep their forward contents: batch() does not resize them.
      const index_t R = offsets.back();
      expert::expert_batch<T> b{offsets, std::span<T* const>(params_), std::span<T* const>(grads_), x,
                                saved_.matrix(R, expert_.saved_cols()), work_.matrix(R, expert_.work_cols())};
      expert_.backward(*ex_, b, dy, dy_dx);
    });
    if (expert_done_)  // once the blocks are released
      for (index_t i = 0; i < local_experts_; ++i) expert_done_(i);
  }

  typename B::executor* ex_;
  Comm* comm_;
  options opt_;
  Gate gate_;
  Expert expert_;
  std::shared_ptr<store_type> store_;
  Prefetch prefetch_{};
  index_t layer_id_ = 0, local_experts_ = 0, first_expert_ = 0, global_tokens_ = 0, token_offset_ = 0;
  bool training_ = true, has_forward_ = false, plan_checked_ = false;
  std::uint64_t step_ = 0;

  template <class U>
  using dbuffer = buffer<U, memory_space>;  // where the executor's kernels read and write
  using hbuffer = buffer<T, typename B::host_memory_space>;  // host staging (pinned on a device)

  dbuffer<T> router_, router_grad_;
  plan_type plan_;
  buffer<index_t> row_;  // dispatch rows of a host-routed plan
  matrix_view<const T> x_;
  dbuffer<T> xj_, logits_, dlogits_, dweight_;
  dbuffer<T> x_disp_, y_disp_, saved_, work_, dy_own_;  // dy_own_: dy apart from dx (expert_dy)
  // Dispatch rows where the kernels read them (routed on the executor, or
  // uploaded); on a device, a host-routed plan's weights and the gate's
  // inputs and outputs on the host.
  dbuffer<index_t> row_dev_;
  dbuffer<T> weight_dev_;
  hbuffer logits_host_, dweight_host_, dlogits_host_;
  // Expert-parallel exchange (ranks > 1 only).
  layer::expert_exchange<T, B, Comm> exchange_;
  dbuffer<T> expert_in_, expert_out_;
  std::vector<T*> params_, grads_;
  std::function<void(index_t)> expert_done_;
  layer::load_monitor load_;
  Placement placement_;
  std::vector<std::int32_t> slots_;  // replicating: rows this rank sends per slot of the group
};

/// The float layer: `semoe::moe_layer<semoe::cpu, semoe::gate::top_k<2>>`.
template <Backend B, class Gate, class Expert = expert::ffn<act::gelu>, class Comm = comm::local,
          class Storage = storage::resident, class Prefetch = prefetch::on_demand,
          class Placement = placement::static_placement>
using moe_layer = basic_moe_layer<float, B, Gate, Expert, Comm, Storage, Prefetch, Placement>;

}  // namespace semoe
