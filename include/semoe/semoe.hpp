// semoe/semoe.hpp: the layer and everything it is composed of, for programs
// that link semoe::semoe alone (threads and a CBLAS; nlohmann_json's headers,
// because core/trace.hpp writes its events with them). The library itself never
// includes this header; it is a convenience for users.
//
// Not here, because each needs a component's third-party libraries:
//  * semoe::tcp (Boost.Asio, OpenSSL, zlib): comm/tcp.hpp, comm/rendezvous.hpp,
//    comm/wire.hpp (zlib's CRC-32), launch/launcher.hpp.
//  * semoe::ssd (liburing, xxHash): storage/ssd_tier.hpp,
//    storage/tiered_store.hpp (it includes the SSD tier even when a program
//    uses only the device and host tiers), infer/ring_engine.hpp,
//    train/checkpoint.hpp.
//  * semoe::io (nlohmann_json, zlib, xxHash): io/*.hpp,
//    train/portable_checkpoint.hpp.
//  * semoe::mpi (an MPI library): comm/mpi.hpp.
//  * semoe::cuda, semoe::nccl (the CUDA toolkit, NCCL): cuda/*.cuh,
//    comm/nccl.hpp.
#pragma once

#include "semoe/core/algorithm.hpp"
#include "semoe/core/backend.hpp"
#include "semoe/core/blas.hpp"
#include "semoe/core/buffer.hpp"
#include "semoe/core/config.hpp"
#include "semoe/core/error.hpp"
#include "semoe/core/executor.hpp"
#include "semoe/core/memory_space.hpp"
#include "semoe/core/parameter.hpp"
#include "semoe/core/progress.hpp"
#include "semoe/core/random.hpp"
#include "semoe/core/tensor.hpp"
#include "semoe/core/trace.hpp"
#include "semoe/core/units.hpp"

#include "semoe/gate/balance.hpp"
#include "semoe/gate/concepts.hpp"
#include "semoe/gate/expert_choice.hpp"
#include "semoe/gate/gshard.hpp"
#include "semoe/gate/hash.hpp"
#include "semoe/gate/noisy_top_k.hpp"
#include "semoe/gate/routing.hpp"
#include "semoe/gate/sigmoid_top_k.hpp"
#include "semoe/gate/switch.hpp"
#include "semoe/gate/top_k.hpp"
#include "semoe/gate/with_prior.hpp"

#include "semoe/expert/activation.hpp"
#include "semoe/expert/concepts.hpp"
#include "semoe/expert/ffn.hpp"
#include "semoe/expert/grouped_gemm.hpp"

#include "semoe/comm/bucket.hpp"
#include "semoe/comm/concepts.hpp"
#include "semoe/comm/hierarchical.hpp"
#include "semoe/comm/local.hpp"

#include "semoe/storage/cache.hpp"
#include "semoe/storage/concepts.hpp"
#include "semoe/storage/device_tier.hpp"
#include "semoe/storage/host_tier.hpp"
#include "semoe/storage/resident.hpp"
#include "semoe/storage/ssd_options.hpp"

#include "semoe/prefetch/concepts.hpp"
#include "semoe/prefetch/dense_shards.hpp"
#include "semoe/prefetch/expert_prediction.hpp"
#include "semoe/prefetch/on_demand.hpp"
#include "semoe/prefetch/two_d.hpp"
#include "semoe/prefetch/vertical.hpp"

#include "semoe/placement/replicate_hot.hpp"
#include "semoe/placement/static_placement.hpp"
#include "semoe/placement/task_proportional.hpp"

#include "semoe/layer/activation.hpp"
#include "semoe/layer/concepts.hpp"
#include "semoe/layer/dispatch.hpp"
#include "semoe/layer/embedding.hpp"
#include "semoe/layer/expert_exchange.hpp"
#include "semoe/layer/linear.hpp"
#include "semoe/layer/load_monitor.hpp"
#include "semoe/layer/loss.hpp"
#include "semoe/layer/moe_layer.hpp"
#include "semoe/layer/norm.hpp"
#include "semoe/layer/repeated.hpp"
#include "semoe/layer/sequential.hpp"
#include "semoe/layer/shared_experts.hpp"

#include "semoe/train/optimizer.hpp"
#include "semoe/train/trainer.hpp"
