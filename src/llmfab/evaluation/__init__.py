"""Evaluation pieces shared by stages: gold reward, long-context perplexity and needle retrieval, and the
evaluate stage's measurements (measures) and report."""
