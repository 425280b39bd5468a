#include "input_errors.h"

#include <cstring>

#include "checks.h"

namespace distillkit {

int64_t double_bits(double v) {
  int64_t bits;
  std::memcpy(&bits, &v, sizeof bits);
  return bits;
}

double bits_double(int64_t bits) {
  double v;
  std::memcpy(&v, &bits, sizeof v);
  return v;
}

void throw_input_error(const int64_t* r) {
  using namespace record_slot;
  const int64_t row = r[kRow], col = r[kCol], value = r[kValue], bound = r[kBound];
  switch (static_cast<InputError>(r[kCode])) {
    case InputError::kLabel:
      DK_CHECK(false, "labels must be in [0, ", bound, ") or equal ignore_index=", r[kAux],
               " (labels[", row, "] = ", value, ")");
    case InputError::kTeacherIndex:
      DK_CHECK(false, "teacher_indices must be in [0, ", bound, ") or -1 for padding "
               "(teacher_indices[", row, ", ", col, "] = ", value, ")");
    case InputError::kDuplicateIndex:
      DK_CHECK(false, "teacher_indices must not repeat a class within a row (row ", row,
               " holds class ", value, " twice; pass check_duplicates=False only for indices "
               "known to be unique)");
    case InputError::kAlpha:
      DK_CHECK(false, "alpha must be in (0, 1] (alpha[", row, "] = ", bits_double(value), ")");
    case InputError::kK:
      DK_CHECK(false, "k must be in [", r[kAux], ", ", bound, "]",
               r[kAux] == 2 ? " (normalized=True needs k >= 2)" : "", " (k[", row, "] = ", value,
               ")");
    case InputError::kTeacherNegative:
      DK_CHECK(false, "teacher_probs must be non-negative (row ", row,
               " has a negative or NaN entry)");
    case InputError::kTeacherSum:
      DK_CHECK(false, "teacher_probs rows must sum to 1 within ", bits_double(r[kAux]), " (row ",
               row, " sums to ", bits_double(value), ")");
    case InputError::kStatsIndex:
      DK_CHECK(false, "stats must come from the forward of these inputs (stats[", row, ", ", col,
               "] names class ", value, ", not in [0, ", bound, "))");
    case InputError::kNone:
      break;
  }
  DK_CHECK(false, "unknown input error record (code ", r[kCode], ")");
  __builtin_unreachable();
}

void HostErrorRecord::record(InputError code, int64_t row, int64_t col, int64_t value,
                             int64_t bound, int64_t aux) {
  using namespace record_slot;
  const std::lock_guard<std::mutex> lock(mutex_);
  const bool empty = slots_[kCode] == 0;
  if (!empty && (row > slots_[kRow] || (row == slots_[kRow] && col >= slots_[kCol]))) return;
  slots_[kCode] = static_cast<int64_t>(code);
  slots_[kRow] = row;
  slots_[kCol] = col;
  slots_[kValue] = value;
  slots_[kBound] = bound;
  slots_[kAux] = aux;
}

void HostErrorRecord::raise_if_any() const {
  const std::lock_guard<std::mutex> lock(mutex_);
  if (slots_[record_slot::kCode] != 0) throw_input_error(slots_);
}

}  // namespace distillkit
