"""Evaluation: perplexity (full pass and streamed through the paged cache), KV policies in evaluation, and
the quality table."""
