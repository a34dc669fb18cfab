// One token per row of a step's logits on the CPU, in one call: the CPU build of zeroc.sampling's torch path
// (`sample_batch`), with the same contract and, row by row, the same arithmetic.
//
// Why: the torch path makes a pass over [B, V] per op (a float copy, max, min, shift, scale, exp, top-k or a
// sort, masks, cumsum, search). Here a row is read once for its max, argmax and finiteness, and a random row's
// weights are made once into a buffer that stays in cache for its cut and its inverse-CDF draw. A nucleus
// (top-p) is found by a radix select on the weights' bits, two passes however flat the distribution is,
// where the torch path sorts the whole vocabulary once the nucleus reaches past its 1,024 candidates.
//
// The same numbers as the torch path: the weights are exp((x - max) / T) by torch's own exp, the top-k threshold
// is the k-th largest weight, and the inverse CDF accumulates in double and rounds each prefix to float, as
// torch's CPU cumsum does. So greedy, temperature and top-k rows give the torch path's ids for the same
// uniforms, bit for bit. A top-p cut compares masses summed in another order than torch's sum, so where a
// nucleus boundary falls within float rounding of p the two may keep one token more or less.
// Rows run in torch's thread pool. Built by kernels/ragged_cpu.py into the CPU kernel module.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <bit>
#include <cmath>
#include <cstring>
#include <functional>
#include <limits>
#include <numeric>
#include <optional>
#include <queue>
#include <type_traits>
#include <vector>

namespace {

constexpr int64_t kChunk = 2048;  // floats a row is converted and scanned in (8 KiB: stays in L1)
constexpr int64_t kFailed = -1;   // zeroc.sampling.FAILED: the row's logits are not finite
// Top-k by a heap up to this k; past it the heap's pushes (some k ln(V / k)) cost more than the radix select's
// two passes (8k tokens, 1 thread: a plain heap took 200 us a row at k = 1,000, the radix select 50).
constexpr int64_t kHeapMaxK = 128;

struct Row {
  float temperature;  // > 0 for a random row
  int64_t top_k;      // in [1, V]; V: no cut
  float top_p;        // in (0, 1]; 1: no cut
  bool greedy;
  float u;      // U[0, 1), the row's draw
  float min_p;  // in [0, 1]; 0: no cut. Weights are probabilities over the top one's: it cuts them as they are
};

inline void to_float(const float* src, float* dst, int64_t n) { std::memcpy(dst, src, n * sizeof(float)); }
inline void to_float(const at::BFloat16* src, float* dst, int64_t n) {  // exact: bf16 is fp32's top half
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) dst[i] = std::bit_cast<float>(uint32_t(src[i].x) << 16);
}

// The row's largest value and its first index, and whether every value is finite (x * 0 is NaN for inf/NaN).
template <typename T>
bool scan_max(const T* x, int64_t vocab, float* buf, float* best, int64_t* best_id) {
  float top = -std::numeric_limits<float>::infinity(), poison = 0.f;
  int64_t id = 0;
  for (int64_t c0 = 0; c0 < vocab; c0 += kChunk) {
    const int64_t n = std::min(kChunk, vocab - c0);
    const float* c = buf;  // the chunk as floats: fp32 rows in place, bf16 ones converted
    if constexpr (std::is_same_v<T, float>)
      c = x + c0;
    else
      to_float(x + c0, buf, n);
    float m = -std::numeric_limits<float>::infinity(), p = 0.f;
#pragma omp simd reduction(max : m) reduction(+ : p)
    for (int64_t i = 0; i < n; ++i) {
      m = c[i] > m ? c[i] : m;
      p += c[i] * 0.f;
    }
    poison += p;
    if (m > top) {  // rarely after the first chunks: find the chunk's first maximum
      int64_t i = 0;
      while (c[i] != m) ++i;
      top = m;
      id = c0 + i;
    }
  }
  *best = top;
  *best_id = id;
  return poison == 0.f;
}

