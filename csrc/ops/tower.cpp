// The adapter tower on CPU as one C++ autograd node: the op moefast::tower.
//
// The same arithmetic as moefast/ops/_adapter_cpu.py (layer_forward, layer_backward) and
// moefast/ops/_tower_cpu.py (CpuTowerFunction), the same ATen calls in the same order, so the
// results are equal bit for bit; only the Python around each call is gone. At CTR sizes that
// Python is a large part of a step: a paper-sized tower at batch 8 spends about 0.3 ms per
// training step in it, forward and backward.
//
// Built as its own module, moefast._tower_ops, against libtorch, apart from moefast._C (which
// stays free of torch); importing it registers the op. Inputs are validated in Python before the call (the same checks
// as the per-layer op); the C++ re-checks every size it relies on with TORCH_CHECK_VALUE, which
// Python sees as ValueError.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <nanobind/nanobind.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <vector>

namespace {

using at::Tensor;

// Whether this CPU has bf16 dot-product units (AVX512-BF16 or AMX-BF16), read once.
bool cpu_has_bf16_units() {
  static const bool has = [] {
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512bf16") || __builtin_cpu_supports("amx-bf16");
#else
    return false;
#endif
  }();
  return has;
}

// moefast::mm_bf16: a [m, k] @ b [k, n] for bf16 operands with fp32 accumulation, as an fp32
// tensor (the wide products of bf16-mixed; moefast/precision.py says which products).
//
// With bf16 units, torch's bf16 GEMM (oneDNN: bf16 dot products accumulated in fp32), whose
// result torch stores in bf16: one more rounding, half a bf16 ulp of each result. torch's CPU
// build offers no bf16 GEMM with an fp32 result (aten::mm.dtype has no CPU kernel; MKL's
// cblas_gemm_bf16bf16f32 takes an emulated path on AMD CPUs, measured slower than fp32 here).
// Without bf16 units, the fp32 product of the bf16 operands: exactly the reference's function
// (oneDNN would emulate bf16 there, slower still).
Tensor mm_bf16(const Tensor& a, const Tensor& b) {
  TORCH_CHECK_VALUE(a.dim() == 2 && b.dim() == 2 && a.size(1) == b.size(0), "moefast::mm_bf16: shapes ",
                    a.sizes(), " and ", b.sizes(), " do not multiply");
  TORCH_CHECK_VALUE(a.scalar_type() == at::kBFloat16 && b.scalar_type() == at::kBFloat16,
                    "moefast::mm_bf16 takes bfloat16 operands, got ", a.scalar_type(), " and ", b.scalar_type());
  if (cpu_has_bf16_units()) return at::mm(a, b).to(at::kFloat);
  return at::mm(a.to(at::kFloat), b.to(at::kFloat));
}

// The tower node calls mm_bf16 through the dispatcher, so that a dispatch mode sees which
// dtypes reach the wide products (tests/test_precision.py).
Tensor wide_mm(const Tensor& a, const Tensor& b) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("moefast::mm_bf16", "")
                             .typed<Tensor(const Tensor&, const Tensor&)>();
  return op.call(a, b);
}
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

constexpr int64_t kPerLayer = 5;       // weight, bias, lora_A, lora_B, lora_c
constexpr int64_t kSavedPerLayer = 9;  // what layer_forward saves, in this order:
enum Saved : int64_t { kX, kY, kU, kUg, kWRows, kLoraB, kLoraC, kGate, kMask };

// Positions in backward's result, one per forward argument: x, gate, domain, the parameters,
// then expert and masks (never variables).
constexpr int64_t kGradX = 0, kGradGate = 1, kFirstParam = 3;

// Gradients of one layer, in layer_backward's order.
struct LayerGrads {
  Tensor x, weight, bias, lora_A, lora_B, lora_c, gate;
};

