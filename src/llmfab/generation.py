"""Batched, seeded sampling with a KV cache (transformers' generate, left padding)."""

from __future__ import annotations

import torch
from pydantic import Field

from llmfab.config.base import StrictModel
from llmfab.tracking import timing


@torch.no_grad()
def generate(
    model,
    tokenizer,
    prompts: list[str],
    *,
    max_new_tokens: int = 64,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int | None = None,
    seed: int = 0,
    batch_size: int = 16,
    stop_at_eos: bool = True,
    stop_token_ids: list[int] | None = None,
    with_finished: bool = False,
) -> list[str] | tuple[list[str], list[bool]]:
    """One completion per prompt (greedy when temperature == 0); the prompt is not included. `top_k`
    None keeps the model's generation config (transformers defaults to 50); 0 samples from the whole
    distribution, which an estimate over samples (KL) needs.
    Generation stops at EOS, or at any of `stop_token_ids` when given. With `with_finished`,
    also says which completions ended with a stop token (the others hit max_new_tokens)."""
    model.eval()
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    torch.manual_seed(seed)
    stop = (stop_token_ids or tokenizer.eos_token_id) if stop_at_eos else None
    outputs, finished = [], []
    stop_ids = torch.tensor([stop] if isinstance(stop, int) else (stop or []), dtype=torch.long)
    try:
        for i in range(0, len(prompts), batch_size):
            enc = tokenizer(prompts[i : i + batch_size], return_tensors="pt", padding=True, add_special_tokens=False)
            enc = enc.to(next(model.parameters()).device)
            sampling = (
                {"do_sample": True, "temperature": temperature, "top_p": top_p}
                | ({"top_k": top_k} if top_k is not None else {})
                if temperature > 0
                else {"do_sample": False}
            )
            with timing.timed("generate"):
                out = model.generate(
                    **enc,
                    max_new_tokens=max_new_tokens,
                    pad_token_id=tokenizer.pad_token_id,
                    eos_token_id=stop,
                    **sampling,
                )
            new_tokens = out[:, enc["input_ids"].shape[1] :]
            outputs.extend(tokenizer.batch_decode(new_tokens, skip_special_tokens=True))
            finished.extend(torch.isin(new_tokens.cpu(), stop_ids).any(-1).tolist())
    finally:
        tokenizer.padding_side = side
    return (outputs, finished) if with_finished else outputs


def sample_chat(model, tokenizer, prompts: list[str], *, n: int = 1, **kwargs) -> tuple[list[str], list[bool]]:
    """`n` assistant replies to each user prompt, rendered with the chat template, as one flat list
    (prompt i's replies at i*n ... i*n+n-1) with whether each ended at the turn terminator. All
    n x len(prompts) samples share batches (one seeded stream)."""
    from llmfab.data.chat import prompt_text, stop_token_ids

    rendered = [prompt_text(tokenizer, p) for p in prompts for _ in range(n)]
    kwargs.setdefault("stop_token_ids", stop_token_ids(tokenizer))
    texts, finished = generate(model, tokenizer, rendered, with_finished=True, **kwargs)
    return [t.strip() for t in texts], finished


def generate_chat(model, tokenizer, prompts: list[str], *, n: int = 1, finished_only: bool = False, **kwargs):
    """sample_chat grouped per prompt. With `finished_only`, replies cut off by max_new_tokens are
    dropped: a truncated answer is not an answer, and training on it (with an end token appended)
    would teach stopping mid-way."""
    texts, finished = sample_chat(model, tokenizer, prompts, n=n, **kwargs)
    groups = [[] for _ in prompts]
    for j, (text, done) in enumerate(zip(texts, finished, strict=True)):
        if done or not finished_only:
            groups[j // n].append(text)
    return groups


def answers_from_models(refs: list[str], tokenizer, prompts: list[str], *, n: int, seed: int, **kwargs):
    """`n` chat answers to each prompt from every checkpoint in `refs`, loaded one at a time (a
    committee need not fit in memory together); per prompt, a list of (answer, index into refs).
    Model i samples with seed + i, so adding a member leaves the others' answers unchanged."""
    from llmfab.errors import DataError
    from llmfab.models import load_model, load_tokenizer

    out: list[list[tuple[str, int]]] = [[] for _ in prompts]
    vocab = tokenizer.get_vocab()
    for index, ref in enumerate(refs):
        # Same size is not enough: two BPEs trained apart share a length but not their merges.
        if load_tokenizer(ref).get_vocab() != vocab:
            raise DataError(f"{ref} has a different tokenizer than {refs[0]}")
        groups = generate_chat(load_model(ref), tokenizer, prompts, n=n, seed=seed + index, **kwargs)
        for slot, group in zip(out, groups, strict=True):
            slot.extend((answer, index) for answer in group)
    return out


class SamplingConfig(StrictModel):
    """How a stage samples answers to its prompts from one model or a committee (mixed into the
    configs of rejection_sampling and collect_preferences)."""

    samples_per_model: int = Field(4, ge=1, description="answers per prompt from every model")
    temperature: float = Field(1.0, gt=0)
    max_new_tokens: int = Field(32, gt=0)
    max_prompts: int | None = Field(None, gt=0, description="use at most this many training prompts")
    keep_truncated: bool = Field(False, description="also use answers cut off by max_new_tokens")

    def sample_answers(self, refs: list[str], tokenizer, prompts: list[str], seed: int):
        """answers_from_models with these settings."""
        return answers_from_models(
            refs,
            tokenizer,
            prompts,
            n=self.samples_per_model,
            seed=seed,
            temperature=self.temperature,
            max_new_tokens=self.max_new_tokens,
            finished_only=not self.keep_truncated,
        )
