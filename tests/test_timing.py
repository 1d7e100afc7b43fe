"""Where a stage's time goes: nested sections charge the innermost kind, the runner logs the split."""

import time

import pytest

from llmfab.stages.base import StageConfig, stage
from llmfab.stages.runner import run_stage
from llmfab.storage import open_store
from llmfab.tracking import timing


def test_nested_sections_charge_the_innermost_kind():
    before = timing.totals()
    with timing.timed("score"):
        time.sleep(0.05)
        with timing.timed("generate"):
            time.sleep(0.1)
        time.sleep(0.05)
    spent = {k: v - before[k] for k, v in timing.totals().items()}
    assert spent["generate"] == pytest.approx(0.1, abs=0.04)
    assert spent["score"] == pytest.approx(0.1, abs=0.04)  # the generation is not counted twice
    assert spent["train"] == 0.0
    with pytest.raises(ValueError, match="unknown timing kind"), timing.timed("idle"):
        pass


class _SplitConfig(StageConfig):
    pass


@stage("test_time_split", _SplitConfig, outputs={"out": "nothing"})
def _split(config, inputs, ctx):
    with timing.timed("train"):
        time.sleep(0.1)
    time.sleep(0.05)  # overhead: in the stage, in no section
    return {"out": ctx.store.uri}


def test_run_stage_logs_where_the_time_went(tmp_path, tracking_uri):
    from llmfab.tracking import Tracker

    tracker = Tracker(tracking_uri)
    res = run_stage("test_time_split", {}, {}, store=open_store(tmp_path), tracker=tracker)
    m = res.metrics
    assert m["time_train_s"] == pytest.approx(0.1, abs=0.04)
    assert m["time_generate_s"] == 0.0 and m["time_score_s"] == 0.0
    assert m["stage_seconds"] >= m["time_train_s"] + 0.05
    logged = tracker.client.get_run(res.run_id).data.metrics
    assert logged["time_train_s"] == pytest.approx(m["time_train_s"])