// y = relu((x W^T + b) * m + adapter term); `saved` gets the 9 tensors layer_backward reads.
Tensor layer_forward(const Tensor& x, const Tensor& weight, const Tensor& bias, const Tensor& lora_A,
                     const Tensor& lora_B, const Tensor& lora_c, const Tensor& g, int64_t expert,
                     const Tensor& mask, bool bf16, std::vector<Tensor>& saved) {
  const int64_t num_experts = lora_A.size(0), d_in = lora_A.size(1), rank = lora_A.size(2);
  const int64_t d_out = weight.size(0), n = x.size(0);
  TORCH_CHECK_VALUE(x.dim() == 2 && x.size(1) == d_in && weight.dim() == 2 && weight.size(1) == d_in,
                    "moefast::tower: layer input width ", x.size(-1), " does not match the weight ",
                    weight.sizes(), " and lora_A ", lora_A.sizes());
  TORCH_CHECK_VALUE(bias.sizes() == at::IntArrayRef({d_out}) &&
                        lora_B.sizes() == at::IntArrayRef({num_experts, rank, d_out}) &&
                        lora_c.sizes() == at::IntArrayRef({num_experts, d_out}),
                    "moefast::tower: a layer with weight ", weight.sizes(), " and lora_A ", lora_A.sizes(),
                    " got bias ", bias.sizes(), ", lora_B ", lora_B.sizes(), ", lora_c ", lora_c.sizes());
  TORCH_CHECK_VALUE(!mask.defined() || mask.sizes() == at::IntArrayRef({n, d_out}),
                    "moefast::tower: dropout mask ", mask.sizes(), " for a [", n, ", ", d_out, "] layer");
  TORCH_CHECK_VALUE(!g.defined() || g.sizes() == at::IntArrayRef({n, num_experts}),
                    "moefast::tower: gate ", g.sizes(), " for ", n, " rows and ", num_experts, " experts");
  TORCH_CHECK_VALUE(expert < num_experts, "moefast::tower: expert ", expert, " outside [0, ", num_experts, ")");
  Tensor a_rows;  // A_sel^T: [r, in] for one expert, [E r, in] for the mixture
  if (expert >= 0) {
    a_rows = lora_A.select(0, expert).t();
  } else if (g.defined()) {
    a_rows = lora_A.permute({0, 2, 1}).reshape({num_experts * rank, d_in});
  }
  Tensor w_rows, z, u;
  // bf16-mixed: the wide product's operands in bf16 (and saved so for backward), its result
  // and everything after it in fp32.
  const Tensor xs = bf16 ? x.to(at::kBFloat16) : x;
  if (a_rows.defined()) {
    w_rows = bf16 ? at::cat({weight.to(at::kBFloat16), a_rows.to(at::kBFloat16)}) : at::cat({weight, a_rows});
    const Tensor h = bf16 ? wide_mm(xs, w_rows.t()) : at::matmul(x, w_rows.t());  // [x W^T | u]
    z = at::add(h.slice(1, 0, d_out), bias);
    u = h.slice(1, d_out);
  } else if (bf16) {
    w_rows = weight.to(at::kBFloat16);
    z = wide_mm(xs, w_rows.t()).add_(bias);
    u = z.new_empty({n, 0});
  } else {
    w_rows = weight;
    z = at::addmm(bias, x, weight.t());
    u = z.new_empty({n, 0});
  }
  if (mask.defined()) z.mul_(mask);
  Tensor ug = u;
  if (expert >= 0) {
    z.addmm_(u, lora_B.select(0, expert)).add_(lora_c.select(0, expert));
  } else if (g.defined()) {
    ug = (u.view({n, num_experts, rank}) * g.unsqueeze(2)).view({n, num_experts * rank});
    z.addmm_(ug, lora_B.reshape({num_experts * rank, d_out})).addmm_(g, lora_c);
  }
  const Tensor y = z.relu_();
  saved.insert(saved.end(), {xs, y, u, ug, w_rows, lora_B, lora_c, g, mask});
  return y;
}

