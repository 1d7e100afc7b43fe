"""llmfab: LLM pre- and post-training recipes as Kubeflow pipelines."""

__version__ = "0.1.0"
