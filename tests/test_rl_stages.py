"""RL stages (mdloo, rlhf_warp) and weight merging on the shared tiny testbed: the merge geometry on
known vectors, each stage runs and logs the guard-rail metrics, resumes exactly (WARP's EMA anchor
included), and stops with a clear error on non-finite rewards, keeping its checkpoints. Efficacy
lives in test_rl_efficacy."""

import math

import pytest
import torch

from conftest import pretrain_tiny
from llmfab.errors import ConfigError
from llmfab.models import load_model
from llmfab.models.merge import average_state_dicts, ema_update, liti, slerp_state_dicts, slerp_tensors
from llmfab.stages.rlhf_warp import frontier_gaps
from llmfab.stages.runner import run_stage
from llmfab.storage import open_store
from llmfab.storage.checkpoint import list_step_checkpoints
from llmfab.train.rollouts import RolloutError
from llmfab.train.trainer import FAULT_ENV, InjectedFault

QUICK_EVAL = {"prompts": 8, "max_new_tokens": 8}
ROLLOUT = {"samples_per_prompt": 2, "prompts_per_rollout": 3, "max_new_tokens": 6, "max_len": 256, "heldout_prompts": 3}


# -- merge geometry ---------------------------------------------------------------------------
def _state(*values):
    return {"w": torch.tensor(values, dtype=torch.float32), "step": torch.tensor(3)}


def test_slerp_of_orthogonal_task_vectors_stays_on_the_arc():
    init, a, b = _state(1.0, 1.0), _state(3.0, 1.0), _state(1.0, 3.0)  # task vectors (2,0) and (0,2)
    merged = slerp_state_dicts(init, [a, b])["w"] - init["w"]
    torch.testing.assert_close(merged, torch.tensor([math.sqrt(2), math.sqrt(2)]))  # norm 2 kept, bisecting
    linear = average_state_dicts([a, b])["w"] - init["w"]
    torch.testing.assert_close(linear.norm(), torch.tensor(math.sqrt(2.0)))  # the chord: shorter by 1/√2
    assert slerp_state_dicts(init, [a, b])["step"] == 3  # non-float buffers are carried over


def test_slerp_endpoints_identical_models_and_parallel_vectors():
    init, a, b = _state(0.0, 0.0), _state(2.0, 0.0), _state(0.0, 5.0)
    torch.testing.assert_close(slerp_state_dicts(init, [a, b], lam=0.0)["w"], a["w"])
    torch.testing.assert_close(slerp_state_dicts(init, [a, b], lam=1.0)["w"], b["w"])
    torch.testing.assert_close(slerp_state_dicts(init, [a, a])["w"], a["w"])
    # Parallel task vectors have no plane to rotate in: the linear interpolation.
    torch.testing.assert_close(
        slerp_tensors(torch.tensor([1.0, 0]), torch.tensor([3.0, 0]), 0.5), torch.tensor([2.0, 0])
    )
    torch.testing.assert_close(slerp_tensors(torch.zeros(2), torch.tensor([0.0, 4]), 0.25), torch.tensor([0.0, 1]))


def test_slerp_of_three_is_iterative():
    """The third unit vector enters the (unit) merge of the first two at 90° with λ = 1/3: 30° towards it."""
    init = _state(0.0, 0.0, 0.0)
    models = [_state(1.0, 0, 0), _state(0, 1.0, 0), _state(0, 0, 1.0)]
    merged = slerp_state_dicts(init, models)["w"]
    c = math.cos(math.pi / 6) / math.sqrt(2)
    torch.testing.assert_close(merged, torch.tensor([c, c, 0.5]))
    assert merged.norm() == pytest.approx(1.0, abs=1e-6)  # unit task vectors stay unit


def test_liti_and_ema_endpoints():
    init, merged = _state(1.0, 2.0), _state(3.0, 6.0)
    torch.testing.assert_close(liti(init, merged, 0.0)["w"], init["w"])
    torch.testing.assert_close(liti(init, merged, 1.0)["w"], merged["w"])
    torch.testing.assert_close(liti(init, merged, 0.3)["w"], torch.tensor([1.6, 3.2]))
    ema, model = torch.nn.Linear(2, 1), torch.nn.Linear(2, 1)
    before = ema.weight.detach().clone()
    ema_update(ema, model, 0.01)
    torch.testing.assert_close(ema.weight, 0.99 * before + 0.01 * model.weight.detach())
    ema_update(ema, model, 1.0)
    torch.testing.assert_close(ema.weight, model.weight)


