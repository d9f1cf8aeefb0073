// Training-mode BatchNorm + (residual add) + ReLU in one pass over memory, for bfloat16
// channels_last tensors on x86 CPUs with AVX-512 BF16. Built on first use by models/fused.py.
//
// Tensors are seen as (M, C) rows: M = N*H*W pixels, C channels contiguous (C % 16 == 0).
// Statistics are accumulated in float32 per block of rows (shifted by the first row to keep
// the sum of squares well conditioned) and in double across blocks. The maths is the eager
// one: y = relu((x - mean) * invstd * gamma + beta [+ residual]), biased variance in invstd;
// the backward uses the output's sign as the ReLU mask, as eager ReLU does.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <vector>

namespace {

constexpr int64_t kLanes = 16;
constexpr int64_t kRowsPerBlock = 256;

inline __m512 load_bf16(const at::BFloat16* p) {
  __m256i bits = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
}

inline void store_bf16(at::BFloat16* p, __m512 v) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(v)));
}

// Sums over rows of f(row, lane block) -> two accumulators per channel, in double.
template <typename Body>
void channel_sums(int64_t M, int64_t C, std::vector<double>& first, std::vector<double>& second, Body body) {
  const int64_t blocks = (M + kRowsPerBlock - 1) / kRowsPerBlock;
  const int threads = at::get_num_threads();
  std::vector<double> part1(threads * C, 0.0), part2(threads * C, 0.0);
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    const int t = at::get_thread_num();
    alignas(64) float s1[kLanes], s2[kLanes];
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t r0 = b * kRowsPerBlock, r1 = std::min(M, r0 + kRowsPerBlock);
      for (int64_t c = 0; c < C; c += kLanes) {
        __m512 acc1 = _mm512_setzero_ps(), acc2 = _mm512_setzero_ps();
        for (int64_t r = r0; r < r1; ++r) body(r, c, acc1, acc2);
        _mm512_store_ps(s1, acc1);
        _mm512_store_ps(s2, acc2);
        for (int64_t k = 0; k < kLanes; ++k) {
          part1[t * C + c + k] += s1[k];
          part2[t * C + c + k] += s2[k];
        }
      }
    }
  });
  first.assign(C, 0.0);
  second.assign(C, 0.0);
  for (int t = 0; t < threads; ++t) {
    for (int64_t c = 0; c < C; ++c) {
      first[c] += part1[t * C + c];
      second[c] += part2[t * C + c];
    }
  }
}

// A new (N, C, H, W) channels_last tensor laid out like the (N, H, W, C) rows ``like``: the
// kernels write it through its data pointer, and the caller gets a plain channels_last
// tensor, not a permuted view (autograd can then sum gradients into it in place).
torch::Tensor new_images_like(const torch::Tensor& like) {
  return at::empty({like.size(0), like.size(3), like.size(1), like.size(2)},
                   like.options().memory_format(at::MemoryFormat::ChannelsLast));
}

void check_rows(const torch::Tensor& t, int64_t C, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kBFloat16 && t.is_contiguous() && t.size(-1) == C,
              name, " must be a contiguous bfloat16 (..., C) tensor");
}

}  // namespace

