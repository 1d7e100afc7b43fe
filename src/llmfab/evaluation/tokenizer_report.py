"""How well a tokenizer covers each language: fertility, compression and unknown tokens measured on
held-out multilingual text (data/multilingual.py), one row per (tokenizer, language).

- fertility: tokens per whitespace-separated word (only for languages written with spaces)
- tokens_per_char: tokens per character, defined for every script
- bytes_per_token: UTF-8 bytes per token (compression)
- unk_rate: share of tokens that are the unknown token; byte-level BPE has none by construction,
  and `roundtrip` (share of documents that decode back to exactly the input) checks it
"""

from __future__ import annotations

from llmfab.data.multilingual import LANGUAGES

COLUMNS = (
    "tokenizer",
    "vocab_size",
    "language",
    "script",
    "words",
    "chars",
    "bytes",
    "tokens",
    "fertility",
    "tokens_per_char",
    "bytes_per_token",
    "unk_rate",
    "roundtrip",
)


def measure(tokenizer, texts: list[str]) -> dict:
    """Token counts of `texts` (no special tokens added) and how many decode back exactly."""
    ids = tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]
    unk = tokenizer.unk_token_id
    exact = sum(
        tokenizer.decode(x, skip_special_tokens=False, clean_up_tokenization_spaces=False) == text
        for x, text in zip(ids, texts, strict=True)
    )
    return {
        "words": sum(len(t.split()) for t in texts),
        "chars": sum(len(t) for t in texts),
        "bytes": sum(len(t.encode()) for t in texts),
        "tokens": sum(len(x) for x in ids),
        "unk": sum(i == unk for x in ids for i in x) if unk is not None else 0,
        "exact": exact,
        "docs": len(texts),
    }


def language_rows(label: str, tokenizer, held_out: dict[str, list[str]]) -> list[dict]:
    """One report row per language for `tokenizer` (labelled `label`)."""
    rows = []
    for code, texts in held_out.items():
        m = measure(tokenizer, texts)
        tokens = max(1, m["tokens"])
        rows.append(
            {
                "tokenizer": label,
                "vocab_size": len(tokenizer),
                "language": code,
                "script": LANGUAGES[code].script,
                "words": m["words"],
                "chars": m["chars"],
                "bytes": m["bytes"],
                "tokens": m["tokens"],
                "fertility": m["tokens"] / m["words"] if LANGUAGES[code].spaced else None,
                "tokens_per_char": m["tokens"] / m["chars"],
                "bytes_per_token": m["bytes"] / tokens,
                "unk_rate": m["unk"] / tokens,
                "roundtrip": m["exact"] / max(1, m["docs"]),
            }
        )
    return rows


def row_metrics(rows: list[dict], suffix: str = "") -> dict[str, float]:
    """`fertility_<lang><suffix>`, `tokens_per_char_...`, `bytes_per_token_...`, `unk_rate_...`."""
    out = {}
    for row in rows:
        for key in ("fertility", "tokens_per_char", "bytes_per_token", "unk_rate"):
            if row[key] is not None:
                out[f"{key}_{row['language']}{suffix}"] = row[key]
    return out


def as_table(rows: list[dict]) -> dict[str, list]:
    """Columns for MLflow's log_table (fertility is null where a language has no word spaces)."""
    return {c: [r[c] for r in rows] for c in COLUMNS}


def as_text(rows: list[dict]) -> str:
    """A fixed-width table, for logs and reports."""
    lines = [f"{'tokenizer':>14} {'vocab':>6} {'lang':>4}  fert  tok/ch  B/tok  unk    exact"]
    for r in rows:
        fert = f"{r['fertility']:5.2f}" if r["fertility"] is not None else "    -"
        lines.append(
            f"{r['tokenizer']:>14} {r['vocab_size']:>6} {r['language']:>4} {fert} {r['tokens_per_char']:6.3f} "
            f"{r['bytes_per_token']:6.2f} {r['unk_rate']:6.4f} {r['roundtrip']:6.2f}"
        )
    return "\n".join(lines)


def plot(rows: list[dict], sweep: list[str] = ()):
    """Tokens per character and bytes per token per language: a line across the `sweep`
    tokenizers (labels, in vocabulary order), unconnected markers for the others (the stage's own,
    the baseline). A matplotlib Figure (no pyplot state)."""
    from matplotlib.figure import Figure

    others = [label for label in dict.fromkeys(r["tokenizer"] for r in rows) if label not in sweep]
    labels = [*sweep, *others]
    languages = list(dict.fromkeys(r["language"] for r in rows))
    value = {(r["tokenizer"], r["language"]): r for r in rows}
    fig = Figure(figsize=(12, 4.5), layout="constrained")
    for ax, key, title in zip(
        fig.subplots(1, 2),
        ("tokens_per_char", "bytes_per_token"),
        ("fertility: tokens per character (lower is better)", "compression: bytes per token (higher is better)"),
        strict=True,
    ):
        for i, code in enumerate(languages):
            color, name = f"C{i % 10}", f"{code} ({LANGUAGES[code].script})"  # dashed/diamond after 10 colours
            xs = [x for x, label in enumerate(sweep) if (label, code) in value]
            if xs:
                ys = [value[(sweep[x], code)][key] for x in xs]
                ax.plot(xs, ys, "o-" if i < 10 else "o--", color=color, label=name)
            pts = [(len(sweep) + j, value[(lb, code)][key]) for j, lb in enumerate(others) if (lb, code) in value]
            if pts:
                ax.scatter(
                    *zip(*pts, strict=True), marker="s" if i < 10 else "D", color=color, label=None if xs else name
                )
        ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right")
        ax.set_xlabel("tokenizer (vocabulary size)")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncols=2)
    return fig
