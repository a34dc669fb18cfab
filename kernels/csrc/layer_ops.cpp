// A decoder layer's elementwise ops for the cpu backend, one call each (kernels/cpu_layer_ops.py, beside their
// references in kernels/layer_ops.py and kernels/qkv_epilogue.py).
//
// Why: at a decode step's one row an op's work is a few hundred elements, and eager PyTorch pays some 4 us of
// dispatch per op: RMSNorm after a residual add (add, cast, pow, mean, add, rsqrt, mul, cast, mul) and
// rotate-half RoPE (slices, neg, cat, two muls, an add) took 60-80 us a layer on the bundled model, 15% of its
// decode step. Here each is one pass over the rows, on the calling thread unless there are many.
//
// The same numbers as the references: each product and sum is rounded to the tensor's dtype where the reference's
// eager op rounds it (c10's BFloat16 and Half operators compute in float and round each result, as torch's CPU
// kernels do), and nothing is contracted into an FMA (the pragma below; the module's other files build with
// -ffp-contract=fast). So RoPE gives the reference's bits, and RMSNorm differs only in the order of its sum of
// squares. Built by kernels/ragged_cpu.py into the CPU kernel module.
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <tuple>

#pragma GCC optimize("fp-contract=off")

namespace {

constexpr int64_t kWorkPerThread = 1 << 15;  // elements worth waking another thread for
constexpr int kLanes = 8;                    // partial sums of squares, so the loop vectorises without reordering

// fn(begin, end) over [0, rows): on the calling thread when the work is small (a decode step), else in a plain
// OpenMP region of torch's thread count (not at::parallel_for: see run_items in ragged_attention.cpp).
template <typename F>
void over_rows(int64_t rows, int64_t row_elems, const F& fn) {
  const int64_t want = std::max<int64_t>(1, rows * row_elems / kWorkPerThread);
  const int workers = static_cast<int>(std::min<int64_t>({static_cast<int64_t>(at::get_num_threads()), want, rows}));
  if (workers <= 1) {
    fn(int64_t{0}, rows);
    return;
  }
  const int64_t chunk = (rows + workers - 1) / workers;
#pragma omp parallel for num_threads(workers) schedule(static)
  for (int w = 0; w < workers; ++w)
    fn(std::min<int64_t>(rows, w * chunk), std::min<int64_t>(rows, (w + 1) * chunk));
}

// One row: h = x (+ res, rounded to T and stored in sum), then w * T(h * rsqrt(mean(h^2) + eps)) into out.
template <typename T>
void norm_row(const T* x, const T* res, const T* w, T* out, T* sum, int64_t H, float eps) {
  const T* h = x;
  if (res != nullptr) {
    for (int64_t i = 0; i < H; ++i)
      sum[i] = x[i] + res[i];
    h = sum;
  }
  float acc[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= H; i += kLanes)
    for (int l = 0; l < kLanes; ++l) {
      const float f = static_cast<float>(h[i + l]);
      acc[l] += f * f;
    }
  for (; i < H; ++i) {
    const float f = static_cast<float>(h[i]);
    acc[0] += f * f;
  }
  float ss = 0.f;
  for (float a : acc)
    ss += a;
  const float inv = 1.f / std::sqrt(ss / static_cast<float>(H) + eps);
  for (int64_t j = 0; j < H; ++j)
    out[j] = w[j] * static_cast<T>(static_cast<float>(h[j]) * inv);
}

template <typename F>
auto with_dtype(const torch::Tensor& x, const F& fn) {
  switch (x.scalar_type()) {
    case at::kFloat:
      return fn(float{});
    case at::kBFloat16:
      return fn(at::BFloat16{});
    case at::kHalf:
      return fn(at::Half{});
    default:  // `takes` let none through
      TORCH_CHECK_VALUE(false, "float32, bfloat16 or float16 tensors expected, got ", x.scalar_type());
      return fn(float{});
  }
}

// Whether the kernel takes these tensors: one dtype it computes in, on the CPU, and no gradient to record (it
// records no autograd graph). The callers give anything else to the references.
bool takes(std::initializer_list<const torch::Tensor*> ts) {
  const auto dtype = (*ts.begin())->scalar_type();
  if (dtype != at::kFloat && dtype != at::kBFloat16 && dtype != at::kHalf)
    return false;
  const bool grad = at::GradMode::is_enabled();
  for (const auto* t : ts)
    if (t->scalar_type() != dtype || !t->device().is_cpu() || (grad && t->requires_grad()))
      return false;
  return true;
}

// [*, H] -> [rows, H] with dense rows: a view where t allows one
torch::Tensor as_rows(const torch::Tensor& t, int64_t H) {
  auto rows = t.reshape({-1, H});
  return rows.stride(1) == 1 ? rows : rows.contiguous();
}

// out = RMSNorm(x (+ residual)), and the sum into *sum where there is a residual; all [*, H].
torch::Tensor norm(const torch::Tensor& x_in, const torch::Tensor* residual, const torch::Tensor& weight_in, double eps,
                   torch::Tensor* sum) {
  const int64_t H = x_in.size(-1);
  const auto x = as_rows(x_in, H);
  const auto res = residual != nullptr ? as_rows(*residual, H) : torch::Tensor();
  const auto weight = weight_in.contiguous();
  const int64_t rows = x.size(0);
  auto out = torch::empty(x_in.sizes(), x.options());
  if (residual != nullptr)
    *sum = torch::empty(x_in.sizes(), x.options());
  with_dtype(x, [&](auto type) {
    using T = decltype(type);
    const T* xp = x.data_ptr<T>();
    const T* rp = residual != nullptr ? res.data_ptr<T>() : nullptr;
    T* sp = residual != nullptr ? sum->data_ptr<T>() : nullptr;
    const T* wp = weight.data_ptr<T>();
    T* op = out.data_ptr<T>();
    const int64_t sx = x.stride(0), sr = residual != nullptr ? res.stride(0) : 0;
    over_rows(rows, H, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r)
        norm_row(xp + r * sx, rp != nullptr ? rp + r * sr : nullptr, wp, op + r * H,
                 sp != nullptr ? sp + r * H : nullptr, H, static_cast<float>(eps));
    });
    return 0;
  });
  return out;
}