// One layer's gradients (need_*: which ones autograd wants). See layer_backward in Python.
LayerGrads layer_backward(const Tensor* s, const Tensor& dy, int64_t expert, bool need_x, bool need_w,
                          bool need_b, bool need_a, bool need_bb, bool need_c, bool need_g,
                          bool gate_grad, bool bf16) {
  const Tensor &x = s[kX], &y = s[kY], &u = s[kU], &ug = s[kUg], &w_rows = s[kWRows];
  const Tensor &lora_B = s[kLoraB], &lora_c = s[kLoraC], &g = s[kGate], &mask = s[kMask];
  const int64_t num_experts = lora_B.size(0), rank = lora_B.size(1), d_out = lora_B.size(2);
  const int64_t n = x.size(0), d_in = x.size(1), width = u.size(1);
  LayerGrads grads;
  const Tensor dz = at::threshold_backward(dy, y, 0);
  const bool adapter = expert >= 0 || g.defined();
  // d = [dz * m | du]: the gradient at [z | u], in one buffer.
  const Tensor d = dz.new_empty({n, d_out + width});
  Tensor dzm = d.slice(1, 0, d_out), du = d.slice(1, d_out);
  if (need_x || need_w || need_b) {
    if (mask.defined()) {
      at::mul_out(dzm, dz, mask);
    } else {
      dzm.copy_(dz);
    }
  }
  if (adapter && (need_x || need_a || need_g)) {
    if (expert >= 0) {
      at::mm_out(du, dz, lora_B.select(0, expert).t());  // du = dz B_e^T
    } else {
      const Tensor b_cat = lora_B.reshape({num_experts * rank, d_out});
      const Tensor dug = at::matmul(dz, b_cat.t()).view({n, num_experts, rank});
      if (need_g && gate_grad) {
        grads.gate = (u.view({n, num_experts, rank}) * dug).sum(-1).addmm_(dz, lora_c.t());
      }
      Tensor du_e = du.view({n, num_experts, rank});
      at::mul_out(du_e, dug, g.unsqueeze(2));
    }
  }
  // bf16-mixed (x and w_rows were saved in bf16): the products reading them take d, or the
  // part of it they read, in bf16; their results are fp32.
  auto mm = [bf16](const Tensor& a, const Tensor& b) { return bf16 ? wide_mm(a, b) : at::matmul(a, b); };
  auto operand = [bf16](const Tensor& t) { return bf16 && t.scalar_type() != at::kBFloat16 ? t.to(at::kBFloat16) : t; };
  const bool whole = need_x || (need_w && need_a && adapter);
  const Tensor ds = whole ? operand(d) : d;
  if (need_x) grads.x = mm(ds, w_rows);
  Tensor da_sel_t;  // [V r, in]
  if (need_w && need_a && adapter) {
    const Tensor gw = mm(ds.t(), x);  // [dW ; dA_sel^T]
    grads.weight = gw.slice(0, 0, d_out);
    da_sel_t = gw.slice(0, d_out);
  } else {
    if (need_w) grads.weight = mm(operand(ds.slice(1, 0, d_out)).t(), x);
    if (need_a && adapter) da_sel_t = mm(operand(ds.slice(1, d_out)).t(), x);
  }
  if (need_b) grads.bias = dzm.sum(0);
  if (need_a && da_sel_t.defined()) {
    grads.lora_A = at::zeros({num_experts, d_in, rank}, lora_B.options());
    if (expert >= 0) {
      grads.lora_A.select(0, expert).copy_(da_sel_t.t());
    } else {
      grads.lora_A.copy_(da_sel_t.view({num_experts, rank, d_in}).transpose(1, 2));
    }
  }
  if (need_bb && adapter) {
    if (expert >= 0) {
      grads.lora_B = at::zeros_like(lora_B);
      Tensor grad_B_e = grads.lora_B.select(0, expert);
      at::mm_out(grad_B_e, u.t(), dz);
    } else {
      grads.lora_B = at::matmul(ug.t(), dz).view({num_experts, rank, d_out});
    }
  }
  if (need_c && adapter) {
    if (expert >= 0) {
      grads.lora_c = at::zeros_like(lora_c);
      grads.lora_c.select(0, expert).copy_(dz.sum(0));
    } else {
      grads.lora_c = at::matmul(g.t(), dz);
    }
  }
  return grads;
}

}  // namespace

