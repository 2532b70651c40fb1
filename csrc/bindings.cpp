// The Python binding of the CUDA backend: a thin, defensive layer (in the style of
// flash-attention's flash_api.cpp). Every entry point first checks device, dtype, shape and
// contiguity of its tensors, then allocates its outputs and chains the launchers of bnkernels.h
// on the current stream: at most two kernels per call (three for centered l_p's training
// forward). The workspace (coefficients, partials, tickets) is the caller's, cached per plan
// and stream (see workspace_size). Nothing here synchronizes with the host: no .item(), no
// copies to the CPU; the step of noisy BatchNorm may be a device tensor read by the kernels.
//
// Layout contract (the plans in bnkernels/backends/cuda/launch.py view inputs this way):
//   x (and dy) is either 3-D (N, C, S) contiguous -- layout "ncs" -- or 2-D (N * S, C)
//   contiguous -- layout "mc" (channels last, or (N, C)) -- with `spatial` = S given.
// Per-channel tensors are [C] of any floating dtype; statistics and sums are returned in the
// accumulation type (float32, or float64 for float64 input), gradients of weight and bias in
// their own dtype, outputs and dx in x's dtype and layout.
#include <torch/extension.h>
#ifndef BNK_CPU_EMULATION
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

#include <atomic>
#include <cmath>
#include <string>
#include <initializer_list>
#include <mutex>
#include <optional>
#include <tuple>
#include <vector>

#include "bnkernels.h"

// A hash of the sources this was built from (set by the build; the loader compares it).
#define BNK_STR2(x) #x
#define BNK_STR(x) BNK_STR2(x)
#ifdef BNK_SOURCE_HASH_ID
#define BNK_SOURCE_HASH BNK_STR(BNK_SOURCE_HASH_ID)
#else
#define BNK_SOURCE_HASH "unknown"
#endif

namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

// ------------------------------------------------------------------------------ the device
// CUDA; or, with BNK_CPU_EMULATION, the CPU emulation of the kernels that the tests build on
// machines without a GPU (tests/cuda_emulator): there the "device" tensors are CPU tensors.
#ifndef BNK_CPU_EMULATION
#define BNK_DEVICE_KIND "CUDA"
bool on_device(const Tensor& t) { return t.is_cuda(); }
#else
#define BNK_DEVICE_KIND "CPU (emulation)"
bool on_device(const Tensor& t) { return t.is_cpu(); }
#endif

#define CHECK_CUDA(t)                                                                       \
  TORCH_CHECK(on_device(t), "bnkernels cuda: ", #t, " must be a " BNK_DEVICE_KIND " tensor, " \
              "got one on ", (t).device())
#define CHECK_CONTIGUOUS(t)                                                                  \
  TORCH_CHECK((t).is_contiguous(), "bnkernels cuda: ", #t,                                 \
              " must be contiguous (the launcher views inputs as (N, C, S) or (N*S, C))")
#define CHECK_SAME_DEVICE(t, ref)                                                        \
  TORCH_CHECK((t).device() == (ref).device(), "bnkernels cuda: ", #t, " is on ", (t).device(), \
              " but x is on ", (ref).device())
#define CHECK_SHAPE(t, ...)                                                                 \
  TORCH_CHECK((t).sizes() == at::IntArrayRef({__VA_ARGS__}), "bnkernels cuda: ", #t,       \
              " must have shape ", at::IntArrayRef({__VA_ARGS__}), ", got ", (t).sizes())
#define CHECK_DTYPE(t, dtype)                                                             \
  TORCH_CHECK((t).scalar_type() == (dtype), "bnkernels cuda: ", #t, " must be ", (dtype), \
              ", got ", (t).scalar_type())

#ifndef BNK_CPU_EMULATION
// Makes x's device current (after checking that x is a CUDA tensor).
struct DeviceGuard {
  c10::cuda::CUDAGuard guard;
  explicit DeviceGuard(const Tensor& x) : guard((check_device(x), x.device())) {}
  static int check_device(const Tensor& x) {
    CHECK_CUDA(x);
    return 0;
  }
};

cudaStream_t current_stream(const Tensor& x) {
  return c10::cuda::getCurrentCUDAStream(x.device().index()).stream();
}

// Streaming multiprocessors of a device (a host query, cached per device).
int num_sms(int device) {
  static std::mutex mutex;
  static std::vector<int> cache;
  const std::lock_guard<std::mutex> lock(mutex);
  if (device >= static_cast<int>(cache.size())) cache.resize(device + 1, 0);
  if (cache[device] == 0) {
    int n = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device));
    cache[device] = n;
  }
  return cache[device];
}
#else
struct DeviceGuard {
  explicit DeviceGuard(const Tensor& x) { CHECK_CUDA(x); }
};
cudaStream_t current_stream(const Tensor&) { return nullptr; }
int num_sms(int) {  // the emulator's
  int n = 0;
  cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, 0);
  return n;
}
#endif

// A test hook: 64-bit index arithmetic on every size (force_index64).
std::atomic<bool> g_force_index64{false};

