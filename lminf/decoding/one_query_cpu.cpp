// One query's attention on a CPU, in one pass over the stored keys and values (lminf/decoding/native.py builds it).
//
// rows (Hkv, rep, D) float32: a query's heads grouped by their key head; keys and values
// (Hkv, S, D) in float32, float64, bfloat16 or float16, each row of D contiguous (a cache's
// view). Every key is seen; the first n_far, the first tokens past the window, turned as read
// by their own rotation (far_cos, far_sin) to where the query sees them. -> (Hkv, rep, D) float32: softmax(rows . keys * scale) . values,
// summed in float32, the 16-bit keys and values widened as they are read (the query keeps its
// float32 bits). Each key head's keys are cut into parts the threads share; each part keeps
// its maximum, sum and weighted values (an online softmax) and the parts merge at the end.
// Per block of keys: the rows' scores four keys at a time, their maxima and exponentials a vector
// at a time, the weighted values summed in registers, and the next block's rows asked of the
// memory (prefetched) meanwhile: a step reads each layer's cache cold, after the weights.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
#include <immintrin.h>
#endif

namespace {
using Vec = at::vec::Vectorized<float>;
constexpr int64_t BLOCK = 32;  // keys scored before their exponentials are taken
constexpr int64_t MAX_D = 256;
constexpr int64_t MAX_REP = 16;

inline float hsum(const Vec& x) {
  return at::vec::vec_reduce_all<float>([](const Vec& a, const Vec& b) { return a + b; }, x);
}

// The sums of four vectors' lanes, into out[0..3]: on AVX-512 and AVX2 halved and added pairwise
// together (13 instructions for the four, not 4 x 8).
inline void hsum4(const Vec& a0, const Vec& a1, const Vec& a2, const Vec& a3, float* out) {
#if defined(CPU_CAPABILITY_AVX512)
  const auto half = [](const Vec& a) {
    const __m512 v = a;
    return _mm256_add_ps(_mm512_castps512_ps256(v), _mm512_extractf32x8_ps(v, 1));
  };
  const __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(half(a0), half(a1)), _mm256_hadd_ps(half(a2), half(a3)));
  _mm_storeu_ps(out, _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1)));
#elif defined(CPU_CAPABILITY_AVX2)
  const __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
  _mm_storeu_ps(out, _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1)));
#else
  out[0] = hsum(a0);
  out[1] = hsum(a1);
  out[2] = hsum(a2);
  out[3] = hsum(a3);
#endif
}

// A 16-bit row widened to float32 into dst, a vector at a time where at::vec can.
template <typename T>
inline void widen(const T* src, float* dst, int64_t d) {
  int64_t t = 0;
  if constexpr (std::is_same_v<T, c10::BFloat16> || std::is_same_v<T, c10::Half>) {
    for (; t + Vec::size() <= d; t += Vec::size()) {
      Vec x;
      at::vec::load_to_float<T>(src + t, x);
      x.store(dst + t);
    }
  }
  for (; t < d; ++t) dst[t] = static_cast<float>(src[t]);
}

// Each of a block's rows [j0, j0 + nb) as float32: where stored for float32, else widened into buf.
template <typename T>
inline void as_float(const T* base, int64_t stride, int64_t j0, int64_t nb, int64_t d, float* buf, const float** rows) {
  for (int64_t j = 0; j < nb; ++j) {
    const T* row = base + (j0 + j) * stride;
    if constexpr (std::is_same_v<T, float>) {
      rows[j] = row;
    } else {
      widen(row, buf + j * d, d);
      rows[j] = buf + j * d;
    }
  }
}

// A far key (D floats at x) moved to where the query sees it, into out: x * cos + rotate_half(x) * sin
// (lminf.rope.rotate), rounded to the cache's dtype as a rotated key stored there would be.
template <typename T>
inline void turn(const float* x, const float* cos, const float* sin, int64_t d, float* out) {
  float h[MAX_D];
  std::copy(x, x + d, h);
  const int64_t half = d / 2;
  for (int64_t t = 0; t < d; ++t) {
    const float y = h[t] * cos[t] + (t < half ? -h[t + half] : h[t - half]) * sin[t];
    out[t] = std::is_same_v<T, float> || std::is_same_v<T, double> ? y : static_cast<float>(static_cast<T>(y));
  }
}

