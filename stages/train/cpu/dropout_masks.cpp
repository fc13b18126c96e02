// Dropout keep-masks drawn from torch's default CPU generator exactly as `bernoulli_(keep)` draws
// them on this CPU build, in bulk. Loaded with ctypes by dropout_masks.py, which checks that the
// masks and the generator's state afterwards equal torch's own before it uses this.
//
// torch's CPU kernel (ATen/native/cpu/DistributionTemplates.h, the path taken where no MKL
// stream is used) draws, per element and one at a time, random64() = two mt19937 outputs
// (first one high), takes its low 53 bits as a double u in [0, 1) and keeps the element when
// u < keep, serially. The same numbers
// come out of the same mt19937 run in blocks: tempering a block of the state array, then
// comparing the 53-bit integers against keep * 2^53 (exact: u = m * 2^-53 < keep exactly when
// m < ceil(keep * 2^53)).

#include <ATen/CPUGeneratorImpl.h>
#include <ATen/core/MT19937RNGEngine.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <mutex>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace {

constexpr int N = at::MERSENNE_STATE_N;  // 624
constexpr int M = at::MERSENNE_STATE_M;  // 397

inline __attribute__((always_inline)) uint32_t twist(uint32_t u, uint32_t v) {
  return (((u & at::UMASK) | (v & at::LMASK)) >> 1) ^ ((v & 1) ? at::MATRIX_A : 0u);
}

// mt19937_engine::next_state, on the pod.
inline __attribute__((always_inline)) void next_state(at::mt19937_data_pod& d) {
  uint32_t* s = d.state_.data();
  int i = 0;
  for (; i < N - M; ++i) s[i] = s[i + M] ^ twist(s[i], s[i + 1]);
  for (; i < N - 1; ++i) s[i] = s[i + M - N] ^ twist(s[i], s[i + 1]);
  s[N - 1] = s[M - 1] ^ twist(s[N - 1], s[0]);
}

// The next `count` outputs of mt19937_engine::operator(), tempered, into `out`.
inline __attribute__((always_inline)) void draw(at::mt19937_data_pod& d, uint32_t* out, int64_t count) {
  while (count > 0) {
    if (d.left_ == 1) {  // operator() would twist on this call: its read then takes state[0]
      next_state(d);
      d.left_ = N + 1;
      d.next_ = 0;
    }
    const int64_t take = std::min<int64_t>(count, d.left_ - 1);
    const uint32_t* s = d.state_.data() + d.next_;
    for (int64_t i = 0; i < take; ++i) {
      uint32_t y = s[i];
      y ^= (y >> 11);
      y ^= (y << 7) & 0x9d2c5680u;
      y ^= (y << 15) & 0xefc60000u;
      y ^= (y >> 18);
      out[i] = y;
    }
    d.next_ += static_cast<uint32_t>(take);
    d.left_ -= static_cast<int>(take);
    out += take;
    count -= take;
  }
}

// random64() of torch's CPU generator from two tempered words (first one high), low 53 bits: the
// integer m of u = m * 2^-53, compared with ceil(keep * 2^53) (threshold_of).
inline __attribute__((always_inline)) uint64_t draw53(const uint32_t* words, int64_t i) {
  return (static_cast<uint64_t>(words[2 * i] & 0x1fffffu) << 32) | words[2 * i + 1];
}

// bf16 (as uint16) times a 0/1 mask as torch's mul: x where kept, else a zero of x's sign (NaN
// for inf and NaN).
inline __attribute__((always_inline)) uint16_t bf16_times_bit(uint16_t v, bool kept) {
  const uint16_t zero = (v & 0x7f80u) == 0x7f80u ? 0x7fc0u : (v & 0x8000u);
  return kept ? v : zero;
}

