#pragma once
// Shared declarations of the sipo_fast._C extension.
#include <torch/extension.h>

namespace sipo_fast {
// Defined in registry.cpp: calls every component's init function. Components add themselves there.
void register_all(pybind11::module_& m);
}  // namespace sipo_fast