bnk::DType to_dtype(at::ScalarType s) {
  switch (s) {
    case at::kFloat: return bnk::DType::kFloat;
    case at::kHalf: return bnk::DType::kHalf;
    case at::kBFloat16: return bnk::DType::kBFloat16;
    case at::kDouble: return bnk::DType::kDouble;
    default:
      TORCH_CHECK(false, "bnkernels cuda: dtype ", s,
                  " is not supported (float32, float16, bfloat16, float64)");
  }
}

at::ScalarType acc_type(const Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

bool aligned16(const Tensor& t) {
  return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
}

// Check a tensor that shares x's layout (dy, or an output y / dx).
void check_like_x(const Tensor& t, const Tensor& x, const char* name) {
  TORCH_CHECK(on_device(t) && t.device() == x.device(), "bnkernels cuda: ", name,
              " must be on ", x.device(), ", got ", t.device());
  TORCH_CHECK(t.is_contiguous(), "bnkernels cuda: ", name, " must be contiguous");
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), "bnkernels cuda: ", name, " must be ",
              x.scalar_type(), ", got ", t.scalar_type());
  TORCH_CHECK(t.sizes() == x.sizes(), "bnkernels cuda: ", name, " must have x's shape ",
              x.sizes(), ", got ", t.sizes());
}

// The checked geometry and launch parameters of x; `others` (dy, outputs) share its layout.
bnk::Launch launch_for(const Tensor& x, int64_t spatial,
                       std::initializer_list<std::pair<const OptTensor*, const char*>> others,
                       int64_t split = 0) {
  CHECK_CUDA(x);
  CHECK_CONTIGUOUS(x);
  TORCH_CHECK(x.dim() == 3 || x.dim() == 2, "bnkernels cuda: x must be 3-D (N, C, S) or 2-D ",
              "(N*S, C), got shape ", x.sizes());
  bnk::Launch l;
  l.dtype = to_dtype(x.scalar_type());
  if (x.dim() == 3) {
    l.g.ncs = true;
    l.g.N = x.size(0);
    l.g.C = x.size(1);
    l.g.S = x.size(2);
    TORCH_CHECK(spatial == l.g.S, "bnkernels cuda: spatial ", spatial, " != x.size(2) ",
                l.g.S);
  } else {
    l.g.ncs = false;
    TORCH_CHECK(spatial >= 1 && x.size(0) % spatial == 0, "bnkernels cuda: spatial ", spatial,
                " does not divide the ", x.size(0), " rows of x");
    l.g.S = spatial;
    l.g.N = x.size(0) / spatial;
    l.g.C = x.size(1);
  }
  TORCH_CHECK(l.g.C >= 1 && l.g.M() >= 1, "bnkernels cuda: empty input of shape ", x.sizes());
  // 64-bit index arithmetic where 32 bits could overflow, or where a test forces it (see
  // force_index64: the wide path then runs on small tensors too).
  l.g.wide = g_force_index64.load(std::memory_order_relaxed) ||
             l.g.numel() > static_cast<int64_t>(0xffffffffLL);
  // 128-bit accesses when every tensor is 16-byte aligned and rows are whole vectors.
  const int vec = static_cast<int>(16 / x.element_size());
  const int64_t row = l.g.ncs ? l.g.S : l.g.C;
  bool ok = aligned16(x) && row % vec == 0;
  for (const auto& [t, name] : others) {
    if (!t->has_value()) continue;
    check_like_x(**t, x, name);
    ok = ok && aligned16(**t);
  }
  l.vec = ok ? vec : 1;
  l.num_sms = num_sms(x.device().index());
  l.split = static_cast<int>(split);
  l.stream = current_stream(x);
  return l;
}

// A per-channel tensor as a contiguous [C] array in the accumulation type (a copy only if it
// is not one already); undefined stays undefined.
OptTensor per_channel(const OptTensor& t, const Tensor& x, int64_t C, const char* name) {
  if (!t.has_value() || !t->defined()) return std::nullopt;
  TORCH_CHECK(on_device(*t) && t->device() == x.device(), "bnkernels cuda: ", name,
              " must be on ", x.device(), ", got ", t->device());
  TORCH_CHECK(at::isFloatingType(t->scalar_type()), "bnkernels cuda: ", name,
              " must be floating point, got ", t->scalar_type());
  TORCH_CHECK(t->numel() == C, "bnkernels cuda: ", name, " must have ", C, " elements, got ",
              t->numel());
  return t->to(acc_type(x)).contiguous().view({C});
}

const void* ptr(const OptTensor& t) { return t.has_value() ? t->data_ptr() : nullptr; }

// A buffer updated in place (running statistics): the kernels update `work` (the buffer itself
// when it is a contiguous array of the accumulation type, else a converted copy that is copied
// back by finish()).
struct InPlace {
  OptTensor target, work;
  InPlace(const OptTensor& t, const Tensor& x, int64_t C, const char* name) {
    if (!t.has_value() || !t->defined()) return;
    target = t;
    work = per_channel(t, x, C, name);
  }
  void* data() const { return work.has_value() ? work->data_ptr() : nullptr; }
  void finish() {
    if (target.has_value() && work->data_ptr() != target->data_ptr()) {
      target->copy_(work->view(target->sizes()));
    }
  }
};

