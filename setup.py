"""Build of mindskip_kernels._C: the CPU kernels always, the CUDA kernels when torch has CUDA and nvcc exists.

Environment:
  MINDSKIP_SKIP_BUILD=1   install pure Python (reference and Triton backends only)
  MINDSKIP_FORCE_CUDA=1   build the CUDA kernels even where no GPU/nvcc is detected (fails if impossible)
  TORCH_CUDA_ARCH_LIST    CUDA archs to build (default "8.0;9.0")
  MAX_JOBS                parallel compile jobs (read by torch's ninja build)

For a fast incremental rebuild while developing: `python setup.py build_ext --inplace` (reuses ./build).
"""

import glob
import os
import shutil
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _flag(name: str) -> bool:
    return os.environ.get(name, "0").lower() in ("1", "true", "yes")


def _cuda_include_dirs() -> list[str]:
    """Headers of the pip `nvidia/cu13` package: the local toolkit lacks cuBLAS/cuSPARSE headers."""
    try:
        import nvidia.cu13 as cu13  # type: ignore[import-not-found]
    except ImportError:
        return []
    return [os.path.join(p, "include") for p in cu13.__path__ if os.path.isdir(os.path.join(p, "include"))]


def _check_compiler() -> None:
    """Fail early, saying what to install, when no C++20 compiler is on PATH."""
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        sys.exit(
            f"mindskip_kernels: no C++ compiler found (looked for {cxx!r}). Install a C++20 compiler "
            "(g++ >= 10 or clang >= 12, e.g. `apt-get install g++`), or set MINDSKIP_SKIP_BUILD=1 for a "
            "pure-Python install (reference and Triton backends only)."
        )


def _extensions():
    if _flag("MINDSKIP_SKIP_BUILD"):
        print("mindskip_kernels: MINDSKIP_SKIP_BUILD=1, installing pure Python (no _C)")
        return [], {}
    if "CUDA_HOME" not in os.environ and os.path.isdir("/usr/local/cuda"):
        os.environ["CUDA_HOME"] = "/usr/local/cuda"  # read by torch.utils.cpp_extension at import
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        sys.exit(
            "mindskip_kernels: building _C needs torch installed first and `pip install --no-build-isolation`.\n"
            "  pip install torch && pip install -e . --no-build-isolation\n"
            "or set MINDSKIP_SKIP_BUILD=1 for a pure-Python install."
        )

    _check_compiler()
    if not cpp_extension.is_ninja_available():
        print("mindskip_kernels: ninja not found, building serially (`pip install ninja` builds in parallel)")

    nvcc = shutil.which("nvcc") or (
        os.path.join(os.environ["CUDA_HOME"], "bin", "nvcc") if "CUDA_HOME" in os.environ else None
    )
    has_nvcc = nvcc is not None and os.path.exists(nvcc)
    want_cuda = _flag("MINDSKIP_FORCE_CUDA") or (torch.version.cuda is not None and has_nvcc)
    if want_cuda and (torch.version.cuda is None or not has_nvcc):
        sys.exit(
            "mindskip_kernels: MINDSKIP_FORCE_CUDA=1 but "
            + ("this torch is a CPU-only build (install a CUDA build of torch)" if torch.version.cuda is None
               else "nvcc was not found (install the CUDA toolkit or set CUDA_HOME)")
        )

    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    # no FMA contraction: scatter-add rounds exactly like PyTorch (the AVX2 paths use explicit FMA where wanted)
    cxx = ["-O3", "-std=c++20", "-fopenmp", "-ffp-contract=off"]
    define_macros = []
    include_dirs = [os.path.join(ROOT, "csrc")]
    if want_cuda:
        sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        define_macros.append(("MINDSKIP_WITH_CUDA", None))
        include_dirs += _cuda_include_dirs()
        ext_cls = cpp_extension.CUDAExtension
        extra = {"cxx": cxx, "nvcc": ["-O3", "-std=c++20", "-lineinfo"]}
        arch = os.environ["TORCH_CUDA_ARCH_LIST"]
        define_macros.append(("MINDSKIP_CUDA_ARCHS", f'"{arch}"'))
    else:
        if torch.version.cuda is not None:
            print("mindskip_kernels: nvcc not found, building the CPU kernels only (set CUDA_HOME to add CUDA)")
        ext_cls = cpp_extension.CppExtension
        extra = {"cxx": cxx}
    ext = ext_cls(
        "mindskip_kernels._C",
        sources,
        include_dirs=include_dirs,
        define_macros=define_macros,
        extra_compile_args=extra,
        extra_link_args=["-fopenmp"],
    )
    print(f"mindskip_kernels: building _C with {'CPU+CUDA' if want_cuda else 'CPU'} kernels")
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
