"""The prefill service: runs prompts and streams their KV, layer by layer, to decode services."""
