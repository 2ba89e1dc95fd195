// expect: a Communicator must provide split\(color, key\) returning a communicator of its own type
// A communicator without split() is rejected with one sentence naming it.
#include <span>

#include "semoe/comm/concepts.hpp"

struct no_split {
  using policy_kind = semoe::comm::comm_tag;
  int rank() const;
  int size() const;
  int local_rank() const;
  int local_size() const;
  template <class T>
  semoe::comm::request all_to_all_v_async(std::span<const T>, std::span<const semoe::index_t>, std::span<T>,
                                          std::span<const semoe::index_t>);
  template <class T>
  semoe::comm::request all_reduce_async(std::span<T>, semoe::comm::reduce_op);
  template <class T>
  semoe::comm::request all_gather_async(std::span<const T>, std::span<T>);
  template <class T>
  semoe::comm::request reduce_scatter_async(std::span<const T>, std::span<T>, semoe::comm::reduce_op);
  template <class T>
  semoe::comm::request broadcast_async(std::span<T>, int);
  void barrier();
};

static_assert(semoe::comm::check_communicator<no_split>());

int main() {}
