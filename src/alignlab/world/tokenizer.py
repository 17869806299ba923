"""A byte-level BPE tokenizer for the feedback world, as a Hugging Face fast tokenizer.

Special tokens (ids in this order): ``<|pad|>`` 0 (``pad_token``), ``<|end|>`` 1
(``eos_token``, also the end of a chat turn), ``<|user|>`` 2, ``<|assistant|>`` 3,
``<|system|>`` 4. There is no BOS token, and encoding adds no special tokens: ``tok(text)``
gives exactly the tokens of ``text`` (markers written in the text are matched as single
tokens). Byte-level pre-tokenization and decoding make ``decode(encode(text)) == text`` for
any string.

The Jinja ``chat_template`` renders exactly :func:`alignlab.world.language.render_chat`:
``<|user|> hi<|end|><|assistant|> hello<|end|>``; ``add_generation_prompt`` appends
``<|assistant|>``, and the model's reply starts with a space, as completions do.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from alignlab.world.language import ASSISTANT, END, PAD, SPECIAL_TOKENS, SYSTEM, USER

CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] not in ['system', 'user', 'assistant'] -%}"
    "{{ raise_exception('unknown chat role ' + message['role']) }}"
    "{%- endif -%}"
    "{{ '<|' + message['role'] + '|> ' + (message['content'] | trim) + '" + END + "' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '" + ASSISTANT + "' }}{%- endif -%}"
)

_SPECIAL = re.compile("|".join(re.escape(t) for t in SPECIAL_TOKENS))


def _without_markers(texts: Iterable[str]) -> Iterator[str]:
    # Markers are added tokens, never split by BPE; training on their characters would only
    # waste merges on "<|", "end", "|>".
    for text in texts:
        for piece in _SPECIAL.split(text):
            if piece:
                yield piece


def train_tokenizer(texts: Iterable[str], vocab_size: int = 1024, *, min_frequency: int = 2,
                    model_max_length: int = 1024) -> PreTrainedTokenizerFast:
    """Train byte-level BPE on ``texts``; same texts → same vocabulary and merges.

    ``vocab_size`` counts the 5 special tokens and the 256 byte symbols.
    """
    if vocab_size < len(SPECIAL_TOKENS) + 256:
        raise ValueError(f"vocab_size must be at least {len(SPECIAL_TOKENS) + 256}, got {vocab_size}")
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator(_without_markers(texts), trainer=trainer)
    return wrap_tokenizer(backend, model_max_length=model_max_length)


def wrap_tokenizer(backend: Tokenizer, model_max_length: int = 1024) -> PreTrainedTokenizerFast:
    """A transformers tokenizer around a trained ``tokenizers.Tokenizer`` with the world's tokens."""
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token=END, pad_token=PAD, bos_token=None, unk_token=None,
        extra_special_tokens=[USER, ASSISTANT, SYSTEM], chat_template=CHAT_TEMPLATE,
        model_max_length=model_max_length, padding_side="right", clean_up_tokenization_spaces=False)
