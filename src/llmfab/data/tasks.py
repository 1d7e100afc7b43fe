"""Tasks with a verifiable gold reward: the tiny testbed every stage is measured on.

Each task samples examples (prompt, reference answer, meta), scores any response against the
meta with a gold reward in [0, 1], and corrupts a reference into a wrong response with a
preference level (0 = the reference is significantly better ... 3 = negligibly better, AFM's
four levels), which gives preference pairs with known labels.

An example is an item (what is asked: `key`) in one of several phrasings (`prompt`), and has a
`difficulty` in [0, 1]: held-out items are never asked in any phrasing, and demonstration errors
grow with difficulty, as human annotators' do.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from typing import ClassVar

WORDS = [
    "apple",
    "river",
    "stone",
    "cloud",
    "tiger",
    "lemon",
    "piano",
    "rocket",
    "garden",
    "silver",
    "window",
    "candle",
    "forest",
    "planet",
    "button",
    "dragon",
    "pepper",
    "marble",
    "castle",
    "shadow",
    "orange",
    "pencil",
    "summer",
    "winter",
    "bridge",
    "copper",
    "meadow",
    "falcon",
    "island",
    "violet",
    "harbor",
    "jungle",
    "mirror",
    "rabbit",
    "saddle",
    "tunnel",
    "velvet",
]

_INT = re.compile(r"-?\d+")


def first_int(text: str) -> int | None:
    match = _INT.search(text)
    return int(match.group()) if match else None


@dataclass(frozen=True)
class Example:
    task: str
    prompt: str
    answer: str
    meta: dict = field(default_factory=dict)

    @property
    def key(self) -> str:
        """The item asked, whatever the phrasing: what must not appear on both sides of a split."""
        return item_key(self.task, self.meta, self.prompt)

    @property
    def difficulty(self) -> float:
        return self.meta.get("difficulty", 0.5)


class Arithmetic:
    name = "arithmetic"
    TEMPLATES = ("What is {a} {op} {b}?", "Compute {a} {op} {b}.", "{a} {op} {b} = ?", "Calculate {a} {op} {b}.")

    def __init__(self, max_operand: int = 50):
        self.max_operand = max_operand

    def sample(self, rng: random.Random) -> Example:
        a, b = rng.randint(0, self.max_operand), rng.randint(0, self.max_operand)
        op = rng.choice("+-")
        result = a + b if op == "+" else a - b
        prompt = rng.choice(self.TEMPLATES).format(a=a, op=op, b=b)
        # Larger operands and negative results are harder.
        difficulty = round(0.75 * max(a, b) / self.max_operand + (0.25 if result < 0 else 0.0), 3)
        meta = {"a": a, "b": b, "op": op, "answer": result, "difficulty": difficulty}
        return Example(self.name, prompt, str(result), meta)

    def reward(self, meta: dict, response: str) -> float:
        return float(first_int(response) == meta["answer"])

    def slip(self, ex: Example) -> str:
        """The typical mistake: a dropped carry (or borrow), else off by one."""
        a, b, op, answer = ex.meta["a"], ex.meta["b"], ex.meta["op"], ex.meta["answer"]
        if op == "+" and a % 10 + b % 10 >= 10:
            return str(answer - 10)
        if op == "-" and a % 10 < b % 10 and a >= 10:
            return str(answer + 10)
        return str(answer + 1)

    def corrupt(self, rng: random.Random, ex: Example) -> tuple[str, int]:
        delta = rng.choice([1, 2, 5, 10, 20]) * rng.choice([-1, 1])
        level = 0 if abs(delta) >= 10 else 1 if abs(delta) >= 5 else 2 if abs(delta) >= 2 else 3
        return str(ex.meta["answer"] + delta), level


class FormatFollowing:
    """Constraint following: repeat a word n times, write it in capitals, or spell it backwards."""

    name = "format"
    KINDS = ("repeat", "upper", "reverse")
    REPEAT_TEMPLATES = (
        "Write the word {word} {n} times, separated by commas.",
        "Repeat {word} {n} times, with commas between.",
        "Say {word} {n} times, comma-separated.",
    )

    def __init__(self, kinds: tuple[str, ...] = KINDS, max_repeat: int = 5):
        unknown = set(kinds) - set(self.KINDS)
        if unknown or not kinds:
            raise ValueError(f"format kinds must be a non-empty subset of {self.KINDS}, got {kinds}")
        if max_repeat < 2:
            raise ValueError(f"max_repeat must be at least 2, got {max_repeat}")
        self.kinds = tuple(kinds)
        self.max_repeat = max_repeat

    def sample(self, rng: random.Random) -> Example:
        kind, word = rng.choice(self.kinds), rng.choice(WORDS)
        if kind == "repeat":
            n = rng.randint(2, self.max_repeat)
            prompt = rng.choice(self.REPEAT_TEMPLATES).format(word=word, n=n)
            # Counting more repeats is harder.
            difficulty = round((n - 2) / max(1, self.max_repeat - 2), 3)
            answer, meta = ", ".join([word] * n), {"kind": kind, "word": word, "n": n, "difficulty": difficulty}
        elif kind == "upper":
            # Spelling tasks: out of reach for a word the model never saw transformed, the hardest.
            prompt, answer = f"Write the word {word} in capital letters.", word.upper()
            meta = {"kind": kind, "word": word, "difficulty": 1.0}
        else:
            prompt, answer = f"Spell the word {word} backwards.", word[::-1]
            meta = {"kind": kind, "word": word, "difficulty": 1.0}
        return Example(self.name, prompt, answer, {**meta, "answer": answer})

    def reward(self, meta: dict, response: str) -> float:
        response = response.strip()
        if response == meta["answer"]:
            return 1.0
        if meta["kind"] == "repeat":
            parts = [p.strip() for p in response.split(",") if p.strip()]
            if parts and all(p == meta["word"] for p in parts):
                return max(0.0, 1.0 - abs(len(parts) - meta["n"]) / meta["n"]) * 0.5
        if meta["kind"] == "upper" and response.lower() == meta["word"]:
            return 0.5  # right word, wrong case
        return 0.0

    def slip(self, ex: Example) -> str:
        """The typical mistake: one repeat short; the word in lower case; two letters swapped."""
        meta, word = ex.meta, ex.meta["word"]
        if meta["kind"] == "repeat":
            return ", ".join([word] * (meta["n"] - 1))
        if meta["kind"] == "upper":
            return word
        return word[::-1][1] + word[::-1][0] + word[::-1][2:]

    def corrupt(self, rng: random.Random, ex: Example) -> tuple[str, int]:
        meta, word = ex.meta, ex.meta["word"]
        other = rng.choice([w for w in WORDS if w != word])
        if meta["kind"] == "repeat":
            k = rng.choice([1, 1, 2, 3])
            n = meta["n"] + k if rng.random() < 0.5 or meta["n"] - k < 1 else meta["n"] - k
            return (", ".join([word] * n), 3 - min(k, 3)) if rng.random() < 0.8 else (", ".join([other] * meta["n"]), 0)
        if meta["kind"] == "upper":
            return (word, 1) if rng.random() < 0.5 else (other.upper(), 0)
        swapped = list(word[::-1])
        i = rng.randrange(len(swapped) - 1)
        swapped[i], swapped[i + 1] = swapped[i + 1], swapped[i]
        wrong = "".join(swapped)
        return (wrong, 3) if wrong != ex.answer and rng.random() < 0.5 else (word, 1)


class WordList:
    """List manipulation over known words: name the last item, or write the list reversed. Longer
    lists are harder; the answer is built only from the prompt's words, so unseen lists are learnable."""

    name = "wordlist"
    KINDS = ("last", "reverse")
    TEMPLATES: ClassVar[dict[str, tuple[str, ...]]] = {
        "last": ("What is the last word in: {items}?", "Name the final item of this list: {items}."),
        "reverse": ("Reverse the list: {items}.", "Write this list backwards: {items}."),
    }

    def __init__(self, kinds: tuple[str, ...] = KINDS, max_items: int = 5):
        if not kinds or set(kinds) - set(self.KINDS):
            raise ValueError(f"wordlist kinds must be a non-empty subset of {self.KINDS}, got {kinds}")
        if max_items < 2:
            raise ValueError(f"max_items must be at least 2, got {max_items}")
        self.kinds, self.max_items = tuple(kinds), max_items

    def sample(self, rng: random.Random) -> Example:
        kind, n = rng.choice(self.kinds), rng.randint(2, self.max_items)
        items = rng.sample(WORDS, n)
        answer = items[-1] if kind == "last" else ", ".join(reversed(items))
        prompt = rng.choice(self.TEMPLATES[kind]).format(items=", ".join(items))
        difficulty = round((n - 2) / max(1, self.max_items - 2), 3)
        meta = {"kind": kind, "items": items, "answer": answer, "difficulty": difficulty}
        return Example(self.name, prompt, answer, meta)

    def reward(self, meta: dict, response: str) -> float:
        response = response.strip().rstrip(".")
        if response == meta["answer"]:
            return 1.0
        if meta["kind"] == "reverse":  # partial credit: the share of positions right
            want, got = meta["answer"].split(", "), [p.strip() for p in response.split(",")]
            return 0.5 * sum(a == b for a, b in zip(want, got, strict=False)) / max(len(want), len(got))
        return 0.0

    def slip(self, ex: Example) -> str:
        """The typical mistake: the item before the last; the reversed list with its first two items swapped."""
        items = ex.meta["items"]
        if ex.meta["kind"] == "last":
            return items[-2]
        return ", ".join([items[-2], items[-1], *reversed(items[:-2])])

    def corrupt(self, rng: random.Random, ex: Example) -> tuple[str, int]:
        items = ex.meta["items"]
        if ex.meta["kind"] == "last":
            return (items[-2], 1) if rng.random() < 0.6 else (items[0], 0)
        reversed_items = list(reversed(items))
        roll = rng.random()
        if roll < 0.4 and len(items) > 2:
            i = rng.randrange(len(items) - 1)  # two neighbours swapped
            reversed_items[i], reversed_items[i + 1] = reversed_items[i + 1], reversed_items[i]
            return ", ".join(reversed_items), 2
        if roll < 0.7:
            return ", ".join(reversed_items[:-1]), 1  # one item dropped
        return ", ".join(items), 0  # not reversed at all


