"""Ragged attention over the paged KV cache on the CPU: a small C++ kernel (csrc/ragged_attention.cpp)
that reads the cache in place, beside its reference `paged_attention_ref`.

The reference gathers every sequence's whole padded context twice, builds a dense mask and pads each
sequence's queries to the step's longest; the kernel walks each sequence's blocks through its table with
an online softmax, one work item per (sequence, KV head, tile of query rows), in torch's thread pool.
It is built on first use with torch.utils.cpp_extension (g++, cached under TORCH_EXTENSIONS_DIR, by
default ~/.cache/torch_extensions) for the vector width torch detected on this CPU. Where it cannot be
built (no compiler, as in the slim runtime image), `load_ragged_kernel` returns None and the caller keeps
the reference.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from types import ModuleType

import torch
from torch import Tensor

from zeroc_kernels.paged_attention import paged_attention_ref, rows_contiguous

log = logging.getLogger(__name__)

SOURCE = Path(__file__).parent / "csrc" / "ragged_attention.cpp"

# Vector ISA flags per torch's CPU capability (what torch itself dispatches to on this machine), so the
# build never uses an instruction the CPU lacks, and a cache shared by different CPUs keeps one build each.
ISA_FLAGS = {
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma"],
    "AVX2": ["-mavx2", "-mfma"],
}

ragged_paged_attention_ref = paged_attention_ref  # the oracle, under the name the kernel pairs with


def _build_name(capability: str) -> str:
    digest = hashlib.sha1(SOURCE.read_bytes()).hexdigest()[:10]
    return f"zeroc_ragged_attention_{capability.lower()}_{digest}"


def load_ragged_kernel(verbose: bool = False) -> ModuleType | None:
    """The compiled kernel module (built once per source and CPU capability, then loaded from the cache),
    or None, logged, where it cannot be built here."""
    try:
        from torch.utils.cpp_extension import load  # lazy: pulls in setuptools machinery
    except ImportError as exc:  # pragma: no cover - torch always ships it
        log.warning("ragged CPU attention unavailable (%s); using the reference", exc)
        return None
    capability = torch.backends.cpu.get_cpu_capability()
    # -fopenmp: at::parallel_for is inline OpenMP code, compiled into the kernel; the libgomp it links is the
    # one torch already loaded (same soname), so both share one thread pool and torch.set_num_threads.
    flags = ["-O3", "-fopenmp", "-ffp-contract=fast", *ISA_FLAGS.get(capability, [])]
    try:
        return load(name=_build_name(capability), sources=[str(SOURCE)], extra_cflags=flags,
                    extra_ldflags=["-fopenmp"], verbose=verbose)
    except (OSError, RuntimeError, ImportError) as exc:  # no compiler, or a failed build: keep serving
        log.warning("could not build the ragged CPU attention kernel (%s); using the reference", exc)
        return None


def ragged_paged_attention(
    kernel: ModuleType,  # from load_ragged_kernel()
    q: Tensor,  # [N, heads, dq] fp32 new queries of all sequences, concatenated
    k_cache: Tensor,  # [num_blocks, block_size, kv_heads, dq] fp32, any strides but the last
    v_cache: Tensor,  # [num_blocks, block_size, kv_heads, dv] fp32
    block_tables: Tensor,  # [B, max_blocks]
    seq_lens: Tensor,  # [B] context length, new tokens included
    query_start_loc: Tensor,  # [B + 1]
    scale: float,
) -> Tensor:
    """-> [N, heads, dv], as `paged_attention_ref`. Other dtypes go through fp32 (the accumulation the
    reference's SDPA uses on the CPU) and come back in q's dtype."""
    dtype = q.dtype
    if dtype != torch.float32 or k_cache.dtype != torch.float32 or v_cache.dtype != torch.float32:
        q, k_cache, v_cache = q.float(), k_cache.float(), v_cache.float()
    out = kernel.ragged_paged_attention(q, rows_contiguous(k_cache), rows_contiguous(v_cache), block_tables,
                                        seq_lens, query_start_loc, float(scale))
    return out.to(dtype)
