// The one pybind11 module megatron_solo._C. Each csrc/ component registers its own functions.
#include <pybind11/pybind11.h>

namespace py = pybind11;

void register_format(py::module_& m);    // csrc/format.cpp: patchify, unpatchify, image token layout
void register_packer(py::module_& m);    // csrc/packer_bindings.cpp: ShardBuilder, plan_packs, the shard schema
void register_checksum(py::module_& m);  // csrc/checksum_bindings.cpp: XXH64 / SHA-256 of buffers and files
void register_resize(py::module_& m);    // csrc/resize.cpp: Pillow-exact bilinear resize

PYBIND11_MODULE(_C, m) {
  m.doc() = "megatron-solo C++ core: SOLO patchify/layout and the shard packer";
  register_format(m);
  register_packer(m);
  register_checksum(m);
  register_resize(m);
}
