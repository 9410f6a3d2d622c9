"""Text tokenization for pairs: loading a local tokenizer, building a word-level one for small worlds, and the
understanding prompt template.

HermesFlow scores captions under LLaVA's "phi1.5" conversation (``preprocess_v0``):

    "USER: {question} ASSISTANT:" + " " + caption + <|endoftext|>

tokenized as one string; no bos, the instruction unlabelled, caption + eos labelled. We tokenize the parts apart and
concatenate, which gives the same ids with a BPE tokenizer such as phi-1.5's because every word boundary keeps its
space on the right token:

    und_prompt_ids(tok, q)   = tok("USER: {q} ASSISTANT:")        (no special tokens added)
    caption_ids(tok, c)      = tok(" " + c.strip())               (the space after "ASSISTANT:" starts the caption)
    prompt_ids(tok, p)       = tok(p)                             (t2i text; Layout adds [t2i][bos] … [eos])

``build_word_tokenizer(words, out_dir)``: a ``tokenizers`` WordLevel model over ``<|endoftext|>`` (id 0, eos = bos),
``<unk>`` (id 1) and the sorted distinct words (plus those of the template and the default question), split on
whitespace and punctuation (``\\w+|[^\\w\\s]+``); saved with save_pretrained so ``load_text_tokenizer`` reads it.

    python -m pytest -q tests/data/test_text.py
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from hermesflow_fast.data.pairs import DEFAULT_QUESTION
from hermesflow_fast.errors import UserError

__all__ = ["EOS_TOKEN", "UND_TEMPLATE", "UNK_TOKEN", "build_word_tokenizer", "caption_ids", "load_text_tokenizer",
           "prompt_ids", "und_prompt_ids"]

EOS_TOKEN = "<|endoftext|>"
UNK_TOKEN = "<unk>"
UND_TEMPLATE = "USER: {question} ASSISTANT:"
_WORD = re.compile(r"\w+|[^\w\s]+")


def load_text_tokenizer(path: str | os.PathLike) -> Any:
    """``transformers.AutoTokenizer`` from a local folder (never the network). UserError naming the folder if it is
    missing or transformers cannot read it."""
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"load_text_tokenizer: {path} is not a folder; pass a local tokenizer folder "
                        f"(tokenizer.json / tokenizer_config.json, e.g. a phi-1.5 download)")
    try:
        from transformers import AutoTokenizer
    except ImportError as exc:
        raise ImportError("load_text_tokenizer needs transformers: pip install 'hermesflow_fast[hf]'") from exc
    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise UserError(f"load_text_tokenizer: cannot read a tokenizer from {path} ({type(exc).__name__}: "
                        f"{exc})") from exc


def build_word_tokenizer(words: Iterable[str], out_dir: str | os.PathLike) -> Any:
    """A word-level fast tokenizer over ``words`` (each split like the text it will read) and the template's words,
    with ``<|endoftext|>`` as eos and bos and ``<unk>``; saved to ``out_dir`` and returned."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab_words = set()
    for w in [*words, UND_TEMPLATE.format(question=DEFAULT_QUESTION)]:
        vocab_words.update(_WORD.findall(w))
    vocab_words -= {EOS_TOKEN, UNK_TOKEN}
    vocab = {EOS_TOKEN: 0, UNK_TOKEN: 1, **{w: i + 2 for i, w in enumerate(sorted(vocab_words))}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=UNK_TOKEN))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS_TOKEN, bos_token=EOS_TOKEN,
                                   unk_token=UNK_TOKEN)
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(out_dir))
    return fast


def _ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def und_prompt_ids(tokenizer: Any, question: str = DEFAULT_QUESTION) -> list[int]:
    """Tokens of ``"USER: {question} ASSISTANT:"`` (HermesFlow's training template; no bos, no trailing space).
    Spaces around ``question`` are dropped, a newline is kept: the original's curation asks
    ``"USER: \\nGive a caption for this image. ASSISTANT:"``, i.e. question = "\\nGive a caption for this image."."""
    return _ids(tokenizer, UND_TEMPLATE.format(question=question.strip(" ")))


def caption_ids(tokenizer: Any, caption: str) -> list[int]:
    """Tokens of an answer as it follows the template: ``" " + caption.strip()`` (no eos; Layout adds it)."""
    return _ids(tokenizer, " " + caption.strip())


def prompt_ids(tokenizer: Any, prompt: str) -> list[int]:
    """Tokens of a t2i prompt as Show-o tokenizes it (no specials; Layout adds [t2i][bos] … [eos])."""
    return _ids(tokenizer, prompt)
