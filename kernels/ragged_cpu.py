"""Ragged attention over the paged KV cache on the CPU: a small C++ kernel (csrc/ragged_attention.cpp)
that reads the cache in place, beside its reference `paged_attention_ref`.

The reference gathers every sequence's whole padded context twice, builds a dense mask and pads each
sequence's queries to the step's longest; the kernel walks each sequence's blocks through its table with
an online softmax, one work item per (sequence, KV head, tile of query rows), in torch's thread pool.
The same module holds a token tier's decode segment (csrc/tier_decode.cpp, beside `tier_decode_ref`) and
the CPU sampler (csrc/sampling.cpp: `sample_rows`, whose reference is zeroc.sampling's torch path) and a layer's
RMSNorm and RoPE (csrc/layer_ops.cpp, called through kernels/cpu_layer_ops.py).

Build: on first use, a compiler call per source at once (c++, or $CXX; as many as there are cores) against
torch's headers, then one link against its libraries, for the vector ISA torch detected on this CPU, into
ZEROC_KERNEL_DIR (default ~/.cache/zeroc/kernels). The file name holds a hash of the sources, the flags, torch's
and Python's versions, so a stale build is never loaded and later processes import it without a compiler (the CPU
image builds it at image build time: `python -m zeroc_kernels.ragged_cpu --all-isas`). Where it cannot be built
(no compiler), `load_ragged_kernel` returns None and the caller keeps the reference.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.machinery
import importlib.util
import logging
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import ModuleType

import torch
from torch import Tensor

from zeroc_kernels.paged_attention import paged_attention_ref, rows_contiguous
from zeroc_kernels.tier_decode import TierSlots, tier_decode_check, tier_decode_ref

log = logging.getLogger(__name__)

SOURCES = [Path(__file__).parent / "csrc" / name for name in ("ragged_attention.cpp", "tier_decode.cpp",
                                                                 "sampling.cpp", "layer_ops.cpp")]

# Vector ISA flags per torch's CPU capability (what torch itself dispatches to on the machine), so a build
# never uses an instruction the CPU lacks, and a directory shared by different CPUs keeps one build each.
ISA_FLAGS = {
    "DEFAULT": [],
    "AVX2": ["-mavx2", "-mfma"],
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma"],
}
# -fopenmp: at::parallel_for is inline OpenMP code. The libgomp it links is the one torch already loaded (the
# same soname), so the kernel shares torch's thread pool and follows torch.set_num_threads.
BASE_FLAGS = ["-O3", "-fopenmp", "-ffp-contract=fast", "-fPIC", "-std=c++20", "-shared"]

ragged_paged_attention_ref = paged_attention_ref  # the oracle, under the name the kernel pairs with


def kernel_dir() -> Path:
    return Path(os.environ.get("ZEROC_KERNEL_DIR") or Path.home() / ".cache" / "zeroc" / "kernels")


def cpu_isa() -> str:
    """This CPU's key of ISA_FLAGS: torch's detected capability, DEFAULT where it has no flags of ours."""
    capability = torch.backends.cpu.get_cpu_capability()
    return capability if capability in ISA_FLAGS else "DEFAULT"


def _flags(capability: str) -> list[str]:
    abi = int(getattr(torch._C, "_GLIBCXX_USE_CXX11_ABI", True))
    return [*BASE_FLAGS, *ISA_FLAGS.get(capability, []), f"-D_GLIBCXX_USE_CXX11_ABI={abi}"]


def _module_name(capability: str) -> str:
    key = b"".join(s.read_bytes() for s in SOURCES) + repr((_flags(capability), torch.__version__,
                                                           sys.version_info[:2])).encode()
    return f"zeroc_ragged_{capability.lower()}_{hashlib.sha1(key).hexdigest()[:12]}"


def _run_all(commands: list[list[str]]) -> None:
    """Run the commands, as many at once as there are cores (each compiler holds some 1 GB); CalledProcessError,
    with the compiler's stderr, for the first that fails."""
    def run(cmd: list[str]) -> None:
        subprocess.run(cmd, check=True, capture_output=True, text=True)

    with ThreadPoolExecutor(max_workers=max(1, min(len(commands), os.cpu_count() or 1))) as pool:
        for future in [pool.submit(run, cmd) for cmd in commands]:
            future.result()


def build_ragged_kernel(capability: str) -> Path:
    """Compile the kernel for `capability` (a key of ISA_FLAGS) unless built already -> the module's path.
    OSError / CalledProcessError when there is no compiler or the build fails."""
    from torch.utils import cpp_extension  # lazy: pulls in setuptools machinery

    name = _module_name(capability)
    path = kernel_dir() / f"{name}{importlib.machinery.EXTENSION_SUFFIXES[0]}"
    if path.exists():
        return path
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if cxx is None:
        raise OSError("no C++ compiler (c++, g++ or $CXX) on PATH")
    path.parent.mkdir(parents=True, exist_ok=True)
    includes = [*cpp_extension.include_paths(), sysconfig.get_paths()["include"]]
    libs = [f"-L{p}" for p in cpp_extension.library_paths()]
    compile_flags = [*_flags(capability), f"-DTORCH_EXTENSION_NAME={name}", "-DTORCH_API_INCLUDE_EXTENSION_H",
                     *(f"-isystem{i}" for i in includes)]
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:  # then one rename: racing builders are safe
        out = Path(tmp) / path.name
        objects = [Path(tmp) / f"{src.stem}.o" for src in SOURCES]
        log.info("building the ragged CPU attention kernel (%s: a minute or two)", capability)
        # One compiler per source, all at once (each parses torch's headers, most of its minute), then one link.
        _run_all([[cxx, *compile_flags, "-c", str(src), "-o", str(obj)] for src, obj in zip(SOURCES, objects)])
        _run_all([[cxx, *_flags(capability), *map(str, objects), *libs, "-lc10", "-ltorch_cpu", "-ltorch",
                   "-ltorch_python", "-o", str(out)]])
        os.replace(out, path)
    return path