def test_merge_rejects_mismatched_models():
    with pytest.raises(ValueError, match="different parameters"):
        slerp_state_dicts(_state(0.0), [_state(1.0), {"v": torch.zeros(1)}])
    with pytest.raises(ValueError, match="at least 2"):
        slerp_state_dicts(_state(0.0), [_state(1.0)])


def test_frontier_gap():
    curve = [{"kl": 0.0, "rm_reward": 1.0}, {"kl": 0.2, "rm_reward": 1.5}, {"kl": 0.5, "rm_reward": 1.6}]
    runs = [{"kl": 0.3, "rm_reward": 1.4}, {"kl": 0.6, "rm_reward": 1.8}]
    assert frontier_gaps(curve, runs) == pytest.approx([0.1, -0.2])


# -- stages -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def models(testbed, tmp_path_factory):
    root = tmp_path_factory.mktemp("rl")
    policy = pretrain_tiny(testbed, root / "policy", 40).outputs["model"]
    other = pretrain_tiny(testbed, root / "other", 20).outputs["model"]
    rm = run_stage(
        "reward_model",
        {"train": {"max_steps": 2, "batch_size": 8}, "eval_pairs": 8},
        {"init": policy, "data": testbed["preferences"]},
        store=open_store(root / "rm"),
        track=False,
        show_progress=False,
    ).outputs["model"]
    return {"policy": policy, "other": other, "rm": rm, "prompts": testbed["prompts"]}


def _run(stage, cfg, inputs, folder):
    return run_stage(stage, cfg, inputs, store=open_store(folder), track=False, show_progress=False)


def _rl_inputs(models):
    return {"model": models["policy"], "reward_model": models["rm"], "prompts": models["prompts"]}


def _assert_same_weights(a_ref, b_ref):
    a, b = load_model(a_ref).state_dict(), load_model(b_ref).state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)


MDLOO = {**ROLLOUT, "inner_steps": 2, "train": {"max_steps": 4, "batch_size": 6, "checkpoint_every": 2,
         "optim": {"lr": 1e-3}}, "eval": QUICK_EVAL}  # fmt: skip


def test_mdloo_logs_guard_rails_and_resumes_exactly(models, tmp_path, monkeypatch):
    full = _run("mdloo", MDLOO, _rl_inputs(models), tmp_path / "full")
    m = full.metrics
    guard_rails = {"rollout_rm_score", "rollout_kl_anchor", "rollout_response_tokens", "train_entropy"}
    assert guard_rails | {"train_ratio", "train_kl_to_old", "gold_reward", "gold_reward_before"} <= set(m)
    assert {"heldout_rm_reward_before", "heldout_rm_reward", "heldout_kl"} <= set(m)
    assert m["iteration"] == 1 and m["rollout_kl_anchor"] != 0  # the second rollout is from a moved policy

    monkeypatch.setenv(FAULT_ENV, "3")
    with pytest.raises(InjectedFault):
        _run("mdloo", MDLOO, _rl_inputs(models), tmp_path / "resumed")
    monkeypatch.delenv(FAULT_ENV)
    resumed = _run("mdloo", MDLOO, _rl_inputs(models), tmp_path / "resumed")
    assert resumed.metrics["resumed_from_step"] == 2
    _assert_same_weights(full.outputs["model"], resumed.outputs["model"])


def test_non_finite_rewards_stop_the_stage_and_keep_the_checkpoint(models, tmp_path, monkeypatch):
    import llmfab.train.rollouts as rollouts

    real, calls = rollouts.reward_scores_of_ids, []

    def nan_on_second_rollout(*args, **kwargs):
        calls.append(1)
        scores = real(*args, **kwargs)
        return scores if len(calls) == 1 else scores * float("nan")

    monkeypatch.setattr(rollouts, "reward_scores_of_ids", nan_on_second_rollout)
    with pytest.raises(RolloutError, match=r"reward model scores are NaN/inf; stopping \(checkpoints kept\)"):
        _run("mdloo", {**MDLOO, "heldout_prompts": 0}, _rl_inputs(models), tmp_path)  # rollouts alone score
    assert [step for step, _ in list_step_checkpoints(open_store(tmp_path).sub("checkpoints"))] == [2]


