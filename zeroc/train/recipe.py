"""The long-context training recipe: which Debian documentation packages feed it, and the model it trains.

Every corpus is openly licensed documentation text shipped by Debian 12 (bookworm); nothing is
downloaded from elsewhere and no corpus is committed. tools/fetch_train_corpus.sh unpacks the
packages below (`apt-get download` + `dpkg -x`, no root install needed) into one directory; the
python3.11-doc sources stay the main corpus (held-out and calibration texts are carved from it, as
for the bundled model), the others are added to the training split only. docs/data.md states the
recipe and the licenses.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DocPackage:
    package: str  # Debian package name
    path: str  # the text sources inside the unpacked package
    license: str  # SPDX id of the package's main licence (debian/copyright, Files: *)
    role: str  # "main" (split into train / held-out / calibration) or "extra" (training only)


PACKAGES = (
    DocPackage("python3.11-doc", "usr/share/doc/python3.11/html/_sources", "PSF-2.0", "main"),
    DocPackage("sphinx-doc", "usr/share/doc/sphinx-doc/html/_sources", "BSD-2-Clause", "extra"),
    DocPackage("git-doc", "usr/share/doc/git-doc", "GPL-2.0-only", "extra"),
    DocPackage("developers-reference", "usr/share/developers-reference/_sources", "GPL-2.0-or-later", "extra"),
    DocPackage("python-requests-doc", "usr/share/doc/python-requests-doc/html/_sources", "Apache-2.0", "extra"),
)

# The model the recipe trains: Llama with GQA (4 KV heads, head_dim 64), positions to 4,096, a quarter of its
# sequences synthetic long-range tasks (`zeroc.train.synthetic`). "longctx-cpu" (about 23M parameters, trained
# at 2,048 tokens) fits a CPU session; "longctx" (about 47M, trained at 4,096) is for a GPU: the largest whose
# bf16 weights stay under the repository's 100 MB (a 100M model would take 200 MB).
_COMMON = dict(vocab_size=8192, num_kv_heads=4, head_dim=64, max_position_embeddings=4096, rope_theta=100000.0,
               synthetic_fraction=0.25, weight_decay=0.1)
PRESETS: dict[str, dict] = {
    "longctx-cpu": dict(_COMMON, hidden_size=512, intermediate_size=1536, num_layers=6, num_heads=8, seq_len=2048,
                        batch_size=2, lr=1.5e-3, warmup_steps=30),
    "longctx": dict(_COMMON, hidden_size=768, intermediate_size=1536, num_layers=8, num_heads=12, seq_len=4096,
                    batch_size=16, lr=1e-3, warmup_steps=200),
    # The shared 2-vCPU session's run (docs/data.md, "Warm start on the CPU"): continue the bundled 12.6M model
    # (its tokenizer, 1,024-token training) on the recipe's text with mostly synthetic sequences, short ones
    # first, the answers' tokens weighted 5x; a 2,048-token step of 1 row, shorter stages fill it with more rows.
    # 34 minutes (410 steps) did not reach retrieval: a starting point for a longer run, not a finished recipe.
    "longctx-warm": dict(init_from="models/zeroc-tiny", seq_len=2048, batch_size=1, synthetic_fraction=0.9,
                         curriculum=((0.0, 128), (0.35, 256), (0.55, 512), (0.7, 1024), (0.85, 2048)),
                         answer_weight=5.0, lr=1.5e-3, warmup_steps=10, minutes=34.0, weight_decay=0.1,
                         checkpoint_minutes=8.0),
}


def extra_corpora(root: str) -> tuple[str, ...]:
    """The training-only corpora of `PACKAGES` under `root`, where tools/fetch_train_corpus.sh unpacked them."""
    return tuple(f"{root.rstrip('/')}/{p.path}" for p in PACKAGES if p.role == "extra")


def main_corpus(root: str) -> str:
    return next(f"{root.rstrip('/')}/{p.path}" for p in PACKAGES if p.role == "main")
