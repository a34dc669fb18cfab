"""The runtime settings: one typed section per component under the root `ZeroCConfig`, each with a
``ZEROC_<SECTION>_<FIELD>`` environment equivalent. Plain data: no torch, nothing else from the project."""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from typing import Any

from zeroc.config.model import ATTENTION_BACKENDS, BUNDLED_MODEL, requested_dtype

# The byte budget of a KV cache given none: 1024 blocks of 16 tokens of the bundled model's full-precision KV
# (96 KiB a block). A model whose blocks take fewer bytes (a ZeroC model's low-rank K/V, a KV policy's stored
# form) gets more blocks, and so more tokens, from the same budget.
DEFAULT_CACHE_BYTES = 96 << 20
SCHEDULING_POLICIES = ("fcfs", "priority")  # SchedulerConfig.policy


@dataclass(frozen=True)
class CacheConfig:
    """The paged KV cache: block size in tokens and its capacity, and the KV policy that decides what a
    block stores (zeroc/policies, docs/policies.md). Capacity is a memory budget (like vLLM's KV cache
    space): `num_bytes`, else `memory_fraction` of the memory available at start-up, else
    DEFAULT_CACHE_BYTES; the blocks that fit depend on the model's KV geometry and the policy. `num_blocks`
    fixes the block count instead (tests, benchmarks that need an exact count); at most one of the three
    may be set. The policy settings are checked where the policy is built (`zeroc.policies.make_policy`:
    the CLI at start-up, and every cache)."""

    block_size: int = 16
    num_blocks: int = 0  # > 0: exactly this many blocks; 0: as many as the byte budget holds
    num_bytes: int = 0  # > 0: the cache's byte budget
    memory_fraction: float = 0.0  # in (0, 1): this fraction of the available memory is the byte budget
    kv_policy: str = "none"  # none | kivi-4 | kivi-2 | h2o | streamingllm | snapkv | palu | int8
    kv_budget: float = 1.0  # h2o, streamingllm, snapkv: tokens kept / tokens seen; palu: rank / head dim
    kv_max_tokens: int = 0  # h2o: at most this many tokens per sequence (0: no cap)
    kv_residual: int = 0  # kivi: full-precision tokens kept besides the filling block (a multiple of it)

    def __post_init__(self) -> None:
        if self.block_size <= 0:
            raise ValueError(f"block_size must be positive, got {self.block_size}")
        if self.num_blocks < 0:
            raise ValueError(f"num_blocks must be >= 0 (0: size the cache in bytes), got {self.num_blocks}")
        if self.num_bytes < 0:
            raise ValueError(f"cache bytes (num_bytes) must be >= 0 (0: the default budget), got {self.num_bytes}")
        if not 0.0 <= self.memory_fraction < 1.0:
            raise ValueError(f"memory_fraction must be in [0, 1) (0: off), got {self.memory_fraction}")
        chosen = [name for name, v in (("num_blocks", self.num_blocks), ("num_bytes", self.num_bytes),
                                       ("memory_fraction", self.memory_fraction)) if v]
        if len(chosen) > 1:
            raise ValueError(f"set one cache capacity, not {' and '.join(chosen)}: num_blocks (a block count), "
                             "num_bytes (a byte budget) or memory_fraction (of the available memory)")


