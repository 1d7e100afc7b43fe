"""`hf://ORG/NAME[@REVISION]`: a model or dataset on the Hugging Face Hub, named anywhere an input URI goes.

Resolution goes through huggingface_hub, so its cache (HF_HOME / HF_HUB_CACHE), HF_TOKEN (gated repos) and
HF_HUB_OFFLINE (cache only) apply as they do for transformers and datasets. `hf://datasets/ORG/NAME` and
`hf://models/ORG/NAME` say the repo type explicitly (huggingface_hub's own filesystem spells them so); otherwise the
caller's role decides (a `model` input is a model repo, a `data` input a dataset repo). Torch-free and imports
nothing above llmfab.errors.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from llmfab.errors import StoreError

SCHEME = "hf://"
RepoType = Literal["model", "dataset"]
_TYPE_PREFIXES = {"datasets/": "dataset", "models/": "model"}
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$|^[A-Za-z0-9][\w.-]*$")


@dataclass(frozen=True)
class HubRef:
    repo_id: str
    revision: str | None = None
    repo_type: RepoType | None = None  # None: decided by the caller's role

    @property
    def uri(self) -> str:
        kind = f"{self.repo_type}s/" if self.repo_type else ""
        return f"{SCHEME}{kind}{self.repo_id}" + (f"@{self.revision}" if self.revision else "")


# Inputs that hold data: a plain hf://ORG/NAME given to one of these is a dataset repo, to any other a model repo.
DATA_INPUTS = ("data", "prompts", "corpus", "eval_prompts", "extra", "long_data", "text")


def repo_type_of(uri: str, input_name: str) -> RepoType:
    """The repo type an hf:// URI names when given as the input `input_name`."""
    return parse_hub_uri(uri).repo_type or ("dataset" if input_name in DATA_INPUTS else "model")


def is_hub_uri(text: object) -> bool:
    return isinstance(text, str) and text.startswith(SCHEME)


def parse_hub_uri(uri: str) -> HubRef:
    """`hf://[datasets/|models/]ORG/NAME[@REVISION]` as its parts; a malformed one is an error naming it."""
    if not is_hub_uri(uri):
        raise StoreError(f"{uri!r}: not a hub URI (expected {SCHEME}ORG/NAME[@REVISION])")
    rest, repo_type = uri[len(SCHEME) :], None
    for prefix, kind in _TYPE_PREFIXES.items():
        if rest.startswith(prefix):
            rest, repo_type = rest[len(prefix) :], kind
    repo_id, _, revision = rest.partition("@")
    repo_id = repo_id.rstrip("/")
    if not _REPO_ID.match(repo_id) or (_ and not revision):
        raise StoreError(f"{uri!r}: expected {SCHEME}ORG/NAME or {SCHEME}ORG/NAME@REVISION")
    return HubRef(repo_id, revision or None, repo_type)


def snapshot(uri: str, repo_type: RepoType = "model", allow_patterns: list[str] | None = None) -> str:
    """A local folder holding the repo's files at the revision: from the hub cache when it has them (always with
    HF_HUB_OFFLINE=1), downloaded into it otherwise. Errors name the URI and say what to do."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    ref = parse_hub_uri(uri)
    kind = ref.repo_type or repo_type
    try:
        return snapshot_download(ref.repo_id, repo_type=kind, revision=ref.revision, allow_patterns=allow_patterns)
    except GatedRepoError:
        raise StoreError(f"{uri}: a gated {kind} repo; accept its licence on the hub and set HF_TOKEN") from None
    except RepositoryNotFoundError:
        raise StoreError(f"{uri}: no such {kind} repo on the hub (or it is private: set HF_TOKEN)") from None
    except RevisionNotFoundError:
        raise StoreError(f"{uri}: the {kind} repo has no revision {ref.revision!r}") from None
    except LocalEntryNotFoundError:
        raise StoreError(
            f"{uri}: not in the hub cache and the hub cannot be reached (HF_HUB_OFFLINE is set, or no network); "
            f"download it once with `hf download {ref.repo_id}{' --repo-type dataset' if kind == 'dataset' else ''}`"
        ) from None
    except HfHubHTTPError as exc:
        raise StoreError(f"{uri}: the hub answered {exc}") from None


def current_commit(uri: str, repo_type: RepoType = "model") -> str | None:
    """The commit the URI's revision points at now: asked of the hub, or of the cache under HF_HUB_OFFLINE (or
    when the hub cannot be reached); None when neither knows. A data version (retraining) compares these."""
    from huggingface_hub import HfApi, constants, snapshot_download

    ref = parse_hub_uri(uri)
    kind = ref.repo_type or repo_type
    if ref.revision and re.fullmatch(r"[0-9a-f]{40}", ref.revision):
        return ref.revision
    # Broad on purpose: a data version is worth a lookup, never a failed run (network, auth, cache misses).
    if not constants.HF_HUB_OFFLINE:
        try:
            return HfApi().repo_info(ref.repo_id, repo_type=kind, revision=ref.revision).sha
        except Exception:
            pass
    try:
        folder = snapshot_download(ref.repo_id, repo_type=kind, revision=ref.revision, local_files_only=True)
    except Exception:
        return None
    return Path(folder).name
