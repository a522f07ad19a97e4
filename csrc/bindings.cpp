// The nanobind module moefast._C: bindings only; the logic lives in the other csrc/ files.
//
// Array contracts are declared in the signatures with .noconvert(): a tensor of the wrong
// dtype, rank or device, or a non-contiguous one, is a TypeError before any C++ runs (never a
// silent copy). Shape and value problems raise std::invalid_argument, which nanobind maps to
// ValueError. The GIL is released around the work.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include "build_info.h"
#include "embedding.h"

namespace nb = nanobind;
using namespace nb::literals;

namespace {

using Table = nb::ndarray<float, nb::ndim<2>, nb::c_contig, nb::device::cpu>;
using FloatVector = nb::ndarray<float, nb::ndim<1>, nb::c_contig, nb::device::cpu>;
using Int64Vector = nb::ndarray<int64_t, nb::ndim<1>, nb::c_contig, nb::device::cpu>;
using IdVector = nb::ndarray<nb::ndim<1>, nb::c_contig, nb::device::cpu>;  // int32 or int64

constexpr int64_t kMaxRowsOrIds = int64_t{1} << 32;  // ids and positions are packed in 32 bits

bool is_int(const IdVector& a, int bits) {
  return a.dtype() == nb::dtype<int32_t>() ? bits == 32
         : a.dtype() == nb::dtype<int64_t>() ? bits == 64 : false;
}

// Validates the per-field lists and describes them for the engine.
std::vector<moefast::EmbeddingField> make_fields(
    const std::vector<Table>& weights, const std::vector<IdVector>& indices,
    const std::vector<std::optional<IdVector>>& offsets,
    const std::vector<std::optional<FloatVector>>& per_sample_weights,
    const std::vector<int>& poolings, const std::vector<int64_t>& padding_idx,
    const std::vector<std::string>& names, int64_t batch) {
  const size_t n = weights.size();
  if (indices.size() != n || offsets.size() != n || per_sample_weights.size() != n ||
      poolings.size() != n || padding_idx.size() != n || names.size() != n) {
    throw std::invalid_argument("every per-field list must have one entry per table");
  }
  if (batch < 0) throw std::invalid_argument("batch must be >= 0");
  std::vector<moefast::EmbeddingField> fields(n);
  for (size_t t = 0; t < n; ++t) {
    moefast::EmbeddingField& f = fields[t];
    f.name = names[t];
    const std::string where = "field '" + f.name + "': ";
    f.weight = weights[t].data();
    f.rows = static_cast<int64_t>(weights[t].shape(0));
    f.dim = static_cast<int64_t>(weights[t].shape(1));
    if (f.dim < 1) throw std::invalid_argument(where + "table dim must be >= 1");
    if (f.rows >= kMaxRowsOrIds) throw std::invalid_argument(where + "tables of 2^32 rows or more are not supported");
    const IdVector& ids = indices[t];
    if (!is_int(ids, 32) && !is_int(ids, 64)) throw nb::type_error((where + "indices must be int32 or int64").c_str());
    f.index_is_64 = is_int(ids, 64);
    f.indices = ids.data();
    f.num_indices = static_cast<int64_t>(ids.shape(0));
    if (f.num_indices >= kMaxRowsOrIds) throw std::invalid_argument(where + "2^32 or more ids in one call are not supported");
    if (poolings[t] < 0 || poolings[t] > 2) throw std::invalid_argument(where + "unknown pooling");
    f.pooling = static_cast<moefast::Pooling>(poolings[t]);
    if (offsets[t].has_value()) {
      const IdVector& off = *offsets[t];
      if (f.pooling == moefast::Pooling::kNone) throw std::invalid_argument(where + "a single-valued field takes no offsets");
      if (off.dtype() != ids.dtype()) throw nb::type_error((where + "offsets must have the dtype of indices").c_str());
      if (static_cast<int64_t>(off.shape(0)) != batch + 1) {
        throw std::invalid_argument(where + "offsets must have batch + 1 = " + std::to_string(batch + 1) + " entries");
      }
      f.offsets = off.data();
    } else {
      if (f.pooling != moefast::Pooling::kNone) throw std::invalid_argument(where + "a pooled field needs offsets");
      if (f.num_indices != batch) throw std::invalid_argument(where + "a single-valued field needs one id per sample");
    }
    if (per_sample_weights[t].has_value()) {
      const FloatVector& w = *per_sample_weights[t];
      if (static_cast<int64_t>(w.shape(0)) != f.num_indices) {
        throw std::invalid_argument(where + "per_sample_weights must have one entry per id");
      }
      if (f.pooling == moefast::Pooling::kMean) throw std::invalid_argument(where + "per_sample_weights need sum pooling");
      f.per_sample_weights = w.data();
    }
    if (padding_idx[t] < -1 || padding_idx[t] >= f.rows) throw std::invalid_argument(where + "padding_idx out of range");
    f.padding_idx = padding_idx[t];
  }
  return fields;
}

int64_t total_dim(const std::vector<moefast::EmbeddingField>& fields) {
  int64_t total = 0;
  for (const auto& f : fields) total += f.dim;
  return total;
}

void check_out(const Table& out, int64_t batch, int64_t dims, const char* what) {
  if (static_cast<int64_t>(out.shape(0)) != batch || static_cast<int64_t>(out.shape(1)) < dims) {
    throw std::invalid_argument(std::string(what) + " must be [batch, >= sum of dims]");
  }
}

void forward(const std::vector<Table>& weights, const std::vector<IdVector>& indices,
             const std::vector<std::optional<IdVector>>& offsets,
             const std::vector<std::optional<FloatVector>>& per_sample_weights,
             const std::vector<int>& poolings, const std::vector<int64_t>& padding_idx,
             const std::vector<std::string>& names, int64_t batch, Table out, int num_threads) {
  auto fields = make_fields(weights, indices, offsets, per_sample_weights, poolings, padding_idx, names, batch);
  check_out(out, batch, total_dim(fields), "out");
  const auto stride = static_cast<int64_t>(out.shape(1));
  nb::gil_scoped_release release;
  moefast::embedding_forward(fields, batch, out.data(), stride, num_threads);
}

std::vector<int64_t> backward_rows(
    const std::vector<Table>& weights, const std::vector<IdVector>& indices,
    const std::vector<std::optional<IdVector>>& offsets,
    const std::vector<std::optional<FloatVector>>& per_sample_weights,
    const std::vector<int>& poolings, const std::vector<int64_t>& padding_idx,
    const std::vector<std::string>& names, int64_t batch, Table grad_out,
    const std::vector<bool>& need, Int64Vector rows_out, FloatVector grads_out, int num_threads) {
  auto fields = make_fields(weights, indices, offsets, per_sample_weights, poolings, padding_idx, names, batch);
  check_out(grad_out, batch, total_dim(fields), "grad_out");
  if (need.size() != fields.size()) throw std::invalid_argument("need must have one entry per table");
  int64_t ids = 0, values = 0;
  for (const auto& f : fields) {
    ids += f.num_indices;
    values += f.num_indices * f.dim;
  }
  if (static_cast<int64_t>(rows_out.shape(0)) < ids || static_cast<int64_t>(grads_out.shape(0)) < values) {
    throw std::invalid_argument("rows_out / grads_out must hold sum(N) / sum(N * dim) entries");
  }
  const auto stride = static_cast<int64_t>(grad_out.shape(1));
  nb::gil_scoped_release release;
  return moefast::embedding_backward_rows(fields, batch, grad_out.data(), stride, need,
                                          rows_out.data(), grads_out.data(), num_threads);
}

void backward_update(
    const std::vector<Table>& weights, const std::vector<IdVector>& indices,
    const std::vector<std::optional<IdVector>>& offsets,
    const std::vector<std::optional<FloatVector>>& per_sample_weights,
    const std::vector<int>& poolings, const std::vector<int64_t>& padding_idx,
    const std::vector<std::string>& names, int64_t batch, Table grad_out,
    const std::vector<bool>& need, int kind, double lr, double eps, double beta1, double beta2,
    const std::vector<std::optional<FloatVector>>& state_sum,
    const std::vector<std::optional<Table>>& state_exp_avg,
    const std::vector<std::optional<Table>>& state_exp_avg_sq,
    const std::vector<std::optional<Int64Vector>>& state_step, int num_threads) {
  auto fields = make_fields(weights, indices, offsets, per_sample_weights, poolings, padding_idx, names, batch);
  check_out(grad_out, batch, total_dim(fields), "grad_out");
  const size_t n = fields.size();
  if (need.size() != n || state_sum.size() != n || state_exp_avg.size() != n ||
      state_exp_avg_sq.size() != n || state_step.size() != n) {
    throw std::invalid_argument("need and the state lists must have one entry per table");
  }
  if (kind != 0 && kind != 1) throw std::invalid_argument("unknown optimizer kind");
  moefast::OptimizerConfig config;
  config.kind = static_cast<moefast::OptimizerKind>(kind);
  config.lr = lr;
  config.eps = static_cast<float>(eps);
  config.beta1 = beta1;
  config.beta2 = beta2;
  std::vector<moefast::OptimizerState> states(n);
  for (size_t t = 0; t < n; ++t) {
    if (!need[t]) continue;
    const auto& f = fields[t];
    const std::string where = "field '" + f.name + "': optimizer state ";
    auto check_table = [&](const std::optional<Table>& a, const char* slot) -> float* {
      if (!a.has_value() || static_cast<int64_t>(a->shape(0)) != f.rows || static_cast<int64_t>(a->shape(1)) != f.dim) {
        throw std::invalid_argument(where + slot + " must be [rows, dim]");
      }
      return a->data();
    };
    if (config.kind == moefast::OptimizerKind::kRowwiseAdagrad) {
      if (!state_sum[t].has_value() || static_cast<int64_t>(state_sum[t]->shape(0)) != f.rows) {
        throw std::invalid_argument(where + "'sum' must be [rows]");
      }
      states[t].sum = state_sum[t]->data();
    } else {
      states[t].exp_avg = check_table(state_exp_avg[t], "'exp_avg'");
      states[t].exp_avg_sq = check_table(state_exp_avg_sq[t], "'exp_avg_sq'");
      if (!state_step[t].has_value() || static_cast<int64_t>(state_step[t]->shape(0)) != f.rows) {
        throw std::invalid_argument(where + "'step' must be [rows]");
      }
      states[t].step = state_step[t]->data();
    }
  }
  const auto stride = static_cast<int64_t>(grad_out.shape(1));
  nb::gil_scoped_release release;
  moefast::embedding_backward_update(fields, batch, grad_out.data(), stride, need, config, states,
                                     num_threads);
}

}  // namespace