namespace moefast {

// The node autograd records (its name shows in grad_fn: CppNode<moefast::TowerFunction>).
struct TowerFunction : public torch::autograd::Function<TowerFunction> {
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const std::optional<Tensor>& gate,
                        const std::optional<Tensor>& domain, at::TensorList params,
                        std::optional<int64_t> expert, const c10::List<std::optional<Tensor>>& masks,
                        bool bf16) {
    const int64_t num_layers = static_cast<int64_t>(masks.size());
    TORCH_CHECK_VALUE(num_layers >= 1 && static_cast<int64_t>(params.size()) == kPerLayer * num_layers + 2,
                      "moefast::tower: ", params.size(), " parameters for ", num_layers,
                      " layers (5 per layer, then the output weight and bias)");
    TORCH_CHECK_VALUE(!expert.has_value() || *expert >= 0, "moefast::tower: expert ", *expert, " is negative");
    TORCH_CHECK_VALUE(int{gate.has_value()} + int{domain.has_value()} + int{expert.has_value()} <= 1,
                      "moefast::tower: pass at most one of gate, domain, expert");
    TORCH_CHECK_VALUE(!domain.has_value() || domain->sizes() == at::IntArrayRef({x.size(0)}),
                      "moefast::tower: domain ", domain->sizes(), " for ", x.size(0), " rows");
    const int64_t e = expert.value_or(-1);
    const Tensor& lora_A0 = params[2];
    Tensor g;  // routing_gate: the mixture weights, or a one-hot of the domain ids
    if (gate.has_value()) {
      g = gate->to(x.scalar_type());
    } else if (domain.has_value()) {
      g = at::one_hot(*domain, lora_A0.size(0)).to(x.scalar_type());
    }
    std::vector<Tensor> saved;
    saved.reserve(kSavedPerLayer * num_layers + 2);
    Tensor h = x;
    for (int64_t k = 0; k < num_layers; ++k) {
      const Tensor* p = params.data() + kPerLayer * k;
      TORCH_CHECK_VALUE(p[2].dim() == 3, "moefast::tower: lora_A must be [E, in, r], got ", p[2].sizes());
      const std::optional<Tensor> mask = masks.get(k);
      h = layer_forward(h, p[0], p[1], p[2], p[3], p[4], g, e, mask.value_or(Tensor()), bf16, saved);
    }
    const Tensor& out_weight = params[params.size() - 2];
    const Tensor& out_bias = params[params.size() - 1];
    TORCH_CHECK_VALUE(out_weight.sizes() == at::IntArrayRef({1, h.size(1)}) && out_bias.sizes() == at::IntArrayRef({1}),
                      "moefast::tower: the output layer must be Linear(", h.size(1), ", 1), got weight ",
                      out_weight.sizes(), " and bias ", out_bias.sizes());
    const Tensor logit = at::addmm(out_bias, h, out_weight.t()).view({-1});
    saved.push_back(h);
    saved.push_back(out_weight);
    ctx->save_for_backward(saved);
    ctx->saved_data["expert"] = e;
    ctx->saved_data["num_layers"] = num_layers;
    ctx->saved_data["gate_grad"] = gate.has_value();
    ctx->saved_data["bf16"] = bf16;
    // needs_input_grad counts the variables passed, absent optionals not included.
    ctx->saved_data["first_param_input"] = int64_t{1} + gate.has_value() + domain.has_value();
    ctx->saved_data["num_params"] = static_cast<int64_t>(params.size());
    return logit;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    TORCH_CHECK(!at::GradMode::is_enabled(), "moefast::tower has no double backward (create_graph=True); "
                "use backend='reference' for higher-order gradients");
    const variable_list saved = ctx->get_saved_variables();
    const int64_t expert = ctx->saved_data["expert"].toInt();
    const int64_t num_layers = ctx->saved_data["num_layers"].toInt();
    const bool gate_grad = ctx->saved_data["gate_grad"].toBool();
    const bool bf16 = ctx->saved_data["bf16"].toBool();
    const int64_t num_params = ctx->saved_data["num_params"].toInt();
    const int64_t first_param_input = ctx->saved_data["first_param_input"].toInt();
    auto need_param = [&](int64_t i) { return ctx->needs_input_grad(first_param_input + i); };
    const bool need_input = ctx->needs_input_grad(0);
    const bool need_gate = gate_grad && ctx->needs_input_grad(1);
    // x, gate, domain, the parameters, then expert, masks and bf16 (not variables): all
    // undefined unless computed below.
    variable_list grads(kFirstParam + num_params + 3);
    const Tensor& h_last = saved[saved.size() - 2];
    const Tensor& out_weight = saved[saved.size() - 1];
    const Tensor dlogit = grad_outputs[0].contiguous();
    if (need_param(num_params - 2)) grads[kFirstParam + num_params - 2] = at::matmul(dlogit.unsqueeze(0), h_last);
    if (need_param(num_params - 1)) grads[kFirstParam + num_params - 1] = dlogit.sum(0, true);
    Tensor dy = dlogit.unsqueeze(1) * out_weight;  // [N, last]
    Tensor grad_gate;
    // The lowest layer whose parameters train: dx of layer k feeds the layers below it.
    int64_t lowest_trained = num_layers;
    for (int64_t i = 0; i < kPerLayer * num_layers; ++i) {
      if (need_param(i)) {
        lowest_trained = i / kPerLayer;
        break;
      }
    }
    for (int64_t k = num_layers - 1; k >= 0; --k) {
      const bool below = need_input || (k > 0 && (need_gate || lowest_trained < k));
      const int64_t base = kPerLayer * k;
      LayerGrads lg = layer_backward(saved.data() + kSavedPerLayer * k, dy, expert, below, need_param(base),
                                     need_param(base + 1), need_param(base + 2), need_param(base + 3),
                                     need_param(base + 4), need_gate, gate_grad, bf16);
      grads[kFirstParam + base] = lg.weight;
      grads[kFirstParam + base + 1] = lg.bias;
      grads[kFirstParam + base + 2] = lg.lora_A;
      grads[kFirstParam + base + 3] = lg.lora_B;
      grads[kFirstParam + base + 4] = lg.lora_c;
      if (lg.gate.defined()) grad_gate = grad_gate.defined() ? grad_gate.add_(lg.gate) : lg.gate;
      dy = lg.x;
      if (!dy.defined() && !need_gate) break;  // nothing below this layer wants a gradient
    }
    if (need_input) grads[kGradX] = dy;
    grads[kGradGate] = grad_gate;
    return grads;
  }
};

}  // namespace moefast