// Built for AVX2 and for any x86-64 (or other CPU), chosen when the library loads: the
// tempering and the comparisons vectorise (AVX2 roughly halves the time of the baseline build).
#if defined(__x86_64__)
__attribute__((target_clones("avx2", "default")))
#endif
void fill(at::mt19937_data_pod& d, uint8_t* out, int64_t n, uint64_t threshold) {
  constexpr int64_t CHUNK = 4096;
  uint32_t words[2 * CHUNK];
  for (int64_t start = 0; start < n; start += CHUNK) {
    const int64_t len = std::min(CHUNK, n - start);
    draw(d, words, 2 * len);
    uint8_t* o = out + start;
    for (int64_t i = 0; i < len; ++i) o[i] = draw53(words, i) < threshold;
  }
}

// The same draws as `fill`, written as F.dropout's noise (`scale` where kept, else 0) and the
// dropped-out input x * noise, in one pass over x: torch's way (mask, .to(float), div_, mul)
// makes four passes; the products are the same single fp32 multiplications.
#if defined(__x86_64__)
__attribute__((target_clones("avx2", "default")))
#endif
void fill_noise(at::mt19937_data_pod& d, const float* x, float* dropped, float* noise, int64_t n,
                uint64_t threshold, float scale) {
  constexpr int64_t CHUNK = 4096;
  uint32_t words[2 * CHUNK];
  for (int64_t start = 0; start < n; start += CHUNK) {
    const int64_t len = std::min(CHUNK, n - start);
    draw(d, words, 2 * len);
    const float* xi = x + start;
    float* di = dropped + start;
    float* ni = noise + start;
    for (int64_t i = 0; i < len; ++i) {
      const float v = draw53(words, i) < threshold ? scale : 0.0f;
      ni[i] = v;
      di[i] = xi[i] * v;
    }
  }
}

