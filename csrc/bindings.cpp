// The nanobind module moefast._C: bindings only; the logic lives in the other csrc/ files.
//
// Whole-batch tensors (out, grad_out, the row-gradient buffers) have their contracts declared in
// the signatures with .noconvert(): a wrong dtype, rank or device, or a non-contiguous tensor,
// is a TypeError before any C++ runs (never a silent copy). Per-field tensors arrive as
// pointers (see unpack_fields). Shape and value problems raise std::invalid_argument, which
// nanobind maps to ValueError. The GIL is released around the work.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "build_info.h"
#include "dropout.h"
#include "embedding.h"

namespace nb = nanobind;
using namespace nb::literals;

namespace {

using Table = nb::ndarray<float, nb::ndim<2>, nb::c_contig, nb::device::cpu>;
using FloatVector = nb::ndarray<float, nb::ndim<1>, nb::c_contig, nb::device::cpu>;
using Int64Vector = nb::ndarray<int64_t, nb::ndim<1>, nb::c_contig, nb::device::cpu>;

constexpr int64_t kMaxRowsOrIds = int64_t{1} << 32;  // ids and positions are packed in 32 bits
constexpr size_t kPointersPerField = 4;  // weight, indices, offsets, per_sample_weights
// rows, dim, num_indices, index_is_64, pooling, padding_idx, table type, table key
constexpr size_t kMetaPerField = 8;

// Why raw pointers for the per-field tensors: importing a torch tensor as an nb::ndarray costs
// about 3 us (DLPack), 150 us for the 52 tensors of a 26-field batch, as much as a 4096-row
// lookup; reading data_ptr() and checking dtype/contiguity/device in Python costs a tenth of
// that. moefast.ops.embedding packs and checks them (the only caller); the engine re-checks
// every value it reads through them (ids, offsets) and every size here.
std::vector<moefast::EmbeddingField> unpack_fields(const std::vector<uintptr_t>& pointers,
                                                   const std::vector<int64_t>& meta,
                                                   const std::vector<std::string>& names,
                                                   int64_t batch) {
  const size_t n = names.size();
  if (pointers.size() != n * kPointersPerField || meta.size() != n * kMetaPerField) {
    throw std::invalid_argument("pointers / meta must hold 4 / 8 entries per field");
  }
  if (batch < 0) throw std::invalid_argument("batch must be >= 0");
  std::vector<moefast::EmbeddingField> fields(n);
  for (size_t t = 0; t < n; ++t) {
    moefast::EmbeddingField& f = fields[t];
    const uintptr_t* p = pointers.data() + t * kPointersPerField;
    const int64_t* m = meta.data() + t * kMetaPerField;
    f.name = names[t];
    const std::string where = "field '" + f.name + "': ";
    f.weight = reinterpret_cast<void*>(p[0]);
    f.indices = reinterpret_cast<const void*>(p[1]);
    f.offsets = reinterpret_cast<const void*>(p[2]);
    f.per_sample_weights = reinterpret_cast<const float*>(p[3]);
    f.rows = m[0];
    f.dim = m[1];
    f.num_indices = m[2];
    f.index_is_64 = m[3] != 0;
    if (f.weight == nullptr || f.rows < 1 || f.dim < 1) throw std::invalid_argument(where + "empty table");
    if (f.rows >= kMaxRowsOrIds) throw std::invalid_argument(where + "tables of 2^32 rows or more are not supported");
    if (f.num_indices < 0 || f.num_indices >= kMaxRowsOrIds) {
      throw std::invalid_argument(where + "2^32 or more ids in one call are not supported");
    }
    if (f.indices == nullptr && f.num_indices > 0) throw std::invalid_argument(where + "no indices");
    if (m[4] < 0 || m[4] > 2) throw std::invalid_argument(where + "unknown pooling");
    f.pooling = static_cast<moefast::Pooling>(m[4]);
    if ((f.pooling == moefast::Pooling::kNone) != (f.offsets == nullptr)) {
      throw std::invalid_argument(where + "offsets are needed exactly for pooled fields");
    }
    if (f.offsets == nullptr && f.num_indices != batch) {
      throw std::invalid_argument(where + "a single-valued field needs one id per sample");
    }
    if (f.per_sample_weights != nullptr && f.pooling == moefast::Pooling::kMean) {
      throw std::invalid_argument(where + "per_sample_weights need sum pooling");
    }
    if (m[5] < -1 || m[5] >= f.rows) throw std::invalid_argument(where + "padding_idx out of range");
    f.padding_idx = m[5];
    if (m[6] < 0 || m[6] > 2) throw std::invalid_argument(where + "unknown table type");
    f.type = static_cast<moefast::TableType>(m[6]);
    f.table_key = static_cast<uint64_t>(m[7]);
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

void forward(const std::vector<uintptr_t>& pointers, const std::vector<int64_t>& meta,
             const std::vector<std::string>& names, int64_t batch, Table out, int num_threads) {
  auto fields = unpack_fields(pointers, meta, names, batch);
  check_out(out, batch, total_dim(fields), "out");
  const auto stride = static_cast<int64_t>(out.shape(1));
  nb::gil_scoped_release release;
  moefast::embedding_forward(fields, batch, out.data(), stride, num_threads);
}

std::vector<int64_t> backward_rows(const std::vector<uintptr_t>& pointers,
                                   const std::vector<int64_t>& meta,
                                   const std::vector<std::string>& names, int64_t batch,
                                   Table grad_out, const std::vector<bool>& need,
                                   Int64Vector rows_out, FloatVector grads_out, int num_threads) {
  auto fields = unpack_fields(pointers, meta, names, batch);
  check_out(grad_out, batch, total_dim(fields), "grad_out");
  if (need.size() != fields.size()) throw std::invalid_argument("need must have one entry per field");
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

void backward_update(const std::vector<uintptr_t>& pointers, const std::vector<int64_t>& meta,
                     const std::vector<std::string>& names, int64_t batch, Table grad_out,
                     const std::vector<bool>& need, int kind, double lr, double eps,
                     double beta1, double beta2, uint64_t seed,
                     const std::vector<uintptr_t>& state_pointers, int num_threads) {
  auto fields = unpack_fields(pointers, meta, names, batch);
  check_out(grad_out, batch, total_dim(fields), "grad_out");
  const size_t n = fields.size();
  if (need.size() != n || state_pointers.size() != 4 * n) {
    throw std::invalid_argument("need / state_pointers must hold 1 / 4 entries per field");
  }
  if (kind != 0 && kind != 1) throw std::invalid_argument("unknown optimizer kind");
  moefast::OptimizerConfig config;
  config.kind = static_cast<moefast::OptimizerKind>(kind);
  config.lr = lr;
  config.eps = static_cast<float>(eps);
  config.beta1 = beta1;
  config.beta2 = beta2;
  config.seed = seed;
  std::vector<moefast::OptimizerState> states(n);
  for (size_t t = 0; t < n; ++t) {
    if (!need[t]) continue;
    const uintptr_t* p = state_pointers.data() + 4 * t;
    states[t].sum = reinterpret_cast<float*>(p[0]);
    states[t].exp_avg = reinterpret_cast<float*>(p[1]);
    states[t].exp_avg_sq = reinterpret_cast<float*>(p[2]);
    states[t].step = reinterpret_cast<int64_t*>(p[3]);
    const bool ok = config.kind == moefast::OptimizerKind::kRowwiseAdagrad
                        ? states[t].sum != nullptr
                        : states[t].exp_avg && states[t].exp_avg_sq && states[t].step;
    if (!ok) throw std::invalid_argument("field '" + fields[t].name + "': missing optimizer state");
  }
  const auto stride = static_cast<int64_t>(grad_out.shape(1));
  nb::gil_scoped_release release;
  moefast::embedding_backward_update(fields, batch, grad_out.data(), stride, need, config, states,
                                     num_threads);
}

void dropout_mask(nb::ndarray<uint8_t, nb::ndim<1>, nb::c_contig, nb::device::cpu> state, FloatVector out,
                  uint32_t keep_below, float scale) {
  uint8_t* bytes = state.data();
  const size_t size = state.shape(0);
  float* data = out.data();
  const int64_t n = static_cast<int64_t>(out.shape(0));
  nb::gil_scoped_release release;
  moefast::dropout_mask_from_torch_state(bytes, size, data, n, keep_below, scale);
}

}  // namespace

NB_MODULE(_C, m) {
  m.doc() = "moefast native CPU kernels (sparse embedding engine, dropout masks).";
  m.def("core_build_info", &moefast::core_build_info,
        "How the hot static library was compiled, e.g. 'opt=-O3;optimize=speed;...'.");

  // Per-field tensors arrive as data pointers plus sizes (see unpack_fields); only
  // moefast.ops.embedding calls these, after checking dtype, contiguity and device.
  m.def("embedding_forward", &forward, "pointers"_a, "meta"_a, "names"_a, "batch"_a,
        "out"_a.noconvert(), "num_threads"_a,
        "Table-batched lookup into out [batch, >= sum of dims] (float32). Spec: "
        "moefast.reference.embedding.embedding_collection. Per field, pointers = (weight, "
        "indices, offsets or 0, per_sample_weights or 0) and meta = (rows, dim, num_indices, "
        "index_is_64, pooling 0 none / 1 sum / 2 mean, padding_idx or -1, table type 0 float32 / "
        "1 float16 / 2 bfloat16, table key). Half tables are pooled in float32. ValueError names "
        "the field for an id out of range or inconsistent offsets.");
  m.def("embedding_backward_rows", &backward_rows, "pointers"_a, "meta"_a, "names"_a, "batch"_a,
        "grad_out"_a.noconvert(), "need"_a, "rows_out"_a.noconvert(), "grads_out"_a.noconvert(),
        "num_threads"_a,
        "Backward as unique rows: field t's sorted unique ids go to rows_out[sum of previous N:] "
        "and their summed gradients to grads_out[sum of previous N * dim:]; returns the count "
        "per field. Spec: moefast.reference.embedding.embedding_collection_row_grads.");
  m.def("embedding_backward_update", &backward_update, "pointers"_a, "meta"_a, "names"_a,
        "batch"_a, "grad_out"_a.noconvert(), "need"_a, "kind"_a, "lr"_a, "eps"_a, "beta1"_a,
        "beta2"_a, "seed"_a, "state_pointers"_a, "num_threads"_a,
        "Backward fused with a sparse optimizer (kind 0: row-wise Adagrad with state_pointers "
        "(sum, 0, 0, 0) per field; 1: lazy Adam with (0, exp_avg, exp_avg_sq, step)) that "
        "updates the rows seen in place; half tables are rounded back stochastically with bits "
        "drawn from seed. Spec: moefast.reference.embedding_optim.");
  m.def("simd_level", &moefast::simd_level,
        "The clone of the engine's kernels this process runs: 'avx512', 'avx2' or 'baseline' "
        "(chosen once from the CPU and MOEFAST_DISABLE_AVX512 / MOEFAST_DISABLE_AVX2).");
  m.def("dropout_mask", &dropout_mask, "state"_a.noconvert(), "out"_a.noconvert(), "keep_below"_a,
        "scale"_a,
        "Fills out (float32) with the dropout factors torch.rand(out.numel()) < keep would draw "
        "from the CPU generator whose get_state() bytes are state (uint8 [5056]), advancing "
        "those bytes as torch would: out[i] = scale where draw i's 24 bits are below keep_below, "
        "else 0. Spec: moefast.ops.dropout.");
}
