"""What the register and promote stages share: the registration record they write (registration.json), the alias
names they may set, and the MLflow run they work in."""

from __future__ import annotations

import contextlib
import json
import re

from llmfab.storage import ObjectStore

REGISTRATION_FILE = "registration.json"
_ALIAS = re.compile(r"^[A-Za-z][A-Za-z0-9_-]*$")


def check_alias(value: str) -> str:
    # MLflow reserves `latest` and version-like aliases (v3) for its own resolution.
    if not _ALIAS.match(value) or value.lower() == "latest" or re.fullmatch(r"[vV]\d+", value):
        raise ValueError(f"{value!r} is not a usable alias (letters, digits, _ and -; not 'latest' or v<N>)")
    return value


@contextlib.contextmanager
def tracked_run(run, name: str, parent_run_id: str | None = None):
    """The stage's MLflow run `run`; an untracked call (track=False, `run` None) still needs one to hold the model's
    artifacts: a new run `name`, under `parent_run_id` when given."""
    if run is not None:
        yield run
        return
    from llmfab.tracking import Tracker

    with Tracker().run(name, parent_run_id=parent_run_id, tags={"llmfab.kind": "stage"}) as new_run:
        yield new_run


def write_registration(store: ObjectStore, data: dict) -> str:
    """`data` as REGISTRATION_FILE at `store`; returns the store's URI (the stage's `registration` output)."""
    store.put_text(REGISTRATION_FILE, json.dumps(data, indent=1, sort_keys=True))
    return store.uri