bool norm_shapes(const torch::Tensor& x, const torch::Tensor& weight) {
  return x.dim() >= 1 && x.numel() > 0 && weight.dim() == 1 && weight.size(0) == x.size(-1);
}

}  // namespace

// x: [*, H]; weight: [H] -> RMSNorm(x) [*, H], as rms_norm_ref; None where the kernel does not take them (`takes`).
std::optional<torch::Tensor> rms_norm(torch::Tensor x, torch::Tensor weight, double eps) {
  if (!takes({&x, &weight}) || !norm_shapes(x, weight))
    return std::nullopt;
  return norm(x, nullptr, weight, eps, nullptr);
}

// x, residual: [*, H]; weight: [H] -> (RMSNorm(x + residual), x + residual), as add_rms_norm_ref; None likewise.
std::optional<std::tuple<torch::Tensor, torch::Tensor>> add_rms_norm(torch::Tensor x, torch::Tensor residual,
                                                                     torch::Tensor weight, double eps) {
  if (!takes({&x, &residual, &weight}) || !norm_shapes(x, weight) || residual.sizes() != x.sizes())
    return std::nullopt;
  torch::Tensor sum;
  auto out = norm(x, &residual, weight, eps, &sum);
  return std::make_tuple(out, sum);
}

// x: [*P, heads, r]; cos, sin: [*P, heads or 1, r], rotate_half layout -> x * cos + rotate_half(x) * sin
// [*P, heads, r], as apply_rope_ref; None where the kernel does not take them.
std::optional<torch::Tensor> apply_rope(torch::Tensor x_in, torch::Tensor cos_in, torch::Tensor sin_in) {
  if (!takes({&x_in, &cos_in, &sin_in}) || x_in.dim() < 2 || x_in.numel() == 0 || cos_in.sizes() != sin_in.sizes() ||
      cos_in.dim() != x_in.dim() || x_in.size(-1) % 2)
    return std::nullopt;
  const int64_t heads = x_in.size(-2), r = x_in.size(-1), half = r / 2, table_heads = cos_in.size(-2);
  if (cos_in.size(-1) != r || (table_heads != 1 && table_heads != heads) ||
      cos_in.sizes().slice(0, x_in.dim() - 2) != x_in.sizes().slice(0, x_in.dim() - 2))
    return std::nullopt;
  auto x = x_in.reshape({-1, heads, r});
  if (x.stride(2) != 1)
    x = x.contiguous();
  const auto cos = cos_in.reshape({-1, table_heads, r}).contiguous();
  const auto sin = sin_in.reshape({-1, table_heads, r}).contiguous();
  const int64_t rows = x.size(0);
  auto out = torch::empty(x_in.sizes(), x.options());
  with_dtype(x, [&](auto type) {
    using T = decltype(type);
    const T* xp = x.data_ptr<T>();
    const T* cp = cos.data_ptr<T>();
    const T* sp = sin.data_ptr<T>();
    T* op = out.data_ptr<T>();
    const int64_t sx_row = x.stride(0), sx_head = x.stride(1);
    const int64_t sc_row = cos.stride(0), sc_head = cos.size(1) == 1 ? 0 : cos.stride(1);
    over_rows(rows, heads * r, [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row)
        for (int64_t h = 0; h < heads; ++h) {
          const T* xr = xp + row * sx_row + h * sx_head;
          const T* c = cp + row * sc_row + h * sc_head;
          const T* s = sp + row * sc_row + h * sc_head;
          T* o = op + (row * heads + h) * r;
          for (int64_t i = 0; i < half; ++i) {  // rotate_half(x)[i] = -x[i + half]: (-a) * b rounds as -(a * b)
            const T a = xr[i] * c[i], b = xr[i + half] * s[i];
            o[i] = a - b;
          }
          for (int64_t i = half; i < r; ++i) {  // rotate_half(x)[i] = x[i - half]
            const T a = xr[i] * c[i], b = xr[i - half] * s[i];
            o[i] = a + b;
          }
        }
    });
    return 0;
  });
  return out;
}
