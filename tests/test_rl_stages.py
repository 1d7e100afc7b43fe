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


def test_rl_setup_freezes_the_reference_and_puts_the_reward_model_on_the_training_device(models, monkeypatch):
    import llmfab.train.rl_setup as rl_setup
    from llmfab.stages.mdloo import MDLOOConfig
    from llmfab.stages.online_dpo import OnlineDPOConfig

    monkeypatch.setattr(rl_setup, "training_device", lambda: torch.device("meta"))  # stands in for a GPU
    inputs = {**_rl_inputs(models), "reference": models["other"]}
    mdloo = MDLOOConfig(max_prompts=5, heldout_prompts=3, eval=QUICK_EVAL)
    rl = rl_setup.load_rl_setup(inputs, mdloo)
    assert next(rl.reward_model.parameters()).device.type == "meta" and not rl.reward_model.training
    assert next(rl.policy.parameters()).device.type == next(rl.reference.parameters()).device.type == "cpu"
    assert all(p.requires_grad for p in rl.policy.parameters())  # the Trainer puts it in train mode
    assert not rl.reference.training and not any(p.requires_grad for p in rl.reference.parameters())
    assert not any(p.requires_grad for p in rl.reward_model.parameters())
    other = load_model(models["other"]).state_dict()
    assert all(torch.equal(v, other[k]) for k, v in rl.reference.state_dict().items())  # the `reference` input
    assert len(rl.prompts) == 5 and len(rl.held_out) == 3 and len(rl.eval_records) == QUICK_EVAL["prompts"]

    warp = rl_setup.load_rl_setup(inputs, mdloo, reference_is_policy_copy=True)
    assert warp.reference is not warp.policy and not warp.reference.training
    policy = warp.policy.state_dict()
    assert all(torch.equal(v, policy[k]) for k, v in warp.reference.state_dict().items())

    odpo = rl_setup.load_rl_setup(_rl_inputs(models), OnlineDPOConfig(eval={"prompts": 0}))  # no RolloutConfig
    assert odpo.held_out == [] and odpo.eval_records == [] and len(odpo.prompts) > 5


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


# -- rollout math: what is sampled, trained on and compared -----------------------------------
def _fixed_logit_lm(tok, logits: torch.Tensor):
    """A real (tiny, untied) llama whose next-token logits are `logits` at every position, whatever the
    context: attention and MLP outputs are zero and every token embeds to e_0, so the last hidden state
    is √d·e_0 and lm_head's first column, logits/√d, gives the logits."""
    from llmfab.config.model import ModelConfig
    from llmfab.models.architectures import build_model
    from llmfab.tokenizer import special_token_ids

    cfg = ModelConfig(arch="llama", vocab_size=len(tok), hidden_size=32, num_layers=1, num_heads=4, num_kv_heads=2,
                      intermediate_size=64, max_position_embeddings=128, tie_word_embeddings=False)  # fmt: skip
    model = build_model(cfg, seed=0, **special_token_ids(tok))
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.model.embed_tokens.weight.zero_()[:, 0] = 1.0
        model.lm_head.weight.zero_()[:, 0] = logits / math.sqrt(cfg.hidden_size)
    return model


class _RecordingRM(torch.nn.Module):
    """A reward model that scores every token 0 (a sequence classifier's `score` head on zero features)
    and remembers the ids it was shown (right padding cut)."""

    def __init__(self, pad_token_id: int):
        super().__init__()
        self.score = torch.nn.Linear(1, 1)
        torch.nn.init.zeros_(self.score.weight), torch.nn.init.zeros_(self.score.bias)
        self.pad, self.seen = pad_token_id, []

    def forward(self, input_ids, use_cache=False):
        for row in input_ids.tolist():
            while row and row[-1] == self.pad:
                row.pop()
            self.seen.append(row)
        per_token = self.score(torch.zeros(*input_ids.shape, 1))
        return type("Out", (), {"logits": per_token[:, -1]})


def test_policy_samples_come_from_the_tempered_distribution_whatever_the_generation_config(tiny_lm):
    """Token frequencies of many samples from a fixed-logit model match softmax(z/T) over the whole
    vocabulary (total variation within ~2x its sampling noise), although the checkpoint's generation
    config asks for top-k, top-p and a repetition penalty. Sampling top-50 (transformers' default),
    untempered, or with those settings lands 2-5x the bound away."""
    from llmfab.data.chat import stop_token_ids
    from llmfab.generation import sample_policy

    tok, _, _ = tiny_lm
    z = torch.randn(len(tok), generator=torch.Generator().manual_seed(0))  # flat enough that top-50 cuts mass
    z[stop_token_ids(tok)] = -30.0  # no stops: every sample is max_new_tokens i.i.d. draws
    model = _fixed_logit_lm(tok, z)
    gc = model.generation_config
    gc.do_sample, gc.top_k, gc.top_p, gc.repetition_penalty = True, 5, 0.5, 5.0
    temperature, n, steps = 0.7, 2000, 4
    samples = sample_policy(model, tok, ["hi"], n=n, temperature=temperature, max_new_tokens=steps, batch_size=500)
    assert all(len(c) == steps for c in samples.completion_ids) and not any(samples.finished)
    drawn = torch.tensor([t for c in samples.completion_ids for t in c])
    freq = torch.bincount(drawn, minlength=len(tok)).float() / len(drawn)
    p = torch.softmax(z / temperature, -1)
    noise = 0.5 * (p * (1 - p) / len(drawn)).sqrt().sum()  # E[TV] of exact sampling is ~0.8x this
    assert 0.5 * (freq - p).abs().sum() < 1.5 * noise
    assert gc.top_k == 5 and gc.repetition_penalty == 5.0  # the model's own config is left as it was


