// Python module mindskip_kernels._C: build information. The kernels register themselves as
// torch.ops.mindskip.* through TORCH_LIBRARY / TORCH_LIBRARY_IMPL in their own files.
#include <torch/extension.h>
#include <torch/version.h>

#ifndef MINDSKIP_CUDA_ARCHS
#define MINDSKIP_CUDA_ARCHS ""
#endif

namespace {
pybind11::dict build_info() {
  pybind11::dict info;
#ifdef MINDSKIP_WITH_CUDA
  info["cuda"] = true;
#else
  info["cuda"] = false;
#endif
  info["cuda_archs"] = std::string(MINDSKIP_CUDA_ARCHS);
  info["torch_version_built"] = std::to_string(TORCH_VERSION_MAJOR) + "." + std::to_string(TORCH_VERSION_MINOR) + "." + std::to_string(TORCH_VERSION_PATCH);
  return info;
}
}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "mindskip_kernels compiled kernels (registered as torch.ops.mindskip.*)";
  m.def("build_info", &build_info, "How this extension was built: CUDA or not, for which archs");
}
