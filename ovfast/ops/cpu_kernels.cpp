// ovfast's CPU kernels: the decode step (what a batch of a few rows spends its time on) and the
// parts of a prefill that are not GEMMs.
//
// Built on first use by ovfast/ops/cpu_native.py (g++ against the installed torch, -march=native,
// -ffp-contract=off) and registered as torch ops under the namespace "ovfast_cpu". Every op here
// has a plain-torch twin in ovfast/ops/torch_ops.py that is its reference in the tests.
//
// small_linear: y = x W^T (+ b) for x with a few rows (decode), W (N, K) as loaded (fp32 or
// bf16, no repacking). A GEMV is bound by reading W once: the weight rows are split across the
// threads in contiguous ranges, each read front to back once for all x rows. Accumulation is in
// fp32 (bf16: by AVX512-BF16's pair dot products where the CPU has them, else widened on the fly;
// both exact products), the output rounded once; a row's sums run in one order whatever M is.
//
// rms_norm, rope: torch's op sequence in one pass, rounding to the activation dtype wherever the
// torch version stores an intermediate in it (so bf16 results match it, not just approximately).
//
// attention_decode: one query per sequence against its pages, read in place through the block
// table (no gather of the whole context into a temporary), one (row, kv head) per task; scores
// 16 positions at a time (one transpose-add, not a horizontal sum per position and head), the
// weighted sum of V with the output tile in registers.
//
// prompt_attention: a prompt's attention, vision tiles or a prefill chunk after its cached prefix,
// as two GEMMs per (sequence, kv head, block of queries) around a vectorised softmax. With AVX-512
// both products run on one register-tiled micro-kernel (fp32 FMAs, bf16 AVX512-BF16's pair dot
// products) or, bf16 on AMX, torch's brgemm; without AVX-512, fp32 only, on torch's GEMMs.
//
// gelu_tanh, bias_gelu_tanh_: SigLIP's activation vectorised, with fc1's bias folded in.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <cmath>
#include <limits>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BW__)
#include <immintrin.h>
#define OVFAST_AVX512 1
#endif

namespace {

using bf16 = c10::BFloat16;

#ifdef OVFAST_AVX512
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const bf16* p) {
  __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
}
inline void store16(float* p, __m512 v) { _mm512_storeu_ps(p, v); }
// fp32 -> bf16 rounding to nearest even, as c10::BFloat16 does (NaN -> the quiet NaN 0x7fc0)
inline __m256i round_bf16(__m512 v) {
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))), 16);
  r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7fc0));
  return _mm512_cvtepi32_epi16(r);
}
inline void store16(bf16* p, __m512 v) { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), round_bf16(v)); }
// r[i] = column i of the 16 x 16 matrix of 32-bit words whose rows are r[0..15]
inline void transpose16x16_epi32(__m512i r[16]) {
  __m512i a[16], b[16];
  for (int i = 0; i < 16; i += 2) {  // pairs of rows: words interleaved
    a[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
    a[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {  // then pairs of words
    b[i] = _mm512_unpacklo_epi64(a[i], a[i + 2]);
    b[i + 1] = _mm512_unpackhi_epi64(a[i], a[i + 2]);
    b[i + 2] = _mm512_unpacklo_epi64(a[i + 1], a[i + 3]);
    b[i + 3] = _mm512_unpackhi_epi64(a[i + 1], a[i + 3]);
  }
  // b[4q + c] holds, in 128-bit lane L, words 4L + c of rows 4q..4q+3; gather the lanes
  for (int c = 0; c < 4; ++c) {
    const __m512i lo01 = _mm512_shuffle_i32x4(b[c], b[4 + c], 0x44), hi01 = _mm512_shuffle_i32x4(b[c], b[4 + c], 0xee);
    const __m512i lo23 = _mm512_shuffle_i32x4(b[8 + c], b[12 + c], 0x44), hi23 = _mm512_shuffle_i32x4(b[8 + c], b[12 + c], 0xee);
    r[c] = _mm512_shuffle_i32x4(lo01, lo23, 0x88);       // lane 0: word c
    r[4 + c] = _mm512_shuffle_i32x4(lo01, lo23, 0xdd);   // lane 1: word 4 + c
    r[8 + c] = _mm512_shuffle_i32x4(hi01, hi23, 0x88);   // lane 2: word 8 + c
    r[12 + c] = _mm512_shuffle_i32x4(hi01, hi23, 0xdd);  // lane 3: word 12 + c
  }
}

inline __mmask16 first_lanes(int64_t n) {
  return n >= 16 ? static_cast<__mmask16>(0xffff) : static_cast<__mmask16>((1u << n) - 1);
}
inline __m512 load16(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
inline __m512 load16(const bf16* p, __mmask16 m) {
  __m256i v = _mm256_maskz_loadu_epi16(m, p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
}

// e^x for 16 lanes: x = n ln2 + r, |r| <= ln2/2, e^r by Cephes' expf polynomial, 2^n by scalef.
// About 1 ulp; softmax's arguments are <= 0 after the max is taken out.
inline __m512 exp16(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.3f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.f)));
  return _mm512_scalef_ps(p, n);
}
#endif

#ifdef OVFAST_AVX512
// out[m] = dot(x row m, w) for MT x rows (fp32, stride K) and one weight row, read front to back
// with four independent sums per x row. Each weight row is one run: interleaving four weight rows
// (four short streams) is served below a single stream's rate by the prefetchers (a one-row 0.5B
// step: ~0.9 of the time in fp32, ~0.75 in bf16 on the AMD EPYC VM). The order of the sums is
// the same for any MT, so a row's result does not depend on the rows decoded with it.
template <typename W, int MT>
inline void dot_seq(const float* X, int64_t K, const W* w, float* out) {
  __m512 a[MT][4];
  for (int m = 0; m < MT; ++m)
    for (int u = 0; u < 4; ++u) a[m][u] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 64 <= K; k += 64)
    for (int u = 0; u < 4; ++u) {
      const __m512 wv = load16(w + k + 16 * u);
      for (int m = 0; m < MT; ++m) a[m][u] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(X + m * K + k + 16 * u), a[m][u]);
    }
  for (; k + 16 <= K; k += 16) {
    const __m512 wv = load16(w + k);
    for (int m = 0; m < MT; ++m) a[m][0] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(X + m * K + k), a[m][0]);
  }
  if (k < K) {
    const __mmask16 mask = static_cast<__mmask16>((1u << (K - k)) - 1);
    const __m512 wv = load16(w + k, mask);
    for (int m = 0; m < MT; ++m) a[m][1] = _mm512_fmadd_ps(wv, _mm512_maskz_loadu_ps(mask, X + m * K + k), a[m][1]);
  }
  for (int m = 0; m < MT; ++m)
    out[m] = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a[m][0], a[m][1]), _mm512_add_ps(a[m][2], a[m][3])));
}
#else
template <typename W, int MT>
inline void dot_seq(const float* X, int64_t K, const W* w, float* out) {
  for (int m = 0; m < MT; ++m) {
    const float* xm = X + m * K;
    float s = 0.f;
#pragma omp simd reduction(+ : s)
    for (int64_t k = 0; k < K; ++k) s += static_cast<float>(w[k]) * xm[k];
    out[m] = s;
  }
}
#endif

#if defined(OVFAST_AVX512) && defined(__AVX512BF16__)
#define OVFAST_DPBF16 1
// bf16 x bf16 (a bf16 model's activations are bf16 already): out[m] = dot(x row m, w) for MT x
// rows and one weight row read front to back, by AVX512-BF16's pair dot products: each bf16
// product is exact in fp32 and added in fp32, as a widened FMA would, without the widening (a
// shift and a shuffle per 16 weights per x row, which made a multi-row bf16 GEMV compute-bound:
// 2 rows ~2x and 4 rows ~1.2x faster this way on the development VM).
template <int MT>
inline void dot_bf16_rows(const bf16* X, int64_t K, const bf16* w, float* out) {
  __m512 a[MT][2];
  for (int m = 0; m < MT; ++m) a[m][0] = a[m][1] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 64 <= K; k += 64)
    for (int u = 0; u < 2; ++u) {
      const __m512bh wv = (__m512bh)_mm512_loadu_si512(w + k + 32 * u);
      for (int m = 0; m < MT; ++m)
        a[m][u] = _mm512_dpbf16_ps(a[m][u], wv, (__m512bh)_mm512_loadu_si512(X + m * K + k + 32 * u));
    }
  for (; k < K; k += 32) {
    const __mmask32 mask = K - k >= 32 ? ~__mmask32(0) : static_cast<__mmask32>((1u << (K - k)) - 1);
    const __m512bh wv = (__m512bh)_mm512_maskz_loadu_epi16(mask, w + k);
    for (int m = 0; m < MT; ++m)
      a[m][0] = _mm512_dpbf16_ps(a[m][0], wv, (__m512bh)_mm512_maskz_loadu_epi16(mask, X + m * K + k));
  }
  for (int m = 0; m < MT; ++m) out[m] = _mm512_reduce_add_ps(_mm512_add_ps(a[m][0], a[m][1]));
}

#endif

// f(std::integral_constant<int, n>{}) for n = 1..Max (Max for anything larger): a count of rows
// or vectors as a compile-time constant (the kernels keep one register set per row or vector)
template <int Max, typename F>
inline void by_count(int64_t n, F f) {
  [&]<int... I>(std::integer_sequence<int, I...>) {
    (void)(((n == I + 1 || I + 1 == Max) && (f(std::integral_constant<int, I + 1>{}), true)) || ...);
  }(std::make_integer_sequence<int, Max>{});
}

