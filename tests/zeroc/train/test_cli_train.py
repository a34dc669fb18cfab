"""`zeroc train --recipe`: the preset's fields, flags over them, and the recipe's training-only corpora."""

from __future__ import annotations

import pytest

from zeroc.cli import build_parser
from zeroc.cli.train import train_config
from zeroc.train.recipe import PACKAGES, PRESETS


def test_recipe_flags_override_the_preset_and_add_the_extra_corpora():
    args = build_parser().parse_args(["train", "--recipe", "longctx", "--corpus-root", "/c", "--seq-len", "1024",
                                      "--device", "cuda"])
    cfg = train_config(args)
    assert cfg.seq_len == 1024 and cfg.device == "cuda"  # flags win
    assert (cfg.num_kv_heads, cfg.head_dim, cfg.max_position_embeddings) == (4, 64, 4096)  # the preset's
    assert cfg.synthetic_fraction == PRESETS["longctx"]["synthetic_fraction"] > 0
    extras = [p for p in PACKAGES if p.role == "extra"]
    assert cfg.extra_corpora == tuple(f"/c/{p.path}" for p in extras)
    assert all(p.license for p in PACKAGES)


def test_without_a_recipe_the_bundled_models_settings_hold():
    cfg = train_config(build_parser().parse_args(["train"]))
    assert (cfg.seq_len, cfg.batch_size, cfg.minutes, cfg.synthetic_fraction, cfg.extra_corpora) == (1024, 4, 55.0,
                                                                                                      0.0, ())
    assert (cfg.hidden_size, cfg.num_layers, cfg.num_kv_heads) == (384, 6, 2)


def test_warm_start_recipe_and_curriculum_flags():
    cfg = train_config(build_parser().parse_args(["train", "--recipe", "longctx-warm", "--init-from", "/m",
                                                  "--answer-weight", "2", "--curriculum", "0:128,0.5:1024"]))
    assert (cfg.init_from, cfg.answer_weight, cfg.curriculum) == ("/m", 2.0, ((0.0, 128), (0.5, 1024)))
    assert train_config(build_parser().parse_args(["train", "--recipe", "longctx-warm"])).curriculum[-1] == (0.85, 2048)
    assert train_config(build_parser().parse_args(["train", "--recipe", "longctx-warm", "--curriculum", ""])
                        ).curriculum == ()
    with pytest.raises(ValueError, match="curriculum"):
        train_config(build_parser().parse_args(["train", "--curriculum", "0-128"]))


def test_kind_weights_flag_names_kinds_and_rejects_unknown_ones():
    from zeroc.train.synthetic import KINDS

    cfg = train_config(build_parser().parse_args(["train", "--kind-weights", "repeat=3,kv=0.5"]))
    assert cfg.kind_weights == tuple({"repeat": 3.0, "kv": 0.5}.get(k, 1.0) for k in KINDS)
    assert train_config(build_parser().parse_args(["train", "--kind-weights", ""])).kind_weights == ()
    for bad, match in (("needle=2", "unknown synthetic kinds"), ("repeat:3", "kind weights"),
                       ("repeat=-1", "kind weights")):
        with pytest.raises(ValueError, match=match):
            train_config(build_parser().parse_args(["train", "--kind-weights", bad]))
