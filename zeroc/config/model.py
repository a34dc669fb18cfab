"""The model schema: the fields of a Hugging Face Llama-family ``config.json`` the runtime needs (`ModelConfig`,
`RopeConfig`) and ZeroC's compression layout (`AttentionCompression`, `LayerCompression`). Plain data: no torch."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from zeroc.config.errors import ConfigError

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
# "dynamic" (NTK) equals "default" up to max_position_embeddings, the longest sequence served; "yarn" also scales
# attention logits (its attention factor, folded into the softmax scale).
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "dynamic", "yarn")

# The model and texts that ship with the repository (found relative to this source tree).
REPO_ROOT = Path(__file__).resolve().parent.parent.parent
BUNDLED_MODEL = REPO_ROOT / "models" / "zeroc-tiny"
BUNDLED_HELDOUT = REPO_ROOT / "data" / "heldout.txt"
BUNDLED_CALIB = REPO_ROOT / "data" / "calib.txt"

# Weight and cache dtypes by name (zeroc.dtypes maps them to torch's), and how the paged forward runs attention
# (zeroc_kernels.attention.select_backend, whose registry names the same): auto = Triton on CUDA, the ragged C++
# kernel ("cpu") on the CPU where it builds, else torch; flex = triton with torch's FlexAttention for paged attention.
DTYPE_NAMES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16", "fp32": "float32",
               "bf16": "bfloat16", "fp16": "float16", "half": "float16"}
ATTENTION_BACKENDS = ("auto", "torch", "cpu", "triton", "flex")


def dtype_name(name: str) -> str:
    """The canonical name of a dtype name ("bf16", "torch.float16", ...); ValueError if unsupported."""
    key = str(name).removeprefix("torch.")
    if key not in DTYPE_NAMES:
        raise ValueError(f"unsupported dtype {name!r}; choose one of float32, bfloat16, float16")
    return DTYPE_NAMES[key]


def requested_dtype(name: str) -> str:
    """A dtype a user asks for: "auto" (decided where the model is loaded: the checkpoint's, or the device's) or a
    canonical dtype name; ValueError naming the choices."""
    if name == "auto":
        return name
    try:
        return dtype_name(name)
    except ValueError:
        raise ValueError(f"dtype must be auto, float32, bfloat16 or float16, got {name!r}") from None


@dataclass(frozen=True)
class RopeConfig:
    """RoPE frequencies: theta plus an optional Hugging Face ``rope_scaling`` block."""

    theta: float = 10000.0
    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192
    # yarn (as transformers computes it): None -> derived from factor (and mscale, mscale_all_dim)
    attention_factor: float | None = None
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    truncate: bool = True

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
        if self.rope_type == "yarn":
            out.update(original_max_position_embeddings=self.original_max_position_embeddings,
                       beta_fast=self.beta_fast, beta_slow=self.beta_slow, truncate=self.truncate,
                       **{k: getattr(self, k) for k in ("attention_factor", "mscale", "mscale_all_dim")
                          if getattr(self, k) is not None})
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
    attention_bias: bool = False  # q, k, v and o projections (Llama's attention_bias)
    qkv_bias: bool = False  # q, k, v projections only (Qwen2)
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
        dtype_name(self.dtype)
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
        if raw.get("use_sliding_window"):
            raise ConfigError(f"{source}: field 'use_sliding_window' must be false (sliding-window attention is not "
                              "supported)")
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
                qkv_bias=model_type == "qwen2" or "Qwen2ForCausalLM" in archs,
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
        qwen2 = self.qkv_bias and not self.attention_bias  # Qwen2's q/k/v bias has no Llama spelling
        return {
            "architectures": ["Qwen2ForCausalLM" if qwen2 else "LlamaForCausalLM"],
            "model_type": "qwen2" if qwen2 else "llama",
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
    for key in ("factor", "low_freq_factor", "high_freq_factor", "attention_factor", "beta_fast", "beta_slow",
                "mscale", "mscale_all_dim"):
        if merged.get(key) is not None:
            kwargs[key] = float(merged[key])
    if merged.get("truncate") is not None:
        kwargs["truncate"] = bool(merged["truncate"])
    original = merged.get("original_max_position_embeddings")
    if original is None and rope_type == "yarn":  # transformers' default: the model's own context
        original = raw.get("max_position_embeddings", 2048)
    if original is not None:
        kwargs["original_max_position_embeddings"] = int(original)
    return RopeConfig(**kwargs)
