"""Each family's tiny recipe end to end, as `make run` runs Qwen2 (slow: minutes per family)."""

import pytest

from llmfab.config.recipe import list_families, load_recipe
from llmfab.recipe_runner import run_recipe
from llmfab.tracking import Tracker


@pytest.mark.slow
@pytest.mark.parametrize("family", list_families())
def test_family_tiny_recipe_runs_end_to_end(family, tmp_path, tracking_uri):
    recipe = load_recipe(family, "tiny")
    result = run_recipe(recipe, store_uri=str(tmp_path / "store"), tracking_uri=tracking_uri, show_progress=False)
    assert list(result.steps) == [s.id for s in recipe.steps]
    tracker = Tracker(tracking_uri)
    children = tracker.child_runs(result.run_id)
    assert {r.info.run_name for r in children} == set(result.steps)
    assert all(r.info.status == "FINISHED" for r in children)
    for step in recipe.steps:
        if step.stage in ("pretrain", "distill", "anneal"):
            metrics = result.steps[step.id].metrics
            assert metrics["eval_loss"] < metrics["eval_loss_before"], (step.id, metrics)