// y = x W^T (+ b) for M x rows: the weight rows split across threads in contiguous ranges, each
// read once, front to back, for every group of up to four x rows (dot(Xm, mt, w_row, out): the
// group's mt dot products); accumulated in fp32, rounded once to T.
template <typename XT, typename T, typename Dot>
void gemv_rows(const XT* X, const T* w, const float* bias, T* y, int64_t M, int64_t N, int64_t K, Dot dot) {
  // at least ~64 K weights per chunk: smaller ones cost more to hand out than to read
  const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(K, 1));
  at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) {
    float out[4];
    for (int64_t n = n0; n < n1; ++n)
      for (int64_t m0 = 0; m0 < M; m0 += 4) {
        const int64_t mt = std::min<int64_t>(4, M - m0);
        dot(X + m0 * K, mt, w + n * K, out);
        for (int64_t m = 0; m < mt; ++m) y[(m0 + m) * N + n] = static_cast<T>(out[m] + (bias ? bias[n] : 0.f));
      }
  });
}

at::Tensor small_linear(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1), "small_linear: x (M, K) and w (N, K)");
  TORCH_CHECK(x.scalar_type() == w.scalar_type(), "small_linear: x and w must have one dtype");
  TORCH_CHECK(w.is_contiguous(), "small_linear: w must be contiguous");
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  at::Tensor bf;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->numel() == N, "small_linear: bias must have N entries");
    bf = bias->to(at::kFloat).contiguous();
  }
  at::Tensor y = at::empty({M, N}, x.options());
  const float* bp = bf.defined() ? bf.data_ptr<float>() : nullptr;
  if (x.scalar_type() == at::kFloat) {
    const at::Tensor xf = x.contiguous();
    gemv_rows(xf.data_ptr<float>(), w.data_ptr<float>(), bp, y.data_ptr<float>(), M, N, K,
              [K](const float* X, int64_t mt, const float* wr, float* out) {
                by_count<4>(mt, [&](auto rows) { dot_seq<float, rows>(X, K, wr, out); });
              });
  } else if (x.scalar_type() == at::kBFloat16) {
#ifdef OVFAST_DPBF16
    const at::Tensor xb = x.contiguous();
    gemv_rows(xb.data_ptr<bf16>(), w.data_ptr<bf16>(), bp, y.data_ptr<bf16>(), M, N, K,
              [K](const bf16* X, int64_t mt, const bf16* wr, float* out) {
                by_count<4>(mt, [&](auto rows) { dot_bf16_rows<rows>(X, K, wr, out); });
              });
#else
    const at::Tensor xf = x.to(at::kFloat).contiguous();
    gemv_rows(xf.data_ptr<float>(), w.data_ptr<bf16>(), bp, y.data_ptr<bf16>(), M, N, K,
              [K](const float* X, int64_t mt, const bf16* wr, float* out) {
                by_count<4>(mt, [&](auto rows) { dot_seq<bf16, rows>(X, K, wr, out); });
              });
#endif
  } else {
    TORCH_CHECK(false, "small_linear: float32 or bfloat16 only");
  }
  return y;
}

// --- elementwise: rms_norm, rope --------------------------------------------------------------

template <typename T>
inline float round_to(float v) { return static_cast<float>(static_cast<T>(v)); }

template <typename T>
void rms_norm_impl(const T* x, const T* res, const T* w, T* out, T* sum, int64_t rows, int64_t D, float eps) {
  at::parallel_for(0, rows, std::max<int64_t>(1, 65536 / std::max<int64_t>(D, 1)), [&](int64_t r0, int64_t r1) {
    std::vector<float> h(D);
    for (int64_t r = r0; r < r1; ++r) {
      const T* xr = x + r * D;
      float ss = 0.f;
      if (res) {
        const T* rr = res + r * D;
        T* sr = sum + r * D;
        for (int64_t i = 0; i < D; ++i) {
          float v = round_to<T>(static_cast<float>(xr[i]) + static_cast<float>(rr[i]));
          sr[i] = static_cast<T>(v);
          h[i] = v;
        }
      } else {
        for (int64_t i = 0; i < D; ++i) h[i] = static_cast<float>(xr[i]);
      }
#pragma omp simd reduction(+ : ss)
      for (int64_t i = 0; i < D; ++i) ss += h[i] * h[i];
      const float inv = 1.f / std::sqrt(ss / static_cast<float>(D) + eps);
      T* o = out + r * D;
      for (int64_t i = 0; i < D; ++i) o[i] = static_cast<T>(static_cast<float>(w[i]) * round_to<T>(h[i] * inv));
    }
  });
}

std::tuple<at::Tensor, at::Tensor> rms_norm(const at::Tensor& x, const at::Tensor& w, double eps,
                                            const c10::optional<at::Tensor>& residual) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && w.is_contiguous() && w.numel() == x.size(1),
              "rms_norm: x (T, D) contiguous and w (D,)");
  TORCH_CHECK(w.scalar_type() == x.scalar_type(), "rms_norm: x and w must have one dtype");
  const bool with_res = residual.has_value() && residual->defined();
  if (with_res) TORCH_CHECK(residual->sizes() == x.sizes() && residual->is_contiguous() &&
                            residual->scalar_type() == x.scalar_type(), "rms_norm: residual like x");
  at::Tensor out = at::empty_like(x), sum = with_res ? at::empty_like(x) : at::Tensor();
  const int64_t rows = x.size(0), D = x.size(1);
  if (x.scalar_type() == at::kFloat) {
    rms_norm_impl<float>(x.data_ptr<float>(), with_res ? residual->data_ptr<float>() : nullptr, w.data_ptr<float>(),
                         out.data_ptr<float>(), with_res ? sum.data_ptr<float>() : nullptr, rows, D, eps);
  } else if (x.scalar_type() == at::kBFloat16) {
    rms_norm_impl<bf16>(x.data_ptr<bf16>(), with_res ? residual->data_ptr<bf16>() : nullptr, w.data_ptr<bf16>(),
                        out.data_ptr<bf16>(), with_res ? sum.data_ptr<bf16>() : nullptr, rows, D, eps);
  } else {
    TORCH_CHECK(false, "rms_norm: float32 or bfloat16 only");
  }
  return {out, sum};
}

// In place on x (T, H, d) (last dim contiguous, any row/head strides): NeoX half-split rotation.
template <typename T>
void rope_impl(T* x, int64_t Tn, int64_t H, int64_t d, int64_t st, int64_t sh, const int64_t* pos, const float* cs) {
  const int64_t half = d / 2;
  at::parallel_for(0, Tn * H, std::max<int64_t>(1, 16384 / std::max<int64_t>(d, 1)), [&](int64_t a, int64_t b) {
    for (int64_t i = a; i < b; ++i) {
      const int64_t t = i / H, h = i % H;
      T* v = x + t * st + h * sh;
      const float* c = cs + pos[t] * d;
      for (int64_t j = 0; j < half; ++j) {
        const float co = round_to<T>(c[j]), si = round_to<T>(c[half + j]);
        const float x1 = static_cast<float>(v[j]), x2 = static_cast<float>(v[half + j]);
        const float o1 = round_to<T>(x1 * co) + round_to<T>(-x2 * si);
        const float o2 = round_to<T>(x2 * co) + round_to<T>(x1 * si);
        v[j] = static_cast<T>(o1);
        v[half + j] = static_cast<T>(o2);
      }
    }
  });
}

void rope_one(const at::Tensor& x, const at::Tensor& pos, const at::Tensor& cs) {
  TORCH_CHECK(x.dim() == 3 && x.stride(2) == 1 && x.size(2) % 2 == 0, "rope: x (T, H, d), last dim contiguous");
  if (x.scalar_type() == at::kFloat) {
    rope_impl<float>(x.data_ptr<float>(), x.size(0), x.size(1), x.size(2), x.stride(0), x.stride(1),
                     pos.data_ptr<int64_t>(), cs.data_ptr<float>());
  } else if (x.scalar_type() == at::kBFloat16) {
    rope_impl<bf16>(x.data_ptr<bf16>(), x.size(0), x.size(1), x.size(2), x.stride(0), x.stride(1),
                    pos.data_ptr<int64_t>(), cs.data_ptr<float>());
  } else {
    TORCH_CHECK(false, "rope: float32 or bfloat16 only");
  }
}

void rope(at::Tensor q, at::Tensor k, const at::Tensor& positions, const at::Tensor& cos_sin) {
  TORCH_CHECK(positions.scalar_type() == at::kLong && positions.is_contiguous() && positions.size(0) == q.size(0),
              "rope: positions (T,) int64");
  TORCH_CHECK(cos_sin.scalar_type() == at::kFloat && cos_sin.is_contiguous() && cos_sin.size(1) == q.size(2),
              "rope: cos_sin (P, d) float32");
  rope_one(q, positions, cos_sin);
  rope_one(k, positions, cos_sin);
}

// gelu with the tanh approximation, elementwise, computed in fp32 and rounded once (as torch's).
constexpr float kGeluBeta = 0.7978845608028654f, kGeluKappa = 0.044715f;  // sqrt(2/pi)

inline float gelu_tanh_one(float v) { return 0.5f * v * (1.f + std::tanh(kGeluBeta * (v + kGeluKappa * v * v * v))); }