@dataclass(frozen=True)
class SchedulerConfig:
    """Continuous batching limits for one engine step."""

    max_num_seqs: int = 64
    max_num_batched_tokens: int = 4096
    # Decode steps run eagerly instead of replaying CUDA graphs captured per batch-size bucket
    # (zeroc/decode_runner.py); graphs exist on CUDA only.
    enforce_eager: bool = False
    # Each layer's norm + MLP through torch.compile (zeroc.model.compile_feed_forward). Off by default: on this
    # project's 2-core CPU it made decode steps slower and only 256-token prompts faster (docs/engine.md).
    compile_layers: bool = False
    # Launch step n before step n-1's sampled ids reach the host, and do step n-1's host work (stop checks,
    # detokenization, streaming) while the device runs step n (zeroc/engine.py). On a GPU this takes the
    # host's time per step off the device's critical path (an H100 step: 7.38 -> 6.17 ms, docs/engine.md); on
    # the CPU, where ops run synchronously, it changes nothing but costs a discarded row for each sequence that
    # ends on a stop token. None (ZEROC_SCHEDULER_ASYNC_SCHEDULING=auto): on where the model runs on CUDA.
    async_scheduling: bool | None = None
    # Which waiting request runs first (vLLM's --scheduling-policy): "fcfs", in arrival order; or "priority", by
    # each request's `priority` (lower first, then arrival), where the request preempted when the cache is full is
    # the running one of the highest value (the newest among equals). Under "fcfs" a non-zero priority is refused.
    policy: str = "fcfs"
    # Speculative decoding by n-gram lookup (zeroc/speculative.py, vLLM's "ngram"): each step of an eligible request
    # checks up to this many drafted tokens, found where its last ngram_max..ngram_min tokens occurred before. 0: off.
    speculative_tokens: int = 0
    speculative_ngram_min: int = 2
    speculative_ngram_max: int = 4

    def __post_init__(self) -> None:
        if self.max_num_seqs <= 0 or self.max_num_batched_tokens <= 0:
            raise ValueError("max_num_seqs and max_num_batched_tokens must be positive")
        if self.speculative_tokens < 0 or not 1 <= self.speculative_ngram_min <= self.speculative_ngram_max:
            raise ValueError("speculative_tokens must be >= 0 and 1 <= speculative_ngram_min <= speculative_ngram_max")
        if self.policy not in SCHEDULING_POLICIES:
            raise ValueError(f"scheduler.policy must be one of {', '.join(SCHEDULING_POLICIES)}, got {self.policy!r}")


@dataclass(frozen=True)
class ThreadsConfig:
    """The engine thread's CPU threads (its PyTorch intra-op pool). On more than two cores the engine keeps
    off the first one, which the gRPC handler and scheduling threads then have to themselves."""

    engine: int = 0  # intra-op threads of the engine; 0: OMP_NUM_THREADS if set, else the engine's cores
    pin: bool = True  # on more than two cores, pin the engine thread (and its pool) to all cores but the first
    # How long an idle OpenMP worker spins before it sleeps (libgomp's GOMP_SPINCOUNT, which wins when set).
    # libgomp's own default spins for milliseconds after every op, taking the cores from the other process of a
    # stack (prefill and decode on the same cores); ops within a step follow each other within microseconds.
    spin_count: int = 10_000
    # Step by step, run the engine on its whole pool or on one thread, whichever the recent steps of that size
    # measured faster: one thread wins while other processes hold the cores (zeroc/cpu_threads.py).
    adaptive: bool = True

    def __post_init__(self) -> None:
        if self.engine < 0:
            raise ValueError(f"threads.engine must be >= 0 (0: automatic), got {self.engine}")
        if self.spin_count < 0:
            raise ValueError(f"threads.spin_count must be >= 0, got {self.spin_count}")


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
class KvStoreConfig:
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
    # How long a lookup may wait for blocks this holder is still storing, when it finds fewer than it asks for and
    # its writer is busy: a request that follows another with the same prompt (a request's `n` choices) then reads
    # them instead of computing the prompt again. 0: never waits.
    settle_ms: float = 50.0

    def __post_init__(self) -> None:
        if self.capacity_mb < 0 or self.lease_s <= 0 or self.fetch_timeout_s <= 0 or not self.settle_ms >= 0:
            raise ValueError("store capacity_mb and settle_ms must be >= 0, lease_s and fetch_timeout_s positive")
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
    # MACs on KV sent out of band (NCCL, CUDA IPC) cost a device-to-host copy and a CPU hash of every byte on
    # both sides (docs/security.md, "KV sent out of band"); "off" trusts the GPU fabric, the stream stays MACed.
    out_of_band_mac: str = "on"  # "on" | "off"; only with a cluster key

    def __post_init__(self) -> None:
        if self.share_prefixes not in ("on", "off"):
            raise ValueError(f"security share_prefixes must be on or off, got {self.share_prefixes!r}")
        if not self.default_tenant:
            raise ValueError("security default_tenant must be non-empty")
        if self.out_of_band_mac not in ("on", "off"):
            raise ValueError(f"security out_of_band_mac must be on or off, got {self.out_of_band_mac!r}")
        if self.allow_plaintext not in ("loopback", "any"):
            raise ValueError(f"security allow_plaintext must be loopback or any, got {self.allow_plaintext!r}")
        if not 0 <= self.internal_port <= 65535:
            raise ValueError(f"security internal_port must be in [0, 65535], got {self.internal_port}")


