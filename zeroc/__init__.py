"""ZeroC serving: a Llama-family runtime with a paged, compressible KV cache."""

__version__ = "0.1.0"
