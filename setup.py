"""Build script: the Python package plus one compiled extension, ``sipo_fast._C``.

Environment switches (read at build time):
  SIPO_FAST_SKIP_EXT=1    build no extension at all (pure Python install; ops that need it say so).
  MAX_JOBS=N              parallel compile jobs (ninja is used when installed; a serial build is ~3x slower).
The extension is C++ only (the GPU code is Triton, compiled at run time), so one build serves CPU and CUDA
torch alike. Always build with ``pip install --no-build-isolation`` so it links the torch you run with.
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
    from torch.utils.cpp_extension import BuildExtension, CppExtension

    cxx = ["-O3", "-std=c++17", "-fopenmp"]
    ext = CppExtension(
        name="sipo_fast._C",
        sources=sorted(glob.glob(os.path.join("csrc", "*.cpp"))),
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_compile_args={"cxx": cxx},
        extra_link_args=["-fopenmp"],
    )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}  # falls back to serial without ninja


ext_modules, cmdclass = _extensions()

packages = find_packages(include=["sipo_fast", "sipo_fast.*"]) + ["sipo_fast.kernels"]
setup(
    packages=packages,
    # Triton kernels live at the top level (they know nothing of the pipeline) but ship as sipo_fast.kernels.
    package_dir={"sipo_fast.kernels": "kernels"},
    # custom_generate/generate.py is a file transformers copies and imports, not a package module
    package_data={"sipo_fast": ["data/demo/*", "decoding/mod_generate/custom_generate/*.py"]},
    include_package_data=True,
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