bnk::Noise make_noise(const std::optional<std::vector<double>>& cfg, int64_t seed, int64_t step,
                      const OptTensor& step_tensor, const Tensor& x) {
  bnk::Noise n;
  if (!cfg.has_value()) return n;
  TORCH_CHECK(cfg->size() == 4, "bnkernels cuda: noise must be [n_mu, n_sigma, r_mu, r_sigma]");
  n.on = true;
  n.seed = static_cast<uint64_t>(seed);
  n.step = static_cast<uint32_t>(static_cast<uint64_t>(step) & 0xffffffffu);
  n.n_mu = static_cast<float>((*cfg)[0]);
  n.n_sigma_m1 = static_cast<float>((*cfg)[1] - 1.0);  // as the reference: in double, then fp32
  n.r_mu = static_cast<float>((*cfg)[2]);
  n.r_sigma = static_cast<float>((*cfg)[3]);
  if (step_tensor.has_value() && step_tensor->defined()) {
    const Tensor& s = *step_tensor;
    CHECK_CUDA(s);
    CHECK_SAME_DEVICE(s, x);
    CHECK_DTYPE(s, at::kLong);
    TORCH_CHECK(s.numel() == 1, "bnkernels cuda: step_tensor must hold one value, got ",
                s.numel());
    n.step_ptr = s.data_ptr<int64_t>();
  }
  return n;
}

bool capturing(cudaStream_t stream) {
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  return cudaStreamIsCapturing(stream, &status) == cudaSuccess &&
         status != cudaStreamCaptureStatusNone;
}

// path: 0 = automatic, 1 = multi-pass, 2 = persistent (an error if it cannot run).
bnk::PersistentPlan choose_persistent(const bnk::Launch& l, const Tensor& x, bool backward,
                                      bool noisy, int64_t path) {
  TORCH_CHECK(path >= 0 && path <= 2, "bnkernels cuda: path must be 0, 1 or 2, got ", path);
  bnk::PersistentPlan plan;
  if (path == 1) return plan;
  if (noisy) {
    TORCH_CHECK(path != 2, "bnkernels cuda: the persistent path has no noisy variant");
    return plan;
  }
  // Automatic choice: not while a CUDA graph is being captured (the multi-pass kernels are
  // plain launches, which every capture supports).
  if (path == 0 && capturing(l.stream)) return plan;
  plan = bnk::bn_persistent_plan(l, backward, x.device().index());
  TORCH_CHECK(plan.fits || path != 2, "bnkernels cuda: the persistent path was forced but ",
              plan.why);
  return plan;
}

Tensor empty_acc(const Tensor& x, at::IntArrayRef shape) {
  return at::empty(shape, x.options().dtype(acc_type(x)));
}

// ------------------------------------------------------------------------------ workspace
// A call's workspace (see bnk::WorkspaceSize): the caller's cached pair -- `ws` in the
// accumulation type, `tickets` int32 zeros that the kernels leave at zero -- checked against
// what this launch needs; without one, a fresh pair (an allocation and a zero fill per call:
// for direct calls, not the hot path).
struct Work {
  Tensor acc, tickets;
  void* coef() const { return acc.data_ptr(); }
  void* part(int64_t C) const {
    return static_cast<char*>(acc.data_ptr()) + bnk::kBnCoefs * C * acc.element_size();
  }
  unsigned* ticket_ptr() const { return reinterpret_cast<unsigned*>(tickets.data_ptr()); }
};

Work workspace_for(const bnk::Launch& l, const Tensor& x, const OptTensor& ws,
                   const OptTensor& tickets, int64_t need_acc) {
  const bnk::WorkspaceSize need = bnk::workspace_needed(l);
  need_acc = std::max(need_acc, need.acc);
  if (!ws.has_value() || !ws->defined()) {
    return {empty_acc(x, {need_acc}), at::zeros({need.tickets}, x.options().dtype(at::kInt))};
  }
  TORCH_CHECK(tickets.has_value() && tickets->defined(),
              "bnkernels cuda: pass both ws and tickets, or neither");
  CHECK_CUDA(*ws);
  CHECK_SAME_DEVICE(*ws, x);
  CHECK_CONTIGUOUS(*ws);
  CHECK_DTYPE(*ws, acc_type(x));
  CHECK_CUDA(*tickets);
  CHECK_SAME_DEVICE(*tickets, x);
  CHECK_CONTIGUOUS(*tickets);
  CHECK_DTYPE(*tickets, at::kInt);
  TORCH_CHECK(ws->numel() >= need_acc, "bnkernels cuda: workspace ws has ", ws->numel(),
              " elements, this launch needs ", need_acc, " (see workspace_size)");
  TORCH_CHECK(tickets->numel() >= need.tickets, "bnkernels cuda: workspace tickets has ",
              tickets->numel(), " counters, this launch needs ", need.tickets);
  return {*ws, *tickets};
}

