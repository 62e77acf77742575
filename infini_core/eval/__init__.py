"""Evaluations: passkey retrieval, long-text perplexity by position."""
