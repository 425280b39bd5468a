// Bad input values that a kernel finds where it reads them: a label or a
// teacher index out of range, a repeated index, alpha or k out of range, a
// teacher row that is not a distribution, a saved statistic that names no
// class. The kernels never dereference such a value (they skip or clamp it)
// and record it instead, as one InputError record of kRecordSlots int64s:
//   - on the CPU in a HostErrorRecord per call, raised when the kernel
//     returns (the call raises, as before);
//   - on CUDA in the extension's one device-visible record (cuda/
//     device_errors.cuh), raised by the next distillkit CUDA call or by the
//     check_errors op, so that no value check reads device memory on the
//     host (no sync).
// Either way the error is a ValueError naming the argument and the entry.
#pragma once
#include <cstdint>
#include <mutex>

namespace distillkit {

enum class InputError : int64_t {
  kNone = 0,
  kLabel,              // labels[row] = value not in [0, bound) nor ignore_index (= aux)
  kTeacherIndex,       // teacher_indices[row, col] = value not in [0, bound) nor -1
  kDuplicateIndex,     // row `row` holds class `value` twice
  kAlpha,              // alpha[row] (value: the double's bits) not in (0, 1]
  kK,                  // k[row] = value not in [aux, bound]
  kTeacherNegative,    // teacher_probs row `row` has a negative or NaN entry
  kTeacherSum,         // teacher_probs row `row` sums to value (bits) beyond tolerance aux (bits)
  kStatsIndex,         // stats[row, col] names class value, not in [0, bound)
};

// The slots of a record. kClaim orders the CUDA writers (the first claims the
// record, writes the fields, then publishes kCode); the CPU record ignores it.
namespace record_slot {
enum : int { kCode, kRow, kCol, kValue, kBound, kAux, kClaim, kRecordSlots };
}

// Throws the ValueError of a record whose code is not kNone.
[[noreturn]] void throw_input_error(const int64_t* record);

// The double's bits as an int64 slot value, and back.
int64_t double_bits(double v);
double bits_double(int64_t bits);

// The CPU kernels' record: of everything recorded during one call, keeps the
// entry of the lowest (row, col), so the message does not depend on thread
// scheduling. Recording takes a lock: it happens only on bad input.
class HostErrorRecord {
 public:
  void record(InputError code, int64_t row, int64_t col, int64_t value, int64_t bound,
              int64_t aux = 0);
  // Throws the recorded error, if any.
  void raise_if_any() const;

 private:
  mutable std::mutex mutex_;
  int64_t slots_[record_slot::kRecordSlots] = {};
};

}  // namespace distillkit
