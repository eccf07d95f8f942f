// The narrow C surface over libtorch operations tch does not bind. Tensors cross as tch's handles
// (`torch::Tensor*`, which is `at::Tensor*`); every entry point catches C++ exceptions and returns the
// message (malloc'd, freed by ext_free_error) or NULL on success, so no exception crosses into Rust.
#include <ATen/ATen.h>

#include <cstdlib>
#include <cstring>
#include <optional>
#include <vector>

using at::Tensor;

namespace {

char* error_copy(const char* what) {
  size_t n = std::strlen(what) + 1;
  char* s = static_cast<char*>(std::malloc(n));
  if (s != nullptr) std::memcpy(s, what, n);
  return s;
}

std::vector<Tensor> list(Tensor* const* ts, size_t n) {
  std::vector<Tensor> v;
  v.reserve(n);
  for (size_t i = 0; i < n; i++) v.push_back(*ts[i]);
  return v;
}

template <typename F>
char* guard(F&& f) {
  try {
    f();
    return nullptr;
  } catch (const std::exception& e) {
    return error_copy(e.what());
  } catch (...) {
    return error_copy("unknown C++ exception");
  }
}

}  // namespace

extern "C" {

void ext_free_error(char* e) { std::free(e); }

// AdamW over n parameters in one fused kernel (PyTorch's fused=True path). `steps` are float32 step
// counts already incremented for this update; with found_inf = 1 nothing is changed.
char* ext_fused_adamw(Tensor* const* params, Tensor* const* grads, Tensor* const* exp_avgs,
                      Tensor* const* exp_avg_sqs, Tensor* const* steps, size_t n, double lr,
                      double beta1, double beta2, double weight_decay, double eps,
                      const Tensor* found_inf) {
  return guard([&] {
    std::vector<Tensor> none;
    std::optional<Tensor> inf;
    if (found_inf != nullptr) inf = *found_inf;
    at::_fused_adamw_(list(params, n), list(grads, n), list(exp_avgs, n), list(exp_avg_sqs, n), none,
                      list(steps, n), lr, beta1, beta2, weight_decay, eps, /*amsgrad=*/false,
                      /*maximize=*/false, std::nullopt, inf);
  });
}

// self[i] += weight · (end[i] − self[i]) with one 0-d weight tensor for all i.
char* ext_foreach_lerp_(Tensor* const* self, Tensor* const* end, size_t n, const Tensor* weight) {
  return guard([&] {
    std::vector<Tensor> w(n, *weight);
    at::_foreach_lerp_(list(self, n), list(end, n), w);
  });
}

// The L2 norm of each tensor, written as new handles into out[0..n).
char* ext_foreach_norm(Tensor* const* ts, size_t n, Tensor** out) {
  return guard([&] {
    std::vector<Tensor> norms = at::_foreach_norm(list(ts, n), 2);
    for (size_t i = 0; i < n; i++) out[i] = new Tensor(norms[i]);
  });
}

// ts[i] *= factor, a 0-d tensor (no host read).
char* ext_foreach_mul_(Tensor* const* ts, size_t n, const Tensor* factor) {
  return guard([&] { at::_foreach_mul_(list(ts, n), *factor); });
}

}  // extern "C"

// ---- Process groups (c10d): a TCPStore rendezvous and a Gloo (CPU) or NCCL (CUDA) backend. ----
#include <torch/csrc/distributed/c10d/TCPStore.hpp>
#ifdef USE_C10D_GLOO
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#endif
#ifdef USE_C10D_NCCL
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>
#endif

struct ExtGroup {
  c10::intrusive_ptr<c10d::Store> store;
  c10::intrusive_ptr<c10d::Backend> backend;
};

extern "C" {

// Joins the group `rank` of `world` through a TCPStore served by rank 0 at host:port. `backend` is
// "gloo" or "nccl"; collectives and the rendezvous give up after timeout_ms.
char* ext_group_new(const char* backend, const char* host, int port, int rank, int world,
                    int64_t timeout_ms, ExtGroup** out) {
  return guard([&] {
    auto timeout = std::chrono::milliseconds(timeout_ms);
    c10d::TCPStoreOptions o;
    o.port = static_cast<uint16_t>(port);
    o.isServer = rank == 0;
    o.numWorkers = world;
    o.waitWorkers = true;
    o.timeout = timeout;
    auto store = c10::make_intrusive<c10d::TCPStore>(std::string(host), o);
    std::string which(backend);
    c10::intrusive_ptr<c10d::Backend> pg;
    if (which == "gloo") {
#ifdef USE_C10D_GLOO
      auto opts = c10d::ProcessGroupGloo::Options::create();
      opts->timeout = timeout;
      const char* ifname = std::getenv("GLOO_SOCKET_IFNAME");
      if (ifname != nullptr && *ifname != '\0') {
        opts->devices.push_back(c10d::ProcessGroupGloo::createDeviceForInterface(ifname));
      } else if (std::string(host).rfind("127.", 0) == 0 || std::string(host) == "localhost") {
        opts->devices.push_back(c10d::ProcessGroupGloo::createDeviceForHostname("127.0.0.1"));
      } else {
        opts->devices.push_back(c10d::ProcessGroupGloo::createDefaultDevice());
      }
      pg = c10::make_intrusive<c10d::ProcessGroupGloo>(store, rank, world, opts);
#else
      throw std::runtime_error("this build has no Gloo (libgloo-dev was missing when torch-ext was built)");
#endif
    } else if (which == "nccl") {
#ifdef USE_C10D_NCCL
      auto opts = c10d::ProcessGroupNCCL::Options::create();
      opts->timeout = timeout;
      pg = c10::make_intrusive<c10d::ProcessGroupNCCL>(store, rank, world, opts);
#else
      throw std::runtime_error(
          "this build has no NCCL process group: torch-ext was compiled without the CUDA headers "
          "(scripts/requirements-extra.txt); use train.backend = \"gloo\" on CPUs");
#endif
    } else {
      throw std::runtime_error("unknown backend " + which);
    }
    *out = new ExtGroup{store, pg};
  });
}

void ext_group_free(ExtGroup* g) { delete g; }

// In-place reduction over ranks of one tensor: op 0 = sum, 1 = max.
char* ext_group_allreduce(ExtGroup* g, Tensor* t, int op) {
  return guard([&] {
    std::vector<Tensor> v{*t};
    c10d::AllreduceOptions o;
    o.reduceOp = op == 1 ? c10d::ReduceOp(c10d::ReduceOp::MAX) : c10d::ReduceOp(c10d::ReduceOp::SUM);
    g->backend->allreduce(v, o)->wait();
  });
}

// In-place: every rank gets root's tensor.
char* ext_group_broadcast(ExtGroup* g, Tensor* t, int root) {
  return guard([&] {
    std::vector<Tensor> v{*t};
    c10d::BroadcastOptions o;
    o.rootRank = root;
    g->backend->broadcast(v, o)->wait();
  });
}

char* ext_group_barrier(ExtGroup* g) {
  return guard([&] { g->backend->barrier()->wait(); });
}

}  // extern "C"
