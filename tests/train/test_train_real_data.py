"""Training on files as a user has them: our JSONL with token-cache refs, HermesFlow's pair_dpo_data.json with image
paths (encoded once by the image tokenizer), validation that drops and counts, and --init-from our checkpoint."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from hermesflow_fast.data.text import build_word_tokenizer
from hermesflow_fast.data.token_cache import tokenize_images
from hermesflow_fast.model.tokenizer_vq import PatchVQTokenizer
from hermesflow_fast.train.config import load_config
from hermesflow_fast.train.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")
WORDS = ["<|endoftext|>", "<unk>", "a", "red", "blue", "green", "square", "circle", "on", "the", "left", "right",
         "USER:", "ASSISTANT:", "Give", "detailed", "caption", "for", "this", "image."]
TINY = "configs/tiny.yaml"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    build_word_tokenizer(WORDS, root / "tok")
    g = torch.Generator().manual_seed(0)
    imgs = torch.rand(8, 3, 16, 16, generator=g) * 2 - 1
    PatchVQTokenizer.fit(imgs, num_codes=16, seed=0, iters=2).save_pretrained(root / "vq")
    (root / "img").mkdir()
    for i in range(8):
        arr = ((imgs[i].permute(1, 2, 0).numpy() + 1) * 127.5).round().clip(0, 255).astype(np.uint8)
        Image.fromarray(arr).save(root / "img" / f"i{i}.png")
    from hermesflow_fast.model.tokenizer_vq import load_image_tokenizer

    tokenize_images(root / "img", load_image_tokenizer(root / "vq"), root / "cache", progress=False)
    return root


def _overrides(root, run, **kw):
    base = {"log.progress": "false", "data.synthetic_pairs": "0", "data.text_tokenizer": str(root / "tok"),
            "data.t2i_text_len": "16", "data.max_caption_tokens": "24", "train.batch_size": "2", "train.epochs": "1",
            "run.run_dir": str(run), "checkpoint.every": "2"}
    base.update(kw)
    return [f"{k}={v}" for k, v in base.items()]


def test_jsonl_with_cache_refs_drops_and_counts_bad_sides(world, tmp_path):
    caps = ["a red square", "a blue circle", "the green square on the left", "a red circle on the right"]
    lines = [{"id": f"r{i}", "prompt": caps[i % 4], "image": f"cache:i{i}", "caption_chosen": caps[i % 4],
              "caption_rejected": caps[(i + 1) % 4], "image_chosen": f"cache:i{(i + 1) % 8}",
              "image_rejected": f"cache:i{(i + 2) % 8}"} for i in range(5)]
    lines[4]["caption_rejected"] = lines[4]["caption_chosen"]  # equal captions: the und side is dropped
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(x) + "\n" for x in lines))
    logs = []
    cfg = load_config(TINY, _overrides(world, tmp_path / "run", **{
        "data.pairs": str(pairs), "data.token_cache": str(world / "cache"), "data.strict": "false"}))
    tr = Trainer(cfg, log=logs.append).setup()
    assert any("kept 5 / 5" in m and "equal" in m for m in logs), logs
    hist = tr.train()
    assert len(hist) == 3 and all(np.isfinite(h["loss"]) for h in hist)
    h = hist[0]  # policy == reference: every side of every pair contributes log 2 (a pair lacks its und side)
    assert abs(h["loss"] - np.log(2) * (h["und/pairs"] + h["gen/pairs"]) / h["pairs"]) < 1e-5
    assert sum(x["und/pairs"] for x in hist) == 4 and sum(x["gen/pairs"] for x in hist) == 5
    assert tr.data.vocab.num_image_codes == 16 and tr.policy.config.vocab_size == tr.data.vocab.vocab_size
    # a new run starting from our checkpoint: policy == reference again at its first step
    ck = tr.ckpt.latest()
    cfg2 = load_config(TINY, _overrides(world, tmp_path / "run2", **{
        "data.pairs": str(pairs), "data.token_cache": str(world / "cache"), "data.strict": "false",
        "model.init_from": str(ck)}))
    tr2 = Trainer(cfg2, log=lambda m: None).setup()
    torch.testing.assert_close(tr2.policy.lm_head.weight, tr.policy.lm_head.weight)
    h2 = tr2.train()[0]
    assert abs(h2["loss"] - np.log(2) * (h2["und/pairs"] + h2["gen/pairs"]) / h2["pairs"]) < 1e-5


def test_strict_validation_refuses_the_run(world, tmp_path):
    pairs = tmp_path / "bad.jsonl"
    pairs.write_text(json.dumps({"id": "x", "prompt": "a red square", "image": "cache:nope", "caption_chosen": "a",
                                 "caption_rejected": "red", "image_chosen": "cache:i0",
                                 "image_rejected": "cache:i1"}) + "\n")
    cfg = load_config(TINY, _overrides(world, tmp_path / "run", **{
        "data.pairs": str(pairs), "data.token_cache": str(world / "cache")}))
    with pytest.raises(ValueError, match=r"bad.jsonl:1.*'x'.*nope"):
        Trainer(cfg, log=lambda m: None).setup()
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_hermesflow_pair_file_with_image_paths(world, tmp_path):
    recs = [{"id": i, "caption": "a red square", "img_path": f"img/i{i}.png", "caption_win": "a red square",
             "caption_lose": "a blue circle", "image_win": f"img/i{i + 1}.png", "image_lose": f"img/i{i + 2}.png"}
            for i in range(4)]
    src = tmp_path / "pair_dpo_data.json"
    src.write_text(",\n".join(json.dumps(r) for r in recs) + ",\n")  # the object stream its scripts write
    cfg = load_config(TINY, _overrides(world, tmp_path / "run", **{
        "data.pairs": str(src), "data.format": "hermesflow", "data.image_root": str(world),
        "data.image_tokenizer": str(world / "vq")}))
    tr = Trainer(cfg, log=lambda m: None).setup()
    assert len(tr.data.pairs) == 4
    hist = tr.train()
    assert len(hist) == 2 and all(np.isfinite(h["loss"]) for h in hist)
