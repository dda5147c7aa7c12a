// One place that lists the extension's components, so extension.cpp never changes when one is added.
#include "sipo_fast.h"

namespace sipo_fast {
void register_all(pybind11::module_& m) {
  (void)m;  // components: see the init_* calls added below as they land
}
}  // namespace sipo_fast
