"""Build script: the Python package plus one compiled extension, ``sipo_fast._C``.

Environment switches (read at build time):
  SIPO_FAST_SKIP_EXT=1    build no extension at all (pure Python install; ops that need it say so).
  SIPO_FAST_FORCE_CUDA=1  compile csrc/cuda/*.cu even when torch is a CPU build or no GPU is visible
                          (needs nvcc); useful for cross-building wheels.
  SIPO_FAST_NO_CUDA=1     never compile CUDA sources, even where a CUDA toolkit and CUDA torch exist.
Always build with ``pip install --no-build-isolation`` so the extension links the torch you run with.
"""
import glob
import os

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _flag(name: str) -> bool:
    return os.environ.get(name, "0").lower() in ("1", "true", "yes")


def _extensions():
    if _flag("SIPO_FAST_SKIP_EXT"):
        return [], {}
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    cpp_sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    cuda_sources = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
    use_cuda = bool(cuda_sources) and not _flag("SIPO_FAST_NO_CUDA") and (
        _flag("SIPO_FAST_FORCE_CUDA") or (torch.version.cuda is not None and CUDA_HOME is not None)
    )
    cxx = ["-O3", "-std=c++17", "-fopenmp"]
    macros = [("SIPO_FAST_WITH_CUDA", "1")] if use_cuda else []
    kwargs = dict(
        name="sipo_fast._C",
        sources=cpp_sources + (cuda_sources if use_cuda else []),
        include_dirs=[os.path.join(ROOT, "csrc")],
        define_macros=macros,
        extra_link_args=["-fopenmp"],
    )
    if use_cuda:
        ext = CUDAExtension(extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "--use_fast_math"]}, **kwargs)
    else:
        ext = CppExtension(extra_compile_args={"cxx": cxx}, **kwargs)
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=False)}


ext_modules, cmdclass = _extensions()

packages = find_packages(include=["sipo_fast", "sipo_fast.*"]) + ["sipo_fast.kernels"]
setup(
    packages=packages,
    # Triton kernels live at the top level (they know nothing of the pipeline) but ship as sipo_fast.kernels.
    package_dir={"sipo_fast.kernels": "kernels"},
    package_data={"sipo_fast": ["data/demo/*", "configs/*.yaml"]},
    include_package_data=True,
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
