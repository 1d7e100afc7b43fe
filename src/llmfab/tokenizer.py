"""Tokenizers: byte-level BPE trained locally with `tokenizers`, or an existing one adopted, with a
family's special tokens and chat template; and loading a checkpoint's tokenizer.

models/ builds on this module (special-token ids, loading), never the other way round, and it imports no torch:
data/chat.py and the tokenizer stage import it.

Every template marks assistant content plus its turn terminator with {% generation %} so that
data/chat.py gets exact loss masks; the terminators are those `chat.stop_token_ids` knows.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from llmfab.checkpoint_refs import loadable_folder
from llmfab.errors import CheckpointError

log = logging.getLogger(__name__)

EOS = "<|endoftext|>"
PAD = "<|pad|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = [EOS, PAD, IM_START, IM_END]

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|im_start|>assistant\\n' }}"
    "{% generation %}{{ message['content'] }}{{ '<|im_end|>' }}{% endgeneration %}"
    "{{ '\\n' }}"
    "{% else %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Llama 3.1's header format; content is not trimmed (the released template trims) so that an
# assistant turn's tokens decode back to exactly its content.
LLAMA3_TEMPLATE = (
    "{{ '<|begin_of_text|>' }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] }}{{ '<|eot_id|>' }}{% endgeneration %}"
    "{% else %}"
    "{{ message['content'] + '<|eot_id|>' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)

# Gemma 2's turns; Gemma has no system role, so a system message is prepended to the next user turn.
GEMMA_TEMPLATE = (
    "{{ '<bos>' }}"
    "{% set ns = namespace(system='') %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}"
    "{% set ns.system = message['content'] + '\\n\\n' %}"
    "{% elif message['role'] == 'assistant' %}"
    "{{ '<start_of_turn>model\\n' }}"
    "{% generation %}{{ message['content'] }}{{ '<end_of_turn>' }}{% endgeneration %}"
    "{{ '\\n' }}"
    "{% else %}"
    "{{ '<start_of_turn>' + message['role'] + '\\n' + ns.system + message['content'] + '<end_of_turn>\\n' }}"
    "{% set ns.system = '' %}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
)


@dataclass(frozen=True)
class ChatFormat:
    """A family's special tokens and chat template. `turn_tokens` are the tokens the template
    writes literally (they must be single tokens)."""

    eos: str
    pad: str
    bos: str | None
    turn_tokens: tuple[str, ...]
    template: str

    @property
    def special_tokens(self) -> list[str]:
        """In vocabulary order (ids 0..n-1 of a trained tokenizer)."""
        head = [self.eos, self.pad] if self.bos is None else [self.pad, self.eos, self.bos]
        return [*head, *(t for t in self.turn_tokens if t not in head)]


CHAT_FORMATS = {
    # Qwen2; also used for AFM, whose chat format is not published.
    "chatml": ChatFormat(EOS, PAD, None, (IM_START, IM_END), CHAT_TEMPLATE),
    "llama3": ChatFormat(
        "<|end_of_text|>",
        "<|finetune_right_pad_id|>",
        "<|begin_of_text|>",
        ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
        LLAMA3_TEMPLATE,
    ),
    "gemma": ChatFormat("<eos>", "<pad>", "<bos>", ("<bos>", "<start_of_turn>", "<end_of_turn>"), GEMMA_TEMPLATE),
}


def chat_format(name: str) -> ChatFormat:
    if name not in CHAT_FORMATS:
        raise ValueError(f"unknown chat format {name!r}; known: {', '.join(CHAT_FORMATS)}")
    return CHAT_FORMATS[name]


# GPT-2's pre-tokenizer split with combining marks (\p{M}) counted as letters: GPT-2's own splits
# Devanagari or Thai words at every vowel sign, so no merge can span one (measured on the
# multilingual report: Hindi 5.9 -> 4.1 tokens per word at 4096 tokens). ASCII splits are unchanged.
SPLIT_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?[\p{L}\p{M}]+| ?\p{N}+| ?[^\s\p{L}\p{M}\p{N}]+|\s+(?!\S)|\s+"


# BPE training on one multi-megabyte text (a minified file, a dump without newlines) stalls for minutes in the
# pre-tokenizer's regex; pieces of at most this many characters, cut before whitespace, keep it linear and
# leave every word (pre-token) as it was.
MAX_TRAIN_CHUNK = 8192


def bounded_chunks(texts: Iterable[str], max_chars: int = MAX_TRAIN_CHUNK) -> Iterator[str]:
    """Each text, a long one cut into pieces of at most `max_chars` characters just before a whitespace
    (where the pre-tokenizer splits anyway), or at `max_chars` when a piece has none."""
    for text in texts:
        while len(text) > max_chars:
            cut = max(text.rfind(" ", 1, max_chars + 1), text.rfind("\n", 1, max_chars + 1))
            cut = cut if cut > 0 else max_chars
            yield text[:cut]
            text = text[cut:]
        yield text


def train_bpe_tokenizer(
    texts: Iterable[str],
    vocab_size: int = 2048,
    min_frequency: int = 2,
    model_max_length: int = 2048,
    chat_format_name: str = "chatml",
):
    """Train a byte-level BPE on `texts`; returns a transformers PreTrainedTokenizerFast. The 256
    byte symbols are always in the vocabulary, so any text encodes without an unknown token."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    fmt = chat_format(chat_format_name)
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=fmt.special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(bounded_chunks(texts), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=fmt.eos,
        pad_token=fmt.pad,
        bos_token=fmt.bos,
        model_max_length=model_max_length,
        additional_special_tokens=[t for t in fmt.turn_tokens if t != fmt.bos],
    )
    fast.chat_template = fmt.template
    return fast


