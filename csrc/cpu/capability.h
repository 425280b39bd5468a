// CPU instruction-set levels, chosen at load time, as ATen's DispatchStub does.
//
// setup.py compiles every kernel file of csrc/cpu once per level, with that
// level's -m flags and CPU_CAPABILITY=<LEVEL> (the macro that picks
// at::vec::Vectorized's implementation), and each build puts its code in its
// own namespace, distillkit::cpu::<LEVEL>. Host code, schemas and checks are
// compiled once, without ISA flags, so the library loads on any x86-64 CPU.
// Each op is still registered once per dispatch key: the default build of its
// kernel file registers a function that calls the chosen level's kernel
// through a table that every level's build fills at load:
//
//   namespace distillkit::cpu::inline CPU_CAPABILITY { ... my_op_cpu(...) ... }
//   DK_CPU_KERNEL(my_op, my_op_cpu)
//   #if defined(CPU_CAPABILITY_DEFAULT)
//   TORCH_LIBRARY_IMPL(distillkit, CPU, m) { m.impl("my_op", DK_CPU_DISPATCH(my_op)); }
//   #endif
//
// The level is the best one that the CPU supports and this build has, capped
// by DISTILLKIT_CPU_CAPABILITY (default | avx2 | avx512) when that is set.
#pragma once
#include <string>
#include <utility>

namespace distillkit::cpu {

// In increasing order; the enumerators are spelled as CPU_CAPABILITY's values.
enum class Capability : int { DEFAULT = 0, AVX2 = 1, AVX512 = 2 };
constexpr int kCapabilities = 3;

// "default", "avx2", "avx512": the names DISTILLKIT_CPU_CAPABILITY and
// DISTILLKIT_CPU_ISA take.
const char* capability_name(Capability level);

struct CapabilityChoice {
  Capability level;      // the level the kernels run at
  Capability supported;  // the best level this CPU (and its OS) supports
  Capability compiled;   // the best level this build has (setup.py's DISTILLKIT_CPU_ISA)
  std::string reason;    // why `level`, in one line: the CPU's features, the cap, the build
  bool cap_unmet;        // DISTILLKIT_CPU_CAPABILITY asked for more than the CPU or the build has
};

// Made once, at the first call (distillkit._C calls it at import). A
// DISTILLKIT_CPU_CAPABILITY that is not one of the names raises ValueError
// naming the variable; unset or empty means no cap.
const CapabilityChoice& capability_choice();

// The kernels of one op function, one per level.
template <typename Fn>
class KernelTable;

template <typename R, typename... Args>
class KernelTable<R(Args...)> {
 public:
  constexpr KernelTable() = default;

  // Called at load by the level's build of the kernel file (DK_CPU_KERNEL).
  bool add(Capability level, R (*fn)(Args...)) {
    fns_[static_cast<int>(level)] = fn;
    return true;
  }

  // The function the dispatcher calls (DK_CPU_DISPATCH): every kernel file is
  // built for every level up to `compiled`, so the chosen level's slot is set.
  template <const KernelTable& table>
  static R call(Args... args) {
    return table.fns_[static_cast<int>(capability_choice().level)](std::forward<Args>(args)...);
  }

 private:
  R (*fns_[kCapabilities])(Args...) = {};
};

}  // namespace distillkit::cpu

#if defined(CPU_CAPABILITY)
// At namespace scope, after the level's namespace is closed: adds fn, a
// function of distillkit::cpu::CPU_CAPABILITY (or of its anonymous namespace),
// to the table of `name`. The table is an inline variable: one object shared by
// every level's build, constant-initialized before any of them adds to it.
#define DK_CPU_KERNEL(name, fn)                                                       \
  namespace distillkit::cpu {                                                         \
  inline KernelTable<decltype(CPU_CAPABILITY::fn)> name##_kernels;                    \
  [[maybe_unused]] static const bool name##_added =                                   \
      name##_kernels.add(Capability::CPU_CAPABILITY, &CPU_CAPABILITY::fn);            \
  }
#endif

// The function to register for `name`: the chosen level's kernel, called.
#define DK_CPU_DISPATCH(name) \
  (&decltype(::distillkit::cpu::name##_kernels)::call<::distillkit::cpu::name##_kernels>)
