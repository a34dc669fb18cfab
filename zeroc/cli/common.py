"""What several `zeroc` commands share: model and cache flags, the settings they make, the service flags."""

from __future__ import annotations

import argparse
import os

from zeroc.config import ATTENTION_BACKENDS, SCHEDULING_POLICIES, ZeroCConfig
from zeroc.policies import NONE, POLICY_NAMES, REGISTRY, make_policy


SERVING_POLICIES = " | ".join((NONE, *POLICY_NAMES))  # --help of the serving commands; make_policy checks them
_UNITS = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="Hugging Face model directory (env ZEROC_MODEL_DIR; "
                                                  "default: the bundled model)")
    p.add_argument("--dtype", default=None, help="auto | float32 | bfloat16 | float16: what the weights compute in "
                                                  "(env ZEROC_DTYPE; default auto: the checkpoint's torch_dtype)")
    p.add_argument("--device", default=None, help="cpu | cuda | cuda:N: where the model runs (env ZEROC_DEVICE)")
    p.add_argument("--attention-backend", default=None, choices=ATTENTION_BACKENDS,
                   help="how the paged forward attends: auto (Triton on CUDA, cpu on the CPU where it builds, else "
                        "torch), torch (the PyTorch references), cpu (the ragged C++ kernel, built with g++ on "
                        "first use), triton (on the CPU only under TRITON_INTERPRET=1) or flex (triton with torch's "
                        "FlexAttention for paged attention, compiled; on the CPU also under TRITON_INTERPRET=1) "
                        "(env ZEROC_ATTENTION_BACKEND)")
    p.add_argument("--no-pack-weights", dest="pack_weights", action="store_const", const=False, default=None,
                   help="the cpu backend runs its GEMMs on the weights as they lie, not on a packed oneDNN copy of "
                        "each (env ZEROC_PACK_WEIGHTS=0)")


def checked(cfg: ZeroCConfig) -> ZeroCConfig:
    """The settings that only the layers above the config can check (the KV policy's): ValueError."""
    make_policy(cfg.cache)
    return cfg


def root_config(args: argparse.Namespace, cache: dict | None = None) -> ZeroCConfig:
    return checked(ZeroCConfig.from_env(model_dir=args.model, dtype=args.dtype, device=getattr(args, "device", None),
                                         attention_backend=getattr(args, "attention_backend", None),
                                         pack_weights=getattr(args, "pack_weights", None),
                                         cache=cache or {"block_size": getattr(args, "block_size", None)}))


def load(args: argparse.Namespace, cache: dict | None = None):
    from zeroc.loader import load_model

    cfg = root_config(args, cache)
    return load_model(cfg.model_dir, cfg.dtype, device=cfg.device, attention_backend=cfg.attention_backend,
                      pack_weights=cfg.pack_weights), cfg


def byte_size(text: str) -> int:
    """"1073741824", "512M", "1G", "1GiB" -> bytes (binary units)."""
    raw = text.strip().lower().removesuffix("ib").removesuffix("b")
    scale = _UNITS.get(raw[-1:], 1)
    try:
        value = float(raw[:-1] if raw[-1:] in _UNITS else raw) * scale
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a byte size: {text!r} (e.g. 1073741824, 512M, 1G)") from None
    return int(value)


def cache_settings(args: argparse.Namespace) -> dict:
    """The cache section of the config from serving flags (None: environment or default)."""
    policy = args.kv_policy or os.environ.get("ZEROC_CACHE_KV_POLICY", NONE)
    block = args.block_size
    if block is None and policy in REGISTRY and "ZEROC_CACHE_BLOCK_SIZE" not in os.environ:
        block = REGISTRY[policy].block_size  # the block size the method needs (KIVI: its group), else the default
    return {"block_size": block, "num_blocks": getattr(args, "num_blocks", None), "num_bytes": args.cache_bytes,
            "memory_fraction": getattr(args, "cache_memory_fraction", None),
            "kv_policy": args.kv_policy, "kv_budget": args.kv_budget, "kv_max_tokens": args.kv_max_tokens,
            "kv_residual": args.kv_residual}


def service_config(args: argparse.Namespace) -> ZeroCConfig:
    prefill = getattr(args, "prefill", None)
    return checked(ZeroCConfig.from_env(
        model_dir=args.model, dtype=args.dtype, device=args.device, attention_backend=args.attention_backend,
        pack_weights=getattr(args, "pack_weights", None),
        cache=cache_settings(args),
        server={"host": args.host, "port": args.port, "max_queue": args.max_queue, "grace_s": args.grace_s,
                "max_message_mb": args.max_message_mb},
        transfer={"prefill_target": "" if getattr(args, "colocated", False) else prefill,
                  "kv_transport": args.kv_transport, "prefill_fallback": getattr(args, "prefill_fallback", None)},
        scheduler={"policy": args.scheduling_policy, "speculative_tokens": args.speculative_tokens},
        redis={"url": args.redis_url}, store={"capacity_mb": args.kv_store_mb},
        parallel={"sp_ranks": getattr(args, "sp", None)},
        security={"tls_ca": args.tls_ca, "tls_cert": args.tls_cert, "tls_key": args.tls_key,
                  "tokens_file": args.tokens_file},
        metrics={"port": args.metrics_port}, threads={"engine": getattr(args, "engine_threads", None)}))


