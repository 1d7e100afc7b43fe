"""Conversations as token ids with loss masks, through the tokenizer's own chat template.

Templates with `{% generation %}` marks (ours) give the assistant-token mask directly; for
templates without them (most hub tokenizers) the last assistant turn is whatever the full
conversation adds after the prompt rendered with `add_generation_prompt`.
"""

from __future__ import annotations

from llmfab.errors import DataError
from llmfab.tokenizer import IM_END

IGNORE = -100


def _render(tokenizer, messages: list[dict], **kwargs) -> list[int]:
    out = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, **kwargs)
    return list(out["input_ids"])


def prompt_messages(prompt: str) -> list[dict]:
    return [{"role": "user", "content": prompt}]


def prompt_text(tokenizer, prompt: str | list[dict]) -> str:
    """The prompt as the model sees it before it answers (for generation)."""
    messages = prompt_messages(prompt) if isinstance(prompt, str) else prompt
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def encode_chat(tokenizer, messages: list[dict]) -> tuple[list[int], list[int]]:
    """(input ids, mask) where mask is 1 on tokens the model should learn to write."""
    if not tokenizer.chat_template:
        raise DataError(f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no chat template")
    if "{% generation %}" in tokenizer.chat_template:
        out = tokenizer.apply_chat_template(
            messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
        )
        return list(out["input_ids"]), list(out["assistant_masks"])
    if messages[-1]["role"] != "assistant":
        raise DataError("the conversation must end with an assistant turn")
    prompt = _render(tokenizer, messages[:-1], add_generation_prompt=True)
    full = _render(tokenizer, messages)
    if full[: len(prompt)] != prompt:
        raise DataError("chat template renders the prompt differently inside the full conversation")
    return full, [0] * len(prompt) + [1] * (len(full) - len(prompt))


def encode_response(tokenizer, prompt: str, response: str) -> tuple[list[int], list[int]]:
    """A single-turn exchange: ids of prompt + response, mask 1 on the response (with its end token)."""
    return encode_chat(tokenizer, [*prompt_messages(prompt), {"role": "assistant", "content": response}])


def stop_token_ids(tokenizer) -> list[int]:
    """Tokens that end an assistant turn: EOS and the template's turn terminator."""
    ids = {tokenizer.eos_token_id}
    for token in (IM_END, "<|eot_id|>", "<end_of_turn>"):
        token_id = tokenizer.convert_tokens_to_ids(token)
        if isinstance(token_id, int) and token_id != tokenizer.unk_token_id:
            ids.add(token_id)
    return sorted(i for i in ids if i is not None)


def formatting_mask(tokenizer, ids: list[int]) -> list[int]:
    """1 on special (formatting) tokens: headers and turn terminators (Llama 3.1 masks them in DPO)."""
    special = set(tokenizer.all_special_ids) | set(stop_token_ids(tokenizer))
    return [int(i in special) for i in ids]
