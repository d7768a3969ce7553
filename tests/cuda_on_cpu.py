"""The project's CUDA kernels run on the CPU: a kernel's source, compiled as C++ with a
few definitions, called once per thread index in turn (the kernels use one-dimensional
grids, no shared memory and no barriers).  ``cpu_cupy()`` stands in for the parts of CuPy
the kernel launchers use, with NumPy arrays, so tests check the CUDA sources against
NumPy on machines without a GPU."""
import ctypes
import os
import re
import shutil
import subprocess
import tempfile
import types

import numpy as np

COMPILER = shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")

PRELUDE = r"""
#include <cmath>
struct Index { unsigned x, y, z; };
static Index threadIdx, blockIdx, blockDim, gridDim;
#define __global__
"""

RUNNER = r"""
extern "C" void run_all(unsigned grid, unsigned block, PARAMS) {
    gridDim.x = grid; blockDim.x = block;
    for (unsigned b = 0; b < grid; b++)
        for (unsigned t = 0; t < block; t++) {
            blockIdx.x = b; threadIdx.x = t;
            NAME(ARGS);
        }
}
"""


def _parameters(source, name):
    """[(C type, name)] of the kernel's parameters, from its signature."""
    signature = re.search(re.escape(name) + r"\s*\(([^)]*)\)", source).group(1)
    params = [p.strip() for p in signature.split(",")]
    return [(p[:p.rindex(re.findall(r"\w+", p)[-1])].strip(), re.findall(r"\w+", p)[-1]) for p in params]


class Kernel:
    """cupy.RawKernel's call, ``kernel(grid, block, args)``, run thread by thread."""

    def __init__(self, source, name, options=()):   # (options: nvcc's)
        params = _parameters(source, name)
        runner = RUNNER.replace("PARAMS", ", ".join(f"{t} {n}" for t, n in params)) \
            .replace("NAME", name).replace("ARGS", ", ".join(n for _, n in params))
        with tempfile.TemporaryDirectory(prefix="cuda_on_cpu_") as folder:   # (a loaded library
            cpp, lib = os.path.join(folder, "k.cpp"), os.path.join(folder, "k.so")  # may go)
            with open(cpp, "w") as f:
                f.write(PRELUDE + source + runner)
            subprocess.run([COMPILER, "-O1", "-shared", "-fPIC", "-ffp-contract=off", cpp, "-o", lib],
                           check=True, capture_output=True)      # (no fused multiply-adds)
            self.function = ctypes.CDLL(lib).run_all
        self.function.restype = None

    def __call__(self, grid, block, args):
        assert len(grid) == len(block) == 1, "one-dimensional launches only"
        assert grid[0] > 0 and block[0] > 0, "CUDA refuses an empty launch"
        self.function(ctypes.c_uint(grid[0]), ctypes.c_uint(block[0]), *map(_c_argument, args))


def _c_argument(a):
    if isinstance(a, np.ndarray):                   # (views too: kernels may read strides)
        return ctypes.c_void_p(a.ctypes.data)
    return {np.int32: ctypes.c_int32, np.int64: ctypes.c_int64,
            np.float64: ctypes.c_double, np.float32: ctypes.c_float}[type(a)](a)


def _find_nvrtc():
    """NVIDIA's runtime compiler (what CuPy compiles kernels with) where installed, e.g. by
    ``pip install nvidia-cuda-nvrtc-cu12`` on a machine without a GPU; else None."""
    import ctypes.util
    import glob
    try:
        import nvidia.cuda_nvrtc
        folders = [os.path.join(f, "lib") for f in nvidia.cuda_nvrtc.__path__]
    except ImportError:
        folders = []
    found = [p for f in folders for p in sorted(glob.glob(os.path.join(f, "libnvrtc.so.*")))]
    path = found[0] if found else ctypes.util.find_library("nvrtc")
    try:
        return ctypes.CDLL(path) if path else None
    except OSError:
        return None


NVRTC = _find_nvrtc()


def nvrtc_log(source, name, options=()):
    """Compile a CUDA source with NVRTC as CuPy's RawKernel does (here for compute
    capability 8.0); returns None when it compiles, else NVRTC's log."""
    program = ctypes.c_void_p()
    assert NVRTC.nvrtcCreateProgram(ctypes.byref(program), source.encode(), f"{name}.cu".encode(),
                                    0, None, None) == 0
    try:
        flags = [b"--gpu-architecture=compute_80"] + [o.encode() for o in options]
        status = NVRTC.nvrtcCompileProgram(program, len(flags), (ctypes.c_char_p * len(flags))(*flags))
        size = ctypes.c_size_t()
        NVRTC.nvrtcGetProgramLogSize(program, ctypes.byref(size))
        log = ctypes.create_string_buffer(size.value)
        NVRTC.nvrtcGetProgramLog(program, log)
    finally:
        NVRTC.nvrtcDestroyProgram(ctypes.byref(program))
    text = log.value.decode(errors="replace").strip()
    return None if status == 0 and not text else f"status {status}: {text}"


def cpu_cupy():
    """A stand-in for the CuPy functions the kernel launchers call, on NumPy arrays."""
    cp = types.ModuleType("cpu_cupy")
    cp.RawKernel = Kernel
    for name in ("float32", "float64", "int32", "int64", "empty", "zeros", "asarray", "ascontiguousarray",
                 "broadcast_to"):
        setattr(cp, name, getattr(np, name))
    return cp
