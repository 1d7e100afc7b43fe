"""process_results of the `llmfab_testbed` lm-eval task: the testbed's own verifiable reward
(llmfab.data.tasks.gold_reward), the same check the training stages' gold evaluation uses."""

from __future__ import annotations

import json

from llmfab.data.tasks import gold_reward


def process_results(doc: dict, results: list[str]) -> dict[str, float]:
    """gold_reward = gold(task, meta, y) for y the greedy answer, also under gold_reward_<task>, so that lm-eval's
    mean over documents gives the overall and the per-task gold reward."""
    reward = gold_reward(doc["task"], json.loads(doc["meta"]), results[0].strip())
    return {"gold_reward": reward, f"gold_reward_{doc['task']}": reward}