def train_char_bpe_tokenizer(texts: Iterable[str], vocab_size: int = 2048, min_frequency: int = 2):
    """A BPE over characters seen in training, without byte fallback: an unseen character becomes
    [UNK]. Only a baseline for the multilingual report (what byte-level BPE avoids)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=["[UNK]", EOS], show_progress=False
    )
    tok.train_from_iterator(bounded_chunks(texts), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token=EOS)


def _has_token(tokenizer, token: str) -> bool:
    token_id = tokenizer.convert_tokens_to_ids(token)
    return isinstance(token_id, int) and (tokenizer.unk_token_id is None or token_id != tokenizer.unk_token_id)


# Pad-like tokens a vocabulary may already hold, by preference: Llama 3's reserved fine-tuning pad, ours,
# Gemma's and BERT's, then Qwen's end-of-text (its base tokenizers' pad).
PAD_CANDIDATES = ("<|finetune_right_pad_id|>", PAD, "<pad>", "[PAD]", EOS)


def ensure_pad_token(tokenizer):
    """Give a tokenizer without a pad token (every Llama 3.x base) one from its own vocabulary: a pad-like
    token it has, else its EOS. Batches are padded to a common length and the padding is masked out
    (labels -100, attention and reward reads by length), so any existing id will do; adding a token would
    grow the vocabulary and force an embedding resize of the model."""
    if tokenizer.pad_token is not None:
        return tokenizer
    pad = next((t for t in PAD_CANDIDATES if _has_token(tokenizer, t)), None) or tokenizer.eos_token
    if pad is None:
        raise CheckpointError(f"tokenizer {tokenizer.name_or_path!r} has neither a pad nor an EOS token")
    tokenizer.pad_token = pad
    log.info("tokenizer %s has no pad token: padding with %s", tokenizer.name_or_path, pad)
    return tokenizer


def load_tokenizer(ref: str | Path):
    """A tokenizer from a hub id, hf:// URI, local folder or object-store URI (a checkpoint's own
    tokenizer), its chat template as shipped, with a pad token (ensure_pad_token)."""
    from transformers import AutoTokenizer

    folder = loadable_folder(ref)
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    except (OSError, ValueError) as exc:  # a model-only folder, a broken tokenizer file
        raise CheckpointError(f"{ref}: no tokenizer can be loaded from it ({str(exc).splitlines()[0]})") from None
    return ensure_pad_token(tokenizer)


def adopt_tokenizer(ref: str, chat_format_name: str | None = None, model_max_length: int | None = None):
    """An existing tokenizer (hub id, hf:// URI, folder or store URI), its own chat template kept (hub
    templates carry their family's default system prompt or date header). A tokenizer without one gets
    the `chat_format_name` family's template, with that family's turn tokens added when missing (the
    vocabulary grows: models are resized to it on load, models.embeddings.match_vocab)."""
    tokenizer = load_tokenizer(ref)
    before = len(tokenizer)
    if chat_format_name and not tokenizer.chat_template:
        fmt = chat_format(chat_format_name)
        missing = [t for t in fmt.turn_tokens if not _has_token(tokenizer, t)]
        if missing:
            tokenizer.add_special_tokens({"extra_special_tokens": missing}, replace_extra_special_tokens=False)
        tokenizer.chat_template = fmt.template
    elif chat_format_name:
        log.info("adopted tokenizer %s keeps its own chat template (chat_format %s not applied)", ref, chat_format_name)
    if model_max_length:
        tokenizer.model_max_length = model_max_length
    if len(tokenizer) != before:
        log.info("adopted tokenizer %s: %d -> %d tokens", ref, before, len(tokenizer))
    return tokenizer


def special_token_ids(tokenizer) -> dict:
    """pad/eos/bos ids to put into a model config built for this tokenizer (models/ takes them from here)."""
    return {
        "pad_token_id": tokenizer.pad_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "bos_token_id": tokenizer.bos_token_id,
    }
