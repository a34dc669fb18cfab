// A token tier's decode step after its compressed segment, on the CPU: the cpu backend's `tier_decode`.
//
// Same contract as zeroc_kernels.tier_decode.tier_decode_ref: each sequence's query attends its S + W tier
// slots and its own new row at full rank, and the result is merged with the compressed segment's partial
// outputs by log-sum-exp (each partial counts as one more key whose score is its LSE). A slot's full-rank key
// is its compressed row (in the cache's blocks) followed by its tier row, which lies in the blocks the sequence
// borrowed, laid end to end (slot j's rows of every KV head: elements [j * kv * width, (j + 1) * kv * width)),
// so a tier row may straddle two blocks.
//
// Work item = (sequence, KV head): the item copies its seen slots' rows once into a small buffer, then every
// query head of the group scores them, softmaxes with the partials' LSEs, and sums the values. Rows the query
// does not see are never read (they may hold anything, NaN included). Where the reference takes some 25
// PyTorch ops a layer, each a pass and an allocation, this is one call. The pool is fp32 or bf16 (`TierArgs<T>`: a
// bf16 row widened to fp32 as it is copied, exactly); everything else is fp32. Built with ragged_attention.cpp.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

namespace {

template <typename T>  // the pool's element: float or c10::BFloat16
struct TierArgs {
  const float* q;      // [B, heads, dq], dense
  const T* pool;       // [blocks, block_size, kv, row], dense
  const int64_t* blocks;   // [B, H]
  const int64_t* offsets;  // [B, H]
  const int64_t* ids;      // [B, T]
  const bool* seen;        // [B, H + 1]
  const float* k_own;  // [B, kv, dq]
  const float* v_own;  // [B, kv, dv]
  const float* parts;  // [B, heads, P, v_dim]
  const float* lses;   // [B, heads, P]
  float* out;          // [B, heads, dv]
  int64_t heads, kv, group, held, tier_blocks, parts_n, block_size, row, k_dim, v_dim, tier_k, tier_v;
  float scale;
};

// n pool elements -> fp32 (a bf16 element is fp32's upper half: a shift, exact)
inline void widen(float* __restrict dst, const float* __restrict src, int64_t n) {
  std::memcpy(dst, src, n * sizeof(float));
}

inline void widen(float* __restrict dst, const c10::BFloat16* __restrict src, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t bits = static_cast<uint32_t>(src[i].x) << 16;
    std::memcpy(dst + i, &bits, sizeof(float));
  }
}

// Elements [at, at + n) of a sequence's borrowed blocks laid end to end -> dst (at most two pieces per block).
template <typename T>
void copy_tier(const TierArgs<T>& a, const int64_t* ids, int64_t at, int64_t n, float* dst) {
  const int64_t per_block = a.block_size * a.kv * a.row;
  while (n > 0) {
    const int64_t blk = ids[at / per_block], off = at % per_block, take = std::min(n, per_block - off);
    widen(dst, a.pool + blk * per_block + off, take);
    dst += take, at += take, n -= take;
  }
}

inline float dot(const float* __restrict x, const float* __restrict y, int64_t n) {
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += x[i] * y[i];
  return s;
}

// The item's seen keys as rows of keys [n, dq] and values [n, dv] (its own row last, where seen) -> n. The three
// buffers are the calling thread's, reused across its items.
template <typename T>
int64_t gather_keys(const TierArgs<T>& a, int64_t b, int64_t h, std::vector<float>& keys, std::vector<float>& vals,
                    std::vector<float>& tier) {
  const int64_t dq = a.k_dim + a.tier_k, dv = a.v_dim + a.tier_v, width = a.tier_k + a.tier_v;
  keys.resize((a.held + 1) * dq), vals.resize((a.held + 1) * dv), tier.resize(width);
  const bool* seen = a.seen + b * (a.held + 1);
  int64_t n = 0;
  for (int64_t j = 0; j < a.held; ++j) {
    if (!seen[j]) continue;
    const int64_t slot = a.blocks[b * a.held + j] * a.block_size + a.offsets[b * a.held + j];
    const T* comp = a.pool + (slot * a.kv + h) * a.row;  // [k_dim | v_dim]
    copy_tier(a, a.ids + b * a.tier_blocks, (j * a.kv + h) * width, width, tier.data());  // [tier_k | tier_v]
    float* k = keys.data() + n * dq;
    float* v = vals.data() + n * dv;
    widen(k, comp, a.k_dim);
    std::memcpy(k + a.k_dim, tier.data(), a.tier_k * sizeof(float));
    widen(v, comp + a.k_dim, a.v_dim);
    std::memcpy(v + a.v_dim, tier.data() + a.tier_k, a.tier_v * sizeof(float));
    ++n;
  }
  if (seen[a.held]) {
    std::memcpy(keys.data() + n * dq, a.k_own + (b * a.kv + h) * dq, dq * sizeof(float));
    std::memcpy(vals.data() + n * dv, a.v_own + (b * a.kv + h) * dv, dv * sizeof(float));
    ++n;
  }
  return n;
}

