"""Record schemas, one per dataset kind a stage consumes, and the one form each kind is read into.

Records may come in any of TRL's dataset formats; reading normalises them (`model_dump` of the schema):

- text: `{"text": str, "source": str}` (language modeling).
- chat: `{"messages": [message, ...], "task", "meta"}`. A prompt-completion record becomes its prompt
  messages followed by its completion messages (a string prompt is one user turn, a string completion one
  assistant turn), so the loss falls on the completion only.
- prompt: `{"prompt": str | [message, ...], "task", "meta"}` (prompt-only; a string or a conversation). A
  preference pair gives its prompt (explicit or implicit), a conversation its turns before the last answer.
- preference: `{"prompt", "chosen", "rejected", "level", "margin", "task", "meta"}` where the prompt is a
  string or a conversation and chosen/rejected a string or the assistant message(s) that answer it. An
  implicit prompt (chosen and rejected are whole conversations or texts) is extracted as their shared
  prefix, as TRL's `extract_prompt` does.

A message is `{"role": system|user|assistant|tool, "content": str, ...}`: a content given as a list of
parts (`[{"type": "text", "text": ...}]`) is joined into one string; other keys (tool_calls, name,
tool_call_id) are kept for the chat template.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, field_validator, model_validator

DatasetKind = Literal["text", "chat", "prompt", "preference"]


class _Record(BaseModel):
    # Extra columns are kept (datasets often carry ids or provenance), required ones are checked.
    model_config = ConfigDict(extra="allow")


class TextRecord(_Record):
    """Pre-training text. `source` names the mixture component (prose, code, math, ...)."""

    text: str = Field(min_length=1)
    source: str = "text"


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")  # tool_calls, name, tool_call_id, ... go to the template
    role: Literal["system", "user", "assistant", "tool"]
    content: str

    @model_validator(mode="before")
    @classmethod
    def _drop_absent(cls, data):
        """Parquet/Arrow gives every message every key any message has (None where absent): drop those."""
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if v is not None or k in ("role", "content")}
        return data

    @field_validator("content", mode="before")
    @classmethod
    def _text_parts(cls, content):
        """TRL's multimodal-style content: a list of parts, of which llmfab reads text only."""
        if content is None:
            return ""  # an assistant turn that only calls tools
        if isinstance(content, list):
            texts = []
            for i, part in enumerate(content):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                if kind != "text" or not isinstance(part.get("text"), str):
                    raise ValueError(f"content part {i} is of type {kind!r}; only text parts are supported")
                texts.append(part["text"])
            return "".join(texts)
        return content


Conversation = list[Message]


def _text_or_conversation(value) -> str:
    return "str" if isinstance(value, str) else "list"


# Text or a conversation; the tag names the branch, so an error reports that branch only (see UNION_TAGS).
Prompt = Annotated[
    Annotated[Annotated[str, Field(min_length=1)], Tag("str")]
    | Annotated[Annotated[Conversation, Field(min_length=1)], Tag("list")],
    Discriminator(_text_or_conversation),
]
Response = Annotated[
    Annotated[str, Tag("str")] | Annotated[Conversation, Tag("list")], Discriminator(_text_or_conversation)
]
UNION_TAGS = ("str", "list")  # left out of the field paths that errors name


def as_messages(value: str | list[dict], role: str) -> list[dict]:
    """A normalised prompt (role "user") or response (role "assistant") as a list of messages."""
    return [{"role": role, "content": value}] if isinstance(value, str) else list(value)


def last_text(value: str | list[dict]) -> str:
    """A prompt or response as one line of a samples table: the text, or the last message's content."""
    return value if isinstance(value, str) else value[-1]["content"]


def _is_conversation(value) -> bool:
    return isinstance(value, list) and all(isinstance(m, dict) and "role" in m for m in value)


class ChatRecord(_Record):
    """A conversation for SFT; the loss falls on assistant turns only."""

    messages: Conversation = Field(min_length=1)
    task: str | None = None
    meta: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _from_prompt_completion(cls, data):
        if isinstance(data, dict) and "messages" not in data and "prompt" in data and "completion" in data:
            data = dict(data)
            prompt, completion = data.pop("prompt"), data.pop("completion")
            prompt = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
            completion = [{"role": "assistant", "content": completion}] if isinstance(completion, str) else completion
            if not isinstance(prompt, list) or not isinstance(completion, list):
                raise ValueError("prompt and completion must each be a string or a list of messages")
            data["messages"] = [*prompt, *completion]
        return data

    @field_validator("messages")
    @classmethod
    def _has_assistant(cls, messages: list[Message]) -> list[Message]:
        if not any(m.role == "assistant" for m in messages):
            raise ValueError("a chat record needs at least one assistant message")
        return messages


class PromptRecord(_Record):
    """A prompt for sampling (RS, online DPO, RL). `task`/`meta` let the gold reward score it.

    Preference and conversational data serve as prompts too (online DPO on UltraFeedback's pairs, as TRL's
    recipes do): a pair's prompt, explicit or implicit, or a conversation's turns before its last answer."""

    prompt: Prompt
    task: str | None = None
    meta: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _from_pair_or_conversation(cls, data):
        if not isinstance(data, dict) or data.get("prompt") is not None:
            return data
        data = dict(data)
        if "chosen" in data and "rejected" in data:
            data["prompt"] = extract_prompt(data.pop("chosen"), data.pop("rejected"))[0]
        elif _is_conversation(data.get("messages")):
            messages = data.pop("messages")
            last = max((i for i, m in enumerate(messages) if m.get("role") == "assistant"), default=len(messages))
            data["prompt"] = messages[:last]
        return data


def extract_prompt(chosen, rejected) -> tuple[Any, Any, Any]:
    """(prompt, chosen, rejected) of an implicit-prompt pair: the prompt is the longest shared prefix (of
    messages, or of text: then not ending inside the space before the answers), as TRL's extract_prompt."""
    if type(chosen) is not type(rejected):
        raise ValueError("chosen and rejected must both be strings or both conversations")
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    if isinstance(chosen, str) and n > 0 and chosen[n - 1] == " ":
        n -= 1
    if n == 0:
        raise ValueError("no prompt: give a 'prompt' column, or chosen and rejected that start with the same prompt")
    return chosen[:n], chosen[n:], rejected[n:]


class PreferenceRecord(_Record):
    """A preference pair. `level` 0..3 = significantly/better/slightly/negligibly better (AFM)."""

    prompt: Prompt
    chosen: Response
    rejected: Response
    level: int | None = Field(None, ge=0, le=3)
    margin: float | None = Field(None, allow_inf_nan=False)
    task: str | None = None
    meta: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _implicit_prompt(cls, data):
        if not isinstance(data, dict) or "chosen" not in data or "rejected" not in data:
            return data
        prompt, chosen = data.get("prompt"), data["chosen"]
        # No prompt, or a string prompt beside whole conversations (the conversations repeat it): extract it.
        if prompt is None or (isinstance(prompt, str) and _is_conversation(chosen)):
            data = dict(data)
            data["prompt"], data["chosen"], data["rejected"] = extract_prompt(chosen, data["rejected"])
        return data

    @model_validator(mode="after")
    def _distinct(self):
        if self.chosen == self.rejected:
            raise ValueError("chosen and rejected responses are identical")
        if [] in (self.chosen, self.rejected):
            raise ValueError("chosen and rejected each need at least one message after the prompt")
        return self


SCHEMAS: dict[str, type[BaseModel]] = {
    "text": TextRecord,
    "chat": ChatRecord,
    "prompt": PromptRecord,
    "preference": PreferenceRecord,
}
