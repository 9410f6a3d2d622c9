"""A user error on the command line is one line, ``error: …`` naming the file, line, id, argument or tensor, with exit
status 2 and no traceback (``--debug`` keeps it); nothing already written is changed. Also: rerunning ``tokenize``
over a damaged shard re-encodes it and says so."""

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from hermesflow_fast.cli import main
from hermesflow_fast.data.pairs import HERMESFLOW_FIELDS
from hermesflow_fast.model import ModelConfig, UnifiedTransformer
from hermesflow_fast.model.tokenizer_vq import PatchVQTokenizer

pytestmark = pytest.mark.usefixtures("one_thread")
TINY = "configs/tiny.yaml"


def _snapshot(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _run(args, folder, monkeypatch):
    """Run ``hermesflow ARGS``; check the run changed nothing under ``folder``; return the result."""
    monkeypatch.delenv("HFF_DEBUG", raising=False)
    before = _snapshot(folder)
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert _snapshot(folder) == before, "a failed command changed files that were already written"
    return result


def _assert_one_error_line(result, *fragments):
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output and not result.stdout.strip(), result.output
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


@pytest.fixture(scope="module")
def text_tok(tmp_path_factory):
    pytest.importorskip("transformers")
    from hermesflow_fast.data.text import build_word_tokenizer

    d = tmp_path_factory.mktemp("tok")
    build_word_tokenizer(["a red square", "a blue circle"], d)
    return d


def _train(tmp_path, *overrides):
    return ["train", "--config", TINY, "--run-dir", tmp_path / "run", "log.progress=false", *overrides]


def _real(pairs, text_tok, *more):
    return ["data.synthetic_pairs=0", f"data.pairs={pairs}", f"data.text_tokenizer={text_tok}", *more]


@pytest.mark.parametrize("case", ["empty", "folder", "binary", "missing"])
def test_unusable_pairs_file_is_one_line_naming_it(tmp_path, monkeypatch, case):
    pairs = tmp_path / "pairs.jsonl"
    if case == "empty":
        pairs.write_text("\n\n")
    elif case == "folder":
        pairs.mkdir()
    elif case == "binary":
        pairs.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\xff\xfe")
    expect = {"empty": "holds no pairs", "folder": "is a folder, expected a file of pairs",
              "binary": "pairs.jsonl:1: not UTF-8 text (byte 0", "missing": "does not exist"}[case]
    result = _run(_train(tmp_path, *_real(pairs, tmp_path / "tok")), tmp_path, monkeypatch)
    _assert_one_error_line(result, f"error: data.pairs: {pairs}", expect)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("layout", ["array", "stream"])
def test_hermesflow_file_read_as_jsonl_suggests_the_format(tmp_path, monkeypatch, layout):
    rec = {k: f"{k}.png" if "image" in k or "img" in k else "a red square" for k in HERMESFLOW_FIELDS
           if not k.endswith("score_win") and not k.endswith("score_lose")}
    pairs = tmp_path / "pair_dpo_data.json"
    pairs.write_text(json.dumps([rec, rec], indent=1) if layout == "array" else json.dumps(rec) + ",\n")
    result = _run(_train(tmp_path, *_real(pairs, tmp_path / "tok")), tmp_path, monkeypatch)
    _assert_one_error_line(result, f"data.pairs: {pairs} looks like HermesFlow's pair_dpo_data.json",
                           "set data.format=hermesflow")


def test_jsonl_read_as_hermesflow_suggests_jsonl(tmp_path, monkeypatch):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"id": "a", "prompt": "a red square", "caption_chosen": "a",
                                 "caption_rejected": "b", "image": "x.png"}) + "\n")
    result = _run(_train(tmp_path, *_real(pairs, tmp_path / "tok"), "data.format=hermesflow"), tmp_path, monkeypatch)
    _assert_one_error_line(result, "is not HermesFlow's pair_dpo_data.json", "set data.format=jsonl")


@pytest.fixture()
def cache(tmp_path):
    """A token cache of 3 images in 2 shards, and the tokenizer that wrote it."""
    from hermesflow_fast.data.token_cache import tokenize_images

    imgs = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    tok = PatchVQTokenizer.fit(imgs, num_codes=8, seed=0, iters=2)
    tok.save_pretrained(tmp_path / "vq")
    (tmp_path / "images").mkdir()
    for i in range(3):
        arr = ((imgs[i].permute(1, 2, 0).numpy() + 1) * 127.5).round().clip(0, 255).astype(np.uint8)
        Image.fromarray(arr).save(tmp_path / "images" / f"img{i}.png")
    tokenize_images(tmp_path / "images", tok, tmp_path / "cache", shard_size=2, progress=False)
    return tmp_path / "cache"


def test_no_pair_left_after_validation_names_the_file(tmp_path, text_tok, cache, monkeypatch):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"id": "a", "prompt": "a red square", "image_chosen": "cache:img0",
                                 "image_rejected": "cache:gone"}) + "\n")
    overrides = _real(pairs, text_tok, f"data.token_cache={cache}", "data.strict=false", "data.t2i_text_len=16",
                      "data.max_caption_tokens=24")
    result = CliRunner().invoke(main, [str(a) for a in _train(tmp_path, *overrides)])
    assert result.exit_code == 2 and "kept 0 / 1" in result.stdout  # the validation summary, then the error
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: data.pairs: none of the 1 pairs in {pairs} passed"), lines
    assert "1 missing image" in lines[0]


