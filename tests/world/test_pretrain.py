"""Pretraining the world's base (world/pretrain.py) and loading it (world/shipped.py): a toy-size run is reproducible
(same seed → bit-identical weights) and its losses fall; a saved folder loads back equal; the shipped base loads
and generates valid codes and text; bad folders fail with the file named."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from click.testing import CliRunner

from hermesflow_fast.cli import main
from hermesflow_fast.model.bundle import ModelBundle
from hermesflow_fast.model.generate import generate_images, generate_text
from hermesflow_fast.world import make_records
from hermesflow_fast.world.pretrain import PretrainConfig, mask_slots, packed_mmu, pretrain, target_logprobs
from hermesflow_fast.world.shipped import BASE_DIR, load_base

pytestmark = pytest.mark.usefixtures("one_thread")

TOY = dict(records=48, steps=30, warmup_steps=3, num_codes=64, vq_images=48, vq_iters=3, hidden_size=32,
           num_layers=1, num_heads=2, intermediate_size=64, batch_t2i=8, batch_und=4, lr=3e-3,
           eval_records=0, log_every=10)


@pytest.fixture(scope="module")
def toy_runs():
    cfg = PretrainConfig(**TOY)
    return [pretrain(cfg, out=None, log=None) for _ in range(2)], cfg


def test_pretrain_same_seed_same_weights(toy_runs):
    (a, _), (b, _) = toy_runs[0]
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    assert torch.equal(a.image_tokenizer.codebook, b.image_tokenizer.codebook)


def test_pretrain_other_seed_other_weights(toy_runs):
    (a, _), _ = toy_runs[0]
    c, _ = pretrain(PretrainConfig(**{**TOY, "steps": 3, "seed": 1}), out=None, log=None)
    assert not torch.equal(a.model.lm_head.weight, c.model.lm_head.weight)


def test_pretrain_losses_fall(toy_runs):
    (_, summary), _ = toy_runs[0]
    first, last = summary["curve"][0], summary["curve"][-1]
    assert [r["step"] for r in summary["curve"]] == [10, 20, 30]
    for k in ("t2i", "caption", "vqa", "loss"):
        assert last[k] < first[k], (k, first[k], last[k])
    assert set(summary["final_losses"]) == {"t2i", "caption", "vqa", "loss"}


def test_mask_slots_follow_the_cosine_schedule():
    g = torch.Generator().manual_seed(0)
    m = mask_slots(4000, 64, g)  # (B, N)
    k = m.sum(1)
    assert int(k.min()) >= 1 and int(k.max()) <= 64
    # E[cos(πt/2)] = 2/π for t ~ U(0, 1)
    assert abs(float(k.float().mean()) / 64 - 2 / torch.pi) < 0.02


def test_packed_understanding_rows_equal_the_unpacked_ones(toy_runs):
    """One row per image with its texts as branches gives each text's log-probs of its own Layout.mmu row."""
    (wm, _), _ = toy_runs[0]
    v, tok = wm.vocab, wm.text_tokenizer
    torch.manual_seed(1)
    codes = torch.randint(wm.vocab.num_image_codes, (2, 64))
    texts = [[("what shape is in the image ?", "circle"), ("how many shapes are there ?", "two")],
             [("Give a detailed caption for this image .", "a red circle and a blue square")]]
    ids = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    branches = [[([v.bos] * (k % 2) + ids(p), ids(a), "vqa" if k < 1 else "caption") for k, (p, a) in enumerate(r)]
                for r in texts]
    packed = target_logprobs(wm.model, packed_mmu(v, codes, branches))
    for b, row in enumerate(branches):
        for name in ("vqa", "caption"):
            mine = [(p, a) for p, a, n in row if n == name]
            if not mine:
                continue
            alone = wm.layout.mmu(codes[[b] * len(mine)], [p for p, _ in mine], [a for _, a in mine], pad_to=False)
            lp, ok = target_logprobs(wm.model, alone)["answer"]
            plp, pok = packed[name]
            torch.testing.assert_close(plp[b][pok[b]], lp[ok], atol=1e-5, rtol=1e-5)


