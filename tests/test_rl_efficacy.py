"""RL on the tiny testbed (slow): from the SFT model and reward model of the alignment chain, MDLOO
(AFM) and RLHF with WARP (Gemma 2), each measured by what it optimises, the reward model's score of
its samples on held-out prompts (with the KL to the SFT model), and by the gold reward.

Asserted: MDLOO raises the held-out reward-model score (what it optimises); WARP's LITI line
reaches each individual run's held-out reward at no more KL (WARP's claim), and its merged policy
(η = 0.3) keeps SFT's gold reward (within 0.02). Not asserted, printed: on the #20 testbed the tiny
reward model is exploited at this learning rate (MDLOO: RM score 1.10 -> 1.82 at KL 4.5 while the
greedy gold reward falls 0.394 -> 0.247), which is what the gold reward is there to show (256
held-out items: one moves it by 0.4 points).
"""

import pytest

from conftest import ALIGN_EVAL as EVAL
from conftest import train_cfg


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_rl_on_the_tiny_testbed(alignment_chain):
    run, data = alignment_chain["run"], alignment_chain["data"]
    sft = alignment_chain["sft"]
    inputs = {
        "model": sft.outputs["model"],
        "reward_model": alignment_chain["rm"].outputs["model"],
        "prompts": data["prompts"],
        "eval_prompts": data["prompts"],
    }
    rollout = {"samples_per_prompt": 4, "max_new_tokens": 24, "temperature": 0.7, "heldout_prompts": 64}
    md = run("mdloo", "mdloo", {**rollout, "prompts_per_rollout": 16, "inner_steps": 4,
             "train": train_cfg(1e-4, 40, batch=16, warmup=2), "eval": EVAL}, inputs).metrics  # fmt: skip
    warp = run("warp", "rlhf_warp", {**rollout, "runs": 2, "prompts_per_rollout": 8, "eta": 0.3,
               "sweep": [0.0, 0.2, 0.4, 0.6, 0.8, 1.0], "train": train_cfg(1e-4, 20, batch=32, warmup=2),
               "eval": EVAL}, inputs).metrics  # fmt: skip

    gold = sft.metrics["gold_reward"]
    print("\n| policy | held-out RM score | KL to SFT | held-out gold (sampled) | gold (greedy) |")
    print("| --- | --- | --- | --- | --- |")
    print(f"| sft | {md['heldout_rm_reward_before']:.3f} | 0 | {md['heldout_gold_sampled_before']:.3f} | {gold:.3f} |")
    print(f"| mdloo | {md['heldout_rm_reward']:.3f} | {md['heldout_kl']:.3f} | {md['heldout_gold_sampled']:.3f} "
          f"| {md['gold_reward']:.3f} |")  # fmt: skip
    for point in ["eta0", "eta0.2", "eta0.4", "eta0.6", "eta0.8", "eta1", "run0", "run1"]:
        print(f"| warp {point} | {warp[f'sweep_{point}_rm_reward']:.3f} | {warp[f'sweep_{point}_kl']:.3f} | | |")
    print(f"| warp output (η=0.3) | | | | {warp['gold_reward']:.3f} |")
    print(f"WARP frontier gaps: run0 {warp['frontier_gap_run0']:+.3f}, run1 {warp['frontier_gap_run1']:+.3f}")

    assert md["heldout_rm_reward"] > md["heldout_rm_reward_before"] + 0.1
    assert md["gold_reward_before"] == pytest.approx(gold)
    assert warp["frontier_gap_min"] >= 0
    assert warp["gold_reward"] >= warp["gold_reward_before"] - 0.02
