"""lm-eval task YAMLs llmfab ships (an lm-eval include_path), with their Python helpers."""
