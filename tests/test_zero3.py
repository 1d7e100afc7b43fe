"""DeepSpeed ZeRO-3 across ranks under torchrun, as the llmfab-deepspeed TrainJob runtime runs it: two CPU ranks
(gloo) each hold a slice of the weights, gradients and optimizer states; with grad_accum 1 each they reach the
weights of one plain-torch process with grad_accum 2. Their checkpoints hold every rank's ZeRO shards under
one manifest and resume exactly after a SIGKILL; the stage's output is the gathered transformers folder."""

import json
import math
import os
import re
import subprocess

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import free_port, pretrain_tiny, venv_tool
from llmfab.errors import ConfigError
from llmfab.stages.runner import run_stage
from llmfab.storage import open_store
from llmfab.storage.checkpoint import fetch_checkpoint, list_step_checkpoints, read_manifest, step_name
from llmfab.train.distributed import deepspeed_config
from llmfab.train.rollouts import rank_prompts, rank_seed
from llmfab.train.trainer import FAULT_ENV, FAULT_SIGNAL_ENV, STATE_FILE

STEPS = 4
ZERO3 = {"zero_optimization": {"stage": 3}}


def _config(grad_accum: int, deepspeed: dict | None = None) -> dict:
    train = {
        "max_steps": STEPS,
        "batch_size": 4,
        "grad_accum": grad_accum,
        "checkpoint_every": 2,
        "keep_checkpoints": 3,
        "log_every": 1,
        "optim": {"lr": 3e-3, "warmup_steps": 1},
        "deepspeed": deepspeed,
    }
    return {"max_len": 128, "max_examples": 64, "eval": {"prompts": 0}, "train": train}


@pytest.fixture(scope="module")
def inputs(testbed, tmp_path_factory):
    base = pretrain_tiny(testbed, tmp_path_factory.mktemp("base"), steps=2)
    return {"model": base.outputs["model"], "data": testbed["sft"]}


@pytest.fixture(scope="module")
def rl_inputs(testbed, inputs, tmp_path_factory):
    """A trained reward model (a causal LM's new score head would be drawn afresh by each process)."""
    rm = run_stage(
        "reward_model",
        {"train": {"max_steps": 2, "batch_size": 8}, "eval_pairs": 8},
        {"init": inputs["model"], "data": testbed["preferences"]},
        store=open_store(tmp_path_factory.mktemp("rm")),
        track=False,
        show_progress=False,
    )
    return {"model": inputs["model"], "reward_model": rm.outputs["model"], "prompts": testbed["prompts"]}


@pytest.fixture(scope="module")
def one_process(inputs, tmp_path_factory):
    """The reference: plain torch in one process, grad_accum 2 (the two ranks' global batch)."""
    folder = tmp_path_factory.mktemp("one")
    run_stage("sft", _config(grad_accum=2), inputs, store=open_store(folder), track=False, show_progress=False)
    return folder


def _torchrun(tmp_path, stage: str, config: dict, inputs: dict, out, *flags: str, **env) -> subprocess.CompletedProcess:
    """`llmfab [flags] stage STAGE` on two ranks under torchrun, as the llmfab-deepspeed runtime starts it."""
    cfg = tmp_path / f"{stage}.yaml"
    cfg.write_text(yaml.safe_dump(config))
    torchrun = venv_tool("torchrun", "`pip install -e '.[train]'` (torch)")
    llmfab = venv_tool("llmfab", "`pip install -e .`")
    cmd = [torchrun, "--nnodes=1", "--nproc-per-node=2", "--master-addr=127.0.0.1", f"--master-port={free_port()}"]
    cmd += ["--no-python", llmfab, *flags, "stage", stage, "-c", str(cfg), "--output", str(out), "--write-result"]
    cmd += [f"--input={k}={v}" for k, v in inputs.items()]
    env = {**os.environ, "OMP_NUM_THREADS": "1", **env}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False, env=env)


def _torchrun_sft(tmp_path, inputs, out, config: dict, **env) -> subprocess.CompletedProcess:
    return _torchrun(tmp_path, "sft", config, inputs, out, **env)