#ifdef OVFAST_AVX512
inline __m512 gelu_tanh16(__m512 v) {
  const __m512 u = _mm512_mul_ps(_mm512_set1_ps(kGeluBeta),
                                 _mm512_fmadd_ps(_mm512_mul_ps(_mm512_set1_ps(kGeluKappa), v), _mm512_mul_ps(v, v), v));
  // tanh(u) = 1 - 2 / (e^(2u) + 1)
  // |2u| <= 20: tanh is +-1 in fp32 well before that, and e^(2u) stays finite for the reciprocal
  const __m512 e = exp16(_mm512_min_ps(_mm512_max_ps(_mm512_add_ps(u, u), _mm512_set1_ps(-20.f)), _mm512_set1_ps(20.f)));
  // 1 / (e + 1) by rcp14 and one Newton step (~23 bits; a division costs several times more)
  const __m512 den = _mm512_add_ps(e, _mm512_set1_ps(1.f));
  __m512 inv = _mm512_rcp14_ps(den);
  inv = _mm512_mul_ps(inv, _mm512_fnmadd_ps(den, inv, _mm512_set1_ps(2.f)));
  const __m512 t = _mm512_fnmadd_ps(_mm512_set1_ps(2.f), inv, _mm512_set1_ps(1.f));
  return _mm512_mul_ps(_mm512_mul_ps(_mm512_set1_ps(0.5f), v), _mm512_add_ps(_mm512_set1_ps(1.f), t));
}
#endif

template <typename T>
void gelu_tanh_impl(const T* x, T* out, int64_t n) {
  at::parallel_for(0, n, 32768, [&](int64_t a, int64_t b) {
    int64_t i = a;
#ifdef OVFAST_AVX512
    for (; i + 16 <= b; i += 16) store16(out + i, gelu_tanh16(load16(x + i)));
#endif
    for (; i < b; ++i) out[i] = static_cast<T>(gelu_tanh_one(static_cast<float>(x[i])));
  });
}

// gelu(y + bias) in place over the rows of an fp32 (M, N) product: the bias add that addmm
// would make as a separate broadcast copy, folded into the activation's one pass
// y = gelu(y + bias) in place, the sum and the activation in fp32, rounded once to T.
template <typename T>
void bias_gelu_tanh_impl(T* y, const T* bias, int64_t M, int64_t N) {
  at::parallel_for(0, M, std::max<int64_t>(1, 32768 / std::max<int64_t>(N, 1)), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      T* row = y + r * N;
      int64_t i = 0;
#ifdef OVFAST_AVX512
      for (; i + 16 <= N; i += 16) store16(row + i, gelu_tanh16(_mm512_add_ps(load16(row + i), load16(bias + i))));
#endif
      for (; i < N; ++i) row[i] = static_cast<T>(gelu_tanh_one(static_cast<float>(row[i]) + static_cast<float>(bias[i])));
    }
  });
}

at::Tensor gelu_tanh(const at::Tensor& x_in) {
  const at::Tensor x = x_in.contiguous();
  at::Tensor out = at::empty_like(x);
  if (x.scalar_type() == at::kFloat) {
    gelu_tanh_impl<float>(x.data_ptr<float>(), out.data_ptr<float>(), x.numel());
  } else if (x.scalar_type() == at::kBFloat16) {
    gelu_tanh_impl<bf16>(x.data_ptr<bf16>(), out.data_ptr<bf16>(), x.numel());
  } else {
    TORCH_CHECK(false, "gelu_tanh: float32 or bfloat16 only");
  }
  return out;
}

void bias_gelu_tanh_(at::Tensor y, const at::Tensor& bias) {
  TORCH_CHECK(y.dim() == 2 && y.is_contiguous() && (y.scalar_type() == at::kFloat || y.scalar_type() == at::kBFloat16),
              "bias_gelu_tanh_: y (M, N) fp32 or bf16, contiguous");
  TORCH_CHECK(bias.dim() == 1 && bias.is_contiguous() && bias.scalar_type() == y.scalar_type() && bias.size(0) == y.size(1),
              "bias_gelu_tanh_: bias (N,) of y's dtype");
  if (y.scalar_type() == at::kFloat)
    bias_gelu_tanh_impl<float>(y.data_ptr<float>(), bias.data_ptr<float>(), y.size(0), y.size(1));
  else
    bias_gelu_tanh_impl<bf16>(y.data_ptr<bf16>(), bias.data_ptr<bf16>(), y.size(0), y.size(1));
}

// silu(gate) * up over (T, 2I) -> (T, I), rounding as torch does (silu, then the product).
template <typename T>
void silu_mul_impl(const T* gu, T* out, int64_t rows, int64_t inter) {
  at::parallel_for(0, rows, 1, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const T* g = gu + r * 2 * inter;
      const T* u = g + inter;
      T* o = out + r * inter;
      int64_t i = 0;
#ifdef OVFAST_AVX512
      for (; i + 16 <= inter; i += 16) {
        const __m512 x = load16(g + i);
        // x / (1 + e^-x), e^-x clamped so the reciprocal stays finite; rounded to T, times up
        const __m512 den = _mm512_add_ps(_mm512_set1_ps(1.f), exp16(_mm512_min_ps(_mm512_sub_ps(_mm512_setzero_ps(), x),
                                                                                   _mm512_set1_ps(80.f))));
        __m512 act = _mm512_div_ps(x, den);
        if constexpr (std::is_same_v<T, bf16>) {  // silu's output is stored in bf16 before the product
          bf16 tmp[16];
          store16(tmp, act);
          act = load16(tmp);
        }
        store16(o + i, _mm512_mul_ps(act, load16(u + i)));
      }
#endif
      for (; i < inter; ++i) {
        const float x = static_cast<float>(g[i]);
        const float act = round_to<T>(x / (1.f + std::exp(-x)));
        o[i] = static_cast<T>(act * static_cast<float>(u[i]));
      }
    }
  });
}

at::Tensor silu_mul(const at::Tensor& gate_up) {
  TORCH_CHECK(gate_up.dim() == 2 && gate_up.is_contiguous() && gate_up.size(1) % 2 == 0, "silu_mul: (T, 2I) contiguous");
  const int64_t rows = gate_up.size(0), inter = gate_up.size(1) / 2;
  at::Tensor out = at::empty({rows, inter}, gate_up.options());
  if (gate_up.scalar_type() == at::kFloat) {
    silu_mul_impl<float>(gate_up.data_ptr<float>(), out.data_ptr<float>(), rows, inter);
  } else if (gate_up.scalar_type() == at::kBFloat16) {
    silu_mul_impl<bf16>(gate_up.data_ptr<bf16>(), out.data_ptr<bf16>(), rows, inter);
  } else {
    TORCH_CHECK(false, "silu_mul: float32 or bfloat16 only");
  }
  return out;
}

// Per-thread scratch that outlives a call: a fresh vector of a few hundred KiB per call is fresh
// pages from the kernel, whose first-touch faults cost more than a long decode attention itself.
// slot: which of a thread's buffers; the buffer only grows.
inline float* scratch(int slot, int64_t n) {
  thread_local std::vector<float> buffers[5];
  std::vector<float>& b = buffers[slot];
  if (static_cast<int64_t>(b.size()) < n) b.resize(n);
  return b.data();
}

// --- attention_decode --------------------------------------------------------------------------


// e^(scale * (s - max)) in place over s[0..L), zeros over s[L..W) (the row's masked tail); returns
// 1 / the sum, which the caller applies to the row's output (d values, not L)
inline float exp_row(float* s, int64_t L, int64_t W, float scale) {
  int64_t j = 0;
  float mx = -std::numeric_limits<float>::infinity(), total = 0.f;
#ifdef OVFAST_AVX512
  __m512 mv = _mm512_set1_ps(mx);
  for (; j + 16 <= L; j += 16) mv = _mm512_max_ps(mv, _mm512_loadu_ps(s + j));
  mx = _mm512_reduce_max_ps(mv);
#endif
  for (; j < L; ++j) mx = std::max(mx, s[j]);
  j = 0;
#ifdef OVFAST_AVX512
  const __m512 m = _mm512_set1_ps(mx), sc = _mm512_set1_ps(scale);
  __m512 sum = _mm512_setzero_ps();
  for (; j + 16 <= L; j += 16) {
    const __m512 e = exp16(_mm512_mul_ps(_mm512_sub_ps(_mm512_loadu_ps(s + j), m), sc));
    _mm512_storeu_ps(s + j, e);
    sum = _mm512_add_ps(sum, e);
  }
  total = _mm512_reduce_add_ps(sum);
#endif
  for (; j < L; ++j) {
    s[j] = std::exp((s[j] - mx) * scale);
    total += s[j];
  }
  std::fill(s + L, s + W, 0.f);
  return 1.f / total;
}

// The scalar twins of scores16 / accumulate_tiles, for head sizes that are not whole 16-lane
// chunks (and builds without AVX-512): q . k for the g query heads at one position ...
template <typename T>
inline void group_scores(const float* qf, const T* k, int64_t g, int64_t d, float scale, float* out, int64_t stride) {
  for (int64_t gi = 0; gi < g; ++gi) {
    const float* qg = qf + gi * d;
    float dot = 0.f;
    for (int64_t e = 0; e < d; ++e) dot += qg[e] * static_cast<float>(k[e]);
    out[gi * stride] = dot * scale;
  }
}

// ... and acc[gi] += p[gi] * v for the g query heads
template <typename T>
inline void group_accumulate(float* acc, const T* v, const float* p, int64_t pstride, int64_t g, int64_t d) {
  for (int64_t gi = 0; gi < g; ++gi) {
    const float pg = p[gi * pstride];
    float* ag = acc + gi * d;
    for (int64_t e = 0; e < d; ++e) ag[e] += pg * static_cast<float>(v[e]);
  }
}

