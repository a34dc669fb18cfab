"""Shared fixture for the transport tests: the real NCCL library, where this machine has it."""

from __future__ import annotations

import pytest

from zeroc.transport.nccl import NcclNotFoundError, load_nccl


@pytest.fixture(scope="session")
def lib():
    try:
        return load_nccl({})
    except NcclNotFoundError as exc:
        pytest.skip(f"needs the real libnccl, which ships in the optional gpu extra (351 MB), not in make test: {exc}")