// w [V] = exp((x - top) / T), as the torch path's sub_, div_ and exp_ compute it: the shift and the division are
// IEEE operations either way, and the exp is torch's own (at::exp_, which on x86 may be MKL's, not Sleef's).
template <typename T>
void weights_of(const T* x, int64_t vocab, float top, float temperature, float* w) {
  to_float(x, w, vocab);
#pragma omp simd
  for (int64_t i = 0; i < vocab; ++i) w[i] = (w[i] - top) / temperature;
  torch::from_blob(w, {vocab}, torch::dtype(at::kFloat)).exp_();
}

// A thread's buffers for the radix select, reused row after row.
struct Select {
  std::vector<double> share = std::vector<double>(1 << 12);  // each bin's share at the current level
  std::vector<float> items;                                  // the chosen bin's weights
};

// Largest-first selection over w [V] (non-negative floats, which order as their bits): the smallest weight v
// at or above `floor` whose share of the weights strictly above it is below the target, where a weight's share
// is itself (kMass: a nucleus) or 1 (a count: the k-th largest is the smallest v with fewer than k above it).
// Tied weights stay or go together. A radix select over levels of 12, 10 and 10 bits: the first bin from the top
// whose share takes the running one to the target holds v, and the next level splits that bin. The first level
// reads the whole row and gives the total share, from which `target_of` makes the target; the chosen bin's
// weights are then gathered, so a cut costs two passes over the row however much of it the cut keeps.
template <bool kMass, typename TargetOf>
float select_largest(const float* w, int64_t vocab, float floor, TargetOf target_of, Select& sel) {
  constexpr int kShift[3] = {20, 10, 0}, kBins[3] = {1 << 12, 1 << 10, 1 << 10};
  auto& share = sel.share;
  auto& items = sel.items;
  std::fill(share.begin(), share.end(), 0.0);
  for (int64_t i = 0; i < vocab; ++i)
    if (w[i] >= floor) share[std::bit_cast<uint32_t>(w[i]) >> kShift[0]] += kMass ? w[i] : 1.0;
  const double target = target_of(std::accumulate(share.begin(), share.end(), 0.0));
  double above = 0.0;   // the share of the weights above the chosen bin: always below the target
  uint32_t prefix = 0;  // the bits the levels so far fixed
  for (int level = 0; level < 3; ++level) {
    const int bins = kBins[level];
    if (level > 0) {
      std::fill(share.begin(), share.begin() + bins, 0.0);
      for (float x : items) share[(std::bit_cast<uint32_t>(x) >> kShift[level]) & (bins - 1)] += kMass ? x : 1.0;
    }
    // From the top bin down. If rounding keeps a nucleus's mass below the target to the end, the lowest bin with
    // a share holds v (the whole row stays).
    int bin = -1;
    double before = above;  // the share above `bin`
    for (int b = bins - 1; b >= 0; --b) {
      if (share[b] == 0.0) continue;
      bin = b;
      before = above;
      above += share[b];
      if (above >= target) break;
    }
    if (bin < 0) return floor;  // nothing at or above floor: not reached, a random row's top weight is 1
    above = before;
    prefix = level == 0 ? uint32_t(bin) : (prefix << (kShift[level - 1] - kShift[level])) | uint32_t(bin);
    if (level == 0) {  // gather the bin: the next levels split it
      items.clear();
      for (int64_t i = 0; i < vocab; ++i)
        if (w[i] >= floor && std::bit_cast<uint32_t>(w[i]) >> kShift[0] == prefix) items.push_back(w[i]);
    } else if (level == 1) {
      std::erase_if(items, [&](float x) { return std::bit_cast<uint32_t>(x) >> kShift[1] != prefix; });
    }
  }
  return std::max(std::bit_cast<float>(prefix), floor);
}

