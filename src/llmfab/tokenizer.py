"""Tokenizers: byte-level BPE trained locally with `tokenizers`, or an existing one adopted, with a
family's special tokens and chat template; and loading a checkpoint's tokenizer.

models/ builds on this module (special-token ids, loading), never the other way round, and it imports no torch:
data/chat.py and the tokenizer stage import it.

Every template marks assistant content plus its turn terminator with {% generation %} so that
data/chat.py gets exact loss masks; the terminators are those `chat.stop_token_ids` knows.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from llmfab.checkpoint_refs import loadable_folder

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
    tok.train_from_iterator(texts, trainer=trainer)
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
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token=EOS)


def _has_token(tokenizer, token: str) -> bool:
    token_id = tokenizer.convert_tokens_to_ids(token)
    return isinstance(token_id, int) and (tokenizer.unk_token_id is None or token_id != tokenizer.unk_token_id)


def load_tokenizer(ref: str | Path):
    """A tokenizer from a hub id, a local folder or an object-store URI (a checkpoint's own tokenizer)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(loadable_folder(ref), trust_remote_code=False)


def adopt_tokenizer(ref: str, chat_format_name: str | None = None, model_max_length: int | None = None):
    """An existing tokenizer (hub id, folder or store URI). With `chat_format_name` its template is
    replaced by ours (exact assistant masks) and missing turn tokens are added; a missing pad
    token is added too. Added tokens grow the vocabulary: models are resized to it on load
    (models.embeddings.match_vocab)."""
    tokenizer = load_tokenizer(ref)
    before = len(tokenizer)
    fmt = chat_format(chat_format_name) if chat_format_name else None
    if fmt is not None:
        missing = [t for t in fmt.turn_tokens if not _has_token(tokenizer, t)]
        if missing:
            tokenizer.add_special_tokens({"extra_special_tokens": missing}, replace_extra_special_tokens=False)
        tokenizer.chat_template = fmt.template
    if tokenizer.pad_token is None:
        pad = fmt.pad if fmt else PAD
        if _has_token(tokenizer, pad):
            tokenizer.pad_token = pad
        else:
            tokenizer.add_special_tokens({"pad_token": pad})
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
