// Standalone unit test of include/dspark/math.h (no torch): the random-number and
// sampling spec of DESIGN.md, section "Random numbers".
//
// Build: c++ -std=c++17 -O2 -I include tests_cpp/test_math.cpp -o test_math
// (or through CMake / ctest, see CMakeLists.txt). Prints one line per check and a
// summary; exits 1 if any check fails.
#include "check.h"
#include "dspark/math.h"

#include <algorithm>
#include <cfloat>
#include <cinttypes>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

namespace {

using dspark_test::check;

uint32_t float_bits(float y) {
  uint32_t bits;
  std::memcpy(&bits, &y, sizeof(bits));
  return bits;
}

float bits_float(uint32_t bits) {
  float y;
  std::memcpy(&y, &bits, sizeof(y));
  return y;
}

// splitmix64, for reproducible pseudo-random test inputs.
uint64_t splitmix64(uint64_t& state) {
  uint64_t z = (state += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

// ---------------------------------------------------------------------------------------
// Philox-4x32-10 known answers (Random123 kat_vectors, quoted in DESIGN.md).
void test_philox_known_answers() {
  struct Kat {
    const char* name;
    uint32_t counter[4];
    uint32_t key[2];
    uint32_t expected[4];
  };
  const Kat kats[] = {
      {"philox4x32_10 KAT: counter 0, key 0",
       {0u, 0u, 0u, 0u},
       {0u, 0u},
       {0x6627e8d5u, 0xe169c58du, 0xbc57ac4cu, 0x9b00dbd8u}},
      {"philox4x32_10 KAT: counter ffffffff x4, key ffffffff x2",
       {0xffffffffu, 0xffffffffu, 0xffffffffu, 0xffffffffu},
       {0xffffffffu, 0xffffffffu},
       {0x408f276du, 0x41c83b0eu, 0xa20bc7c6u, 0x6d5451fdu}},
      {"philox4x32_10 KAT: counter pi digits, key pi digits",
       {0x243f6a88u, 0x85a308d3u, 0x13198a2eu, 0x03707344u},
       {0xa4093822u, 0x299f31d0u},
       {0xd16cfe09u, 0x94fdccebu, 0x5001e420u, 0x24126ea1u}},
  };
  for (const Kat& kat : kats) {
    dspark::Philox4 counter;
    for (int i = 0; i < 4; ++i) counter.x[i] = kat.counter[i];
    const dspark::Philox4 out = dspark::philox4x32_10(counter, kat.key[0], kat.key[1]);
    bool ok = true;
    for (int i = 0; i < 4; ++i) ok = ok && out.x[i] == kat.expected[i];
    check(ok, kat.name, "got %08x %08x %08x %08x, expected %08x %08x %08x %08x", out.x[0], out.x[1],
          out.x[2], out.x[3], kat.expected[0], kat.expected[1], kat.expected[2], kat.expected[3]);
  }
}

// ---------------------------------------------------------------------------------------
// Counter layout: counter = (v >> 2, stream << 24 | position, low32(offset), high32(offset)),
// key = (low32(seed), high32(seed)), output word v & 3.
void test_counter_layout() {
  struct Case {
    uint64_t seed;
    uint32_t stream;
    uint32_t position;
    uint64_t offset;
  };
  const Case cases[] = {
      {0ull, dspark::kStreamDraft, 0u, 0ull},
      {1ull, dspark::kStreamAccept, 1u, 1ull},
      {0x0123456789abcdefull, dspark::kStreamResample, 7u, 0xfedcba9876543210ull},
      {0xffffffffffffffffull, dspark::kStreamResample, 0xffffffu, 0xffffffffffffffffull},
      {0x00000001ffffffffull, dspark::kStreamDraft, 0x00abcdefu, 0x0000000100000000ull},
      {0xdeadbeef00000000ull, dspark::kStreamAccept, 0x00800000u, 0x00000000ffffffffull},
  };
  const uint32_t vs[] = {0u, 1u, 2u, 3u, 4u, 5u, 6u, 7u, 127u, 128u, 151935u, 151936u, 0x7ffffffeu, 0x7fffffffu};

  int group_mismatches = 0, word_mismatches = 0;
  std::string first_group_failure, first_word_failure;
  for (const Case& c : cases) {
    for (uint32_t v : vs) {
      dspark::Philox4 counter;
      counter.x[0] = v >> 2;
      counter.x[1] = (c.stream << 24) | c.position;
      counter.x[2] = static_cast<uint32_t>(c.offset & 0xffffffffu);
      counter.x[3] = static_cast<uint32_t>(c.offset >> 32);
      const uint32_t key0 = static_cast<uint32_t>(c.seed & 0xffffffffu);
      const uint32_t key1 = static_cast<uint32_t>(c.seed >> 32);
      const dspark::Philox4 expected = dspark::philox4x32_10(counter, key0, key1);

      const dspark::Philox4 group = dspark::random_group(c.seed, c.stream, c.position, c.offset, v >> 2);
      const dspark::Philox4 keyed =
          dspark::random_group(dspark::philox_keys(c.seed), c.stream, c.position, c.offset, v >> 2);
      for (int i = 0; i < 4; ++i) {
        if (group.x[i] != expected.x[i] || keyed.x[i] != expected.x[i]) {
          if (group_mismatches++ == 0) {
            char buf[256];
            std::snprintf(buf, sizeof(buf),
                          "seed %016" PRIx64 " stream %u position %u offset %016" PRIx64
                          " group %u word %d: got %08x expected %08x",
                          c.seed, c.stream, c.position, c.offset, v >> 2, i, group.x[i], expected.x[i]);
            first_group_failure = buf;
          }
        }
      }
      const uint32_t word = dspark::random_word(c.seed, c.stream, c.position, c.offset, v);
      if (word != expected.x[v & 3]) {
        if (word_mismatches++ == 0) {
          char buf[256];
          std::snprintf(buf, sizeof(buf),
                        "seed %016" PRIx64 " stream %u position %u offset %016" PRIx64
                        " v %u: got %08x expected %08x",
                        c.seed, c.stream, c.position, c.offset, v, word, expected.x[v & 3]);
          first_word_failure = buf;
        }
      }
    }
  }
  check(group_mismatches == 0,
        "random_group (and with precomputed round keys) counter/key layout matches direct philox calls",
        "%d mismatching words, first: %s", group_mismatches, first_group_failure.c_str());
  check(word_mismatches == 0, "random_word(v) is word v&3 of group v>>2",
        "%d mismatches, first: %s", word_mismatches, first_word_failure.c_str());

  // The four words of one group are four different vocabulary indices, and each field of
  // the counter matters (a change in any input changes the word).
  const uint64_t seed = 0x0123456789abcdefull, offset = 0x1122334455667788ull;
  const uint32_t base = dspark::random_word(seed, 1, 5, offset, 9);
  const bool sensitive = base != dspark::random_word(seed ^ 1ull, 1, 5, offset, 9) &&
                         base != dspark::random_word(seed ^ (1ull << 32), 1, 5, offset, 9) &&
                         base != dspark::random_word(seed, 2, 5, offset, 9) &&
                         base != dspark::random_word(seed, 1, 6, offset, 9) &&
                         base != dspark::random_word(seed, 1, 5, offset ^ 1ull, 9) &&
                         base != dspark::random_word(seed, 1, 5, offset ^ (1ull << 32), 9) &&
                         base != dspark::random_word(seed, 1, 5, offset, 8) &&
                         base != dspark::random_word(seed, 1, 5, offset, 13);
  check(sensitive, "random_word depends on seed lo/hi, stream, position, offset lo/hi, v",
        "some input change left the word unchanged");
}

// ---------------------------------------------------------------------------------------
void test_acceptance_uniform() {
  const double u_min = dspark::acceptance_uniform(0u);
  const double u_max = dspark::acceptance_uniform(0xffffffffu);
  const double u_min_exact = 0.5 * std::ldexp(1.0, -24);
  const double u_max_exact = (std::ldexp(1.0, 24) - 0.5) * std::ldexp(1.0, -24);
  check(u_min > 0.0 && u_min < 1.0, "acceptance_uniform(0) in (0, 1)", "got %.17g", u_min);
  check(u_min == u_min_exact, "acceptance_uniform(0) == 0.5 * 2^-24", "got %.17g, expected %.17g", u_min,
        u_min_exact);
  check(u_max > 0.0 && u_max < 1.0, "acceptance_uniform(0xffffffff) in (0, 1)", "got %.17g", u_max);
  check(u_max == u_max_exact, "acceptance_uniform(0xffffffff) == (2^24 - 0.5) * 2^-24",
        "got %.17g, expected %.17g", u_max, u_max_exact);
  // The low 8 bits are ignored and the value is ((x >> 8) + 0.5) * 2^-24.
  uint64_t state = 1;
  int bad = 0;
  uint32_t first_bad = 0;
  for (int i = 0; i < 100000; ++i) {
    const uint32_t x = static_cast<uint32_t>(splitmix64(state));
    const double u = dspark::acceptance_uniform(x);
    const double expected = (static_cast<double>(x >> 8) + 0.5) / 16777216.0;
    if (!(u == expected && u > 0.0 && u < 1.0)) {
      if (bad++ == 0) first_bad = x;
    }
  }
  check(bad == 0, "acceptance_uniform(x) == ((x >> 8) + 0.5) * 2^-24 on 100000 random words",
        "%d mismatches, first x = %08x", bad, first_bad);
}

// ---------------------------------------------------------------------------------------
// E = -log(u) in double, the spec value.
double exponential_exact(uint32_t x) {
  if (x < 0x80000000u) return -std::log((static_cast<double>(x) + 0.5) * std::ldexp(1.0, -32));
  return -std::log1p(-((static_cast<double>(0xffffffffu - x) + 0.5) * std::ldexp(1.0, -32)));
}

void test_exponential() {
  const uint32_t edge_words[] = {0u, 1u, 0x7fffffffu, 0x80000000u, 0xfffffffeu, 0xffffffffu};
  for (uint32_t x : edge_words) {
    const float e = dspark::exponential_from_bits(x);
    const double exact = exponential_exact(x);
    const double rel = std::fabs(static_cast<double>(e) - exact) / exact;
    char name[128];
    std::snprintf(name, sizeof(name), "exponential_from_bits(0x%08x) finite, > 0, rel err < 1e-6", x);
    check(std::isfinite(e) && e > 0.f && rel < 1e-6, name, "got %.9g, exact %.17g, rel err %.3g",
          static_cast<double>(e), exact, rel);
  }

  // A random sample plus the neighbourhood of the branch point, against double.
  std::vector<uint32_t> words;
  uint64_t state = 2;
  for (int i = 0; i < 200000; ++i) words.push_back(static_cast<uint32_t>(splitmix64(state)));
  for (uint32_t d = 0; d < 4096; ++d) {
    words.push_back(0x80000000u - 1u - d);
    words.push_back(0x80000000u + d);
    words.push_back(d);
    words.push_back(0xffffffffu - d);
  }
  int bad = 0;
  double worst = 0.0;
  uint32_t worst_x = 0;
  for (uint32_t x : words) {
    const float e = dspark::exponential_from_bits(x);
    const double exact = exponential_exact(x);
    const double rel = std::fabs(static_cast<double>(e) - exact) / exact;
    if (!(std::isfinite(e) && e > 0.f && rel < 1e-6)) ++bad;
    if (!(rel <= worst)) {
      worst = rel;
      worst_x = x;
    }
  }
  char name[160];
  std::snprintf(name, sizeof(name),
                "exponential_from_bits finite, > 0, rel err < 1e-6 on %zu words (worst %.3g at 0x%08x)",
                words.size(), worst, worst_x);
  check(bad == 0, name, "%d words out of tolerance", bad);

  // kMaxRaceBonus bounds -log E (the race's pruning relies on it): the smallest E is at
  // the largest word; check that word and every word of the sample.
  float bonus = -std::log(dspark::exponential_from_bits(0xffffffffu));
  for (uint32_t x : words) bonus = std::max(bonus, dspark::race_key_log(0.f, x));
  check(bonus < dspark::kMaxRaceBonus && bonus > dspark::kMaxRaceBonus - 0.5f,
        "race_key_log(0, x) <= kMaxRaceBonus for all sampled words, and the bound is tight", "max %.9g, bound %.9g",
        static_cast<double>(bonus), static_cast<double>(dspark::kMaxRaceBonus));

  // Range claimed by the spec: E is never 0 and never inf.
  const float e_max = dspark::exponential_from_bits(0u);
  const float e_min = dspark::exponential_from_bits(0xffffffffu);
  check(e_min > 0.f && std::isfinite(e_max) && e_min <= e_max,
        "exponential_from_bits range [E(0xffffffff), E(0)] is positive and finite", "got [%.9g, %.9g]",
        static_cast<double>(e_min), static_cast<double>(e_max));

  // Monotonic: u grows with x, so E = -log u is non-increasing in x (float rounding makes
  // neighbouring words equal), and strictly decreasing on a grid coarse enough for float.
  std::sort(words.begin(), words.end());
  words.erase(std::unique(words.begin(), words.end()), words.end());
  int increases = 0;
  uint32_t first_increase = 0;
  for (size_t i = 1; i < words.size(); ++i) {
    if (dspark::exponential_from_bits(words[i]) > dspark::exponential_from_bits(words[i - 1])) {
      if (increases++ == 0) first_increase = words[i - 1];
    }
  }
  check(increases == 0, "exponential_from_bits non-increasing over the sorted sample",
        "%d increases, first between 0x%08x and its successor in the sample", increases, first_increase);

  int non_strict = 0;
  uint32_t first_non_strict = 0;
  std::vector<uint32_t> grid;
  for (uint64_t x = 0; x <= 0xffffffffull; x += 0x00100000ull) grid.push_back(static_cast<uint32_t>(x));
  // (Adjacent words such as 0x7fffffff / 0x80000000 round to the same float E; they are
  // covered by the non-increasing check above and the branch-join check below.)
  grid.push_back(0x80000000u + 0x00100000u / 2);
  grid.push_back(0xffffffffu);
  std::sort(grid.begin(), grid.end());
  for (size_t i = 1; i < grid.size(); ++i) {
    if (!(dspark::exponential_from_bits(grid[i]) < dspark::exponential_from_bits(grid[i - 1]))) {
      if (non_strict++ == 0) first_non_strict = grid[i - 1];
    }
  }
  check(non_strict == 0, "exponential_from_bits strictly decreasing on a 2^20-spaced grid of words",
        "%d violations, first at 0x%08x", non_strict, first_non_strict);
  // Around the branch point the two formulas must join without a jump up.
  check(dspark::exponential_from_bits(0x7fffffffu) >= dspark::exponential_from_bits(0x80000000u),
        "exponential_from_bits(0x7fffffff) >= exponential_from_bits(0x80000000) (branch join)",
        "%.9g < %.9g", static_cast<double>(dspark::exponential_from_bits(0x7fffffffu)),
        static_cast<double>(dspark::exponential_from_bits(0x80000000u)));
}

// ---------------------------------------------------------------------------------------
void test_accept_draft() {
  const uint32_t xs[] = {0u, 1u, 0xffu, 0x100u, 0x7fffffffu, 0x80000000u, 0xfffffeffu, 0xffffff00u, 0xffffffffu};
  const float probs[] = {FLT_MIN * 0.5f /* denormal */, FLT_MIN, 1e-30f, 1e-7f, 0.25f, 0.5f,
                         0.9999999f, 1.0f, 3.0f, FLT_MAX};

  int bad_target0 = 0, bad_draft0 = 0, bad_equal = 0;
  for (uint32_t x : xs) {
    if (dspark::accept_draft(x, 0.f, 0.f)) ++bad_target0;
    for (float p : probs) {
      if (dspark::accept_draft(x, 0.f, p)) ++bad_target0;
      if (!dspark::accept_draft(x, p, 0.f)) ++bad_draft0;
      if (!dspark::accept_draft(x, p, p)) ++bad_equal;
    }
  }
  check(bad_target0 == 0, "accept_draft: p_target = 0 never accepts", "%d acceptances", bad_target0);
  check(bad_draft0 == 0, "accept_draft: p_draft = 0, p_target > 0 always accepts", "%d rejections",
        bad_draft0);
  check(bad_equal == 0, "accept_draft: p_target = p_draft > 0 always accepts (u < 1)", "%d rejections",
        bad_equal);

  // The decision is u * p_draft < p_target with u = acceptance_uniform(x), in exact double.
  uint64_t state = 3;
  int bad = 0;
  for (int i = 0; i < 100000; ++i) {
    const uint32_t x = static_cast<uint32_t>(splitmix64(state));
    const float pt = static_cast<float>(splitmix64(state) >> 40) * 0x1p-24f;
    const float pd = static_cast<float>(splitmix64(state) >> 40) * 0x1p-24f;
    const bool expected = dspark::acceptance_uniform(x) * static_cast<double>(pd) < static_cast<double>(pt);
    if (dspark::accept_draft(x, pt, pd) != expected) ++bad;
  }
  check(bad == 0, "accept_draft(x, pt, pd) == (acceptance_uniform(x) * pd < pt) on 100000 samples",
        "%d mismatches", bad);
  // Boundary: u == pt / pd exactly is a rejection (strict <).
  const uint32_t x_half = 0x7fffff00u;  // u = (0x7fffff + 0.5) * 2^-24 = 0.5 - 2^-25
  const double u_half = dspark::acceptance_uniform(x_half);
  const float pd = 1.0f, pt_eq = static_cast<float>(u_half);
  check(static_cast<double>(pt_eq) == u_half && !dspark::accept_draft(x_half, pt_eq, pd),
        "accept_draft: u * p_draft == p_target rejects (strict <)", "accepted at equality (u = %.17g)", u_half);
}

// ---------------------------------------------------------------------------------------
void test_sanitize_logit() {
  check(dspark::sanitize_logit(std::numeric_limits<float>::quiet_NaN()) == -INFINITY,
        "sanitize_logit(NaN) == -inf", "got %g",
        static_cast<double>(dspark::sanitize_logit(std::numeric_limits<float>::quiet_NaN())));
  check(dspark::sanitize_logit(-std::numeric_limits<float>::quiet_NaN()) == -INFINITY,
        "sanitize_logit(-NaN) == -inf", "got %g",
        static_cast<double>(dspark::sanitize_logit(-std::numeric_limits<float>::quiet_NaN())));
  check(dspark::sanitize_logit(bits_float(0x7fa00001u)) == -INFINITY, "sanitize_logit(signalling NaN) == -inf",
        "got %g", static_cast<double>(dspark::sanitize_logit(bits_float(0x7fa00001u))));
  const float half_max = FLT_MAX / 2;
  check(dspark::sanitize_logit(INFINITY) == half_max, "sanitize_logit(+inf) == FLT_MAX / 2", "got %g",
        static_cast<double>(dspark::sanitize_logit(INFINITY)));
  check(dspark::sanitize_logit(FLT_MAX) == half_max && dspark::sanitize_logit(-FLT_MAX) == -FLT_MAX,
        "sanitize_logit clamps finite values above FLT_MAX / 2 only", "got %g %g",
        static_cast<double>(dspark::sanitize_logit(FLT_MAX)), static_cast<double>(dspark::sanitize_logit(-FLT_MAX)));
  check(dspark::sanitize_temperature(INFINITY) == FLT_MAX && dspark::sanitize_temperature(0.5f) == 0.5f &&
            dspark::sanitize_temperature(0.f) == 0.f,
        "sanitize_temperature clamps +inf to FLT_MAX only", "got %g",
        static_cast<double>(dspark::sanitize_temperature(INFINITY)));
  const float finite[] = {-INFINITY, -FLT_MAX, -half_max, -1e30f, -2.5f, -FLT_MIN, -FLT_TRUE_MIN, -0.0f, 0.0f,
                          FLT_TRUE_MIN, FLT_MIN * 0.5f, FLT_MIN, 1.0f, 3.14159f, 1e30f, half_max};
  int bad = 0;
  float first_bad = 0.f;
  for (float y : finite) {
    if (float_bits(dspark::sanitize_logit(y)) != float_bits(y)) {
      if (bad++ == 0) first_bad = y;
    }
  }
  check(bad == 0, "sanitize_logit leaves finite values and -inf unchanged (bitwise, incl. -0.0)",
        "%d changed, first %g", bad, static_cast<double>(first_bad));
}

// ---------------------------------------------------------------------------------------
void test_ordered_key() {
  // Strictly increasing in the total order where -0.0 < +0.0.
  const std::vector<float> ys = {-INFINITY,
                                 -FLT_MAX,
                                 -1e30f,
                                 -3.0f,
                                 -1.0f,
                                 -FLT_MIN,
                                 -FLT_MIN * 0.5f,
                                 -FLT_TRUE_MIN * 2.0f,
                                 -FLT_TRUE_MIN,
                                 -0.0f,
                                 0.0f,
                                 FLT_TRUE_MIN,
                                 FLT_TRUE_MIN * 2.0f,
                                 FLT_MIN * 0.5f,
                                 FLT_MIN,
                                 std::nextafter(FLT_MIN, 1.0f),
                                 1.0f,
                                 std::nextafter(1.0f, 2.0f),
                                 3.0f,
                                 1e30f,
                                 std::nextafter(FLT_MAX, 0.0f),
                                 FLT_MAX,
                                 INFINITY};
  int order_bad = 0, round_bad = 0;
  std::string first_order, first_round;
  for (size_t i = 0; i < ys.size(); ++i) {
    const uint32_t k = dspark::ordered_key(ys[i]);
    const float back = dspark::key_to_float(k);
    if (float_bits(back) != float_bits(ys[i])) {
      if (round_bad++ == 0) {
        char buf[128];
        std::snprintf(buf, sizeof(buf), "%a -> key %08x -> %a", static_cast<double>(ys[i]), k,
                      static_cast<double>(back));
        first_round = buf;
      }
    }
    for (size_t j = i + 1; j < ys.size(); ++j) {
      const uint32_t kj = dspark::ordered_key(ys[j]);
      if (!(k < kj)) {
        if (order_bad++ == 0) {
          char buf[160];
          std::snprintf(buf, sizeof(buf), "key(%a) = %08x not < key(%a) = %08x", static_cast<double>(ys[i]), k,
                        static_cast<double>(ys[j]), kj);
          first_order = buf;
        }
      }
    }
  }
  check(order_bad == 0, "ordered_key strictly order-preserving on -inf..+inf incl. -0.0 < 0.0, denormals",
        "%d bad pairs, first: %s", order_bad, first_order.c_str());
  check(round_bad == 0, "key_to_float(ordered_key(y)) == y bitwise on the same set", "%d bad, first: %s",
        round_bad, first_round.c_str());

  // Random non-NaN floats: key order equals float order, and the round trip is exact.
  uint64_t state = 4;
  int bad = 0;
  for (int i = 0; i < 200000; ++i) {
    const float a = bits_float(static_cast<uint32_t>(splitmix64(state)));
    const float b = bits_float(static_cast<uint32_t>(splitmix64(state)));
    if (std::isnan(a) || std::isnan(b)) continue;
    const uint32_t ka = dspark::ordered_key(a), kb = dspark::ordered_key(b);
    if (a < b && !(ka < kb)) ++bad;
    if (a > b && !(ka > kb)) ++bad;
    if (float_bits(dspark::key_to_float(ka)) != float_bits(a)) ++bad;
  }
  check(bad == 0, "ordered_key order and round trip on 200000 random non-NaN float pairs", "%d failures", bad);

  // Every key decodes to a float that encodes back to the same key (bijection).
  bad = 0;
  for (uint64_t k = 0; k <= 0xffffffffull; k += 0x10001ull) {
    if (dspark::ordered_key(dspark::key_to_float(static_cast<uint32_t>(k))) != static_cast<uint32_t>(k)) ++bad;
  }
  check(bad == 0, "ordered_key(key_to_float(k)) == k on a grid of keys", "%d failures", bad);
}

// ---------------------------------------------------------------------------------------
void test_argmax() {
  using dspark::ArgMax;
  const ArgMax none{-INFINITY, -1};

  check(dspark::beats(1.0f, 3, ArgMax{2.0f, 7}) == false, "beats: smaller key loses", "");
  check(dspark::beats(3.0f, 9, ArgMax{2.0f, 7}) == true, "beats: larger key wins even with larger index", "");
  check(dspark::beats(2.0f, 3, ArgMax{2.0f, 7}) == true, "beats: tie, smaller index wins", "");
  check(dspark::beats(2.0f, 9, ArgMax{2.0f, 7}) == false, "beats: tie, larger index loses", "");
  check(dspark::beats(2.0f, 7, ArgMax{2.0f, 7}) == false, "beats: identical candidate does not beat", "");
  check(dspark::beats(-INFINITY, 5, none) == true, "beats: any valid index (even key -inf) beats index -1", "");
  check(dspark::beats(-INFINITY, 0, ArgMax{-INFINITY, 4}) == true, "beats: -inf tie, smaller index wins", "");
  check(dspark::beats(FLT_MAX, -1, ArgMax{-INFINITY, 4}) == false, "beats: index -1 never beats", "");
  check(dspark::beats(1.0f, -1, none) == false, "beats: index -1 does not beat index -1", "");

  // merge: the result must not depend on the order of the arguments.
  struct Case {
    const char* name;
    ArgMax a, b;
    float key;
    int64_t index;
  };
  const Case cases[] = {
      {"merge: larger key wins", {1.0f, 0}, {2.0f, 5}, 2.0f, 5},
      {"merge: tie goes to the smaller index", {2.0f, 3}, {2.0f, 5}, 2.0f, 3},
      {"merge: tie at -inf goes to the smaller index", {-INFINITY, 8}, {-INFINITY, 2}, -INFINITY, 2},
      {"merge: tie at -0.0/+0.0 goes to the smaller index", {-0.0f, 6}, {0.0f, 1}, 0.0f, 1},
      {"merge: index -1 loses to a valid index with key -inf", {FLT_MAX, -1}, {-INFINITY, 4}, -INFINITY, 4},
      {"merge: index -1 with -1 stays -1", none, none, -INFINITY, -1},
  };
  for (const Case& c : cases) {
    const ArgMax ab = dspark::merge(c.a, c.b);
    const ArgMax ba = dspark::merge(c.b, c.a);
    check(ab.index == c.index && ba.index == c.index && (c.index < 0 || (ab.key == c.key && ba.key == c.key)),
          c.name, "merge(a,b) = (%g, %lld), merge(b,a) = (%g, %lld), expected (%g, %lld)",
          static_cast<double>(ab.key), static_cast<long long>(ab.index), static_cast<double>(ba.key),
          static_cast<long long>(ba.index), static_cast<double>(c.key), static_cast<long long>(c.index));
  }

  // A reduction in any order (sequential, pairwise tree, reversed) gives the first maximum.
  uint64_t state = 5;
  int bad = 0;
  for (int trial = 0; trial < 200; ++trial) {
    const int n = 1 + static_cast<int>(splitmix64(state) % 300);
    std::vector<float> keys(n);
    for (float& k : keys) k = static_cast<float>(splitmix64(state) % 8) - 4.0f;  // many ties
    if (trial % 7 == 0) std::fill(keys.begin(), keys.end(), -INFINITY);
    int64_t expected = 0;
    for (int i = 1; i < n; ++i)
      if (keys[i] > keys[expected]) expected = i;
    ArgMax seq = none, rev = none;
    for (int i = 0; i < n; ++i) seq = dspark::merge(seq, ArgMax{keys[i], i});
    for (int i = n - 1; i >= 0; --i) rev = dspark::merge(ArgMax{keys[i], i}, rev);
    std::vector<ArgMax> level;
    for (int i = 0; i < n; ++i) level.push_back(ArgMax{keys[i], i});
    while (level.size() > 1) {
      std::vector<ArgMax> next;
      for (size_t i = 0; i < level.size(); i += 2)
        next.push_back(i + 1 < level.size() ? dspark::merge(level[i + 1], level[i]) : level[i]);
      level.swap(next);
    }
    if (seq.index != expected || rev.index != expected || level[0].index != expected) ++bad;
  }
  check(bad == 0, "merge reductions (sequential, reversed, tree) give the first maximum on 200 tied rows",
        "%d wrong", bad);
}

}  // namespace

// ---------------------------------------------------------------------------------------
// E' = -log2(u) in double, the spec value of exponential2_spec.
double exponential2_exact(uint32_t x) {
  const bool low = x < 0x80000000u;
  const double f = static_cast<double>(low ? x : ~x) * std::ldexp(1.0, -32) + std::ldexp(1.0, -33);
  return low ? -std::log2(f) : -std::log1p(-f) / std::log(2.0);
}

void test_exponential2() {
  std::vector<uint32_t> words = {0u, 1u, 0x7fffffffu, 0x80000000u, 0xfffffffeu, 0xffffffffu};
  uint64_t state = 7;
  for (int i = 0; i < 1000000; ++i) words.push_back(static_cast<uint32_t>(splitmix64(state)));
  for (uint32_t d = 0; d < 4096; ++d) {
    words.push_back(0x80000000u - 1u - d);
    words.push_back(0x80000000u + d);
    words.push_back(0xffffffffu - d);
  }
  double worst_spec = 0.0, worst_fast = 0.0;
  uint32_t worst_spec_x = 0, worst_fast_x = 0;
  bool finite = true;
  for (uint32_t x : words) {
    const double exact = exponential2_exact(x);
    const float spec = dspark::exponential2_spec(x), fast = dspark::exponential2_fast(x);
    finite = finite && std::isfinite(spec) && spec > 0.f && std::isfinite(fast) && fast > 0.f;
    const double rel_spec = std::fabs(spec - exact) / exact, rel_fast = std::fabs(fast - spec) / spec;
    if (!(rel_spec <= worst_spec)) worst_spec = rel_spec, worst_spec_x = x;
    if (!(rel_fast <= worst_fast)) worst_fast = rel_fast, worst_fast_x = x;
  }
  char name[200];
  std::snprintf(name, sizeof(name), "exponential2_spec: rel err < 2e-7 against double on %zu words (worst %.3g at 0x%08x)",
                words.size(), worst_spec, worst_spec_x);
  check(finite && worst_spec < 2e-7, name, "worst %.3g", worst_spec);
  // The kernels' branch-free form; here fast_log2 and fast_divide are exact, so this
  // measures the series and the rounding (a GPU adds MUFU's ~2^-22).
  std::snprintf(name, sizeof(name), "exponential2_fast: rel err < 2^-21 against the spec (worst %.3g at 0x%08x)",
                worst_fast, worst_fast_x);
  check(worst_fast < std::ldexp(1.0, -21), name, "worst %.3g", worst_fast);
  const float e_min = dspark::exponential2_spec(0xffffffffu), e_max = dspark::exponential2_spec(0u);
  check(e_min > 1.6e-10f && e_max <= 33.f, "exponential2_spec range within [1.6e-10, 33]", "got [%.9g, %.9g]",
        static_cast<double>(e_min), static_cast<double>(e_max));
}

int main() {
  test_philox_known_answers();
  test_counter_layout();
  test_acceptance_uniform();
  test_exponential();
  test_exponential2();
  test_accept_draft();
  test_sanitize_logit();
  test_ordered_key();
  test_argmax();
  return dspark_test::summary("test_math");
}