namespace {

Tensor tower(const Tensor& x, const std::optional<Tensor>& gate, const std::optional<Tensor>& domain,
             at::TensorList params, std::optional<int64_t> expert, const c10::List<std::optional<Tensor>>& masks,
             bool bf16) {
  return moefast::TowerFunction::apply(x, gate, domain, params, expert, masks, bf16);
}

// Rows of one work unit of merged_tower at most. The products of a unit are small GEMMs whose
// efficiency grows with their rows (the tower alone at 1 thread: 1.7x the base tower with units
// of 128 rows); units of 256 and 1024 rows measured alike on the serving benchmark once the
// units really ran in parallel (this module built with -fopenmp, see CMakeLists.txt), and the
// larger gives the threads fewer, larger products. The threads share the rows through the
// partition below, not through more, smaller units.
constexpr int64_t kMergedChunk = 1024;

// The merged tower's forward (moefast/export/_merge.py, MergedTower, whose Python loop is the
// specification and what torch.export traces): rows grouped by domain, each domain's rows through
// that domain's [in, out] matrices, logits back in row order.
//
// Work units: each domain's rows cut into ceil(rows / kMergedChunk) pieces of equal size (543 rows
// -> 3 x 181, never 256 + 256 + 31). The units depend on the data alone, not on the thread count,
// and every product runs on one thread (see `parts` below): bitwise the same at any thread count. One
// at::parallel_for over the threads, each taking a contiguous run of units holding about 1/T of
// the rows (domains differ in size: splitting the list of units evenly by count left one thread
// with the large domains); the products inside run on the calling thread (ATen does not nest
// parallel regions).
Tensor merged_tower(const Tensor& x, const Tensor& domain, at::TensorList weights, at::TensorList biases,
                    const Tensor& out_weight, const Tensor& out_bias) {
  TORCH_CHECK_VALUE(x.dim() == 2 && domain.dim() == 1 && domain.size(0) == x.size(0),
                    "merged_tower: x must be [N, in] and domain [N]");
  TORCH_CHECK_VALUE(!weights.empty() && weights.size() == biases.size(), "merged_tower: one bias per weight");
  const int64_t n = x.size(0);
  const int64_t num_domains = weights[0].size(0);
  for (size_t k = 0; k < weights.size(); ++k) {
    TORCH_CHECK_VALUE(weights[k].dim() == 3 && weights[k].size(0) == num_domains && biases[k].dim() == 2 &&
                          biases[k].size(0) == num_domains && biases[k].size(1) == weights[k].size(2) &&
                          weights[k].size(1) == (k == 0 ? x.size(1) : weights[k - 1].size(2)),
                      "merged_tower: layer ", k, " has mismatched shapes");
  }
  const Tensor order = std::get<1>(domain.sort());
  const Tensor counts = at::bincount(domain, {}, num_domains).cpu();
  TORCH_CHECK_VALUE(counts.size(0) == num_domains, "merged_tower: a domain id is outside [0, ", num_domains, ")");
  const Tensor grouped = x.index_select(0, order);
  // Every layer's output for all rows, allocated here: each unit writes its rows in place (no
  // allocation inside the parallel region, and the last layer lands in `hidden` without a copy).
  std::vector<Tensor> outputs;
  for (const Tensor& w : weights) {
    outputs.push_back(at::empty({n, w.size(2)}, x.options()));
  }
  const Tensor& hidden = outputs.back();
  struct Unit {
    int64_t domain, start, rows;
  };
  std::vector<Unit> units;
  const auto* count = counts.data_ptr<int64_t>();
  int64_t start = 0;
  for (int64_t d = 0; d < num_domains; ++d) {
    const int64_t pieces = (count[d] + kMergedChunk - 1) / kMergedChunk;
    for (int64_t p = 0; p < pieces; ++p) {
      const int64_t lo = count[d] * p / pieces, hi = count[d] * (p + 1) / pieces;
      units.push_back({d, start + lo, hi - lo});
    }
    start += count[d];
  }
  const int64_t num_units = static_cast<int64_t>(units.size());
  // One part per thread, even when there are fewer units (some parts are then empty): with more
  // than one thread the products always run inside the parallel region, where MKL runs them on
  // one thread, as it does at 1 thread. A product run outside it would be threaded by MKL and
  // could round differently; this way the result is bitwise the same at any thread count.
  const int64_t parts = std::max<int64_t>(1, at::get_num_threads());
  // Part p runs the units whose first row lies in [n p / parts, n (p + 1) / parts).
  std::vector<int64_t> first(parts + 1, num_units);
  for (int64_t p = parts - 1, u = num_units; p >= 0; --p) {
    while (u > 0 && units[u - 1].start >= n * p / parts) {
      --u;
    }
    first[p] = u;
  }
  at::parallel_for(0, parts, 1, [&](int64_t begin, int64_t end) {
    for (int64_t u = first[begin]; u < first[end]; ++u) {
      const Unit& unit = units[u];
      Tensor h = grouped.narrow(0, unit.start, unit.rows);
      for (size_t k = 0; k < weights.size(); ++k) {
        Tensor out = outputs[k].narrow(0, unit.start, unit.rows);
        at::addmm_out(out, biases[k].select(0, unit.domain), h, weights[k].select(0, unit.domain)).relu_();
        h = out;
      }
    }
  });
  const Tensor logits = at::addmm(out_bias, hidden, out_weight.t()).view({-1});
  return at::empty_like(logits).index_copy_(0, order, logits);
}

}  // namespace