// bf16 values as torch stores them (uint16: the high half of an fp32).
inline float bf16_to_float(uint16_t v) {
  uint32_t u = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline uint16_t float_to_bf16(float f) {  // round to nearest even, as c10::BFloat16
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if (std::isnan(f)) return 0x7fc0u;
  return static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

// The same draws as `fill`, as the dropped-out input x * noise and the keep mask packed 8 to a
// byte (bit i % 8 of byte i / 8, 1 = kept): the mask is what backward needs besides `dropped`,
// and as bits it keeps 1/32 of the bytes of fp32 noise. `x` and `dropped` are fp32 (`scale` is
// the kept value of F.dropout's noise) or bf16 as uint16 (`fill_bits_low`: x times LoraLinearLow's
// 0/1 mask).
template <typename T>
inline __attribute__((always_inline)) void fill_bits_body(at::mt19937_data_pod& d, const T* x, T* dropped,
                                                          uint8_t* bits, int64_t n, uint64_t threshold, float scale) {
  constexpr int64_t CHUNK = 4096;  // a multiple of 8: every chunk starts on a byte of `bits`
  uint32_t words[2 * CHUNK];
  uint8_t keep[CHUNK + 8];
  float noise[sizeof(T) == 4 ? CHUNK : 1];
  for (int64_t start = 0; start < n; start += CHUNK) {
    const int64_t len = std::min(CHUNK, n - start);
    draw(d, words, 2 * len);
    const T* xi = x + start;
    T* di = dropped + start;
    // loops that each vectorise (one loop doing it all ran ~2x slower)
    if constexpr (sizeof(T) == 4) {
      // fill_noise's loop, the noise kept on the stack. Written out twice on purpose: one shared
      // always_inline loop vectorised in some processes and not in others (up to 2x slower).
      for (int64_t i = 0; i < len; ++i) {
        const float v = draw53(words, i) < threshold ? scale : 0.0f;
        noise[i] = v;
        di[i] = xi[i] * v;
      }
      for (int64_t i = 0; i < len; ++i) keep[i] = noise[i] != 0.0f;
    } else {
      for (int64_t i = 0; i < len; ++i) keep[i] = draw53(words, i) < threshold;
      for (int64_t i = 0; i < len; ++i) di[i] = bf16_times_bit(xi[i], keep[i]);
    }
    std::memset(keep + len, 0, 8);
    uint8_t* bi = bits + start / 8;
    for (int64_t j = 0; j < len; j += 8) {  // 8 bytes of 0/1, byte k to bit k: one multiply
      uint64_t v;
      std::memcpy(&v, keep + j, 8);
      bi[j / 8] = static_cast<uint8_t>((v * 0x0102040810204080ull) >> 56);
    }
  }
}

#if defined(__x86_64__)
__attribute__((target_clones("avx2", "default")))
#endif
void fill_bits(at::mt19937_data_pod& d, const float* x, float* dropped, uint8_t* bits, int64_t n,
               uint64_t threshold, float scale) {
  fill_bits_body(d, x, dropped, bits, n, threshold, scale);
}

#if defined(__x86_64__)
__attribute__((target_clones("avx2", "default")))
#endif
void fill_bits_low(at::mt19937_data_pod& d, const uint16_t* x, uint16_t* dropped, uint8_t* bits, int64_t n,
                   uint64_t threshold) {
  fill_bits_body(d, x, dropped, bits, n, threshold, 1.0f);
}

// acc[i] += t[i] * noise[i] with noise[i] = scale where bit i is set, else 0, rounded once (a fused
// multiply-add): exactly `acc.addcmul_(t, noise)`, which torch's AVX2 and AVX-512 kernels compute
// as fma(t, noise, acc) (checked on 56k elements: 0 differences; two roundings differed in 15.7k).
// For elements [begin, end), begin a multiple of 8; the scalar form, for any CPU and the tail.
inline void masked_fma_scalar(float* acc, const float* t, const uint8_t* bits, int64_t begin, int64_t end, float scale) {
  for (int64_t i = begin; i < end; ++i) acc[i] = std::fma(t[i], (bits[i / 8] >> (i % 8)) & 1 ? scale : 0.0f, acc[i]);
}

// bf16 (as uint16) with a 0/1 mask: acc = bf16(float(acc) + float(t) * bit), what
// `acc.addcmul_(t, mask)` gives (torch computes bf16 pointwise ops in fp32, rounds once).
inline void masked_add_low_scalar(uint16_t* acc, const uint16_t* t, const uint8_t* bits, int64_t begin, int64_t end) {
  for (int64_t i = begin; i < end; ++i) {
    const float keep = (bits[i / 8] >> (i % 8)) & 1 ? 1.0f : 0.0f;
    acc[i] = float_to_bf16(std::fma(bf16_to_float(t[i]), keep, bf16_to_float(acc[i])));
  }
}

// dropped[i] = x[i] * noise[i] again from the bits `fill_bits` wrote: what a backward needs of the
// dropped-out input when it kept x (kept anyway, or shared by the adapters reading the same input)
// instead of a copy per adapter. The same single multiplications as the forward's, so the same
// bits; bf16 (`low`): x, or a zero of x's sign (NaN for inf and NaN), as fill_bits_low.
inline void apply_bits_scalar(const float* x, float* dropped, const uint8_t* bits, int64_t begin, int64_t end,
                              float scale) {
  for (int64_t i = begin; i < end; ++i) dropped[i] = x[i] * ((bits[i / 8] >> (i % 8)) & 1 ? scale : 0.0f);
}

inline void apply_bits_low(const uint16_t* x, uint16_t* dropped, const uint8_t* bits, int64_t begin, int64_t end) {
  for (int64_t i = begin; i < end; ++i) dropped[i] = bf16_times_bit(x[i], (bits[i / 8] >> (i % 8)) & 1);
}

#if defined(__x86_64__)
// 8 lanes of all ones where the byte's bit (lane) is set.
__attribute__((target("avx2"))) inline __m256 lanes_of(uint8_t byte) {
  const __m256i bit = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
  return _mm256_castsi256_ps(_mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32(byte), bit), bit));
}

// The same operations 8 elements at a time: an order of magnitude faster than the scalar loop, as
// fast as torch's addcmul_ reading the fp32 noise.
__attribute__((target("avx2,fma"))) void masked_fma_avx2(float* acc, const float* t, const uint8_t* bits,
                                                         int64_t begin, int64_t end, float scale) {
  const __m256 s = _mm256_set1_ps(scale);
  int64_t i = begin;
  for (; i + 8 <= end; i += 8) {
    const __m256 noise = _mm256_and_ps(lanes_of(bits[i / 8]), s);  // scale or +0, as the noise tensor
    _mm256_storeu_ps(acc + i, _mm256_fmadd_ps(_mm256_loadu_ps(t + i), noise, _mm256_loadu_ps(acc + i)));
  }
  masked_fma_scalar(acc, t, bits, i, end, scale);
}

