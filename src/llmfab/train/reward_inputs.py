"""What a reward model reads when it scores the policy's answers: the policy's ids as they are when both
share a tokenizer, else the answers as text, re-encoded with the reward model's own tokenizer and chat
template (a hub reward model over another vocabulary would otherwise read the policy's ids as
different tokens).

load_reward_model remembers such a reward model's tokenizer on the module; the scoring functions
(rollouts.sample_scores, and callers of pairs.reward_scores through scoring_tokenizer) read it from
there, so the same-tokenizer path is the one it always was."""

from __future__ import annotations

from llmfab.data.chat import encode_chat, prompt_messages
from llmfab.errors import CheckpointError
from llmfab.models import load_model, load_tokenizer

OWN_TOKENIZER = "llmfab_tokenizer"  # attribute of a reward model whose tokenizer differs from the policy's


def same_tokenizer(a, b) -> bool:
    """Same ids for the same text and the same chat template; name_or_path says nothing (every
    checkpoint of one tokenizer has its own path)."""
    if a is b:
        return True
    return (
        a.get_vocab() == b.get_vocab()
        and a.chat_template == b.chat_template
        and a.all_special_tokens == b.all_special_tokens
    )


def load_reward_model(ref: str, policy_tokenizer, **kwargs):
    """load_model(ref, kind='reward'), carrying its own tokenizer when that differs from the policy's."""
    model = load_model(ref, kind="reward", **kwargs)
    try:
        own = load_tokenizer(ref)
    except CheckpointError:  # a checkpoint without a tokenizer reads the policy's ids
        return model
    if not same_tokenizer(own, policy_tokenizer):
        setattr(model, OWN_TOKENIZER, own)
    return model


def scoring_tokenizer(reward_model, policy_tokenizer):
    """The tokenizer to encode text for `reward_model` with."""
    return getattr(reward_model, OWN_TOKENIZER, None) or policy_tokenizer


def reencoded(tokenizer, prompts: list, responses: list[str], finished: list[bool]) -> list[list[int]]:
    """Each (prompt, response) in `tokenizer`'s chat template: a finished answer as a closed assistant turn,
    a cut-off one as the prompt followed by the answer's tokens (nothing closes it, as it was sampled)."""
    out = []
    for prompt, response, done in zip(prompts, responses, finished, strict=True):
        messages = prompt_messages(prompt) if isinstance(prompt, str) else list(prompt)
        if done:
            out.append(encode_chat(tokenizer, [*messages, {"role": "assistant", "content": response}])[0])
        else:
            head = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, add_generation_prompt=True)
            out.append(list(head["input_ids"]) + tokenizer(response, add_special_tokens=False)["input_ids"])
    return out
