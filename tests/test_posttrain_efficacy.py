"""Post-training on the tiny testbed, end to end (slow): base -> SFT -> RM -> DPO (written pairs, and
pairs of the policy's own answers ranked by the verifier) / online DPO / rejection sampling, every
policy measured by the gold reward on prompts no stage trained on.

Asserted: SFT lifts the gold reward far above the base model, the reward model ranks held-out
pairs clearly above chance, rejection sampling improves on SFT, and no preference stage collapses
the policy. The DPO stages' changes over SFT are printed, not asserted: at this scale the policy
cannot learn held-out arithmetic (greedy 0/15 distinct prompts, sampled ~10%) and has saturated the
format task (pass@8 = pass@1), so the held-out set (29 distinct prompts) leaves them one or two
prompts either way; the post-training issue's closing note has the measurements.
"""

import pytest

from llmfab.stages.runner import run_stage
from llmfab.storage import open_store

EVAL = {"prompts": 300, "max_new_tokens": 24}
LLAMA = dict(arch="llama", vocab_size=1024, hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=2,
             intermediate_size=352, max_position_embeddings=256)  # fmt: skip


def _train(lr, steps, batch=8, warmup=5):
    return {"max_steps": steps, "batch_size": batch, "optim": {"lr": lr, "warmup_steps": warmup}}


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_post_training_chain_on_the_tiny_testbed(tmp_path):
    root = open_store(tmp_path)

    def run(step, stage, cfg, inputs=None):
        return run_stage(stage, cfg, inputs or {}, store=root.sub(step), track=False, show_progress=False)

    # Tasks a 128-wide model can learn to generalise to unseen prompts: single-digit arithmetic and
    # "repeat the word n times"; only 400 written conversations, plenty of prompts and pairs.
    data = run("data", "prepare_data", dict(
        prose_docs=1000, code_docs=300, task_docs=3000, sft_examples=2000, prompts=2000, preference_pairs=3000,
        tasks=["arithmetic", "format"], format_kinds=["repeat"], max_operand=9,
    )).outputs  # fmt: skip
    tok = run("tok", "train_tokenizer", {"vocab_size": 1024}, {"corpus": data["text"]}).outputs["tokenizer"]
    base = run(
        "base",
        "pretrain",
        {"model": LLAMA, "seq_len": 256, "mixture": {"tasks": 2.0}, "train": _train(2e-3, 300)},
        {"corpus": data["text"], "tokenizer": tok},
    ).outputs["model"]
    common = {"eval_prompts": data["prompts"]}
    sft = run("sft", "sft", {"max_examples": 400, "train": _train(1e-3, 150, warmup=10), "eval": EVAL},
              {"model": base, "data": data["sft"], **common})  # fmt: skip
    rm = run("rm", "reward_model", {"train": _train(1e-3, 300, batch=16, warmup=10)},
             {"init": sft.outputs["model"], "data": data["preferences"]})  # fmt: skip
    policy = sft.outputs["model"]
    dpo = run("dpo", "dpo", {"beta": 0.1, "nll_weight": 0.2, "train": _train(3e-5, 100), "eval": EVAL},
              {"model": policy, "data": data["preferences"], **common})  # fmt: skip
    pairs = run("pairs", "collect_preferences", {
        "samples_per_model": 4, "temperature": 0.7, "max_new_tokens": 24, "max_prompts": 1600,
    }, {"models": policy, "prompts": data["prompts"]})  # fmt: skip
    own = run("dpo_own", "dpo", {"beta": 0.1, "nll_weight": 1.0, "train": _train(3e-5, 100), "eval": EVAL},
              {"model": policy, "data": pairs.outputs["data"], **common})  # fmt: skip
    online = run("online_dpo", "online_dpo", {
        "episodes": 4, "prompts_per_episode": 64, "samples_per_prompt": 4, "max_new_tokens": 24,
        "train": _train(2e-5, 80), "eval": EVAL,
    }, {"model": policy, "reward_model": rm.outputs["model"], "prompts": data["prompts"], **common})  # fmt: skip
    rs = run("rs", "rejection_sampling", {
        "samples_per_model": 4, "temperature": 0.7, "max_new_tokens": 24, "max_prompts": 800,
        "sft": {"train": _train(3e-5, 80), "eval": EVAL},
    }, {"model": policy, "reward_model": rm.outputs["model"], "prompts": data["prompts"], **common})  # fmt: skip

    s = sft.metrics
    rows = [("base", s["gold_reward_before"]), ("sft", s["gold_reward"])]
    rows += [
        (name, r.metrics["gold_reward"])
        for name, r in (("dpo", dpo), ("dpo_own_answers", own), ("online_dpo", online), ("rs", rs))
    ]
    print("\n| policy | gold reward (held-out) | vs SFT |\n| --- | --- | --- |")
    for name, value in rows:
        print(f"| {name} | {value:.3f} | {value - s['gold_reward']:+.3f} |")
    acc = rm.metrics
    print(f"reward model held-out accuracy {acc['eval_accuracy']:.3f} (before {acc['eval_accuracy_before']:.3f})")
    print(f"online DPO last episode: gold of RM-chosen {online.metrics.get('episode_gold_chosen')}, "
          f"RM-rejected {online.metrics.get('episode_gold_rejected')}")  # fmt: skip
    print(f"own-answer pairs: {pairs.metrics['pairs']:.0f}, verifier score chosen "
          f"{pairs.metrics['score_chosen']:.3f} vs rejected {pairs.metrics['score_rejected']:.3f}")  # fmt: skip
    print(f"rejection sampling: gold of all samples {rs.metrics['gold_reward_all']:.3f}, "
          f"kept {rs.metrics['gold_reward_kept']:.3f}")  # fmt: skip

    assert s["gold_reward"] >= s["gold_reward_before"] + 0.3
    assert rm.metrics["eval_accuracy"] >= 0.6 > rm.metrics["eval_accuracy_before"]
    assert rs.metrics["gold_reward"] > s["gold_reward"]
    assert pairs.metrics["score_chosen"] > pairs.metrics["score_rejected"]
    for name, value in rows[2:]:
        assert value >= 0.5 * s["gold_reward"], f"{name} collapsed the policy: {value:.3f}"
