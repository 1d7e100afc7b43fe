"""Multilingual text from the CLDR locale data that `babel` ships (nothing is downloaded).

Each language's phrases are the locale's own names for languages, territories, scripts,
currencies, time zones, units, months, days and date fields, e.g. "Центральная Европа,
стандартное время" or "阿布哈西亚语": a few thousand real words and phrases per language. A phrase
is held out by a hash of its text, so the held-out split shares no phrase with the training split
whatever the seed; documents are phrases joined by newlines, shuffled with the seed.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from functools import cache
from typing import Literal


@dataclass(frozen=True)
class Language:
    name: str
    script: str
    spaced: bool  # written with spaces between words (tokens per word is defined)


LANGUAGES = {
    "en": Language("English", "Latin", True),
    "de": Language("German", "Latin", True),
    "ru": Language("Russian", "Cyrillic", True),
    "el": Language("Greek", "Greek", True),
    "ar": Language("Arabic", "Arabic", True),
    "he": Language("Hebrew", "Hebrew", True),
    "hi": Language("Hindi", "Devanagari", True),
    "ko": Language("Korean", "Hangul", True),
    "th": Language("Thai", "Thai", False),
    "zh": Language("Chinese", "Han", False),
    "ja": Language("Japanese", "Han+Kana", False),
}

_CLDR_KEYS = (
    "languages",
    "territories",
    "scripts",
    "currency_names",
    "currency_names_plural",
    "meta_zones",
    "time_zones",
    "unit_display_names",
    "months",
    "days",
    "date_fields",
    "variants",
)


def _strings(value):
    if isinstance(value, str):
        yield value
    elif hasattr(value, "items"):
        for _, item in value.items():
            yield from _strings(item)
    elif isinstance(value, list | tuple):
        for item in value:
            yield from _strings(item)


def _check(code: str) -> None:
    if code not in LANGUAGES:
        raise ValueError(f"unknown language {code!r}; known: {', '.join(LANGUAGES)}")


@cache
def phrases(code: str) -> tuple[str, ...]:
    """The locale's distinct phrases (patterns with `{0}` placeholders and letterless ones left out)."""
    from babel import Locale

    _check(code)
    data = Locale.parse(code)._data
    found = set()
    for key in _CLDR_KEYS:
        for text in _strings(data.get(key, {})):
            text = " ".join(text.split())
            if text and "{" not in text and any(c.isalpha() for c in text):
                found.add(text)
    return tuple(sorted(found))


def is_held_out(phrase: str, fraction: float) -> bool:
    # Hashed case-folded, so "Kyrgyz Som" and "Kyrgyz som" land on the same side.
    key = phrase.casefold().encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "big") / 2**64 < fraction


def documents(
    code: str,
    split: Literal["train", "test"],
    *,
    held_out: float = 0.2,
    seed: int = 0,
    phrases_per_doc: int = 32,
) -> list[str]:
    """The language's train or held-out phrases as documents of `phrases_per_doc` lines. The
    held-out documents do not depend on the seed (comparable across runs)."""
    if not 0 < held_out < 1:
        raise ValueError(f"held_out must be in (0, 1), got {held_out}")
    items = [p for p in phrases(code) if is_held_out(p, held_out) == (split == "test")]
    if split == "train":
        random.Random(f"{seed}:{code}").shuffle(items)
    return ["\n".join(items[i : i + phrases_per_doc]) for i in range(0, len(items), phrases_per_doc)]