def load_ragged_kernel() -> ModuleType | None:
    """The kernel module for this CPU (built on first use, then imported from ZEROC_KERNEL_DIR), or None,
    logged, where it cannot be built here."""
    try:
        path = build_ragged_kernel(cpu_isa())
    except subprocess.CalledProcessError as exc:
        log.warning("could not build the ragged CPU attention kernel; using the reference:\n%s", exc.stderr[-2000:])
        return None
    except OSError as exc:
        log.warning("could not build the ragged CPU attention kernel (%s); using the reference", exc)
        return None
    name = path.name.split(".")[0]
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules[name] = module  # an extension module initialises once per process
    return module


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
    """-> [N, heads, dv], as `paged_attention_ref`, in q's dtype. The kernel reads fp32 and bf16 pools in place
    (a bf16 row widened as it is read) and computes in fp32 (the accumulation the reference's SDPA uses on the
    CPU); other pools (fp16) go through fp32 copies of only the blocks the tables name, as the int8 path
    dequantises them: a whole pool would cost every call its size."""
    dtype = q.dtype
    k_cache, v_cache, block_tables = _kernel_pools(k_cache, v_cache, block_tables)
    out = kernel.ragged_paged_attention(q.float(), rows_contiguous(k_cache), rows_contiguous(v_cache), block_tables,
                                        seq_lens, query_start_loc, float(scale))
    return out.to(dtype)


def _kernel_pools(k_cache: Tensor, v_cache: Tensor, block_tables: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Pools the kernel reads as they lie (both fp32 or both bf16), or fp32 copies of the blocks the tables name,
    with the tables renumbered into them."""
    if k_cache.dtype == v_cache.dtype and k_cache.dtype in (torch.float32, torch.bfloat16):
        return k_cache, v_cache, block_tables
    ids, block_tables = block_tables.unique(return_inverse=True)
    return k_cache[ids].float(), v_cache[ids].float(), block_tables


def ragged_decode_partials(
    kernel: ModuleType,  # from load_ragged_kernel()
    q: Tensor,  # [B, heads, dq] one query per sequence
    k_cache: Tensor,  # [num_blocks, block_size, kv_heads, dq], any strides but the last
    v_cache: Tensor,  # [num_blocks, block_size, kv_heads, dv]
    block_tables: Tensor,  # [B, max_blocks]
    seq_lens: Tensor,  # [B] each sequence's keys end here
    scale: float,
    key_start: int = 0,  # ... and start here
) -> tuple[Tensor, Tensor]:
    """-> (out [B, heads, 1, dv], lse [B, heads, 1]), as `decode_partials_ref` (kernels/paged_decode.py), in place
    in the cache like `ragged_paged_attention` (dtypes likewise)."""
    dtype = q.dtype
    k_cache, v_cache, block_tables = _kernel_pools(k_cache, v_cache, block_tables)
    out, lse = kernel.ragged_decode_partials(q.float(), rows_contiguous(k_cache), rows_contiguous(v_cache),
                                             block_tables, seq_lens, float(scale), int(key_start))
    return out.to(dtype)[:, :, None], lse[:, :, None]


def ragged_tier_decode(
    kernel: ModuleType,  # from load_ragged_kernel()
    q: Tensor,  # [B, heads, k_dim + tier_k]
    pool: Tensor,  # [num_blocks, block_size, kv, k_dim + v_dim], contiguous
    k_dim: int,
    slots: TierSlots,
    k_own: Tensor,  # [B, kv, k_dim + tier_k]
    v_own: Tensor,  # [B, kv, v_dim + tier_v]
    parts: Tensor,  # [B, heads, P, v_dim]
    lses: Tensor,  # [B, heads, P]
    scale: float,
) -> Tensor:
    """-> [B, heads, v_dim + tier_v], as `tier_decode_ref` (kernels/tier_decode.py). The kernel reads fp32 and bf16
    pools in place (a bf16 row widened as it is copied); the reference serves other pools (fp16: converting a
    whole pool per layer would cost more than it)."""
    tier_decode_check(q, pool, k_dim, slots, k_own, v_own, parts, lses)
    if pool.dtype not in (torch.float32, torch.bfloat16):
        return tier_decode_ref(q, pool, k_dim, slots, k_own, v_own, parts, lses, scale)
    f32 = [t.float().contiguous() for t in (q, k_own, v_own, parts, lses)]
    index = [t.to(torch.long).contiguous() for t in (slots.blocks, slots.offsets, slots.tier_ids)]
    out = kernel.tier_decode(f32[0], pool, int(k_dim), *index, slots.seen.contiguous(), *f32[1:], float(scale))
    return out.to(q.dtype)


def main() -> int:
    """Build ahead of use (images): `python -m zeroc_kernels.ragged_cpu [--all-isas]`."""
    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("--all-isas", action="store_true", help="build for every ISA, not only this CPU's")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO)
    for cap in list(ISA_FLAGS) if args.all_isas else [cpu_isa()]:
        print(build_ragged_kernel(cap))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