def test_mdloo_config_errors_name_the_field(models, tmp_path):
    bad = {**MDLOO, "train": {**MDLOO["train"], "max_steps": 5}}
    with pytest.raises(ConfigError, match="inner_steps"):
        _run("mdloo", bad, _rl_inputs(models), tmp_path)
    with pytest.raises(ConfigError, match="samples_per_prompt"):
        _run("mdloo", {**MDLOO, "samples_per_prompt": 1}, _rl_inputs(models), tmp_path)


WARP = {**ROLLOUT, "runs": 2, "iterations": 1, "ema_decay": 0.5, "sweep": [0.0, 0.5, 1.0],
        "train": {"max_steps": 2, "batch_size": 6, "optim": {"lr": 1e-3}},
        "eval": QUICK_EVAL}  # fmt: skip


def test_warp_runs_merges_and_sweeps(models, tmp_path, tracking_uri):
    from llmfab.tracking import Tracker

    tracker = Tracker(tracking_uri)
    res = run_stage("rlhf_warp", WARP, _rl_inputs(models), store=open_store(tmp_path), tracker=tracker,
                    show_progress=False)  # fmt: skip
    m = res.metrics
    assert {"iter0_run0.rollout_kl_anchor", "iter0_run1.train_entropy", "iter0_run1.rollout_rm_score"} <= set(m)
    assert m["sweep_eta0_kl"] == pytest.approx(0.0, abs=1e-4)  # η = 0 is the input model itself
    assert m["sweep_run0_kl"] != m["sweep_run1_kl"]  # the runs saw their prompts in different orders
    assert {"frontier_gap_run0", "frontier_gap_run1", "frontier_gap_min", "gold_reward"} <= set(m)
    logged = {a.path for a in tracker.client.list_artifacts(res.run_id, "warp")}
    assert logged == {"warp/eta_sweep.json", "warp/eta_sweep.png"}
    # LITI with η = 0.3 of the SLERP of the two runs is the output.
    output = load_model(res.outputs["model"]).state_dict()
    init = load_model(models["policy"]).state_dict()
    assert any(not torch.equal(output[k], init[k]) for k in init)


def test_warp_resumes_exactly_with_its_ema_anchor(models, tmp_path, monkeypatch):
    train = {**WARP["train"], "max_steps": 3, "checkpoint_every": 2}
    cfg = {**WARP, "heldout_prompts": 0, "eval": {"prompts": 0}, "train": train}
    full = _run("rlhf_warp", cfg, _rl_inputs(models), tmp_path / "full")
    monkeypatch.setenv(FAULT_ENV, "3")  # run 0 crashes after step 3; its step-2 checkpoint holds the EMA
    with pytest.raises(InjectedFault):
        _run("rlhf_warp", cfg, _rl_inputs(models), tmp_path / "resumed")
    monkeypatch.delenv(FAULT_ENV)
    resumed = _run("rlhf_warp", cfg, _rl_inputs(models), tmp_path / "resumed")
    assert resumed.metrics["iter0_run0.resumed_from_step"] == 2
    _assert_same_weights(full.outputs["model"], resumed.outputs["model"])


def test_merge_stage(models, tmp_path):
    a, b, init = models["policy"], models["other"], models["policy"]
    res = _run("merge", {"method": "slerp", "eta": 0.5}, {"models": [a, b], "init": init}, tmp_path / "slerp")
    merged, sa, sb = (load_model(r).state_dict() for r in (res.outputs["model"], a, b))
    k = "model.layers.0.mlp.down_proj.weight"
    # init = a: task vectors 0 and b − a, the zero vector makes SLERP linear; LITI halves it again.
    torch.testing.assert_close(merged[k], sa[k] + 0.25 * (sb[k] - sa[k]), rtol=1e-5, atol=1e-6)
    with pytest.raises(ConfigError, match="init"):
        _run("merge", {"method": "slerp"}, {"models": [a, b]}, tmp_path / "no_init")
    with pytest.raises(ConfigError, match="weights"):
        _run("merge", {"method": "slerp", "weights": [1, 2]}, {"models": [a, b], "init": init}, tmp_path / "w")