#ifdef OVFAST_AVX512
// Lane j of the result: the sum of a[j]'s 16 lanes. A transpose-add: 30 shuffles for 16 sums,
// where 16 separate horizontal sums take 64 (and the shuffle port is the decode loop's limit).
inline __m512 hsum16x16(const __m512* a) {
  __m512 s[8], t[4], u[2];
  for (int i = 0; i < 8; ++i)  // per 128-bit lane: partial sums of a[2i], a[2i+1], a[2i], a[2i+1]
    s[i] = _mm512_add_ps(_mm512_unpacklo_ps(a[2 * i], a[2 * i + 1]), _mm512_unpackhi_ps(a[2 * i], a[2 * i + 1]));
  for (int i = 0; i < 4; ++i) {  // per lane: partial sums of a[4i], ..., a[4i+3]
    const __m512d x = _mm512_castps_pd(s[2 * i]), y = _mm512_castps_pd(s[2 * i + 1]);
    t[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)), _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
  }
  for (int i = 0; i < 2; ++i)  // lanes: t[2i] (two halves summed), t[2i+1] (likewise)
    u[i] = _mm512_add_ps(_mm512_shuffle_f32x4(t[2 * i], t[2 * i + 1], 0x88),
                         _mm512_shuffle_f32x4(t[2 * i], t[2 * i + 1], 0xdd));
  return _mm512_add_ps(_mm512_shuffle_f32x4(u[0], u[1], 0x88), _mm512_shuffle_f32x4(u[0], u[1], 0xdd));
}

// Scores of up to 16 positions (k[0..cnt), fp32, d = 16 nv values each; k[cnt..16) may repeat a
// valid row) for the g query heads: out[gi * stride + jj] = scale * q_gi . k[jj]
inline void scores16(const float* qf, const float* const* k, int64_t cnt, int64_t g, int64_t nv, float scale,
                     float* out, int64_t stride) {
  const __mmask16 m = first_lanes(cnt);
  const __m512 sc = _mm512_set1_ps(scale);
  for (int64_t gi = 0; gi < g; ++gi) {
    const float* qg = qf + gi * 16 * nv;
    __m512 a[16];
    for (int jj = 0; jj < 16; ++jj) {
      __m512 acc = _mm512_mul_ps(_mm512_loadu_ps(qg), _mm512_loadu_ps(k[jj]));
      for (int64_t c = 1; c < nv; ++c) acc = _mm512_fmadd_ps(_mm512_loadu_ps(qg + 16 * c), _mm512_loadu_ps(k[jj] + 16 * c), acc);
      a[jj] = acc;
    }
    _mm512_mask_storeu_ps(out + gi * stride, m, _mm512_mul_ps(hsum16x16(a), sc));
  }
}

// o[gi] = inv[gi] * sum_j p[gi * L + j] v_j for the g heads, the output held in registers: tiles
// of 8 heads x 32 values (16 accumulators), so each position costs loads of v and of 8 weights,
// not a load and a store of the whole output. pos: a PagedRows over V, reset here for each tile.
template <typename T, typename Pos>
inline void accumulate_tiles(const float* p, int64_t L, const float* inv, int64_t g, int64_t nv, Pos pos, T* o) {
  const int64_t d = 16 * nv;
  for (int64_t g0 = 0; g0 < g; g0 += 8)
    for (int64_t c0 = 0; c0 < nv; c0 += 2) {
      const int64_t gt = std::min<int64_t>(8, g - g0), ct = std::min<int64_t>(2, nv - c0);
      __m512 acc[8][2];
      for (int gi = 0; gi < 8; ++gi) acc[gi][0] = acc[gi][1] = _mm512_setzero_ps();
      pos.reset();
      for (int64_t j = 0; j < L; ++j) {
        const T* vj = pos.next() + 16 * c0;
        const __m512 v0 = load16(vj), v1 = ct > 1 ? load16(vj + 16) : v0;
        const float* pj = p + g0 * L + j;
        for (int gi = 0; gi < 8; ++gi) {
          if (gi >= gt) break;
          const __m512 w = _mm512_set1_ps(pj[gi * L]);
          acc[gi][0] = _mm512_fmadd_ps(w, v0, acc[gi][0]);
          acc[gi][1] = _mm512_fmadd_ps(w, v1, acc[gi][1]);
        }
      }
      for (int64_t gi = 0; gi < gt; ++gi)
        for (int64_t c = 0; c < ct; ++c)
          store16(o + (g0 + gi) * d + 16 * (c0 + c), _mm512_mul_ps(acc[gi][c], _mm512_set1_ps(inv[g0 + gi])));
    }
}
#endif

// Walks one sequence's positions in order through its block table: the address of each
// position's row for one kv head, without a division per position. A second cursor runs kAhead
// positions in front and prefetches: a head's row is a few cache lines in a page placed anywhere,
// too short a run for the hardware prefetcher (the reads ran at a third of the weights' rate).
template <typename T>
struct PagedRows {
  static constexpr int64_t kAhead = 24;
  const T* base;  // the cache, offset to the kv head
  const int32_t* pages;
  int64_t bs, row, bytes, L;  // bytes: one head's row; L: the sequence's length
  int64_t page = 0, off = 0, lead_page = 0, lead_off = 0, lead = 0;
  const T* at(int64_t p, int64_t o) const { return base + (static_cast<int64_t>(pages[p]) * bs + o) * row; }
  void prefetch_one() {
    const char* r = reinterpret_cast<const char*>(at(lead_page, lead_off));
    for (int64_t b = 0; b < bytes; b += 64) __builtin_prefetch(r + b, 0, 3);
    if (++lead_off == bs) lead_off = 0, ++lead_page;
    ++lead;
  }
  void reset() {
    page = off = lead_page = lead_off = lead = 0;
    while (lead < std::min(kAhead, L)) prefetch_one();
  }
  const T* next() {
    if (lead < L) prefetch_one();
    const T* r = at(page, off);
    if (++off == bs) off = 0, ++page;
    return r;
  }
};

#ifdef OVFAST_DPBF16
// One (row, kv head) of bf16 decode attention on AVX512-BF16, for head sizes of whole 32-value
// tiles. The products go through the pair dot-product instruction on the bf16 values themselves
// (exact products added in fp32, as the widened path does), laid out so no lane ever needs a
// horizontal sum:
// - scores: 16 positions' K rows are transposed as 32-bit words (a word is two adjacent dims of
//   one position), so word e of all 16 positions is one register; each query head's pair of dims
//   is broadcast against it: d/2 instructions give a head's 16 scores, and every head of the
//   group shares each K load;
// - values: two positions' V rows interleaved by 16-bit words (a word is one dim of positions j
//   and j+1) against the two probabilities broadcast as one word: each instruction adds two
//   positions' terms for 16 dims, for all g heads from one load of V. The probabilities are rounded
//   to bf16 for it (as torch's flash kernel does); the normaliser stays their fp32 sum.
// The output tile is g heads x 32 dims (2 registers a head); the unpack leaves its dims in the
// order 0-3, 8-11, 16-19, 24-27 / 4-7, 12-15, ..., put back in order once at the end.
inline void decode_head_dpbf16(const bf16* q, PagedRows<bf16> kpos, PagedRows<bf16> vpos, int64_t L, int64_t g,
                               int64_t d, float scale, float* sc, bf16* o) {
  const int64_t words = d / 2;
  const uint32_t* qw = reinterpret_cast<const uint32_t*>(q);  // head gi's word e: qw[gi * words + e]
  __m512i* kt = reinterpret_cast<__m512i*>(scratch(1, 16 * words + 16));
  kpos.reset();
  for (int64_t j0 = 0; j0 < L; j0 += 16) {
    const int64_t cnt = std::min<int64_t>(16, L - j0);
    const bf16* rows[16];
    for (int64_t jj = 0; jj < 16; ++jj) rows[jj] = jj < cnt ? kpos.next() : rows[cnt - 1];  // the tail repeats a valid row
    for (int64_t e0 = 0; e0 < words; e0 += 16) {
      __m512i t[16];
      for (int jj = 0; jj < 16; ++jj) t[jj] = _mm512_loadu_si512(rows[jj] + 2 * e0);
      transpose16x16_epi32(t);
      for (int e = 0; e < 16; ++e) _mm512_storeu_si512(kt + e0 + e, t[e]);
    }
    const __mmask16 m = first_lanes(cnt);
    for (int64_t g0 = 0; g0 < g; g0 += 8) {
      const int64_t gt = std::min<int64_t>(8, g - g0);
      __m512 acc[8];
      for (int h = 0; h < 8; ++h) acc[h] = _mm512_setzero_ps();
      for (int64_t e = 0; e < words; ++e) {
        const __m512bh kv = (__m512bh)_mm512_loadu_si512(kt + e);
        for (int h = 0; h < 8; ++h) {
          if (h >= gt) break;
          acc[h] = _mm512_dpbf16_ps(acc[h], kv, (__m512bh)_mm512_set1_epi32(qw[(g0 + h) * words + e]));
        }
      }
      for (int64_t h = 0; h < gt; ++h) _mm512_mask_storeu_ps(sc + (g0 + h) * L + j0, m, _mm512_mul_ps(acc[h], _mm512_set1_ps(scale)));
    }
  }
  // softmax numerators in place, then each head's as bf16 pairs (a zero after an odd length)
  const int64_t pairs = (L + 1) / 2;
  uint32_t* pw = reinterpret_cast<uint32_t*>(scratch(2, g * pairs));
  float inv[64];
  for (int64_t gi = 0; gi < g; ++gi) {
    float* s = sc + gi * L;
    inv[gi] = exp_row(s, L, L, 1.f);
    bf16* pb = reinterpret_cast<bf16*>(pw + gi * pairs);
    int64_t j = 0;
    for (; j + 16 <= L; j += 16) _mm256_storeu_si256(reinterpret_cast<__m256i*>(pb + j), round_bf16(_mm512_loadu_ps(s + j)));
    for (; j < L; ++j) pb[j] = static_cast<bf16>(s[j]);
    if (L % 2) pb[L] = static_cast<bf16>(0.f);
  }
  const __m512i lo_order = _mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23);
  const __m512i hi_order = _mm512_setr_epi32(8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31);
  for (int64_t g0 = 0; g0 < g; g0 += 8) {
    const int64_t gt = std::min<int64_t>(8, g - g0);
    for (int64_t c = 0; c < d; c += 32) {
      __m512 acc[8][2];
      for (int h = 0; h < 8; ++h) acc[h][0] = acc[h][1] = _mm512_setzero_ps();
      vpos.reset();
      for (int64_t t = 0; t < pairs; ++t) {
        const __m512i a = _mm512_loadu_si512(vpos.next() + c);
        const __m512i b = 2 * t + 1 < L ? _mm512_loadu_si512(vpos.next() + c) : _mm512_setzero_si512();
        const __m512bh lo = (__m512bh)_mm512_unpacklo_epi16(a, b), hi = (__m512bh)_mm512_unpackhi_epi16(a, b);
        for (int h = 0; h < 8; ++h) {
          if (h >= gt) break;
          const __m512bh w = (__m512bh)_mm512_set1_epi32(pw[(g0 + h) * pairs + t]);
          acc[h][0] = _mm512_dpbf16_ps(acc[h][0], lo, w);
          acc[h][1] = _mm512_dpbf16_ps(acc[h][1], hi, w);
        }
      }
      for (int64_t h = 0; h < gt; ++h) {
        const __m512 r = _mm512_set1_ps(inv[g0 + h]);
        bf16* out = o + (g0 + h) * d + c;
        store16(out, _mm512_mul_ps(_mm512_permutex2var_ps(acc[h][0], lo_order, acc[h][1]), r));
        store16(out + 16, _mm512_mul_ps(_mm512_permutex2var_ps(acc[h][0], hi_order, acc[h][1]), r));
      }
    }
  }
}
#endif

