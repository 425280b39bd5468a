// The Python module distillkit._C. `import distillkit._C` loads this library,
// which runs the op registrations (ops.cpp and the kernel files), and gives
// Python what the ops' contracts need besides the ops themselves:
//  - __torch_version__, the torch it was compiled against, so that
//    distillkit/__init__.py can refuse a stale build with a clear message;
//  - with_cuda: 1 when the CUDA kernels were built;
//  - <op>_stats_layout ({column name: index}) and <op>_stats_cols for every
//    op that returns per-row stats (stats_layout.h), so that Python reads the
//    stats by the names the kernels write them with;
//  - kd_loss's series lengths (kd_loss.h: kd_ratio_weight_terms /
//    kd_log1p_gap_terms, (fp64, fp32) tuples), for the vocabulary-parallel
//    loss, which evaluates the kernels' series;
//  - the two functions of the CPU output cache (cpu/output_cache.h);
//  - the CPU kernels' level (cpu/capability.h): cpu_capability (the chosen
//    level's name), cpu_capability_reason, cpu_capability_supported (the best
//    the CPU has) and cpu_capabilities (the levels compiled, lowest first).
//    The level is chosen here, at import, so that a bad DISTILLKIT_CPU_CAPABILITY
//    fails the import with its ValueError, and a cap above what the CPU or the
//    build has is a RuntimeWarning.
#include <Python.h>

#include <c10/util/Exception.h>

#include <cstddef>

#include "cpu/capability.h"
#include "cpu/output_cache.h"
#include "kd_loss.h"
#include "stats_layout.h"

namespace {

PyObject* empty_cpu_cache(PyObject*, PyObject*) {
  return PyLong_FromLongLong(distillkit::cpu::release_output_cache());
}

PyObject* cpu_cache_bytes(PyObject*, PyObject*) {
  return PyLong_FromLongLong(distillkit::cpu::output_cache_bytes());
}

PyMethodDef distillkit_methods[] = {
    {"empty_cpu_cache", empty_cpu_cache, METH_NOARGS,
     "Free the CPU output cache's idle blocks; returns the bytes released."},
    {"cpu_cache_bytes", cpu_cache_bytes, METH_NOARGS,
     "Bytes held by the CPU output cache's idle blocks."},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef distillkit_module = {
    PyModuleDef_HEAD_INIT, "_C", "distillkit compiled ops", -1, distillkit_methods};

// module.<op>_stats_layout = {name: index, ...} and module.<op>_stats_cols.
// Returns 0, or -1 with a Python error set.
template <size_t kCols>
int add_stats_layout(PyObject* module, const char* layout_name, const char* cols_name,
                     const distillkit::StatsColumn (&columns)[kCols]) {
  PyObject* layout = PyDict_New();
  if (layout == nullptr) return -1;
  for (const distillkit::StatsColumn& column : columns) {
    PyObject* index = PyLong_FromLong(column.index);
    const int status = index == nullptr ? -1 : PyDict_SetItemString(layout, column.name, index);
    Py_XDECREF(index);
    if (status < 0) {
      Py_DECREF(layout);
      return -1;
    }
  }
  const int status = PyModule_AddObjectRef(module, layout_name, layout);
  Py_DECREF(layout);
  if (status < 0) return -1;
  return PyModule_AddIntConstant(module, cols_name, static_cast<long>(kCols));
}

int add_stats_layouts(PyObject* module) {
  namespace dk = distillkit;
  if (add_stats_layout(module, "kd_loss_stats_layout", "kd_loss_stats_cols",
                       dk::kd_loss_stats::kColumns) < 0 ||
      add_stats_layout(module, "slam_loss_stats_layout", "slam_loss_stats_cols",
                       dk::slam_loss_stats::kColumns) < 0 ||
      add_stats_layout(module, "sparse_kd_loss_stats_layout", "sparse_kd_loss_stats_cols",
                       dk::sparse_kd_loss_stats::kColumns) < 0 ||
      add_stats_layout(module, "correlation_distance_stats_layout",
                       "correlation_distance_stats_cols",
                       dk::correlation_distance_stats::kColumns) < 0) {
    return -1;
  }
  return 0;
}

int add_cpu_capability(PyObject* module) {
  namespace cpu = distillkit::cpu;
  const cpu::CapabilityChoice* choice = nullptr;
  try {
    choice = &cpu::capability_choice();
  } catch (const c10::ValueError& e) {
    PyErr_SetString(PyExc_ValueError, e.what_without_backtrace());
    return -1;
  }
  PyObject* compiled = PyTuple_New(static_cast<int>(choice->compiled) + 1);
  if (compiled == nullptr) return -1;
  for (int l = 0; l <= static_cast<int>(choice->compiled); ++l) {
    PyObject* name = PyUnicode_FromString(cpu::capability_name(static_cast<cpu::Capability>(l)));
    if (name == nullptr) {
      Py_DECREF(compiled);
      return -1;
    }
    PyTuple_SET_ITEM(compiled, l, name);
  }
  const int status = PyModule_AddObjectRef(module, "cpu_capabilities", compiled);
  Py_DECREF(compiled);
  if (status < 0 ||
      PyModule_AddStringConstant(module, "cpu_capability",
                                 cpu::capability_name(choice->level)) < 0 ||
      PyModule_AddStringConstant(module, "cpu_capability_supported",
                                 cpu::capability_name(choice->supported)) < 0 ||
      PyModule_AddStringConstant(module, "cpu_capability_reason", choice->reason.c_str()) < 0) {
    return -1;
  }
  if (choice->cap_unmet) {
    return PyErr_WarnFormat(PyExc_RuntimeWarning, 1, "distillkit: CPU kernels at %s",
                            choice->reason.c_str());
  }
  return 0;
}

// A (fp64, fp32) pair of ints as a tuple attribute.
int add_pair(PyObject* module, const char* name, int fp64, int fp32) {
  PyObject* pair = Py_BuildValue("(ii)", fp64, fp32);
  if (pair == nullptr) return -1;
  const int status = PyModule_AddObjectRef(module, name, pair);
  Py_DECREF(pair);
  return status;
}

int add_kd_constants(PyObject* module) {
  using distillkit::kLog1pGapTerms32, distillkit::kLog1pGapTerms64;
  using distillkit::kRatioWeightTerms32, distillkit::kRatioWeightTerms64;
  if (add_pair(module, "kd_ratio_weight_terms", kRatioWeightTerms64, kRatioWeightTerms32) < 0 ||
      add_pair(module, "kd_log1p_gap_terms", kLog1pGapTerms64, kLog1pGapTerms32) < 0) {
    return -1;
  }
  return 0;
}

}  // namespace

PyMODINIT_FUNC PyInit__C(void) {
  PyObject* module = PyModule_Create(&distillkit_module);
  if (module == nullptr) return nullptr;
  if (PyModule_AddStringConstant(module, "__torch_version__", DISTILLKIT_TORCH_VERSION) < 0 ||
      PyModule_AddIntConstant(module, "with_cuda", DISTILLKIT_WITH_CUDA) < 0 ||
      add_stats_layouts(module) < 0 || add_kd_constants(module) < 0 ||
      add_cpu_capability(module) < 0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
