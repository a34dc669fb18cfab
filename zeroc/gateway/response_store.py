"""Responses kept for `previous_response_id` and `/v1/responses/{id}` (zeroc/gateway/responses.py).

In the gateway process's memory, at most `capacity_bytes` of JSON held as bytes (so what is counted is what is
held, not a fraction of the dicts it would parse into), the least recently used dropped first, as vLLM's
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
        self._entries: OrderedDict[tuple[str, str], bytes] = OrderedDict()  # oldest use first

    def put(self, owner: str, response: dict, history: list[dict]) -> bool:
        """Keep a response; False (nothing kept) where it alone is over the capacity."""
        blob = json.dumps({"response": response, "history": history}, separators=(",", ":")).encode()
        if len(blob) > self.capacity:
            return False
        self.delete(owner, response["id"])
        self._entries[(owner, response["id"])] = blob
        self.used += len(blob)
        while self.used > self.capacity:
            _, dropped = self._entries.popitem(last=False)
            self.used -= len(dropped)
        return True

    def get(self, owner: str, response_id: str) -> Stored | None:
        """The kept response, parsed afresh (a caller may change it freely); None where none is kept."""
        blob = self._entries.get((owner, response_id))
        if blob is None:
            return None
        self._entries.move_to_end((owner, response_id))
        entry = json.loads(blob)
        return Stored(entry["response"], entry["history"])

    def delete(self, owner: str, response_id: str) -> bool:
        blob = self._entries.pop((owner, response_id), None)
        if blob is not None:
            self.used -= len(blob)
        return blob is not None
