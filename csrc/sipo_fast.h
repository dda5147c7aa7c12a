#pragma once
// Shared declarations of the sipo_fast._C extension.
#include <torch/extension.h>

namespace sipo_fast {
// Defined in registry.cpp: calls every component's init function. Components add themselves there.
void register_all(pybind11::module_& m);

// Components (one translation unit each).
void init_block_manager(pybind11::module_& m);    // shared paged KV cache: block manager
void init_paged_attention(pybind11::module_& m);  // CPU decode attention over KV pages
}  // namespace sipo_fast
