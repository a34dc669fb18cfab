"""Block ids: chained over full blocks, seeded with everything that changes the KV."""

from __future__ import annotations

import dataclasses

from kv_store.hashing import block_ids, store_seed
from zeroc.config import AttentionCompression, LayerCompression


def test_ids_cover_full_blocks_only_and_name_the_whole_prefix():
    tokens = list(range(100, 150))  # 3 full blocks of 16 and 2 tokens
    ids = block_ids(tokens, 16, "seed")
    assert len(ids) == 3 and len(set(ids)) == 3 and all(len(i) == 32 for i in ids)
    assert block_ids(tokens[:48], 16, "seed") == ids  # the partial tail changes nothing
    # A change in block 0 changes every later id (chained); a change in block 2 only block 2's.
    early = block_ids([7] + tokens[1:], 16, "seed")
    assert all(a != b for a, b in zip(early, ids))
    late = block_ids(tokens[:40] + [7] + tokens[41:], 16, "seed")
    assert late[:2] == ids[:2] and late[2] != ids[2]
    # The same 16 tokens after a different prefix are a different block.
    assert block_ids(tokens[16:32], 16, "seed")[0] != ids[1]


def test_seed_separates_models_calibrations_dtypes_and_block_sizes(bundled):
    cfg = bundled.config
    tokens = list(range(64))

    def ids(config=cfg, fingerprint="abc", dtype="float32", block_size=16):
        return block_ids(tokens, block_size, store_seed(fingerprint, config, dtype, block_size))[0]

    def compressed(fp):
        layer = LayerCompression(tuple(tuple(range(16)) for _ in range(cfg.num_key_value_heads)), 32)
        return dataclasses.replace(cfg, compression=AttentionCompression((layer,) * cfg.num_hidden_layers, fp, 0.5))

    variants = [ids(), ids(fingerprint="abd"), ids(dtype="bfloat16"), ids(block_size=32),
                ids(config=compressed("calib-1")), ids(config=compressed("calib-2"))]
    assert len(set(variants)) == len(variants)
    assert ids() == ids()  # and it is deterministic
