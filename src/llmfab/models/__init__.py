"""Models: build decoder LMs from shape configs, load and save checkpoints."""

from llmfab.models.architectures import build_hf_config, build_model, count_parameters
from llmfab.models.checkpoints import load_model, save_model
from llmfab.models.embeddings import match_vocab, resize_embeddings
from llmfab.models.init import init_model
from llmfab.tokenizer import load_tokenizer

__all__ = [
    "build_hf_config",
    "build_model",
    "count_parameters",
    "init_model",
    "load_model",
    "load_tokenizer",
    "match_vocab",
    "resize_embeddings",
    "save_model",
]