template <typename T>
void decode_attention_impl(const T* q, const T* kc, const T* vc, const int32_t* tables, int64_t table_stride,
                           const int32_t* lens, T* out, int64_t B, int64_t Hq, int64_t Hk, int64_t d, int64_t bs,
                           float scale) {
  const int64_t g = Hq / Hk, row = Hk * d;  // row: one position's k (or v) for every kv head
  at::parallel_for(0, B * Hk, 1, [&](int64_t a, int64_t b) {
    std::vector<float> qf(g * d), acc(g * d), inv(g), kbuf(std::is_same<T, float>::value ? 0 : 16 * d);
    for (int64_t item = a; item < b; ++item) {
      const int64_t r = item / Hk, h = item % Hk, L = lens[r];
      T* o = out + (r * Hq + h * g) * d;
      if (L <= 0) {  // an idle row: zeros, never NaN
        for (int64_t i = 0; i < g * d; ++i) o[i] = static_cast<T>(0.f);
        continue;
      }
      float* sc = scratch(0, g * L);
      const int32_t* pages = tables + r * table_stride;
      const int64_t bytes = d * static_cast<int64_t>(sizeof(T));
      PagedRows<T> kpos{kc + h * d, pages, bs, row, bytes, L}, vpos{vc + h * d, pages, bs, row, bytes, L};
#ifdef OVFAST_DPBF16
      if constexpr (std::is_same<T, bf16>::value) {
        if (d % 32 == 0 && g <= 64) {
          decode_head_dpbf16(q + (r * Hq + h * g) * d, kpos, vpos, L, g, d, scale, sc, o);
          continue;
        }
      }
#endif
      for (int64_t i = 0; i < g * d; ++i) qf[i] = static_cast<float>(q[(r * Hq + h * g) * d + i]);
      kpos.reset();  // vpos is primed where the V pass starts, not a whole K pass earlier
      // The probabilities stay unnormalised until the end (g x d multiplies, not g x L).
#ifdef OVFAST_AVX512
      if (d % 16 == 0) {  // the vectorised path: whole 16-lane chunks
        const float* kp[16];
        for (int64_t j0 = 0; j0 < L; j0 += 16) {
          const int64_t cnt = std::min<int64_t>(16, L - j0);
          for (int64_t jj = 0; jj < 16; ++jj) {
            if (jj >= cnt) {  // the tail: repeat a valid row, never read past the sequence
              kp[jj] = kp[cnt - 1];
              continue;
            }
            const T* kr = kpos.next();
            if constexpr (std::is_same<T, float>::value) {
              kp[jj] = kr;
            } else {  // bf16: widened once here, not once per query head
              for (int64_t c = 0; c < d; c += 16) _mm512_storeu_ps(kbuf.data() + jj * d + c, load16(kr + c));
              kp[jj] = kbuf.data() + jj * d;
            }
          }
          scores16(qf.data(), kp, cnt, g, d / 16, scale, sc + j0, L);
        }
        for (int64_t gi = 0; gi < g; ++gi) inv[gi] = exp_row(sc + gi * L, L, L, 1.f);
        accumulate_tiles<T>(sc, L, inv.data(), g, d / 16, vpos, o);
        continue;
      }
#endif
      for (int64_t j = 0; j < L; ++j) group_scores<T>(qf.data(), kpos.next(), g, d, scale, sc + j, L);
      for (int64_t gi = 0; gi < g; ++gi) inv[gi] = exp_row(sc + gi * L, L, L, 1.f);
      std::fill(acc.begin(), acc.end(), 0.f);
      vpos.reset();
      for (int64_t j = 0; j < L; ++j) group_accumulate<T>(acc.data(), vpos.next(), sc + j, L, g, d);
      for (int64_t gi = 0; gi < g; ++gi)
        for (int64_t e = 0; e < d; ++e) o[gi * d + e] = static_cast<T>(acc[gi * d + e] * inv[gi]);
    }
  });
}

at::Tensor attention_decode(const at::Tensor& q_in, const at::Tensor& k_cache, const at::Tensor& v_cache,
                            const at::Tensor& block_tables, const at::Tensor& seq_lens, double scale) {
  TORCH_CHECK(q_in.dim() == 3, "attention_decode: q (B, Hq, d)");
  const at::Tensor q = q_in.contiguous();  // a view of the fused qkv rows: a few KiB to copy
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.is_contiguous() && v_cache.is_contiguous() &&
              v_cache.sizes() == k_cache.sizes(), "attention_decode: caches (blocks, block_size, Hkv, d) contiguous");
  TORCH_CHECK(k_cache.scalar_type() == q.scalar_type() && v_cache.scalar_type() == q.scalar_type(),
              "attention_decode: q and the caches must have one dtype");
  TORCH_CHECK(block_tables.scalar_type() == at::kInt && block_tables.dim() == 2 && block_tables.stride(1) == 1 &&
              block_tables.size(0) >= q.size(0), "attention_decode: block_tables (>= B, max_blocks) int32");
  TORCH_CHECK(seq_lens.scalar_type() == at::kInt && seq_lens.is_contiguous() && seq_lens.numel() == q.size(0),
              "attention_decode: seq_lens (B,) int32");
  const int64_t B = q.size(0), Hq = q.size(1), d = q.size(2), bs = k_cache.size(1), Hk = k_cache.size(2);
  TORCH_CHECK(k_cache.size(3) == d && Hq % Hk == 0, "attention_decode: head counts and sizes");
  const int32_t* lens = seq_lens.data_ptr<int32_t>();
  for (int64_t r = 0; r < B; ++r)  // the table must cover every length (a bad table is a bug, not a crash)
    TORCH_CHECK(lens[r] <= block_tables.size(1) * bs, "attention_decode: seq_lens past the block table");
  at::Tensor out = at::empty_like(q);
  if (q.scalar_type() == at::kFloat) {
    decode_attention_impl<float>(q.data_ptr<float>(), k_cache.data_ptr<float>(), v_cache.data_ptr<float>(),
                                 block_tables.data_ptr<int32_t>(), block_tables.stride(0), lens, out.data_ptr<float>(),
                                 B, Hq, Hk, d, bs, scale);
  } else if (q.scalar_type() == at::kBFloat16) {
    decode_attention_impl<bf16>(q.data_ptr<bf16>(), k_cache.data_ptr<bf16>(), v_cache.data_ptr<bf16>(),
                                block_tables.data_ptr<int32_t>(), block_tables.stride(0), lens, out.data_ptr<bf16>(),
                                B, Hq, Hk, d, bs, scale);
  } else {
    TORCH_CHECK(false, "attention_decode: float32 or bfloat16 only");
  }
  return out;
}

// --- prompt_attention ---------------------------------------------------------------------------