// x, residual: (N, H, W, C) bf16 contiguous. Returns (y, mean, invstd, biased var, scale, offset):
// y (N, C, H, W) channels_last = relu(x * scale + offset [+ residual]), the rest float32 (C,).
std::vector<torch::Tensor> forward(torch::Tensor x, c10::optional<torch::Tensor> residual, torch::Tensor gamma,
                                   torch::Tensor beta, double eps) {
  const int64_t C = x.size(-1), M = x.numel() / C;
  TORCH_CHECK(C % kLanes == 0 && M > 0, "channels must be a multiple of 16");
  check_rows(x, C, "x");
  const bool has_residual = residual.has_value() && residual->defined();
  if (has_residual) check_rows(*residual, C, "residual");
  gamma = gamma.contiguous().to(at::kFloat);
  beta = beta.contiguous().to(at::kFloat);
  const at::BFloat16* xp = x.data_ptr<at::BFloat16>();

  std::vector<float> shift(C);
  for (int64_t c = 0; c < C; ++c) shift[c] = static_cast<float>(xp[c]);
  std::vector<double> sum, sum_sq;
  channel_sums(M, C, sum, sum_sq, [&](int64_t r, int64_t c, __m512& s, __m512& ss) {
    __m512 v = _mm512_sub_ps(load_bf16(xp + r * C + c), _mm512_loadu_ps(shift.data() + c));
    s = _mm512_add_ps(s, v);
    ss = _mm512_fmadd_ps(v, v, ss);
  });

  auto mean = torch::empty({C}, x.options().dtype(at::kFloat));
  auto invstd = torch::empty({C}, x.options().dtype(at::kFloat));
  auto var = torch::empty({C}, x.options().dtype(at::kFloat));
  auto scale_t = torch::empty({C}, x.options().dtype(at::kFloat));
  auto offset_t = torch::empty({C}, x.options().dtype(at::kFloat));
  float* scale = scale_t.data_ptr<float>();
  float* offset = offset_t.data_ptr<float>();
  const float* g = gamma.data_ptr<float>();
  const float* be = beta.data_ptr<float>();
  for (int64_t c = 0; c < C; ++c) {
    const double centred = sum[c] / M;
    const double v = std::max(sum_sq[c] / M - centred * centred, 0.0);
    const double m = centred + shift[c];
    const double is = 1.0 / std::sqrt(v + eps);
    mean.data_ptr<float>()[c] = static_cast<float>(m);
    invstd.data_ptr<float>()[c] = static_cast<float>(is);
    var.data_ptr<float>()[c] = static_cast<float>(v);
    scale[c] = static_cast<float>(is * g[c]);
    offset[c] = static_cast<float>(be[c] - m * is * g[c]);
  }

  auto y = new_images_like(x);
  at::BFloat16* yp = y.data_ptr<at::BFloat16>();
  const at::BFloat16* rp = has_residual ? residual->data_ptr<at::BFloat16>() : nullptr;
  at::parallel_for(0, M, kRowsPerBlock, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      for (int64_t c = 0; c < C; c += kLanes) {
        __m512 v = _mm512_fmadd_ps(load_bf16(xp + r * C + c), _mm512_loadu_ps(scale + c),
                                   _mm512_loadu_ps(offset + c));
        if (rp) {
          // Eager rounds bn(x) to bf16 before adding the residual; do the same.
          v = _mm512_cvtpbh_ps(_mm512_cvtneps_pbh(v));
          v = _mm512_add_ps(v, load_bf16(rp + r * C + c));
        }
        store_bf16(yp + r * C + c, _mm512_max_ps(v, _mm512_setzero_ps()));
      }
    }
  });
  return {y, mean, invstd, var, scale_t, offset_t};
}