// The k-th largest of w [V], duplicates counted (what torch.topk's k-th value is): for a small k a min-heap of the
// largest seen, skipping each run of 16 weights whose largest does not beat the heap's least (after the first
// few runs, nearly all of them); the radix select otherwise.
float kth_largest(const float* w, int64_t vocab, int64_t k, Select& sel) {
  if (k > kHeapMaxK) return select_largest<false>(w, vocab, 0.f, [k](double) { return double(k); }, sel);
  std::priority_queue<float, std::vector<float>, std::greater<float>> heap(std::greater<float>(),
                                                                           std::vector<float>(w, w + k));
  constexpr int64_t kRun = 16;
  for (int64_t i0 = k; i0 < vocab; i0 += kRun) {
    const int64_t end = std::min(i0 + kRun, vocab);
    float m = 0.f;  // weights are >= 0
#pragma omp simd reduction(max : m)
    for (int64_t i = i0; i < end; ++i) m = w[i] > m ? w[i] : m;
    if (m <= heap.top()) continue;
    for (int64_t i = i0; i < end; ++i)
      if (w[i] > heap.top()) {
        heap.pop();
        heap.push(w[i]);
      }
  }
  return heap.top();
}

// The nucleus threshold over the weights at or above floor (a row's top-k set): taken in descending order, a
// token stays while the mass before it is below top_p times their total.
float nucleus(const float* w, int64_t vocab, float floor, float top_p, Select& sel) {
  return select_largest<true>(w, vocab, floor, [top_p](double total) { return double(top_p * float(total)); }, sel);
}

// The first index whose running sum of the kept weights (w >= cut) exceeds u times their total. The sums
// accumulate in double and each prefix is rounded to float, as torch's CPU cumsum does; they overwrite w.
// A cut row sums its kept weights only (the dropped ones would add exact zeros), in vocabulary order.
int64_t inverse_cdf(float* w, int64_t vocab, float cut, float u, std::vector<int64_t>& kept) {
  kept.clear();
  if (cut > 0.f)
    for (int64_t i = 0; i < vocab; ++i)
      if (w[i] >= cut) kept.push_back(i);
  const int64_t n = cut > 0.f ? int64_t(kept.size()) : vocab;
  double acc = 0.0;
  for (int64_t j = 0; j < n; ++j) {  // w[kept[j]] is read before w[j] is written: kept[j] >= j
    acc += cut > 0.f ? w[kept[j]] : w[j];
    w[j] = float(acc);
  }
  const float total = w[n - 1];
  const float v = std::min(u * total, std::nextafter(total, 0.f));
  const int64_t j = std::upper_bound(w, w + n, v) - w;  // below total: always one of the n
  return cut > 0.f ? kept[j] : j;
}

// A thread's buffers, reused row after row.
struct Scratch {
  std::vector<float> w;         // [V] a row's weights, then their prefix sums
  Select select;                // a radix select's bins
  std::vector<int64_t> kept;    // a cut row's kept tokens
};

template <typename T>
int64_t sample_row(const T* x, int64_t vocab, const Row& row, Scratch& s) {
  float* w = s.w.data();
  float top;
  int64_t best;
  if (!scan_max(x, vocab, w, &top, &best)) return kFailed;
  if (row.greedy) return best;
  weights_of(x, vocab, top, row.temperature, w);
  // min_p and top-k both keep the weights at or above a threshold: the larger one; top-p shares out their mass
  float cut = std::max(row.top_k < vocab ? kth_largest(w, vocab, row.top_k, s.select) : 0.f, row.min_p);
  if (row.top_p < 1.f) cut = std::max(cut, nucleus(w, vocab, cut, row.top_p, s.select));
  return inverse_cdf(w, vocab, cut, row.u, s.kept);
}

}  // namespace

