"""Batched, seeded sampling with a KV cache (transformers' generate, left padding).

`sample_policy` is the RL stages' sampler: it draws from exactly softmax(logits / T) (no top-k, no
top-p, nothing the checkpoint's generation config asks for) and returns the sampled token ids, so the
log-probabilities of a ratio or a KL penalty are of the distribution sampled and of the tokens sampled.
`generate`, `sample_chat` and `generate_chat` return text for everything else.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from pydantic import Field

from llmfab.config.base import StrictModel
from llmfab.tracking import timing


@dataclass
class Samples:
    """Completions as sampled, one entry each: the prompt ids the model conditioned on, the sampled ids
    (through the stop token when one ended the completion, nothing after it), whether one did, and the
    decoded text (special tokens skipped, stripped: for reward models, verifiers and logs)."""

    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]
    finished: list[bool]
    texts: list[str]


@contextlib.contextmanager
def _without_model_defaults(model):
    """generate() fills every setting it is not given from the model's own generation config, so a
    checkpoint's repetition_penalty, top_p, bad_words_ids, ... would each add a logits processor:
    a blank config stands in for the call."""
    from transformers import GenerationConfig

    saved = model.generation_config
    model.generation_config = GenerationConfig()
    try:
        yield
    finally:
        model.generation_config = saved


def _left_padded(prompt_ids: list[list[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompt_ids)
    ids = [[pad_token_id] * (width - len(p)) + p for p in prompt_ids]
    mask = [[0] * (width - len(p)) + [1] * len(p) for p in prompt_ids]
    return torch.tensor(ids, dtype=torch.long), torch.tensor(mask, dtype=torch.long)


def _cut_at_stop(tokens: list[int], stop: set[int]) -> tuple[list[int], bool]:
    """The sampled ids through the first stop token (generate pads the row after it), and whether there was one."""
    for i, token in enumerate(tokens):
        if token in stop:
            return tokens[: i + 1], True
    return tokens, False


@torch.no_grad()
def sample_ids(
    model,
    prompt_ids: list[list[int]],
    *,
    pad_token_id: int,
    stop_token_ids: list[int] | None,
    max_new_tokens: int = 64,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int | None = None,
    seed: int = 0,
    batch_size: int = 16,
    exact: bool = False,
) -> tuple[list[list[int]], list[bool]]:
    """One completion per prompt as token ids (see `_cut_at_stop`), with whether a stop token ended it
    (the others hit max_new_tokens); greedy when temperature == 0. `top_k` None keeps the model's
    generation config (transformers defaults to 50); 0 samples from the whole distribution. With
    `exact`, samples come from softmax(logits / temperature) itself: no top-k or top-p, and nothing
    from the model's generation config. No stop tokens: every completion is max_new_tokens long."""
    model.eval()
    torch.manual_seed(seed)
    if exact:
        top_k, top_p = 0, 1.0
    sampling = {"temperature": temperature, "top_p": top_p} if temperature > 0 else {}
    if sampling and top_k is not None:
        sampling["top_k"] = top_k
    stop = set(stop_token_ids or [])
    device = next(model.parameters()).device
    completions, finished = [], []
    with _without_model_defaults(model) if exact else contextlib.nullcontext():
        for i in range(0, len(prompt_ids), batch_size):
            ids, mask = _left_padded(prompt_ids[i : i + batch_size], pad_token_id)
            with timing.timed("generate"):
                out = model.generate(
                    input_ids=ids.to(device),
                    attention_mask=mask.to(device),
                    max_new_tokens=max_new_tokens,
                    pad_token_id=pad_token_id,
                    eos_token_id=sorted(stop) or None,
                    do_sample=bool(sampling),
                    **sampling,
                )
            for row in out[:, ids.shape[1] :].tolist():
                tokens, done = _cut_at_stop(row, stop)
                completions.append(tokens)
                finished.append(done)
    return completions, finished


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
    distribution. Generation stops at EOS, or at any of `stop_token_ids` when given. With
    `with_finished`, also says which completions ended with a stop token (the others hit max_new_tokens)."""
    if not prompts:
        return ([], []) if with_finished else []
    stop = [t for t in stop_token_ids or [tokenizer.eos_token_id] if t is not None] if stop_at_eos else None
    ids, finished = sample_ids(
        model,
        tokenizer(prompts, add_special_tokens=False)["input_ids"],
        pad_token_id=tokenizer.pad_token_id,
        stop_token_ids=stop,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        seed=seed,
        batch_size=batch_size,
    )
    outputs = tokenizer.batch_decode(ids, skip_special_tokens=True)
    return (outputs, finished) if with_finished else outputs


def sample_chat_ids(
    model, tokenizer, prompts: list[str], *, n: int = 1, stop_token_ids: list[int] | None = None, **kwargs
) -> Samples:
    """`n` assistant replies to each user prompt, rendered with the chat template, as one flat list
    (prompt i's replies at i*n ... i*n+n-1), stopping at the turn terminator. All n x len(prompts)
    samples share batches (one seeded stream). `kwargs` go to sample_ids."""
    from llmfab.data.chat import prompt_text
    from llmfab.data.chat import stop_token_ids as turn_ends

    rendered = [prompt_text(tokenizer, p) for p in prompts]
    prompt_ids = [ids for ids in tokenizer(rendered, add_special_tokens=False)["input_ids"] for _ in range(n)]
    if not prompt_ids:
        return Samples([], [], [], [])
    completions, finished = sample_ids(
        model,
        prompt_ids,
        pad_token_id=tokenizer.pad_token_id,
        stop_token_ids=stop_token_ids or turn_ends(tokenizer),
        **kwargs,
    )
    texts = [t.strip() for t in tokenizer.batch_decode(completions, skip_special_tokens=True)]
    return Samples(prompt_ids, completions, finished, texts)


def sample_policy(model, tokenizer, prompts: list[str], *, n: int = 1, temperature: float = 1.0, **kwargs) -> Samples:
    """sample_chat_ids from exactly softmax(logits / temperature): what the RL stages (their rollouts,
    online DPO's episodes, the held-out KL) and evaluate's KL estimate need, since their log-probs are
    of that distribution. `kwargs`: max_new_tokens, seed, batch_size."""
    if temperature <= 0:
        raise ValueError(f"policy sampling needs a temperature > 0, got {temperature}")
    return sample_chat_ids(model, tokenizer, prompts, n=n, temperature=temperature, exact=True, **kwargs)


def sample_chat(model, tokenizer, prompts: list[str], *, n: int = 1, **kwargs) -> tuple[list[str], list[bool]]:
    """sample_chat_ids as text: the replies and whether each ended at the turn terminator."""
    samples = sample_chat_ids(model, tokenizer, prompts, n=n, **kwargs)
    return samples.texts, samples.finished


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
    from llmfab.train.distributed import training_device

    out: list[list[tuple[str, int]]] = [[] for _ in prompts]
    vocab = tokenizer.get_vocab()
    for index, ref in enumerate(refs):
        # Same size is not enough: two BPEs trained apart share a length but not their merges.
        if load_tokenizer(ref).get_vocab() != vocab:
            raise DataError(f"{ref} has a different tokenizer than {refs[0]}")
        model = load_model(ref, device=training_device())  # a GPU when there is one
        groups = generate_chat(model, tokenizer, prompts, n=n, seed=seed + index, **kwargs)
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