// Asks the memory for rows [from, to) of keys and values, for a block read later.
template <typename T>
inline void prefetch(const T* k, const T* v, int64_t k_row, int64_t v_row, int64_t from, int64_t to, int64_t d) {
  const int64_t bytes = d * static_cast<int64_t>(sizeof(T));
  for (int64_t j = from; j < to; ++j) {
    for (int64_t b = 0; b < bytes; b += 64) {  // a cache line at a time
      __builtin_prefetch(reinterpret_cast<const char*>(k + j * k_row) + b);
      __builtin_prefetch(reinterpret_cast<const char*>(v + j * v_row) + b);
    }
  }
}

// acc (G rows of D) += p[g][j] * value[j] over the block's keys j, the sums held in registers
// through the block (a sum kept in memory waits on its own store at every key).
template <int64_t D, int64_t G>
inline void weigh_group(const float* const* value, const float* p, int64_t nb, float* acc) {
  constexpr int64_t NV = D / Vec::size();
  Vec a[G][NV];
  for (int64_t g = 0; g < G; ++g)
    for (int64_t t = 0; t < NV; ++t) a[g][t] = Vec::loadu(acc + g * D + t * Vec::size());
  for (int64_t j = 0; j < nb; ++j) {
    Vec x[NV];
    for (int64_t t = 0; t < NV; ++t) x[t] = Vec::loadu(value[j] + t * Vec::size());
    for (int64_t g = 0; g < G; ++g) {
      const Vec w(p[g * BLOCK + j]);
      for (int64_t t = 0; t < NV; ++t) a[g][t] = at::vec::fmadd(w, x[t], a[g][t]);
    }
  }
  for (int64_t g = 0; g < G; ++g)
    for (int64_t t = 0; t < NV; ++t) a[g][t].store(acc + g * D + t * Vec::size());
}

// Every row's weighted values (sc: rows' weights, BLOCK apart), rows in groups the registers hold.
template <int64_t D>
inline void weigh_values(const float* const* value, const float* sc, int64_t nb, int64_t rep, float* acc) {
  constexpr int64_t GROUP = std::clamp<int64_t>(20 / (D / Vec::size()), 1, 4);
  for (int64_t r = 0; r < rep; r += GROUP) {
    const float* p = sc + r * BLOCK;
    float* a = acc + r * D;
    switch (std::min(GROUP, rep - r)) {
      case 4: weigh_group<D, 4>(value, p, nb, a); break;
      case 3: weigh_group<D, 3>(value, p, nb, a); break;
      case 2: weigh_group<D, 2>(value, p, nb, a); break;
      default: weigh_group<D, 1>(value, p, nb, a);
    }
  }
}