// n sequences, each Tq queries against its own S keys. q (n*Tq, Hq, d), k and v (n*S, Hkv, d), any
// row and head strides with d contiguous; out (n*Tq, Hq, d) contiguous. Causal: query t of a
// sequence is position S - Tq + t and sees keys 0..S-Tq+t (a prompt chunk after its cached
// prefix). Each task is one (sequence, kv head, block of queries) with the block's rows for every
// query head of that kv head stacked, so both products are real GEMMs with the vectorised
// exponentials between them; each output row is normalised at the end (d values, not S).
//
// With AVX-512 (prompt_attention_tiled below, fp32 and bf16) K^T and V are packed once per
// (sequence, kv head) and both products run on a register-tiled micro-kernel (or AMX's, bf16).
// Without it, fp32 only, on torch's GEMMs (one thread per task) over contiguous copies of K and V:
// the portable version, about 1.1x the tiled one's time on the AMD EPYC VM.
#ifndef OVFAST_AVX512
void prompt_attention_gemms(const float* q, int64_t qs0, int64_t qs1, const float* k, int64_t ks0, int64_t ks1,
                           const float* v, int64_t vs0, int64_t vs1, float* out, int64_t n, int64_t Tq, int64_t S,
                           int64_t Hq, int64_t Hk, int64_t d, bool causal, float scale) {
  const int64_t g = Hq / Hk, offset = S - Tq;
  const int64_t bq = std::min<int64_t>(Tq, std::max<int64_t>(16, 256 / g));  // ~256 stacked rows per task
  const int64_t blocks = (Tq + bq - 1) / bq;
  // K and V of each (sequence, kv head) as one contiguous (S, d) panel, read by many tasks
  std::vector<float> kpanel(n * Hk * S * d), vpanel(n * Hk * S * d);
  float* const kf = kpanel.data();
  float* const vf = vpanel.data();
  at::parallel_for(0, n * Hk, 1, [&](int64_t a, int64_t b) {
    for (int64_t item = a; item < b; ++item) {
      const int64_t i = item / Hk, h = item % Hk;
      for (int64_t j = 0; j < S; ++j) {
        std::copy_n(k + (i * S + j) * ks0 + h * ks1, d, kf + (item * S + j) * d);
        std::copy_n(v + (i * S + j) * vs0 + h * vs1, d, vf + (item * S + j) * d);
      }
    }
  });
  const auto f32 = at::TensorOptions().dtype(at::kFloat);
  // Tasks are handed out one at a time, the last (causal: the longest) blocks first, so the
  // threads finish together however uneven the blocks are.
  const int64_t tasks = n * Hk * blocks;
  std::atomic<int64_t> next{0};
  at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t, int64_t) {
    float* qb = scratch(0, g * bq * d);
    float* sc = scratch(1, g * bq * S);
    float* ob = scratch(2, g * bq * d);
    float* inv = scratch(3, g * bq);
    for (int64_t item = next++; item < tasks; item = next++) {
      const int64_t blk = blocks - 1 - item / (n * Hk), ih = item % (n * Hk), i = ih / Hk, h = ih % Hk;
      const int64_t t0 = blk * bq, rows = std::min(Tq, t0 + bq) - t0, m = g * rows;
      const int64_t L = causal ? std::min(S, offset + t0 + rows) : S;  // the keys any row of the block sees
      for (int64_t gi = 0; gi < g; ++gi)  // stacked rows: query head h*g+gi, rows t0..t0+rows
        for (int64_t r = 0; r < rows; ++r)
          std::copy_n(q + (i * Tq + t0 + r) * qs0 + (h * g + gi) * qs1, d, qb + (gi * rows + r) * d);
      at::Tensor P = at::from_blob(sc, {m, L}, f32);
      at::Tensor O = at::from_blob(ob, {m, d}, f32);
      at::mm_out(P, at::from_blob(qb, {m, d}, f32), at::from_blob(kf + ih * S * d, {L, d}, f32).t());
      for (int64_t gi = 0; gi < g; ++gi)
        for (int64_t r = 0; r < rows; ++r) {
          const int64_t valid = causal ? std::min(S, offset + t0 + r + 1) : S;
          inv[gi * rows + r] = exp_row(sc + (gi * rows + r) * L, valid, L, scale);
        }
      at::mm_out(O, P, at::from_blob(vf + ih * S * d, {L, d}, f32));
      for (int64_t gi = 0; gi < g; ++gi)
        for (int64_t r = 0; r < rows; ++r) {
          const float* src = ob + (gi * rows + r) * d;
          const float norm = inv[gi * rows + r];
          float* dst = out + ((i * Tq + t0 + r) * Hq + h * g + gi) * d;
          for (int64_t e = 0; e < d; ++e) dst[e] = src[e] * norm;
        }
    }
  });
}
#endif

// --- prompt attention on packed K^T and V (AVX-512: fp32, and bf16 on AMX or AVX512-BF16) ------

// The same tasks as the fp32 kernel above (per sequence, kv head and block of queries, every query
// head of the kv head stacked), with both products on AMX through torch's brgemm micro-kernels
// (at::native::cpublas), which take their B operand packed in VNNI pairs. K^T is packed once per
// (sequence, kv head) in panels of 256 keys, V in chunks of 256 keys (all head columns, padded to
// 16), so each product is one micro-kernel call per 256 keys: with panels of 64 keys and V in
// 16-column panels (SigLIP's head size 72: five calls a chunk) the calls' own cost was a fifth of
// the SigLIP tiles' time (alternating runs: 0.78 of the time with the wide calls, 0.95 for the
// decoder's causal prompt). The scores come out in fp32 (as in torch's flash kernel); each row's
// softmax runs over the keys it sees in fp32 and is stored as bf16 for the second product (as
// torch's kernel does), zeros past them, so padding contributes nothing. Against torch's CPU
// flash kernel, measured alternately (ten rounds, 2 threads): SigLIP's five 729-token tiles
// (head_dim 72) in 28-33 ms against 36-49, the 0.5B decoder's 2,948-token causal prompt in 28
// against 34. What made the difference: the packing as 32-bit moves (a key's two dims are one
// VNNI word), and the softmax as one fused multiply, a degree-4 exp2 and AVX512-BF16's rounding
// instruction per 16 scores (it was ~40% of the kernel with a general exp and emulated rounding).
// Without AMX, both products run on packed_gemm below, on the same packed operands (fp32 too): on
// the AMD EPYC (Zen 4) VM the causal prompt in bf16 in 49 ms a layer against 95 for the fp32
// kernel on widened inputs, the five tiles in 41 against torch's fp32 flash kernel's 89.
constexpr int64_t kKeyPanel = 256;    // keys per packed K^T panel: one call of the first product
constexpr int64_t kValueChunk = 256;  // keys per packed V chunk: one accumulation of the output
constexpr int64_t kQueryRows = 256;   // stacked query rows per task (g heads x a block of positions)

bool amx_bf16() {
#ifdef OVFAST_AVX512
  static const bool ok = at::native::cpublas::could_pack(at::kBFloat16);
  return ok;
#else
  return false;
#endif
}

// Whether prompt_attention runs on the tiled kernel here (fp32, and bf16 where it takes it)
bool prompt_attention_tiles() {
#ifdef OVFAST_AVX512
  return true;
#else
  return false;
#endif
}

// Whether prompt_attention takes bf16 here: on AMX, else on AVX512-BF16 (the build is for this
// CPU, -march=native)
bool bf16_prompt_attention() {
#ifdef OVFAST_DPBF16
  return true;
#else
  return amx_bf16();
#endif
}

#ifdef OVFAST_AVX512
// fp32 -> bf16 rounding to nearest even: one instruction with AVX512-BF16, else store16's sequence
inline void store16_rne(bf16* p, __m512 v) {
#ifdef __AVX512BF16__
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), (__m256i)_mm512_cvtneps_pbh(v));
#else
  store16(p, v);
#endif
}

// store16's rounding into the first lanes of m only
inline void store16_masked(bf16* p, __m512 v, __mmask16 m) { _mm256_mask_storeu_epi16(p, m, round_bf16(v)); }

