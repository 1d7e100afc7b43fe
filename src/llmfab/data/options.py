"""How a stage reads its data: which splits, how much to hold out, which columns are which.

Every stage that reads a dataset has these fields (its config inherits DataOptions), so one can
train on a hub dataset as it is published:

    llmfab stage sft ... --set train_split=train_sft --set test_split=test_sft
    llmfab stage dpo ... --set 'columns={prompt: question, chosen: good, rejected: bad}'

A stage reads by role ("train" or "test"); `split_for` maps the role to the configured split name.
When the dataset has no test split, `test_size` of its train split is held out (a seeded choice,
the same on every read and in every stage): the test role reads exactly those records, the train role
all the others. `columns` maps llmfab's field names (messages, prompt, completion, chosen, rejected,
text) to the dataset's own column names. The options apply to the stage's own data input (data,
prompts, corpus); an `eval_prompts` or `long_data` input is read as llmfab wrote it (train/test).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from llmfab.config.base import StrictModel

Role = Literal["train", "test"]


class DataOptions(StrictModel):
    """The data fields of every stage config that reads a dataset (its main data input)."""

    train_split: str = Field("train", min_length=1, description="split the stage trains on (e.g. train_sft)")
    test_split: str = Field("test", min_length=1, description="split the stage evaluates on (e.g. test_sft)")
    test_size: int | float = Field(
        0.05,
        description="when the dataset has no test split: records of the train split held out for evaluation, "
        "a share (0 < x < 1) or a count; 0: none (a missing test split is then an error)",
    )
    columns: dict[str, str] = Field(
        default_factory=dict,
        description="llmfab field -> the dataset's column holding it, e.g. {messages: conversation}",
    )
    num_proc: int = Field(1, ge=1, description="processes that tokenize the dataset (Dataset.map)")

    @field_validator("test_size")
    @classmethod
    def _share_or_count(cls, value: int | float) -> int | float:
        if isinstance(value, float) and not 0 < value < 1:
            raise ValueError("a share of the train split is a float between 0 and 1 (or give a count, an int)")
        if isinstance(value, int) and value < 0:
            raise ValueError("a count of held-out records is 0 or more")
        return value

    def split_for(self, role: Role) -> str:
        return self.train_split if role == "train" else self.test_split

    def held_out_count(self, total: int) -> int:
        """Records of a `total`-record train split held out (at least one, never all, for a share)."""
        if isinstance(self.test_size, float):
            return min(total - 1, max(1, round(total * self.test_size))) if total > 1 else 0
        return min(self.test_size, total)
