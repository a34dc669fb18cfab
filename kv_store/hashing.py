"""Block identity: a chained hash over each full block of token ids.

Block i's id hashes block i-1's id together with block i's tokens, so an id names a whole
prefix, not just 16 tokens. The chain is seeded with everything that changes the KV a block
holds (model and compression fingerprint, KV dtype, block size): KV from another model, another
calibration or another precision gets other ids and never mixes.

Published ids are keyed: id = HMAC-SHA256(tenant key, chained hash), cut to 16 bytes. Without the
tenant's key (zeroc.security.TenantKeys) an id can neither be computed from a guessed text nor
matched across tenants, so neither the index nor FetchBlocks tells anyone which prompts others sent.
"""

from __future__ import annotations

import hashlib
import hmac
import struct

from zeroc.config import ModelConfig


def store_seed(model_fingerprint: str, config: ModelConfig, dtype: str, block_size: int) -> str:
    """The chain's seed for one served model. `model_fingerprint` hashes config and weights; the
    compression fingerprint is named explicitly so two calibrations can never share a seed."""
    compression = config.compression.fingerprint if config.compression else "uncompressed"
    return f"{model_fingerprint}/{compression}/{dtype}/{block_size}"


def block_ids(token_ids: list[int], block_size: int, seed: str, key: bytes | None = None) -> list[str]:
    """Ids (32 hex chars) of every full block of `token_ids`; a trailing partial block has none.
    With `key` (a tenant's secret) each id is HMAC-SHA256(key, chained hash); without, the hash itself."""
    prev = hashlib.blake2b(f"zeroc-kv-block:{seed}".encode(), digest_size=16).digest()
    out = []
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        block = struct.pack(f"<{block_size}I", *token_ids[start:start + block_size])
        prev = hashlib.blake2b(prev + block, digest_size=16).digest()
        out.append(prev.hex() if key is None else hmac.new(key, prev, hashlib.sha256).digest()[:16].hex())
    return out