// ------------------------------------------------------------------------------ BatchNorm
// Outputs shaped like x (y, dx) are allocated by the caller in x's layout and passed in: the
// caller gives them x's exact strides, so nothing returned is a view of a temporary.

using Noise = std::optional<std::vector<double>>;

// Per-channel statistics given as tensors (converted to contiguous A arrays by the caller).
bnk::BnGiven given(const OptTensor& mean, const OptTensor& second, int64_t scale_from,
                   double eps, const OptTensor& w, const OptTensor& b) {
  TORCH_CHECK(scale_from >= bnk::kFromInvstd && scale_from <= bnk::kFromLpScale,
              "bnkernels cuda: scale_from must be 0 (invstd), 1 (var) or 2 (l_p scale), got ",
              scale_from);
  bnk::BnGiven g;
  g.mean = ptr(mean);
  g.second = ptr(second);
  g.scale_from = static_cast<int>(scale_from);
  g.eps = eps;
  g.weight = ptr(w);
  g.bias = ptr(b);
  return g;
}

// An optional [C] output in the accumulation type.
void* acc_out(const OptTensor& t, const Tensor& x, int64_t C, const char* name) {
  if (!t.has_value() || !t->defined()) return nullptr;
  TORCH_CHECK(on_device(*t) && t->device() == x.device(), "bnkernels cuda: ", name,
              " must be on ", x.device());
  TORCH_CHECK(t->is_contiguous() && t->numel() == C && t->scalar_type() == acc_type(x),
              "bnkernels cuda: ", name, " must be a contiguous ", acc_type(x), " tensor of ", C,
              " elements");
  return t->data_ptr();
}

// Training forward: y (written), (mean, invstd) of the batch; running buffers updated. One
// persistent launch, or bn_stats + bn_apply. step_used (nullable, int64 [1]): the noise step
// the call used, written by the kernel (a snapshot of step_tensor for the backward).
std::tuple<Tensor, Tensor> bn_forward_train(
    const Tensor& x, int64_t spatial, const Tensor& y, const OptTensor& weight,
    const OptTensor& bias, const OptTensor& running_mean, const OptTensor& running_var,
    double momentum, double eps, bool relu, const Noise& noise, int64_t seed, int64_t step,
    const OptTensor& step_tensor, const OptTensor& step_used, const OptTensor& ws,
    const OptTensor& tickets, int64_t split, int64_t path) {
  const DeviceGuard guard(x);
  const OptTensor out = y;
  const bnk::Launch l = launch_for(x, spatial, {{&out, "y"}}, split);
  const int64_t C = l.g.C;
  const OptTensor w = per_channel(weight, x, C, "weight");
  const OptTensor b = per_channel(bias, x, C, "bias");
  InPlace rm(running_mean, x, C, "running_mean"), rv(running_var, x, C, "running_var");
  TORCH_CHECK(rm.target.has_value() == rv.target.has_value(),
              "bnkernels cuda: pass both running_mean and running_var, or neither");
  const bnk::Noise nz = make_noise(noise, seed, step, step_tensor, x);
  Tensor mean = empty_acc(x, {C}), invstd = empty_acc(x, {C});
  const bnk::PersistentPlan plan = choose_persistent(l, x, false, nz.on, path);
  const Work work = workspace_for(
      l, x, ws, tickets, plan.fits ? bnk::kBnCoefs * C + 4 * C * plan.per_channel : 0);
  // A refused cooperative launch (MPS, an SM-limited context) falls back to the multi-pass
  // kernels below.
  bool done = false;
  if (plan.fits) {
    bnk::BnPersistentFwdArgs a;
    a.x = x.data_ptr();
    a.y = y.data_ptr();
    a.ws = work.part(C);
    a.mean = mean.data_ptr();
    a.invstd = invstd.data_ptr();
    a.running_mean = rm.data();
    a.running_var = rv.data();
    a.momentum = momentum;
    a.eps = eps;
    a.weight = ptr(w);
    a.bias = ptr(b);
    a.relu = relu;
    done = bnk::bn_persistent_fwd(l, plan, a);
  }
  if (!done) {
    bnk::BnStatsArgs s;
    s.x = x.data_ptr();
    s.part = work.part(C);
    s.tickets = work.ticket_ptr();
    s.mean = mean.data_ptr();
    s.second = invstd.data_ptr();
    s.running_mean = rm.data();
    s.running_var = rv.data();
    s.momentum = momentum;
    s.eps = eps;
    s.weight = ptr(w);
    s.bias = ptr(b);
    s.coef = work.coef();
    s.keep_lo = !relu;  // with the ReLU, the backward must recompute the forward's bits
    s.noise = nz;
    bnk::bn_stats(l, s);
    bnk::BnApplyArgs a;
    a.x = x.data_ptr();
    a.y = y.data_ptr();
    a.coef = work.coef();
    a.relu = relu;
    a.noise = nz;
    if (step_used.has_value() && step_used->defined() && nz.step_ptr != nullptr) {
      CHECK_CUDA(*step_used);
      CHECK_SAME_DEVICE(*step_used, x);
      CHECK_DTYPE(*step_used, at::kLong);
      TORCH_CHECK(step_used->numel() == 1, "bnkernels cuda: step_used must hold one value");
      a.step_used = step_used->data_ptr<int64_t>();
    }
    bnk::bn_apply(l, a);
  }
  rm.finish();
  rv.finish();
  return {mean, invstd};
}