NB_MODULE(_C, m) {
  m.doc() = "moefast native CPU kernels (sparse embedding engine).";
  m.def("core_build_info", &moefast::core_build_info,
        "How the hot static library was compiled, e.g. 'opt=-O3;optimize=speed;...'.");

  m.def("embedding_forward", &forward, "weights"_a.noconvert(), "indices"_a.noconvert(),
        "offsets"_a.noconvert(), "per_sample_weights"_a.noconvert(), "poolings"_a,
        "padding_idx"_a, "names"_a, "batch"_a, "out"_a.noconvert(), "num_threads"_a,
        "Table-batched lookup into out [batch, >= sum of dims] (float32). Spec: "
        "moefast.reference.embedding.embedding_collection. Pooling codes: 0 none, 1 sum, 2 mean; "
        "padding_idx -1 for none. ValueError names the field for an id out of range or bad offsets.");
  m.def("embedding_backward_rows", &backward_rows, "weights"_a.noconvert(),
        "indices"_a.noconvert(), "offsets"_a.noconvert(), "per_sample_weights"_a.noconvert(),
        "poolings"_a, "padding_idx"_a, "names"_a, "batch"_a, "grad_out"_a.noconvert(), "need"_a,
        "rows_out"_a.noconvert(), "grads_out"_a.noconvert(), "num_threads"_a,
        "Backward as unique rows: field t's sorted unique ids go to rows_out[sum of previous N:] "
        "and their summed gradients to grads_out[sum of previous N * dim:]; returns the count "
        "per field. Spec: moefast.reference.embedding.embedding_collection_row_grads.");
  m.def("embedding_backward_update", &backward_update, "weights"_a.noconvert(),
        "indices"_a.noconvert(), "offsets"_a.noconvert(), "per_sample_weights"_a.noconvert(),
        "poolings"_a, "padding_idx"_a, "names"_a, "batch"_a, "grad_out"_a.noconvert(), "need"_a,
        "kind"_a, "lr"_a, "eps"_a, "beta1"_a, "beta2"_a, "state_sum"_a.noconvert(),
        "state_exp_avg"_a.noconvert(), "state_exp_avg_sq"_a.noconvert(),
        "state_step"_a.noconvert(), "num_threads"_a,
        "Backward fused with a sparse optimizer (kind 0: row-wise Adagrad, 1: lazy Adam) that "
        "updates the rows seen in place. Spec: moefast.reference.embedding_optim.");
}