// logits [B, V] fp32 or bf16; temperature, top_p, u [B] fp32; top_k [B] int64; greedy [B] bool -> ids [B] int64,
// -1 (zeroc.sampling.FAILED) where a row's logits are not finite. An all-greedy batch passes None for the five
// parameters. min_p [B] fp32, optional (None: no row cuts by it). Rows are independent: a row's id depends on its
// own logits, parameters and u only.
torch::Tensor sample_rows(torch::Tensor logits, std::optional<torch::Tensor> temperature,
                          std::optional<torch::Tensor> top_k, std::optional<torch::Tensor> top_p,
                          std::optional<torch::Tensor> greedy, std::optional<torch::Tensor> u,
                          std::optional<torch::Tensor> min_p) {
  TORCH_CHECK_VALUE(logits.dim() == 2 && logits.size(1) > 0, "logits must be [B, V] with V > 0");
  TORCH_CHECK_VALUE(logits.scalar_type() == at::kFloat || logits.scalar_type() == at::kBFloat16,
                    "logits must be float32 or bfloat16");
  const int64_t rows = logits.size(0), vocab = logits.size(1);
  const bool all_greedy = !temperature.has_value();
  TORCH_CHECK_VALUE(all_greedy == !top_k.has_value() && all_greedy == !top_p.has_value() &&
                        all_greedy == !greedy.has_value() && all_greedy == !u.has_value(),
                    "pass every parameter, or none for an all-greedy batch");
  std::vector<float> temp_v, tp_v, u_v, mp_v(rows, 0.f);
  std::vector<int64_t> tk_v;
  std::vector<uint8_t> gr_v;
  if (all_greedy) {
    TORCH_CHECK_VALUE(!min_p.has_value(), "pass every parameter, or none for an all-greedy batch");
    temp_v.assign(rows, 1.f), tp_v.assign(rows, 1.f), u_v.assign(rows, 0.f), tk_v.assign(rows, vocab);
    gr_v.assign(rows, 1);
  } else {
    for (const auto& t : {*temperature, *top_k, *top_p, *greedy, *u})
      TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == rows, "every parameter must hold one value per row");
    auto values = [](const torch::Tensor& t, auto dtype, auto& out) {
      auto c = t.to(dtype).contiguous();
      using V = typename std::decay_t<decltype(out)>::value_type;
      out.assign(c.template data_ptr<V>(), c.template data_ptr<V>() + c.numel());
    };
    values(*temperature, at::kFloat, temp_v), values(*top_p, at::kFloat, tp_v), values(*u, at::kFloat, u_v);
    values(*top_k, at::kLong, tk_v), values(*greedy, at::kByte, gr_v);
    if (min_p.has_value()) {
      TORCH_CHECK_VALUE(min_p->dim() == 1 && min_p->size(0) == rows, "every parameter must hold one value per row");
      values(*min_p, at::kFloat, mp_v);
    }
  }
  for (int64_t r = 0; r < rows; ++r)
    TORCH_CHECK_VALUE(gr_v[r] || (temp_v[r] > 0.f && tk_v[r] >= 1 && tk_v[r] <= vocab && tp_v[r] > 0.f &&
                                  tp_v[r] <= 1.f && mp_v[r] >= 0.f && mp_v[r] <= 1.f),
                      "row ", r, ": a random row needs temperature > 0, top_k in [1, V], top_p in (0, 1] and min_p "
                      "in [0, 1]");
  auto x = logits.contiguous();
  auto ids = torch::empty({rows}, torch::dtype(at::kLong));
  int64_t* out = ids.data_ptr<int64_t>();
  // Rows handed out from a counter in a plain OpenMP region of torch's thread count, as run_items does in
  // ragged_attention.cpp: at::parallel_for is inline code, whose first call on a thread from this library would
  // reset that thread's pool to torch's process default (one thread in a service; zeroc/cpu_threads.py).
  // One row runs on the calling thread, outside any region. Inside a team of one, which OpenMP does not count as a
  // parallel region, the exp (torch's, which may be MKL's) runs parallel code of its own there: measured on 2
  // cores, a sampled row took 1.7-2.2 ms a call after an idle millisecond, against 33 us on the calling thread.
  const int workers = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), rows)));
  auto run = [&](const auto* base) {
    std::atomic<int64_t> next{0};
    auto rows_from_counter = [&] {
      Scratch s;
      s.w.resize(std::max(vocab, kChunk));
      for (int64_t r = next++; r < rows; r = next++)
        out[r] = sample_row(base + r * vocab, vocab,
                            Row{temp_v[r], tk_v[r], tp_v[r], gr_v[r] != 0, u_v[r], mp_v[r]}, s);
    };
    if (workers == 1) {
      rows_from_counter();
      return;
    }
#pragma omp parallel num_threads(workers)
    rows_from_counter();
  };
  if (x.scalar_type() == at::kFloat)
    run(x.data_ptr<float>());
  else
    run(x.data_ptr<at::BFloat16>());
  return ids;
}

