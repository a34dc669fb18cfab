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


def load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for f in _weight_files(path):
        try:
            with safe_open(str(f), framework="pt") as handle:
                for key in handle.keys():
                    state[key] = handle.get_tensor(key)
        except Exception as exc:  # safetensors raises its own error types for corrupt files
            raise ConfigError(f"{f}: cannot read safetensors ({exc})") from exc
    return state


def load_model(model_dir: str | Path, dtype: str | torch.dtype | None = None,
               device: str | torch.device = "cpu", attention_backend: str = "auto") -> LoadedModel:
    """Load a Llama-family HF directory. Shape or name mismatches raise ConfigError naming both.
    `attention_backend` (zeroc_kernels.attention): how its paged forward attends on `device`."""
    path = Path(model_dir)
    cfg = read_config(path)
    torch_dtype = dtype if isinstance(dtype, torch.dtype) else parse_dtype(dtype or cfg.dtype)
    tokenizer = Tokenizer.from_dir(path)
    state = load_state_dict(path)
    with torch.device("meta"):
        model = Transformer(cfg)
    expected = model.state_dict()
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    state = {k: v for k, v in state.items() if not k.endswith("rotary_emb.inv_freq")}
    missing = sorted(set(expected) - set(state) - ({"lm_head.weight"} if cfg.tie_word_embeddings else set()))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ConfigError(
            f"{path}: weights do not match config.json (missing: {missing[:5]}, unexpected: {unexpected[:5]})"
        )
    for name, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise ConfigError(
                f"{path}: weight {name!r} has shape {tuple(tensor.shape)} but config.json implies "
                f"{tuple(expected[name].shape)}"
            )
    model = model.to_empty(device=device)
    model.load_state_dict({k: v.to(device=device, dtype=torch_dtype) for k, v in state.items()},
                          strict=False, assign=True)
    model.requires_grad_(False)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.init_rope()  # buffers are not in the checkpoint
    try:
        model.backend = select_backend(attention_backend, device)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    model.eval()
    return LoadedModel(model=model, config=cfg, tokenizer=tokenizer, path=path)


def save_model(model: Transformer, tokenizer: Tokenizer, out_dir: str | Path,
               storage_dtype: torch.dtype | None = None) -> Path:
    """Write `model` as a Hugging Face directory that transformers and `load_model` both read.

    `storage_dtype` (e.g. bfloat16, half the bytes) changes how weights are stored, not the
    config's `torch_dtype`, which stays the dtype the runtime computes in by default.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = model.config
    state = {k: v.detach().to(storage_dtype or v.dtype).contiguous() for k, v in model.state_dict().items()}
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    save_file(state, str(out / SINGLE_FILE), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(cfg.to_hf(), indent=2) + "\n")
    (out / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id}, indent=2) + "\n")
    tokenizer.save(out)
    return out