def test_strict_validation_is_one_line_naming_identical_images_and_bad_codes(tmp_path, text_tok, cache, monkeypatch):
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copy(tmp_path / "images" / "img1.png", tmp_path / "images" / "copy.png")
    (cache / "shards.jsonl").unlink()  # a cache edited by hand: no recorded sha256 catches it before validation
    ids = load_file(str(cache / "shard-00000.safetensors"))["ids"]
    ids[1, 3] = 9999
    save_file({"ids": ids}, str(cache / "shard-00000.safetensors"))
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"id": "same", "prompt": "a red square", "image_chosen": "images/img1.png",
                                 "image_rejected": "images/copy.png"}) + "\n"
                     + json.dumps({"id": "codes", "prompt": "a red square", "image_chosen": "cache:img1",
                                   "image_rejected": "cache:img2"}) + "\n")
    overrides = _real(pairs, text_tok, f"data.token_cache={cache}", "data.t2i_text_len=16",
                      "data.max_caption_tokens=24")
    result = _run(_train(tmp_path, *overrides), tmp_path, monkeypatch)
    _assert_one_error_line(result, f"error: {pairs}: 2 problem(s) in 2 records (1 bad codes, 1 equal pair):",
                           f"{pairs}:1: id 'same' [gen]: equal pair: image_chosen and image_rejected are the same "
                           f"image (files with identical bytes",
                           f"{pairs}:2: id 'codes' [gen]: bad codes: 'cache:img1': {cache / 'shard-00000.safetensors'}"
                           f" row 1: code 9999 at position 3 is outside the codebook [0, 8)")


def test_truncated_token_cache_shard_is_named_then_re_encoded_by_tokenize(tmp_path, text_tok, cache, monkeypatch):
    shard = cache / "shard-00001.safetensors"
    shard.write_bytes(shard.read_bytes()[:50])
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"id": "a", "prompt": "a red square", "image_chosen": "cache:img0",
                                 "image_rejected": "cache:img2"}) + "\n")
    result = _run(_train(tmp_path, *_real(pairs, text_tok, f"data.token_cache={cache}")), tmp_path, monkeypatch)
    _assert_one_error_line(result, f"error: data.token_cache: {shard} has 50 bytes", "rerun hermesflow tokenize")

    args = ["tokenize", tmp_path / "images", "--tokenizer", tmp_path / "vq", "--out", cache]
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    assert f"1 damaged shard(s) dropped ({shard.name}: 50 bytes" in result.stdout
    assert "1 of their record(s) re-encoded" in result.stdout and "2 already cached, 1 written" in result.stdout
    from hermesflow_fast.data.token_cache import TokenCache

    assert sorted(TokenCache(cache).ids()) == ["img0", "img1", "img2"]


@pytest.mark.parametrize("option", ["--batch-size", "--shard-size"])
def test_tokenize_bad_size_is_one_line_and_the_cache_is_untouched(tmp_path, cache, monkeypatch, option):
    args = ["tokenize", tmp_path / "images", "--tokenizer", tmp_path / "vq", "--out", cache, option, "0"]
    _assert_one_error_line(_run(args, tmp_path, monkeypatch), f"error: tokenize: {option} must be ≥ 1, got 0")


def test_tokenize_missing_source_or_tokenizer_is_one_line(tmp_path, cache, monkeypatch):
    args = ["tokenize", tmp_path / "nope", "--tokenizer", tmp_path / "vq", "--out", cache]
    _assert_one_error_line(_run(args, tmp_path, monkeypatch), f"source {tmp_path / 'nope'} does not exist")
    args = ["tokenize", tmp_path / "images", "--tokenizer", tmp_path / "gone", "--out", cache]
    _assert_one_error_line(_run(args, tmp_path, monkeypatch), f"{tmp_path / 'gone'} does not exist")


@pytest.mark.parametrize("damage", ["nan", "truncate"])
def test_unusable_init_model_is_one_line_naming_file_and_tensor(tmp_path, monkeypatch, damage):
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "init"
    UnifiedTransformer(ModelConfig.tiny(vocab_size=64)).save_pretrained(folder)
    weights = folder / "model.safetensors"
    if damage == "nan":
        sd = load_file(str(weights))
        sd["model.layers.1.mlp.fc1.weight"][0, 0] = float("nan")
        save_file(sd, str(weights))
        expect = f"error: {weights}: tensor 'model.layers.1.mlp.fc1.weight' holds 1 non-finite value"
    else:
        weights.write_bytes(weights.read_bytes()[:1000])
        expect = f"error: {weights}: not a readable safetensors file"
    result = _run(_train(tmp_path, f"model.init_from={folder}"), tmp_path, monkeypatch)
    _assert_one_error_line(result, expect)


def test_debug_keeps_the_traceback(tmp_path, monkeypatch):
    monkeypatch.setenv("HFF_DEBUG", "0")  # restored after the test; --debug sets it to 1 for this process
    result = CliRunner().invoke(main, ["--debug", "tokenize", str(tmp_path / "nope"), "--tokenizer", str(tmp_path),
                                       "--out", str(tmp_path / "out")])
    assert result.exit_code != 0 and "does not exist" in str(result.exception)
    assert type(result.exception).__name__ == "TokenCacheError"
