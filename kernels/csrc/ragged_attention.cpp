// Ragged causal GQA attention over a paged KV cache on the CPU, reading the cache where it lies.
//
// Same contract as zeroc_kernels.paged_attention.paged_attention_ref: the step's new queries of every
// sequence, concatenated ([N, heads, dq]), attend their sequence's cached context through its block
// table; query row i of sequence b sits at position seq_len - q_len + i and sees keys at positions <= it.
// Decode rows (one query) and prefill / chunk rows (many) take the same path in one call.
//
// Work item = (sequence, KV head, tile of query rows). The item keeps the tile's query vectors (every
// query head of the KV head's group: K/V bytes are read once per tile, not once per query head) and
// walks the sequence's blocks in table order with an online softmax, so no context is gathered, no
// mask is built and no sequence's queries are padded to another's length. Nothing past the tile's last
// position is read (those slots may hold another sequence's stale rows, even NaN); keys between a row's
// own position and the tile's last get probability 0. Decode items (one row) take dots straight from the
// cache rows; prefill tiles stage each block once and run register-blocked score and P @ V loops.
// Items are handed out longest-first from an atomic counter inside torch's own thread pool, so
// torch.set_num_threads governs this kernel like any other op.
// `ragged_decode_partials` runs the decode paths over each sequence's keys from a start position on, with
// each output's log-sum-exp: a token tier's compressed segment, merged with its full-rank keys by LSE.
// K/V pools are fp32 or bf16 (`Args<T>`): a bf16 row is widened to fp32 as it is read (a shift; exact), so a bf16
// cache is read in place at half the bytes, never gathered or converted whole. Queries, scores and accumulation
// are fp32.
// Built by kernels/ragged_cpu.py (-O3 -fopenmp and the vector ISA torch detected on the CPU).
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <utility>
#include <vector>

