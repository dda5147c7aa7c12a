// One place that lists the extension's components, so extension.cpp never changes when one is added.
#include "sipo_fast.h"

namespace sipo_fast {
void register_all(pybind11::module_& m) {
  init_block_manager(m);    // block_manager.cpp: BlockManager, OutOfBlocksError
  init_paged_attention(m);  // paged_attention.cpp: paged_attention_decode (CPU)
}
}  // namespace sipo_fast
