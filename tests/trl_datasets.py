"""Small datasets in each of TRL's formats, built offline with `datasets` and written the ways the hub
publishes them: a `save_to_disk` DatasetDict and a folder of `data/<split>-00000-of-00001.parquet` files
(split names as on the hub: train_sft/test_sft, train_prefs/test_prefs), and a fake offline hub cache."""

from __future__ import annotations

from pathlib import Path

import datasets

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _user(text: str) -> dict:
    return {"role": "user", "content": text}


def _assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


def _question(i: int) -> str:
    return f"What is {i} plus {i}?"


def rows(fmt: str, n: int, start: int = 0) -> list[dict]:
    """`n` records of TRL format `fmt` (record i asks about the number start + i, so splits differ)."""
    out = []
    for i in range(start, start + n):
        q, good, bad = _question(i), f"It is {2 * i}.", f"It is {2 * i + 1}."
        out.append(
            {
                "language_modeling": {"text": f"{q} {good}"},
                "conversational": {"messages": [_user(q), _assistant(good)]},
                "prompt_only": {"prompt": q},
                "prompt_only_conversational": {"prompt": [_user(q)]},
                "prompt_completion": {"prompt": q, "completion": good},
                "prompt_completion_conversational": {"prompt": [_user(q)], "completion": [_assistant(good)]},
                "preference": {"prompt": q, "chosen": good, "rejected": bad},
                "preference_conversational": {
                    "prompt": [_user(q)],
                    "chosen": [_assistant(good)],
                    "rejected": [_assistant(bad)],
                },
                "preference_implicit": {"chosen": f"{q} {good}", "rejected": f"{q} {bad}"},
                "preference_implicit_conversational": {
                    "chosen": [_user(q), _assistant(good)],
                    "rejected": [_user(q), _assistant(bad)],
                },
            }[fmt]
        )
    return out


# format -> the llmfab dataset kind that reads it
KIND = {
    "language_modeling": "text",
    "conversational": "chat",
    "prompt_only": "prompt",
    "prompt_only_conversational": "prompt",
    "prompt_completion": "chat",
    "prompt_completion_conversational": "chat",
    "preference": "preference",
    "preference_conversational": "preference",
    "preference_implicit": "preference",
    "preference_implicit_conversational": "preference",
}


def split_names(kind: str) -> tuple[str, str]:
    """The hub's split names for a kind: ultrachat's train_sft/test_sft, ultrafeedback's train_prefs/test_prefs."""
    return ("train_prefs", "test_prefs") if kind == "preference" else ("train_sft", "test_sft")


def save_to_disk(folder: Path, splits: dict[str, list[dict]]) -> str:
    datasets.DatasetDict({name: datasets.Dataset.from_list(recs) for name, recs in splits.items()}).save_to_disk(
        str(folder)
    )
    return str(folder)


def save_hub_parquet(folder: Path, splits: dict[str, list[dict]]) -> str:
    """The hub's layout: data/<split>-00000-of-00001.parquet per split."""
    (folder / "data").mkdir(parents=True, exist_ok=True)
    for name, recs in splits.items():
        datasets.Dataset.from_list(recs).to_parquet(str(folder / "data" / f"{name}-00000-of-00001.parquet"))
    (folder / "README.md").write_text("---\nlicense: mit\n---\n")
    return str(folder)


def fake_hub_cache(cache: Path, repo_id: str, splits: dict[str, list[dict]], commit: str = COMMIT) -> Path:
    """A dataset repo in a huggingface_hub cache (HF_HUB_CACHE) as a download leaves it: the snapshot at `commit`
    and refs/main naming it (two repos in one run need two commits, as on the hub: MLflow knows a dataset input
    by its name and digest, the commit)."""
    repo = cache / f"datasets--{repo_id.replace('/', '--')}"
    save_hub_parquet(repo / "snapshots" / commit, splits)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    return repo


SPLITS_ULTRACHAT = ("train_sft", "test_sft", "train_gen", "test_gen")  # HuggingFaceH4/ultrachat_200k's
