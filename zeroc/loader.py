"""Read and write Hugging Face model directories (config.json, safetensors, tokenizer.json)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from zeroc.config import ConfigError, ModelConfig
from zeroc.dtypes import parse_dtype
from zeroc.model import Transformer
from zeroc.tokenizer import Tokenizer
from zeroc_kernels.attention import select_backend

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


@dataclass
class LoadedModel:
    """A model ready to run: weights in eval mode, its config, tokenizer and source directory."""

    model: Transformer
    config: ModelConfig
    tokenizer: Tokenizer
    path: Path


def read_config(model_dir: str | Path) -> ModelConfig:
    path = Path(model_dir)
    if not path.is_dir():
        raise ConfigError(f"{path}: model directory not found")
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise ConfigError(f"{cfg_file}: file not found")
    try:
        raw = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{cfg_file}: not valid JSON ({exc})") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{cfg_file}: expected a JSON object")
    return ModelConfig.from_hf(raw, source=str(cfg_file))


def _weight_files(path: Path) -> list[Path]:
    if (path / SINGLE_FILE).is_file():
        return [path / SINGLE_FILE]
    index = path / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ConfigError(f"{index}: missing or invalid field 'weight_map'") from exc
        files = sorted({path / name for name in weight_map.values()})
        for f in files:
            if not f.is_file():
                raise ConfigError(f"{index}: names shard {f.name}, which is missing")
        return files
    raise ConfigError(f"{path}: no {SINGLE_FILE} or {INDEX_FILE} found")


def _stream(path: Path, convert):
    """(name, convert(name, tensor)) for every tensor, shard by shard, one tensor read at a time: safe_open maps
    the shard lazily, so host memory holds at most that shard's mapped pages and the tensor being converted."""
    for f in _weight_files(path):
        try:
            handle = safe_open(str(f), framework="pt")
        except Exception as exc:  # safetensors raises its own error types for corrupt files
            raise ConfigError(f"{f}: cannot read safetensors ({exc})") from exc
        with handle:
            for key in handle.keys():
                try:
                    tensor = handle.get_tensor(key)
                except Exception as exc:
                    raise ConfigError(f"{f}: cannot read tensor {key!r} ({exc})") from exc
                yield key, convert(key, tensor)
                del tensor


def _checkpoint_names(path: Path) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor, from the shards' headers only (no data read)."""
    shapes = {}
    for f in _weight_files(path):
        try:
            with safe_open(str(f), framework="pt") as handle:
                for key in handle.keys():
                    shapes[key] = tuple(handle.get_slice(key).get_shape())
        except Exception as exc:
            raise ConfigError(f"{f}: cannot read safetensors ({exc})") from exc
    return shapes


def _check_names(path: Path, cfg: ModelConfig, found: dict[str, tuple[int, ...]],
                 expected: dict[str, tuple[int, ...]]) -> set[str]:
    """The checkpoint's names that the model takes; ConfigError naming what is missing, unexpected or misshapen."""
    skip = {k for k in found if k.endswith("rotary_emb.inv_freq")}
    if cfg.tie_word_embeddings:
        skip.add("lm_head.weight")
    names = set(found) - skip
    missing = sorted(set(expected) - names - ({"lm_head.weight"} if cfg.tie_word_embeddings else set()))
    unexpected = sorted(names - set(expected))
    if missing or unexpected:
        raise ConfigError(
            f"{path}: weights do not match config.json (missing: {missing[:5]}, unexpected: {unexpected[:5]})"
        )
    for name in sorted(names):
        if found[name] != expected[name]:
            raise ConfigError(f"{path}: weight {name!r} has shape {found[name]} but config.json implies "
                              f"{expected[name]}")
    return names


def _assign(model: torch.nn.Module, name: str, tensor: torch.Tensor) -> None:
    module_name, _, attr = name.rpartition(".")
    setattr(model.get_submodule(module_name), attr, torch.nn.Parameter(tensor, requires_grad=False))


def load_model(model_dir: str | Path, dtype: str | torch.dtype | None = None,
               device: str | torch.device = "cpu", attention_backend: str = "auto",
               pack_weights: bool = True) -> LoadedModel:
    """Load a Llama, Mistral or Qwen2 HF directory, streaming: the model is built on the meta device and each
    checkpoint tensor goes straight to `device` and `dtype` as it is read, so peak host memory is about one
    shard, not the model (plus the model itself when `device` is the CPU). `dtype` None or "auto": the checkpoint's
    torch_dtype. Shape or name mismatches raise ConfigError naming both. `attention_backend`
    (zeroc_kernels.attention): how its paged forward attends; `pack_weights`: whether the cpu backend runs its GEMMs
    on packed copies of the weights."""
    path = Path(model_dir)
    cfg = read_config(path)
    torch_dtype = dtype if isinstance(dtype, torch.dtype) else parse_dtype(cfg.dtype if dtype in (None, "auto")
                                                                            else dtype)
    tokenizer = Tokenizer.from_dir(path)
    with torch.device("meta"):
        model = Transformer(cfg)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    wanted = _check_names(path, cfg, _checkpoint_names(path), expected)
    to_device = lambda name, t: t.to(device=device, dtype=torch_dtype) if name in wanted else None  # noqa: E731
    for name, tensor in _stream(path, to_device):
        if tensor is not None:
            _assign(model, name, tensor)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.requires_grad_(False)
    model.init_rope()  # buffers are not in the checkpoint
    try:
        model.backend = select_backend(attention_backend, device, pack_weights=pack_weights)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    model.eval()
    return LoadedModel(model=model, config=cfg, tokenizer=tokenizer, path=path)


def _own_storage(t: torch.Tensor) -> torch.Tensor:
    """t, copied where it is a view into a larger storage (a fused model's projections, zeroc/fused_linears.py):
    safetensors writes no tensors that share memory."""
    return t.contiguous() if t.untyped_storage().nbytes() == t.numel() * t.element_size() else t.clone()


def save_model(model: Transformer, tokenizer: Tokenizer, out_dir: str | Path,
               storage_dtype: torch.dtype | None = None) -> Path:
    """Write `model` as a Hugging Face directory that transformers and `load_model` both read.

    `storage_dtype` (e.g. bfloat16, half the bytes) changes how weights are stored, not the
    config's `torch_dtype`, which stays the dtype the runtime computes in by default.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = model.config
    state = {k: _own_storage(v.detach().to(storage_dtype or v.dtype)) for k, v in model.state_dict().items()}
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    save_file(state, str(out / SINGLE_FILE), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(cfg.to_hf(), indent=2) + "\n")
    (out / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id}, indent=2) + "\n")
    tokenizer.save(out)
    return out
