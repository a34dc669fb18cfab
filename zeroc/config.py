"""Typed configuration.

`ModelConfig` mirrors the fields of a Hugging Face Llama-family ``config.json`` that the
runtime needs. `CacheConfig`, `SchedulerConfig` and the root `ZeroCConfig` hold the
runtime's own settings; each component receives only its own part.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from zeroc.errors import ConfigError

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM")
SUPPORTED_MODEL_TYPES = ("llama", "mistral")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")

# The model and texts that ship with the repository (found relative to this source tree).
REPO_ROOT = Path(__file__).resolve().parent.parent
BUNDLED_MODEL = REPO_ROOT / "models" / "zeroc-tiny"
BUNDLED_HELDOUT = REPO_ROOT / "data" / "heldout.txt"
BUNDLED_CALIB = REPO_ROOT / "data" / "calib.txt"

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# How the paged forward runs attention (zeroc_kernels.attention.select_backend): auto = Triton on CUDA, else torch.
ATTENTION_BACKENDS = ("auto", "torch", "triton")


def parse_dtype(name: str) -> torch.dtype:
    """Map a dtype name ("float32", "bf16", "torch.float16", ...) to a torch dtype."""
    key = str(name).removeprefix("torch.")
    key = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}.get(key, key)
    if key not in DTYPES:
        raise ValueError(f"unsupported dtype {name!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[key]


@dataclass(frozen=True)
class RopeConfig:
    """RoPE frequencies: theta plus an optional Hugging Face ``rope_scaling`` block."""

    theta: float = 10000.0
    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self) -> None:
        if self.rope_type not in SUPPORTED_ROPE_TYPES:
            raise ValueError(
                f"rope type {self.rope_type!r} is not supported; supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
            )
        if self.theta <= 0 or self.factor <= 0:
            raise ValueError("rope theta and factor must be positive")

    def to_hf(self) -> dict[str, Any] | None:
        if self.rope_type == "default":
            return None
        out: dict[str, Any] = {"rope_type": self.rope_type, "factor": self.factor}
        if self.rope_type == "llama3":
            out.update(
                low_freq_factor=self.low_freq_factor,
                high_freq_factor=self.high_freq_factor,
                original_max_position_embeddings=self.original_max_position_embeddings,
            )
        return out


QK_MODES = ("fold", "rotate")


def ranks_per_head(ranks: int | tuple[int, ...], kv_heads: int) -> tuple[int, ...]:
    """One rank for every KV head, or one per KV head -> one per KV head."""
    return (ranks,) * kv_heads if isinstance(ranks, int) else tuple(ranks)


def _canonical(ranks: Any) -> int | tuple[int, ...]:
    """An int, or a tuple of per-KV-head ranks that differ (equal ones collapse to their int)."""
    if isinstance(ranks, (list, tuple)):
        ranks = tuple(int(r) for r in ranks)
        return ranks[0] if ranks and len(set(ranks)) == 1 else ranks
    return int(ranks)


@dataclass(frozen=True)
class LayerCompression:
    """One layer's compressed attention (ZeroC).

    Q/K, `mode` "fold": keep the RoPE frequency pairs listed per KV head (query heads use their
    KV head's pairs). `mode` "rotate": q and k keep all head_dim dims through RoPE, then each KV
    head's calibrated bases (weights `q_basis`, `k_basis`) map them to `rotate_rank` dims.
    V/O are folded to `v_rank` dimensions per KV head in both modes.
    Ranks may differ between a layer's KV heads (fold: heads keep different numbers of pairs;
    `rotate_rank`, `v_rank`: a tuple, one per KV head); see zeroc/head_ranks.py for how such a
    layer is cached and attended.
    """

    qk_pairs: tuple[tuple[int, ...], ...]  # fold: [kv_heads][qk_rank / 2] kept pair indices, ascending; rotate: ()
    v_rank: int | tuple[int, ...]
    mode: str = "fold"
    rotate_rank: int | tuple[int, ...] = 0  # rotate: Q/K width after the bases

    def __post_init__(self) -> None:
        object.__setattr__(self, "v_rank", _canonical(self.v_rank))
        object.__setattr__(self, "rotate_rank", _canonical(self.rotate_rank))

    def qk_ranks(self, kv_heads: int) -> tuple[int, ...]:
        """Q/K rank of each KV head (and of its query heads)."""
        if self.mode == "rotate":
            return ranks_per_head(self.rotate_rank, kv_heads)
        return tuple(2 * len(p) for p in self.qk_pairs)

    def v_ranks(self, kv_heads: int) -> tuple[int, ...]:
        return ranks_per_head(self.v_rank, kv_heads)

    @property
    def per_head(self) -> bool:
        """Whether the layer's KV heads keep different ranks."""
        if not isinstance(self.v_rank, int) or not isinstance(self.rotate_rank, int):
            return True
        return self.mode == "fold" and len({len(p) for p in self.qk_pairs}) > 1

    @property
    def qk_rank(self) -> int:
        """The Q/K rank of every KV head (ValueError for a layer with per-head ranks: see `qk_ranks`)."""
        if self.per_head:
            raise ValueError("this layer keeps per-KV-head ranks; read them with qk_ranks()/v_ranks()")
        return self.rotate_rank if self.mode == "rotate" else 2 * len(self.qk_pairs[0])

    def dropped_pairs(self, head_dim: int) -> tuple[tuple[int, ...], ...]:
        """Fold mode: per KV head the RoPE pairs not kept, ascending (what full-rank attention adds back)."""
        return tuple(tuple(sorted(set(range(head_dim // 2)) - set(p))) for p in self.qk_pairs)

    def to_dict(self) -> dict[str, Any]:
        as_json = lambda r: r if isinstance(r, int) else list(r)  # noqa: E731
        if self.mode == "rotate":
            return {"mode": "rotate", "qk_rank": as_json(self.rotate_rank), "v_rank": as_json(self.v_rank)}
        return {"qk_pairs": [list(p) for p in self.qk_pairs], "v_rank": as_json(self.v_rank)}

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "LayerCompression":
        if raw.get("mode", "fold") == "rotate":
            return cls((), raw["v_rank"], "rotate", raw["qk_rank"])
        return cls(tuple(tuple(int(i) for i in p) for p in raw["qk_pairs"]), raw["v_rank"],
                   str(raw.get("mode", "fold")))


def check_tier(sinks: int, recent: int) -> None:
    """Validate a token tier's sizes (ValueError naming the bad one)."""
    for name, value in (("sinks", sinks), ("recent", recent)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be a non-negative integer number of tokens (0 = off), got {value!r}")


@dataclass(frozen=True)
class AttentionCompression:
    """What a calibrated checkpoint records: per-layer ranks, the budget and a fingerprint."""

    layers: tuple[LayerCompression, ...]
    fingerprint: str  # hash of the source model + compression config: KV of different ones never mixes
    budget: float  # KV bytes as a fraction of the uncompressed cache (the tier's extra bytes not counted)
    method: str = "zeroc-fold"
    # Token tier (zeroc/tier.py): each query sees the first `sinks` tokens and its last `recent` tokens
    # at full rank, every other earlier token compressed. 0 and 0: no tier.
    sinks: int = 0
    recent: int = 0

    def __post_init__(self) -> None:
        check_tier(self.sinks, self.recent)

    @property
    def has_tier(self) -> bool:
        return self.sinks + self.recent > 0

    def to_hf(self) -> dict[str, Any]:
        tier = {"tier": {"sinks": self.sinks, "recent": self.recent}} if self.has_tier else {}
        return {"method": self.method, "budget": self.budget, "fingerprint": self.fingerprint,
                "layers": [layer.to_dict() for layer in self.layers], **tier}

    @classmethod
    def from_hf(cls, raw: dict[str, Any]) -> "AttentionCompression":
        layers = tuple(LayerCompression.from_dict(layer) for layer in raw["layers"])
        tier = raw.get("tier") or {}
        return cls(layers, str(raw["fingerprint"]), float(raw["budget"]), str(raw.get("method", "zeroc-fold")),
                   tier.get("sinks", 0), tier.get("recent", 0))


@dataclass(frozen=True)
class ModelConfig:
    """The architecture of a Llama-family model (names follow Hugging Face's config.json)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-5
    rope: RopeConfig = field(default_factory=RopeConfig)
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    dtype: str = "float32"
    compression: AttentionCompression | None = None

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}")
        parse_dtype(self.dtype)
        if self.compression is not None:
            self._check_compression(self.compression)

    def _check_compression(self, comp: AttentionCompression) -> None:
        if len(comp.layers) != self.num_hidden_layers:
            raise ValueError(f"compression lists {len(comp.layers)} layers, the model has {self.num_hidden_layers}")
        for i, layer in enumerate(comp.layers):
            if layer.mode not in QK_MODES:
                raise ValueError(f"compression layer {i}: mode must be one of {', '.join(QK_MODES)}, got {layer.mode!r}")
            kv, d = self.num_key_value_heads, self.head_dim
            if not isinstance(layer.v_rank, int) and len(layer.v_rank) != kv:
                raise ValueError(f"compression layer {i}: v_rank must be one rank or one per KV head ({kv})")
            if not all(0 < r <= d for r in layer.v_ranks(kv)):
                raise ValueError(f"compression layer {i}: v_rank must be in [1, {d}]")
            if layer.mode == "rotate":
                ranks = layer.qk_ranks(kv)
                if layer.qk_pairs or len(ranks) != kv or not all(0 < r <= d for r in ranks):
                    raise ValueError(f"compression layer {i}: rotate mode needs qk_rank in [1, {d}] (one, or one "
                                     "per KV head) and no qk_pairs")
                continue
            if len(layer.qk_pairs) != kv:
                raise ValueError(f"compression layer {i}: qk_pairs must list one entry per KV head")
            for p in layer.qk_pairs:
                if not p or list(p) != sorted(set(p)) or p[0] < 0 or p[-1] >= d // 2:
                    raise ValueError(f"compression layer {i}: every KV head must keep at least one RoPE pair, "
                                     f"indices ascending, unique and in [0, {d // 2})")

    def head_ranks(self, layer: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(Q/K rank, V rank) of each KV head of `layer` (head_dim each unless compressed)."""
        kv = self.num_key_value_heads
        if self.compression is None:
            return (self.head_dim,) * kv, (self.head_dim,) * kv
        comp = self.compression.layers[layer]
        return comp.qk_ranks(kv), comp.v_ranks(kv)

    def per_head_ranks(self, layer: int) -> bool:
        """Whether `layer`'s KV heads keep different ranks (zeroc/head_ranks.py)."""
        return self.compression is not None and self.compression.layers[layer].per_head

    def kv_geometry(self, layer: int) -> tuple[int, int, int]:
        """What the cache stores of one token in `layer`: (heads, key width, value width) per head. A layer
        with per-KV-head ranks stores one row of every head's dims side by side (zeroc/head_ranks.py)."""
        if self.per_head_ranks(layer):
            qk, v = self.head_ranks(layer)
            return 1, sum(qk), sum(v)
        return self.num_key_value_heads, self.qk_dim(layer), self.v_dim(layer)

    def qk_dim(self, layer: int) -> int:
        """Width of each query/key head in `layer` (head_dim unless compressed; ValueError if its heads differ)."""
        return self.compression.layers[layer].qk_rank if self.compression else self.head_dim

    def qk_mode(self, layer: int) -> str | None:
        """How `layer`'s Q/K are compressed: "fold", "rotate", or None if not compressed."""
        return self.compression.layers[layer].mode if self.compression else None

    def v_dim(self, layer: int) -> int:
        """Width of each value head in `layer` (head_dim unless compressed; ValueError if its heads differ)."""
        if self.compression is None:
            return self.head_dim
        comp = self.compression.layers[layer]
        if comp.per_head:
            raise ValueError(f"layer {layer} keeps per-KV-head ranks; read them with head_ranks()")
        return comp.v_rank

    @property
    def has_tier(self) -> bool:
        """Whether a full-rank token tier (sinks + recent window) is kept beside the compressed cache."""
        return self.compression is not None and self.compression.has_tier

    def tier_geometry(self, layer: int) -> tuple[int, int]:
        """(key, value) dims per cached head that a tiered layer adds for full-rank attention: the dropped
        RoPE pairs (fold) or the bases' complement columns (rotate), and the complement of the V/O basis."""
        heads, k, v = self.kv_geometry(layer)
        full = self.num_key_value_heads * self.head_dim // heads
        return full - k, full - v

    @property
    def group_size(self) -> int:
        """Query heads per KV head (GQA ratio)."""
        return self.num_attention_heads // self.num_key_value_heads

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        if self.eos_token_id is None:
            return ()
        if isinstance(self.eos_token_id, int):
            return (self.eos_token_id,)
        return tuple(self.eos_token_id)

    @classmethod
    def from_hf(cls, raw: dict[str, Any], source: str = "config.json") -> "ModelConfig":
        """Build from a parsed Hugging Face config.json; errors name `source` and the field."""
        archs = raw.get("architectures") or []
        model_type = raw.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES and not set(archs) & set(SUPPORTED_ARCHITECTURES):
            raise ConfigError(
                f"{source}: unsupported architecture (model_type={model_type!r}, architectures={archs}); "
                f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        if raw.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"{source}: field 'hidden_act' must be 'silu', got {raw['hidden_act']!r}")

        def need(name: str) -> Any:
            if name not in raw:
                raise ConfigError(f"{source}: missing required field {name!r}")
            return raw[name]

        heads = int(need("num_attention_heads"))
        hidden = int(need("hidden_size"))
        try:
            return cls(
                vocab_size=int(need("vocab_size")),
                hidden_size=hidden,
                intermediate_size=int(need("intermediate_size")),
                num_hidden_layers=int(need("num_hidden_layers")),
                num_attention_heads=heads,
                num_key_value_heads=int(raw.get("num_key_value_heads") or heads),
                head_dim=int(raw.get("head_dim") or hidden // heads),
                max_position_embeddings=int(raw.get("max_position_embeddings", 2048)),
                rms_norm_eps=float(raw.get("rms_norm_eps", 1e-5)),
                rope=_rope_from_hf(raw),
                tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
                attention_bias=bool(raw.get("attention_bias", False)),
                mlp_bias=bool(raw.get("mlp_bias", False)),
                bos_token_id=raw.get("bos_token_id"),
                eos_token_id=raw.get("eos_token_id"),
                dtype=str(raw.get("torch_dtype") or raw.get("dtype") or "float32").removeprefix("torch."),
                compression=(AttentionCompression.from_hf(raw["zeroc_compression"])
                             if raw.get("zeroc_compression") else None),
            )
        except (ValueError, TypeError, KeyError) as exc:
            raise ConfigError(f"{source}: {exc}") from exc

    def to_hf(self) -> dict[str, Any]:
        """The Hugging Face config.json dict for this architecture."""
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope.theta,
            "rope_scaling": self.rope.to_hf(),
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": self.attention_bias,
            "mlp_bias": self.mlp_bias,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "torch_dtype": self.dtype,
            **({"zeroc_compression": self.compression.to_hf()} if self.compression else {}),
        }


def _rope_from_hf(raw: dict[str, Any]) -> RopeConfig:
    # transformers >= 5 writes `rope_parameters`; older files write rope_theta + rope_scaling.
    params = dict(raw.get("rope_parameters") or {})
    scaling = dict(raw.get("rope_scaling") or {})
    merged = {**scaling, **params}
    theta = float(merged.get("rope_theta", raw.get("rope_theta", 10000.0)))
    rope_type = merged.get("rope_type", merged.get("type", "default"))
    kwargs: dict[str, Any] = {"theta": theta, "rope_type": rope_type}
    for key in ("factor", "low_freq_factor", "high_freq_factor"):
        if merged.get(key) is not None:
            kwargs[key] = float(merged[key])
    if merged.get("original_max_position_embeddings") is not None:
        kwargs["original_max_position_embeddings"] = int(merged["original_max_position_embeddings"])
    return RopeConfig(**kwargs)


@dataclass(frozen=True)
class CacheConfig:
    """The paged KV cache: block size in tokens and its capacity (blocks, or bytes), and the KV
    policy that decides what a block stores (zeroc/policies, docs/policies.md). The policy
    settings are checked where the policy is built (`zeroc.policies.make_policy`: the CLI
    at start-up, and every cache)."""

    block_size: int = 16
    num_blocks: int = 1024
    num_bytes: int = 0  # > 0: capacity in bytes instead; the blocks that fit depend on the policy
    kv_policy: str = "none"  # none | kivi-4 | kivi-2 | h2o | streamingllm | snapkv | palu | int8
    kv_budget: float = 1.0  # h2o, streamingllm, snapkv: tokens kept / tokens seen; palu: rank / head dim
    kv_max_tokens: int = 0  # h2o: at most this many tokens per sequence (0: no cap)
    kv_residual: int = 0  # kivi: full-precision tokens kept besides the filling block (a multiple of it)

    def __post_init__(self) -> None:
        if self.block_size <= 0 or self.num_blocks <= 0:
            raise ValueError(
                f"block_size and num_blocks must be positive, got {self.block_size} and {self.num_blocks}"
            )
        if self.num_bytes < 0:
            raise ValueError(f"cache bytes must be >= 0 (0: use num_blocks), got {self.num_bytes}")


@dataclass(frozen=True)
class SchedulerConfig:
    """Continuous batching limits for one engine step."""

    max_num_seqs: int = 64
    max_num_batched_tokens: int = 4096
    # Decode steps run eagerly instead of replaying CUDA graphs captured per batch-size bucket
    # (zeroc/decode_runner.py); graphs exist on CUDA only.
    enforce_eager: bool = False

    def __post_init__(self) -> None:
        if self.max_num_seqs <= 0 or self.max_num_batched_tokens <= 0:
            raise ValueError("max_num_seqs and max_num_batched_tokens must be positive")


@dataclass(frozen=True)
class ServerConfig:
    """One gRPC service process (prefill or decode): where it listens and how it sheds load."""

    host: str = "127.0.0.1"
    port: int = 50051  # 0 picks a free port (the service prints the one it bound)
    max_queue: int = 64  # requests accepted but not yet producing tokens; more get RESOURCE_EXHAUSTED
    grace_s: float = 10.0  # on SIGTERM, in-flight requests get this long to finish before cancellation
    keepalive_s: float = 30.0  # HTTP/2 keepalive ping interval
    max_message_mb: int = 16  # largest gRPC message accepted or sent
    workers: int = 128  # handler threads; each streaming request holds one while it runs

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        if self.max_queue < 0 or self.grace_s < 0 or self.keepalive_s <= 0:
            raise ValueError("max_queue and grace_s must be >= 0 and keepalive_s > 0")
        if self.max_message_mb <= 0 or self.workers <= 0:
            raise ValueError("max_message_mb and workers must be positive")


@dataclass(frozen=True)
class TransferConfig:
    """How a decode service gets prompt KV: from a prefill service, or computed locally (colocated)."""

    prefill_target: str = ""  # HOST:PORT of a prefill service; empty runs colocated
    chunk_bytes: int = 1 << 20  # payload bytes per KV chunk on the wire (the design asks ~1-4 MB)
    timeout_s: float = 120.0  # longest a prefill call may take when the client set no deadline
    # grpc: in-band chunks; nccl: NCCL between GPUs (CUDA IPC on a shared GPU), required;
    # auto: NCCL / CUDA IPC when both peers have GPUs, gRPC otherwise (zeroc/transport/capability.py)
    kv_transport: str = "auto"
    # While the prefill service is unavailable (down, restarting, queue full): "local" computes the
    # prompt on the decode service (it holds the model too); "fail" answers the prefill's status.
    prefill_fallback: str = "local"

    def __post_init__(self) -> None:
        if self.chunk_bytes < 1024 or self.timeout_s <= 0:
            raise ValueError("chunk_bytes must be >= 1024 and timeout_s positive")
        if self.prefill_fallback not in ("local", "fail"):
            raise ValueError(f"prefill_fallback must be local or fail, got {self.prefill_fallback!r}")
        if self.kv_transport not in ("grpc", "nccl", "auto"):
            raise ValueError(f"kv_transport must be grpc, nccl or auto, got {self.kv_transport!r}")


@dataclass(frozen=True)
class ParallelConfig:
    """Sequence-parallel prefill: a prefill service runs each prompt on `sp_ranks` gloo processes."""

    sp_ranks: int = 1  # 1: no sequence parallelism

    def __post_init__(self) -> None:
        if not 1 <= self.sp_ranks <= 64:
            raise ValueError(f"sp_ranks must be in [1, 64], got {self.sp_ranks}")


@dataclass(frozen=True)
class RedisConfig:
    """Where the KV store's block index lives (env ``ZEROC_REDIS_URL``, ``ZEROC_REDIS_TIMEOUT_S``...).

    `url`: empty starts an embedded redis-server private to the process (a service started alone
    still reuses its own prefixes); ``redis://``, ``rediss://`` (TLS) or ``unix://`` points at a
    shared server (``zeroc stack up`` starts one and passes its URL to every service);
    ``redis+sentinel://host:port[,host:port]/master`` asks Sentinel for the master; ``off`` turns
    prefix reuse off.
    """

    url: str = ""
    timeout_s: float = 0.5  # socket timeout of one index call; past it the store degrades (no reuse)
    retry_s: float = 1.0  # while degraded, how often the store pings Redis to reconnect

    def __post_init__(self) -> None:
        if self.timeout_s <= 0 or self.retry_s <= 0:
            raise ValueError("redis timeout_s and retry_s must be positive")
        if self.url not in ("", "off") and not self.url.startswith(
                ("redis://", "rediss://", "unix://", "redis+sentinel://")):
            raise ValueError(f"redis url {self.url!r} must start with redis://, rediss://, unix:// or "
                             "redis+sentinel:// (or be empty for an embedded server, or 'off')")


@dataclass(frozen=True)
class StoreConfig:
    """The KV store of one holder (a prefill or decode service): its local block pool and lease."""

    capacity_mb: int = 256  # block pool size; 0 turns prefix reuse off
    lease_s: float = 10.0  # index entries of a holder that stops renewing vanish within this
    advertise: str = ""  # HOST:PORT peers fetch blocks from; empty means the service's listen address
    namespace: str = "zeroc"  # prefix of every Redis key (one namespace per deployment)
    fetch_timeout_s: float = 10.0  # longest a peer fetch of a prompt's blocks may take
    # Bounded work per FetchBlocks call a holder serves: more ids is INVALID_ARGUMENT, more payload
    # (blocks x block bytes) RESOURCE_EXHAUSTED.
    max_fetch_blocks: int = 4096
    max_fetch_mb: int = 1024

    def __post_init__(self) -> None:
        if self.capacity_mb < 0 or self.lease_s <= 0 or self.fetch_timeout_s <= 0:
            raise ValueError("store capacity_mb must be >= 0, lease_s and fetch_timeout_s positive")
        if self.max_fetch_blocks < 1 or self.max_fetch_mb < 1:
            raise ValueError("store max_fetch_blocks and max_fetch_mb must be positive")
        if not self.namespace or any(c in self.namespace for c in "{}: "):
            raise ValueError(f"store namespace {self.namespace!r} must be non-empty without braces, colons or spaces")


@dataclass(frozen=True)
class SecurityConfig:
    """Secrets and isolation of one deployment (docs/security.md).

    `cluster_key` (or the file `cluster_key_file`) is the secret every service of a deployment shares:
    per-tenant block-id keys and the MACs on KV blocks derive from it. Empty: a random key private to
    the process (its prefix cache is shared with no other service). `share_prefixes = "on"` lets
    tenants share prefix blocks (an operator's opt-in: a tenant can then learn which prefixes others sent).
    """

    cluster_key: str = ""
    cluster_key_file: str = ""
    share_prefixes: str = "off"  # "on" | "off"
    default_tenant: str = "default"  # the tenant of requests that authenticate as nobody in particular
    tokens_file: str = ""  # bearer tokens of the public API ("TOKEN TENANT" lines); empty: no authentication
    # TLS (zeroc/tls.py): PEM files of the deployment's CA and this service's certificate and key. All
    # empty: plaintext, allowed on loopback only.
    tls_ca: str = ""
    tls_cert: str = ""
    tls_key: str = ""
    internal_port: int = 0  # with TLS, the mTLS port for internal RPCs (0 picks a free one)
    allow_plaintext: str = "loopback"  # "any": plaintext off loopback too (private networks, e.g. benchmarks)

    def __post_init__(self) -> None:
        if self.share_prefixes not in ("on", "off"):
            raise ValueError(f"security share_prefixes must be on or off, got {self.share_prefixes!r}")
        if not self.default_tenant:
            raise ValueError("security default_tenant must be non-empty")
        if self.allow_plaintext not in ("loopback", "any"):
            raise ValueError(f"security allow_plaintext must be loopback or any, got {self.allow_plaintext!r}")
        if not 0 <= self.internal_port <= 65535:
            raise ValueError(f"security internal_port must be in [0, 65535], got {self.internal_port}")


@dataclass(frozen=True)
class ZeroCConfig:
    """The root configuration: one typed sub-config per component.

    Every field has a ``ZEROC_<SECTION>_<FIELD>`` environment equivalent (for example
    ``ZEROC_CACHE_BLOCK_SIZE=32``), read by `from_env`.
    """

    model_dir: str = str(BUNDLED_MODEL)
    dtype: str = "float32"
    device: str = "cpu"  # where a service runs its model: cpu, cuda or cuda:N
    attention_backend: str = "auto"  # auto | torch | triton (triton on the CPU needs TRITON_INTERPRET=1)
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    transfer: TransferConfig = field(default_factory=TransferConfig)
    redis: RedisConfig = field(default_factory=RedisConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    security: SecurityConfig = field(default_factory=SecurityConfig)

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None, **overrides: Any) -> "ZeroCConfig":
        """Defaults, then ZEROC_* environment variables, then explicit non-None overrides.

        Sections are overridden with dicts, e.g. ``from_env(cache={"block_size": 32})``.
        """
        env = dict(os.environ) if env is None else env

        def pick(name: str, default: Any, override: Any) -> Any:
            if override is not None:
                return override
            raw = env.get(f"ZEROC_{name.upper()}")
            if raw is None:
                return default
            if isinstance(default, bool):  # bool("0") is True: read the usual spellings instead
                if raw.strip().lower() not in _BOOLS:
                    raise ValueError(f"ZEROC_{name.upper()}={raw!r}: expected one of {', '.join(sorted(_BOOLS))}")
                return _BOOLS[raw.strip().lower()]
            try:
                return type(default)(raw)
            except ValueError:
                raise ValueError(f"ZEROC_{name.upper()}={raw!r}: expected {type(default).__name__}") from None

        sections = {}
        for name, section_cls in _SECTIONS.items():
            given = overrides.pop(name, None) or {}
            sections[name] = section_cls(**{
                f.name: pick(f"{name}_{f.name}", f.default, given.get(f.name))
                for f in dataclasses.fields(section_cls)
            })
        top = {f.name: pick(f.name, f.default, overrides.get(f.name))
               for f in dataclasses.fields(cls) if f.name not in _SECTIONS}
        return cls(**top, **sections)

    def __post_init__(self) -> None:
        try:
            kind = torch.device(self.device).type
        except RuntimeError:
            kind = None
        if kind not in ("cpu", "cuda"):
            raise ValueError(f"device must be cpu, cuda or cuda:N, got {self.device!r}")
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(f"attention_backend must be one of {', '.join(ATTENTION_BACKENDS)}, "
                             f"got {self.attention_backend!r}")


_BOOLS = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False, "off": False}

_SECTIONS = {"cache": CacheConfig, "scheduler": SchedulerConfig, "server": ServerConfig,
             "transfer": TransferConfig, "redis": RedisConfig, "store": StoreConfig,
             "parallel": ParallelConfig, "security": SecurityConfig}