class KVRetrieval:
    """Key-value retrieval from a document of records; long documents test long context."""

    name = "kv_retrieval"

    def __init__(self, n_pairs: int = 8):
        self.n_pairs = n_pairs

    def document(self, rng: random.Random, n_pairs: int) -> tuple[list[tuple[str, int]], str]:
        # Up to 37 x 9990 distinct keys: enough records for documents of hundreds of thousands of tokens.
        space = len(WORDS) * 9990
        if n_pairs > space:
            raise ValueError(f"at most {space} records per document, asked for {n_pairs}")
        keys = [f"{WORDS[i % len(WORDS)]}-{10 + i // len(WORDS)}" for i in rng.sample(range(space), n_pairs)]
        pairs = [(k, rng.randint(1000, 9999)) for k in keys]
        return pairs, "Records:\n" + "\n".join(f"{k}: {v}" for k, v in pairs)

    def sample(self, rng: random.Random, n_pairs: int | None = None, depth: float | None = None) -> Example:
        n_pairs = n_pairs or self.n_pairs
        pairs, doc = self.document(rng, n_pairs)
        index = rng.randrange(n_pairs) if depth is None else min(n_pairs - 1, int(depth * n_pairs))
        key, value = pairs[index]
        prompt = f"{doc}\n\nWhat is the value of {key}?"
        meta = {
            "key": key,
            "answer": value,
            "n_pairs": n_pairs,
            "depth": index / max(1, n_pairs - 1),
            "difficulty": 0.5,
            "distractors": [v for _, v in pairs if v != value][:3],
        }
        return Example(self.name, prompt, str(value), meta)

    def reward(self, meta: dict, response: str) -> float:
        return float(first_int(response) == meta["answer"])

    def slip(self, ex: Example) -> str:
        """The typical mistake: another record's value."""
        return str(ex.meta["distractors"][0]) if ex.meta["distractors"] else str(ex.meta["answer"] + 1)

    def corrupt(self, rng: random.Random, ex: Example) -> tuple[str, int]:
        value = ex.meta["answer"]
        roll = rng.random()
        if roll < 0.4 and ex.meta["distractors"]:
            return str(rng.choice(ex.meta["distractors"])), 1  # another record's value
        if roll < 0.7:
            digits = list(str(value))
            i = rng.randrange(1, len(digits))
            digits[i] = str((int(digits[i]) + rng.randint(1, 9)) % 10)
            return "".join(digits), 3  # one digit off
        wrong = rng.randint(1000, 9999)
        return (str(wrong), 0) if wrong != value else (str(value + 1), 3)


class LongQA:
    """Questions about facts planted in long documents (built by the synthesize_long_qa stage)."""

    name = "long_qa"

    def reward(self, meta: dict, response: str) -> float:
        return float(first_int(response) == meta["answer"])


TASKS = {t.name: t for t in (Arithmetic(), FormatFollowing(), WordList(), KVRetrieval(), LongQA())}


def get_task(name: str):
    if name not in TASKS:
        raise KeyError(f"unknown task {name!r}; expected one of {sorted(TASKS)}")
    return TASKS[name]


def item_key(task: str, meta: dict, prompt: str) -> str:
    """What an example asks, independent of its phrasing (two prompts for one sum are one item)."""
    if task == "arithmetic":
        return f"arithmetic:{meta['a']}{meta['op']}{meta['b']}"
    if task == "format":
        return f"format:{meta['kind']}:{meta['word']}:{meta.get('n', '')}"
    if task == "wordlist":
        return f"wordlist:{meta['kind']}:{','.join(meta['items'])}"
    return f"{task}:{prompt}"


def gold_reward(task: str, meta: dict, response: str) -> float:
    """The verifiable reward of `response` for an example of `task` described by `meta`."""
    return get_task(task).reward(meta, response)
