"""Responses kept for `previous_response_id` and `/v1/responses/{id}` (zeroc/gateway/responses.py).

In the gateway process's memory, at most `capacity_bytes` of JSON, the least recently used dropped first, as vLLM's
in-memory store: several gateway replicas do not share it, so a conversation continued by id needs the replica
that answered it (sticky routing), and a restart forgets every response. Each response is visible only to the key
that made it: entries are filed under a hash of the caller's bearer token ("" without one, where every caller is
one tenant, as the decode services' prefix caches are), and response ids are 128 random bits.
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from dataclasses import dataclass


def owner_of(token: str) -> str:
    """The key a caller's responses are filed under: its token's hash (the raw token is never kept)."""
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True)
class Stored:
    response: dict  # the whole Response, as answered
    history: list[dict]  # the conversation's input items that led to it: earlier turns' and its own request's


class ResponseStore:
    def __init__(self, capacity_bytes: int):
        self.capacity = capacity_bytes
        self.used = 0
        self._entries: OrderedDict[tuple[str, str], tuple[Stored, int]] = OrderedDict()  # oldest use first

    def put(self, owner: str, response: dict, history: list[dict]) -> bool:
        """Keep a response; False (nothing kept) where it alone is over the capacity."""
        size = len(json.dumps(response, separators=(",", ":"))) + len(json.dumps(history, separators=(",", ":")))
        if size > self.capacity:
            return False
        self.delete(owner, response["id"])
        self._entries[(owner, response["id"])] = (Stored(response, history), size)
        self.used += size
        while self.used > self.capacity:
            _, (_, dropped) = self._entries.popitem(last=False)
            self.used -= dropped
        return True

    def get(self, owner: str, response_id: str) -> Stored | None:
        entry = self._entries.get((owner, response_id))
        if entry is None:
            return None
        self._entries.move_to_end((owner, response_id))
        return entry[0]

    def delete(self, owner: str, response_id: str) -> bool:
        entry = self._entries.pop((owner, response_id), None)
        if entry is not None:
            self.used -= entry[1]
        return entry is not None
