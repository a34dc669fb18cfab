"""The KV store: blocks of computed prompt KV kept in per-holder pools, indexed in Redis."""