// Per-channel (mean, biased var), for SyncBatchNorm. One launch.
std::tuple<Tensor, Tensor> bn_stats(const Tensor& x, int64_t spatial, const OptTensor& ws,
                                    const OptTensor& tickets, int64_t split) {
  const DeviceGuard guard(x);
  const bnk::Launch l = launch_for(x, spatial, {}, split);
  const int64_t C = l.g.C;
  Tensor mean = empty_acc(x, {C}), var = empty_acc(x, {C});
  const Work work = workspace_for(l, x, ws, tickets, 0);
  bnk::BnStatsArgs s;
  s.x = x.data_ptr();
  s.part = work.part(C);
  s.tickets = work.ticket_ptr();
  s.mean = mean.data_ptr();
  s.second = var.data_ptr();
  s.out_var = true;
  bnk::bn_stats(l, s);
  return {mean, var};
}

// y = act(s (k (x - mean) + b) + m) with given statistics: mean and `second`, read as
// scale_from says (0: invstd; 1: a variance, invstd = 1/sqrt(var + eps); 2: an l_p scale,
// invstd = 1/(s + eps); computed in the kernel). save_mean / save_invstd (nullable, [C] in the
// accumulation type): snapshots of the mean and invstd used. One launch.
void bn_apply(const Tensor& x, int64_t spatial, const Tensor& y, const Tensor& mean,
              const Tensor& second, int64_t scale_from, double eps, const OptTensor& weight,
              const OptTensor& bias, bool relu, const Noise& noise, int64_t seed, int64_t step,
              const OptTensor& step_tensor, const OptTensor& save_mean,
              const OptTensor& save_invstd) {
  const DeviceGuard guard(x);
  const OptTensor out = y;
  const bnk::Launch l = launch_for(x, spatial, {{&out, "y"}});
  const int64_t C = l.g.C;
  const OptTensor m = per_channel(mean, x, C, "mean");
  const OptTensor sec = per_channel(second, x, C, "second");
  const OptTensor w = per_channel(weight, x, C, "weight");
  const OptTensor b = per_channel(bias, x, C, "bias");
  bnk::BnApplyArgs a;
  a.x = x.data_ptr();
  a.y = y.data_ptr();
  a.given = given(m, sec, scale_from, eps, w, b);
  a.save_mean = acc_out(save_mean, x, C, "save_mean");
  a.save_invstd = acc_out(save_invstd, x, C, "save_invstd");
  TORCH_CHECK((a.save_mean == nullptr) == (a.save_invstd == nullptr),
              "bnkernels cuda: pass both save_mean and save_invstd, or neither");
  a.relu = relu;
  a.noise = make_noise(noise, seed, step, step_tensor, x);
  bnk::bn_apply(l, a);
}

OptTensor grad_like(const Tensor& acc_grad, const OptTensor& param) {
  return acc_grad.to(param->scalar_type()).view(param->sizes());
}