TORCH_LIBRARY(moefast, m) {
  // bf16: bf16-mixed (moefast/precision.py); the wide products through mm_bf16.
  m.def("tower(Tensor x, Tensor? gate, Tensor? domain, Tensor[] params, int? expert, Tensor?[] masks, "
        "bool bf16=False) -> Tensor");
  m.def("mm_bf16(Tensor a, Tensor b) -> Tensor");
  m.def("merged_tower(Tensor x, Tensor domain, Tensor[] weights, Tensor[] biases, Tensor out_weight, "
        "Tensor out_bias) -> Tensor");
}

TORCH_LIBRARY_IMPL(moefast, CompositeImplicitAutograd, m) { m.impl("tower", tower); }

TORCH_LIBRARY_IMPL(moefast, CPU, m) {
  m.impl("merged_tower", merged_tower);
  m.impl("mm_bf16", mm_bf16);
}

// Importing moefast._tower_ops registers the op (the static initialisers above run at load).
NB_MODULE(_tower_ops, m) {
  m.doc() = "Registers torch.ops.moefast.tower (the CPU adapter tower as one C++ autograd node), "
            "torch.ops.moefast.merged_tower (the per-domain merged tower's forward) and "
            "torch.ops.moefast.mm_bf16 (bf16 operands, fp32 accumulation and result).";
}