def test_saved_folder_loads_back_equal(toy_runs, tmp_path):
    (wm, _), _ = toy_runs[0]
    wm.save(tmp_path / "m")
    back = load_base(tmp_path / "m")
    assert back.vocab == wm.vocab
    assert (back.layout.t2i_text_len, back.layout.mmu_text_len) == (wm.layout.t2i_text_len, wm.layout.mmu_text_len)
    for k, v in wm.model.state_dict().items():
        assert torch.equal(back.model.state_dict()[k], v), k
    assert torch.equal(back.image_tokenizer.codebook, wm.image_tokenizer.codebook)
    assert not back.model.training
    saved = json.loads((tmp_path / "m" / "config.json").read_text())["hermesflow"]
    assert saved["vocab"] == wm.vocab.to_dict()


def test_load_base_names_what_is_wrong(toy_runs, tmp_path):
    with pytest.raises(FileNotFoundError, match="lacks"):
        load_base(tmp_path / "nothing")
    (wm, _), _ = toy_runs[0]
    wm.save(tmp_path / "m")
    vocab = json.loads((tmp_path / "m" / "vocab.json").read_text())
    vocab["num_image_codes"] += 1
    (tmp_path / "m" / "vocab.json").write_text(json.dumps(vocab))
    with pytest.raises(ValueError, match="vocab"):
        load_base(tmp_path / "m")


def test_shipped_base_loads_and_generates():
    wm = load_base()
    assert isinstance(wm, ModelBundle) and wm.path == BASE_DIR
    assert not wm.model.training
    cfg = PretrainConfig()
    assert wm.num_image_tokens == (32 // cfg.patch_size) ** 2 and wm.vocab.num_image_codes == cfg.num_codes
    summary = json.loads((BASE_DIR / "pretrain.json").read_text())
    assert summary["eval"]["und"] > summary["eval"]["gen"] > 0.2
    tok = wm.text_tokenizer
    recs = make_records(2, 0, "heldout")
    texts = [tok(r.prompt, add_special_tokens=False)["input_ids"] for r in recs]
    codes = generate_images(wm.model, wm.layout, texts, wm.num_image_tokens, images_per_prompt=2, steps=4,
                            guidance_scale=3.0, generator=torch.Generator().manual_seed(0))
    assert codes.shape == (4, wm.num_image_tokens) and codes.dtype == torch.int64
    assert int(codes.min()) >= 0 and int(codes.max()) < wm.vocab.num_image_codes
    assert wm.image_tokenizer.decode(codes).shape == (4, 3, 32, 32)
    prompt = tok("USER: Give a detailed caption for this image. ASSISTANT:", add_special_tokens=False)["input_ids"]
    out = generate_text(wm.model, wm.layout, codes[:2], [prompt] * 2, max_new_tokens=12)
    assert all(0 <= t < wm.vocab.text_vocab_size for row in out for t in row)
    assert all(isinstance(tok.decode(row), str) for row in out)


def test_pretrain_command_writes_a_loadable_folder(tmp_path):
    res = CliRunner().invoke(main, ["pretrain", "--world", "shapes", "--out", str(tmp_path / "b"), "--records", "24",
                                    "--steps", "2", "--eval-records", "2", "--seed", "3"])
    assert res.exit_code == 0, res.output
    summary = json.loads((tmp_path / "b" / "pretrain.json").read_text())
    assert summary["command"].startswith("hermesflow pretrain --world shapes") and summary["config"]["seed"] == 3
    assert 0.0 <= summary["eval"]["und"] <= 1.0 and "train" in summary["wall_time_s"]
    wm = load_base(tmp_path / "b")
    assert wm.vocab.num_image_codes == PretrainConfig().num_codes
    shutil.rmtree(tmp_path / "b")
