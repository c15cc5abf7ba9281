// Attention of decoding rows on the CPU: one query per row, each row over its own KV cache.
//
// A decode step of a batch reads every row's cached keys and values once per layer; that is
// most of the step once there are several rows. torch's CPU attention spends about 100 us per
// row and layer at 700 cached tokens, a third of the machine's read bandwidth. Here one call
// per layer takes every row: each work item is one row's one key/value head, and it reads that
// head's keys and values once for all the query heads that share it (grouped-query attention).
//
// A row's result depends on nothing but its own query and cache: the work items never mix rows
// and their loops run in a fixed order, so a row gets the same bits alone or batched, on any
// number of threads (tests/test_decode_attention.py checks both).

#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace {

constexpr int kMaxGroup = 8;  // query heads per key/value head

// exp(x) for x <= 0 (a score less its row's maximum): 2^n * exp(r) with |r| <= ln2 / 2 and a
// degree-6 polynomial for exp(r). Plain arithmetic, so the loops that call it are vectorised;
// below -87, where exp(x) is under float's smallest normal, it returns 2^-126 * exp(r).
inline float exp_nonpositive(float x) {
  x = x < -87.0f ? -87.0f : x;
  const float n = std::floor(x * 1.44269504088896341f + 0.5f);
  float r = x - n * 0.693359375f;  // ln2 in two parts, so r keeps its low bits
  r = r + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  return p * __builtin_bit_cast(float, bits);
}

// x[l] = exp(x[l] - top) for every l, x's maximum being top.
void exp_shifted(float* __restrict x, int64_t n, float top) {
  for (int64_t l = 0; l < n; ++l) x[l] = exp_nonpositive(x[l] - top);
}

// Sum of x[0..n) in a fixed order: lane k adds x[k], x[k + kLanes], ... in turn, then the lanes
// are added first to last. Written out, not left to the compiler's reduction, so the order never
// depends on the vector width it picks or on the buffer's alignment (a row's bits stay its own).
constexpr int kLanes = 16;

inline float ordered_sum(const float* x, int64_t n) {
  float lanes[kLanes] = {};
  int64_t l = 0;
  for (; l + kLanes <= n; l += kLanes)
    for (int k = 0; k < kLanes; ++k) lanes[k] += x[l + k];
  for (int k = 0; l < n; ++l, ++k) lanes[k] += x[l];
  float total = 0.f;
  for (int k = 0; k < kLanes; ++k) total += lanes[k];
  return total;
}

// `group` queries q [group, D] over n keys and values (rows `stride` floats apart); out [group, D].
template <int D>
void attend_head(const float* q, const float* k, const float* v, int64_t n, int64_t stride, int group, float scale,
                 float* scores, float* out) {
  constexpr int W = D < kLanes ? D : kLanes;  // the dot product's lanes, as ordered_sum's
  for (int64_t l = 0; l < n; ++l) {
    const float* key = k + l * stride;
    for (int j = 0; j < group; ++j) {
      const float* qj = q + j * D;
      float lanes[W] = {};
      for (int d = 0; d < D; d += W)
        for (int w = 0; w < W; ++w) lanes[w] += qj[d + w] * key[d + w];
      float dot = 0.f;
      for (int w = 0; w < W; ++w) dot += lanes[w];
      scores[j * n + l] = dot * scale;
    }
  }
  float total[kMaxGroup];
  for (int j = 0; j < group; ++j) {
    float* s = scores + j * n;
    float top = -INFINITY;
#pragma omp simd reduction(max : top)  // a maximum is exact in any order
    for (int64_t l = 0; l < n; ++l) top = s[l] > top ? s[l] : top;
    exp_shifted(s, n, top);
    total[j] = ordered_sum(s, n);
  }
  float acc[kMaxGroup][D] = {};
  for (int64_t l = 0; l < n; ++l) {
    const float* value = v + l * stride;
    for (int j = 0; j < group; ++j) {
      const float w = scores[j * n + l];
      for (int d = 0; d < D; ++d) acc[j][d] += w * value[d];
    }
  }
  for (int j = 0; j < group; ++j) {
    const float inverse = 1.f / total[j];
    for (int d = 0; d < D; ++d) out[j * D + d] = acc[j][d] * inverse;
  }
}

using HeadFn = void (*)(const float*, const float*, const float*, int64_t, int64_t, int, float, float*, float*);

HeadFn head_fn(int64_t head_dim) {
  switch (head_dim) {
    case 8: return attend_head<8>;
    case 16: return attend_head<16>;
    case 32: return attend_head<32>;
    case 64: return attend_head<64>;
    case 128: return attend_head<128>;
    default: return nullptr;
  }
}

