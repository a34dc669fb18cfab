"""The libnccl binding against the real library (skipped where none is installed: pip install '.[gpu]').

On a CPU-only machine NCCL loads, reports its version and makes unique ids; creating a
communicator fails, and that failure must come back as an NcclError carrying NCCL's own words.
"""

from __future__ import annotations

import ctypes.util
import importlib.metadata
from pathlib import Path

import pytest
import torch

from zeroc.transport.nccl import (ENV_LIBRARY, LIBRARY_NAME, REQUIRED_SYMBOLS, UNIQUE_ID_BYTES, Communicator,
                                  NcclError, NcclNotFoundError, NcclVersion, library_candidates, load_nccl)


def test_version_codes_of_both_numbering_schemes():
    assert NcclVersion.from_code(23203) == NcclVersion(2, 32, 3)  # X*10000 + Y*100 + Z since 2.9
    assert NcclVersion.from_code(2708) == NcclVersion(2, 7, 8)  # X*1000 + Y*100 + Z before
    assert str(NcclVersion(2, 21, 5)) == "2.21.5" and NcclVersion(2, 9, 0) < NcclVersion(2, 14, 0)


def test_an_explicit_library_is_the_only_candidate(tmp_path):
    missing = tmp_path / LIBRARY_NAME
    assert library_candidates({ENV_LIBRARY: str(missing)}) == [str(missing)]
    with pytest.raises(NcclNotFoundError) as err:
        load_nccl({ENV_LIBRARY: str(missing)})
    assert str(missing) in str(err.value) and "zeroc-serving[gpu]" in str(err.value)
    assert library_candidates({})[-1] == LIBRARY_NAME  # the system loader path comes last


def test_a_library_without_the_nccl_symbols_is_refused_naming_them():
    libc = ctypes.util.find_library("c")
    with pytest.raises(NcclNotFoundError) as err:
        load_nccl({ENV_LIBRARY: libc})
    assert "not a usable libnccl" in str(err.value)
    assert all(symbol in str(err.value) for symbol in REQUIRED_SYMBOLS)


def test_loads_with_every_symbol_and_a_supported_version(lib):
    assert lib.version >= NcclVersion(2, 14, 0)
    assert Path(lib.path).name == LIBRARY_NAME or Path(lib.path).is_file()
    if "nvidia/nccl/lib" in lib.path:  # the wheel's copy: the version is the wheel's
        wheel = importlib.metadata.version("nvidia-nccl-cu12")
        assert str(lib.version) == ".".join(wheel.split(".")[:3])
    assert load_nccl({}) is lib  # loaded once per process


def test_unique_ids_are_fresh_128_byte_values(lib):
    ids = {lib.unique_id() for _ in range(3)}
    assert len(ids) == 3
    assert all(len(i) == UNIQUE_ID_BYTES and any(i) for i in ids)


def test_bad_arguments_are_refused_before_reaching_nccl(lib):
    with pytest.raises(ValueError, match="128 bytes"):
        lib.init_rank(b"short", 2, 0)
    with pytest.raises(ValueError, match="rank 2"):
        lib.init_rank(lib.unique_id(), 2, 2)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present: the communicator would come up")
def test_without_a_gpu_joining_fails_with_nccls_own_message(lib):
    with pytest.raises(NcclError) as err:
        Communicator(lib, lib.unique_id(), 1, 0)
    assert err.value.code == 1 and err.value.name == "ncclUnhandledCudaError"
    assert err.value.call == "ncclCommInitRankConfig"
    message = str(err.value).lower()
    assert "unhandled cuda error" in message and "cuda" in message.split("(")[-1]
