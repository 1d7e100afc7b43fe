"""What an RL stage (online_dpo, mdloo, rlhf_warp) starts from: the tokenizer, the policy, a frozen
reference, the frozen reward model next to the policy, the training prompts, the gold-reward eval
prompts and the held-out prompts its measurements answer."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch

from llmfab.data.io import read_dataset
from llmfab.errors import DataError
from llmfab.evaluation.gold import eval_records
from llmfab.models import load_model, load_tokenizer
from llmfab.models.checkpoints import frozen_dtype
from llmfab.train.distributed import frozen_model, training_device
from llmfab.train.lora import AdapterOff, LoraConfig, load_trainable
from llmfab.train.reward_inputs import load_reward_model
from llmfab.train.rollouts import RolloutConfig, heldout_records


@dataclass
class RLSetup:
    """load_rl_setup's result: what online_dpo, mdloo and rlhf_warp read before training."""

    tokenizer: Any  # the policy's (a transformers tokenizer)
    policy: torch.nn.Module  # trainable, on the CPU until its Trainer places it
    reference: torch.nn.Module  # eval mode, no grad, on the CPU: each stage places it (with LoRA: AdapterOff)
    reward_model: torch.nn.Module  # eval mode, no grad, on training_device()
    # Both are partitioned across the ranks under ZeRO-3 (distributed.frozen_model), AdapterOff excepted.
    prompts: list[dict]  # the `prompts` input's train split
    eval_records: list[dict]  # gold-reward prompts (evaluation.gold.eval_records); [] when config.eval.prompts=0
    held_out: list[dict]  # rollouts.heldout_records; [] when heldout_prompts=0 or not a RolloutConfig (online_dpo)


def load_rl_setup(
    inputs: dict[str, str], config, *, reference_is_policy_copy: bool = False, lora: LoraConfig | None = None
) -> RLSetup:
    """The start of an RL stage whose `config` has an `eval` (GoldEvalConfig); a RolloutConfig's
    max_prompts caps the training prompts and its heldout_prompts reads the held-out ones.

    The reference is the `reference` input, else the `model` input; with reference_is_policy_copy
    (WARP: no reference input, KL is to the stage's input model) a frozen copy of the loaded policy. With
    `lora` the policy is the frozen `model` with trainable adapters, and without a `reference` input the
    reference is that base, the adapter switched off (train.lora.AdapterOff): no second copy.
    Models load in the order tokenizer, policy, reference, reward model: a reward model made from a
    causal LM checkpoint draws its new head from the torch RNG, so this order keeps seeded runs as they were."""
    tokenizer = load_tokenizer(inputs["model"])
    policy = load_trainable(inputs["model"], lora, seed=config.seed)
    if lora is not None and "reference" not in inputs and not reference_is_policy_copy:
        reference = AdapterOff(policy)
    elif reference_is_policy_copy:
        reference = copy.deepcopy(policy)
    else:
        reference = load_model(inputs.get("reference", inputs["model"]), dtype=frozen_dtype(config.train))
    reference.eval().requires_grad_(False)
    if not isinstance(reference, AdapterOff):
        reference = frozen_model(reference, config.train)
    # The reward model scores every sample: next to the policy (a GPU when there is one).
    reward_model = load_reward_model(inputs["reward_model"], tokenizer, dtype=frozen_dtype(config.train))
    reward_model = frozen_model(reward_model.to(training_device()), config.train)
    rollout = config if isinstance(config, RolloutConfig) else None  # online_dpo has its own sampling config
    prompts = read_dataset(
        inputs["prompts"], "prompt", "train", limit=rollout.max_prompts if rollout else None, options=config
    )
    if not prompts:
        raise DataError(f"{inputs['prompts']}: no training prompts")
    return RLSetup(
        tokenizer=tokenizer,
        policy=policy,
        reference=reference,
        reward_model=reward_model,
        prompts=prompts,
        eval_records=eval_records(config.eval, inputs, ("prompts", "prompt"), config),
        held_out=heldout_records(inputs, rollout, config) if rollout else [],
    )
