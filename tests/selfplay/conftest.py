"""Fixtures shared by the self-play tests: a tiny BERT text embedder folder (word tokenizer + random weights)."""

import pytest
import torch

from hermesflow_fast.data.text import build_word_tokenizer

WORDS = "a red blue green circle square triangle above below and of two three one the image is".split()


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    """A local BERT folder for ``TextEmbedder(path, "bert-cls")``; the test skips without transformers."""
    transformers = pytest.importorskip("transformers")
    d = tmp_path_factory.mktemp("bert")
    tok = build_word_tokenizer(WORDS, d)
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=64, max_position_embeddings=64)
    transformers.BertModel(cfg).save_pretrained(d)
    return d
