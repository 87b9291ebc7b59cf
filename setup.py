"""Build script: compiles the C++ kernels in ``csrc/`` with torch's extension tools.

Every ``csrc/cpu/*.cpp`` file goes into one extension, ``fastmetamer._C``. When there are no
sources the package installs as pure Python and the ``cpu`` backend reports itself unavailable.
Install with ``pip install --no-build-isolation -e .`` so the build uses the torch already
installed (build isolation would fetch a different, multi-GB torch).
"""
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).parent


def cpp_extensions():
    sources = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc" / "cpu").glob("*.cpp"))
    if not sources:
        return [], {}
    from torch.utils.cpp_extension import BuildExtension, CppExtension

    ext = CppExtension(
        "fastmetamer._C",
        sources,
        # -fno-math-errno: std::sqrt becomes the vector square-root instruction (csrc/cpu/fast_math.h)
        extra_compile_args=["-O3", "-fopenmp", "-std=c++17", "-fno-math-errno"],
        extra_link_args=["-fopenmp"],
    )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=False)}


ext_modules, cmdclass = cpp_extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
