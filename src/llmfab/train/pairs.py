"""Preference pairs as tensors: chosen and rejected conversations, right-padded, with response
masks and lengths; the batch puts all chosen rows first, then all rejected, so one forward scores both.

Right padding needs no attention mask: with causal attention no real token sees the padding.

Where a conversation's reward is read, in training, evaluation and RL scoring alike: the reward
model's score at the conversation's last token, index len(ids) - 1 of the conversation as
encode_response encodes it (the chat template's whole final turn: ChatML's and Gemma's "\n" after the
end-of-turn token, Llama 3's <|eot_id|>), wherever a batch pads it (`reward_at_last_token`). Not
where transformers pools (the last token that is not pad): that moves when pad equals a real token
(eos, say), and trimming a batch to its response masks moved it between rows.
"""

from __future__ import annotations

import logging
import random
from functools import partial

import torch

from llmfab.data.chat import encode_chat, encode_response, formatting_mask
from llmfab.data.schemas import as_messages
from llmfab.data.tokenized import map_encode
from llmfab.errors import DataError
from llmfab.losses.preference import masked_logps_sum
from llmfab.tracking import timing
from llmfab.train.head_positions import target_logps_at
from llmfab.train.lm import step_batch
from llmfab.train.packing import pack_padded

log = logging.getLogger(__name__)

# AFM: P(chosen is better) per preference level (significantly / better / slightly / negligibly).
AFM_LEVEL_LABELS = (0.95, 0.85, 0.75, 0.65)


def pad_right(seqs: list[list[int]], value: int, length: int | None = None) -> torch.Tensor:
    """(len(seqs), length) long tensor, each row padded with `value` (default length: the longest)."""
    length = max(len(s) for s in seqs) if length is None else length
    return torch.tensor([s + [value] * (length - len(s)) for s in seqs], dtype=torch.long)


def encode_exchange(tokenizer, prompt: str | list[dict], response: str | list[dict]) -> tuple[list[int], list[int]]:
    """(ids, mask) of a prompt (text or messages) answered by a response (text or assistant messages), mask 1 on
    the response only, earlier assistant turns of a conversational prompt included. Text and text: encode_response."""
    if isinstance(prompt, str) and isinstance(response, str):
        return encode_response(tokenizer, prompt, response)
    before = as_messages(prompt, "user")
    rendered = tokenizer.apply_chat_template(before, tokenize=True, return_dict=True, add_generation_prompt=True)
    n = len(rendered["input_ids"])
    ids, mask = encode_chat(tokenizer, [*before, *as_messages(response, "assistant")])
    if ids[:n] != list(rendered["input_ids"]):
        raise DataError("chat template renders the prompt differently inside the full conversation")
    return ids, [0] * n + mask[n:]


def _encode_pair(tokenizer, mask_formatting: bool, rec: dict) -> dict[str, list[int]]:
    c_ids, c_mask = encode_exchange(tokenizer, rec["prompt"], rec["chosen"])
    r_ids, r_mask = encode_exchange(tokenizer, rec["prompt"], rec["rejected"])
    c_full = c_mask
    if mask_formatting:
        c_mask = [m * (1 - f) for m, f in zip(c_mask, formatting_mask(tokenizer, c_ids), strict=True)]
        r_mask = [m * (1 - f) for m, f in zip(r_mask, formatting_mask(tokenizer, r_ids), strict=True)]
    return {"c_ids": c_ids, "c_mask": c_mask, "c_full": c_full, "r_ids": r_ids, "r_mask": r_mask}