// One part of one key head: keys [begin, end) -> its maximum m, sum l and weighted values acc per row.
// FIXED_D: the head size as a constant where it is a usual one (loops unrolled), else 0.
template <typename T, int64_t FIXED_D>
void part(const float* q, const T* k, const T* v, int64_t rep, int64_t d_, int64_t k_row, int64_t v_row,
          int64_t begin, int64_t end, float scale, const float* far_cos, const float* far_sin, int64_t n_far,
          float* acc, float* m, float* l) {
  const int64_t d = FIXED_D ? FIXED_D : d_;
  const bool whole_vectors = d % Vec::size() == 0;
  alignas(64) float kf[MAX_D * BLOCK];
  alignas(64) float vf[MAX_D * BLOCK];
  alignas(64) float sc[MAX_REP * BLOCK];
  alignas(64) float qs[MAX_REP * MAX_D];  // the rows times the scale: the scores come out scaled
  for (int64_t i = 0; i < rep * d; ++i) qs[i] = q[i] * scale;
  for (int64_t r = 0; r < rep; ++r) {
    m[r] = -std::numeric_limits<float>::infinity();
    l[r] = 0.f;
  }
  std::fill(acc, acc + rep * d, 0.f);
  prefetch(k, v, k_row, v_row, begin, std::min(end, begin + BLOCK), d);
  for (int64_t j0 = begin; j0 < end; j0 += BLOCK) {
    const int64_t nb = std::min(BLOCK, end - j0);
    prefetch(k, v, k_row, v_row, j0 + BLOCK, std::min(end, j0 + 2 * BLOCK), d);
    const float* key[BLOCK];
    as_float(k, k_row, j0, nb, d, kf, key);
    for (int64_t j = 0; j < nb && j0 + j < n_far; ++j) {  // the first n_far keys turned by their own angle
      turn<T>(key[j], far_cos + (j0 + j) * d, far_sin + (j0 + j) * d, d, kf + j * d);
      key[j] = kf + j * d;
    }
    for (int64_t r = 0; r < rep; ++r) {  // scores, four keys at a time (four independent chains of products)
      const float* qr = qs + r * d;
      float* s = sc + r * BLOCK;
      int64_t j = 0;
      for (; whole_vectors && j + 4 <= nb; j += 4) {
        Vec a0(0.f), a1(0.f), a2(0.f), a3(0.f);
        for (int64_t t = 0; t < d; t += Vec::size()) {
          const Vec qv = Vec::loadu(qr + t);
          a0 = at::vec::fmadd(qv, Vec::loadu(key[j] + t), a0);
          a1 = at::vec::fmadd(qv, Vec::loadu(key[j + 1] + t), a1);
          a2 = at::vec::fmadd(qv, Vec::loadu(key[j + 2] + t), a2);
          a3 = at::vec::fmadd(qv, Vec::loadu(key[j + 3] + t), a3);
        }
        hsum4(a0, a1, a2, a3, s + j);
      }
      for (; j < nb; ++j) {
        float dot = 0.f;
        for (int64_t t = 0; t < d; ++t) dot += qr[t] * key[j][t];
        s[j] = dot;
      }
    }
    for (int64_t r = 0; r < rep; ++r) {  // exponentials against the running maximum
      float* s = sc + r * BLOCK;
      float top = m[r];
      int64_t j = 0;
      if (nb >= Vec::size()) {  // a vector of maxima (one chain of maxima key by key took a fifth of the time)
        Vec most = Vec::loadu(s);
        for (j = Vec::size(); j + Vec::size() <= nb; j += Vec::size()) most = at::vec::maximum(most, Vec::loadu(s + j));
        top = std::max(top, at::vec::vec_reduce_all<float>([](const Vec& a, const Vec& b) { return at::vec::maximum(a, b); }, most));
      }
      for (; j < nb; ++j) top = std::max(top, s[j]);
      const float fix = std::exp(m[r] - top);  // 0 on the first block (m = -inf)
      l[r] *= fix;
      for (int64_t t = 0; t < d; ++t) acc[r * d + t] *= fix;
      m[r] = top;
      j = 0;
      Vec sum(0.f);
      for (; j + Vec::size() <= nb; j += Vec::size()) {  // Sleef's exp: within 1 ulp
        const Vec p = (Vec::loadu(s + j) - Vec(top)).exp();
        p.store(s + j);
        sum = sum + p;
      }
      float total = hsum(sum);
      for (; j < nb; ++j) {
        s[j] = std::exp(s[j] - top);
        total += s[j];
      }
      l[r] += total;
    }
    const float* value[BLOCK];  // weighted values
    as_float(v, v_row, j0, nb, d, vf, value);
    if constexpr (FIXED_D > 0 && FIXED_D % Vec::size() == 0) {
      weigh_values<FIXED_D>(value, sc, nb, rep, acc);
    } else {
      for (int64_t j = 0; j < nb; ++j) {
        for (int64_t r = 0; r < rep; ++r) {
          const float p = sc[r * BLOCK + j];
          float* ar = acc + r * d;
          for (int64_t t = 0; t < d; ++t) ar[t] += p * value[j][t];
        }
      }
    }
  }
}

