// The choice of the CPU kernels' level (cpu/capability.h). Compiled once,
// without ISA flags, like the rest of the host code: it runs on every CPU.
#include "cpu/capability.h"

#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <vector>

namespace distillkit::cpu {
namespace {

struct Feature {
  const char* name;
  bool present;
};

// What each level's -m flags (setup.py's CPU_LEVELS) let the compiler use.
// __builtin_cpu_supports reports a feature only where the OS also saves the
// registers it needs (XGETBV), so a VM without AVX-512 state reads as absent.
std::vector<Feature> features_of(Capability level) {
  __builtin_cpu_init();
  std::vector<Feature> avx2 = {{"avx2", __builtin_cpu_supports("avx2") != 0},
                               {"fma", __builtin_cpu_supports("fma") != 0},
                               {"f16c", __builtin_cpu_supports("f16c") != 0}};
  switch (level) {
    case Capability::DEFAULT:
      return {};
    case Capability::AVX2:
      return avx2;
    case Capability::AVX512:
      avx2.insert(avx2.end(), {{"avx512f", __builtin_cpu_supports("avx512f") != 0},
                               {"avx512bw", __builtin_cpu_supports("avx512bw") != 0},
                               {"avx512vl", __builtin_cpu_supports("avx512vl") != 0},
                               {"avx512dq", __builtin_cpu_supports("avx512dq") != 0}});
      return avx2;
  }
  return {};
}

bool has_all(const std::vector<Feature>& features) {
  return std::all_of(features.begin(), features.end(), [](const Feature& f) { return f.present; });
}

// The features of `level` whose presence is `present`, space-separated.
std::string feature_names(Capability level, bool present) {
  std::string names;
  for (const Feature& f : features_of(level)) {
    if (f.present == present) names += (names.empty() ? "" : " ") + std::string(f.name);
  }
  return names;
}

Capability best_supported() {
  Capability best = Capability::DEFAULT;
  for (int l = 1; l < kCapabilities; ++l) {
    if (has_all(features_of(static_cast<Capability>(l)))) best = static_cast<Capability>(l);
  }
  return best;
}

// DISTILLKIT_CPU_CAPABILITY, parsed strictly: one of the level names exactly.
std::optional<Capability> read_cap() {
  const char* env = std::getenv("DISTILLKIT_CPU_CAPABILITY");
  if (env == nullptr || *env == '\0') return std::nullopt;
  for (int l = 0; l < kCapabilities; ++l) {
    if (std::strcmp(env, capability_name(static_cast<Capability>(l))) == 0) {
      return static_cast<Capability>(l);
    }
  }
  TORCH_CHECK_VALUE(false, "distillkit: DISTILLKIT_CPU_CAPABILITY must be one of default, avx2, "
                    "avx512 (or unset), got '", env, "'");
}

CapabilityChoice choose() {
  CapabilityChoice c;
  c.supported = best_supported();
  c.compiled = Capability::DISTILLKIT_CPU_LEVEL_MAX;
  const Capability best = std::min(c.supported, c.compiled);
  std::string why;
  if (c.supported <= c.compiled) {
    why = "the best level this CPU supports";
    if (c.supported != Capability::DEFAULT) {
      why += " (it has " + feature_names(c.supported, true) + ")";
    }
    if (c.supported != Capability::AVX512) {
      const auto next = static_cast<Capability>(static_cast<int>(c.supported) + 1);
      why += std::string(" (it lacks ") + feature_names(next, false) + " for " +
             capability_name(next) + ")";
    }
  } else {
    why = std::string("the best level this build has (setup.py's DISTILLKIT_CPU_ISA=") +
          capability_name(c.compiled) + "); this CPU supports " + capability_name(c.supported);
  }
  const std::optional<Capability> cap = read_cap();
  c.level = cap ? std::min(*cap, best) : best;
  c.cap_unmet = cap && *cap > best;
  c.reason = std::string(capability_name(c.level)) + ": ";
  if (!cap) {
    c.reason += why;
  } else if (c.cap_unmet) {
    c.reason += std::string("DISTILLKIT_CPU_CAPABILITY=") + capability_name(*cap) +
                " asks for more; " + capability_name(best) + " is " + why;
  } else {
    c.reason += std::string("set by DISTILLKIT_CPU_CAPABILITY=") + capability_name(*cap) +
                "; without it: " + capability_name(best) + ", " + why;
  }
  return c;
}

}  // namespace

const char* capability_name(Capability level) {
  switch (level) {
    case Capability::DEFAULT: return "default";
    case Capability::AVX2: return "avx2";
    case Capability::AVX512: return "avx512";
  }
  return "?";
}

const CapabilityChoice& capability_choice() {
  // A throwing initializer is retried at the next call: a bad value keeps raising.
  static const CapabilityChoice choice = choose();
  return choice;
}

}  // namespace distillkit::cpu