def encode_pairs(
    tokenizer,
    records: list[dict],
    max_len: int,
    *,
    mask_formatting: bool = False,
    level_labels: tuple[float, ...] | None = None,
    where: str = "preferences",
    num_proc: int = 1,
) -> dict[str, torch.Tensor]:
    """Tensors per pair: chosen/rejected ids, response masks (formatting tokens excluded
    when `mask_formatting`) and lengths, the full chosen response mask (for NLL), margin and soft label.
    Tokenized with Dataset.map over `num_proc` processes."""
    keys = ("c_ids", "c_mask", "c_full", "r_ids", "r_mask")
    cols: dict[str, list] = {k: [] for k in (*keys, "margin", "label")}
    sides = [{k: rec[k] for k in ("prompt", "chosen", "rejected")} for rec in records]
    encoded = map_encode(sides, partial(_encode_pair, tokenizer, mask_formatting), num_proc, desc="tokenize pairs")
    dropped = 0
    for i, rec in enumerate(records):
        if max(len(encoded["c_ids"][i]), len(encoded["r_ids"][i])) > max_len:
            dropped += 1
            continue
        for k in keys:
            cols[k].append(encoded[k][i])
        cols["margin"].append(float(rec.get("margin") or 0.0))
        level = rec.get("level")
        cols["label"].append(level_labels[level] if level_labels is not None and level is not None else 1.0)
    if dropped:
        log.warning("%s: dropped %d of %d pairs longer than %d tokens", where, dropped, len(records), max_len)
    if not cols["c_ids"]:
        raise DataError(f"{where}: no preference pairs left (all longer than max_len={max_len} or none given)")
    return pair_tensors(cols, tokenizer.pad_token_id)


def pair_tensors(cols: dict[str, list], pad_token_id: int) -> dict[str, torch.Tensor]:
    """The batch layout of pairs from per-pair lists: c_ids / r_ids (conversations), c_mask / r_mask (what the
    loss scores), c_full (the chosen response, for NLL), margin, label; rows right-padded to one length."""
    length = max(len(s) for s in cols["c_ids"] + cols["r_ids"])
    return {
        "chosen_ids": pad_right(cols["c_ids"], pad_token_id, length),
        "chosen_mask": pad_right(cols["c_mask"], 0, length),
        "chosen_full_mask": pad_right(cols["c_full"], 0, length),
        "rejected_ids": pad_right(cols["r_ids"], pad_token_id, length),
        "rejected_mask": pad_right(cols["r_mask"], 0, length),
        "chosen_length": torch.tensor([len(s) for s in cols["c_ids"]]),
        "rejected_length": torch.tensor([len(s) for s in cols["r_ids"]]),
        "margin": torch.tensor(cols["margin"], dtype=torch.float32),
        "label": torch.tensor(cols["label"], dtype=torch.float32),
    }