// One query head over the item's n gathered keys and its P partials -> its output row.
template <typename T>
void attend_head(const TierArgs<T>& a, int64_t b, int64_t head, const std::vector<float>& keys,
                 const std::vector<float>& vals, int64_t n, std::vector<float>& scores) {
  const int64_t dq = a.k_dim + a.tier_k, dv = a.v_dim + a.tier_v;
  const float* qh = a.q + (b * a.heads + head) * dq;
  const float* lse = a.lses + (b * a.heads + head) * a.parts_n;
  scores.resize(n + a.parts_n);
  float mx = -std::numeric_limits<float>::infinity();
  for (int64_t t = 0; t < n; ++t) mx = std::max(mx, scores[t] = dot(qh, keys.data() + t * dq, dq) * a.scale);
  for (int64_t p = 0; p < a.parts_n; ++p) mx = std::max(mx, scores[n + p] = lse[p]);
  float* o = a.out + (b * a.heads + head) * dv;
  std::fill(o, o + dv, 0.f);
  if (mx == -std::numeric_limits<float>::infinity()) return;  // no key at all: 0, as the reference
  float den = 0.f;
  for (int64_t t = 0; t < n; ++t) {
    const float w = std::exp(scores[t] - mx);
    den += w;
    const float* v = vals.data() + t * dv;
#pragma omp simd
    for (int64_t i = 0; i < dv; ++i) o[i] += w * v[i];
  }
  const float* part = a.parts + (b * a.heads + head) * a.parts_n * a.v_dim;
  for (int64_t p = 0; p < a.parts_n; ++p) {
    const float w = std::exp(scores[n + p] - mx);  // 0 for a split that held no key (LSE -inf)
    den += w;
    if (w == 0.f) continue;
#pragma omp simd
    for (int64_t i = 0; i < a.v_dim; ++i) o[i] += w * part[p * a.v_dim + i];  // compressed: no tier dims
  }
  const float inv = 1.f / den;
#pragma omp simd
  for (int64_t i = 0; i < dv; ++i) o[i] *= inv;
}

template <typename T>
void run_tier(const TierArgs<T>& a, int64_t b) {
  const int64_t items = b * a.kv;
  // A plain OpenMP region, as ragged_attention.cpp's run_items explains.
  const int workers = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), items)));
#pragma omp parallel num_threads(workers)
  {
    std::vector<float> keys, vals, tier, scores;
#pragma omp for schedule(static)
    for (int64_t i = 0; i < items; ++i) {
      const int64_t s = i / a.kv, h = i % a.kv;
      const int64_t n = gather_keys(a, s, h, keys, vals, tier);
      for (int64_t j = 0; j < a.group; ++j) attend_head(a, s, h * a.group + j, keys, vals, n, scores);
    }
  }
}

}  // namespace

// q: [B, heads, k_dim + tier_k]; pool: [blocks, block_size, kv, k_dim + v_dim]; blocks, offsets: [B, H] int64;
// tier_ids: [B, T] int64; seen: [B, H + 1] bool; k_own: [B, kv, k_dim + tier_k]; v_own: [B, kv, v_dim + tier_v];
// parts: [B, heads, P, v_dim]; lses: [B, heads, P]; all dense, the pool fp32 or bf16, the rest fp32
// -> [B, heads, v_dim + tier_v] fp32
torch::Tensor tier_decode(torch::Tensor q, torch::Tensor pool, int64_t k_dim, torch::Tensor blocks,
                          torch::Tensor offsets, torch::Tensor tier_ids, torch::Tensor seen, torch::Tensor k_own,
                          torch::Tensor v_own, torch::Tensor parts, torch::Tensor lses, double scale) {
  for (const auto* t : {&q, &k_own, &v_own, &parts, &lses}) {
    TORCH_CHECK_VALUE(t->scalar_type() == at::kFloat && t->is_contiguous(), "tier_decode takes dense fp32 tensors");
  }
  TORCH_CHECK_VALUE((pool.scalar_type() == at::kFloat || pool.scalar_type() == at::kBFloat16) && pool.is_contiguous(),
                    "tier_decode takes a dense fp32 or bf16 pool");
  TORCH_CHECK_VALUE(blocks.scalar_type() == at::kLong && offsets.scalar_type() == at::kLong &&
                        tier_ids.scalar_type() == at::kLong && seen.scalar_type() == at::kBool &&
                        blocks.is_contiguous() && offsets.is_contiguous() && tier_ids.is_contiguous() &&
                        seen.is_contiguous(), "tier_decode: dense int64 slots and a dense bool mask");
  const int64_t b = q.size(0), heads = q.size(1), kv = pool.size(2), row = pool.size(3);
  const int64_t v_dim = row - k_dim, tier_k = q.size(2) - k_dim, tier_v = v_own.size(2) - v_dim;
  auto out = torch::empty({b, heads, v_own.size(2)}, q.options());
  auto run = [&](auto* pool_data) {
    using T = std::remove_const_t<std::remove_pointer_t<decltype(pool_data)>>;
    const TierArgs<T> a{q.data_ptr<float>(), pool_data, blocks.data_ptr<int64_t>(), offsets.data_ptr<int64_t>(),
                        tier_ids.data_ptr<int64_t>(), seen.data_ptr<bool>(), k_own.data_ptr<float>(),
                        v_own.data_ptr<float>(), parts.data_ptr<float>(), lses.data_ptr<float>(),
                        out.data_ptr<float>(), heads, kv, heads / kv, blocks.size(1), tier_ids.size(1),
                        parts.size(2), pool.size(1), row, k_dim, v_dim, tier_k, tier_v, static_cast<float>(scale)};
    run_tier(a, b);
  };
  if (pool.scalar_type() == at::kBFloat16) {
    run(pool.data_ptr<c10::BFloat16>());
  } else {
    run(pool.data_ptr<float>());
  }
  return out;
}
