"""Load a registered model by `models:/NAME@ALIAS` (or `models:/NAME/VERSION`) and generate text with it.

Both kinds of version load the same way here: a transformers-flavour version from its MLflow artifacts, a
URI-registered one from its checkpoint in the object store (verified against the manifest, cached).
"""

from __future__ import annotations

from llmfab.registry.promotion import get_version
from llmfab.registry.register import FORMAT_TAG, RegistryError


def registry_client(uri: str | None = None):
    """An MlflowClient on `uri`, else $MLFLOW_TRACKING_URI, else ./mlflow.db (the registry lives there too)."""
    from mlflow.tracking import MlflowClient

    from llmfab.tracking import tracking_uri

    return MlflowClient(tracking_uri=tracking_uri(uri))


def parse_model_uri(model_uri: str) -> tuple[str, str | None, str | None]:
    """'models:/NAME@ALIAS' -> (NAME, None, ALIAS); 'models:/NAME/VERSION' -> (NAME, VERSION, None)."""
    if not model_uri.startswith("models:/"):
        raise RegistryError(f"{model_uri!r}: expected models:/NAME@ALIAS or models:/NAME/VERSION")
    rest = model_uri[len("models:/") :].strip("/")
    if "@" in rest:
        name, _, alias = rest.rpartition("@")
        if name and alias:
            return name, None, alias
    else:
        name, _, version = rest.rpartition("/")
        if name and version.isdigit():
            return name, version, None
    raise RegistryError(f"{model_uri!r}: expected models:/NAME@ALIAS or models:/NAME/VERSION")


def resolve(model_uri: str, client=None):
    """The ModelVersion a models:/ URI names (RegistryError when the model, version or alias is missing)."""
    client = client or registry_client()
    name, version, alias = parse_model_uri(model_uri)
    return get_version(client, name, version, alias)


def load_registered(model_uri: str, *, tracking_uri: str | None = None, dtype: str = "float32"):
    """(model, tokenizer) of the version `model_uri` names."""
    from llmfab.tracking import tracking_uri as resolve_tracking_uri

    uri = resolve_tracking_uri(tracking_uri)
    client = registry_client(uri)
    mv = resolve(model_uri, client)
    if mv.tags.get(FORMAT_TAG) == "uri":
        from llmfab.models import load_model, load_tokenizer

        return load_model(mv.source, dtype=dtype), load_tokenizer(mv.source)
    import mlflow.artifacts
    import mlflow.transformers

    from llmfab.models.architectures import DTYPES

    download = client.get_model_version_download_uri(mv.name, mv.version)
    local = mlflow.artifacts.download_artifacts(artifact_uri=download, tracking_uri=uri)
    parts = mlflow.transformers.load_model(local, return_type="components")
    return parts["model"].to(DTYPES[dtype]), parts["tokenizer"]


def generate_text(
    model_uri: str,
    prompts: list[str],
    *,
    tracking_uri: str | None = None,
    max_new_tokens: int = 32,
    temperature: float = 0.0,
    seed: int = 0,
) -> list[str]:
    """One reply per prompt from the registered model: through its chat template when it has one."""
    from llmfab.generation import generate, sample_chat

    model, tokenizer = load_registered(model_uri, tracking_uri=tracking_uri)
    kwargs = dict(max_new_tokens=max_new_tokens, temperature=temperature, seed=seed)
    if getattr(tokenizer, "chat_template", None):
        return sample_chat(model, tokenizer, prompts, **kwargs)[0]
    return generate(model, tokenizer, prompts, **kwargs)