def trim(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop the padding columns past this batch's longest conversation (every row keeps all its tokens:
    the reward is read at each one's last)."""
    end = int(torch.cat([batch["chosen_length"], batch["rejected_length"]]).max())
    return {k: v[:, :end] if v.ndim == 2 else v for k, v in batch.items()}


def pair_batch(rows: dict[str, torch.Tensor], step: int, micro: int, batch_size: int, per_step: int):
    return trim(step_batch(rows, step, micro, batch_size, per_step))


def reward_at_last_token(reward_model, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """The reward of each right-padded row `ids` (B, T): the score head's output at its last token,
    index `lengths` - 1 (see the module docstring). `reward_model` is a transformers sequence classifier
    (its head is `score`), or a DDP / DeepSpeed wrapper of one: the forward runs through the wrapper and
    a hook keeps the head's per-token scores, which transformers would pool at the last non-pad token."""
    scores = _per_token_scores(reward_model, input_ids=ids)  # (B, T)
    rows = torch.arange(len(ids), device=scores.device)
    return scores[rows, lengths.to(scores.device) - 1].float()


def _per_token_scores(reward_model, **forward_kwargs) -> torch.Tensor:
    per_token = []
    hook = reward_model.score.register_forward_hook(lambda _module, _inputs, out: per_token.append(out))
    try:
        reward_model(**forward_kwargs, use_cache=False)
    finally:
        hook.remove()
    return per_token[-1][..., 0]


def packed_rewards(reward_model, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """reward_at_last_token of the right-padded rows `ids`, computed padding-free: the conversations packed
    into rows of the batch's width (packing.pack_padded), each read at its own last token."""
    packed = pack_padded(ids, lengths, 0)  # the pad id is never attended to nor read
    scores = _per_token_scores(reward_model, input_ids=packed["input_ids"], position_ids=packed["position_ids"])
    last = (packed["offsets"] + lengths.cpu() - 1).to(scores.device)
    return scores.flatten().index_select(0, last).float()


def pair_rewards(reward_model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen, rejected) rewards of a pair batch, in one padding-free forward."""
    ids, _ = stacked(batch)
    return packed_rewards(reward_model, ids, stacked_lengths(batch)).chunk(2)


def stacked(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, mask) of shape (2B, T): chosen rows, then rejected rows."""
    ids = torch.cat([batch["chosen_ids"], batch["rejected_ids"]])
    mask = torch.cat([batch["chosen_mask"], batch["rejected_mask"]])
    return ids, mask


def stacked_lengths(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The lengths of `stacked`'s rows: chosen, then rejected."""
    return torch.cat([batch["chosen_length"], batch["rejected_length"]])


def packed_token_logps(model, ids: torch.Tensor, lengths: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """log π(x_t | x_<t) (N, T-1) of the right-padded rows `ids` (N, T) at the tokens where `mask[:, 1:]` is 1,
    0 elsewhere: losses.preference.token_logps on those tokens, computed padding-free (the rows packed by
    packing.pack_padded) with the head on the scored positions only (head_positions)."""
    packed = pack_padded(ids, lengths, 0)  # the pad id is never attended to nor scored
    rows, cols = mask[:, 1:].nonzero(as_tuple=True)  # token cols + 1 of row `rows`, predicted at cols
    index = packed["offsets"].to(ids.device)[rows] + cols
    targets = ids[rows, cols + 1]
    scored = target_logps_at(model, index, targets, input_ids=packed["input_ids"], position_ids=packed["position_ids"])
    out = torch.zeros(ids.shape[0], ids.shape[1] - 1, dtype=scored.dtype, device=scored.device)
    return out.index_put((rows, cols), scored)


def pair_sequence_logps(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """sequence_logps of a pair batch's chosen rows, then rejected rows (2B,), padding-free."""
    ids, mask = stacked(batch)
    return masked_logps_sum(packed_token_logps(model, ids, stacked_lengths(batch), mask), mask)


@torch.no_grad()
@timing.timed("score")
def reference_logps(
    model, rows: dict[str, torch.Tensor], batch_size: int = 16, precision: str = "fp32"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequence log-probs of every chosen and rejected response under `model` (computed once), on the training
    device and under the training's autocast, so step 0's policy log-probs equal them."""
    from llmfab.train.distributed import training_device

    device = training_device()
    model.eval().to(device)
    chosen, rejected = [], []
    n = len(rows["chosen_ids"])
    for i in range(0, n, batch_size):
        batch = trim({k: v[i : i + batch_size].to(device) for k, v in rows.items()})
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            logps = pair_sequence_logps(model, batch).cpu()  # as the DPO loss computes them
        c, r = logps.chunk(2)
        chosen.append(c)
        rejected.append(r)
    return torch.cat(chosen), torch.cat(rejected)


def reward_scores(reward_model, tokenizer, prompts: list, responses: list[str], batch_size: int = 32):
    """The reward model's scalar score of each (prompt, response); a prompt is text or messages."""
    encoded = [encode_exchange(tokenizer, p, r)[0] for p, r in zip(prompts, responses, strict=True)]
    return reward_scores_of_ids(reward_model, encoded, tokenizer.pad_token_id, batch_size)


@torch.no_grad()
@timing.timed("score")
def reward_scores_of_ids(reward_model, encoded: list[list[int]], pad_token_id: int, batch_size: int = 32):
    """The reward model's scalar score of each already-encoded conversation, read at its last token."""
    reward_model.eval()
    device = next(reward_model.parameters()).device
    scores = [torch.zeros(0)]
    for i in range(0, len(encoded), batch_size):
        chunk = encoded[i : i + batch_size]
        ids = pad_right(chunk, pad_token_id).to(device)
        lengths = torch.tensor([len(seq) for seq in chunk], device=device)
        scores.append(reward_at_last_token(reward_model, ids, lengths).cpu())
    return torch.cat(scores)


def best_and_worst(scores: list[float], rng: random.Random) -> tuple[int, int] | None:
    """Indices of a best and a worst answer, ties broken at random (not by sampling order, which would
    favour the first sample); None when all answers score alike: no preference to learn. The one rule
    of every stage that pairs its own samples (collect_preferences, online_dpo)."""
    top, bottom = max(scores), min(scores)
    if top == bottom:
        return None
    return (
        rng.choice([i for i, s in enumerate(scores) if s == top]),
        rng.choice([i for i, s in enumerate(scores) if s == bottom]),
    )
