"""Compile the attention kernels for Hopper (sm_90) on a machine without a GPU; print one JSON line per
config: shared memory, and what the PTX does with K/V (16-byte loads, asynchronous copies and 8-byte ones,
tensor-core ops, Hopper's wgmma).

Run without TRITON_INTERPRET (the interpreter replaces the compiler). Triton marks integer arguments
divisible by 16 at launch; the realistic shapes here (strides of [blocks, 16, 8, 128] pools) are, so
every pointer and stride is compiled with that hint, as a real launch would be.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from zeroc_kernels import kv_quant, layer_ops, paged_decode, paged_prefill, qkv_epilogue, tier_decode, token_bitmask
from zeroc_kernels.tuning import config_id

TARGET = GPUTarget("cuda", 90, 32)
FLOATS = ("qk_scale", "scale", "eps", "lowest")
NOT_ALIGNED = FLOATS + ("split_len", "q_bucket", "len_bucket", "grid_bucket", "key_start")


def compile_config(fn, pointers: dict, constants: dict, config, unaligned: tuple[str, ...] = ()) -> dict:
    """unaligned: integer arguments a real launch passes not divisible by 16 (no divisibility hint)."""
    consts = {**constants, **config.kwargs}
    sig = {name: "constexpr" if name in consts else pointers.get(name, "fp32" if name in FLOATS else "i32")
           for name in fn.arg_names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names)
             if sig[name] != "constexpr" and name not in NOT_ALIGNED + unaligned}
    kernel = triton.compile(ASTSource(fn, sig, consts, attrs), target=TARGET,
                            options=dict(num_warps=config.num_warps, num_stages=config.num_stages))
    ptx = kernel.asm["ptx"]
    return {"config": config_id(config), "shared": kernel.metadata.shared, **_resources(kernel.asm["cubin"]),
            "cp_async": ptx.count("cp.async.cg"),
            "cp_async_8": len(re.findall(r"cp\.async\.c[ag]\.shared\.global \[[^]]*\], \[[^]]*\], 0x8", ptx)),
            "wgmma": ptx.count("wgmma.mma_async"),
            "v4_loads": ptx.count("ld.global.v4"), "b16_loads": ptx.count("ld.global.b16"),
            "b64_loads": ptx.count("ld.global.b64"), "byte_shared_loads": len(re.findall(r"ld\.shared\.[bsu]8", ptx)),
            "tensor_core": ptx.count("mma")}


def _resources(cubin: bytes) -> dict:
    """Registers per thread and stack bytes (local memory a thread uses: spilled registers, or an array the
    compiler could not keep in registers, such as the slow path of libdevice's sin and cos) of a compiled
    kernel, as cuobjdump reports them; empty where Triton's wheel has no cuobjdump."""
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not tool.exists():
        return {}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.cubin"
        path.write_bytes(cubin)
        report = subprocess.run([str(tool), "-res-usage", str(path)], capture_output=True, text=True).stdout
    found = re.search(r"REG:(\d+) STACK:(\d+)", report)
    return {"registers": int(found[1]), "stack": int(found[2])} if found else {}


def main(kinds: list[str]) -> None:
    pools = {"k_ptr": "*bf16", "v_ptr": "*bf16", "ks_ptr": "*fp32", "vs_ptr": "*fp32", "tables_ptr": "*i64",
             "lens_ptr": "*i64", "q_ptr": "*bf16", "out_ptr": "*bf16"}  # int64, as the engine keeps them
    llama = dict(GROUP=4, BLOCK_SIZE=16, DQ=128, DQ_PAD=128, DV=128, DV_PAD=128, INT8=False, DOT_F32=False,
                 PRECISION="tf32")
    if "decode" in kinds:
        for config in paged_decode.DECODE_CONFIGS:
            row = compile_config(paged_decode._paged_decode_kernel, {**pools, "lse_ptr": "*fp32"},
                                 {**llama, "GROUP_PAD": 16, "PV_T": False, "V_WORDS": False}, config)
            print(json.dumps({"kernel": "decode", **row}), flush=True)
    if "decode_int8" in kinds:  # int8 codes: P @ V plain with V read as words (the default) or bytes; transposed
        int8 = {**pools, "k_ptr": "*i8", "v_ptr": "*i8", "lse_ptr": "*fp32"}
        for pv_t, words in ((False, True), (False, False), (True, False)):
            for config in paged_decode.DECODE_CONFIGS:
                row = compile_config(paged_decode._paged_decode_kernel, int8,
                                     {**llama, "GROUP_PAD": 16, "INT8": True, "PV_T": pv_t, "V_WORDS": words}, config)
                print(json.dumps({"kernel": "decode_int8", "pv_transposed": pv_t, "v_words": words, **row}), flush=True)
    if "prefill" in kinds:
        for config in paged_prefill.PREFILL_CONFIGS:
            row = compile_config(paged_prefill._paged_prefill_kernel, {**pools, "starts_ptr": "*i64"},
                                 {**llama, "GH": 4, "CHUNKS": 1}, config)
            print(json.dumps({"kernel": "prefill", **row}), flush=True)
    if "layer_ops" in kinds:  # as a Llama-3-8B decode step launches them: rows of 4,096 and 14,336
        bf16 = {"x_ptr": "*bf16", "w_ptr": "*bf16", "out_ptr": "*bf16", "g_ptr": "*bf16", "u_ptr": "*bf16",
                "r_ptr": "*bf16", "sum_ptr": "*bf16"}
        for name, fn, constants, warps in (
                ("rms_norm", layer_ops._rms_norm_kernel, dict(H=4096, BLOCK_H=4096, BLOCK_M=1), 8),
                ("add_rms_norm", layer_ops._add_rms_norm_kernel, dict(H=4096, BLOCK_H=4096, BLOCK_M=1), 8),
                ("silu_mul", layer_ops._silu_mul_kernel, dict(I=14336, BLOCK_M=1, BLOCK_N=1024), 4)):
            row = compile_config(fn, bf16, constants, triton.Config({}, num_warps=warps, num_stages=1))
            print(json.dumps({"kernel": name, **row}), flush=True)
    if "tier" in kinds:
        _tier(llama)
    if "others" in kinds:
        _others(llama)


def _tier(llama: dict) -> None:
    """A token tier's decode segment (4 sinks + 64 recent, fold rank 64 of 128, partials in fp32 from a split
    decode), RoPE alone (query heads of a fold layer's run, 16 tokens x 4 heads a program) and a fold tier layer's
    joined q, k, v, at Llama-3-8B widths."""
    ptrs = {"q_ptr": "*bf16", "pool_ptr": "*bf16", "blocks_ptr": "*i64", "offsets_ptr": "*i64", "ids_ptr": "*i64",
            "seen_ptr": "*u8", "k_own_ptr": "*bf16", "v_own_ptr": "*bf16", "parts_ptr": "*fp32", "lses_ptr": "*fp32",
            "out_ptr": "*bf16"}
    constants = dict(HELD=68, K_PAD=128, GROUP=4, GROUP_PAD=16, KV=8, K_DIM=64, V_DIM=64, TIER_K=64, TIER_V=64,
                     KD_PAD=64, VD_PAD=64, TK_PAD=64, TV_PAD=64, PER_BLOCK=16 * 8 * 128, P=2, DOT_F32=False,
                     PRECISION=llama["PRECISION"])
    row = compile_config(tier_decode._tier_decode_kernel, ptrs, constants,
                         triton.Config({}, num_warps=4, num_stages=1),
                         unaligned=("stride_bb", "stride_ib", "stride_eb", "stride_lh", "stride_rh"))
    print(json.dumps({"kernel": "tier_decode", **row}), flush=True)
    row = compile_config(qkv_epilogue._rope_kernel, {"x_ptr": "*bf16", "pos_ptr": "*i64", "freq_ptr": "*fp32",
                                                     "out_ptr": "*bf16"},
                         dict(HALF=32, HALF_PAD=32, BLOCK_N=16, HEADS_PER_PROGRAM=4),
                         triton.Config({}, num_warps=4, num_stages=1), unaligned=("n", "heads", "heads_per_row"))
    print(json.dumps({"kernel": "rope", **row}), flush=True)
    # a fold-64 tier layer's full-rank q, k, v (zeroc bench engine's zeroc-fold-64-tier-S-W): 32 query heads, 8 KV
    # heads, 64 kept dims and 64 tier dims each; the projections are column slices of the fused GEMM's output
    row = compile_config(qkv_epilogue._tier_qkv_kernel,
                         {**{f"{x}_ptr": "*bf16" for x in ("q", "k", "v", "qt", "kt", "vt", "qout", "kout", "vout")},
                          "pos_ptr": "*i64", "freq_ptr": "*fp32", "tfreq_ptr": "*fp32"},
                         dict(HEADS=32, KV=8, HC=32, HC_PAD=32, HT=32, HT_PAD=32, RV=64, RV_PAD=64, VT=64, VT_PAD=64,
                              BLOCK_T=qkv_epilogue.ROPE_BLOCK_N),
                         triton.Config({}, num_warps=4, num_stages=1), unaligned=("n",))
    print(json.dumps({"kernel": "tier_qkv", **row}), flush=True)


def _others(llama: dict) -> None:
    """The kernels not above, at Llama-3-8B widths: both QKV epilogues (fold rank 64; rotate to rank 64), the
    split-K merge, the int8 pools' quantise and dequantise (scales head-major), and structured output's token mask
    (bf16 scores of a 128,256-token vocabulary)."""
    one = triton.Config({}, num_warps=4, num_stages=1)
    bf16 = {name: "*bf16" for name in ("q_ptr", "k_ptr", "v_ptr", "kpool_ptr", "vpool_ptr", "qout_ptr", "qb_ptr",
                                       "kb_ptr", "x_ptr", "out_ptr")}
    index = {"pos_ptr": "*i64", "slots_ptr": "*i64", "freq_ptr": "*fp32"}
    cases = (
        ("qkv_epilogue", qkv_epilogue._qkv_epilogue_kernel, {**bf16, **index},
         dict(HEADS=32, KV=8, HALF=32, HALF_PAD=32, RV=64, RV_PAD=64, BLOCK_T=qkv_epilogue.FOLD_BLOCK_T), ("n",)),
        ("qkv_rotate_epilogue", qkv_epilogue._qkv_rotate_epilogue_kernel, {**bf16, **index},
         dict(HEADS=32, KV=8, HALF=64, HALF_PAD=64, R=64, R_PAD=64, RV=64, RV_PAD=64, BLOCK_T=64, DOT_F32=False,
              PRECISION=llama["PRECISION"]), ("n",)),
        ("merge", paged_decode._merge_kernel, {"outs_ptr": "*fp32", "lses_ptr": "*fp32", "out_ptr": "*bf16",
                                              "lse_ptr": "*fp32"}, dict(S=2, S_PAD=2, DV=128, DV_PAD=128),
         ("stride_ps", "stride_lh", "stride_lb")),
        ("quantize", kv_quant._quantize_kernel, {"x_ptr": "*bf16", "slots_ptr": "*i64", "q_ptr": "*i8",
                                                 "s_ptr": "*fp32"},
         dict(D=128, D_PAD=128, H=8, BS=16, BLOCK_R=kv_quant.BLOCK_ROWS),
         ("stride_sh", "n")),
        ("dequantize", kv_quant._dequantize_kernel, {"q_ptr": "*i8", "s_ptr": "*fp32", "slots_ptr": "*i64",
                                                     "out_ptr": "*bf16"},
         dict(D=128, D_PAD=128, H=8, BS=16, BLOCK_R=kv_quant.BLOCK_ROWS), ("stride_sh", "n")),
        ("token_bitmask", token_bitmask._token_bitmask_kernel, {"scores_ptr": "*bf16", "packed_ptr": "*i32"},
         dict(BLOCK_V=token_bitmask.BLOCK_V), ("vocab", "words", "r")),
    )
    for name, fn, ptrs, constants, unaligned in cases:
        row = compile_config(fn, ptrs, constants, one, unaligned=unaligned)
        print(json.dumps({"kernel": name, **row}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:] or ["decode", "decode_int8", "prefill", "layer_ops", "tier", "others"])