// queries [R, H, D]; keys[r] and values[r] [layers, 1, KV, capacity, D], row r's whole cache;
// lengths[r]: how many of its positions row r reads. Returns [R, H, D].
torch::Tensor decode_attention(const torch::Tensor& queries, const std::vector<torch::Tensor>& keys,
                               const std::vector<torch::Tensor>& values, const std::vector<int64_t>& lengths,
                               int64_t layer, double scale) {
  TORCH_CHECK(queries.dim() == 3 && queries.scalar_type() == torch::kFloat && queries.is_contiguous() &&
                  queries.device().is_cpu(),
              "queries must be a contiguous float32 [rows, heads, head_dim] tensor on the CPU");
  const int64_t rows = queries.size(0);
  TORCH_CHECK(static_cast<int64_t>(keys.size()) == rows && static_cast<int64_t>(values.size()) == rows &&
                  static_cast<int64_t>(lengths.size()) == rows,
              "one cache and one length per row");
  const int64_t heads = queries.size(1), head_dim = queries.size(2);
  const HeadFn attend = head_fn(head_dim);
  TORCH_CHECK(attend != nullptr, "head_dim ", head_dim, " is not one of 8, 16, 32, 64, 128");
  int64_t kv_heads = 0;
  std::vector<const float*> key_base(rows), value_base(rows);
  for (int64_t r = 0; r < rows; ++r) {
    for (const torch::Tensor* cache : {&keys[r], &values[r]}) {
      TORCH_CHECK(cache->dim() == 5 && cache->scalar_type() == torch::kFloat && cache->is_contiguous() &&
                      cache->device().is_cpu() && cache->size(2) > 0,
                  "caches must be contiguous float32 [layers, 1, kv_heads, capacity, head_dim] tensors on the CPU");
      TORCH_CHECK(cache->size(4) == head_dim && cache->size(1) == 1, "a cache's shape does not match the queries");
      TORCH_CHECK(layer >= 0 && layer < cache->size(0), "layer ", layer, " is outside the cache");
      TORCH_CHECK(lengths[r] >= 1 && lengths[r] <= cache->size(3), "row ", r, " reads ", lengths[r],
                  " positions of a cache of ", cache->size(3));
    }
    TORCH_CHECK(keys[r].sizes() == values[r].sizes(), "a row's keys and values differ in shape");
    TORCH_CHECK(r == 0 || keys[r].size(2) == kv_heads, "rows differ in key/value heads");
    kv_heads = keys[r].size(2);
    key_base[r] = keys[r].data_ptr<float>() + layer * keys[r].stride(0);
    value_base[r] = values[r].data_ptr<float>() + layer * values[r].stride(0);
  }
  const int64_t group = rows ? heads / kv_heads : 1;
  TORCH_CHECK(rows == 0 || (heads % kv_heads == 0 && group <= kMaxGroup), "heads ", heads, " per ", kv_heads,
              " key/value heads is not a group of at most ", kMaxGroup);
  torch::Tensor out = torch::empty_like(queries);
  const float* q = queries.data_ptr<float>();
  float* o = out.data_ptr<float>();
  // OpenMP itself, not at::parallel_for: that template, compiled into this library, keeps its own
  // "threads initialised" flag per thread and on its first call resets the calling thread to the
  // process-wide count, which a batching decoder sets to 1 for every thread but the scheduler's
  // (engine/threads.py). at::get_num_threads is torch's count for this thread.
  const int64_t items = rows * kv_heads;
  const int threads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), items)));
  // Every thread's scores, allocated here: an exception inside the parallel region would end the process.
  const int64_t longest = rows ? *std::max_element(lengths.begin(), lengths.end()) : 0;
  std::vector<float> scores(static_cast<size_t>(threads) * group * longest);
  {
    py::gil_scoped_release released;  // torch's own operations release it too; nothing below touches Python
#pragma omp parallel num_threads(threads) if (threads > 1)
    {
      float* mine = scores.data() + static_cast<int64_t>(omp_get_thread_num()) * group * longest;
#pragma omp for schedule(dynamic, 1)
      for (int64_t item = 0; item < items; ++item) {
        const int64_t r = item / kv_heads, g = item % kv_heads;
        const int64_t n = lengths[r], head_stride = keys[r].stride(2), position_stride = keys[r].stride(3);
        const int64_t first = (r * heads + g * group) * head_dim;
        attend(q + first, key_base[r] + g * head_stride, value_base[r] + g * head_stride, n, position_stride,
               static_cast<int>(group), static_cast<float>(scale), mine, o + first);
      }
    }
  }
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("decode_attention", &decode_attention, "Decode-step attention of rows over their own KV caches");
}
