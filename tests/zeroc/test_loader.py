"""Loading Hugging Face directories: sharded weights, dtypes, and clear errors for bad input."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from zeroc.config import ConfigError
from zeroc.loader import load_model


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_sharded_checkpoint_loads_the_same_weights(random_gqa, random_gqa_dir, tmp_path):
    d = _copy(random_gqa_dir, tmp_path / "sharded")
    state = load_file(str(d / "model.safetensors"))
    (d / "model.safetensors").unlink()
    names = sorted(state)
    half = len(names) // 2
    shards = {"model-00001-of-00002.safetensors": names[:half], "model-00002-of-00002.safetensors": names[half:]}
    for shard, keys in shards.items():
        save_file({k: state[k] for k in keys}, str(d / shard))
    weight_map = {k: shard for shard, keys in shards.items() for k in keys}
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    loaded = load_model(d)
    tokens = torch.randint(0, loaded.config.vocab_size, (1, 20))
    with torch.no_grad():
        assert torch.equal(loaded.model(tokens), random_gqa.model(tokens))


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_loads_and_runs(random_gqa_dir, random_gqa, dtype):
    loaded = load_model(random_gqa_dir, dtype=dtype)
    assert next(loaded.model.parameters()).dtype == getattr(torch, dtype)
    tokens = torch.randint(0, loaded.config.vocab_size, (1, 16))
    with torch.no_grad():
        low = loaded.model(tokens).float()
        ref = random_gqa.model(tokens)
    assert torch.isfinite(low).all()
    assert (low - ref).abs().max() < 0.1 * ref.abs().max()


@pytest.mark.parametrize("torch_dtype", ["bfloat16", "float32"])
def test_auto_dtype_is_the_checkpoints_from_the_config_the_flag_or_the_environment(random_gqa_dir, tmp_path,
                                                                                   monkeypatch, torch_dtype):
    """The default, like vLLM's: a checkpoint saying bfloat16 computes in bfloat16 (not in float32, at twice the
    memory); --dtype or ZEROC_DTYPE still choose."""
    import argparse

    from zeroc.cli.common import load, model_args
    from zeroc.config import ZeroCConfig

    d = _copy(random_gqa_dir, tmp_path / "m")
    _edit_config(d, torch_dtype=torch_dtype)
    p = argparse.ArgumentParser()
    model_args(p)
    for argv, env, want in (([], {}, torch_dtype), (["--dtype", "auto"], {}, torch_dtype),
                            ([], {"ZEROC_DTYPE": "float16"}, "float16"), (["--dtype", "float32"], {}, "float32")):
        monkeypatch.delenv("ZEROC_DTYPE", raising=False)
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        loaded, cfg = load(p.parse_args(["--model", str(d), "--attention-backend", "torch", *argv]))
        assert next(loaded.model.parameters()).dtype == getattr(torch, want), (argv, env)
    assert ZeroCConfig().dtype == "auto"
    assert next(load_model(d, dtype="auto").model.parameters()).dtype == getattr(torch, torch_dtype)
    with pytest.raises(ValueError, match="dtype must be auto, float32, bfloat16 or float16, got 'int4'"):
        ZeroCConfig.from_env(env={"ZEROC_DTYPE": "int4"})


def _edit_config(d, **changes):
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(changes)
    (d / "config.json").write_text(json.dumps(cfg))


def test_missing_directory_and_files(tmp_path, random_gqa_dir):
    with pytest.raises(ConfigError, match="nowhere: model directory not found"):
        load_model(tmp_path / "nowhere")
    d = _copy(random_gqa_dir, tmp_path / "nocfg")
    (d / "config.json").unlink()
    with pytest.raises(ConfigError, match="config.json: file not found"):
        load_model(d)
    d = _copy(random_gqa_dir, tmp_path / "noweights")
    (d / "model.safetensors").unlink()
    with pytest.raises(ConfigError, match="no model.safetensors"):
        load_model(d)


@pytest.mark.parametrize("changes, message", [
    ({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}, "unsupported architecture"),
    ({"hidden_act": "gelu"}, "'hidden_act'"),
    ({"intermediate_size": 100}, r"mlp\..*has shape .* implies"),
    ({"rope_scaling": {"rope_type": "longrope", "factor": 2.0}}, "rope type 'longrope'"),
    ({"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "use_sliding_window": True}, "'use_sliding_window'"),
    ({"num_key_value_heads": 3}, "num_key_value_heads"),
])
def test_config_problems_name_file_and_field(tmp_path, random_gqa_dir, changes, message):
    d = _copy(random_gqa_dir, tmp_path / "bad")
    _edit_config(d, **changes)
    with pytest.raises(ConfigError, match=message) as info:
        load_model(d)
    assert str(d) in str(info.value)


def test_missing_required_field(tmp_path, random_gqa_dir):
    d = _copy(random_gqa_dir, tmp_path / "nofield")
    cfg = json.loads((d / "config.json").read_text())
    del cfg["hidden_size"]
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="missing required field 'hidden_size'"):
        load_model(d)


@pytest.mark.parametrize("argv, env, packs", [
    ([], {}, True),  # the default: packed oneDNN copies
    (["--no-pack-weights"], {}, False),
    ([], {"ZEROC_PACK_WEIGHTS": "0"}, False),
    ([], {"ZEROC_PACK_WEIGHTS": "yes"}, True),
])
def test_pack_weights_reaches_the_cpu_backend_from_the_flag_or_the_environment(random_gqa_dir, cpu_kernel,
                                                                               monkeypatch, argv, env, packs):
    import argparse

    from zeroc.cli.common import load, model_args
    from zeroc.layers import Linear

    for name, value in env.items():
        monkeypatch.setenv(name, value)
    p = argparse.ArgumentParser()
    model_args(p)
    loaded, cfg = load(p.parse_args(["--model", str(random_gqa_dir), "--attention-backend", "cpu", *argv]))
    assert cfg.pack_weights is packs and loaded.model.backend.pack_weights is packs
    with torch.inference_mode():
        logits = loaded.model(torch.tensor([[5, 9, 13]]))
    assert torch.isfinite(logits).all()
    linears = [m for m in loaded.model.modules() if isinstance(m, Linear)]
    assert all((lin.pack.packed is not None) is packs for lin in linears)  # off: the slots stay empty


def test_a_bad_pack_weights_setting_is_a_clear_error(monkeypatch):
    from zeroc.config import ZeroCConfig

    with pytest.raises(ValueError, match="ZEROC_PACK_WEIGHTS='maybe'"):
        ZeroCConfig.from_env(env={"ZEROC_PACK_WEIGHTS": "maybe"})