__attribute__((target("avx2,fma"))) inline __m256 load_bf16(const uint16_t* p) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16));
}

__attribute__((target("avx2,fma"))) void masked_add_low_avx2(uint16_t* acc, const uint16_t* t, const uint8_t* bits,
                                                             int64_t begin, int64_t end) {
  const __m256 one = _mm256_set1_ps(1.0f);
  const __m256i bias = _mm256_set1_epi32(0x7fff), lsb = _mm256_set1_epi32(1), qnan = _mm256_set1_epi32(0x7fc0);
  int64_t i = begin;
  for (; i + 8 <= end; i += 8) {
    const __m256 sum = _mm256_fmadd_ps(load_bf16(t + i), _mm256_and_ps(lanes_of(bits[i / 8]), one), load_bf16(acc + i));
    // round to nearest even into the high half (c10::BFloat16's rule), NaN to 0x7fc0
    const __m256i u = _mm256_castps_si256(sum);
    __m256i r = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(u, bias), _mm256_and_si256(_mm256_srli_epi32(u, 16), lsb)), 16);
    r = _mm256_blendv_epi8(r, qnan, _mm256_castps_si256(_mm256_cmp_ps(sum, sum, _CMP_UNORD_Q)));
    const __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(acc + i), packed);
  }
  masked_add_low_scalar(acc, t, bits, i, end);
}

// `begin` a multiple of 8 (each byte of `bits` covers 8 elements), as masked_fma_avx2's.
__attribute__((target("avx2"))) void apply_bits_avx2(const float* x, float* dropped, const uint8_t* bits, int64_t begin,
                                                     int64_t end, float scale) {
  const __m256 s = _mm256_set1_ps(scale);
  int64_t i = begin;
  for (; i + 8 <= end; i += 8) {
    const __m256 noise = _mm256_and_ps(lanes_of(bits[i / 8]), s);  // scale or +0, as the forward's noise
    _mm256_storeu_ps(dropped + i, _mm256_mul_ps(_mm256_loadu_ps(x + i), noise));
  }
  apply_bits_scalar(x, dropped, bits, i, end, scale);
}

// The bf16 form 8 elements at a time (the scalar loop is an order of magnitude slower).
__attribute__((target("avx2"))) void apply_bits_low_avx2(const uint16_t* x, uint16_t* dropped, const uint8_t* bits,
                                                         int64_t n) {
  const __m256i sign = _mm256_set1_epi32(0x8000), exponent = _mm256_set1_epi32(0x7f80), qnan = _mm256_set1_epi32(0x7fc0);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256i v = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(x + i)));
    const __m256i special = _mm256_cmpeq_epi32(_mm256_and_si256(v, exponent), exponent);  // inf, NaN
    const __m256i zero = _mm256_blendv_epi8(_mm256_and_si256(v, sign), qnan, special);
    const __m256i r = _mm256_blendv_epi8(zero, v, _mm256_castps_si256(lanes_of(bits[i / 8])));
    const __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dropped + i), packed);
  }
  apply_bits_low(x, dropped, bits, i, n);
}

// Asked on first use, not in a static initializer: __builtin_cpu_supports reads data that
// __builtin_cpu_init fills, and the order of static initializers across objects is unspecified.
bool has_avx2_fma() {
  static const bool yes = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  }();
  return yes;
}
#else
bool has_avx2_fma() { return false; }
#endif

template <typename Fill>
int with_generator(Fill&& fill_from) {
  auto* gen = at::check_generator<at::CPUGeneratorImpl>(at::detail::getDefaultCPUGenerator());
  std::lock_guard<std::mutex> lock(gen->mutex_);
  at::mt19937 engine = gen->engine();
  if (!engine.is_valid()) return -1;
  at::mt19937_data_pod d = engine.data();
  fill_from(d);
  engine.set_data(d);
  gen->set_engine(engine);
  return 0;
}

