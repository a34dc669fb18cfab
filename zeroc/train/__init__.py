"""Training the bundled model: corpus split, tokenizer, training loop."""