// 2^t for softmax arguments t <= 0: 2^n 2^f with |f| <= 1/2, 2^f by its degree-4 Taylor
// polynomial (relative error < 5e-5, a fiftieth of bf16's half ulp: the result is stored as bf16);
// below 2^-127 it flushes to 0
inline __m512 exp2_16(__m512 t) {
  t = _mm512_max_ps(t, _mm512_set1_ps(-127.f));
  const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(t, n);
  __m512 p = _mm512_set1_ps(9.6181291076284772e-3f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.5504108664821580e-2f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4022650695910071e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.9314718055994531e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(p, n);
}

// One row's softmax numerators e^(scale (s - max)) over s[0, valid) as bf16 into p, zeros over
// [valid, W) (W a multiple of 16); returns 1 / their fp32 sum (the output row's factor)
inline float softmax_row_bf16(const float* s, bf16* p, int64_t valid, int64_t W, float scale) {
  int64_t j = 0;
  __m512 mv = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  for (; j + 16 <= valid; j += 16) mv = _mm512_max_ps(mv, _mm512_loadu_ps(s + j));
  const __mmask16 tail = first_lanes(valid - j);
  if (j < valid) mv = _mm512_mask_max_ps(mv, tail, mv, _mm512_loadu_ps(s + j));
  const float c = scale * 1.44269504088896341f;  // e^(scale x) = 2^(c x)
  const __m512 cv = _mm512_set1_ps(c), off = _mm512_set1_ps(_mm512_reduce_max_ps(mv) * c);
  __m512 sum = _mm512_setzero_ps();
  for (j = 0; j + 16 <= valid; j += 16) {
    const __m512 e = exp2_16(_mm512_fmsub_ps(_mm512_loadu_ps(s + j), cv, off));
    store16_rne(p + j, e);
    sum = _mm512_add_ps(sum, e);
  }
  if (j < valid) {
    const __m512 e = _mm512_maskz_mov_ps(tail, exp2_16(_mm512_fmsub_ps(_mm512_loadu_ps(s + j), cv, off)));
    store16_rne(p + j, e);
    sum = _mm512_add_ps(sum, e);
    j += 16;
  }
  for (; j < W; j += 16) _mm256_storeu_si256(reinterpret_cast<__m256i*>(p + j), _mm256_setzero_si256());
  return 1.f / _mm512_reduce_add_ps(sum);
}

// The products without AMX, on the same packed operands: C (M x N fp32, row stride ldc) = A x B,
// where B is kw rows of N 32-bit words (row stride ldb words). bf16: A's rows hold 2 kw values,
// word (p, j) of B holds B's elements (2p, j) and (2p+1, j) (K^T's panels and V's chunks below),
// and each step is one of AVX512-BF16's pair dot products (each product exact in fp32, added in
// fp32); fp32: A's rows hold kw values, B's words are its elements, each step an FMA. A tile of
// R rows x NV 16-column vectors stays in registers over all of kw; each step broadcasts one word
// of each A row against NV loads of B.
template <typename T, int R, int NV>
inline void tile_gemm(const T* A, int64_t lda, const uint32_t* B, int64_t ldb, int64_t kw, float* C, int64_t ldc) {
  __m512 c[R][NV];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < NV; ++j) c[r][j] = _mm512_setzero_ps();
  for (int64_t p = 0; p < kw; ++p) {
    __m512i b[NV];
    for (int j = 0; j < NV; ++j) b[j] = _mm512_loadu_si512(B + p * ldb + 16 * j);
    for (int r = 0; r < R; ++r) {
      if constexpr (std::is_same_v<T, float>) {
        const __m512 a = _mm512_set1_ps(A[r * lda + p]);
        for (int j = 0; j < NV; ++j) c[r][j] = _mm512_fmadd_ps(a, _mm512_castsi512_ps(b[j]), c[r][j]);
      } else {  // (a build without AVX512-BF16 takes bf16 on AMX only: never here)
#ifdef OVFAST_DPBF16
        int32_t w;
        std::memcpy(&w, A + r * lda + 2 * p, sizeof w);
        const __m512bh a = (__m512bh)_mm512_set1_epi32(w);
        for (int j = 0; j < NV; ++j) c[r][j] = _mm512_dpbf16_ps(c[r][j], a, (__m512bh)b[j]);
#endif
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < NV; ++j) _mm512_storeu_ps(C + r * ldc + 16 * j, c[r][j]);
}

// N a multiple of 16. Column blocks of 4 vectors (6 rows: 24 accumulators), 5 for a 5-vector rest
// (4 rows; SigLIP's head size 72 pads to 80 columns); a block's B (kw x 64 words) stays in L1
// while the rows go past.
template <typename T>
void packed_gemm(int64_t M, int64_t N, int64_t kw, const T* A, int64_t lda, const uint32_t* B, int64_t ldb, float* C,
                 int64_t ldc) {
  for (int64_t j = 0; j < N;) {
    const int64_t left = (N - j) / 16, nv = left == 5 ? 5 : std::min<int64_t>(left, 4), tall = nv == 5 ? 4 : 6;
    for (int64_t i = 0; i < M; i += tall) {
      const int64_t rows = std::min(tall, M - i);
      const T* a = A + i * lda;
      float* c = C + i * ldc + j;
      by_count<5>(nv, [&](auto NV) {
        by_count<6>(rows, [&](auto R) { tile_gemm<T, R, NV>(a, lda, B + j, ldb, kw, c, ldc); });
      });
    }
    j += 16 * nv;
  }
}

// T = bf16 (on AMX or AVX512-BF16) or float. A 32-bit word holds `per` values: a key's packed
// K^T column is d / per words, V's chunk 256 / per rows of words.
template <typename T>
void prompt_attention_tiled(const T* q, int64_t qs0, int64_t qs1, const T* k, int64_t ks0, int64_t ks1, const T* v,
                            int64_t vs0, int64_t vs1, T* out, int64_t n, int64_t Tq, int64_t S, int64_t Hq, int64_t Hk,
                            int64_t d, bool causal, float scale) {
  namespace cb = at::native::cpublas;
  constexpr bool half = std::is_same_v<T, bf16>;
  constexpr int64_t per = half ? 2 : 1;
  const bool amx = half && amx_bf16();  // else the tile kernel above
  const int64_t g = Hq / Hk, offset = S - Tq;
  const int64_t panels = (S + kKeyPanel - 1) / kKeyPanel, chunks = (S + kValueChunk - 1) / kValueChunk;
  const int64_t dp = (d + 15) / 16 * 16;  // V's packed width, the second product's output columns
  const int64_t bq = std::min<int64_t>(Tq, std::max<int64_t>(16, kQueryRows / g));
  const int64_t blocks = (Tq + bq - 1) / bq, items = n * Hk, words = d / per;
  const int64_t kpanel_size = words * kKeyPanel, vchunk_size = kValueChunk / per * dp;  // in words
  // From torch's allocator (the block cache on an engine): no zero-fill, no fresh pages a call;
  // the packing writes every word, padding included.
  const at::Tensor kpack_t = at::empty({items * panels * kpanel_size}, at::kInt);
  const at::Tensor vpack_t = at::empty({items * chunks * vchunk_size}, at::kInt);
  uint32_t* const kpack = reinterpret_cast<uint32_t*>(kpack_t.data_ptr<int32_t>());
  uint32_t* const vpack = reinterpret_cast<uint32_t*>(vpack_t.data_ptr<int32_t>());
  at::parallel_for(0, items, 1, [&](int64_t a, int64_t b) {
    for (int64_t item = a; item < b; ++item) {
      const int64_t i = item / Hk, h = item % Hk;
      const T* kr = k + i * S * ks0 + h * ks1;
      const T* vr = v + i * S * vs0 + h * vs1;
      for (int64_t pnl = 0; pnl < panels; ++pnl) {
        // K^T (d x 256 keys) as words: word (p, j) is key j's p-th word (bf16: its dims 2p, 2p+1,
        // a VNNI pair), moved as 16 x 16 blocks of words transposed in registers (one word at a
        // time it was about a sixth of the SigLIP tiles' attention)
        const int64_t j0 = pnl * kKeyPanel, keys = std::min(kKeyPanel, S - j0);
        uint32_t* dst = kpack + (item * panels + pnl) * kpanel_size;
        for (int64_t jb = 0; jb < kKeyPanel; jb += 16)
          for (int64_t pb = 0; pb < words; pb += 16) {
            const __mmask16 m = first_lanes(words - pb);
            __m512i t[16];
            for (int64_t r = 0; r < 16; ++r)
              t[r] = jb + r < keys ? _mm512_maskz_loadu_epi32(m, kr + (j0 + jb + r) * ks0 + per * pb) : _mm512_setzero_si512();
            transpose16x16_epi32(t);
            for (int64_t p = 0; p < std::min<int64_t>(16, words - pb); ++p)
              _mm512_storeu_si512(dst + (pb + p) * kKeyPanel + jb, t[p]);
          }
      }
      for (int64_t ch = 0; ch < chunks; ++ch) {
        // V (256 keys x dp columns), zeros past the keys and the head's columns; bf16 in VNNI
        // pairs: word (p, e) is column e of keys 2p, 2p+1
        const int64_t j0 = ch * kValueChunk, keys = std::min(kValueChunk, S - j0);
        uint32_t* dst = vpack + (item * chunks + ch) * vchunk_size;
        for (int64_t p = 0; p < kValueChunk / per; ++p)
          for (int64_t col = 0; col < dp; col += 16) {
            const __mmask16 m = first_lanes(std::max<int64_t>(0, d - col));
            __m512i w;
            if constexpr (half) {
              const int64_t r0 = 2 * p, r1 = 2 * p + 1;
              const __m256i x0 = r0 < keys ? _mm256_maskz_loadu_epi16(m, vr + (j0 + r0) * vs0 + col) : _mm256_setzero_si256();
              const __m256i x1 = r1 < keys ? _mm256_maskz_loadu_epi16(m, vr + (j0 + r1) * vs0 + col) : _mm256_setzero_si256();
              w = _mm512_or_si512(_mm512_cvtepu16_epi32(x0), _mm512_slli_epi32(_mm512_cvtepu16_epi32(x1), 16));
            } else {
              w = p < keys ? _mm512_maskz_loadu_epi32(m, vr + (j0 + p) * vs0 + col) : _mm512_setzero_si512();
            }
            _mm512_storeu_si512(dst + p * dp + col, w);
          }
      }
    }
  });
  const int64_t tasks = items * blocks;
  std::atomic<int64_t> next{0};
  at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t, int64_t) {
    const int64_t rows_max = g * bq, width = chunks * kValueChunk;
    T* qb = reinterpret_cast<T*>(scratch(0, (rows_max * d + per - 1) / per));
    float* sc = scratch(1, rows_max * width);
    // bf16: the probabilities rounded for the second product; fp32: in place of the scores
    T* pb = half ? reinterpret_cast<T*>(scratch(2, (rows_max * width + 1) / 2)) : reinterpret_cast<T*>(sc);
    float* ob = scratch(3, rows_max * dp);
    float* inv = scratch(4, rows_max);
    bool used = false;
    for (int64_t task = next++; task < tasks; task = next++) {  // longest (last) blocks first
      used = true;
      const int64_t blk = blocks - 1 - task / items, item = task % items, i = item / Hk, h = item % Hk;
      const int64_t t0 = blk * bq, rows = std::min(Tq, t0 + bq) - t0, m = g * rows;
      const int64_t L = causal ? std::min(S, offset + t0 + rows) : S;  // the keys any row of the block sees
      const int64_t np = (L + kKeyPanel - 1) / kKeyPanel, nc = (L + kValueChunk - 1) / kValueChunk;
      const int64_t W = nc * kValueChunk;  // the row stride of scores and probabilities
      // One query head: its rows in place (stride qs0); several: stacked head by head into qb.
      const T* a = q + (i * Tq + t0) * qs0 + h * g * qs1;
      int64_t lda = qs0;
      if (g > 1) {
        for (int64_t gi = 0; gi < g; ++gi)
          for (int64_t r = 0; r < rows; ++r)
            std::copy_n(q + (i * Tq + t0 + r) * qs0 + (h * g + gi) * qs1, d, qb + (gi * rows + r) * d);
        a = qb;
        lda = d;
      }
      const uint32_t* kp = kpack + item * panels * kpanel_size;
      const uint32_t* vp = vpack + item * chunks * vchunk_size;
      for (int64_t pnl = 0; pnl < np; ++pnl)
        if (amx)  // (bf16 only)
          cb::brgemm(m, kKeyPanel, d, lda, kKeyPanel, W, false, reinterpret_cast<const bf16*>(a),
                     reinterpret_cast<const bf16*>(kp + pnl * kpanel_size), sc + pnl * kKeyPanel);
        else
          packed_gemm(m, kKeyPanel, words, a, lda, kp + pnl * kpanel_size, kKeyPanel, sc + pnl * kKeyPanel, W);
      for (int64_t gi = 0; gi < g; ++gi)
        for (int64_t r = 0; r < rows; ++r) {
          const int64_t row = gi * rows + r, valid = causal ? std::min(S, offset + t0 + r + 1) : S;
          if constexpr (half)
            inv[row] = softmax_row_bf16(sc + row * W, pb + row * W, valid, W, scale);
          else
            inv[row] = exp_row(sc + row * W, valid, W, scale);
        }
      if (amx)
        for (int64_t ch = 0; ch < nc; ++ch)
          cb::brgemm(m, dp, kValueChunk, W, dp, dp, ch > 0, reinterpret_cast<const bf16*>(pb + ch * kValueChunk),
                     reinterpret_cast<const bf16*>(vp + ch * vchunk_size), ob);
      else  // V's chunks follow one another: one pass over all the keys
        packed_gemm(m, dp, W / per, pb, W, vp, dp, ob, dp);
      for (int64_t gi = 0; gi < g; ++gi)
        for (int64_t r = 0; r < rows; ++r) {
          const float* src = ob + (gi * rows + r) * dp;
          const __m512 norm = _mm512_set1_ps(inv[gi * rows + r]);
          T* dst = out + ((i * Tq + t0 + r) * Hq + h * g + gi) * d;
          for (int64_t e = 0; e < d; e += 16) {
            const __m512 o = _mm512_mul_ps(_mm512_loadu_ps(src + e), norm);
            if constexpr (half)
              store16_masked(dst + e, o, first_lanes(d - e));
            else
              _mm512_mask_storeu_ps(dst + e, first_lanes(d - e), o);
          }
        }
    }
    if (used && amx) cb::brgemm_release();
  });
}
#endif  // OVFAST_AVX512

