"""A strict NumPy-backed stand-in for CuPy, for testing the CuPy code path without a GPU.

Its arrays refuse what CuPy's refuse: implicit conversion to NumPy (``np.asarray``,
``__array__``) and mixing with NumPy arrays in one operation; a reduction returns a
0-d array, not a scalar; ``.get()`` copies to the host.  ``waits[0]`` counts the
operations that make the host wait for a real GPU (copies to the host, Python
scalars, outputs sized by values such as nonzero and boolean masks).  Compiled
kernels run on the CPU through tests/cuda_on_cpu.py.  Streams, memory pools and CUDA
graphs are not imitated: align_cuda.GraphSteps' capture fails here (``cuda.MemoryPool``
says why) and align_fast steps kernel by kernel, as after a failed capture on a GPU
(tests/test_cuda.py replaces the capture to test the runs of steps).  It checks the code
path's logic and its host/device boundaries, never GPU speed.  Used by
tests/test_kernels.py (PYTHONPATH=tests/cupy_standin).
"""
import os
import sys
import types

import numpy as _np

__version__ = "0-standin"


class ndarray(_np.ndarray):
    def __array_ufunc__(self, ufunc, method, *inputs, out=None, **kw):
        _refuse_numpy(inputs)
        if out is not None:
            _refuse_numpy(out)
            kw["out"] = tuple(_plain(o) for o in out)
        return _wrap(getattr(ufunc, method)(*[_plain(i) for i in inputs], **kw))

    def __array_function__(self, func, types_, args, kwargs):
        if func in (_np.asarray, _np.array, _np.asanyarray, _np.ascontiguousarray):
            raise TypeError("Implicit conversion to a NumPy array is not allowed (CuPy stand-in)")
        _refuse_numpy(args)
        _refuse_numpy(kwargs.values())
        return _wrap(func(*_plain_tree(args), **{k: _plain_tree(v) for k, v in kwargs.items()}))

    def __array__(self, *args, **kwargs):
        raise TypeError("Implicit conversion to a NumPy array is not allowed (CuPy stand-in)")

    def get(self):
        _wait()
        return _np.array(self.view(_np.ndarray))

    def __bool__(self):
        _wait()
        return bool(self.view(_np.ndarray))

    def __int__(self):
        _wait()
        return int(self.view(_np.ndarray))

    def __float__(self):
        _wait()
        return float(self.view(_np.ndarray))

    def __index__(self):
        _wait()
        return self.view(_np.ndarray).__index__()

    def item(self, *args):
        _wait()
        return self.view(_np.ndarray).item(*args)

    def tolist(self):
        _wait()
        return self.view(_np.ndarray).tolist()

    def nonzero(self):
        _wait()
        return _wrap(self.view(_np.ndarray).nonzero())

    def __setitem__(self, key, value):
        if isinstance(value, _np.ndarray) and not isinstance(value, ndarray) and value.ndim:
            raise TypeError("setting a CuPy array from a NumPy array (CuPy stand-in)")
        _np.ndarray.__setitem__(self.view(_np.ndarray), _plain_tree(key), _plain(value))

    def __getitem__(self, key):
        if any(getattr(k, "dtype", None) == bool for k in (key if isinstance(key, tuple) else (key,))):
            _wait()                      # a boolean mask: the result's size is on the GPU
        return _wrap(_np.ndarray.__getitem__(self.view(_np.ndarray), _plain_tree(key)))

    def __reduce__(self):
        raise TypeError("no pickling (CuPy stand-in)")


ndarray.__module__ = "cupy"          # how align.array_module recognises CuPy arrays

waits = [0]                          # times the host would wait for a real GPU
_SIZED_BY_VALUES = {"nonzero", "flatnonzero", "argwhere", "unique", "compress", "extract"}


def _wait():
    waits[0] += 1


def _plain(x):
    return x.view(_np.ndarray) if isinstance(x, ndarray) else x


def _plain_tree(x):
    if isinstance(x, (list, tuple)):
        return type(x)(_plain_tree(i) for i in x)
    return _plain(x)


def _refuse_numpy(xs):
    for x in xs:
        if isinstance(x, (list, tuple)):
            _refuse_numpy(x)
        elif isinstance(x, _np.ndarray) and not isinstance(x, ndarray) and x.ndim > 0:
            raise TypeError(f"Unsupported type {type(x)} mixed with a CuPy array (CuPy stand-in)")


def _wrap(r):
    if isinstance(r, tuple):             # (NumPy's named tuples: plain ones, as CuPy's)
        return tuple(_wrap(i) for i in r)
    if isinstance(r, list):
        return [_wrap(i) for i in r]
    if type(r) is _np.ndarray:
        return r.view(ndarray)
    if isinstance(r, _np.generic):       # CuPy returns 0-d arrays, not scalars
        return _np.asarray(r).view(ndarray)
    return r


def _strict(fn):
    def call(*args, **kwargs):
        _refuse_numpy(args)
        _refuse_numpy(kwargs.values())
        return _wrap(fn(*_plain_tree(args), **{k: _plain_tree(v) for k, v in kwargs.items()}))
    call.__name__ = getattr(fn, "__name__", "function")
    return call


def asarray(a, dtype=None, order=None):
    if isinstance(a, ndarray):
        return a if dtype is None or a.dtype == dtype else a.astype(dtype)
    return _np.array(a, dtype=dtype).view(ndarray)


def array(a, dtype=None, copy=True, **kwargs):
    return asarray(a, dtype).copy()


def asnumpy(a):
    return a.get() if isinstance(a, ndarray) else _np.asarray(a)


def get_array_module(*args):
    return sys.modules[__name__] if any(isinstance(a, ndarray) for a in args) else _np


class _Submodule(types.ModuleType):
    def __init__(self, name, source):
        super().__init__(name)
        self._source = source

    def __getattr__(self, name):
        value = getattr(self._source, name)
        return _strict(value) if callable(value) and not isinstance(value, type) else value


linalg = _Submodule("cupy.linalg", _np.linalg)
random = _Submodule("cupy.random", _np.random)


def RawKernel(source, name, options=()):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    from cuda_on_cpu import Kernel
    return Kernel(source, name, options)


class _Device:
    def __init__(self, index=0):
        self.id = index

    def synchronize(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass


class _Runtime:
    @staticmethod
    def getDeviceCount():
        return 1

    @staticmethod
    def getDeviceProperties(index):
        return {"name": b"CuPy stand-in (NumPy)", "totalGlobalMem": 1 << 34}

    @staticmethod
    def memGetInfo():
        return 1 << 33, 1 << 34


class OutOfMemoryError(MemoryError):
    pass


class _Event:
    def record(self, stream=None):
        pass


def _no_memory_pool(*args, **kwargs):
    raise RuntimeError("the CuPy stand-in has no streams, memory pools or CUDA graphs")


cuda = types.SimpleNamespace(Device=_Device, runtime=_Runtime, Stream=None, Event=_Event,
                             MemoryPool=_no_memory_pool,
                             memory=types.SimpleNamespace(OutOfMemoryError=OutOfMemoryError),
                             get_current_stream=lambda: types.SimpleNamespace(synchronize=lambda: None))


def __getattr__(name):                   # everything else: NumPy's, made strict
    value = getattr(_np, name)
    if name in _SIZED_BY_VALUES:         # output sizes read back from the GPU
        strict = _strict(value)
        return lambda *args, **kwargs: _wait() or strict(*args, **kwargs)
    return _strict(value) if callable(value) and not isinstance(value, type) else value
