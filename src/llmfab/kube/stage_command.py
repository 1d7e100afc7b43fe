"""What every rank of a TrainJob runs, and how many ranks a node starts.

The runtimes start `torchrun --no-python llmfab` (manifests/base/runtimes); the TrainJob adds the arguments
`stage NAME --output URI --write-result --set FIELD=VALUE ... --input NAME=URI`, so every rank runs
`llmfab stage`, rank 0 tracks in MLflow and writes OUTPUT/stage-result.json.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import yaml
from pydantic import BaseModel

from llmfab.errors import ConfigError

if TYPE_CHECKING:
    from llmfab.kube.launch_config import LaunchConfig

RESULT_FILE = "stage-result.json"  # written below --output by `llmfab stage --write-result`
MAX_ARGS = 128  # the TrainJob CRD's limit on the trainer's args


def config_overrides(spec, cfg) -> list[str]:
    """`FIELD=VALUE` for every top-level field of a validated config, VALUE as one-line YAML, such that
    `llmfab stage NAME --set ...` rebuilds exactly `cfg` (checked here)."""
    from llmfab.config.base import apply_overrides

    items = []
    for key, value in cfg.model_dump(mode="json").items():
        text = yaml.safe_dump(value, default_flow_style=True, width=1 << 30, allow_unicode=True, sort_keys=False)
        text = text.strip().removesuffix("...").strip()  # a top-level scalar ends with YAML's document marker
        items.append(f"{key}={text}")
    rebuilt = spec.make_config(apply_overrides({}, items), source=f"stage {spec.name} (rendered --set)")
    if rebuilt != cfg:
        raise ConfigError(f"stage {spec.name}: its config does not survive rendering as --set overrides")
    return items


def stage_args(spec, cfg, inputs: dict[str, str | list[str]], output: str) -> list[str]:
    """The arguments after `llmfab`: run stage `spec` with `cfg` on `inputs`, writing below `output`."""
    args = ["--verbose", "stage", spec.name, "--output", output, "--write-result"]
    for item in config_overrides(spec, cfg):
        args += ["--set", item]
    for key, uris in sorted(inputs.items()):
        for uri in [uris] if isinstance(uris, str) else uris:
            args += ["--input", f"{key}={uri}"]
    if len(args) > MAX_ARGS:
        raise ConfigError(
            f"stage {spec.name}: {len(args)} container arguments, more than a TrainJob takes ({MAX_ARGS})"
        )
    return args


def _train_configs(value) -> list:
    """Every TrainConfig inside a stage config (some stages train in several phases)."""
    from llmfab.train.config import TrainConfig

    if isinstance(value, TrainConfig):
        return [value]
    if isinstance(value, BaseModel):
        return [tc for name in type(value).model_fields for tc in _train_configs(getattr(value, name))]
    if isinstance(value, dict):
        return [tc for v in value.values() for tc in _train_configs(v)]
    if isinstance(value, list | tuple):
        return [tc for v in value for tc in _train_configs(v)]
    return []


def uses_deepspeed(cfg) -> bool:
    """Whether any training phase of the stage config sets train.deepspeed."""
    return any(tc.deepspeed is not None for tc in _train_configs(cfg))


def ranks_per_node(stage: str, launch: LaunchConfig, deepspeed: bool) -> int | None:
    """numProcPerNode: the launch's (None keeps the runtime's `auto`: one rank per GPU, or per CPU). DeepSpeed
    runs on every rank as DDP does (ZeRO shards across all of them, each rank uploads its own checkpoint
    shards), so `deepspeed` changes nothing here; it is kept for callers that pass it."""
    return launch.procs_per_node
