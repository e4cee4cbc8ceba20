// The one pybind11 module megatron_solo._C. Each csrc/ component registers its own functions.
#include <pybind11/pybind11.h>

namespace py = pybind11;

void register_format(py::module_& m);  // csrc/format.cpp: patchify, unpatchify, image token layout
void register_packer(py::module_& m);  // csrc/packer.cpp: best-fit packer + MMIDIDX shard writer
void register_resize(py::module_& m);  // csrc/resize.cpp: Pillow-exact bilinear resize

PYBIND11_MODULE(_C, m) {
  m.doc() = "megatron-solo C++ core: SOLO patchify/layout and the shard packer";
  register_format(m);
  register_packer(m);
  register_resize(m);
}
