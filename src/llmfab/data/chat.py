"""Conversations as token ids with loss masks, through the tokenizer's own chat template.

Every assistant turn's content and its terminator are masked 1, nothing else. Templates with
`{% generation %}` marks (ours) give the mask directly, and so do the official Qwen2 / Llama 3.1 /
Gemma 2 templates through their marked copies (chat_templates.py). For any other template (most hub
tokenizers) each assistant turn is what rendering the conversation through that turn adds to the
conversation before it rendered with `add_generation_prompt`, cut after the turn's stop token.
"""

from __future__ import annotations

from llmfab.chat_templates import marked_template
from llmfab.errors import DataError
from llmfab.tokenizer import IM_END

IGNORE = -100


def _render(tokenizer, messages: list[dict], **kwargs):
    from jinja2 import TemplateError

    try:
        return tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, **kwargs)
    except TemplateError as exc:  # e.g. Gemma's template refuses a system turn
        name = getattr(tokenizer, "name_or_path", "")
        raise DataError(f"chat template of {name!r} refuses the conversation: {exc}") from None


def prompt_messages(prompt: str) -> list[dict]:
    return [{"role": "user", "content": prompt}]


def prompt_text(tokenizer, prompt: str | list[dict]) -> str:
    """The prompt as the model sees it before it answers (for generation)."""
    messages = prompt_messages(prompt) if isinstance(prompt, str) else prompt
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def encode_chat(tokenizer, messages: list[dict]) -> tuple[list[int], list[int]]:
    """(input ids, mask) where mask is 1 on tokens the model should learn to write: each assistant
    turn's content and end token."""
    if not tokenizer.chat_template:
        raise DataError(f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no chat template")
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError("the conversation has no assistant turn to learn")
    marked = marked_template(tokenizer.chat_template)
    if marked is not None:
        out = _render(tokenizer, messages, chat_template=marked, return_assistant_tokens_mask=True)
        return list(out["input_ids"]), list(out["assistant_masks"])
    return _encode_turn_by_turn(tokenizer, messages)


def _encode_turn_by_turn(tokenizer, messages: list[dict]) -> tuple[list[int], list[int]]:
    """Masks from prefix renderings, one per assistant turn: sound only when rendering more turns never
    changes the tokens of earlier ones, which is checked."""
    ids = list(_render(tokenizer, messages)["input_ids"])
    mask = [0] * len(ids)
    stops = set(stop_token_ids(tokenizer))
    for n, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = list(_render(tokenizer, messages[:n], add_generation_prompt=True)["input_ids"])
        through = list(_render(tokenizer, messages[: n + 1])["input_ids"])
        if through[: len(before)] != before or ids[: len(through)] != through:
            raise DataError(
                f"chat template of {getattr(tokenizer, 'name_or_path', '')!r} is not prefix-stable (assistant "
                f"turn {n} renders differently inside the longer conversation), so its loss mask is unknown: "
                "use a template with {% generation %} marks"
            )
        turn = through[len(before) :]
        end = max((i + 1 for i, t in enumerate(turn) if t in stops), default=len(turn))  # not the newline after
        mask[len(before) : len(before) + end] = [1] * end
    return ids, mask


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