// Backward: writes dx (if given); returns (dweight, dbias), None where not needed. Training:
// mean and `second` (invstd) are the saved batch statistics; eval: the statistics the forward
// used, `second` read as scale_from says (see bn_apply). At most two launches: training, one
// persistent kernel or bn_grad_sums + bn_dx; eval, bn_dx alone, after bn_grad_sums when
// dweight or dbias is wanted.
std::tuple<OptTensor, OptTensor> bn_backward(
    const Tensor& dy, const Tensor& x, int64_t spatial, const OptTensor& dx,
    const Tensor& mean, const Tensor& second, int64_t scale_from, double eps,
    const OptTensor& weight, const OptTensor& bias, bool training, bool relu, bool need_dw,
    bool need_db, const Noise& noise, int64_t seed, int64_t step, const OptTensor& step_tensor,
    const OptTensor& ws, const OptTensor& tickets, int64_t split, int64_t path) {
  const DeviceGuard guard(x);
  const OptTensor dyo = dy;
  const bnk::Launch l = launch_for(x, spatial, {{&dyo, "dy"}, {&dx, "dx"}}, split);
  const int64_t C = l.g.C;
  TORCH_CHECK(training ? scale_from == bnk::kFromInvstd : true,
              "bnkernels cuda: the training backward takes the saved invstd (scale_from 0)");
  const OptTensor m = per_channel(mean, x, C, "mean");
  const OptTensor sec = per_channel(second, x, C, "invstd");
  const OptTensor w = per_channel(weight, x, C, "weight");
  const OptTensor b = per_channel(bias, x, C, "bias");
  const bool need_dx = dx.has_value();
  need_dw = need_dw && w.has_value();
  need_db = need_db && b.has_value();
  const bnk::Noise nz = make_noise(noise, seed, step, step_tensor, x);
  const bnk::BnGiven stats = given(m, sec, scale_from, eps, w, b);
  OptTensor dw_acc, db_acc;
  if (need_dw) dw_acc = empty_acc(x, {C});
  if (need_db) db_acc = empty_acc(x, {C});
  const bool need_sums = (training && need_dx) || need_dw || need_db;
  const bnk::PersistentPlan plan =
      training && need_sums ? choose_persistent(l, x, true, nz.on, path) : bnk::PersistentPlan{};
  bool done = false;  // a refused cooperative launch falls back to the multi-pass kernels
  if (plan.fits) {
    const Work work =
        workspace_for(l, x, ws, tickets, bnk::kBnCoefs * C + 2 * C * plan.per_channel);
    bnk::BnPersistentBwdArgs a;
    a.dy = dy.data_ptr();
    a.x = x.data_ptr();
    a.dx = need_dx ? dx->data_ptr() : nullptr;
    a.ws = work.part(C);
    a.mean = ptr(m);
    a.invstd = ptr(sec);
    a.weight = ptr(w);
    a.bias = ptr(b);
    a.dweight = need_dw ? dw_acc->data_ptr() : nullptr;
    a.dbias = need_db ? db_acc->data_ptr() : nullptr;
    a.relu = relu;
    done = bnk::bn_persistent_bwd(l, plan, a);
  }
  if (!done) {
    const bool coef_dx = training && need_dx;  // dx from the sums' coefficients
    std::optional<Work> work;
    if (need_sums) {
      work = workspace_for(l, x, ws, tickets, 0);
      bnk::BnGradArgs g;
      g.dy = dy.data_ptr();
      g.x = x.data_ptr();
      g.given = stats;
      g.relu = relu;
      g.part = work->part(C);
      g.tickets = work->ticket_ptr();
      g.inv_m = 1.0 / static_cast<double>(l.g.M());
      g.coef = coef_dx ? work->coef() : nullptr;
      g.dweight = need_dw ? dw_acc->data_ptr() : nullptr;
      g.dbias = need_db ? db_acc->data_ptr() : nullptr;
      g.noise = nz;
      bnk::bn_grad_sums(l, g);
    }
    if (need_dx) {
      bnk::BnDxArgs a;
      a.dy = dy.data_ptr();
      a.x = x.data_ptr();
      a.dx = dx->data_ptr();
      a.coef = coef_dx ? work->coef() : nullptr;
      a.given = stats;
      a.relu = relu;
      a.training = training;
      a.noise = nz;
      bnk::bn_dx(l, a);
    }
  }
  OptTensor dw, db;
  if (need_dw) dw = grad_like(*dw_acc, weight);
  if (need_db) db = grad_like(*db_acc, bias);
  return {dw, db};
}

// [sum(g), sum(g (x - mean))] per channel ([2, C]), for SyncBatchNorm. One launch.
Tensor bn_bwd_reduce(const Tensor& dy, const Tensor& x, int64_t spatial, const Tensor& mean,
                     const Tensor& invstd, const OptTensor& weight, const OptTensor& bias,
                     bool relu, const Noise& noise, int64_t seed, int64_t step,
                     const OptTensor& step_tensor, const OptTensor& ws,
                     const OptTensor& tickets, int64_t split) {
  const DeviceGuard guard(x);
  const OptTensor dyo = dy;
  const bnk::Launch l = launch_for(x, spatial, {{&dyo, "dy"}}, split);
  const int64_t C = l.g.C;
  const OptTensor m = per_channel(mean, x, C, "mean");
  const OptTensor is = per_channel(invstd, x, C, "invstd");
  const OptTensor w = per_channel(weight, x, C, "weight");
  const OptTensor b = per_channel(bias, x, C, "bias");
  Tensor sums = empty_acc(x, {2, C});
  const Work work = workspace_for(l, x, ws, tickets, 0);
  bnk::BnGradArgs g;
  g.dy = dy.data_ptr();
  g.x = x.data_ptr();
  g.given = given(m, is, bnk::kFromInvstd, 0.0, w, b);
  g.relu = relu;
  g.part = work.part(C);
  g.tickets = work.ticket_ptr();
  g.inv_m = 1.0;
  g.sums = sums.data_ptr();
  g.noise = make_noise(noise, seed, step, step_tensor, x);
  bnk::bn_grad_sums(l, g);
  return sums;
}