// far_cos, far_sin (n_far, D) float32, or none: the first n_far keys of every head are turned by them first.
at::Tensor one_query(const at::Tensor& rows, const at::Tensor& keys, const at::Tensor& values, double scale,
                     const std::optional<at::Tensor>& far_cos, const std::optional<at::Tensor>& far_sin) {
  TORCH_CHECK(rows.dim() == 3 && keys.dim() == 3 && values.dim() == 3, "lminf::one_query: rows, keys and values are 3-D");
  TORCH_CHECK(rows.scalar_type() == at::kFloat, "lminf::one_query: rows are float32");
  TORCH_CHECK(keys.scalar_type() == values.scalar_type(), "lminf::one_query: keys and values of one dtype");
  TORCH_CHECK(keys.sizes() == values.sizes() && keys.size(0) == rows.size(0) && keys.size(2) == rows.size(2),
              "lminf::one_query: rows (Hkv, rep, D), keys and values (Hkv, S, D)");
  TORCH_CHECK(keys.size(1) > 0, "lminf::one_query: at least one key");
  TORCH_CHECK(keys.size(2) <= MAX_D && rows.size(1) <= MAX_REP, "lminf::one_query: D <= 256 and rep <= 16");
  TORCH_CHECK(keys.stride(2) == 1 && values.stride(2) == 1, "lminf::one_query: each key's and value's D contiguous");
  const auto q = rows.contiguous();
  const int64_t hkv = keys.size(0), s = keys.size(1), d = keys.size(2), rep = q.size(1);
  TORCH_CHECK(far_cos.has_value() == far_sin.has_value(), "lminf::one_query: far_cos and far_sin together");
  const int64_t n_far = far_cos.has_value() ? far_cos->size(0) : 0;
  if (n_far) {
    for (const auto* t : {&*far_cos, &*far_sin})
      TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous() && t->dim() == 2 && t->size(0) == n_far && t->size(1) == d,
                  "lminf::one_query: far_cos and far_sin (n_far, D) contiguous float32");
    TORCH_CHECK(n_far <= s && d % 2 == 0, "lminf::one_query: n_far <= S, D even");
  }
  const float* cos_p = n_far ? far_cos->data_ptr<float>() : nullptr;
  const float* sin_p = n_far ? far_sin->data_ptr<float>() : nullptr;
  // parts per key head: the threads share Hkv * parts items; more past 4,096 keys (measured faster)
  const int64_t parts = std::min<int64_t>(s, at::get_num_threads() * (s > 4096 ? 4 : 1));
  const int64_t size = (s + parts - 1) / parts;
  auto acc = at::empty({hkv, parts, rep, d}, q.options());
  auto ml = at::empty({hkv, parts, 2, rep}, q.options());
  float* acc_p = acc.data_ptr<float>();
  float* ml_p = ml.data_ptr<float>();
  const float* q_p = q.data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, keys.scalar_type(), "lminf::one_query", [&] {
    const scalar_t* k_p = keys.data_ptr<scalar_t>();
    const scalar_t* v_p = values.data_ptr<scalar_t>();
    const auto run = d == 64 ? &part<scalar_t, 64> : d == 128 ? &part<scalar_t, 128> : &part<scalar_t, 0>;
    at::parallel_for(0, hkv * parts, 1, [&](int64_t a, int64_t b) {
      for (int64_t item = a; item < b; ++item) {
        const int64_t h = item / parts, c = item % parts;
        const int64_t begin = std::min(s, c * size), end = std::min(s, begin + size);
        float* m = ml_p + item * 2 * rep;
        run(q_p + h * rep * d, k_p + h * keys.stride(0), v_p + h * values.stride(0), rep, d, keys.stride(1),
            values.stride(1), begin, end, static_cast<float>(scale), cos_p, sin_p, n_far, acc_p + item * rep * d, m,
            m + rep);
      }
    });
  });
  auto out = at::empty({hkv, rep, d}, q.options());
  float* out_p = out.data_ptr<float>();
  for (int64_t h = 0; h < hkv; ++h) {  // merge the parts: each weighs exp(its maximum - the largest)
    for (int64_t r = 0; r < rep; ++r) {
      float top = -std::numeric_limits<float>::infinity();
      for (int64_t c = 0; c < parts; ++c) top = std::max(top, ml_p[(h * parts + c) * 2 * rep + r]);
      float* o = out_p + (h * rep + r) * d;
      std::fill(o, o + d, 0.f);
      float total = 0.f;
      for (int64_t c = 0; c < parts; ++c) {
        const float* m = ml_p + (h * parts + c) * 2 * rep;
        if (m[rep + r] == 0.f) continue;  // an empty part
        const float w = std::exp(m[r] - top);
        total += w * m[rep + r];
        const float* a = acc_p + ((h * parts + c) * rep + r) * d;
        for (int64_t t = 0; t < d; ++t) o[t] += w * a[t];
      }
      for (int64_t t = 0; t < d; ++t) o[t] /= total;
    }
  }
  return out;
}
}  // namespace

TORCH_LIBRARY(lminf, lib) {
  lib.def("one_query(Tensor rows, Tensor keys, Tensor values, float scale, Tensor? far_cos=None, Tensor? far_sin=None) -> Tensor");
}
TORCH_LIBRARY_IMPL(lminf, CPU, lib) { lib.impl("one_query", &one_query); }
