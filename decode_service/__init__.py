"""The decode service: the entry point that admits requests, gets their KV and streams tokens."""
