// The table-batched sparse embedding engine (CPU): forward lookup, backward as unique rows, and
// fused sparse optimizers. Plain C++; the nanobind glue lives in bindings.cpp.
//
// Specification: moefast/reference/embedding.py (lookup, row gradients) and
// moefast/reference/embedding_optim.py (row-wise Adagrad, lazy Adam).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace moefast {

enum class Pooling : int { kNone = 0, kSum = 1, kMean = 2 };

// How a table's elements are stored. Lookups convert each element to fp32 exactly and pool in
// fp32; fused updates compute in fp32 and write half tables back with stochastic rounding.
enum class TableType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// One field of a batch. Pointers are borrowed for the duration of a call.
struct EmbeddingField {
  std::string name;
  void* weight = nullptr;  // [rows, dim], row-major, elements of `type`
  TableType type = TableType::kFloat32;
  // Identifies the table in the stochastic rounding bits (half tables): a stable function of
  // the field's name, the same on every rank and after a resume.
  uint64_t table_key = 0;
  int64_t rows = 0;
  int64_t dim = 0;
  const void* indices = nullptr;  // [num_indices] int32 or int64 (index_is_64)
  int64_t num_indices = 0;
  bool index_is_64 = true;
  const void* offsets = nullptr;  // [batch + 1], same dtype as indices; nullptr: one id per sample
  const float* per_sample_weights = nullptr;  // [num_indices] or nullptr
  Pooling pooling = Pooling::kNone;
  int64_t padding_idx = -1;  // an id that is skipped, or -1
};

// out[b, col_t : col_t + dim_t] = pooled rows of field t for sample b, for every field, where
// col_t is the sum of the previous fields' dims; out is [batch, out_stride] with
// out_stride >= sum of dims. Throws std::invalid_argument naming the field for an id out of
// range or inconsistent offsets (out is then partly written).
void embedding_forward(const std::vector<EmbeddingField>& fields, int64_t batch, float* out,
                       int64_t out_stride, int num_threads);

// The backward as unique rows. For each field t with need[t]: writes its unique ids (ascending,
// padding left out) to rows_out + row_base_t and their summed gradients to
// grads_out + grad_base_t ([count_t, dim_t]), where row_base_t = sum of num_indices of the
// previous fields and grad_base_t = sum of num_indices * dim of the previous fields (so the
// buffers must hold sum num_indices and sum num_indices * dim entries). Returns count_t per
// field (0 where !need[t]). grad_out is [batch, grad_stride], laid out as the forward output.
std::vector<int64_t> embedding_backward_rows(const std::vector<EmbeddingField>& fields,
                                             int64_t batch, const float* grad_out,
                                             int64_t grad_stride, const std::vector<bool>& need,
                                             int64_t* rows_out, float* grads_out,
                                             int num_threads);

enum class OptimizerKind : int { kRowwiseAdagrad = 0, kLazyAdam = 1 };

struct OptimizerConfig {
  OptimizerKind kind = OptimizerKind::kRowwiseAdagrad;
  double lr = 0.01;  // double: lazy Adam divides it by its bias correction in double
  float eps = 1e-8f;
  double beta1 = 0.9;
  double beta2 = 0.999;
  uint64_t seed = 0;  // of the stochastic rounding of half tables
};

// Per-table optimizer state (row-wise Adagrad: sum [rows]; lazy Adam: exp_avg and exp_avg_sq
// [rows, dim], step [rows]).
struct OptimizerState {
  float* sum = nullptr;
  float* exp_avg = nullptr;
  float* exp_avg_sq = nullptr;
  int64_t* step = nullptr;
};

// Backward fused with the optimizer: for each field t with need[t], sums the gradient of every
// unique row seen and updates that row of fields[t].weight and states[t] in place. Each row is
// owned by one task, so no atomics; the summation order is fixed (ascending position in the
// batch), so results do not depend on the thread count. Fields whose table is the same buffer
// (same pointer and shape) must have the same state; such a table is updated once per row with
// the gradient summed over its fields (each field's row sums added in field order). Any other
// overlap of the tables and states written throws std::invalid_argument (it would race).
//
// Half tables (fp16, bf16): each updated element is computed in fp32 from the stored value and
// rounded back stochastically; its random bits are half::element_bits(half::row_key(
// half::table_key(config.seed, table_key), row, step), column), where step is the row's new
// step count (lazy Adam) or, for row-wise Adagrad (no step count), the bits of the row's new
// accumulator in the upper 32 bits and a fold of its gradient in the lower 32 (see
// gradient_fold in embedding.cpp). Nothing else enters, so the result does not depend on the
// thread count, the rank or a resume.
void embedding_backward_update(const std::vector<EmbeddingField>& fields, int64_t batch,
                               const float* grad_out, int64_t grad_stride,
                               const std::vector<bool>& need, const OptimizerConfig& config,
                               const std::vector<OptimizerState>& states, int num_threads);

// Which clone of the kernels runs in this process: "avx512", "avx2" or "baseline".
const char* simd_level();

}  // namespace moefast
