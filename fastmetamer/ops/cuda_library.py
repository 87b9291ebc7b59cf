"""The CUDA C++ kernels of ``csrc/cuda/*.cu``: one shared library with a C ABI, built by nvcc and
loaded with ctypes.

Why a raw-pointer library rather than a torch extension: it needs only nvcc and the CUDA runtime,
not a CUDA build of torch's headers and libraries, so (1) CI, whose torch is the CPU wheel, compiles
and links the very library a GPU machine runs (``make cuda-check``), and (2) one build serves any
torch whose CUDA major version matches, with no ABI coupling to torch's C++ symbols. torch still
owns all memory and streams: the Python wrappers (``fastmetamer/ops/<family>/cuda.py``) check the
inputs, allocate every output and scratch buffer with torch on the tensors' device, and pass raw
pointers plus ``torch.cuda.current_stream().cuda_stream``.

ABI of every op: ``int fm_<name>(args..., cudaStream_t stream)`` with pointers as ``void*``, sizes
and flags as ``int64_t``, scalars as ``double``; the return value is a ``cudaError_t`` (0: success).

Build: ``python fastmetamer/ops/cuda_library.py [--arch sm_90] [--out PATH]`` (``make cuda-check``
compiles for sm_90 with warnings as errors and needs no GPU; ``benchmarks/gpu_check.py`` builds for
the GPU it runs on). The library is looked up at ``$FASTMETAMER_CUDA_LIB`` or next to this package.
"""
from __future__ import annotations

import argparse
import ctypes
import os
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from pathlib import Path

SOURCES = Path(__file__).resolve().parents[2] / "csrc" / "cuda"
DEFAULT_LIBRARY = Path(__file__).resolve().parents[1] / "libfastmetamer_cuda.so"
NVCC_FLAGS = ["-O3", "-std=c++17", "-lineinfo", "-Xcompiler", "-fPIC,-Wall,-Wextra,-Werror",
              "-Werror", "all-warnings"]


def library_path() -> Path:
    """Where the built library is looked up: ``$FASTMETAMER_CUDA_LIB`` or the package folder."""
    return Path(os.environ.get("FASTMETAMER_CUDA_LIB") or DEFAULT_LIBRARY)


def cuda_sources() -> list[Path]:
    """Every CUDA source of the library, sorted."""
    return sorted(SOURCES.glob("*.cu"))


def build(arch: str = "sm_90", out: Path | None = None, nvcc: str | None = None, jobs: int = 2) -> Path:
    """Compile every ``csrc/cuda/*.cu`` for ``arch`` (e.g. ``sm_90``) with warnings as errors and
    link them into the shared library ``out`` (default :func:`library_path`); returns its path.
    Raises RuntimeError (with nvcc's output) when a source fails to compile."""
    nvcc = nvcc or shutil.which("nvcc")
    if nvcc is None:
        raise RuntimeError("nvcc not found on PATH: install a CUDA toolkit to build the cuda backend")
    out = Path(out or library_path())
    out.parent.mkdir(parents=True, exist_ok=True)
    arch_flags = [f"-gencode=arch=compute_{arch[3:]},code={arch}"]
    with tempfile.TemporaryDirectory() as tmp:
        def compile_one(src: Path) -> Path:
            obj = Path(tmp) / (src.stem + ".o")
            _run([nvcc, *NVCC_FLAGS, *arch_flags, "-c", str(src), "-o", str(obj)])
            return obj
        with ThreadPoolExecutor(max(1, jobs)) as pool:
            objects = list(pool.map(compile_one, cuda_sources()))
        _run([nvcc, "-shared", *arch_flags, *map(str, objects), "-o", str(out)])
    load.cache_clear()
    return out


def _run(command: list[str]) -> None:
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stdout}{done.stderr}")


@lru_cache(maxsize=None)
def load() -> ctypes.CDLL | None:
    """The built library, or None when it is absent or cannot be loaded (no CUDA runtime)."""
    path = library_path()
    if not path.exists():
        return None
    try:
        return ctypes.CDLL(str(path))
    except OSError:
        return None


def _c_arg(value):
    import torch

    if value is None:
        return ctypes.c_void_p(None)
    if isinstance(value, torch.Tensor):
        return ctypes.c_void_p(value.data_ptr() if value.numel() else None)
    if isinstance(value, (bool, int)):
        return ctypes.c_int64(int(value))
    if isinstance(value, float):
        return ctypes.c_double(value)
    raise TypeError(f"cannot pass {type(value).__name__} to a CUDA op")


def call(name: str, *args) -> None:
    """Run op ``fm_<name>`` of the library on the first tensor argument's device (made current) and
    its current stream; ``args`` are tensors (their device pointers), None (a null pointer), ints
    and floats.
    Raises RuntimeError with CUDA's message when the launch fails."""
    import torch

    lib = load()
    if lib is None:
        raise RuntimeError(f"the CUDA library is not built ({library_path()}); run "
                           "`python fastmetamer/ops/cuda_library.py --arch sm_XX`")
    device = next(a.device for a in args if isinstance(a, torch.Tensor))
    function = getattr(lib, f"fm_{name}")
    function.restype = ctypes.c_int
    with torch.cuda.device(device):
        code = function(*map(_c_arg, args), ctypes.c_void_p(torch.cuda.current_stream(device).cuda_stream))
    if code != 0:
        lib.fm_error_string.restype = ctypes.c_char_p
        raise RuntimeError(f"CUDA op {name} failed: {lib.fm_error_string(code).decode()} (error {code})")


def available() -> bool:
    """Whether the cuda backend can run here: the library is built and torch sees a GPU."""
    import torch

    return load() is not None and torch.cuda.is_available()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="build the fastmetamer CUDA library with nvcc")
    parser.add_argument("--arch", default="sm_90", help="target architecture, e.g. sm_90 (default)")
    parser.add_argument("--out", type=Path, default=None, help=f"library path (default {library_path()})")
    parser.add_argument("--jobs", type=int, default=2, help="sources compiled at once")
    args = parser.parse_args(argv)
    sources = cuda_sources()
    kernels = sum(src.read_text().count("__global__") for src in sources)
    path = build(args.arch, args.out, jobs=args.jobs)
    print(f"built {path} for {args.arch}: {len(sources)} sources, {kernels} __global__ kernels")
    return 0


if __name__ == "__main__":
    sys.exit(main())
