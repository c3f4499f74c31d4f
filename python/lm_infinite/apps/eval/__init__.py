"""Evaluation: long-text perplexity and passkey retrieval for stock, truncated and LM-Infinite."""
