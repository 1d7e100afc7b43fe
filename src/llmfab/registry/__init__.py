"""MLflow Model Registry: register a pipeline's final model with its lineage, promote it by alias, load it.

lineage.py    walk the pipeline's stage runs back from the model: parent checkpoints, data, hashes
register.py   one version per checkpoint content: transformers flavour (small) or store URI (large)
promotion.py  aliases candidate/champion, the metric gate, every decision recorded as version tags
loading.py    models:/NAME@ALIAS -> (model, tokenizer), and text from it
"""

from llmfab.registry.lineage import Lineage, collect_lineage, lineage_tags
from llmfab.registry.loading import generate_text, load_registered, parse_model_uri, registry_client, resolve
from llmfab.registry.promotion import GateResult, GateRule, Promotion, evaluate_gate, promote, record_gate, set_alias
from llmfab.registry.register import Registered, RegistryError, register_checkpoint, version_metrics

__all__ = [
    "GateResult",
    "GateRule",
    "Lineage",
    "Promotion",
    "Registered",
    "RegistryError",
    "collect_lineage",
    "evaluate_gate",
    "generate_text",
    "lineage_tags",
    "load_registered",
    "parse_model_uri",
    "promote",
    "record_gate",
    "register_checkpoint",
    "registry_client",
    "resolve",
    "set_alias",
    "version_metrics",
]
