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

// Refuses a list with an undefined tensor before anything in it is changed.
void all_defined(Tensor* const* ts, size_t n) {
  for (size_t i = 0; i < n; i++) {
    if (!ts[i]->defined()) throw std::runtime_error("an undefined tensor in the list");
  }
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

// self[i] += weight · (end[i] − self[i]) with one 0-d weight tensor for all i. Not _foreach_lerp_ with
// a list of n 0-d weights: that overload takes the slow path, one kernel per tensor. Three multi-tensor
// kernels instead (difference, scale by the 0-d tensor, add), over chunks of the lists so that the
// difference's temporary stays below kChunk elements however large the model.
char* ext_foreach_lerp_(Tensor* const* self, Tensor* const* end, size_t n, const Tensor* weight) {
  return guard([&] {
    constexpr int64_t kChunk = int64_t{1} << 26;
    size_t start = 0;
    while (start < n) {
      size_t stop = start;
      int64_t elements = 0;
      while (stop < n && (stop == start || elements + self[stop]->numel() <= kChunk)) {
        elements += self[stop]->numel();
        stop++;
      }
      std::vector<Tensor> s = list(self + start, stop - start);
      std::vector<Tensor> d = at::_foreach_sub(list(end + start, stop - start), s);
      at::_foreach_mul_(d, *weight);
      at::_foreach_add_(s, d);
      start = stop;
    }
  });
}

// The L2 norm of each tensor, written as new handles into out[0..n).
char* ext_foreach_norm(Tensor* const* ts, size_t n, Tensor** out) {
  return guard([&] {
    std::vector<Tensor> norms = at::_foreach_norm(list(ts, n), 2);
    for (size_t i = 0; i < n; i++) out[i] = new Tensor(norms[i]);
  });
}

// Drops the .grad of each tensor (PyTorch's zero_grad(set_to_none=True)): no kernel, and the next
// backward hands its gradient buffer over instead of adding it into zeros.
char* ext_clear_grads(Tensor* const* ts, size_t n) {
  return guard([&] {
    all_defined(ts, n);
    for (size_t i = 0; i < n; i++) ts[i]->mutable_grad() = Tensor();
  });
}

// Gives each tensor without a .grad a zero one (shape, dtype and device of the tensor).
char* ext_zero_missing_grads(Tensor* const* ts, size_t n) {
  return guard([&] {
    all_defined(ts, n);
    for (size_t i = 0; i < n; i++) {
      if (!ts[i]->grad().defined()) ts[i]->mutable_grad() = at::zeros_like(*ts[i]);
    }
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

#include <torch/csrc/distributed/c10d/PrefixStore.hpp>

// `backend` carries the data (gradients: CUDA tensors under NCCL); `control` is a Gloo group over the
// same store that carries only the few host flags ranks agree on each step. Kept apart so a rank that
// failed halfway through the data collectives of a step still meets the others at the next agreement,
// and so agreeing costs no device synchronisation under NCCL.
struct ExtGroup {
  c10::intrusive_ptr<c10d::Store> store;
  c10::intrusive_ptr<c10d::Backend> backend;
  c10::intrusive_ptr<c10d::Backend> control;
};

namespace {

#ifdef USE_C10D_GLOO
c10::intrusive_ptr<c10d::Backend> gloo_group(const c10::intrusive_ptr<c10d::Store>& store,
                                             const std::string& host, int rank, int world,
                                             std::chrono::milliseconds timeout) {
  auto opts = c10d::ProcessGroupGloo::Options::create();
  opts->timeout = timeout;
  const char* ifname = std::getenv("GLOO_SOCKET_IFNAME");
  if (ifname != nullptr && *ifname != '\0') {
    opts->devices.push_back(c10d::ProcessGroupGloo::createDeviceForInterface(ifname));
  } else if (host.rfind("127.", 0) == 0 || host == "localhost") {
    opts->devices.push_back(c10d::ProcessGroupGloo::createDeviceForHostname("127.0.0.1"));
  } else {
    opts->devices.push_back(c10d::ProcessGroupGloo::createDefaultDevice());
  }
  return c10::make_intrusive<c10d::ProcessGroupGloo>(store, rank, world, opts);
}
#endif

}  // namespace

extern "C" {

// Joins the group `rank` of `world` through the TCPStore at host:port, served by rank 0 unless
// `agent_store` (torchrun's agent already serves it there). `backend` is "gloo" or "nccl"; `device` is
// the CUDA device an NCCL communicator is bound to (-1: none). Collectives and the rendezvous give up
// after timeout_ms with an error.
char* ext_group_new(const char* backend, const char* host, int port, int rank, int world,
                    int64_t timeout_ms, int agent_store, int device, ExtGroup** out) {
  return guard([&] {
    auto timeout = std::chrono::milliseconds(timeout_ms);
    c10d::TCPStoreOptions o;
    o.port = static_cast<uint16_t>(port);
    o.isServer = rank == 0 && agent_store == 0;
    o.numWorkers = world;
    o.waitWorkers = agent_store == 0;
    o.timeout = timeout;
    std::string where(host);
    c10::intrusive_ptr<c10d::Store> store = c10::make_intrusive<c10d::TCPStore>(where, o);
    // torchrun's agent store is shared by restarts and other groups: our keys live under a prefix.
    if (agent_store != 0) store = c10::make_intrusive<c10d::PrefixStore>("flowback", store);
    std::string which(backend);
    c10::intrusive_ptr<c10d::Backend> pg;
    if (which == "gloo") {
#ifdef USE_C10D_GLOO
      pg = gloo_group(c10::make_intrusive<c10d::PrefixStore>("data", store), where, rank, world,
                      timeout);
#else
      throw std::runtime_error("this build has no Gloo (libgloo-dev was missing when torch-ext was built)");
#endif
    } else if (which == "nccl") {
#ifdef USE_C10D_NCCL
      // Blocking wait: a collective that times out (a dead or stuck peer) throws from wait(), which
      // comes back to Rust as an error naming the rank, instead of the watchdog aborting the process.
      // A value the user set wins.
      setenv("TORCH_NCCL_BLOCKING_WAIT", "1", 0);
      auto opts = c10d::ProcessGroupNCCL::Options::create();
      opts->timeout = timeout;
      auto nccl = c10::make_intrusive<c10d::ProcessGroupNCCL>(
          c10::make_intrusive<c10d::PrefixStore>("data", store), rank, world, opts);
      if (device >= 0) {
        // Bound to the rank's own GPU: the communicator is made there, never on the current device.
        nccl->setBoundDeviceId(c10::Device(c10::DeviceType::CUDA, static_cast<c10::DeviceIndex>(device)));
      }
      pg = nccl;
#else
      throw std::runtime_error(
          "this build has no NCCL process group: torch-ext was compiled without the CUDA headers "
          "(scripts/requirements-extra.txt); use train.backend = \"gloo\" on CPUs");
#endif
    } else {
      throw std::runtime_error("unknown backend " + which);
    }
    c10::intrusive_ptr<c10d::Backend> control;
#ifdef USE_C10D_GLOO
    control = gloo_group(c10::make_intrusive<c10d::PrefixStore>("control", store), where, rank,
                         world, timeout);
#endif
    *out = new ExtGroup{store, pg, control};
  });
}

void ext_group_free(ExtGroup* g) { delete g; }

namespace {
c10d::Backend& channel(ExtGroup* g, int control) {
  if (control == 0) return *g->backend;
  if (!g->control) {
    throw std::runtime_error(
        "this build has no Gloo control channel (libgloo-dev was missing when torch-ext was built)");
  }
  return *g->control;
}
}  // namespace

// In-place reduction over ranks of one tensor: op 0 = sum, 1 = max; on the data channel, or on the
// control channel (CPU tensors) when control != 0.
char* ext_group_allreduce(ExtGroup* g, Tensor* t, int op, int control) {
  return guard([&] {
    std::vector<Tensor> v{*t};
    c10d::AllreduceOptions o;
    o.reduceOp = op == 1 ? c10d::ReduceOp(c10d::ReduceOp::MAX) : c10d::ReduceOp(c10d::ReduceOp::SUM);
    channel(g, control).allreduce(v, o)->wait();
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

// ---- Activation checkpointing: a custom autograd node whose forward and backward call back into Rust.
// Forward runs the Rust function without recording a graph and keeps only its inputs; backward runs it
// again with grad enabled on detached copies of those inputs and back-propagates the incoming gradients
// through that fresh graph (a reentrant backward, as torch.utils.checkpoint's reentrant variant does),
// which accumulates the parameters' .grad and yields the inputs' gradients.
#include <torch/csrc/autograd/autograd.h>
#include <torch/csrc/autograd/custom_function.h>

#include <stdexcept>
#include <string>

extern "C" {
// The Rust side: computes outputs from `n` input handles (which it takes ownership of) and hands each
// output to ext_ckpt_push; on failure it calls ext_ckpt_fail and returns non-zero.
typedef int (*ext_ckpt_call)(void* ctx, Tensor* const* inputs, size_t n, void* out);
// Frees the Rust closure; called exactly once, when the node (or a failed call) lets go of it.
typedef void (*ext_ckpt_drop)(void* ctx);
}

namespace {

struct CkptOut {
  std::vector<Tensor> tensors;
  std::string error;
};

struct CkptClosure : torch::CustomClassHolder {
  void* ctx;
  ext_ckpt_call call;
  ext_ckpt_drop drop;
  CkptClosure(void* c, ext_ckpt_call f, ext_ckpt_drop d) : ctx(c), call(f), drop(d) {}
  ~CkptClosure() override { drop(ctx); }

  std::vector<Tensor> run(const std::vector<Tensor>& inputs) const {
    std::vector<Tensor*> handles;
    handles.reserve(inputs.size());
    for (const auto& t : inputs) handles.push_back(new Tensor(t));
    CkptOut out;
    if (call(ctx, handles.data(), handles.size(), &out) != 0) {
      throw std::runtime_error("checkpointed function failed: " + out.error);
    }
    return std::move(out.tensors);
  }
};

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

struct CheckpointFn : torch::autograd::Function<CheckpointFn> {
  // The inputs must arrive as a TensorList: autograd counts a std::vector argument as a non-tensor.
  static variable_list forward(AutogradContext* ctx, at::TensorList inputs,
                               c10::intrusive_ptr<CkptClosure> closure) {
    std::vector<Tensor> in(inputs.begin(), inputs.end());
    ctx->save_for_backward(in);
    ctx->saved_data["closure"] = c10::IValue::make_capsule(closure);
    // Outputs nobody differentiates (the log-det of a block whose loss term was not used, say) come
    // back undefined instead of as zeros.
    ctx->set_materialize_grads(false);
    return closure->run(in);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto saved = ctx->get_saved_variables();
    auto closure = c10::static_intrusive_pointer_cast<CkptClosure>(ctx->saved_data["closure"].toCapsule());
    std::vector<Tensor> detached;
    detached.reserve(saved.size());
    for (const auto& s : saved) {
      auto d = s.detach();
      d.requires_grad_(s.requires_grad());
      detached.push_back(d);
    }
    std::vector<Tensor> outs;
    {
      at::AutoGradMode enable(true);
      outs = closure->run(detached);
    }
    if (outs.size() != grads.size()) {
      throw std::runtime_error("checkpointed function gave " + std::to_string(outs.size()) +
                               " outputs on recomputation, " + std::to_string(grads.size()) +
                               " the first time");
    }
    variable_list roots, root_grads;
    for (size_t i = 0; i < outs.size(); i++) {
      if (grads[i].defined() && outs[i].requires_grad()) {
        roots.push_back(outs[i]);
        root_grads.push_back(grads[i]);
      }
    }
    if (!roots.empty()) torch::autograd::backward(roots, root_grads);
    variable_list result;
    result.reserve(detached.size() + 1);
    for (auto& d : detached) result.push_back(d.requires_grad() ? d.grad() : Tensor());
    result.push_back(Tensor());  // the closure argument
    return result;
  }
};

}  // namespace

extern "C" {

// Moves `t` (a handle the caller gives up) into the output list.
void ext_ckpt_push(void* out, Tensor* t) {
  static_cast<CkptOut*>(out)->tensors.push_back(std::move(*t));
  delete t;
}

void ext_ckpt_fail(void* out, const char* msg, size_t len) {
  static_cast<CkptOut*>(out)->error.assign(msg, len);
}

// Applies the checkpointed function to n inputs; its outputs are written as new handles to out[0..),
// their number to *n_out (at most max_out). The closure is owned from here on: freed through `drop` when
// the graph no longer needs it, or at once if this call fails.
char* ext_checkpoint(Tensor* const* inputs, size_t n, void* ctx, ext_ckpt_call call,
                     ext_ckpt_drop drop, Tensor** out, size_t max_out, size_t* n_out) {
  c10::intrusive_ptr<CkptClosure> closure;
  try {
    closure = c10::make_intrusive<CkptClosure>(ctx, call, drop);
  } catch (...) {
    drop(ctx);
    return error_copy("could not allocate the checkpoint closure");
  }
  return guard([&] {
    std::vector<Tensor> in = list(inputs, n);
    auto outs = CheckpointFn::apply(at::TensorList(in), closure);
    if (outs.size() > max_out) {
      throw std::runtime_error("checkpointed function returned " + std::to_string(outs.size()) +
                               " outputs, room for " + std::to_string(max_out));
    }
    for (size_t i = 0; i < outs.size(); i++) out[i] = new Tensor(outs[i]);
    *n_out = outs.size();
  });
}

}  // extern "C"

extern "C" {
// Whether autograd records on this thread (tch binds only the setter).
int ext_grad_enabled() { return at::GradMode::is_enabled() ? 1 : 0; }
}

// ---- The device caching allocator's statistics (torch.cuda.memory_allocated / max_memory_allocated),
// through c10's device-generic allocator interface, so no CUDA header is needed.
#include <c10/core/CachingDeviceAllocator.h>

extern "C" {
// Bytes allocated on CUDA device `device` now and at the peak; with reset != 0 the peak first restarts
// from the current value.
char* ext_cuda_memory(int device, int reset, int64_t* current, int64_t* peak, int64_t* reserved,
                      int64_t* peak_reserved) {
  return guard([&] {
    auto* allocator = c10::getDeviceAllocator(c10::DeviceType::CUDA);
    auto index = static_cast<c10::DeviceIndex>(device);
    if (reset != 0) allocator->resetPeakStats(index);
    auto stats = allocator->getDeviceStats(index);
    const auto all = static_cast<size_t>(c10::CachingAllocator::StatType::AGGREGATE);
    *current = stats.allocated_bytes[all].current;
    *peak = stats.allocated_bytes[all].peak;
    *reserved = stats.reserved_bytes[all].current;
    *peak_reserved = stats.reserved_bytes[all].peak;
  });
}
}

// ---- CUDA events through c10's device-generic Event and guard interface (no CUDA header): record on
// the device's current stream, wait on the host for that point only, so a stage can hand batch k's
// results on while batch k+1 still runs.
#include <c10/core/Event.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>

extern "C" {
// A new event recorded on CUDA device `device`'s current stream, in *out (free with ext_event_free).
char* ext_event_record(int device, void** out) {
  return guard([&] {
    auto index = static_cast<c10::DeviceIndex>(device);
    const auto* impl = c10::impl::getDeviceGuardImpl(c10::DeviceType::CUDA);
    if (device < 0 || device >= impl->deviceCount()) {
      throw std::runtime_error("no CUDA device " + std::to_string(device));
    }
    auto stream = impl->getStream(c10::Device(c10::DeviceType::CUDA, index));
    auto event = std::make_unique<c10::Event>(c10::DeviceType::CUDA);
    event->record(stream);
    *out = event.release();
  });
}

// Blocks the host until the work before the event's record point has finished.
char* ext_event_synchronize(void* event) {
  return guard([&] { static_cast<c10::Event*>(event)->synchronize(); });
}

void ext_event_free(void* event) { delete static_cast<c10::Event*>(event); }

// Makes CUDA device `device` this thread's current one, as torch.cuda.set_device does: kernels,
// events and NCCL then start on the rank's own GPU, and nothing creates a context on GPU 0.
char* ext_cuda_set_device(int device) {
  return guard([&] {
    const auto* impl = c10::impl::getDeviceGuardImpl(c10::DeviceType::CUDA);
    if (device < 0 || device >= impl->deviceCount()) {
      throw std::runtime_error("no CUDA device " + std::to_string(device));
    }
    impl->setDevice(c10::Device(c10::DeviceType::CUDA, static_cast<c10::DeviceIndex>(device)));
  });
}

// cuDNN's algorithm choice made repeatable (torch.backends.cudnn.deterministic = True, benchmark =
// False): the same inputs give the same bytes in every process and every run.
void ext_cudnn_deterministic(int on) {
  at::globalContext().setDeterministicCuDNN(on != 0);
  if (on != 0) at::globalContext().setBenchmarkCuDNN(false);
}
}

// ---- oneDNN linear with a prepacked weight (the ops behind torch.compile's CPU weight freezing),
// reached through the dispatcher's boxed calls since no public header declares them. A decode step
// multiplies a handful of rows by every weight matrix; plain addmm repacks the whole weight on each
// call, which costs as much as the product. Packed once per sampling pass, the weight is reused for
// every token.
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/stack.h>

namespace {

std::optional<c10::OperatorHandle> onednn_op(const char* name) {
  return c10::Dispatcher::singleton().findSchema({name, ""});
}

// act(x·wᵀ + b) through oneDNN, `w` packed or plain (out, in), `b` undefined for none.
Tensor onednn_linear(const Tensor& x, const Tensor& w, const Tensor& b, const char* attr,
                     const char* algorithm) {
  static const std::optional<c10::OperatorHandle> op = onednn_op("mkldnn::_linear_pointwise");
  if (!op) throw std::runtime_error("mkldnn::_linear_pointwise is not registered");
  torch::jit::Stack stack{c10::IValue(x.contiguous()),
                          c10::IValue(w),
                          b.defined() ? c10::IValue(b) : c10::IValue(),
                          c10::IValue(std::string(attr)),
                          c10::IValue(c10::List<std::optional<c10::Scalar>>()),
                          c10::IValue(std::string(algorithm))};
  op->callBoxed(&stack);
  return stack.at(0).toTensor();
}

// The gradients of x·wᵀ (+ b) for a linear layer whose saved variables are (x, w). dx = gy·w is a
// linear layer with weight wᵀ; dw = gyᵀ·x one with input gyᵀ and weight xᵀ.
torch::autograd::variable_list onednn_linear_backward(torch::autograd::AutogradContext* ctx,
                                                      const Tensor& grad, bool bias) {
  auto saved = ctx->get_saved_variables();
  const Tensor& x = saved[0];
  const Tensor& w = saved[1];
  Tensor gy = grad.contiguous();
  Tensor g2 = gy.reshape({-1, gy.size(-1)});
  Tensor none, dx, dw, db;
  if (ctx->needs_input_grad(0)) dx = onednn_linear(gy, w.t().contiguous(), none, "none", "");
  if (ctx->needs_input_grad(1)) {
    Tensor x2 = x.reshape({-1, x.size(-1)});
    dw = onednn_linear(g2.t().contiguous(), x2.t().contiguous(), none, "none", "");
  }
  if (!bias) return {dx, dw};
  if (ctx->needs_input_grad(2)) db = g2.sum(0);
  return {dx, dw, db};
}

// A linear layer whose three products (forward, input and weight gradients) all run in oneDNN. On
// CPUs where MKL's sgemm takes a generic path (AMD's), oneDNN's JIT kernels are 1.5-3× faster at a
// training step's shapes; PyTorch's own fp32 `linear` always goes to MKL (BENCHMARKS.md). Autograd
// takes no undefined input, hence a second function for the layer without a bias.
struct OnednnLinearFn : torch::autograd::Function<OnednnLinearFn> {
  static Tensor forward(torch::autograd::AutogradContext* ctx, const Tensor& x, const Tensor& w,
                        const Tensor& b) {
    ctx->save_for_backward({x, w});
    return onednn_linear(x, w, b, "none", "");
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    return onednn_linear_backward(ctx, grads[0], true);
  }
};

struct OnednnLinearNoBiasFn : torch::autograd::Function<OnednnLinearNoBiasFn> {
  static Tensor forward(torch::autograd::AutogradContext* ctx, const Tensor& x, const Tensor& w) {
    ctx->save_for_backward({x, w});
    return onednn_linear(x, w, Tensor(), "none", "");
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    return onednn_linear_backward(ctx, grads[0], false);
  }
};

}  // namespace

extern "C" {
// 1 when this libtorch has oneDNN and registers both packed-linear ops.
int ext_packed_linear_available() {
  return at::hasMKLDNN() && onednn_op("mkldnn::_reorder_linear_weight").has_value() &&
                 onednn_op("mkldnn::_linear_pointwise").has_value()
             ? 1
             : 0;
}

// The (out, in) float weight `w` in oneDNN's blocked layout. Left to oneDNN, the layout is as fast
// for a few rows as one tuned for their number, and faster at width 1024 (BENCHMARKS.md).
char* ext_pack_linear_weight(const Tensor* w, Tensor** out) {
  return guard([&] {
    auto op = onednn_op("mkldnn::_reorder_linear_weight");
    if (!op) throw std::runtime_error("mkldnn::_reorder_linear_weight is not registered");
    torch::jit::Stack stack{c10::IValue(*w), c10::IValue()};
    op->callBoxed(&stack);
    *out = new Tensor(stack.at(0).toTensor());
  });
}

// x·wᵀ + bias with a packed weight, followed by the activation `attr` ("none" or "gelu"; `algorithm`
// "none" for the erf GELU, "tanh" for its approximation).
char* ext_packed_linear(const Tensor* x, const Tensor* packed, const Tensor* bias, const char* attr,
                        const char* algorithm, Tensor** out) {
  return guard([&] {
    *out = new Tensor(onednn_linear(*x, *packed, bias != nullptr ? *bias : Tensor(), attr, algorithm));
  });
}

// x·wᵀ + b (b may be NULL) in oneDNN with autograd: the backward's products run there too.
char* ext_onednn_linear(const Tensor* x, const Tensor* w, const Tensor* bias, Tensor** out) {
  return guard([&] {
    *out = new Tensor(bias != nullptr ? OnednnLinearFn::apply(*x, *w, *bias)
                                      : OnednnLinearNoBiasFn::apply(*x, *w));
  });
}
}

// ---- CUDA graphs (at::cuda::CUDAGraph): a fixed-shape piece of work captured once on a side stream and
// replayed on the current stream, so a launch-bound loop (one decode step: ~100 small kernels) costs
// one graph launch per iteration instead of one launch per kernel.
// Streams, events and the device guard go through c10's device-generic interfaces (as the events above
// do): CUDA's own inline wrappers would call the CUDA runtime from this object, which would then need
// libcudart on its link line and the runtime's library path. CUDAGraph itself lives in libtorch_cuda.
#ifdef EXT_CUDA
#include <ATen/cuda/CUDAGraph.h>
#include <c10/core/DeviceGuard.h>
#include <c10/core/StreamGuard.h>

namespace {
struct ExtGraph {
  at::cuda::CUDAGraph graph;
  c10::DeviceIndex device;
};
}  // namespace
#endif

extern "C" {
// The Rust side: enqueues the work on the current stream; non-zero when it failed (its message stays on
// the Rust side).
typedef int (*ext_graph_body)(void* ctx);

int ext_graph_available() {
#ifdef EXT_CUDA
  return 1;
#else
  return 0;
#endif
}

// Runs `body` `warmups` times eagerly and then once under capture, both on a side stream of CUDA device
// `device` (capture cannot use the legacy default stream, and the warm-up lets cuBLAS and the allocator
// set up outside the graph). The side stream first waits for the current stream's work, and the current
// stream for the side stream's. The graph is returned in *out (free with ext_graph_free).
char* ext_graph_capture(int device, int warmups, void* ctx, ext_graph_body body, void** out) {
#ifdef EXT_CUDA
  return guard([&] {
    const auto* impl = c10::impl::getDeviceGuardImpl(c10::DeviceType::CUDA);
    if (device < 0 || device >= impl->deviceCount()) {
      throw std::runtime_error("no CUDA device " + std::to_string(device));
    }
    auto index = static_cast<c10::DeviceIndex>(device);
    const c10::Device dev(c10::DeviceType::CUDA, index);
    c10::DeviceGuard device_guard(dev);
    auto current = impl->getStream(dev);
    auto side = impl->getStreamFromGlobalPool(dev, false);
    c10::Event ready(c10::DeviceType::CUDA);
    ready.record(current);
    ready.block(side);
    auto graph = std::make_unique<ExtGraph>();
    graph->device = index;
    {
      c10::StreamGuard stream_guard(side);
      for (int i = 0; i < warmups; i++) {
        if (body(ctx) != 0) throw std::runtime_error("the step failed before capture");
      }
      side.synchronize();
      // Thread-local mode: a loader thread's allocations elsewhere do not invalidate the capture.
      graph->graph.capture_begin({0, 0}, cudaStreamCaptureModeThreadLocal);
      int failed = body(ctx);
      // A capture that was begun is always ended, so the stream leaves capture mode.
      graph->graph.capture_end();
      if (failed != 0) throw std::runtime_error("the step failed under capture");
    }
    c10::Event done(c10::DeviceType::CUDA);
    done.record(side);
    done.block(current);
    *out = graph.release();
  });
#else
  (void)device;
  (void)warmups;
  (void)ctx;
  (void)body;
  (void)out;
  return error_copy("this build has no CUDA headers (torch-ext was compiled without EXT_CUDA)");
#endif
}

// Launches the captured work on its device's current stream.
char* ext_graph_replay(void* graph) {
#ifdef EXT_CUDA
  return guard([&] {
    auto* g = static_cast<ExtGraph*>(graph);
    c10::DeviceGuard device_guard(c10::Device(c10::DeviceType::CUDA, g->device));
    g->graph.replay();
  });
#else
  (void)graph;
  return error_copy("this build has no CUDA headers");
#endif
}

void ext_graph_free(void* graph) {
#ifdef EXT_CUDA
  delete static_cast<ExtGraph*>(graph);
#else
  (void)graph;
#endif
}
}  // extern "C"