namespace {

// Query vectors (rows x group heads) per work item: enough to reuse each K/V block from L1 many times
// in prefill, few enough that a prompt splits into many items for the threads.
constexpr int64_t kTileVectors = 96;

template <typename T>  // the pools' element: float or c10::BFloat16
struct Args {
  const float* q;  // [N, heads, dq], dense
  const T* k;  // [blocks, block_size, kv_heads, dq], strides ks*, last dim dense
  const T* v;  // [blocks, block_size, kv_heads, dv], strides vs*
  float* out;      // [N, heads, dv], dense
  const int64_t* tables;  // [B, table_width]
  const int64_t* seq_lens;  // [B]
  const int64_t* starts;    // [B + 1]
  int64_t heads, kv_heads, group, dq, dv, block_size, table_width;
  int64_t ks0, ks1, ks2, vs0, vs1, vs2;
  float scale;
  int64_t key_start = 0;  // keys before this position are not attended (a token tier's compressed segment)
  float* lse = nullptr;   // [N, heads]: each output's natural-log sum of exp(scores), when asked for
};

struct Item {
  int64_t seq, kv_head, heads, row0, rows, cost;  // KV heads [kv_head, kv_head + heads), query rows [row0, +rows)
};

inline float to_float(float x) { return x; }

// bf16 is fp32's upper half: widening is a shift, exact (plain arithmetic, so `omp simd` loops vectorise)
inline float to_float(c10::BFloat16 x) {
  const uint32_t bits = static_cast<uint32_t>(x.x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

template <typename T>
inline float dot(const float* __restrict a, const T* __restrict b, int64_t n) {
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += a[i] * to_float(b[i]);
  return s;
}

// exp(x) for x <= 0 (scores minus their running max), Cephes' expf: 2^n * poly(r), x = n ln2 + r. Plain
// arithmetic, so `omp simd` loops over it vectorise (std::exp does not without -ffast-math); within 2 ulp.
#pragma omp declare simd
inline float exp_nonpositive(float x) {
  x = std::max(x, -87.0f);  // exp(-87) ~ 1.6e-38: the smallest normal float's neighbourhood, weight ~0
  const float n = std::nearbyint(x * 1.44269504088896341f);
  const float r = x - n * 0.693359375f + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

template <typename T>
inline void axpy(float* __restrict y, float a, const T* __restrict x, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] += a * to_float(x[i]);
}

// One vector's scores of a block -> probabilities, in place, and its running max, sum and accumulator
// rescaled: the first n keys are its own (causal), the rest of `width` get 0.
inline void row_softmax(float* __restrict s, int64_t n, int64_t width, float& mx, float& den,
                        float* __restrict acc, int64_t acc_width) {
  if (n <= 0) {  // a padding vector, or a row whose position lies before this block
    std::fill(s, s + width, 0.f);
    return;
  }
  float block_max = -std::numeric_limits<float>::infinity();
  for (int64_t t = 0; t < n; ++t) block_max = std::max(block_max, s[t]);
  const float new_max = std::max(mx, block_max);
  const float corr = std::exp(mx - new_max);  // 0 on the first block (mx = -inf)
  mx = new_max;
  float sum = 0.f;
#pragma omp simd reduction(+ : sum)
  for (int64_t t = 0; t < n; ++t) {
    s[t] = exp_nonpositive(s[t] - new_max);
    sum += s[t];
  }
  std::fill(s + n, s + width, 0.f);
  den = den * corr + sum;
  if (corr != 1.f) {
#pragma omp simd
    for (int64_t j = 0; j < acc_width; ++j) acc[j] *= corr;
  }
}

// One query vector's online-softmax update with its scores `s` over n keys of a block (values at vb).
template <typename T>
inline void block_update(const Args<T>& a, float* __restrict s, int64_t n, const T* __restrict vb, float& mx,
                         float& den, float* __restrict acc) {
  row_softmax(s, n, n, mx, den, acc, a.dv);
  for (int64_t t = 0; t < n; ++t) axpy(acc, s[t], vb + t * a.vs1, a.dv);  // acc += p @ V
}

// Positions of the item's first and last query rows; each row sees the keys up to its own position.
template <typename T>
inline std::pair<int64_t, int64_t> row_positions(const Args<T>& a, const Item& it) {
  const int64_t q_len = a.starts[it.seq + 1] - a.starts[it.seq];
  const int64_t first = a.seq_lens[it.seq] - q_len + it.row0;
  return {first, first + it.rows - 1};
}

// Block `blk` of the item's sequence, where it lies in the pools: its K rows and V rows for the item's KV head.
template <typename T>
inline std::pair<const T*, const T*> block_kv(const Args<T>& a, const Item& it, int64_t blk) {
  const int64_t id = a.tables[it.seq * a.table_width + blk];
  return {a.k + id * a.ks0 + it.kv_head * a.ks2, a.v + id * a.vs0 + it.kv_head * a.vs2};
}

// The item's query vectors, scaled ([m, dq]): vector (i * heads + h) * group + g is query head
// (kv_head + h) * group + g of row row0 + i.
template <typename T>
inline void load_queries(const Args<T>& a, const Item& it, float* __restrict qs) {
  for (int64_t i = 0; i < it.rows; ++i) {
    const int64_t width = it.heads * a.group * a.dq;  // the item's query heads of a row lie side by side
    const float* src = a.q + ((a.starts[it.seq] + it.row0 + i) * a.heads + it.kv_head * a.group) * a.dq;
    for (int64_t j = 0; j < width; ++j) qs[i * width + j] = src[j] * a.scale;
  }
}

// One output vector: acc / den, and its LSE where asked for; a vector that attended no key (den 0: keys from
// key_start on only) gets 0 and LSE -inf.
template <typename T>
inline void store_vector(const Args<T>& a, int64_t out_row, const float* acc, float mx, float den) {
  float* dst = a.out + out_row * a.dv;
  const float inv = den > 0.f ? 1.f / den : 0.f;
  for (int64_t j = 0; j < a.dv; ++j) dst[j] = acc[j] * inv;
  if (a.lse != nullptr) {
    a.lse[out_row] = den > 0.f ? mx + std::log(den) : -std::numeric_limits<float>::infinity();
  }
}

// out rows of the item's vectors: acc [m, acc_stride] / den [m]
template <typename T>
inline void store_outputs(const Args<T>& a, const Item& it, const float* acc, int64_t acc_stride, const float* mx,
                          const float* den) {
  const int64_t per_row = it.heads * a.group;
  for (int64_t m = 0; m < it.rows * per_row; ++m) {
    const int64_t i = m / per_row, hg = m % per_row;
    store_vector(a, (a.starts[it.seq] + it.row0 + i) * a.heads + it.kv_head * a.group + hg, acc + m * acc_stride,
                 mx[m], den[m]);
  }
}

// A decode item (one row; the query vectors of its KV heads' groups): one dot per key, one axpy per value,
// read in place. A decode item may span all KV heads, so each block's rows are read once, end to end.
template <typename T>
void attend_vectors(const Args<T>& a, const Item& it, std::vector<float>& buf) {
  const int64_t per_row = it.heads * a.group;
  const int64_t m_count = it.rows * per_row;
  buf.assign(m_count * (a.dq + a.dv + 2) + a.block_size, 0.f);
  float* qs = buf.data();                  // [m, dq], pre-scaled
  float* acc = qs + m_count * a.dq;        // [m, dv]
  float* mx = acc + m_count * a.dv;        // [m] running max
  float* den = mx + m_count;               // [m] running sum of exp
  float* s = den + m_count;                // [block_size] one block's scores, then probabilities
  load_queries(a, it, qs);
  std::fill(mx, mx + m_count, -std::numeric_limits<float>::infinity());
  const auto [first_pos, last_pos] = row_positions(a, it);
  for (int64_t blk = a.key_start / a.block_size; blk * a.block_size <= last_pos; ++blk) {
    const int64_t base = blk * a.block_size;
    const int64_t skip = std::max<int64_t>(0, a.key_start - base);  // the block's keys before key_start
    const auto [kb, vb] = block_kv(a, it, blk);
    const int64_t n_block = std::min(a.block_size, last_pos - base + 1);
    for (int64_t i = 0; i < it.rows; ++i) {
      // keys this row sees in the block: positions base + skip .. min(its own, block end)
      const int64_t n = std::min(n_block, first_pos + i - base + 1) - skip;
      if (n <= 0) continue;
      for (int64_t hg = 0; hg < per_row; ++hg) {
        const int64_t m = i * per_row + hg, h = hg / a.group;
        const T* kh = kb + h * a.ks2 + skip * a.ks1;
        for (int64_t t = 0; t < n; ++t) s[t] = dot(qs + m * a.dq, kh + t * a.ks1, a.dq);
        block_update(a, s, n, vb + h * a.vs2 + skip * a.vs1, mx[m], den[m], acc + m * a.dv);
      }
    }
  }
  store_outputs(a, it, acc, a.dv, mx, den);
}

// ---- Tile path: items of several query rows (prefill, chunks). Each block is staged once per item (keys
// transposed, values padded to whole registers) and reused by every query vector of the tile, in register
// blocks of kTileRows vectors x kLanes floats, so each loaded key/value row feeds kTileRows FMAs.
// Floats per vector register. A 16-float GCC vector without AVX-512 is no register: on an AVX2 build the prompt
// tiles ran about 3x slower with it (2-vCPU AMD EPYC, 2026-12-06, docs/benchmarks.md), so AVX2 and older use 8.
#if defined(__AVX512F__)
constexpr int64_t kLanes = 16;
#else
constexpr int64_t kLanes = 8;
#endif
constexpr int64_t kRowBlock = 4;  // query vectors per register block (decode: a query group padded to it)
// A prompt tile's register block: with 8-float vectors, 8 accumulators fit AVX2's 16 registers beside a key row
constexpr int64_t kTileRows = kLanes == 8 ? 8 : kRowBlock;

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

struct TileBuffers {
  int64_t mp, bsp, dvp;  // vectors padded to kTileRows; block and value widths padded to kLanes
  float *qs, *acc, *mx, *den, *s, *kt, *vp;  // [mp,dq] [mp,dvp] [mp] [mp] [kTileRows,bsp] [dq,bsp] [bsp,dvp]
};

template <typename T>
TileBuffers tile_buffers(const Args<T>& a, int64_t m_count, std::vector<float>& buf) {
  TileBuffers b{round_up(m_count, kTileRows), round_up(a.block_size, kLanes), round_up(a.dv, kLanes)};
  buf.assign(b.mp * (a.dq + b.dvp + 2) + kTileRows * b.bsp + a.dq * b.bsp + b.bsp * b.dvp, 0.f);
  b.qs = buf.data();
  b.acc = b.qs + b.mp * a.dq;
  b.mx = b.acc + b.mp * b.dvp;
  b.den = b.mx + b.mp;
  b.s = b.den + b.mp;
  b.kt = b.s + kTileRows * b.bsp;
  b.vp = b.kt + a.dq * b.bsp;
  std::fill(b.mx, b.mx + b.mp, -std::numeric_limits<float>::infinity());
  return b;
}

// GCC vector extension: one register of kLanes floats (split into narrower ops where the ISA lacks AVX-512).
// The compiler's own vectoriser picks the wrong loop in these register blocks, so they are written with it.
using Vec = float __attribute__((vector_size(kLanes * sizeof(float))));

inline Vec load_vec(const float* p) {
  Vec v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

inline Vec load_vec(const c10::BFloat16* p) {  // kLanes bf16 widened to fp32
  using Half = uint16_t __attribute__((vector_size(kLanes * sizeof(uint16_t))));
  using Word = uint32_t __attribute__((vector_size(kLanes * sizeof(uint32_t))));
  Half h;
  std::memcpy(&h, p, sizeof(h));
  const Word w = __builtin_convertvector(h, Word) << 16;
  Vec v;
  std::memcpy(&v, &w, sizeof(v));
  return v;
}

inline void store_vec(float* p, Vec v) { std::memcpy(p, &v, sizeof(v)); }

// s[r, :] = qs[r] . kt for R query vectors (qs: [R, dq], kt: [dq, bsp])
template <int64_t R>
inline void tile_scores(const float* __restrict qs, int64_t dq, const float* __restrict kt, int64_t bsp,
                        float* __restrict s) {
  for (int64_t c = 0; c < bsp; c += kLanes) {
    Vec x[R] = {};
    for (int64_t d = 0; d < dq; ++d) {
      const Vec k = load_vec(kt + d * bsp + c);
      for (int64_t r = 0; r < R; ++r) x[r] += qs[r * dq + d] * k;
    }
    for (int64_t r = 0; r < R; ++r) store_vec(s + r * bsp + c, x[r]);
  }
}

// acc[r] += p[r, :n] @ vp for R query vectors (p: [R, bsp], vp: [n, width], acc: [., width])
// (V rows `v_stride` apart, `width` a multiple of kLanes: the staged copy, or cache rows of such a width)
template <int64_t R, typename T>
inline void tile_pv(const float* __restrict p, int64_t bsp, int64_t n, const T* __restrict vp, int64_t v_stride,
                    int64_t width, float* __restrict acc) {
  for (int64_t c = 0; c < width; c += kLanes) {
    Vec x[R];
    for (int64_t r = 0; r < R; ++r) x[r] = load_vec(acc + r * width + c);
    for (int64_t t = 0; t < n; ++t) {
      const Vec v = load_vec(vp + t * v_stride + c);
      for (int64_t r = 0; r < R; ++r) x[r] += p[r * bsp + t] * v;
    }
    for (int64_t r = 0; r < R; ++r) store_vec(acc + r * width + c, x[r]);
  }
}

template <typename T>
void attend_tile(const Args<T>& a, const Item& it, std::vector<float>& buf) {
  const int64_t m_count = it.rows * a.group;
  TileBuffers b = tile_buffers(a, m_count, buf);
  load_queries(a, it, b.qs);
  const auto [first_pos, last_pos] = row_positions(a, it);
  for (int64_t blk = 0; blk * a.block_size <= last_pos; ++blk) {
    const int64_t base = blk * a.block_size;
    const auto [kb, vb] = block_kv(a, it, blk);
    const int64_t n_block = std::min(a.block_size, last_pos - base + 1);
    for (int64_t t = 0; t < n_block; ++t) {  // slots past n_block keep finite values and get weight 0
      for (int64_t d = 0; d < a.dq; ++d) b.kt[d * b.bsp + t] = to_float(kb[t * a.ks1 + d]);
      for (int64_t d = 0; d < a.dv; ++d) b.vp[t * b.dvp + d] = to_float(vb[t * a.vs1 + d]);
    }
    for (int64_t m0 = 0; m0 < b.mp; m0 += kTileRows) {
      tile_scores<kTileRows>(b.qs + m0 * a.dq, a.dq, b.kt, b.bsp, b.s);
      for (int64_t r = 0; r < kTileRows; ++r) {
        const int64_t m = m0 + r;
        const int64_t n = m < m_count ? std::min(n_block, first_pos + m / a.group - base + 1) : 0;
        row_softmax(b.s + r * b.bsp, n, b.bsp, b.mx[m], b.den[m], b.acc + m * b.dvp, b.dvp);
      }
      tile_pv<kTileRows>(b.s, b.bsp, n_block, b.vp, b.dvp, b.dvp, b.acc + m0 * b.dvp);
    }
  }
  store_outputs(a, it, b.acc, b.dvp, b.mx, b.den);
}

// A decode item whose value width fills whole registers: scores as dots from the cache rows, then P @ V
// register-blocked straight from the cache rows (a decode row uses each block once: nothing to stage).
// Each KV head's group is padded to whole register blocks: vector h * gp + g, g < group.
template <typename T>
void attend_decode(const Args<T>& a, const Item& it, std::vector<float>& buf) {
  const int64_t gp = round_up(a.group, kRowBlock), bsp = round_up(a.block_size, kLanes);
  const int64_t mp = it.heads * gp;
  buf.assign(mp * (a.dq + a.dv + 2) + kRowBlock * bsp, 0.f);
  float* qs = buf.data();            // [mp, dq], pre-scaled; padding vectors stay 0
  float* acc = qs + mp * a.dq;       // [mp, dv]
  float* mx = acc + mp * a.dv;       // [mp]
  float* den = mx + mp;              // [mp]
  float* s = den + mp;               // [kRowBlock, bsp]
  std::fill(mx, mx + mp, -std::numeric_limits<float>::infinity());
  const int64_t row = a.starts[it.seq] + it.row0;
  for (int64_t h = 0; h < it.heads; ++h) {
    for (int64_t g = 0; g < a.group; ++g) {
      const float* src = a.q + (row * a.heads + (it.kv_head + h) * a.group + g) * a.dq;
      for (int64_t d = 0; d < a.dq; ++d) qs[(h * gp + g) * a.dq + d] = src[d] * a.scale;
    }
  }
  const int64_t pos = row_positions(a, it).second;
  for (int64_t blk = a.key_start / a.block_size; blk * a.block_size <= pos; ++blk) {
    const int64_t skip = std::max<int64_t>(0, a.key_start - blk * a.block_size);  // the block's keys before key_start
    const int64_t n = std::min(a.block_size, pos - blk * a.block_size + 1) - skip;
    if (n <= 0) continue;
    auto [kb, vb] = block_kv(a, it, blk);
    kb += skip * a.ks1;
    vb += skip * a.vs1;
    for (int64_t h = 0; h < it.heads; ++h) {
      for (int64_t g0 = 0; g0 < gp; g0 += kRowBlock) {
        for (int64_t r = 0; r < kRowBlock; ++r) {
          const int64_t m = h * gp + g0 + r, valid = g0 + r < a.group ? n : 0;
          for (int64_t t = 0; t < valid; ++t) s[r * bsp + t] = dot(qs + m * a.dq, kb + h * a.ks2 + t * a.ks1, a.dq);
          row_softmax(s + r * bsp, valid, bsp, mx[m], den[m], acc + m * a.dv, a.dv);
        }
        tile_pv<kRowBlock>(s, bsp, n, vb + h * a.vs2, a.vs1, a.dv, acc + (h * gp + g0) * a.dv);
      }
    }
  }
  for (int64_t h = 0; h < it.heads; ++h) {
    for (int64_t g = 0; g < a.group; ++g) {
      const int64_t m = h * gp + g;
      store_vector(a, row * a.heads + (it.kv_head + h) * a.group + g, acc + m * a.dv, mx[m], den[m]);
    }
  }
}

template <typename T>
std::vector<Item> plan_items(const Args<T>& a, int64_t num_seqs, int64_t threads) {
  const int64_t rows_per_item = std::max<int64_t>(1, kTileVectors / a.group);
  // Decode rows take all KV heads in one item (each block read once, contiguously) when there are enough
  // sequences to keep the threads busy; otherwise one item per KV head.
  const bool whole_rows = num_seqs >= threads;
  std::vector<Item> items;
  for (int64_t b = 0; b < num_seqs; ++b) {
    const int64_t q_len = a.starts[b + 1] - a.starts[b];
    const int64_t first_pos = a.seq_lens[b] - q_len;
    if (q_len == 1 && whole_rows) {
      items.push_back({b, 0, a.kv_heads, 0, 1, a.kv_heads * a.seq_lens[b]});
      continue;
    }
    for (int64_t r = 0; r < q_len; r += rows_per_item) {
      const int64_t rows = std::min(rows_per_item, q_len - r);
      for (int64_t h = 0; h < a.kv_heads; ++h) items.push_back({b, h, 1, r, rows, rows * (first_pos + r + rows)});
    }
  }
  // longest first: the threads finish together instead of one waiting on a long prompt tile at the end
  std::stable_sort(items.begin(), items.end(), [](const Item& x, const Item& y) { return x.cost > y.cost; });
  return items;
}

// causal: every query sits in its sequence's context (q_len <= seq_len); decode partials only need
// seq_len >= 0 (a segment may hold no key).
template <typename T>
void check_tables(const Args<T>& a, int64_t num_seqs, int64_t num_blocks, int64_t num_rows, bool causal) {
  TORCH_CHECK_VALUE(a.starts[0] == 0 && a.starts[num_seqs] == num_rows, "query_start_loc must run from 0 to N");
  for (int64_t b = 0; b < num_seqs; ++b) {
    const int64_t q_len = a.starts[b + 1] - a.starts[b];
    TORCH_CHECK_VALUE(q_len >= 0 && (causal ? q_len <= a.seq_lens[b] : a.seq_lens[b] >= 0), "query_start_loc gives "
                      "sequence ", b, " ", q_len, " queries but seq_lens holds ", a.seq_lens[b]);
    const int64_t need = (a.seq_lens[b] + a.block_size - 1) / a.block_size;
    TORCH_CHECK_VALUE(need <= a.table_width, "block_tables: sequence ", b, " needs ", need, " blocks, its row holds ",
                      a.table_width);
    for (int64_t j = 0; j < need; ++j) {
      const int64_t id = a.tables[b * a.table_width + j];
      TORCH_CHECK_VALUE(id >= 0 && id < num_blocks, "block_tables: sequence ", b, " names block ", id, " of ",
                        num_blocks);
    }
  }
}

// f(T{}) for the pools' element type T (q fp32; the pools both fp32 or both bf16).
template <typename F>
auto with_pool_type(const torch::Tensor& q, const torch::Tensor& k_cache, const torch::Tensor& v_cache, F&& f) {
  TORCH_CHECK_VALUE(q.scalar_type() == at::kFloat, "q must be fp32");
  const auto pools = k_cache.scalar_type();
  TORCH_CHECK_VALUE(v_cache.scalar_type() == pools && (pools == at::kFloat || pools == at::kBFloat16),
                    "k_cache and v_cache must be both fp32 or both bf16");
  return pools == at::kBFloat16 ? f(c10::BFloat16{}) : f(float{});
}

// The arguments' checks and the Args over them (the tensors stay alive in the caller), `out` still to be set.
template <typename T>
Args<T> make_args(torch::Tensor& q, const torch::Tensor& k_cache, const torch::Tensor& v_cache,
                  torch::Tensor& block_tables, torch::Tensor& seq_lens, torch::Tensor& query_start_loc, double scale) {
  TORCH_CHECK_VALUE(q.dim() == 3 && k_cache.dim() == 4 && v_cache.dim() == 4 && block_tables.dim() == 2,
                    "q must be [N, heads, dq], k_cache / v_cache [blocks, block_size, kv_heads, d], block_tables 2-D");
  TORCH_CHECK_VALUE(k_cache.stride(3) == 1 && v_cache.stride(3) == 1,
                    "k_cache / v_cache rows must be dense in their last dim");
  TORCH_CHECK_VALUE(k_cache.size(0) == v_cache.size(0) && k_cache.size(1) == v_cache.size(1) &&
                        k_cache.size(2) == v_cache.size(2), "k_cache and v_cache must have one block geometry");
  TORCH_CHECK_VALUE(seq_lens.numel() == block_tables.size(0) && query_start_loc.numel() == block_tables.size(0) + 1,
                    "seq_lens must hold B entries and query_start_loc B + 1, B = block_tables rows");
  q = q.contiguous();
  block_tables = block_tables.to(at::kLong).contiguous();
  seq_lens = seq_lens.to(at::kLong).contiguous();
  query_start_loc = query_start_loc.to(at::kLong).contiguous();
  const int64_t heads = q.size(1), kv_heads = k_cache.size(2);
  TORCH_CHECK_VALUE(heads % kv_heads == 0, "q heads ", heads, " are not a multiple of k_cache's KV heads ", kv_heads);
  TORCH_CHECK_VALUE(q.size(2) == k_cache.size(3), "q width ", q.size(2), " differs from k_cache's ", k_cache.size(3));
  return Args<T>{q.data_ptr<float>(), k_cache.data_ptr<T>(), v_cache.data_ptr<T>(), nullptr,
              block_tables.data_ptr<int64_t>(), seq_lens.data_ptr<int64_t>(), query_start_loc.data_ptr<int64_t>(),
              heads, kv_heads, heads / kv_heads, q.size(2), v_cache.size(3), k_cache.size(1), block_tables.size(1),
              k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), v_cache.stride(0), v_cache.stride(1),
              v_cache.stride(2), static_cast<float>(scale)};
}

template <typename T>
void run_items(const Args<T>& a, int64_t num_seqs) {
  const std::vector<Item> items = plan_items(a, num_seqs, at::get_num_threads());
  std::atomic<int64_t> next{0};
  const int workers = static_cast<int>(std::max<int64_t>(
      1, std::min<int64_t>(at::get_num_threads(), static_cast<int64_t>(items.size()))));
  // A plain OpenMP region, not at::parallel_for: that one is inline code, so this library would carry its own
  // copy of torch's per-thread "pool initialised" flag, and its first call on a thread would reset the
  // thread's pool to torch's process default (one thread in a service; zeroc/cpu_threads.py).
#pragma omp parallel num_threads(workers)
  {
    std::vector<float> buf;
    for (int64_t i = next++; i < static_cast<int64_t>(items.size()); i = next++) {
      if (items[i].rows > 1) {
        attend_tile(a, items[i], buf);
      } else if (a.dv % kLanes == 0) {
        attend_decode(a, items[i], buf);
      } else {
        attend_vectors(a, items[i], buf);
      }
    }
  }
}

}  // namespace

// q: [N, heads, dq] fp32; k_cache: [blocks, block_size, kv_heads, dq]; v_cache: [..., dv] (fp32 or bf16, last dims
// dense); block_tables: [B, W] int64; seq_lens: [B] int64; query_start_loc: [B + 1] int64 -> [N, heads, dv] fp32
torch::Tensor ragged_paged_attention(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                                     torch::Tensor block_tables, torch::Tensor seq_lens,
                                     torch::Tensor query_start_loc, double scale) {
  return with_pool_type(q, k_cache, v_cache, [&](auto pool_type) {
    auto a = make_args<decltype(pool_type)>(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale);
    auto out = torch::empty({q.size(0), q.size(1), v_cache.size(3)}, q.options());
    a.out = out.data_ptr<float>();
    check_tables(a, block_tables.size(0), k_cache.size(0), q.size(0), true);
    run_items(a, block_tables.size(0));
    return out;
  });
}

// One query per sequence ([B, heads, dq]) over its keys [key_start, seq_len) only, unnormalised by anything
// else -> (out [B, heads, dv], lse [B, heads]): a partial to merge by log-sum-exp with attention over other keys
// (a token tier's compressed segment, zeroc/policies/tier.py). A sequence with no such key gets 0 and -inf.
std::vector<torch::Tensor> ragged_decode_partials(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                                                  torch::Tensor block_tables, torch::Tensor seq_lens, double scale,
                                                  int64_t key_start) {
  TORCH_CHECK_VALUE(key_start >= 0, "key_start must be >= 0, got ", key_start);
  TORCH_CHECK_VALUE(q.dim() == 3 && q.size(0) == block_tables.size(0), "q must hold one query per sequence");
  auto starts = torch::arange(q.size(0) + 1, torch::TensorOptions().dtype(at::kLong));
  return with_pool_type(q, k_cache, v_cache, [&](auto pool_type) {
    auto a = make_args<decltype(pool_type)>(q, k_cache, v_cache, block_tables, seq_lens, starts, scale);
    auto out = torch::empty({q.size(0), q.size(1), v_cache.size(3)}, q.options());
    auto lse = torch::empty({q.size(0), q.size(1)}, q.options());
    a.out = out.data_ptr<float>();
    a.key_start = key_start;
    a.lse = lse.data_ptr<float>();
    check_tables(a, block_tables.size(0), k_cache.size(0), q.size(0), false);
    run_items(a, block_tables.size(0));
    return std::vector<torch::Tensor>{out, lse};
  });
}

// tier_decode.cpp, built into the same module
torch::Tensor tier_decode(torch::Tensor q, torch::Tensor pool, int64_t k_dim, torch::Tensor blocks,
                          torch::Tensor offsets, torch::Tensor tier_ids, torch::Tensor seen, torch::Tensor k_own,
                          torch::Tensor v_own, torch::Tensor parts, torch::Tensor lses, double scale);

// sampling.cpp, built into the same module
torch::Tensor sample_rows(torch::Tensor logits, std::optional<torch::Tensor> temperature,
                          std::optional<torch::Tensor> top_k, std::optional<torch::Tensor> top_p,
                          std::optional<torch::Tensor> greedy, std::optional<torch::Tensor> u,
                          std::optional<torch::Tensor> min_p);
void apply_token_bitmask(torch::Tensor scores, torch::Tensor packed, int64_t r);

// layer_ops.cpp, built into the same module
std::optional<torch::Tensor> rms_norm(torch::Tensor x, torch::Tensor weight, double eps);
std::optional<std::tuple<torch::Tensor, torch::Tensor>> add_rms_norm(torch::Tensor x, torch::Tensor residual,
                                                                     torch::Tensor weight, double eps);
std::optional<torch::Tensor> apply_rope(torch::Tensor x, torch::Tensor cos, torch::Tensor sin);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("ragged_paged_attention", &ragged_paged_attention, "ragged causal GQA attention over a paged KV cache");
  m.def("ragged_decode_partials", &ragged_decode_partials, "one query per sequence over keys from key_start, with LSE");
  m.def("tier_decode", &tier_decode, "a token tier's full-rank decode segment, merged with the compressed partials");
  m.def("sample_rows", &sample_rows, "one token per row of logits: greedy, temperature, min-p, top-k, top-p",
        pybind11::arg("logits"), pybind11::arg("temperature") = pybind11::none(),
        pybind11::arg("top_k") = pybind11::none(), pybind11::arg("top_p") = pybind11::none(),
        pybind11::arg("greedy") = pybind11::none(), pybind11::arg("u") = pybind11::none(),
        pybind11::arg("min_p") = pybind11::none());
  m.def("apply_token_bitmask", &apply_token_bitmask,
        "structured output's mask, in place: excluded tokens to the lowest finite score (kernels/token_bitmask.py)");
  m.def("rms_norm", &rms_norm, "RMSNorm of each row (kernels/layer_ops.py rms_norm_ref)");
  m.def("add_rms_norm", &add_rms_norm, "a residual add and the RMSNorm of its sum (add_rms_norm_ref)");
  m.def("apply_rope", &apply_rope, "rotate-half RoPE from cos/sin tables (kernels/qkv_epilogue.py apply_rope_ref)");
}