def test_rollout_rows_are_the_sampled_ids_with_log_probs_of_the_sampled_distribution(tiny_lm):
    """Each row is the rendered prompt + the ids exactly as sampled: through the stop token when one
    ended the answer, nothing appended to a cut-off one, a special token sampled mid-answer kept; the
    mask covers just the sampled ids. old_logps and the anchor's are Σ log softmax(z/T) of those ids;
    the reward model sees the sampled conversation (closed by the template's newline when finished);
    a cut-off answer's reward loses missing_eos_penalty (default 1)."""
    from llmfab.data.chat import stop_token_ids
    from llmfab.generation import sample_policy
    from llmfab.losses.rl import kl_penalized_rewards, leave_one_out_advantages
    from llmfab.tokenizer import IM_END, IM_START
    from llmfab.train.rollouts import RolloutConfig, sample_rollout

    tok, _, _ = tiny_lm
    end, start = tok.convert_tokens_to_ids(IM_END), tok.convert_tokens_to_ids(IM_START)
    z = torch.randn(len(tok), generator=torch.Generator().manual_seed(1))
    z[tok.eos_token_id], z[tok.pad_token_id], z[end], z[start] = -30.0, -30.0, 4.0, 3.5
    z_anchor = z + torch.randn(len(tok), generator=torch.Generator().manual_seed(2))
    policy, anchor, rm = _fixed_logit_lm(tok, z), _fixed_logit_lm(tok, z_anchor), _RecordingRM(tok.pad_token_id)
    records = [{"prompt": "Add 2 and 3."}, {"prompt": "Say hi"}, {"prompt": "Repeat the word cat two times."}]
    config = RolloutConfig(samples_per_prompt=4, max_new_tokens=3, temperature=0.8, beta=0.5)
    rows, stats = sample_rollout(policy, anchor, rm, tok, records, config, seed=3)

    sampled = sample_policy(policy, tok, [r["prompt"] for r in records], n=4, temperature=0.8, max_new_tokens=3, seed=3)
    stops = set(stop_token_ids(tok))
    assert 0 < sum(sampled.finished) < len(sampled.finished)  # both kinds are checked
    assert any(start in c[:-1] for c in sampled.completion_ids)  # a special token mid-answer (decoding drops it)
    newline = tok("\n", add_special_tokens=False)["input_ids"]
    for j, (prompt, completion, done) in enumerate(
        zip(sampled.prompt_ids, sampled.completion_ids, sampled.finished, strict=True)
    ):
        n = len(prompt) + len(completion)
        assert rows["input_ids"][j, :n].tolist() == prompt + completion and rows["length"][j] == n
        assert rows["mask"][j].tolist() == [0] * len(prompt) + [1] * len(completion) + [0] * (rows["mask"].size(1) - n)
        assert not stops & set(completion[:-1])
        assert (completion[-1] in stops) == done and (done or len(completion) == config.max_new_tokens)
        assert rm.seen[j] == prompt + completion + (newline if done else [])

    def logps(logits):  # Σ log softmax(z/T) of each sample's sampled ids
        table = torch.log_softmax(logits / config.temperature, -1)
        return torch.stack([table[c].sum() for c in sampled.completion_ids])

    close = dict(atol=1e-3, rtol=0)
    torch.testing.assert_close(rows["old_logps"], logps(z), **close)
    done = torch.tensor(sampled.finished, dtype=torch.float32)
    rewards = kl_penalized_rewards(-1.0 * (1 - done), logps(z), logps(z_anchor), config.beta)
    torch.testing.assert_close(rows["advantages"], leave_one_out_advantages(rewards, 4), **close)
    assert stats["finished"] == pytest.approx(done.mean().item())


def test_mdloo_ratio_is_exactly_one_before_the_first_update_under_bf16(tiny_lm, tmp_path):
    """The sampling policy's log-probs are computed as the training forward computes them (device, bf16
    autocast, temperature, micro-batches): in the Trainer's first step, at θ_k, ρ = π_θ/π_k is exactly 1."""
    from llmfab.stages.base import StageContext
    from llmfab.stages.mdloo import MDLOOConfig, mdloo_loss_fn
    from llmfab.train.rollouts import EpisodeBatches, like_training, rollout_batch, sample_rollout
    from llmfab.train.trainer import Trainer

    tok, make, _ = tiny_lm
    policy, anchor, rm = make(0), make(1), _RecordingRM(tok.pad_token_id)
    records = [{"prompt": "Add 2 and 3."}, {"prompt": "Say hi"}, {"prompt": "Repeat the word cat two times."}]
    train = {"max_steps": 1, "batch_size": 2, "grad_accum": 3, "precision": "bf16"}
    config = MDLOOConfig(samples_per_prompt=2, prompts_per_rollout=3, max_new_tokens=5, temperature=0.7,
                         inner_steps=1, train=train)  # fmt: skip
    ctx = StageContext("mdloo", open_store(tmp_path), show_progress=False)
    trainer = Trainer(policy, config.train, ctx, mdloo_loss_fn(config))

    def build(iteration):
        return sample_rollout(policy, anchor, rm, tok, records, config, seed=iteration, **like_training(config.train))[
            0
        ]

    trainer.fit(EpisodeBatches(build, 1, 2, 3, rollout_batch))
    assert ctx.metrics["train_ratio"] == 1.0 and ctx.metrics["train_kl_to_old"] == 0.0
