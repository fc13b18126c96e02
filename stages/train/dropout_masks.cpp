// Dropout keep-masks drawn from torch's default CPU generator exactly as `bernoulli_(keep)` draws
// them on this CPU build, in bulk. Loaded with ctypes by dropout_masks.py, which checks that the
// masks and the generator's state afterwards equal torch's own before it uses this.
//
// torch's CPU kernel (ATen/native/cpu/DistributionTemplates.h, the path taken where no MKL
// stream is used) draws, per element and one at a time, random64() = two mt19937 outputs
// (first one high), takes its low 53 bits as a double u in [0, 1) and keeps the element when
// u < keep: ~10 ns an element, serial, measured here on a 2-vCPU AVX2 EPYC. The same numbers
// come out of the same mt19937 run in blocks: tempering a block of the state array, then
// comparing the 53-bit integers against keep * 2^53 (exact: u = m * 2^-53 < keep exactly when
// m < ceil(keep * 2^53)).

#include <ATen/CPUGeneratorImpl.h>
#include <ATen/core/MT19937RNGEngine.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <mutex>

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

// Built for AVX2 and for any x86-64 (or other CPU), chosen when the library loads: the
// tempering and the comparisons vectorise; measured 1.7 vs 2.7 ns an element on AVX2.
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
    for (int64_t i = 0; i < len; ++i) {
      const uint64_t m = (static_cast<uint64_t>(words[2 * i] & 0x1fffffu) << 32) | words[2 * i + 1];
      o[i] = m < threshold;
    }
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
      const uint64_t m = (static_cast<uint64_t>(words[2 * i] & 0x1fffffu) << 32) | words[2 * i + 1];
      const float v = m < threshold ? scale : 0.0f;
      ni[i] = v;
      di[i] = xi[i] * v;
    }
  }
}

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

}
