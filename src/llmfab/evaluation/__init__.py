"""Evaluation pieces shared by stages: long-context perplexity, needle retrieval."""
