"""A small ctypes binding over libnccl (NCCL >= 2.14), loaded on first use.

`load_nccl` looks for ``libnccl.so.2`` in ``ZEROC_NCCL_LIBRARY``, then in the `nvidia-nccl-cu12`
wheel (``pip install 'zeroc-serving[gpu]'``: ``nvidia/nccl/lib``), then in the copy a CUDA build
of torch ships (``torch/lib``), then on the system loader path; it checks that every symbol used
here is exported. Nothing touches CUDA before a communicator is created, so loading, `version`
and `unique_id` work on a CPU-only machine.

`Communicator` is one rank of a communicator in NCCL's non-blocking mode: every wait has a
deadline, and a missed deadline or an asynchronous error aborts it (``ncclCommAbort``) instead of
hanging the caller. Buffers and streams are raw device pointers and ``cudaStream_t`` values, so
this module does not import torch.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.util
import os
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

ENV_LIBRARY = "ZEROC_NCCL_LIBRARY"
LIBRARY_NAME = "libnccl.so.2"
UNIQUE_ID_BYTES = 128
MIN_VERSION = (2, 14, 0)  # non-blocking communicators (ncclCommInitRankConfig, ncclInProgress)

SUCCESS, IN_PROGRESS, TIMEOUT = 0, 7, 8
RESULT_NAMES = ("ncclSuccess", "ncclUnhandledCudaError", "ncclSystemError", "ncclInternalError",
                "ncclInvalidArgument", "ncclInvalidUsage", "ncclRemoteError", "ncclInProgress", "ncclTimeout")
_UINT8 = 1  # ncclUint8: payloads travel as bytes whatever their element type
_API_MAGIC = 0xCAFEBEEF
_UNDEF_INT = -(2 ** 31)  # NCCL_CONFIG_UNDEF_INT: let NCCL pick

REQUIRED_SYMBOLS = ("ncclGetVersion", "ncclGetUniqueId", "ncclGetErrorString", "ncclCommInitRank",
                    "ncclCommInitRankConfig", "ncclCommGetAsyncError", "ncclCommAbort", "ncclCommDestroy",
                    "ncclGroupStart", "ncclGroupEnd", "ncclSend", "ncclRecv")


class NcclNotFoundError(RuntimeError):
    """No usable libnccl: the message lists every place tried and why each failed."""


class NcclError(RuntimeError):
    """An NCCL call failed; `code` is its ncclResult_t and the message carries NCCL's own text."""

    def __init__(self, call: str, code: int, message: str):
        name = RESULT_NAMES[code] if 0 <= code < len(RESULT_NAMES) else f"ncclResult {code}"
        super().__init__(f"{call} failed: {name}: {message}")
        self.call, self.code, self.name = call, code, name


class NcclTimeoutError(NcclError):
    """A wait passed its deadline; the communicator has been aborted."""

    def __init__(self, what: str, timeout_s: float):
        super().__init__(what, TIMEOUT, f"not done within {timeout_s:g} s; communicator aborted")