// Training dx (written) given mean_sums = [mean(g), mean(g (x - mean))] over the whole batch.
// One launch.
void bn_bwd_dx(const Tensor& dy, const Tensor& x, int64_t spatial, const Tensor& dx,
               const Tensor& mean, const Tensor& invstd, const OptTensor& weight,
               const OptTensor& bias, const Tensor& mean_sums, bool relu, const Noise& noise,
               int64_t seed, int64_t step, const OptTensor& step_tensor) {
  const DeviceGuard guard(x);
  const OptTensor dyo = dy, dxo = dx;
  const bnk::Launch l = launch_for(x, spatial, {{&dyo, "dy"}, {&dxo, "dx"}});
  const int64_t C = l.g.C;
  const OptTensor m = per_channel(mean, x, C, "mean");
  const OptTensor is = per_channel(invstd, x, C, "invstd");
  const OptTensor w = per_channel(weight, x, C, "weight");
  const OptTensor b = per_channel(bias, x, C, "bias");
  CHECK_CUDA(mean_sums);
  CHECK_SAME_DEVICE(mean_sums, x);
  CHECK_SHAPE(mean_sums, 2, C);
  const Tensor ms = mean_sums.to(acc_type(x)).contiguous();
  bnk::BnDxArgs a;
  a.dy = dy.data_ptr();
  a.x = x.data_ptr();
  a.dx = dx.data_ptr();
  a.given = given(m, is, bnk::kFromInvstd, 0.0, w, b);
  a.mean_sums = ms.data_ptr();
  a.relu = relu;
  a.training = true;
  a.noise = make_noise(noise, seed, step, step_tensor, x);
  bnk::bn_dx(l, a);
}

// The noise (s, m) of noisy BatchNorm for an x of this geometry: fp32 [N * C * S] in logical
// (N, C, S)-contiguous order.
std::tuple<Tensor, Tensor> noisy_bn_noise(const Tensor& x, int64_t spatial,
                                          const std::vector<double>& noise, int64_t seed,
                                          int64_t step, const OptTensor& step_tensor) {
  const DeviceGuard guard(x);
  const bnk::Launch l = launch_for(x, spatial, {});
  const bnk::Noise nz = make_noise(noise, seed, step, step_tensor, x);
  Tensor s = at::empty({l.g.numel()}, x.options().dtype(at::kFloat));
  Tensor m = at::empty_like(s);
  bnk::noisy_bn_noise(l, nz, s.data_ptr<float>(), m.data_ptr<float>());
  return {s, m};
}

// ------------------------------------------------------------------------------ l_p norm

int p_code(double p) {
  if (std::isinf(p)) return 0;
  TORCH_CHECK(p == 1.0 || p == 2.0, "bnkernels cuda: p must be 1, 2 or inf, got ", p);
  return static_cast<int>(p);
}

// Training forward: y (written), (mean, s_p) of the batch; running buffers updated. Two
// launches (uncentered) or three (centered: the mean first).
std::tuple<Tensor, Tensor> lp_forward_train(const Tensor& x, int64_t spatial, const Tensor& y,
                                            double p, bool centered,
                                            const OptTensor& running_mean,
                                            const OptTensor& running_scale,
                                            const OptTensor& weight, const OptTensor& bias,
                                            double momentum, double eps, const OptTensor& ws,
                                            const OptTensor& tickets, int64_t split) {
  const DeviceGuard guard(x);
  const OptTensor out = y;
  const bnk::Launch l = launch_for(x, spatial, {{&out, "y"}}, split);
  const int64_t C = l.g.C;
  const int pc = p_code(p);
  const OptTensor w = per_channel(weight, x, C, "weight");
  const OptTensor b = per_channel(bias, x, C, "bias");
  InPlace rm(running_mean, x, C, "running_mean"), rs(running_scale, x, C, "running_scale");
  TORCH_CHECK(rm.target.has_value() == rs.target.has_value(),
              "bnkernels cuda: pass both running_mean and running_scale, or neither");
  Tensor mean = empty_acc(x, {C}), scale = empty_acc(x, {C});
  const Work work = workspace_for(l, x, ws, tickets, 0);
  bnk::LpStatsArgs s;
  s.x = x.data_ptr();
  s.p = pc;
  s.centered = centered;
  s.part = work.part(C);
  s.tickets = work.ticket_ptr();
  s.mean = mean.data_ptr();
  s.scale = scale.data_ptr();
  s.running_mean = rm.data();
  s.running_scale = rs.data();
  s.momentum = momentum;
  s.eps = eps;
  s.weight = ptr(w);
  s.bias = ptr(b);
  s.coef = work.coef();
  bnk::lp_stats(l, s);
  bnk::BnApplyArgs a;
  a.x = x.data_ptr();
  a.y = y.data_ptr();
  a.coef = work.coef();
  bnk::bn_apply(l, a);
  rm.finish();
  rs.finish();
  return {mean, scale};
}

