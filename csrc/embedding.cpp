#include "embedding.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <stdexcept>

#include "cpu_features.h"
#include "half.h"
#include "thread_pool.h"

// 32- and 64-byte vectors passed between always-inline helpers: GCC notes an ABI change that
// cannot matter here (nothing with these types crosses a translation unit).
#pragma GCC diagnostic ignored "-Wpsabi"

namespace moefast {
namespace {

// How far ahead rows are prefetched, in bytes of rows (so in rows: bytes / row size, at least
// kMinRowsAhead). A plain gather loop ran about 3x slower than torch's FBGEMM kernel on a 1e6 x 16
// table until rows were prefetched (NOTES.md). On the 26-field benchmark (one thread,
// interleaved with torch, loaded machine) dim 16 ran best 64 rows ahead (4 KiB); counting in
// rows, dim 64 at 64 rows ahead (16 KiB, far more lines than the core tracks) ran 2x slower
// than torch.
constexpr int64_t kForwardPrefetchBytes = 4096;
constexpr int64_t kMinRowsAhead = 4;

// Counted in whole cache lines per row: a row smaller than a line (dim-1 first-order weights)
// still costs a line per random id, and counting its 4 bytes would put the prefetch 1024 rows
// ahead, far past what the core keeps in flight.
inline int64_t rows_ahead(int64_t bytes, int64_t dim, int64_t element_size = sizeof(float)) {
  constexpr int64_t kLine = 64;
  const int64_t row_bytes = dim * element_size;
  const int64_t lines = (row_bytes + kLine - 1) / kLine;
  return std::max<int64_t>(kMinRowsAhead, bytes / (lines * kLine));
}

// Lookups per forward task: small enough to balance 26 uneven fields over the threads, large
// enough that the dynamic hand-out (one atomic add) costs nothing.
constexpr int64_t kLookupsPerTask = 2048;
constexpr int64_t kCacheLine = 64;
// Backward: bytes of rows ahead of the current unique row whose weight and state rows are
// prefetched (at dim 16, 32 rows ran 1.07x FBGEMM's fused row-wise Adagrad step on one thread
// where 16 rows ran 0.97x), and of gradient rows ahead of the current position.
constexpr int64_t kUpdatePrefetchBytes = 2048;
constexpr int64_t kGradPrefetchBytes = 1024;

template <typename Idx>
inline int64_t load(const void* p, int64_t i) {
  return static_cast<int64_t>(static_cast<const Idx*>(p)[i]);
}

template <typename T>
inline void prefetch_row(const T* row, int64_t dim) {
  const char* p = reinterpret_cast<const char*>(row);
  for (int64_t byte = 0; byte < dim * static_cast<int64_t>(sizeof(T)); byte += kCacheLine) {
    __builtin_prefetch(p + byte, 0, 3);
  }
}

template <typename T>
inline void prefetch_row_for_write(const T* row, int64_t dim) {
  const char* p = reinterpret_cast<const char*>(row);
  for (int64_t byte = 0; byte < dim * static_cast<int64_t>(sizeof(T)); byte += kCacheLine) {
    __builtin_prefetch(p + byte, 1, 3);
  }
}

// The forward accumulates each bag in Vec4 lanes (16-byte vectors: SSE2, in every x86-64 and
// aarch64 build). Why explicit vectors: with a float[kDim] accumulator, zeroed by narrower
// stores and read back by 16-byte loads, every row of dim 32 or 64 paid store-to-load
// forwarding stalls (about 24 ns per row against torch's 6 ns); dim 16 stayed in registers.
typedef float Vec4 __attribute__((vector_size(16)));

inline Vec4 load4(const float* p) {
  Vec4 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

inline void store4(float* p, Vec4 v) { std::memcpy(p, &v, sizeof(v)); }

// 8-float lanes for the AVX2 clone of the forward (x86-64 only, chosen at run time): same
// per-element additions in the same order as Vec4, so results are identical on either path.
typedef float Vec8 __attribute__((vector_size(32)));
// 16-float lanes for the AVX-512 clone.
typedef float Vec16 __attribute__((vector_size(64)));

template <int kWidth>
struct Lanes;
// Dim 1 (the first-order weights of DeepFM / WDL): one scalar accumulator in a register.
template <>
struct Lanes<1> {
  using type = float;
};
template <>
struct Lanes<4> {
  using type = Vec4;
};
template <>
struct Lanes<8> {
  using type = Vec8;
};
template <>
struct Lanes<16> {
  using type = Vec16;
};

template <typename V>
inline V load_lanes(const float* p) {
  V v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

template <typename V>
inline void store_lanes(float* p, V v) {
  std::memcpy(p, &v, sizeof(v));
}

// Which clone a kernel is compiled into (its template argument kIsa): what the fp16 lane loads
// may use.
constexpr int kIsaBaseline = 0;
constexpr int kIsaAvx2 = 1;    // + F16C
constexpr int kIsaAvx512 = 2;  // + AVX-512 F, BW, VL

// Table element types: the stored type, its exact conversion to fp32 (scalar and kWidth lanes),
// and for half types the stochastic rounding back.
struct Float32Table {
  using Raw = float;
  static constexpr bool kHalf = false;
  static float to_float(float x) { return x; }
  template <typename V, int kIsa>
  MOEFAST_INLINE static V load(const float* p) {
    if constexpr (sizeof(V) == sizeof(float)) {
      return *p;
    } else {
      return load_lanes<V>(p);
    }
  }
};

// kWidth uint16 / uint32 lanes, for the half types' conversions.
template <int kWidth>
struct HalfLanes {
  typedef uint16_t U16 __attribute__((vector_size(2 * kWidth)));
  typedef uint32_t U32 __attribute__((vector_size(4 * kWidth)));
};

template <typename V>
MOEFAST_INLINE typename HalfLanes<sizeof(V) / sizeof(float)>::U32 load_u32_lanes(const uint16_t* p) {
  using L = HalfLanes<sizeof(V) / sizeof(float)>;
  typename L::U16 h;
  std::memcpy(&h, p, sizeof h);
  return __builtin_convertvector(h, typename L::U32);
}

template <typename V, typename U>
MOEFAST_INLINE V bitcast_lanes(U u) {
  static_assert(sizeof(V) == sizeof(U), "lane sizes differ");
  V v;
  std::memcpy(&v, &u, sizeof v);
  return v;
}

struct BFloat16Table {
  using Raw = uint16_t;
  static constexpr bool kHalf = true;
  static float to_float(uint16_t x) { return half::bf16_to_float(x); }
  static uint16_t round(float x, uint64_t bits) { return half::round_bf16(x, bits); }
  template <typename V, int kIsa>
  MOEFAST_INLINE static V load(const uint16_t* p) {
    if constexpr (sizeof(V) == sizeof(float)) {
      return to_float(*p);
    } else {
      return bitcast_lanes<V>(load_u32_lanes<V>(p) << 16);
    }
  }
};

struct Float16Table {
  using Raw = uint16_t;
  static constexpr bool kHalf = true;
  static float to_float(uint16_t x) { return half::f16_to_float(x); }
  static uint16_t round(float x, uint64_t bits) { return half::round_f16(x, bits); }
  template <typename V, int kIsa>
  MOEFAST_INLINE static V load(const uint16_t* p) {
    constexpr int kWidth = sizeof(V) / sizeof(float);
    if constexpr (kWidth == 1) {
      return to_float(*p);
    } else if constexpr (kIsa >= kIsaAvx2 && kWidth == 4) {
      // F16C's vcvtph2ps, in inline assembly: its intrinsic cannot be inlined into the generic
      // kernel template (the template has no target attribute), the assembly can; it only runs
      // in the clones, whose targets include F16C (or AVX-512 F for 16 lanes).
      uint64_t h;
      std::memcpy(&h, p, sizeof h);
      typedef uint64_t U64x2 __attribute__((vector_size(16)));
      const U64x2 in = {h, 0};
      V out;
      asm("vcvtph2ps %1, %0" : "=x"(out) : "x"(in));
      return out;
    } else if constexpr (kIsa >= kIsaAvx2 && kWidth == 8) {
      typename HalfLanes<8>::U16 in;
      std::memcpy(&in, p, sizeof in);
      V out;
      asm("vcvtph2ps %1, %0" : "=x"(out) : "x"(in));
      return out;
    } else if constexpr (kIsa >= kIsaAvx512 && kWidth == 16) {
      typename HalfLanes<16>::U16 in;
      std::memcpy(&in, p, sizeof in);
      V out;
      asm("vcvtph2ps %1, %0" : "=v"(out) : "v"(in));
      return out;
    } else {
      // half::f16_to_float in lanes (the baseline: no F16C).
      using U32 = typename HalfLanes<kWidth>::U32;
      const U32 h = load_u32_lanes<V>(p);
      const U32 sign = (h & 0x8000u) << 16;
      const U32 em = h & 0x7fffu;
      const U32 shifted = em << 13;
      const U32 normal = bitcast_lanes<U32>(bitcast_lanes<V>(shifted) * 0x1p112f);
      const U32 special = shifted | 0x7f800000u | ((U32)(em > 0x7c00u) & 0x00400000u);
      const U32 is_special = (U32)(em >= 0x7c00u);
      return bitcast_lanes<V>(((special & is_special) | (normal & ~is_special)) | sign);
    }
  }
};

// acc[0:dim] += w * row[0:dim], for the generic (runtime dim) paths.
template <int kDim>
inline void axpy(float* __restrict__ acc, const float* __restrict__ row, float w, int64_t dim) {
  const int64_t n = kDim > 0 ? kDim : dim;
  for (int64_t d = 0; d < n; ++d) acc[d] += w * row[d];
}

template <typename S>
inline void axpy_table(float* __restrict__ acc, const typename S::Raw* __restrict__ row, float w,
                       int64_t dim) {
  for (int64_t d = 0; d < dim; ++d) acc[d] += w * S::to_float(row[d]);
}

// The first error seen per field; reported in field order after the parallel region.
class FieldErrors {
 public:
  explicit FieldErrors(size_t n) : messages_(n) {}
  void set(size_t field, std::string message) {
    std::lock_guard<std::mutex> lock(mutex_);
    if (messages_[field].empty()) messages_[field] = std::move(message);
  }
  void throw_first() const {
    for (const auto& m : messages_) {
      if (!m.empty()) throw std::invalid_argument(m);
    }
  }

 private:
  std::mutex mutex_;
  std::vector<std::string> messages_;
};

std::string quoted(const std::string& name) { return "field '" + name + "'"; }

std::string id_error(const EmbeddingField& f, int64_t id) {
  return quoted(f.name) + ": id " + std::to_string(id) + " outside [0, " +
         std::to_string(f.rows) + ")";
}

std::string offsets_error(const EmbeddingField& f, const std::string& what) {
  return quoted(f.name) + ": offsets must start at 0, never decrease and end at len(indices) = " +
         std::to_string(f.num_indices) + "; " + what;
}

// O(1) per field, before any task reads indices through the offsets.
template <typename Idx>
void check_offset_ends(const EmbeddingField& f, int64_t batch) {
  if (f.offsets == nullptr) {
    if (f.num_indices != batch) {
      throw std::invalid_argument(quoted(f.name) + ": a single-valued field needs one id per sample");
    }
    return;
  }
  const int64_t first = load<Idx>(f.offsets, 0);
  const int64_t last = load<Idx>(f.offsets, batch);
  if (first != 0 || last != f.num_indices) {
    throw std::invalid_argument(offsets_error(
        f, "got first " + std::to_string(first) + ", last " + std::to_string(last)));
  }
}

void check_offset_ends(const EmbeddingField& f, int64_t batch) {
  if (f.index_is_64) {
    check_offset_ends<int64_t>(f, batch);
  } else {
    check_offset_ends<int32_t>(f, batch);
  }
}

// Checks offsets[b0..b1] are within [0, N] and non-decreasing, so that every read of indices
// through them is in bounds even before the other tasks have checked their own ranges.
template <typename Idx>
bool check_offset_range(const EmbeddingField& f, int64_t b0, int64_t b1, std::string* error) {
  int64_t previous = load<Idx>(f.offsets, b0);
  if (previous < 0 || previous > f.num_indices) {
    *error = offsets_error(f, "got offsets[" + std::to_string(b0) + "] = " + std::to_string(previous));
    return false;
  }
  for (int64_t b = b0 + 1; b <= b1; ++b) {
    const int64_t v = load<Idx>(f.offsets, b);
    if (v < previous || v > f.num_indices) {
      *error = offsets_error(f, "got offsets[" + std::to_string(b) + "] = " + std::to_string(v) +
                                    " after " + std::to_string(previous));
      return false;
    }
    previous = v;
  }
  return true;
}

// ---------------------------------------------------------------------------------------------
// Forward

struct ForwardTask {
  int field;
  int64_t b0;
  int64_t b1;
};

// Pools bags [b0, b1) of one field into out[:, col : col + dim], the table's elements of type S
// converted exactly to fp32 and accumulated in fp32. kDim > 0 fixes the dim at compile time so
// the accumulator lives in registers; kDim == 0 is the generic loop.
template <typename Idx, int kDim, int kWidth = 4, typename S = Float32Table, int kIsa = kIsaBaseline>
__attribute__((always_inline)) inline bool pool_bags(const EmbeddingField& f, int64_t b0,
                                                     int64_t b1, float* out, int64_t stride,
                                                     std::string* error) {
  using V = typename Lanes<kWidth>::type;
  using Raw = typename S::Raw;
  static_assert(kDim % kWidth == 0, "kDim must be a multiple of the lane width");
  const int64_t dim = kDim > 0 ? kDim : f.dim;
  const auto rows = static_cast<uint64_t>(f.rows);
  const Raw* weight = static_cast<const Raw*>(f.weight);
  const float* psw = f.per_sample_weights;
  const bool mean = f.pooling == Pooling::kMean;
  if (f.offsets != nullptr && !check_offset_range<Idx>(f, b0, b1, error)) return false;
  const int64_t j_end = f.offsets != nullptr ? load<Idx>(f.offsets, b1) : b1;
  const int64_t ahead_rows = rows_ahead(kForwardPrefetchBytes, dim, sizeof(Raw));

  // kDim > 0: the accumulator is kDim / kWidth vectors; kDim == 0: scalars.
  constexpr int kLanes = kDim > 0 ? kDim / kWidth : 1;
  thread_local std::vector<float> dynamic_acc;
  if (kDim == 0) dynamic_acc.resize(static_cast<size_t>(dim));
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t start = f.offsets != nullptr ? load<Idx>(f.offsets, b) : b;
    const int64_t end = f.offsets != nullptr ? load<Idx>(f.offsets, b + 1) : b + 1;
    V acc[kLanes];
    for (int l = 0; l < kLanes; ++l) acc[l] = V{} ;
    if (kDim == 0) std::fill(dynamic_acc.begin(), dynamic_acc.end(), 0.0f);
    int64_t count = 0;
    for (int64_t j = start; j < end; ++j) {
      if (j + ahead_rows < j_end) {
        const auto ahead = static_cast<uint64_t>(load<Idx>(f.indices, j + ahead_rows));
        if (ahead < rows) prefetch_row(weight + ahead * dim, dim);
      }
      const int64_t id = load<Idx>(f.indices, j);
      if (static_cast<uint64_t>(id) >= rows) {  // one compare catches negative ids too
        *error = id_error(f, id);
        return false;
      }
      if (id == f.padding_idx) continue;
      const float w = psw != nullptr ? psw[j] : 1.0f;
      const Raw* row = weight + id * dim;
      if (kDim > 0 && psw == nullptr) {  // unweighted: no multiply (16 fewer per row at dim 64)
        for (int l = 0; l < kLanes; ++l) acc[l] += S::template load<V, kIsa>(row + kWidth * l);
      } else if (kDim > 0) {
        for (int l = 0; l < kLanes; ++l) acc[l] += w * S::template load<V, kIsa>(row + kWidth * l);
      } else {
        axpy_table<S>(dynamic_acc.data(), row, w, dim);
      }
      ++count;
    }
    const float scale = (mean && count > 0) ? 1.0f / static_cast<float>(count) : 1.0f;
    float* o = out + b * stride;
    if (kDim > 0) {
      for (int l = 0; l < kLanes; ++l) store_lanes<V>(o + kWidth * l, acc[l] * scale);
    } else {
      for (int64_t d = 0; d < dim; ++d) o[d] = dynamic_acc[d] * scale;
    }
  }
  return true;
}

template <typename Idx, typename S>
MOEFAST_INLINE bool pool_bags_dispatch(const EmbeddingField& f, int64_t b0, int64_t b1, float* out,
                                       int64_t stride, std::string* error) {
  switch (f.dim) {
    case 1: return pool_bags<Idx, 1, 1, S>(f, b0, b1, out, stride, error);
    case 4: return pool_bags<Idx, 4, 4, S>(f, b0, b1, out, stride, error);
    case 8: return pool_bags<Idx, 8, 4, S>(f, b0, b1, out, stride, error);
    case 16: return pool_bags<Idx, 16, 4, S>(f, b0, b1, out, stride, error);
    case 32: return pool_bags<Idx, 32, 4, S>(f, b0, b1, out, stride, error);
    case 64: return pool_bags<Idx, 64, 4, S>(f, b0, b1, out, stride, error);
    case 128: return pool_bags<Idx, 128, 4, S>(f, b0, b1, out, stride, error);
    default: return pool_bags<Idx, 0, 4, S>(f, b0, b1, out, stride, error);
  }
}

// One entry point per clone and index type; the table type is a switch inside.
template <typename Idx>
bool pool_bags_baseline(const EmbeddingField& f, int64_t b0, int64_t b1, float* out,
                        int64_t stride, std::string* error) {
  switch (f.type) {
    case TableType::kFloat16: return pool_bags_dispatch<Idx, Float16Table>(f, b0, b1, out, stride, error);
    case TableType::kBFloat16: return pool_bags_dispatch<Idx, BFloat16Table>(f, b0, b1, out, stride, error);
    default: return pool_bags_dispatch<Idx, Float32Table>(f, b0, b1, out, stride, error);
  }
}

#ifdef MOEFAST_AVX2_CLONES
// The same kernels compiled for AVX2 (8-float lanes; fp16 rows converted by F16C), picked at run
// time: the shipped build targets baseline x86-64 (no -march), where a dim-64 row is 16 vector
// adds instead of 8. Same per-element additions in the same order: identical results.
template <typename Idx, typename S>
MOEFAST_INLINE bool pool_bags_dispatch_avx2(const EmbeddingField& f, int64_t b0, int64_t b1,
                                            float* out, int64_t stride, std::string* error) {
  switch (f.dim) {
    case 8: return pool_bags<Idx, 8, 8, S, kIsaAvx2>(f, b0, b1, out, stride, error);
    case 16: return pool_bags<Idx, 16, 8, S, kIsaAvx2>(f, b0, b1, out, stride, error);
    case 32: return pool_bags<Idx, 32, 8, S, kIsaAvx2>(f, b0, b1, out, stride, error);
    case 64: return pool_bags<Idx, 64, 8, S, kIsaAvx2>(f, b0, b1, out, stride, error);
    case 128: return pool_bags<Idx, 128, 8, S, kIsaAvx2>(f, b0, b1, out, stride, error);
    case 4: return pool_bags<Idx, 4, 4, S, kIsaAvx2>(f, b0, b1, out, stride, error);
    default: return pool_bags_dispatch<Idx, S>(f, b0, b1, out, stride, error);
  }
}

template <typename Idx>
__attribute__((target(MOEFAST_TARGET_AVX2))) bool pool_bags_avx2(const EmbeddingField& f, int64_t b0,
                                                                 int64_t b1, float* out, int64_t stride,
                                                                 std::string* error) {
  switch (f.type) {
    case TableType::kFloat16: return pool_bags_dispatch_avx2<Idx, Float16Table>(f, b0, b1, out, stride, error);
    case TableType::kBFloat16: return pool_bags_dispatch_avx2<Idx, BFloat16Table>(f, b0, b1, out, stride, error);
    default: return pool_bags_dispatch_avx2<Idx, Float32Table>(f, b0, b1, out, stride, error);
  }
}

// AVX-512 (16-float lanes) for dims of 16 and more; Zen 4 runs each 512-bit op as two 256-bit
// halves, so it can only win where instruction count, not memory latency, limits the loop
// (docs/performance.md has the measurement).
template <typename Idx, typename S>
MOEFAST_INLINE bool pool_bags_dispatch_avx512(const EmbeddingField& f, int64_t b0, int64_t b1,
                                              float* out, int64_t stride, std::string* error) {
  switch (f.dim) {
    case 16: return pool_bags<Idx, 16, 16, S, kIsaAvx512>(f, b0, b1, out, stride, error);
    case 32: return pool_bags<Idx, 32, 16, S, kIsaAvx512>(f, b0, b1, out, stride, error);
    case 64: return pool_bags<Idx, 64, 16, S, kIsaAvx512>(f, b0, b1, out, stride, error);
    case 128: return pool_bags<Idx, 128, 16, S, kIsaAvx512>(f, b0, b1, out, stride, error);
    default: return pool_bags_dispatch_avx2<Idx, S>(f, b0, b1, out, stride, error);
  }
}

template <typename Idx>
__attribute__((target(MOEFAST_TARGET_AVX512))) bool pool_bags_avx512(
    const EmbeddingField& f, int64_t b0, int64_t b1, float* out, int64_t stride, std::string* error) {
  switch (f.type) {
    case TableType::kFloat16: return pool_bags_dispatch_avx512<Idx, Float16Table>(f, b0, b1, out, stride, error);
    case TableType::kBFloat16: return pool_bags_dispatch_avx512<Idx, BFloat16Table>(f, b0, b1, out, stride, error);
    default: return pool_bags_dispatch_avx512<Idx, Float32Table>(f, b0, b1, out, stride, error);
  }
}

const bool kHasAvx2 = use_avx2_clones();
const bool kHasAvx512 = use_avx512_clones();

template <typename Idx>
bool pool_bags_best(const EmbeddingField& f, int64_t b0, int64_t b1, float* out, int64_t stride,
                    std::string* error) {
  if (kHasAvx512) return pool_bags_avx512<Idx>(f, b0, b1, out, stride, error);
  if (kHasAvx2) return pool_bags_avx2<Idx>(f, b0, b1, out, stride, error);
  return pool_bags_baseline<Idx>(f, b0, b1, out, stride, error);
}
#else
template <typename Idx>
bool pool_bags_best(const EmbeddingField& f, int64_t b0, int64_t b1, float* out, int64_t stride,
                    std::string* error) {
  return pool_bags_baseline<Idx>(f, b0, b1, out, stride, error);
}
#endif

// ---------------------------------------------------------------------------------------------
// Backward: sort (id, position) pairs by id, then sum each id's gradient in one task.

struct Scratch {
  std::vector<uint64_t> keys;  // (id << 32) | position, sorted by id, positions ascending
  std::vector<uint64_t> tmp;
  std::vector<uint32_t> bag_of;  // position -> sample (pooled fields)
  std::vector<float> inv_count;  // sample -> 1 / number of non-padding ids (mean pooling)
  std::vector<uint32_t> slot_of;  // position -> index of its id among the unique ids
  std::vector<int64_t> unique_ids;  // ascending
  std::vector<float> sums;  // [unique, dim] summed gradients (fused optimizer path)
};

// Stable LSD radix sort of keys[0, n) on the id bits (32 and up), 8 bits per pass; a pass whose
// digit is the same for every key is skipped. Positions start ascending and stay so within an id,
// which fixes the summation order.
void radix_sort_by_id(Scratch& s, int64_t n, uint64_t max_id) {
  int id_bits = 0;
  while (id_bits < 32 && (max_id >> id_bits) != 0) ++id_bits;
  s.tmp.resize(static_cast<size_t>(n));
  uint64_t* src = s.keys.data();
  uint64_t* dst = s.tmp.data();
  for (int shift = 32; shift < 32 + id_bits; shift += 8) {
    int64_t count[257] = {0};
    for (int64_t i = 0; i < n; ++i) ++count[((src[i] >> shift) & 0xff) + 1];
    bool trivial = false;
    for (int digit = 1; digit <= 256; ++digit) {
      if (count[digit] == n) trivial = true;
    }
    if (trivial) continue;
    for (int digit = 0; digit < 256; ++digit) count[digit + 1] += count[digit];
    for (int64_t i = 0; i < n; ++i) dst[count[(src[i] >> shift) & 0xff]++] = src[i];
    std::swap(src, dst);
  }
  if (src != s.keys.data()) std::memcpy(s.keys.data(), src, static_cast<size_t>(n) * sizeof(uint64_t));
}

// Fills s with the sorted keys of one field; returns how many (padding left out) or -1 on error.
template <typename Idx>
int64_t sort_field(const EmbeddingField& f, int64_t batch, Scratch& s, std::string* error) {
  const int64_t n = f.num_indices;
  const auto rows = static_cast<uint64_t>(f.rows);
  if (f.offsets != nullptr) {
    if (!check_offset_range<Idx>(f, 0, batch, error)) return -1;
    s.bag_of.resize(static_cast<size_t>(n));
    if (f.pooling == Pooling::kMean) s.inv_count.resize(static_cast<size_t>(batch));
    for (int64_t b = 0; b < batch; ++b) {
      const int64_t start = load<Idx>(f.offsets, b);
      const int64_t end = load<Idx>(f.offsets, b + 1);
      int64_t count = 0;
      for (int64_t j = start; j < end; ++j) {
        s.bag_of[j] = static_cast<uint32_t>(b);
        count += load<Idx>(f.indices, j) != f.padding_idx;
      }
      if (f.pooling == Pooling::kMean) {
        s.inv_count[b] = count > 0 ? 1.0f / static_cast<float>(count) : 0.0f;
      }
    }
  }
  s.keys.resize(static_cast<size_t>(n));
  int64_t kept = 0;
  uint64_t max_id = 0;
  for (int64_t j = 0; j < n; ++j) {
    const int64_t id = load<Idx>(f.indices, j);
    if (static_cast<uint64_t>(id) >= rows) {
      *error = id_error(f, id);
      return -1;
    }
    if (id == f.padding_idx) continue;
    max_id = std::max(max_id, static_cast<uint64_t>(id));
    s.keys[kept++] = (static_cast<uint64_t>(id) << 32) | static_cast<uint64_t>(j);
  }
  radix_sort_by_id(s, kept, max_id);
  return kept;
}

int64_t sort_field(const EmbeddingField& f, int64_t batch, Scratch& s, std::string* error) {
  return f.index_is_64 ? sort_field<int64_t>(f, batch, s, error)
                       : sort_field<int32_t>(f, batch, s, error);
}

// Sums the gradient of every unique id of the sorted keys into sums [unique, dim] (row u for
// unique_ids[u]): sums[u] = sum over the id's positions j of scale_j * grad_out[sample_j, :dim],
// added in ascending j. Returns the number of unique ids.
//
// Why not sum each id's positions straight from the sorted keys: that reads grad_out rows in
// random order (6.8 MB for 26 fields x 4096 samples, an L3 miss each), which measured slower
// than the whole forward. Here grad_out is read in position order (a strided stream) and the
// random accesses go to sums, which for one field fits in L2.
template <int kDim>
MOEFAST_INLINE int64_t sum_rows(const EmbeddingField& f, Scratch& s, int64_t n, const float* grad_out,
                 int64_t stride, float* sums) {
  const int64_t dim = kDim > 0 ? kDim : f.dim;
  const bool pooled = f.offsets != nullptr;
  const bool mean = f.pooling == Pooling::kMean;
  const float* psw = f.per_sample_weights;
  constexpr uint32_t kNoSlot = 0xffffffffu;
  s.slot_of.assign(static_cast<size_t>(f.num_indices), kNoSlot);  // padding keeps kNoSlot
  s.unique_ids.clear();
  for (int64_t i = 0; i < n; ++i) {
    const auto id = static_cast<int64_t>(s.keys[i] >> 32);
    if (s.unique_ids.empty() || s.unique_ids.back() != id) s.unique_ids.push_back(id);
    s.slot_of[s.keys[i] & 0xffffffffu] = static_cast<uint32_t>(s.unique_ids.size() - 1);
  }
  const auto unique = static_cast<int64_t>(s.unique_ids.size());
  // Guarded: an empty batch may pass a null buffer, and memset(nullptr, 0, 0) is undefined
  // (found by `make sanitize`).
  if (unique > 0) std::memset(sums, 0, static_cast<size_t>(unique * dim) * sizeof(float));
  const int64_t grad_ahead = rows_ahead(kGradPrefetchBytes, dim);
  for (int64_t j = 0; j < f.num_indices; ++j) {
    if (j + grad_ahead < f.num_indices) {
      // grad_out rows are strided by the whole output width (1.6 KB for 26 x 16 floats), which
      // the hardware prefetcher does not follow across pages.
      const int64_t ahead = j + grad_ahead;
      prefetch_row(grad_out + (pooled ? static_cast<int64_t>(s.bag_of[ahead]) : ahead) * stride, dim);
    }
    const uint32_t u = s.slot_of[j];
    if (u == kNoSlot) continue;
    const int64_t b = pooled ? static_cast<int64_t>(s.bag_of[j]) : j;
    float scale = psw != nullptr ? psw[j] : 1.0f;
    if (mean) scale *= s.inv_count[b];
    axpy<kDim>(sums + static_cast<int64_t>(u) * dim, grad_out + b * stride, scale, dim);
  }
  return unique;
}

MOEFAST_INLINE int64_t sum_rows_dispatch(const EmbeddingField& f, Scratch& s, int64_t n, const float* grad_out,
                          int64_t stride, float* sums) {
  switch (f.dim) {
    case 4: return sum_rows<4>(f, s, n, grad_out, stride, sums);
    case 8: return sum_rows<8>(f, s, n, grad_out, stride, sums);
    case 16: return sum_rows<16>(f, s, n, grad_out, stride, sums);
    case 32: return sum_rows<32>(f, s, n, grad_out, stride, sums);
    case 64: return sum_rows<64>(f, s, n, grad_out, stride, sums);
    case 128: return sum_rows<128>(f, s, n, grad_out, stride, sums);
    default: return sum_rows<0>(f, s, n, grad_out, stride, sums);
  }
}

// Applies update(id, grad) to every unique row, prefetching the rows a few ahead (they are
// random rows of tables of up to 1e7 rows, ascending).
template <typename Update>
MOEFAST_INLINE void apply_rows(const Scratch& s, int64_t unique, int64_t dim, const float* sums, const Update& update) {
  const int64_t ahead = rows_ahead(kUpdatePrefetchBytes, dim);
  for (int64_t u = 0; u < unique; ++u) {
    if (u + ahead < unique) update.prefetch(s.unique_ids[u + ahead]);
    update(s.unique_ids[u], sums + u * dim);
  }
}

// sum(g[0:dim]^2) in four interleaved partial sums (lane l sums g[4k + l]), added at the end.
// A single running sum is one dependent add per element, which the compiler may not reorder:
// 64 adds in series per row made the dim-64 update twice as slow as FBGEMM's.
MOEFAST_INLINE float sum_of_squares(const float* g, int64_t dim) {
  Vec4 partial = {0.0f, 0.0f, 0.0f, 0.0f};
  int64_t d = 0;
  for (; d + 4 <= dim; d += 4) {
    const Vec4 v = load4(g + d);
    partial += v * v;
  }
  float total = (partial[0] + partial[1]) + (partial[2] + partial[3]);
  for (; d < dim; ++d) total += g[d] * g[d];
  return total;
}

// The stochastic rounding bits of one row's elements (half tables; unused for fp32).
struct RowBits {
  uint64_t key;
  MOEFAST_INLINE uint64_t operator()(int64_t column) const {
    return half::element_bits(key, static_cast<uint64_t>(column));
  }
};

// Row-wise Adagrad has no step count: what changes from one update of a row to the next is its
// accumulator and its gradient, so both feed the rounding bits (the accumulator alone stops
// changing once mean(g^2) falls below half its ulp, and the bits would repeat). The fold is a
// sum, so the reference computes it in any order: sum_d bits(g[d]) * (2d + 1) mod 2^32.
MOEFAST_INLINE uint32_t gradient_fold(const float* g, int64_t dim) {
  uint32_t fold = 0;
  for (int64_t d = 0; d < dim; ++d) {
    uint32_t bits;
    std::memcpy(&bits, g + d, sizeof bits);
    fold += bits * static_cast<uint32_t>(2 * d + 1);
  }
  return fold;
}

// A half row's update in chunks: the updated float32 values (``updated(d)`` for element d),
// then each element's rounding bits, then the rounding back, each a loop of its own that the
// SIMD clones' targets vectorise (one loop doing all three, with the hash's two 64-bit
// multiplies and the rounding's branches, stayed scalar). The same operations element
// by element as one loop: the bits are unchanged.
constexpr int64_t kHalfChunk = 64;

template <typename S, typename F>
MOEFAST_INLINE void update_half_row(typename S::Raw* __restrict__ w, int64_t dim, const RowBits& bits, F&& updated) {
  float u[kHalfChunk];
  uint64_t r[kHalfChunk];
  for (int64_t d0 = 0; d0 < dim; d0 += kHalfChunk) {
    const int64_t n = std::min(kHalfChunk, dim - d0);
    for (int64_t k = 0; k < n; ++k) u[k] = updated(d0 + k);
    for (int64_t k = 0; k < n; ++k) r[k] = bits(d0 + k);
    for (int64_t k = 0; k < n; ++k) w[d0 + k] = S::round(u[k], r[k]);
  }
}

template <typename S>
struct RowwiseAdagradUpdate {
  using Raw = typename S::Raw;
  Raw* weight;
  int64_t dim;
  float* sum;
  float lr;
  float eps;
  uint64_t table_key;  // half::table_key(seed, field's table_key)
  void prefetch(int64_t id) const {
    prefetch_row_for_write(weight + id * dim, dim);
    __builtin_prefetch(sum + id, 1, 3);
  }
  MOEFAST_INLINE void operator()(int64_t id, const float* g) const {
    const float square_sum = sum_of_squares(g, dim);
    const float acc = sum[id] + square_sum / static_cast<float>(dim);
    sum[id] = acc;
    const float multiplier = lr / (std::sqrt(acc) + eps);
    Raw* w = weight + id * dim;
    if constexpr (!S::kHalf) {
      for (int64_t d = 0; d < dim; ++d) w[d] -= multiplier * g[d];
    } else {
      uint32_t acc_bits;
      std::memcpy(&acc_bits, &acc, sizeof acc_bits);
      const uint64_t step = (static_cast<uint64_t>(acc_bits) << 32) | gradient_fold(g, dim);
      const RowBits bits{half::row_key(table_key, static_cast<uint64_t>(id), step)};
      update_half_row<S>(w, dim, bits, [&](int64_t d) { return S::to_float(w[d]) - multiplier * g[d]; });
    }
  }
};

template <typename S>
struct LazyAdamUpdate {
  using Raw = typename S::Raw;
  Raw* weight;
  int64_t dim;
  float* exp_avg;
  float* exp_avg_sq;
  int64_t* step;
  double lr;
  double beta1;
  double beta2;
  float eps;
  uint64_t table_key;  // half::table_key(seed, field's table_key)
  void prefetch(int64_t id) const {
    prefetch_row_for_write(weight + id * dim, dim);
    prefetch_row_for_write(exp_avg + id * dim, dim);
    prefetch_row_for_write(exp_avg_sq + id * dim, dim);
    __builtin_prefetch(step + id, 1, 3);
  }
  MOEFAST_INLINE void operator()(int64_t id, const float* g) const {
    const int64_t t = ++step[id];
    // Bias corrections in double, rounded once to float (as the reference does).
    const auto step_size = static_cast<float>(lr / (1.0 - std::pow(beta1, static_cast<double>(t))));
    const auto bc2_sqrt = static_cast<float>(std::sqrt(1.0 - std::pow(beta2, static_cast<double>(t))));
    const auto b1 = static_cast<float>(beta1);
    const auto b2 = static_cast<float>(beta2);
    const float one_minus_b1 = static_cast<float>(1.0 - beta1);
    const float one_minus_b2 = static_cast<float>(1.0 - beta2);
    Raw* w = weight + id * dim;
    float* m = exp_avg + id * dim;
    float* v = exp_avg_sq + id * dim;
    if constexpr (!S::kHalf) {
      for (int64_t d = 0; d < dim; ++d) {
        const float md = m[d] * b1 + one_minus_b1 * g[d];
        const float vd = v[d] * b2 + one_minus_b2 * g[d] * g[d];
        m[d] = md;
        v[d] = vd;
        w[d] -= step_size * md / (std::sqrt(vd) / bc2_sqrt + eps);
      }
    } else {
      const RowBits bits{half::row_key(table_key, static_cast<uint64_t>(id), static_cast<uint64_t>(t))};
      update_half_row<S>(w, dim, bits, [&](int64_t d) {
        const float md = m[d] * b1 + one_minus_b1 * g[d];
        const float vd = v[d] * b2 + one_minus_b2 * g[d] * g[d];
        m[d] = md;
        v[d] = vd;
        return S::to_float(w[d]) - step_size * md / (std::sqrt(vd) / bc2_sqrt + eps);
      });
    }
  }
};

// The optimizer step on a table's unique rows (scratch.unique_ids) with their summed gradients
// sums [unique, dim]: the one dispatch (optimizer x table type) both backward paths use.
template <typename S>
MOEFAST_INLINE void update_rows_typed(const EmbeddingField& f, const Scratch& scratch, int64_t unique,
                                      const float* sums, const OptimizerConfig& config,
                                      const OptimizerState& st) {
  using Raw = typename S::Raw;
  Raw* weight = static_cast<Raw*>(f.weight);
  const uint64_t key = S::kHalf ? half::table_key(config.seed, f.table_key) : 0;
  if (config.kind == OptimizerKind::kRowwiseAdagrad) {
    const RowwiseAdagradUpdate<S> update{weight, f.dim, st.sum, static_cast<float>(config.lr), config.eps, key};
    apply_rows(scratch, unique, f.dim, sums, update);
  } else {
    const LazyAdamUpdate<S> update{weight, f.dim, st.exp_avg, st.exp_avg_sq, st.step,
                                   config.lr, config.beta1, config.beta2, config.eps, key};
    apply_rows(scratch, unique, f.dim, sums, update);
  }
}

MOEFAST_INLINE void update_rows(const EmbeddingField& f, const Scratch& scratch, int64_t unique,
                                const float* sums, const OptimizerConfig& config,
                                const OptimizerState& st) {
  switch (f.type) {
    case TableType::kFloat16: return update_rows_typed<Float16Table>(f, scratch, unique, sums, config, st);
    case TableType::kBFloat16: return update_rows_typed<BFloat16Table>(f, scratch, unique, sums, config, st);
    default: return update_rows_typed<Float32Table>(f, scratch, unique, sums, config, st);
  }
}

// The fused backward of one field after sorting: sum each unique row's gradient, then update it.
MOEFAST_INLINE void sum_and_update(const EmbeddingField& f, Scratch& scratch, int64_t n,
                                   const float* grad_out, int64_t grad_stride,
                                   const OptimizerConfig& config, const OptimizerState& st) {
  scratch.sums.resize(static_cast<size_t>(n * f.dim));
  const int64_t unique = sum_rows_dispatch(f, scratch, n, grad_out, grad_stride, scratch.sums.data());
  update_rows(f, scratch, unique, scratch.sums.data(), config, st);
}

// Each entry point below exists once per clone; the _best functions pick the clone.
void sum_and_update_baseline(const EmbeddingField& f, Scratch& scratch, int64_t n,
                             const float* grad_out, int64_t grad_stride,
                             const OptimizerConfig& config, const OptimizerState& st) {
  sum_and_update(f, scratch, n, grad_out, grad_stride, config, st);
}

void update_rows_baseline(const EmbeddingField& f, const Scratch& scratch, int64_t unique,
                          const float* sums, const OptimizerConfig& config, const OptimizerState& st) {
  update_rows(f, scratch, unique, sums, config, st);
}

#ifdef MOEFAST_AVX2_CLONES
// AVX2 and AVX-512 clones (see pool_bags_avx2): the same per-element operations in the same
// order (the sum of squares keeps its four partial sums; rounding is integer arithmetic), so
// every clone gives identical results.
__attribute__((target(MOEFAST_TARGET_AVX2))) void sum_and_update_avx2(
    const EmbeddingField& f, Scratch& scratch, int64_t n, const float* grad_out,
    int64_t grad_stride, const OptimizerConfig& config, const OptimizerState& st) {
  sum_and_update(f, scratch, n, grad_out, grad_stride, config, st);
}

__attribute__((target(MOEFAST_TARGET_AVX2))) void update_rows_avx2(
    const EmbeddingField& f, const Scratch& scratch, int64_t unique, const float* sums,
    const OptimizerConfig& config, const OptimizerState& st) {
  update_rows(f, scratch, unique, sums, config, st);
}

__attribute__((target(MOEFAST_TARGET_AVX512))) void sum_and_update_avx512(
    const EmbeddingField& f, Scratch& scratch, int64_t n, const float* grad_out,
    int64_t grad_stride, const OptimizerConfig& config, const OptimizerState& st) {
  sum_and_update(f, scratch, n, grad_out, grad_stride, config, st);
}

__attribute__((target(MOEFAST_TARGET_AVX512))) void update_rows_avx512(
    const EmbeddingField& f, const Scratch& scratch, int64_t unique, const float* sums,
    const OptimizerConfig& config, const OptimizerState& st) {
  update_rows(f, scratch, unique, sums, config, st);
}
#endif

void sum_and_update_best(const EmbeddingField& f, Scratch& scratch, int64_t n,
                         const float* grad_out, int64_t grad_stride,
                         const OptimizerConfig& config, const OptimizerState& st) {
#ifdef MOEFAST_AVX2_CLONES
  if (kHasAvx512) return sum_and_update_avx512(f, scratch, n, grad_out, grad_stride, config, st);
  if (kHasAvx2) return sum_and_update_avx2(f, scratch, n, grad_out, grad_stride, config, st);
#endif
  sum_and_update_baseline(f, scratch, n, grad_out, grad_stride, config, st);
}

void update_rows_best(const EmbeddingField& f, const Scratch& scratch, int64_t unique,
                      const float* sums, const OptimizerConfig& config, const OptimizerState& st) {
#ifdef MOEFAST_AVX2_CLONES
  if (kHasAvx512) return update_rows_avx512(f, scratch, unique, sums, config, st);
  if (kHasAvx2) return update_rows_avx2(f, scratch, unique, sums, config, st);
#endif
  update_rows_baseline(f, scratch, unique, sums, config, st);
}

std::vector<int64_t> column_offsets(const std::vector<EmbeddingField>& fields) {
  std::vector<int64_t> col(fields.size() + 1, 0);
  for (size_t t = 0; t < fields.size(); ++t) col[t + 1] = col[t] + fields[t].dim;
  return col;
}

// Fields needing work, largest first so the long tasks start early.
std::vector<int> backward_order(const std::vector<EmbeddingField>& fields,
                                const std::vector<bool>& need) {
  std::vector<int> order;
  for (size_t t = 0; t < fields.size(); ++t) {
    if (need[t]) order.push_back(static_cast<int>(t));
  }
  std::stable_sort(order.begin(), order.end(), [&](int a, int b) {
    return fields[a].num_indices * fields[a].dim > fields[b].num_indices * fields[b].dim;
  });
  return order;
}

// The frame both backward entry points share: validate the offsets, then sort each needed
// field's ids (largest field first) on the pool and hand it to `body(t, field, scratch, n)`,
// where n is the number of sorted (id, position) pairs. A field's id error is collected and
// the first one thrown after the pool finishes.
template <typename Body>
void for_each_sorted_field(const std::vector<EmbeddingField>& fields, int64_t batch,
                           const std::vector<bool>& need, int num_threads, const Body& body) {
  for (const auto& f : fields) check_offset_ends(f, batch);
  const std::vector<int> order = backward_order(fields, need);
  FieldErrors errors(fields.size());
  ThreadPool::instance().parallel_for(
      static_cast<int64_t>(order.size()), num_threads, [&](int64_t i) {
        const int t = order[i];
        const EmbeddingField& f = fields[t];
        thread_local Scratch scratch;
        std::string error;
        const int64_t n = sort_field(f, batch, scratch, &error);
        if (n < 0) {
          errors.set(t, std::move(error));
          return;
        }
        body(t, f, scratch, n);
      });
  errors.throw_first();
}

// The byte range [begin, end) of a buffer the fused update writes, and who owns it.
struct WrittenRange {
  uintptr_t begin;
  uintptr_t end;
  int group;
  int field;
};

// Groups the fields to update by table: fields whose table is the same buffer (same pointer,
// rows and dim) form one group, in field order; their optimizer state must be the same buffers
// too. Any other overlap between what two groups write (tables or state, e.g. two views of
// one tensor, or one state for two tables) would race between threads: refused.
std::vector<std::vector<int>> table_groups(const std::vector<EmbeddingField>& fields,
                                           const std::vector<bool>& need,
                                           const OptimizerConfig& config,
                                           const std::vector<OptimizerState>& states) {
  std::vector<std::vector<int>> groups;
  std::vector<WrittenRange> ranges;
  auto add = [&](const void* p, int64_t bytes, int group, int field) {
    if (p == nullptr || bytes <= 0) return;
    const auto begin = reinterpret_cast<uintptr_t>(p);
    ranges.push_back({begin, begin + static_cast<uintptr_t>(bytes), group, field});
  };
  const bool adam = config.kind == OptimizerKind::kLazyAdam;
  for (size_t t = 0; t < fields.size(); ++t) {
    if (!need[t]) continue;
    const EmbeddingField& f = fields[t];
    int found = -1;
    for (size_t g = 0; g < groups.size() && found < 0; ++g) {
      if (fields[groups[g][0]].weight == f.weight) found = static_cast<int>(g);
    }
    if (found >= 0) {
      const int first = groups[found][0];
      const EmbeddingField& o = fields[first];
      const OptimizerState& a = states[first];
      const OptimizerState& b = states[t];
      if (o.rows != f.rows || o.dim != f.dim) {
        throw std::invalid_argument(quoted(o.name) + " and " + quoted(f.name) +
                                    ": tables start at the same address with different shapes");
      }
      if (a.sum != b.sum || a.exp_avg != b.exp_avg || a.exp_avg_sq != b.exp_avg_sq || a.step != b.step) {
        throw std::invalid_argument(quoted(o.name) + " and " + quoted(f.name) +
                                    " share a table but not its optimizer state: pass the same "
                                    "state for every field of one table");
      }
      groups[found].push_back(static_cast<int>(t));
      continue;
    }
    const int g = static_cast<int>(groups.size());
    groups.push_back({static_cast<int>(t)});
    const int64_t row_bytes = f.dim * static_cast<int64_t>(sizeof(float));  // of the state
    const int64_t table_row_bytes = f.type == TableType::kFloat32 ? row_bytes : f.dim * 2;
    add(f.weight, f.rows * table_row_bytes, g, static_cast<int>(t));
    if (adam) {
      add(states[t].exp_avg, f.rows * row_bytes, g, static_cast<int>(t));
      add(states[t].exp_avg_sq, f.rows * row_bytes, g, static_cast<int>(t));
      add(states[t].step, f.rows * static_cast<int64_t>(sizeof(int64_t)), g, static_cast<int>(t));
    } else {
      add(states[t].sum, f.rows * static_cast<int64_t>(sizeof(float)), g, static_cast<int>(t));
    }
  }
  std::sort(ranges.begin(), ranges.end(),
            [](const WrittenRange& a, const WrittenRange& b) { return a.begin < b.begin; });
  for (size_t i = 1; i < ranges.size(); ++i) {
    if (ranges[i].begin < ranges[i - 1].end) {
      const std::string a = fields[ranges[i - 1].field].name;
      const std::string b = fields[ranges[i].field].name;
      throw std::invalid_argument(
          a == b ? quoted(a) + ": its table and optimizer state overlap in memory"
                 : quoted(a) + " and " + quoted(b) +
                       ": their tables or optimizer states overlap in memory; a table listed for "
                       "several fields must be the same tensor, with the same state");
    }
  }
  return groups;
}

// Merges one field's unique rows (ascending) and their summed gradients [unique, dim] into the
// running (ids, sums) of its table: a row in both gets sums + grads, a new row 0 + grads (the
// reference adds every field's rows into zeros in field order: the same additions).
void merge_row_sums(const int64_t* field_ids, const float* field_sums, int64_t unique, int64_t dim,
                    std::vector<int64_t>& ids, std::vector<float>& sums) {
  std::vector<int64_t> out_ids;
  std::vector<float> out_sums;
  out_ids.reserve(ids.size() + static_cast<size_t>(unique));
  out_sums.reserve((ids.size() + static_cast<size_t>(unique)) * static_cast<size_t>(dim));
  size_t i = 0;
  int64_t j = 0;
  while (i < ids.size() || j < unique) {
    const bool take_old = j >= unique || (i < ids.size() && ids[i] <= field_ids[j]);
    const bool take_new = i >= ids.size() || (j < unique && field_ids[j] <= ids[i]);
    out_ids.push_back(take_old ? ids[i] : field_ids[j]);
    for (int64_t d = 0; d < dim; ++d) {
      float v = take_old ? sums[i * static_cast<size_t>(dim) + static_cast<size_t>(d)] : 0.0f;
      if (take_new) v += field_sums[j * dim + d];
      out_sums.push_back(v);
    }
    if (take_old) ++i;
    if (take_new) ++j;
  }
  ids.swap(out_ids);
  sums.swap(out_sums);
}

}  // namespace

const char* simd_level() {
#ifdef MOEFAST_AVX2_CLONES
  if (kHasAvx512) return "avx512";
  if (kHasAvx2) return "avx2";
#endif
  return "baseline";
}

void embedding_forward(const std::vector<EmbeddingField>& fields, int64_t batch, float* out,
                       int64_t out_stride, int num_threads) {
  for (const auto& f : fields) check_offset_ends(f, batch);
  const std::vector<int64_t> col = column_offsets(fields);
  std::vector<ForwardTask> tasks;
  for (size_t t = 0; t < fields.size(); ++t) {
    const int64_t per_bag = std::max<int64_t>(1, fields[t].num_indices / std::max<int64_t>(batch, 1));
    const int64_t bags_per_task = std::max<int64_t>(1, kLookupsPerTask / per_bag);
    for (int64_t b0 = 0; b0 < batch; b0 += bags_per_task) {
      tasks.push_back({static_cast<int>(t), b0, std::min(batch, b0 + bags_per_task)});
    }
  }
  FieldErrors errors(fields.size());
  ThreadPool::instance().parallel_for(
      static_cast<int64_t>(tasks.size()), num_threads, [&](int64_t i) {
        const ForwardTask& task = tasks[i];
        const EmbeddingField& f = fields[task.field];
        std::string error;
        float* o = out + col[task.field];
        const bool ok = f.index_is_64
                            ? pool_bags_best<int64_t>(f, task.b0, task.b1, o, out_stride, &error)
                            : pool_bags_best<int32_t>(f, task.b0, task.b1, o, out_stride, &error);
        if (!ok) errors.set(task.field, std::move(error));
      });
  errors.throw_first();
}

std::vector<int64_t> embedding_backward_rows(const std::vector<EmbeddingField>& fields,
                                             int64_t batch, const float* grad_out,
                                             int64_t grad_stride, const std::vector<bool>& need,
                                             int64_t* rows_out, float* grads_out,
                                             int num_threads) {
  const std::vector<int64_t> col = column_offsets(fields);
  std::vector<int64_t> row_base(fields.size(), 0);
  std::vector<int64_t> grad_base(fields.size(), 0);
  for (size_t t = 1; t < fields.size(); ++t) {
    row_base[t] = row_base[t - 1] + fields[t - 1].num_indices;
    grad_base[t] = grad_base[t - 1] + fields[t - 1].num_indices * fields[t - 1].dim;
  }
  std::vector<int64_t> counts(fields.size(), 0);
  for_each_sorted_field(fields, batch, need, num_threads,
                        [&](int t, const EmbeddingField& f, Scratch& scratch, int64_t n) {
    const int64_t unique = sum_rows_dispatch(f, scratch, n, grad_out + col[t], grad_stride,
                                             grads_out + grad_base[t]);
    if (unique > 0) {  // rows_out may be null for an empty batch (see sum_rows)
      std::memcpy(rows_out + row_base[t], scratch.unique_ids.data(),
                  static_cast<size_t>(unique) * sizeof(int64_t));
    }
    counts[t] = unique;
  });
  return counts;
}

void embedding_backward_update(const std::vector<EmbeddingField>& fields, int64_t batch,
                               const float* grad_out, int64_t grad_stride,
                               const std::vector<bool>& need, const OptimizerConfig& config,
                               const std::vector<OptimizerState>& states, int num_threads) {
  const std::vector<int64_t> col = column_offsets(fields);
  const std::vector<std::vector<int>> groups = table_groups(fields, need, config, states);
  bool shared = false;
  for (const auto& g : groups) shared = shared || g.size() > 1;
  if (!shared) {
    for_each_sorted_field(fields, batch, need, num_threads,
                          [&](int t, const EmbeddingField& f, Scratch& scratch, int64_t n) {
      sum_and_update_best(f, scratch, n, grad_out + col[t], grad_stride, config, states[t]);
    });
    return;
  }
  // A table listed for several fields: one task per table sums each field's row gradients,
  // merges them (field order, so the sum is deterministic) and updates each row once.
  for (const auto& f : fields) check_offset_ends(f, batch);
  FieldErrors errors(fields.size());
  ThreadPool::instance().parallel_for(
      static_cast<int64_t>(groups.size()), num_threads, [&](int64_t i) {
        const std::vector<int>& group = groups[i];
        thread_local Scratch scratch;
        if (group.size() == 1) {
          const int t = group[0];
          std::string error;
          const int64_t n = sort_field(fields[t], batch, scratch, &error);
          if (n < 0) {
            errors.set(t, std::move(error));
            return;
          }
          sum_and_update_best(fields[t], scratch, n, grad_out + col[t], grad_stride, config, states[t]);
          return;
        }
        const int64_t dim = fields[group[0]].dim;
        std::vector<int64_t> ids;    // merged unique rows, ascending
        std::vector<float> sums;     // [ids, dim]
        for (const int t : group) {
          const EmbeddingField& f = fields[t];
          std::string error;
          const int64_t n = sort_field(f, batch, scratch, &error);
          if (n < 0) {
            errors.set(t, std::move(error));
            return;
          }
          std::vector<float> field_sums(static_cast<size_t>(n * dim));
          const int64_t unique = sum_rows_dispatch(f, scratch, n, grad_out + col[t], grad_stride,
                                                   field_sums.data());
          merge_row_sums(scratch.unique_ids.data(), field_sums.data(), unique, dim, ids, sums);
        }
        scratch.unique_ids = ids;
        update_rows_best(fields[group[0]], scratch, static_cast<int64_t>(ids.size()), sums.data(),
                         config, states[group[0]]);
      });
  errors.throw_first();
}

}  // namespace moefast
