// Entry point of the one compiled extension, sipo_fast._C. Each component registers its bindings
// from its own translation unit through the init_* functions declared in sipo_fast.h.
#include "sipo_fast.h"

#include <omp.h>

namespace py = pybind11;

static py::dict build_info() {
  py::dict info;
  info["openmp_max_threads"] = omp_get_max_threads();
  info["compiler"] = __VERSION__;
  return info;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "sipo_fast C++ extension: shared paged KV cache and CPU kernels";
  m.def("build_info", &build_info, "How this extension was compiled.");
  sipo_fast::register_all(m);
}