// Structured output's mask (kernels/token_bitmask.py, whose apply_token_bitmask_ref this matches bit for bit):
// scores [B, V] fp32, bf16 or fp16, unit stride along V, changed in place; packed [r * words + r] int32: r bitmasks
// (bit j of word w allows token 32 w + j), then the row of scores each belongs to. Every excluded token gets the
// dtype's lowest finite value. A word of all ones (32 allowed tokens) is skipped: a row costs a pass over its words
// and a write per excluded token, where the torch reference makes some eight passes over a [r, V] tensor.
void apply_token_bitmask(torch::Tensor scores, torch::Tensor packed, int64_t r) {
  TORCH_CHECK_VALUE(scores.dim() == 2 && scores.stride(1) == 1 && scores.device().is_cpu(),
                    "scores must be [B, V] on the CPU, contiguous along V");
  TORCH_CHECK_VALUE(packed.dim() == 1 && packed.is_contiguous() && packed.scalar_type() == at::kInt &&
                        packed.device().is_cpu(), "packed must be a contiguous int32 vector on the CPU");
  const int64_t n = packed.size(0) - r, vocab = scores.size(1), batch = scores.size(0);
  TORCH_CHECK_VALUE(r >= 1 && n >= 0 && n % r == 0, "token bitmask: ", packed.size(0),
                    " int32s do not hold ", r, " rows' bitmasks and indices");
  const int64_t words = n / r;
  TORCH_CHECK_VALUE(words * 32 >= vocab, "token bitmask: ", words, " words a row cannot cover ", vocab, " tokens");
  const int32_t* bits = packed.data_ptr<int32_t>();
  for (int64_t i = 0; i < r; ++i)
    TORCH_CHECK_VALUE(bits[n + i] >= 0 && bits[n + i] < batch, "token bitmask: row ", bits[n + i], " not in [0, ",
                      batch, ")");
  const int workers = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), r)));
  auto run = [&](auto* base) {
    using T = std::remove_pointer_t<decltype(base)>;
    const T lowest = std::numeric_limits<T>::lowest();
    std::atomic<int64_t> next{0};
#pragma omp parallel num_threads(workers)  // as sample_rows: a plain region of torch's thread count
    for (int64_t i = next++; i < r; i = next++) {
      T* x = base + bits[n + i] * scores.stride(0);
      const int32_t* row = bits + i * words;
      for (int64_t w = 0; w * 32 < vocab; ++w) {
        const uint32_t word = static_cast<uint32_t>(row[w]);
        if (word == 0xFFFFFFFFu) continue;
        const int64_t end = std::min<int64_t>(32, vocab - w * 32);
        for (int64_t j = 0; j < end; ++j)
          if (!((word >> j) & 1u)) x[w * 32 + j] = lowest;
      }
    }
  };
  if (scores.scalar_type() == at::kFloat)
    run(scores.data_ptr<float>());
  else if (scores.scalar_type() == at::kBFloat16)
    run(scores.data_ptr<at::BFloat16>());
  else if (scores.scalar_type() == at::kHalf)
    run(scores.data_ptr<at::Half>());
  else
    TORCH_CHECK_VALUE(false, "scores must be float32, bfloat16 or float16");
}