@dataclass(frozen=True)
class MetricsConfig:
    """The Prometheus endpoint of a service (docs/metrics.md): plain HTTP on its own port, beside gRPC."""

    port: int = 0  # GET http://HOST:PORT/metrics; 0 turns the endpoint off

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"metrics port must be in [0, 65535] (0: off), got {self.port}")


@dataclass(frozen=True)
class ZeroCConfig:
    """The root configuration: one typed sub-config per component.

    Every field has a ``ZEROC_<SECTION>_<FIELD>`` environment equivalent (for example
    ``ZEROC_CACHE_BLOCK_SIZE=32``), read by `from_env`.
    """

    model_dir: str = str(BUNDLED_MODEL)
    # What the weights and the KV cache compute in: "auto" is the checkpoint's torch_dtype (bfloat16 for most
    # Hugging Face Llamas; float32 for the bundled model), as vLLM's default does; or float32, bfloat16, float16.
    dtype: str = "auto"
    device: str = "cpu"  # where a service runs its model: cpu, cuda or cuda:N
    attention_backend: str = "auto"  # auto | torch | cpu | triton (triton on the CPU needs TRITON_INTERPRET=1)
    # The cpu backend's GEMMs on a oneDNN-packed copy of each fp32 or bf16 weight: faster, and batch-invariant at
    # the bundled model's shapes; the services then drop the plain weights, so each is held once, packed
    # (kernels/cpu_linear.py). False: oneDNN on the weights as they lie.
    pack_weights: bool = True
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    transfer: TransferConfig = field(default_factory=TransferConfig)
    redis: RedisConfig = field(default_factory=RedisConfig)
    store: KvStoreConfig = field(default_factory=KvStoreConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    security: SecurityConfig = field(default_factory=SecurityConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    threads: ThreadsConfig = field(default_factory=ThreadsConfig)

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
            if isinstance(default, bool) or name in _AUTO_BOOLS:  # bool("0") is True: read the usual spellings
                word = raw.strip().lower()
                if name in _AUTO_BOOLS and word == "auto":
                    return None
                if word not in _BOOLS:
                    choices = sorted(_BOOLS) + (["auto"] if name in _AUTO_BOOLS else [])
                    raise ValueError(f"ZEROC_{name.upper()}={raw!r}: expected one of {', '.join(choices)}")
                return _BOOLS[word]
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
        requested_dtype(self.dtype)  # ValueError naming the choices
        if not re.fullmatch(r"cpu|cuda(:\d+)?", self.device):
            raise ValueError(f"device must be cpu, cuda or cuda:N, got {self.device!r}")
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(f"attention_backend must be one of {', '.join(ATTENTION_BACKENDS)}, "
                             f"got {self.attention_backend!r}")


_BOOLS = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False, "off": False}
# Settings that are on, off, or None ("auto": decided where the value is used, e.g. by the device)
_AUTO_BOOLS = frozenset({"scheduler_async_scheduling"})

_SECTIONS = {"cache": CacheConfig, "scheduler": SchedulerConfig, "server": ServerConfig,
             "transfer": TransferConfig, "redis": RedisConfig, "store": KvStoreConfig,
             "parallel": ParallelConfig, "security": SecurityConfig, "metrics": MetricsConfig,
             "threads": ThreadsConfig}