inline uint64_t threshold_of(double keep) {
  return static_cast<uint64_t>(std::ceil(keep * 9007199254740992.0));  // ceil(keep * 2^53)
}

}  // namespace

extern "C" {

// out[i] = 1 with probability `keep`, from torch's default CPU generator (advanced as
// bernoulli_ would advance it). Returns 0, or -1 when the generator's state is not valid.
int sftflow_keep_mask(uint8_t* out, int64_t n, double keep) {
  return with_generator([&](at::mt19937_data_pod& d) { fill(d, out, n, threshold_of(keep)); });
}

// noise[i] = scale where the same mask as sftflow_keep_mask keeps element i, else 0;
// dropped[i] = x[i] * noise[i] (fp32). Returns 0, or -1 when the generator's state is not valid.
int sftflow_dropout_noise(const float* x, float* dropped, float* noise, int64_t n, double keep, float scale) {
  return with_generator([&](at::mt19937_data_pod& d) { fill_noise(d, x, dropped, noise, n, threshold_of(keep), scale); });
}


// dropped[i] = x[i] * noise[i] as sftflow_dropout_noise, the keep mask as bits (n / 8 bytes,
// rounded up) instead of the noise. fp32 (`low` 0) or bf16 (`low` 1: x, dropped as uint16, scale
// unused: dropped is x times the 0/1 mask). Returns 0, or -1 when the generator's state is not valid.
int sftflow_dropout_bits(const void* x, void* dropped, uint8_t* bits, int64_t n, double keep, float scale, int low) {
  return with_generator([&](at::mt19937_data_pod& d) {
    if (low)
      fill_bits_low(d, static_cast<const uint16_t*>(x), static_cast<uint16_t*>(dropped), bits, n, threshold_of(keep));
    else
      fill_bits(d, static_cast<const float*>(x), static_cast<float*>(dropped), bits, n, threshold_of(keep), scale);
  });
}

// dropped[i] = x[i] * noise[i], noise from `bits` as sftflow_masked_addcmul reads them: the
// dropped-out input sftflow_dropout_bits wrote, bit for bit, recomputed from x.
void sftflow_apply_bits(const void* x, void* dropped, const uint8_t* bits, int64_t n, float scale, int low) {
  const auto* xf = static_cast<const float*>(x);
  auto* df = static_cast<float*>(dropped);
  const auto* xl = static_cast<const uint16_t*>(x);
  auto* dl = static_cast<uint16_t*>(dropped);
#if defined(__x86_64__)
  if (has_avx2_fma()) return low ? apply_bits_low_avx2(xl, dl, bits, n) : apply_bits_avx2(xf, df, bits, 0, n, scale);
#endif
  if (low) return apply_bits_low(xl, dl, bits, 0, n);
  apply_bits_scalar(xf, df, bits, 0, n, scale);
}

// acc += t * noise, noise from `bits` (scale where set, else 0), as acc.addcmul_(t, noise); fp32,
// or bf16 (`low` 1: as uint16, noise the 0/1 mask).
void sftflow_masked_addcmul(void* acc, const void* t, const uint8_t* bits, int64_t n, float scale, int low) {
  // One thread, as the draws: at::parallel_for is OpenMP in torch's CPU builds and this file is
  // built without it (a second OpenMP runtime beside torch's own would compete for the cores).
  // One thread here is a little slower than addcmul_ on two, a fraction of a percent of a step
  // (bench/cpu_steps.py).
  if (low) {
    auto* a = static_cast<uint16_t*>(acc);
    const auto* f = static_cast<const uint16_t*>(t);
    has_avx2_fma() ? masked_add_low_avx2(a, f, bits, 0, n) : masked_add_low_scalar(a, f, bits, 0, n);
  } else {
    auto* a = static_cast<float*>(acc);
    const auto* f = static_cast<const float*>(t);
    has_avx2_fma() ? masked_fma_avx2(a, f, bits, 0, n, scale) : masked_fma_scalar(a, f, bits, 0, n, scale);
  }
}

}
