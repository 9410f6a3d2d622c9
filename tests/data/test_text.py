"""Text side: a word-level tokenizer saved and read back by load_text_tokenizer, HermesFlow's understanding template,
and a clear error for a missing tokenizer folder."""

from __future__ import annotations

import pytest

pytest.importorskip("tokenizers")
pytest.importorskip("transformers")

from hermesflow_fast.data.pairs import DEFAULT_QUESTION  # noqa: E402
from hermesflow_fast.data.text import (  # noqa: E402
    EOS_TOKEN,
    UNK_TOKEN,
    build_word_tokenizer,
    caption_ids,
    load_text_tokenizer,
    prompt_ids,
    und_prompt_ids,
)
from hermesflow_fast.errors import UserError  # noqa: E402


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    build_word_tokenizer(["a red square.", "a blue circle left of a green triangle"], d)
    return d


def test_word_tokenizer_round_trips_through_load(tok_dir):
    tok = load_text_tokenizer(tok_dir)
    assert tok.eos_token == tok.bos_token == EOS_TOKEN and tok.eos_token_id == tok.bos_token_id == 0
    assert tok.unk_token == UNK_TOKEN and tok.unk_token_id == 1
    ids = prompt_ids(tok, "a red square.")
    assert len(ids) == 4 and UNK_TOKEN not in tok.convert_ids_to_tokens(ids)
    assert tok.convert_ids_to_tokens(prompt_ids(tok, "a purple square")) == ["a", UNK_TOKEN, "square"]
    assert tok.decode(ids) == "a red square ."


def test_und_template_is_hermesflows_training_one(tok_dir):
    tok = load_text_tokenizer(tok_dir)
    ids = und_prompt_ids(tok)
    words = tok.convert_ids_to_tokens(ids)
    assert words == ["USER", ":", *DEFAULT_QUESTION.rstrip(".").split(), ".", "ASSISTANT", ":"]
    assert EOS_TOKEN not in words and UNK_TOKEN not in words  # no bos; template words are in the vocabulary
    assert und_prompt_ids(tok, "  What colour?  ") == prompt_ids(tok, "USER: What colour? ASSISTANT:")
    assert caption_ids(tok, " a red square ") == prompt_ids(tok, "a red square")


def test_load_text_tokenizer_missing_folder_names_it(tmp_path):
    with pytest.raises(UserError, match="nope is not a folder"):
        load_text_tokenizer(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="cannot read a tokenizer from .*empty"):
        load_text_tokenizer(tmp_path / "empty")
