"""Real-data scorers from a local model folder: a tiny BERT written by the test (word tokenizer + random weights;
the ``bert_dir`` fixture of tests/selfplay/conftest.py)."""

import os
import shutil

import pytest
import torch

from hermesflow_fast.errors import UserError
from hermesflow_fast.selfplay.journal import Journal
from hermesflow_fast.selfplay.scorers import EmbeddingAnswerMatcher, EmbeddingCaptionScorer, TextEmbedder
from hermesflow_fast.selfplay.stages import CurationRecord, und_scores


def test_bert_cls_embeddings_are_unit_and_batch_independent(bert_dir):
    emb = TextEmbedder(bert_dir, "bert-cls", batch_size=2)
    texts = ["a red circle", "two blue squares above a green triangle", "a red circle"]
    v = emb.embed(texts)
    assert v.shape == (3, 32)
    torch.testing.assert_close(v.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(v[0], v[2])
    torch.testing.assert_close(emb.embed(texts[1:2])[0], v[1], atol=1e-5, rtol=1e-5)  # padding does not leak


def test_caption_scorer_embeds_the_truth_once_and_scores_identity_highest(bert_dir, tmp_path):
    emb = TextEmbedder(bert_dir, "bert-cls")
    calls = []
    real = emb.embed
    emb.embed = lambda texts: calls.append(list(texts)) or real(texts)
    scorer = EmbeddingCaptionScorer(emb)
    truth = "a red circle above a blue square"
    caps = ["a red circle above a blue square", "three green triangles", "a blue square"]
    recs = [CurationRecord(f"r{i}", "p", torch.zeros(4, dtype=torch.long), [], truth) for i in range(2)]
    cand = Journal(tmp_path / "c.jsonl")
    for r in recs:
        cand.append({"id": r.id, "captions": caps})
    out = und_scores(recs, cand, Journal(tmp_path / "s.jsonl"), scorer).records()
    scores = out["r0"]["scores"]
    assert scores == out["r1"]["scores"] and scores[0] == pytest.approx(1.0, abs=1e-5)
    assert scores[0] > max(scores[1:])
    assert sum(c == [truth] for c in calls) == 1  # the truth's embedding is reused by the second record
    assert scorer(caps[1], truth) == pytest.approx(scores[1], abs=1e-6)


def test_answer_matcher_exact_first_then_nearest_choice():
    class Fake:
        table = {"red": [1.0, 0.0], "blue": [0.0, 1.0], "crimson": [0.9, 0.1], "banana": [-1.0, 0.0]}

        def embed(self, texts):
            return torch.nn.functional.normalize(torch.tensor([self.table[t] for t in texts]), dim=-1)

    m = EmbeddingAnswerMatcher(Fake(), min_similarity=0.5)
    assert m("Red.", ["red", "blue"]) == "red"  # exact after normalisation, no embedding
    assert m("crimson", ["red", "blue"]) == "red"
    assert m("banana", ["red", "blue"]) is None  # nothing close enough


def test_missing_or_bad_model_folder_is_a_clear_error(tmp_path):
    with pytest.raises(UserError, match="nope"):
        TextEmbedder(tmp_path / "nope", "bert-cls")
    with pytest.raises(UserError, match="cannot load"):
        TextEmbedder(tmp_path, "bert-cls")
    with pytest.raises(UserError, match="kind must be"):
        TextEmbedder(tmp_path, "glove")


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


@pytest.mark.parametrize("kind", ["bert-cls", "sbert"])
def test_model_folder_holding_a_pickle_with_code_is_refused_naming_the_file(bert_dir, tmp_path, kind):
    from safetensors.torch import load_file

    folder = tmp_path / "scorer"
    shutil.copytree(bert_dir, folder)
    sd = load_file(str(folder / "model.safetensors"))
    (folder / "model.safetensors").unlink()
    torch.save(sd, folder / "pytorch_model.bin")  # tensors only: loads as before
    torch.testing.assert_close(TextEmbedder(folder, "bert-cls").embed(["a red circle"]),
                               TextEmbedder(bert_dir, "bert-cls").embed(["a red circle"]))
    torch.save({**sd, "payload": _Evil()}, folder / "pytorch_model.bin")
    with pytest.raises(UserError, match=rf"{folder / 'pytorch_model.bin'}: refused to unpickle"):
        TextEmbedder(folder, kind)


def test_sbert_without_the_extra_says_how_to_install(bert_dir):
    import importlib.util

    if importlib.util.find_spec("sentence_transformers") is not None:
        pytest.skip("sentence-transformers is installed here")
    with pytest.raises(ImportError, match=r"hermesflow_fast\[scorers\]"):
        TextEmbedder(bert_dir, "sbert")
