"""Record schemas, one per dataset kind a stage consumes."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

DatasetKind = Literal["text", "chat", "prompt", "preference"]


class _Record(BaseModel):
    # Extra columns are kept (datasets often carry ids or provenance), required ones are checked.
    model_config = ConfigDict(extra="allow")


class TextRecord(_Record):
    """Pre-training text. `source` names the mixture component (prose, code, math, ...)."""

    text: str = Field(min_length=1)
    source: str = "text"


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant"]
    content: str


class ChatRecord(_Record):
    """A conversation for SFT; the loss falls on assistant turns only."""

    messages: list[Message] = Field(min_length=1)
    task: str | None = None
    meta: dict[str, Any] = Field(default_factory=dict)

    @field_validator("messages")
    @classmethod
    def _has_assistant(cls, messages: list[Message]) -> list[Message]:
        if not any(m.role == "assistant" for m in messages):
            raise ValueError("a chat record needs at least one assistant message")
        return messages


class PromptRecord(_Record):
    """A prompt for sampling (RS, online DPO, RL). `task`/`meta` let the gold reward score it."""

    prompt: str = Field(min_length=1)
    task: str | None = None
    meta: dict[str, Any] = Field(default_factory=dict)


class PreferenceRecord(_Record):
    """A preference pair. `level` 0..3 = significantly/better/slightly/negligibly better (AFM)."""

    prompt: str = Field(min_length=1)
    chosen: str
    rejected: str
    level: int | None = Field(None, ge=0, le=3)
    margin: float | None = Field(None, allow_inf_nan=False)
    task: str | None = None
    meta: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _distinct(self):
        if self.chosen == self.rejected:
            raise ValueError("chosen and rejected responses are identical")
        return self


SCHEMAS: dict[str, type[BaseModel]] = {
    "text": TextRecord,
    "chat": ChatRecord,
    "prompt": PromptRecord,
    "preference": PreferenceRecord,
}