@dataclass(frozen=True, order=True)
class NcclVersion:
    major: int
    minor: int
    patch: int

    @classmethod
    def from_code(cls, code: int) -> "NcclVersion":
        # NCCL_VERSION_CODE is X*10000+Y*100+Z since 2.9, X*1000+Y*100+Z before.
        if code >= 10000:
            return cls(code // 10000, code % 10000 // 100, code % 100)
        return cls(code // 1000, code % 1000 // 100, code % 100)

    def __str__(self) -> str:
        return f"{self.major}.{self.minor}.{self.patch}"


class _UniqueId(ctypes.Structure):
    _fields_ = [("internal", ctypes.c_char * UNIQUE_ID_BYTES)]


class _Config(ctypes.Structure):
    """ncclConfig_t as of NCCL 2.17; newer libraries read `size` bytes and default the rest."""

    _fields_ = [("size", ctypes.c_size_t), ("magic", ctypes.c_uint), ("version", ctypes.c_uint),
                ("blocking", ctypes.c_int), ("cgaClusterSize", ctypes.c_int), ("minCTAs", ctypes.c_int),
                ("maxCTAs", ctypes.c_int), ("netName", ctypes.c_char_p)]

    @classmethod
    def non_blocking(cls) -> "_Config":
        return cls(ctypes.sizeof(cls), _API_MAGIC, 21700, 0, _UNDEF_INT, _UNDEF_INT, _UNDEF_INT, None)


_P = ctypes.c_void_p
_SIGNATURES = {  # name: argtypes; every function returns ncclResult_t (int)
    "ncclGetVersion": [ctypes.POINTER(ctypes.c_int)],
    "ncclGetUniqueId": [ctypes.POINTER(_UniqueId)],
    "ncclCommInitRank": [ctypes.POINTER(_P), ctypes.c_int, _UniqueId, ctypes.c_int],
    "ncclCommInitRankConfig": [ctypes.POINTER(_P), ctypes.c_int, _UniqueId, ctypes.c_int, ctypes.POINTER(_Config)],
    "ncclCommGetAsyncError": [_P, ctypes.POINTER(ctypes.c_int)],
    "ncclCommAbort": [_P],
    "ncclCommDestroy": [_P],
    "ncclGroupStart": [],
    "ncclGroupEnd": [],
    "ncclSend": [_P, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, _P, _P],
    "ncclRecv": [_P, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, _P, _P],
}


class NcclLibrary:
    """One loaded libnccl with its symbols checked and typed. Use `load_nccl` rather than this directly."""

    def __init__(self, path: str):
        try:
            self._lib = ctypes.CDLL(path)
        except OSError as exc:
            raise NcclNotFoundError(str(exc) if path in str(exc) else f"{path}: {exc}") from None
        missing = [s for s in REQUIRED_SYMBOLS if not hasattr(self._lib, s)]
        if missing:
            raise NcclNotFoundError(f"{path} is not a usable libnccl: missing {', '.join(missing)}")
        self.path = path
        for name, argtypes in _SIGNATURES.items():
            fn = getattr(self._lib, name)
            fn.argtypes, fn.restype = argtypes, ctypes.c_int
        self._lib.ncclGetErrorString.argtypes, self._lib.ncclGetErrorString.restype = [ctypes.c_int], ctypes.c_char_p
        self._last_error = getattr(self._lib, "ncclGetLastError", None)  # NCCL >= 2.13
        if self._last_error is not None:
            self._last_error.argtypes, self._last_error.restype = [_P], ctypes.c_char_p
        code = ctypes.c_int()
        self.check("ncclGetVersion", self._lib.ncclGetVersion(ctypes.byref(code)))
        self.version = NcclVersion.from_code(code.value)
        if self.version < NcclVersion(*MIN_VERSION):
            raise NcclNotFoundError(f"{path} is NCCL {self.version}; ZeroC needs >= {NcclVersion(*MIN_VERSION)}")

    # -- errors ------------------------------------------------------------------------------------
    def error_string(self, code: int) -> str:
        return (self._lib.ncclGetErrorString(code) or b"").decode(errors="replace")

    def last_error(self, comm: int | None = None) -> str:
        """NCCL's most recent detailed message (e.g. the CUDA error behind ncclUnhandledCudaError)."""
        if self._last_error is None:
            return ""
        return (self._last_error(comm) or b"").decode(errors="replace")

    def check(self, call: str, code: int, comm: int | None = None) -> int:
        """Raise NcclError for any result but success or in-progress; returns `code`."""
        if code not in (SUCCESS, IN_PROGRESS):
            detail = self.last_error(comm)
            text = self.error_string(code)
            raise NcclError(call, code, f"{text} ({detail})" if detail and detail not in text else text)
        return code

    # -- calls -------------------------------------------------------------------------------------
    def unique_id(self) -> bytes:
        """A fresh ncclUniqueId (128 bytes): rank 0's bootstrap address, to be sent to the other ranks."""
        uid = _UniqueId()
        self.check("ncclGetUniqueId", self._lib.ncclGetUniqueId(ctypes.byref(uid)))
        return bytes(uid)  # the whole struct: `uid.internal` would stop at the first NUL byte

    def init_rank(self, unique_id: bytes, nranks: int, rank: int) -> int:
        """Start joining a communicator in non-blocking mode on the current CUDA device; -> ncclComm_t.

        Initialisation goes on in NCCL's own thread; poll `async_error` until it is not in progress."""
        if len(unique_id) != UNIQUE_ID_BYTES:
            raise ValueError(f"an NCCL unique id has {UNIQUE_ID_BYTES} bytes, got {len(unique_id)}")
        if not 0 <= rank < nranks:
            raise ValueError(f"rank {rank} is not in [0, {nranks})")
        uid = _UniqueId.from_buffer_copy(unique_id)
        comm, config = _P(), _Config.non_blocking()
        rc = self._lib.ncclCommInitRankConfig(ctypes.byref(comm), nranks, uid, rank, ctypes.byref(config))
        if rc not in (SUCCESS, IN_PROGRESS) and comm.value:
            self._lib.ncclCommAbort(comm)  # a half-built communicator must not leak its threads
        self.check("ncclCommInitRankConfig", rc)
        return comm.value

    def async_error(self, comm: int) -> int:
        state = ctypes.c_int()
        self.check("ncclCommGetAsyncError", self._lib.ncclCommGetAsyncError(comm, ctypes.byref(state)), comm)
        return state.value

    def send(self, comm: int, ptr: int, nbytes: int, peer: int, stream: int) -> int:
        return self.check("ncclSend", self._lib.ncclSend(ptr, nbytes, _UINT8, peer, comm, stream), comm)

    def recv(self, comm: int, ptr: int, nbytes: int, peer: int, stream: int) -> int:
        return self.check("ncclRecv", self._lib.ncclRecv(ptr, nbytes, _UINT8, peer, comm, stream), comm)

    def group_start(self) -> int:
        return self.check("ncclGroupStart", self._lib.ncclGroupStart())

    def group_end(self) -> int:
        return self.check("ncclGroupEnd", self._lib.ncclGroupEnd())

    def abort(self, comm: int) -> None:
        self._lib.ncclCommAbort(comm)  # best effort: the communicator is being thrown away

    def destroy(self, comm: int) -> None:
        self.check("ncclCommDestroy", self._lib.ncclCommDestroy(comm))


def library_candidates(env: dict[str, str] | None = None) -> list[str]:
    """Where `load_nccl` looks, in order: the env override, the nvidia-nccl-cu12 wheel, torch/lib, the system."""
    env = os.environ if env is None else env
    if env.get(ENV_LIBRARY):
        return [env[ENV_LIBRARY]]  # an explicit choice is never silently replaced by another copy
    out = []
    for package, sub in (("nvidia.nccl", "lib"), ("torch", "lib")):
        try:
            spec = importlib.util.find_spec(package)
        except ModuleNotFoundError:
            spec = None
        for root in (spec.submodule_search_locations or []) if spec else []:
            if (Path(root) / sub / LIBRARY_NAME).is_file():
                out.append(str(Path(root) / sub / LIBRARY_NAME))
    return [*out, LIBRARY_NAME]


@functools.lru_cache(maxsize=None)
def _load(path: str) -> NcclLibrary:
    return NcclLibrary(path)  # a process maps a shared library once; so does this


def load_nccl(env: dict[str, str] | None = None) -> NcclLibrary:
    """The first usable libnccl among `library_candidates`; raises NcclNotFoundError listing the attempts."""
    errors = []
    for path in library_candidates(env):
        try:
            return _load(path)
        except NcclNotFoundError as exc:
            errors.append(str(exc))
    raise NcclNotFoundError("no usable libnccl (install the GPU extra: pip install 'zeroc-serving[gpu]', "
                            f"or set {ENV_LIBRARY}); tried: " + "; ".join(errors))


class Communicator:
    """One rank of a non-blocking NCCL communicator; thread-safe, every wait bounded by a timeout."""

    def __init__(self, lib: NcclLibrary, unique_id: bytes, nranks: int, rank: int):
        self.lib, self.nranks, self.rank = lib, nranks, rank
        self._lock = threading.RLock()
        self._comm: int | None = lib.init_rank(unique_id, nranks, rank)

    @property
    def alive(self) -> bool:
        return self._comm is not None

    def _handle(self, what: str) -> int:
        if self._comm is None:
            raise NcclError(what, 6, "the communicator was aborted")  # ncclRemoteError: a peer or a timeout
        return self._comm

    def poll(self, done: Callable[[], bool], timeout_s: float, what: str) -> None:
        """Wait until `done()` while watching for asynchronous NCCL errors; abort on error or timeout."""
        deadline, pause = time.monotonic() + timeout_s, 20e-6
        while True:
            with self._lock:
                comm = self._handle(what)
                try:
                    state = self.lib.async_error(comm)
                    if state not in (SUCCESS, IN_PROGRESS):
                        self.lib.check(what, state, comm)
                except NcclError:
                    self.abort()
                    raise
            if state == SUCCESS and done():
                return
            if time.monotonic() > deadline:
                self.abort()
                raise NcclTimeoutError(what, timeout_s)
            time.sleep(pause)
            pause = min(pause * 2, 2e-3)

    def wait_ready(self, timeout_s: float) -> None:
        """Block until this rank's initialisation has finished (every rank must have joined)."""
        self.poll(lambda: True, timeout_s, f"communicator setup (rank {self.rank} of {self.nranks})")

    def _call(self, what: str, fn: Callable[[int], int], timeout_s: float) -> None:
        with self._lock:
            rc = fn(self._handle(what))
        if rc == IN_PROGRESS:  # non-blocking mode: the call is still being enqueued
            self.poll(lambda: True, timeout_s, what)

    def send(self, ptr: int, nbytes: int, peer: int, stream: int, timeout_s: float = 60.0) -> None:
        """Enqueue a send of `nbytes` at device pointer `ptr` on `stream` (returns before it completes)."""
        self._call("ncclSend", lambda c: self.lib.send(c, ptr, nbytes, peer, stream), timeout_s)

    def recv(self, ptr: int, nbytes: int, peer: int, stream: int, timeout_s: float = 60.0) -> None:
        """Enqueue a receive of `nbytes` into device pointer `ptr` on `stream`."""
        self._call("ncclRecv", lambda c: self.lib.recv(c, ptr, nbytes, peer, stream), timeout_s)

    @contextmanager
    def group(self, timeout_s: float = 60.0) -> Iterator[None]:
        """ncclGroupStart/End around the block (needed for a rank sending to itself)."""
        with self._lock:
            self.lib.group_start()
            try:
                yield
            finally:
                rc = self.lib.group_end()
        if rc == IN_PROGRESS:
            self.poll(lambda: True, timeout_s, "ncclGroupEnd")

    def abort(self) -> None:
        """Tear the communicator down now, cancelling outstanding operations. Idempotent."""
        with self._lock:
            comm, self._comm = self._comm, None
        if comm is not None:
            self.lib.abort(comm)

    def close(self) -> None:
        """Release the communicator. Abort rather than destroy: destroy waits for the peer's last ops."""
        self.abort()