at::Tensor prompt_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t n, bool causal,
                            double scale) {
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && v.sizes() == k.sizes(), "prompt_attention: q (n*Tq, Hq, d), k and v (n*S, Hkv, d)");
  TORCH_CHECK(q.stride(2) == 1 && k.stride(2) == 1 && v.stride(2) == 1, "prompt_attention: head_dim contiguous");
  const auto dt = q.scalar_type();
  TORCH_CHECK((dt == at::kFloat || dt == at::kBFloat16) && k.scalar_type() == dt && v.scalar_type() == dt,
              "prompt_attention: float32, or bfloat16 on AMX or AVX512-BF16; q, k and v of one dtype");
  const int64_t Hq = q.size(1), Hk = k.size(1), d = q.size(2);
  TORCH_CHECK(n > 0 && q.size(0) % n == 0 && k.size(0) % n == 0 && k.size(2) == d && Hk > 0 && Hq % Hk == 0,
              "prompt_attention: shapes");
  TORCH_CHECK(dt == at::kFloat || (bf16_prompt_attention() && d % 2 == 0),
              "prompt_attention: bfloat16 needs AMX or AVX512-BF16 (bf16_prompt_attention()) and an even head size");
  const int64_t Tq = q.size(0) / n, S = k.size(0) / n;
  TORCH_CHECK(!causal || S >= Tq, "prompt_attention: causal needs at least as many keys as queries");
  at::Tensor out = at::empty({q.size(0), Hq, d}, q.options());
  if (q.numel() == 0) return out;
  TORCH_CHECK(S > 0, "prompt_attention: queries need keys");
#ifdef OVFAST_AVX512
  const auto run = [&](auto zero) {
    using T = decltype(zero);
    prompt_attention_tiled(q.data_ptr<T>(), q.stride(0), q.stride(1), k.data_ptr<T>(), k.stride(0), k.stride(1),
                           v.data_ptr<T>(), v.stride(0), v.stride(1), out.data_ptr<T>(), n, Tq, S, Hq, Hk, d, causal,
                           static_cast<float>(scale));
  };
  if (dt == at::kFloat)
    run(0.f);
  else
    run(bf16(0.f));
#else  // fp32 only (bf16 was refused above)
  prompt_attention_gemms(q.data_ptr<float>(), q.stride(0), q.stride(1), k.data_ptr<float>(), k.stride(0), k.stride(1),
                         v.data_ptr<float>(), v.stride(0), v.stride(1), out.data_ptr<float>(), n, Tq, S, Hq, Hk, d,
                         causal, static_cast<float>(scale));
#endif
  return out;
}

// --- decode_layers ------------------------------------------------------------------------------

// Every decoder layer of one decode step, in one call: Qwen2DecoderLayer.forward's ops on the
// kernels above, in its order (so the result equals the per-op path bit for bit), without a
// Python round trip per op (about a tenth of a 0.5B step). Caches (layers, blocks, bs, Hkv, d).
std::tuple<at::Tensor, at::Tensor> decode_layers(
    const at::Tensor& h_in, at::TensorList ln1, at::TensorList qkv_w, at::TensorList qkv_b, at::TensorList o_w,
    at::TensorList ln2, at::TensorList gate_up_w, at::TensorList down_w, const at::Tensor& k_cache,
    const at::Tensor& v_cache, const at::Tensor& positions, const at::Tensor& slots, const at::Tensor& block_tables,
    const at::Tensor& seq_lens, const at::Tensor& cos_sin, int64_t heads, int64_t kv_heads, double eps) {
  const int64_t layers = static_cast<int64_t>(ln1.size());
  TORCH_CHECK(qkv_w.size() == ln1.size() && qkv_b.size() == ln1.size() && o_w.size() == ln1.size() &&
              ln2.size() == ln1.size() && gate_up_w.size() == ln1.size() && down_w.size() == ln1.size() &&
              k_cache.dim() == 5 && k_cache.size(0) >= layers && v_cache.sizes() == k_cache.sizes(),
              "decode_layers: one entry per layer");
  const int64_t n = h_in.size(0), hd = k_cache.size(4), q_size = heads * hd, kv_size = kv_heads * hd;
  const double scale = std::pow(static_cast<double>(hd), -0.5);  // as Python's head_dim**-0.5
  at::Tensor h = h_in, residual;
  for (int64_t i = 0; i < layers; ++i) {
    at::Tensor x;
    if (!residual.defined()) {
      residual = h;
      x = std::get<0>(rms_norm(h, ln1[i], eps, c10::nullopt));
    } else {
      std::tie(x, residual) = rms_norm(h, ln1[i], eps, residual);
    }
    const at::Tensor qkv = small_linear(x, qkv_w[i], qkv_b[i]);
    at::Tensor q = qkv.narrow(1, 0, q_size).view({n, heads, hd});
    at::Tensor k = qkv.narrow(1, q_size, kv_size).view({n, kv_heads, hd});
    at::Tensor v = qkv.narrow(1, q_size + kv_size, kv_size).view({n, kv_heads, hd});
    rope(q, k, positions, cos_sin);
    at::Tensor kc = k_cache.select(0, i), vc = v_cache.select(0, i);
    kc.view({-1, kv_heads, hd}).index_copy_(0, slots, k);
    vc.view({-1, kv_heads, hd}).index_copy_(0, slots, v);
    const at::Tensor attn = attention_decode(q, kc, vc, block_tables, seq_lens, scale);
    h = small_linear(attn.reshape({n, q_size}), o_w[i], c10::nullopt);
    std::tie(x, residual) = rms_norm(h, ln2[i], eps, residual);
    h = small_linear(silu_mul(small_linear(x, gate_up_w[i], c10::nullopt)), down_w[i], c10::nullopt);
  }
  return {h, residual};
}

}  // namespace

TORCH_LIBRARY(ovfast_cpu, m) {
  m.def("small_linear(Tensor x, Tensor w, Tensor? bias=None) -> Tensor");
  m.def("rms_norm(Tensor x, Tensor w, float eps, Tensor? residual=None) -> (Tensor, Tensor)");
  m.def("rope(Tensor(a!) q, Tensor(b!) k, Tensor positions, Tensor cos_sin) -> ()");
  m.def("attention_decode(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, Tensor seq_lens, float scale) -> Tensor");
  m.def("silu_mul(Tensor gate_up) -> Tensor");
  m.def("gelu_tanh(Tensor x) -> Tensor");
  m.def("bias_gelu_tanh_(Tensor(a!) y, Tensor bias) -> ()");
  m.def("prompt_attention(Tensor q, Tensor k, Tensor v, int n, bool causal, float scale) -> Tensor");
  m.def("amx_bf16() -> bool", &amx_bf16);
  m.def("bf16_prompt_attention() -> bool", &bf16_prompt_attention);
  m.def("prompt_attention_tiles() -> bool", &prompt_attention_tiles);
  m.def("decode_layers(Tensor h, Tensor[] ln1, Tensor[] qkv_w, Tensor[] qkv_b, Tensor[] o_w, Tensor[] ln2, "
        "Tensor[] gate_up_w, Tensor[] down_w, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor positions, Tensor slots, "
        "Tensor block_tables, Tensor seq_lens, Tensor cos_sin, int heads, int kv_heads, float eps) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(ovfast_cpu, CPU, m) {
  m.impl("small_linear", &small_linear);
  m.impl("rms_norm", &rms_norm);
  m.impl("rope", &rope);
  m.impl("attention_decode", &attention_decode);
  m.impl("silu_mul", &silu_mul);
  m.impl("gelu_tanh", &gelu_tanh);
  m.impl("bias_gelu_tanh_", &bias_gelu_tanh_);
  m.impl("prompt_attention", &prompt_attention);
  m.impl("decode_layers", &decode_layers);
}