// Training backward: writes dx (if given); returns (dweight, dbias), None where not needed.
// Two launches (one without dx).
std::tuple<OptTensor, OptTensor> lp_backward_train(
    const Tensor& dy, const Tensor& x, int64_t spatial, const OptTensor& dx, double p,
    bool centered, const Tensor& mean, const Tensor& scale, const OptTensor& weight,
    const OptTensor& bias, double eps, bool need_dw, bool need_db, const OptTensor& ws,
    const OptTensor& tickets, int64_t split) {
  const DeviceGuard guard(x);
  const OptTensor dyo = dy;
  const bnk::Launch l = launch_for(x, spatial, {{&dyo, "dy"}, {&dx, "dx"}}, split);
  const int64_t C = l.g.C;
  const int pc = p_code(p);
  const OptTensor m = per_channel(mean, x, C, "mean");
  const OptTensor sc = per_channel(scale, x, C, "scale");
  const OptTensor w = per_channel(weight, x, C, "weight");
  const OptTensor b = per_channel(bias, x, C, "bias");
  need_dw = need_dw && w.has_value();
  need_db = need_db && b.has_value();
  if (!(dx.has_value() || need_dw || need_db)) return {std::nullopt, std::nullopt};
  OptTensor dw_acc, db_acc;
  if (need_dw) dw_acc = empty_acc(x, {C});
  if (need_db) db_acc = empty_acc(x, {C});
  const Work work = workspace_for(l, x, ws, tickets, 0);
  bnk::LpBwdArgs a;
  a.dy = dy.data_ptr();
  a.x = x.data_ptr();
  a.dx = dx.has_value() ? dx->data_ptr() : nullptr;
  a.p = pc;
  a.centered = centered;
  a.mean = ptr(m);
  a.scale = ptr(sc);
  a.weight = ptr(w);
  a.eps = eps;
  a.part = work.part(C);
  a.tickets = work.ticket_ptr();
  a.coef = work.coef();
  a.dweight = need_dw ? dw_acc->data_ptr() : nullptr;
  a.dbias = need_db ? db_acc->data_ptr() : nullptr;
  bnk::lp_bwd(l, a);
  OptTensor dw, db;
  if (need_dw) dw = grad_like(*dw_acc, weight);
  if (need_db) db = grad_like(*db_acc, bias);
  return {dw, db};
}

// ------------------------------------------------------------------------------ introspection

// Whether the persistent kernels would take x (nothing runs): (fits, why not, blocks, blocks
// per channel or channel group).
std::tuple<bool, std::string, int64_t, int64_t> persistent_plan(const Tensor& x, int64_t spatial,
                                                                bool backward) {
  const DeviceGuard guard(x);
  const bnk::Launch l = launch_for(x, spatial, {});
  const bnk::PersistentPlan plan = bnk::bn_persistent_plan(l, backward, x.device().index());
  return {plan.fits, plan.fits ? "" : plan.why, plan.blocks, plan.per_channel};
}

// Force (or stop forcing) 64-bit index arithmetic on every size: a test hook, so that the
// wide path runs on small tensors. Returns the previous setting.
bool force_index64(bool on) { return g_force_index64.exchange(on); }

// The workspace every call on an input of this geometry may need (see bnk::WorkspaceSize),
// for callers that cache one: (elements of the accumulation type, int32 ticket counters).
// elem_size: bytes per element of x (2, 4 or 8); device: its CUDA device index.
std::tuple<int64_t, int64_t> workspace_size(int64_t N, int64_t C, int64_t S, bool ncs,
                                            int64_t elem_size, int64_t split, int64_t device) {
  TORCH_CHECK(N >= 1 && C >= 1 && S >= 1, "bnkernels cuda: empty geometry");
  bnk::Launch l;
  l.dtype = elem_size == 8 ? bnk::DType::kDouble
                           : (elem_size == 4 ? bnk::DType::kFloat : bnk::DType::kHalf);
  l.g.N = N;
  l.g.C = C;
  l.g.S = S;
  l.g.ncs = ncs;
  l.num_sms = num_sms(static_cast<int>(device));
  l.split = static_cast<int>(split);
#ifndef BNK_CPU_EMULATION
  const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
#endif
  const bnk::WorkspaceSize ws = bnk::workspace_size(l, static_cast<int>(device));
  return {ws.acc, ws.tickets};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace py = pybind11;
  m.doc() = "bnkernels CUDA backend: BatchNorm, noisy BatchNorm and l_p normalization kernels";
  m.attr("SOURCE_HASH") = py::str(BNK_SOURCE_HASH);
  m.attr("CUDA_VERSION") = py::int_(CUDART_VERSION);
  m.def("bn_forward_train", &bn_forward_train, "BatchNorm training forward");
  m.def("bn_stats", &bn_stats, "per-channel mean and biased variance");
  m.def("bn_apply", &bn_apply, "BatchNorm forward with given statistics");
  m.def("bn_backward", &bn_backward, "BatchNorm backward");
  m.def("bn_bwd_reduce", &bn_bwd_reduce, "per-channel gradient sums (SyncBatchNorm)");
  m.def("bn_bwd_dx", &bn_bwd_dx, "dx from whole-batch gradient means (SyncBatchNorm)");
  m.def("noisy_bn_noise", &noisy_bn_noise, "the noise (s, m) of noisy BatchNorm");
  m.def("lp_forward_train", &lp_forward_train, "l_p normalization training forward");
  m.def("lp_backward_train", &lp_backward_train, "l_p normalization training backward");
  m.def("persistent_plan", &persistent_plan, "whether the persistent kernels take x");
  m.def("workspace_size", &workspace_size, "the cached workspace of a geometry");
  m.def("force_index64", &force_index64, "test hook: 64-bit index arithmetic on every size");
#ifdef BNK_CPU_EMULATION
  m.def("emu_launch_count", [] { return emu::launch_count(); },
        "kernel launches so far (the CPU emulation's counter)");
#endif
}
