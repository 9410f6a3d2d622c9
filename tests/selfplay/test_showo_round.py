"""From a Show-o checkpoint, a MAGVIT-v2 folder and a tokenizer folder, each written the way the originals publish
them, plus a JSONL of images and captions, to one full self-play round: `hermesflow bundle`, then
`hermesflow selfplay --config selfplay-real` (the Show-o preset) with tiny sizes."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from hermesflow_fast.cli import main
from hermesflow_fast.config import load_config
from hermesflow_fast.data.text import build_word_tokenizer, load_text_tokenizer
from hermesflow_fast.model import ModelConfig, UnifiedTransformer, Vocabulary
from hermesflow_fast.selfplay.config import SelfPlayConfig
from hermesflow_fast.world import make_records, world_words

ROOT = Path(__file__).resolve().parents[2]
# five levels, stride 16 (Show-o's), at 32 channels and 6 code bits: 256 px → 16×16 = 256 codes of 64
MAGVIT_SIZES = dict(ch=32, enc_mult=(1, 1, 1, 1, 1), enc_blocks=(1, 1, 1, 1, 1), dec_mult=(1, 1, 1, 1, 1),
                    dec_blocks=(1, 1, 1, 1, 1), z=6)


def _module(name: str):
    """A sibling test module's writers of the published layouts (tests/model/)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "tests" / "model" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    """phi-1_5-style tokenizer folder, a Show-o checkpoint (wrapper config + `showo.` weights in
    pytorch_model.safetensors) whose llm_model_path is a local Phi config, and a MAGVIT-v2 release."""
    from safetensors.torch import save_file

    ckpt, magvit = _module("test_published_checkpoints"), _module("test_magvit_published")
    root = tmp_path_factory.mktemp("published")
    tok = build_word_tokenizer(world_words(), root / "phi-1_5")
    vocab = Vocabulary.from_tokenizer(load_text_tokenizer(root / "phi-1_5"), num_image_codes=2 ** MAGVIT_SIZES["z"])
    (root / "phi").mkdir()
    phi = dict(ckpt.PHI_15_STYLE, max_position_embeddings=512)  # Show-o's t2i rows: 129 text + 258 image slots
    (root / "phi" / "config.json").write_text(json.dumps(phi, indent=2))
    model = ckpt._randomize(UnifiedTransformer(ModelConfig.from_dict(dict(phi, vocab_size=vocab.vocab_size))), seed=3)
    (root / "show-o").mkdir()
    ckpt._save_like_show_o(root / "show-o", {f"showo.{k}": v for k, v in model.state_dict().items()
                                             if not k.endswith("inv_freq")})
    (root / "show-o" / "config.json").write_text(ckpt._show_o_config(str(root / "phi"), vocab.vocab_size))
    (root / "magvitv2").mkdir()
    save_file({k: v.contiguous() for k, v in magvit._show_o_release(MAGVIT_SIZES).items()},
              str(root / "magvitv2" / "pytorch_model.safetensors"), metadata={"format": "pt"})
    (root / "magvitv2" / "config.json").write_text(json.dumps({"_class_name": "MAGVITv2",
                                                               "_diffusers_version": "0.30.1"}))
    assert len(tok) > 0
    return root, model


def test_bundle_then_one_selfplay_round_with_the_showo_preset(published, bert_dir, tmp_path):
    from test_sources import make_folder  # records.jsonl + images/ + questions.json, as the real-data tests write

    root, model = published
    out = tmp_path / "bundle"
    res = CliRunner().invoke(main, ["bundle", "--model", str(root / "show-o"), "--image-tokenizer",
                                    str(root / "magvitv2"), "--text-tokenizer", str(root / "phi-1_5"), "--out",
                                    str(out)])
    assert res.exit_code == 0, res.output
    from hermesflow_fast.model.bundle import load_bundle

    b = load_bundle(out)
    assert b.num_image_tokens == 256 and b.layout.t2i_text_len == 129 and b.layout.mmu_text_len == 128
    for k, v in model.state_dict().items():
        assert torch.equal(b.model.state_dict()[k], v), k

    data = tmp_path / "data"
    make_folder(data, make_records(3, seed=0))
    cfg = load_config("selfplay-real", [
        f"world.base={out}", f"data.records={data / 'records.jsonl'}", f"data.questions={data / 'questions.json'}",
        f"data.scorer_model={bert_dir}", f"data.answer_model={bert_dir}", "data.answer_kind=bert-cls",
        "curation.caption_grid=[[1,0.0],[3,0.7]]", "curation.images_per_prompt=2", "curation.steps=2",
        "curation.caption_tokens=6", "curation.answer_tokens=3", "curation.batch_size=2", "train.batch_size=2",
        "log.progress=false"], schema=SelfPlayConfig)
    assert cfg.curation.vqa_prompt == "hermesflow" and cfg.curation.reencode_images  # the preset stays in effect
    from hermesflow_fast.selfplay.rounds import run_selfplay

    said: list[str] = []
    results = run_selfplay(cfg, tmp_path / "run", rounds=1, log=said.append)
    rd = tmp_path / "run" / "round-1"
    assert [r["round"] for r in results] == [0, 1] and results[1]["gen"] is None  # real data: no judge
    for stage in ("und_candidates", "und_scores", "gen_candidates", "gen_scores", "pairs", "train", "eval"):
        assert (rd / f"{stage}.done").is_file(), stage
    cands = [json.loads(x) for x in (rd / "gen_candidates.jsonl").read_text().splitlines()]
    assert len(cands) == 3 and all(len(c["images"]) == 2 and len(c["images"][0]) == 256 for c in cands)
    assert (rd / "model" / "config.json").is_file() and (tmp_path / "run" / "summary.json").is_file()
    assert load_bundle(rd / "model").vocab == b.vocab