def _printed(proc: subprocess.CompletedProcess) -> dict:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return json.loads(proc.stdout[proc.stdout.index("{\n") :])


def _weights(folder) -> dict[str, torch.Tensor]:
    root = fetch_checkpoint(open_store(folder).sub("model"))
    return {k: v for path in sorted(root.glob("*.safetensors")) for k, v in load_file(path).items()}


def _relative_l2(got: dict, want: dict) -> float:
    assert got.keys() == want.keys()
    diff = sum(float((got[k].double() - want[k].double()).pow(2).sum()) for k in want)
    norm = sum(float(want[k].double().pow(2).sum()) for k in want)
    return (diff / norm) ** 0.5


def _history(folder, step: int = STEPS) -> list[float]:
    store = open_store(folder).sub("checkpoints").sub(step_name(step))
    return torch.load(fetch_checkpoint(store) / STATE_FILE, weights_only=True)["history"]


@pytest.fixture(scope="module")
def zero3_run(inputs, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("zero3")
    out = tmp / "out"
    return out, _printed(_torchrun_sft(tmp, inputs, out, _config(grad_accum=1, deepspeed=ZERO3)))


@pytest.mark.slow  # torchrun starts DeepSpeed ZeRO-3 on two CPU ranks
def test_zero3_two_ranks_match_one_process(zero3_run, one_process):
    out, printed = zero3_run
    assert printed["outputs"]["model"] == open_store(out).sub("model").uri
    ours, theirs = _weights(out), _weights(one_process)
    assert all(v.dtype == torch.float32 for v in ours.values())  # the model's own dtype, whole
    assert _relative_l2(ours, theirs) < 2e-3
    assert _history(out) == pytest.approx(_history(one_process), rel=1e-3)

    # Every step checkpoint holds both ranks' ZeRO-3 shards under one manifest, with rank 0's HF folder.
    ckpts = open_store(out).sub("checkpoints")
    assert [s for s, _ in list_step_checkpoints(ckpts)] == [2, 4]
    files = read_manifest(ckpts.sub(step_name(4)))["files"]
    for rank in (0, 1):
        assert any(f"zero_pp_rank_{rank}_" in name and "optim_states" in name for name in files), sorted(files)
    assert "model.safetensors" in files and "deepspeed/latest" in files


OFFLOAD = {"offload_optimizer": {"device": "cpu"}, "offload_param": {"device": "cpu"}}


@pytest.mark.slow  # torchrun starts DeepSpeed on two CPU ranks
@pytest.mark.parametrize("zero", [{"stage": 2}, {"stage": 3, **OFFLOAD}], ids=["zero2", "zero3-cpu-offload"])
def test_other_zero_setups_match_one_process(zero, inputs, one_process, tmp_path):
    """ZeRO-2 across ranks (optimizer states and gradients sharded, weights whole), and ZeRO-3 with its optimizer
    and weight shards offloaded to host memory: the same weights as one plain process."""
    out = tmp_path / "out"
    _printed(_torchrun_sft(tmp_path, inputs, out, _config(grad_accum=1, deepspeed={"zero_optimization": zero})))
    assert _relative_l2(_weights(out), _weights(one_process)) < 2e-3
    files = read_manifest(open_store(out).sub("checkpoints").sub(step_name(STEPS)))["files"]
    assert any("zero_pp_rank_1_" in name for name in files), sorted(files)  # rank 1's shard uploaded too


@pytest.mark.slow  # torchrun starts DeepSpeed ZeRO-3 on two CPU ranks
def test_zero3_resumes_exactly_after_sigkill(zero3_run, inputs, tmp_path):
    """Rank 0 is SIGKILLed after step 3 (step 2's checkpoint written, step 3's update lost); torchrun stops
    rank 1; a new torchrun resumes from step 2's shards and ends on the uninterrupted run's weights."""
    full, _ = zero3_run
    out = tmp_path / "out"
    config = _config(grad_accum=1, deepspeed=ZERO3)
    killed = _torchrun_sft(tmp_path, inputs, out, config, **{FAULT_ENV: "3", FAULT_SIGNAL_ENV: "KILL"})
    assert killed.returncode != 0
    assert "SIGKILL" in killed.stderr or "Signal 9" in killed.stderr, killed.stderr[-4000:]
    assert [s for s, _ in list_step_checkpoints(open_store(out).sub("checkpoints"))] == [2]
    assert not open_store(out).exists("model/MANIFEST.json")

    printed = _printed(_torchrun_sft(tmp_path, inputs, out, config))
    assert printed["metrics"]["resumed_from_step"] == 2.0
    assert _history(out) == pytest.approx(_history(full), rel=1e-6)
    assert _relative_l2(_weights(out), _weights(full)) < 1e-6


@pytest.mark.slow  # torchrun starts DeepSpeed ZeRO-3 on two CPU ranks
def test_online_dpo_zero3_two_ranks_sample_their_own_prompts_and_resume(rl_inputs, tmp_path):
    """An online_dpo run on two ZeRO-3 ranks: each rank gathers the policy to answer its own prompts (disjoint
    from the other rank's), scores them with the partitioned reward model and reference, trains on its own pairs,
    checkpoints every episode and writes the gathered policy. SIGKILLed after episode 2 of 3, it resumes (episode 3
    sampled from the restored shards) to the same weights."""
    config = {
        "episodes": 3,
        "prompts_per_episode": 4,
        "samples_per_prompt": 3,
        "max_new_tokens": 8,
        "keep_truncated": True,  # a 2-step model rarely ends its turn
        "eval": {"prompts": 0},
        "train": {"max_steps": 3, "batch_size": 2, "checkpoint_every": 1, "log_every": 1, "deepspeed": ZERO3},
    }
    full = tmp_path / "full"
    proc = _torchrun(tmp_path, "online_dpo", config, rl_inputs, full, "-v")
    _printed(proc)
    # The frozen reference and reward model are partitioned like the policy (their forwards in lockstep).
    assert "ForCausalLM partitioned across 2 ranks (ZeRO-3)" in proc.stderr, proc.stderr[-3000:]
    assert "ForSequenceClassification partitioned across 2 ranks (ZeRO-3)" in proc.stderr
    sampled = re.findall(r"episode (\d+): rank (\d) of 2 samples prompts ([0-9a-f ]+)", proc.stderr)
    by_rank = {(int(e), int(r)): set(p.split()) for e, r, p in sampled}
    assert set(by_rank) == {(e, r) for e in range(3) for r in (0, 1)}, proc.stderr[-3000:]
    for episode in range(3):
        assert len(by_rank[episode, 0]) == len(by_rank[episode, 1]) == 4
        assert not by_rank[episode, 0] & by_rank[episode, 1]
    assert [s for s, _ in list_step_checkpoints(open_store(full).sub("checkpoints"))] == [2, 3]  # keep 2
    weights = _weights(full)
    assert weights and all(v.numel() > 0 and torch.isfinite(v).all() for v in weights.values())

    out = tmp_path / "resumed"
    killed = _torchrun(tmp_path, "online_dpo", config, rl_inputs, out, **{FAULT_ENV: "2", FAULT_SIGNAL_ENV: "KILL"})
    assert killed.returncode != 0 and not open_store(out).exists("model/MANIFEST.json")
    printed = _printed(_torchrun(tmp_path, "online_dpo", config, rl_inputs, out))
    assert printed["metrics"]["resumed_from_step"] == 2.0
    assert _relative_l2(_weights(out), weights) < 1e-6


def test_deepspeed_config_takes_zero3_and_its_offloads():
    offload = {"offload_optimizer": {"device": "cpu"}, "offload_param": {"device": "cpu"}}
    user = {"zero_optimization": {"stage": 3, **offload}}
    cfg = deepspeed_config(user, batch_size=4, grad_accum=2, max_grad_norm=1.0, precision="bf16")
    assert cfg["zero_optimization"] == user["zero_optimization"]
    assert (cfg["train_micro_batch_size_per_gpu"], cfg["gradient_accumulation_steps"]) == (4, 2)  # × ranks: global
    assert cfg["bf16"] == {"enabled": True} and cfg["gradient_clipping"] == 1.0
    with pytest.raises(ConfigError, match="offload_param needs stage 3"):
        deepspeed_config({"zero_optimization": {"stage": 2, "offload_param": {"device": "cpu"}}}, batch_size=1,
                         grad_accum=1, max_grad_norm=None, precision="fp32")  # fmt: skip
    with pytest.raises(ConfigError, match="not a ZeRO stage"):
        deepspeed_config({"zero_optimization": {"stage": 4}}, batch_size=1, grad_accum=1, max_grad_norm=None,
                         precision="fp32")  # fmt: skip


def test_each_rank_samples_its_own_prompts(monkeypatch):
    prompts = list(range(10))
    one = rank_prompts(prompts, 1, 3)
    assert one == [3, 4, 5] and rank_seed(7) == 7  # one process: as before
    monkeypatch.setenv("WORLD_SIZE", "2")
    picked = {}
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        picked[rank] = rank_prompts(prompts, 1, 3)
    assert picked == {0: [6, 7, 8], 1: [9, 0, 1]}  # episode 1 takes 3 × 2 prompts, rank r the r-th block
    assert rank_seed(7) != 7


RL_STAGES = {
    "mdloo": {"inner_steps": 2, "train": {"max_steps": 4, "checkpoint_every": 2}},
    # Two runs in one process: the second ZeRO-3 engine partitions the policy the first one gave back whole.
    "rlhf_warp": {"runs": 2, "iterations": 1, "ema_decay": 0.5, "sweep": [0.0, 1.0], "train": {"max_steps": 2}},
}


@pytest.mark.slow  # torchrun starts DeepSpeed ZeRO-3 on two CPU ranks
@pytest.mark.parametrize("stage", sorted(RL_STAGES))
def test_rl_stages_run_on_two_zero3_ranks(stage, rl_inputs, tmp_path):
    """Rollouts from a ZeRO-3 policy gathered on each rank for its own prompts, the reward model and reference
    partitioned like it; held-out measurements before and after; the gathered policy written by rank 0."""
    own = RL_STAGES[stage]
    rollout = {"samples_per_prompt": 2, "prompts_per_rollout": 2, "max_new_tokens": 6, "heldout_prompts": 2}
    train = {"batch_size": 2, "log_every": 1, "optim": {"lr": 1e-3}, "deepspeed": ZERO3, **own["train"]}
    config = {**rollout, **own, "eval": {"prompts": 0}, "train": train}
    printed = _printed(_torchrun(tmp_path, stage, config, rl_inputs, tmp_path / "out"))
    assert "heldout_rm_reward" in printed["metrics"] or stage == "rlhf_warp"
    weights = _weights(tmp_path / "out")
    assert weights and all(v.numel() > 0 and torch.isfinite(v).all() for v in weights.values())


def test_a_frozen_model_is_partitioned_under_zero3_and_scores_as_whole(tmp_path, monkeypatch):
    """distributed.frozen_model in one process with ZeRO-3: the weights are partitioned (each parameter an empty
    placeholder between forwards), its log-probs equal the whole model's, whole_weights gathers it for reading,
    and release_frozen gives it back; without ZeRO-3 the model is left as it was."""
    from llmfab.config.model import ModelConfig
    from llmfab.models.architectures import build_model
    from llmfab.train.config import TrainConfig
    from llmfab.train.distributed import frozen_model, is_partitioned, release_frozen, whole_weights

    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    cfg = ModelConfig(arch="qwen2", vocab_size=256, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                      intermediate_size=128, max_position_embeddings=64)  # fmt: skip
    model = build_model(cfg, seed=0).eval()
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(input_ids=ids).logits
    assert frozen_model(model, TrainConfig()) is model and not is_partitioned(model)

    sharded = frozen_model(model, TrainConfig(deepspeed=ZERO3))
    try:
        assert is_partitioned(sharded) and all(p.numel() == 0 for p in sharded.parameters())
        assert not any(p.requires_grad for p in sharded.parameters())
        with torch.no_grad():
            torch.testing.assert_close(sharded(input_ids=ids).logits, want)
        with whole_weights(sharded):
            assert all(p.numel() > 0 for p in sharded.parameters())
        assert all(p.numel() == 0 for p in sharded.parameters())  # partitioned again after
    finally:
        release_frozen(sharded)
    assert not is_partitioned(sharded)


def test_target_logps_in_chunks_on_a_partitioned_model(monkeypatch):
    """Beyond the logits budget the head is called outside the model's forward: under ZeRO-3 that call gathers
    its partitioned weight as the forward's does, and the log-probs equal the whole model's."""
    from llmfab.config.model import ModelConfig
    from llmfab.models.architectures import build_model
    from llmfab.train import head_positions
    from llmfab.train.config import TrainConfig
    from llmfab.train.distributed import frozen_model, release_frozen

    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    cfg = ModelConfig(arch="gemma2", vocab_size=256, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                      intermediate_size=128, max_position_embeddings=64, final_logit_softcapping=5.0)  # fmt: skip
    model = build_model(cfg, seed=0).eval()
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    index, targets = torch.arange(0, 31, 2), ids.flatten()[1::2]
    with torch.no_grad():
        want = head_positions.target_logps_at(model, index, targets, input_ids=ids)
    sharded = frozen_model(model, TrainConfig(deepspeed=ZERO3))
    monkeypatch.setattr(head_positions, "LOGITS_BUDGET", 256 * 4)
    try:
        with torch.no_grad():
            got = head_positions.target_logps_at(sharded, index, targets, input_ids=ids)
        torch.testing.assert_close(got, want)
    finally:
        release_frozen(sharded)


@pytest.mark.slow  # torchrun starts DeepSpeed ZeRO-3 on two CPU ranks
def test_lora_sft_on_two_zero3_ranks(inputs, tmp_path):
    """LoRA adapters on a ZeRO-3 base across two ranks: the output is the adapter merged into a plain folder,
    its base weights moved by exactly the merged low-rank product (embeddings and norms untouched)."""
    config = {**_config(grad_accum=1, deepspeed=ZERO3), "lora": {"r": 4}}
    _printed(_torchrun_sft(tmp_path, inputs, tmp_path / "out", config))
    merged = _weights(tmp_path / "out")
    base = {k: v for path in sorted(fetch_checkpoint(open_store(inputs["model"])).glob("*.safetensors"))
            for k, v in load_file(path).items()}  # fmt: skip
    assert merged.keys() == base.keys() and all(torch.isfinite(v).all() for v in merged.values())
    moved = {k for k in base if not torch.equal(merged[k], base[k])}
    assert moved and all(k.endswith("_proj.weight") for k in moved), sorted(moved)


@pytest.mark.slow  # torchrun starts DeepSpeed ZeRO-3 on two CPU ranks
def test_dpo_zero3_reference_is_partitioned_and_scores_as_the_policy_starts(testbed, inputs, tmp_path):
    """Offline DPO on two ZeRO-3 ranks: the reference is partitioned like the policy while it scores the pairs, and
    its log-probs are the policy's at step 0 (the first loss is log 2 on every pair)."""
    train = {"max_steps": 2, "batch_size": 2, "log_every": 1, "checkpoint_every": 2, "deepspeed": ZERO3}
    config = {"max_len": 128, "eval": {"prompts": 0}, "train": train}
    dpo_inputs = {"model": inputs["model"], "data": testbed["preferences"]}
    proc = _torchrun(tmp_path, "dpo", config, dpo_inputs, tmp_path / "out", "-v")
    _printed(proc)
    assert "ForCausalLM partitioned across 2 ranks (ZeRO-3)" in proc.stderr, proc.stderr[-3000:]
    assert _history(tmp_path / "out", step=2)[0] == pytest.approx(math.log(2), abs=1e-4)