// dy, x: (N, H, W, C) bf16 contiguous. The ReLU mask is y > 0: read from y when there was a
// residual (y given), else recomputed as x * scale + offset > 0 with forward's own scale and
// offset, the very value whose sign made y. Returns (dx, dgamma, dbeta, dz); dz = the masked dy
// (the residual's gradient) when y is given, else an empty tensor. dx, dz: (N, C, H, W)
// channels_last. y, when given, is the forward's (N, C, H, W) channels_last output.
std::vector<torch::Tensor> backward(torch::Tensor dy, torch::Tensor x, c10::optional<torch::Tensor> y_opt,
                                    torch::Tensor mean, torch::Tensor invstd, torch::Tensor gamma,
                                    torch::Tensor fwd_scale, torch::Tensor fwd_offset) {
  const int64_t C = x.size(-1), M = x.numel() / C;
  check_rows(x, C, "x");
  const bool want_dz = y_opt.has_value() && y_opt->defined();
  if (want_dz) check_rows(*y_opt, C, "y");
  dy = dy.contiguous();
  check_rows(dy, C, "grad");
  gamma = gamma.contiguous().to(at::kFloat);
  const at::BFloat16* xp = x.data_ptr<at::BFloat16>();
  const at::BFloat16* yp = want_dz ? y_opt->data_ptr<at::BFloat16>() : nullptr;
  const at::BFloat16* dyp = dy.data_ptr<at::BFloat16>();
  const float* fs = fwd_scale.data_ptr<float>();
  const float* fo = fwd_offset.data_ptr<float>();
  // The bf16 conversion flushes float denormals to zero, so a recomputed value must be at
  // least the smallest normal float for y to have been positive.
  const __m512 smallest_normal = _mm512_set1_ps(FLT_MIN);
  auto live_mask = [&](int64_t r, int64_t c, __m512 xv) -> __mmask16 {
    if (yp) return _mm512_cmp_ps_mask(load_bf16(yp + r * C + c), _mm512_setzero_ps(), _CMP_GT_OQ);
    const __m512 pre = _mm512_fmadd_ps(xv, _mm512_loadu_ps(fs + c), _mm512_loadu_ps(fo + c));
    return _mm512_cmp_ps_mask(pre, smallest_normal, _CMP_GE_OQ);
  };
  const float* mu = mean.data_ptr<float>();
  const float* is = invstd.data_ptr<float>();

  std::vector<double> sum_dz, sum_dz_xc;
  channel_sums(M, C, sum_dz, sum_dz_xc, [&](int64_t r, int64_t c, __m512& s, __m512& sx) {
    const __m512 xv = load_bf16(xp + r * C + c);
    const __m512 d = _mm512_maskz_mov_ps(live_mask(r, c, xv), load_bf16(dyp + r * C + c));
    s = _mm512_add_ps(s, d);
    sx = _mm512_fmadd_ps(d, _mm512_sub_ps(xv, _mm512_loadu_ps(mu + c)), sx);
  });

  auto dgamma = torch::empty({C}, x.options().dtype(at::kFloat));
  auto dbeta = torch::empty({C}, x.options().dtype(at::kFloat));
  std::vector<float> scale(C), mean_dz(C), proj(C);
  const float* g = gamma.data_ptr<float>();
  for (int64_t c = 0; c < C; ++c) {
    dbeta.data_ptr<float>()[c] = static_cast<float>(sum_dz[c]);
    dgamma.data_ptr<float>()[c] = static_cast<float>(sum_dz_xc[c] * is[c]);
    scale[c] = is[c] * g[c];
    mean_dz[c] = static_cast<float>(sum_dz[c] / M);
    proj[c] = static_cast<float>(sum_dz_xc[c] / M * is[c] * is[c]);
  }

  auto dx = new_images_like(x);
  auto dz = want_dz ? new_images_like(x) : torch::Tensor();
  at::BFloat16* dxp = dx.data_ptr<at::BFloat16>();
  at::BFloat16* dzp = want_dz ? dz.data_ptr<at::BFloat16>() : nullptr;
  at::parallel_for(0, M, kRowsPerBlock, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      for (int64_t c = 0; c < C; c += kLanes) {
        const __m512 xv = load_bf16(xp + r * C + c);
        const __m512 d = _mm512_maskz_mov_ps(live_mask(r, c, xv), load_bf16(dyp + r * C + c));
        const __m512 xc = _mm512_sub_ps(xv, _mm512_loadu_ps(mu + c));
        __m512 grad = _mm512_sub_ps(d, _mm512_loadu_ps(mean_dz.data() + c));
        grad = _mm512_fnmadd_ps(xc, _mm512_loadu_ps(proj.data() + c), grad);
        store_bf16(dxp + r * C + c, _mm512_mul_ps(grad, _mm512_loadu_ps(scale.data() + c)));
        if (dzp) store_bf16(dzp + r * C + c, d);
      }
    }
  });
  return {dx, dgamma, dbeta, dz};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward, "BatchNorm (training) + optional residual + ReLU, bf16 channels_last");
  m.def("backward", &backward, "its backward");
}
