"""Stages: plain functions registered with @stage; run them with `run_stage`."""

from llmfab.stages.base import (
    STAGES,
    StageConfig,
    StageContext,
    StageSpec,
    all_stages,
    get_stage,
    shipped_stages,
    stage,
)

__all__ = ["STAGES", "StageConfig", "StageContext", "StageSpec", "all_stages", "get_stage", "shipped_stages", "stage"]
