// pybind11 face of checksum.h: _C.checksum, _C.file_checksum, _C.SHA256_HARDWARE.
#include <pybind11/pybind11.h>

#include <stdexcept>
#include <string>

#include "checksum.h"
#include "sha256.h"

namespace py = pybind11;

void register_checksum(py::module_& m) {
  m.def(
      "checksum",
      [](const py::buffer& data, const std::string& algo, bool portable) {
        const py::buffer_info info = data.request();
        if (!PyBuffer_IsContiguous(info.view(), 'C')) {
          throw std::invalid_argument("checksum: the buffer must be C-contiguous");
        }
        const solo::ChecksumAlgo a = solo::parse_checksum_algo(algo);
        py::gil_scoped_release nogil;
        solo::Checksum h(a, portable);
        h.update(info.ptr, static_cast<size_t>(info.size * info.itemsize));
        return h.hexdigest();
      },
      py::arg("data"), py::arg("algo") = "xxh64", py::arg("portable") = false,
      "'<algo>:<hex>' of a contiguous buffer: the routine the ShardBuilder checksums its files with (algo 'xxh64' or "
      "'sha256'; portable=True: SHA-256 without SHA-NI, for tests).");
  m.def(
      "file_checksum",
      [](const std::string& path, const std::string& algo) {
        const solo::ChecksumAlgo a = solo::parse_checksum_algo(algo);
        py::gil_scoped_release nogil;
        return solo::file_checksum(path, a);
      },
      py::arg("path"), py::arg("algo") = "xxh64", "'<algo>:<hex>' of a file's bytes (GIL released).");
  m.attr("SHA256_HARDWARE") = solo::Sha256::hardware_accelerated();
}