def serve_args(p: argparse.ArgumentParser) -> None:
    model_args(p)
    p.add_argument("--host", default=None, help="address to listen on (env ZEROC_SERVER_HOST; default 127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="port (env ZEROC_SERVER_PORT; 0 picks a free one)")
    p.add_argument("--max-queue", type=int, default=None, help="queued requests before RESOURCE_EXHAUSTED")
    p.add_argument("--speculative-tokens", type=int, default=None, metavar="K",
                   help="speculative decoding by n-gram lookup: check up to K drafted tokens a step for greedy "
                        "requests (env ZEROC_SCHEDULER_SPECULATIVE_TOKENS; default 0: off)")
    p.add_argument("--scheduling-policy", choices=SCHEDULING_POLICIES, default=None,
                   help="fcfs (arrival order) or priority (each request's priority, lower first; the running request "
                        "of the highest value is the one preempted) (env ZEROC_SCHEDULER_POLICY; default fcfs)")
    p.add_argument("--grace-s", type=float, default=None, help="seconds in-flight requests get on SIGTERM")
    p.add_argument("--max-message-mb", type=int, default=None, help="largest gRPC message, in MiB")
    p.add_argument("--block-size", type=int, default=None, help="KV cache block size")
    p.add_argument("--num-blocks", type=int, default=None, help="KV cache blocks, instead of a byte budget (tests; env ZEROC_CACHE_NUM_BLOCKS)")
    p.add_argument("--engine-threads", type=int, default=None,
                   help="intra-op CPU threads of the engine thread (env ZEROC_THREADS_ENGINE; default: "
                        "OMP_NUM_THREADS if set, else its cores; on more than two cores it keeps off the first, "
                        "ZEROC_THREADS_PIN=0 turns that off; docs/engine.md)")
    p.add_argument("--kv-transport", choices=["grpc", "nccl", "auto"], default=None,
                   help="how prompt KV travels between prefill and decode: in-band gRPC, NCCL between GPUs "
                        "(CUDA IPC on a shared GPU), or auto: NCCL when both peers have GPUs "
                        "(env ZEROC_TRANSFER_KV_TRANSPORT; default auto)")
    kv_policy_args(p)
    redis_arg(p)
    p.add_argument("--kv-store-mb", type=int, default=None,
                   help="KV store block pool in MiB, 0 turns prefix reuse off (env ZEROC_STORE_CAPACITY_MB; default 256)")
    for name in ("ca", "cert", "key"):  # docs/security.md
        p.add_argument(f"--tls-{name}", default=None, help=f"PEM file: TLS {name} (env ZEROC_SECURITY_TLS_{name.upper()})")
    p.add_argument("--tokens-file", default=None,
                   help="bearer tokens of the public API, 'TOKEN TENANT' lines (env ZEROC_SECURITY_TOKENS_FILE)")
    metrics_arg(p)


def metrics_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--metrics-port", type=int, default=None,
                   help="serve Prometheus metrics on http://HOST:PORT/metrics, HOST being the service's listen "
                        "address (env ZEROC_METRICS_PORT; default 0: off; docs/metrics.md)")


def redis_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--redis-url", default=None,
                   help="KV store index: redis://, rediss:// (TLS), unix://, redis+sentinel://HOST:PORT/MASTER, or "
                        "'off' (env ZEROC_REDIS_URL; default: an embedded redis-server)")


def kv_policy_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--kv-policy", default=None, metavar="NAME",
                   help=f"what the KV cache stores: {SERVING_POLICIES} (env ZEROC_CACHE_KV_POLICY; "
                        "docs/policies.md, 'In serving')")
    p.add_argument("--kv-budget", type=float, default=None,
                   help="h2o, streamingllm, snapkv: tokens kept as a fraction of those seen; palu: latent rank as a "
                        "fraction of the head dim; in (0, 1] (env ZEROC_CACHE_KV_BUDGET)")
    p.add_argument("--kv-max-tokens", type=int, default=None,
                   help="h2o: at most this many tokens per sequence (0: no cap; env ZEROC_CACHE_KV_MAX_TOKENS)")
    p.add_argument("--kv-residual", type=int, default=None,
                   help="kivi: full-precision tokens kept besides the filling block, a multiple of the block "
                        "size (default 0; env ZEROC_CACHE_KV_RESIDUAL)")
    p.add_argument("--cache-bytes", type=byte_size, default=None,
                   help="KV cache capacity in bytes (e.g. 1G): the blocks that fit depend on the model's KV "
                        "geometry and the policy (env ZEROC_CACHE_NUM_BYTES; default 96M, or "
                        "--cache-memory-fraction)")
    p.add_argument("--cache-memory-fraction", type=float, default=None,
                   help="KV cache capacity as this fraction of the memory available at start-up, in (0, 1) "
                        "(env ZEROC_CACHE_MEMORY_FRACTION)")


def calibration_args(p: argparse.ArgumentParser, tokens_flag: str) -> None:
    """How ZeroC calibration measures a model (`zeroc calibrate`, `zeroc eval quality`); `tokens_flag` names
    the statistics' token count."""
    p.add_argument(tokens_flag, type=int, default=16384, help="ZeroC calibration tokens for the statistics")
    p.add_argument("--sensitivity-tokens", type=int, default=2048, help="ZeroC tokens for per-layer sensitivity")
    p.add_argument("--window", type=int, default=512, help="ZeroC calibration window length")
    p.add_argument("--rank-multiple", type=int, default=None,
                   help="ZeroC ranks are multiples of this (default: 8 up to head_dim 64, else 16)")
    granularity_arg(p)


def granularity_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--rank-granularity", choices=["head", "layer"], default="head",
                   help="ZeroC ranks per KV head (default; measures each head's sensitivity: kv_heads times the "
                        "passes) or one per layer for all its heads")
