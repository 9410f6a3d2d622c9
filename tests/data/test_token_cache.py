"""Token cache: folder and JSONL sources, codes equal tokenizer.encode, resume without duplicates, bad images."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from hermesflow_fast.data import token_cache
from hermesflow_fast.data.token_cache import TokenCache, list_records, tokenize_command, tokenize_images
from hermesflow_fast.model.magvit import MAGVITv2, MAGVITv2Config
from hermesflow_fast.model.tokenizer_vq import PatchVQTokenizer, load_image

SIZE = 16

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see tests/conftest.py



def _write_images(folder, n, seed=0, prefix="img"):
    """n RGB PNGs of blocky random colours; returns their paths."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        small = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
        arr = np.kron(small, np.ones((4, 4, 1), dtype=np.uint8))  # (16, 16, 3)
        p = folder / f"{prefix}{i:02d}.png"
        Image.fromarray(arr).save(p)
        paths.append(p)
    return paths


@pytest.fixture(scope="module")
def vq():
    g = torch.Generator().manual_seed(0)
    images = torch.rand(16, 3, SIZE, SIZE, generator=g) * 2 - 1
    return PatchVQTokenizer.fit(images, num_codes=32, seed=0, iters=3)


def _assert_matches_encode(cache, records, tok):
    for rec in records:
        expected = tok.encode(load_image(rec.path, SIZE)[None])[0]
        got = cache[rec.id]
        assert got.dtype == torch.int64 and torch.equal(got, expected), rec.id


def test_folder_source_codes_equal_encode(tmp_path, vq):
    _write_images(tmp_path / "src", 5)
    _write_images(tmp_path / "src" / "sub", 2, seed=1, prefix="x")
    summary = tokenize_images(tmp_path / "src", vq, tmp_path / "out", batch_size=3, shard_size=4, progress=False)
    assert (summary.records, summary.written, summary.errors) == (7, 7, 0) and len(summary.shards) == 2
    cache = TokenCache(tmp_path / "out")
    records = list_records(tmp_path / "src")
    assert sorted(cache.ids()) == sorted(r.id for r in records) and len(cache) == 7
    assert "sub/x01" in cache and "missing" not in cache
    _assert_matches_encode(cache, records, vq)
    shard = load_file(str(tmp_path / "out" / "shard-00000.safetensors"))["ids"]
    assert shard.dtype == torch.uint16 and shard.shape == (4, 16)
    with pytest.raises(KeyError, match="'nope' is not in"):
        cache["nope"]


def test_jsonl_source_resume_gives_each_id_once(tmp_path, vq):
    paths = _write_images(tmp_path / "imgs", 10)
    lines = [json.dumps({"id": i, "image": f"imgs/{p.name}"}) for i, p in enumerate(paths)]
    (tmp_path / "half.jsonl").write_text("\n".join(lines[:5]) + "\n")
    (tmp_path / "all.jsonl").write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    first = tokenize_images(tmp_path / "half.jsonl", vq, out, batch_size=2, shard_size=3, progress=False)
    assert first.written == 5
    second = tokenize_images(tmp_path / "all.jsonl", vq, out, batch_size=2, shard_size=3, progress=False)
    assert (second.cached_before, second.written) == (5, 5)
    assert second.shards[0] == "shard-00002.safetensors"  # appended after the first run's two shards
    third = tokenize_images(tmp_path / "all.jsonl", vq, out, batch_size=2, shard_size=3, progress=False)
    assert (third.written, third.shards) == (0, [])
    index_ids = [json.loads(line)["id"] for line in (out / "index.jsonl").read_text().splitlines()]
    assert sorted(index_ids) == sorted(str(i) for i in range(10))
    _assert_matches_encode(TokenCache(out), list_records(tmp_path / "all.jsonl"), vq)


def test_killed_run_loses_nothing_and_duplicates_nothing(tmp_path, vq, monkeypatch):
    _write_images(tmp_path / "src", 9)
    out = tmp_path / "out"
    real = token_cache._write_shard
    calls = {"n": 0}

    def dying(out_dir, number, ids, rows, summary):  # the 2nd shard reaches disk, then the run dies before indexing
        calls["n"] += 1
        if calls["n"] == 2:
            from safetensors.torch import save_file

            save_file({"ids": torch.stack(rows)}, str(out_dir / token_cache._shard_name(number)))
            save_file({"ids": torch.stack(rows)}, str(out_dir / "shard-00009.safetensors.tmp"))
            raise KeyboardInterrupt
        return real(out_dir, number, ids, rows, summary)

    monkeypatch.setattr(token_cache, "_write_shard", dying)
    with pytest.raises(KeyboardInterrupt):
        tokenize_images(tmp_path / "src", vq, out, batch_size=2, shard_size=2, progress=False)
    monkeypatch.setattr(token_cache, "_write_shard", real)
    assert len(TokenCache(out)) == 2
    with open(out / "index.jsonl", "a") as f:
        f.write('{"id": "img05", "sha')  # a torn line: killed mid-append
    summary = tokenize_images(tmp_path / "src", vq, out, batch_size=2, shard_size=2, progress=False)
    assert (summary.cached_before, summary.written) == (2, 7)
    assert not list(out.glob("*.tmp"))
    lines = (out / "index.jsonl").read_text().splitlines()
    assert len(lines) == 9 and len({json.loads(x)["id"] for x in lines}) == 9
    indexed = {json.loads(x)["shard"] for x in lines}
    assert {p.name for p in out.glob("shard-*.safetensors")} == indexed  # the unindexed shard was removed
    _assert_matches_encode(TokenCache(out), list_records(tmp_path / "src"), vq)


def test_bad_images_are_reported_and_skipped(tmp_path, vq):
    src = tmp_path / "src"
    _write_images(src, 3)
    (src / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    Image.fromarray(np.zeros((8, 16, 3), np.uint8)).save(src / "small.png")
    Image.fromarray(np.zeros((16, 16, 4), np.uint8)).save(src / "alpha.png")
    summary = tokenize_images(src, vq, tmp_path / "out", batch_size=4, shard_size=10, progress=False)
    assert (summary.written, summary.errors) == (3, 3)
    errors = {e["id"]: e for e in map(json.loads, (tmp_path / "out" / "errors.jsonl").read_text().splitlines())}
    assert set(errors) == {"corrupt", "small", "alpha"}
    assert errors["corrupt"]["path"] == str(src / "corrupt.png") and "cannot" in errors["corrupt"]["reason"]
    assert "16×8 (W×H)" in errors["small"]["reason"] and "mode is RGBA" in errors["alpha"]["reason"]
    cache = TokenCache(tmp_path / "out")
    assert sorted(cache.ids()) == ["img00", "img01", "img02"]
    (tmp_path / "missing.jsonl").write_text(json.dumps({"id": "m", "image": "nowhere.png"}) + "\n")
    summary = tokenize_images(tmp_path / "missing.jsonl", vq, tmp_path / "out2", progress=False)
    assert summary.errors == 1 and "nowhere.png" in (tmp_path / "out2" / "errors.jsonl").read_text()


def test_other_tokenizer_is_refused_and_bad_sources_error(tmp_path, vq):
    _write_images(tmp_path / "src", 2)
    tokenize_images(tmp_path / "src", vq, tmp_path / "out", progress=False)
    other = PatchVQTokenizer(vq.config, vq.codebook + 0.01)
    with pytest.raises(ValueError, match="another tokenizer.*tokenizer_digest"):
        tokenize_images(tmp_path / "src", other, tmp_path / "out", progress=False)
    (tmp_path / "bad.jsonl").write_text('{"id": "a", "image": "x.png"}\n{"id": "a", "image": "y.png"}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: id 'a' already appears on line 1"):
        list_records(tmp_path / "bad.jsonl")
    (tmp_path / "bad2.jsonl").write_text('{"id": "a"}\n')
    with pytest.raises(ValueError, match=r"bad2\.jsonl:1: each line needs"):
        list_records(tmp_path / "bad2.jsonl")


def test_tokenize_command_with_a_saved_magvit(tmp_path):
    cfg = MAGVITv2Config(ch=8, encoder_ch_mult=(1, 2, 2), encoder_num_res_blocks=(1, 1, 1),
                         decoder_ch_mult=(1, 1, 2), decoder_num_res_blocks=(1, 1, 1), norm_groups=4, resolution=SIZE)
    MAGVITv2(cfg).save_pretrained(tmp_path / "tok")
    _write_images(tmp_path / "src", 3)
    summary = tokenize_command(tmp_path / "src", tmp_path / "tok", tmp_path / "out", batch_size=2, shard_size=8,
                               device="cpu")
    assert summary.written == 3
    cache = TokenCache(tmp_path / "out")
    tok = MAGVITv2.from_pretrained(tmp_path / "tok")
    assert cache.num_codes == 8192 and cache.tokens_per_image == 16
    _assert_matches_encode(cache, list_records(tmp_path / "src"), tok)


# --- integrity: shards.jsonl on write, checked on resume and on read ----------------------------------------------


def _cache(tmp_path, vq, n=6, shard_size=2):
    _write_images(tmp_path / "src", n)
    out = tmp_path / "out"
    tokenize_images(tmp_path / "src", vq, out, batch_size=2, shard_size=shard_size, progress=False)
    return out


def test_shards_file_records_size_and_sha256_of_each_shard(tmp_path, vq):
    import hashlib

    out = _cache(tmp_path, vq)
    lines = [json.loads(x) for x in (out / "shards.jsonl").read_text().splitlines()]
    assert [r["shard"] for r in lines] == [f"shard-0000{i}.safetensors" for i in range(3)]
    for r in lines:
        data = (out / r["shard"]).read_bytes()
        assert (r["rows"], r["bytes"], r["sha256"]) == (2, len(data), hashlib.sha256(data).hexdigest())


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete"])
def test_damaged_shard_is_named_on_read_and_re_encoded_on_resume(tmp_path, vq, damage):
    out = _cache(tmp_path, vq)
    shard = out / "shard-00001.safetensors"
    data = shard.read_bytes()
    if damage == "truncate":
        shard.write_bytes(data[: len(data) // 2])
    elif damage == "flip":  # same size, one code changed: only the sha256 tells
        shard.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    else:
        shard.unlink()
    victims = [json.loads(x)["id"] for x in (out / "index.jsonl").read_text().splitlines()
               if json.loads(x)["shard"] == shard.name]
    with pytest.raises(token_cache.TokenCacheError, match=rf"{shard.name} .*rerun hermesflow tokenize"):
        cache = TokenCache(out)
        cache[victims[0]]
    summary = tokenize_images(tmp_path / "src", vq, out, batch_size=2, shard_size=2, progress=False)
    assert list(summary.damaged) == [shard.name]
    assert (summary.cached_before, summary.written, summary.reencoded) == (4, 2, 2)
    assert f"1 damaged shard(s) dropped ({shard.name}: " in str(summary) and "2 of their record(s) re-encoded" in str(
        summary)
    if damage != "delete":  # what was there is kept aside, not deleted
        assert (out / f"{shard.name}.damaged").read_bytes() != data and len(list(out.glob("*.damaged"))) == 1
    cache = TokenCache(out)
    assert len(cache) == 6 and not (set(victims) - set(cache.ids()))
    _assert_matches_encode(cache, list_records(tmp_path / "src"), vq)
    again = tokenize_images(tmp_path / "src", vq, out, batch_size=2, shard_size=2, progress=False)
    assert (again.written, again.damaged) == (0, {})


def test_records_of_a_damaged_shard_no_longer_in_the_source_are_counted(tmp_path, vq):
    out = _cache(tmp_path, vq)
    (out / "shard-00002.safetensors").write_bytes(b"junk")
    for p in (tmp_path / "src").glob("img0[45].png"):  # the damaged shard's images are gone from the source
        p.unlink()
    summary = tokenize_images(tmp_path / "src", vq, out, progress=False)
    assert (summary.written, summary.reencoded, summary.dropped) == (0, 0, 2)
    assert "2 not in the source and no longer cached" in str(summary)
    assert sorted(TokenCache(out).ids()) == ["img00", "img01", "img02", "img03"]


def test_cache_without_shards_file_loads_and_resume_verifies_by_rereading(tmp_path, vq):
    out = _cache(tmp_path, vq)
    recorded = (out / "shards.jsonl").read_text()
    (out / "shards.jsonl").unlink()  # a cache written before shards.jsonl existed
    cache = TokenCache(out)
    _assert_matches_encode(cache, list_records(tmp_path / "src"), vq)
    summary = tokenize_images(tmp_path / "src", vq, out, progress=False)
    assert (summary.written, summary.damaged) == (0, {})
    assert (out / "shards.jsonl").read_text() == recorded  # verified by re-reading, then recorded

    (out / "shards.jsonl").unlink()
    data = (out / "shard-00000.safetensors").read_bytes()
    (out / "shard-00000.safetensors").write_bytes(data[:-7])
    from safetensors.torch import save_file

    rows = load_file(str(out / "shard-00001.safetensors"))["ids"]
    save_file({"ids": rows}, str(out / "shard-00001.safetensors"),
              metadata={"record_ids": json.dumps(["img03", "img02"])})  # rows swapped against the index
    save_file({"ids": rows.to(torch.int32)}, str(out / "shard-00002.safetensors"))  # not the cache's dtype
    summary = tokenize_images(tmp_path / "src", vq, out, progress=False)
    assert "not a readable safetensors file" in summary.damaged["shard-00000.safetensors"]
    assert "row 0 holds record 'img03', index.jsonl says 'img02'" in summary.damaged["shard-00001.safetensors"]
    assert "torch.int32" in summary.damaged["shard-00002.safetensors"]
    assert (summary.written, summary.reencoded) == (6, 6)
    _assert_matches_encode(TokenCache(out), list_records(tmp_path / "src"), vq)


def test_bad_codes_are_named_by_record_id_and_shard(tmp_path, vq):
    from safetensors.torch import save_file

    out = _cache(tmp_path, vq)
    (out / "shards.jsonl").unlink()  # hand-edited shards: no recorded sha256 to catch the edit first
    shard = out / "shard-00001.safetensors"
    ids = load_file(str(shard))["ids"].clone()
    ids[1, 5] = 9999  # 32 codes in this tokenizer
    save_file({"ids": ids}, str(shard))
    cache = TokenCache(out)
    assert cache.row_problem("img02") is None
    assert cache.row_problem("img03") == (f"{shard} row 1: code 9999 at position 5 is outside the codebook "
                                          f"[0, 32)")
    assert "outside the codebook [0, 4)" in cache.row_problem("img02", num_codes=4)
    with pytest.raises(token_cache.TokenCacheError, match=rf"record 'img03' \({shard} row 1\): code 9999"):
        cache["img03"]
    floats = ids.to(torch.float32)
    floats[0, 2] = float("nan")
    save_file({"ids": floats}, str(shard))
    cache = TokenCache(out)
    assert cache.row_problem("img02") == f"{shard} row 0: nan at position 2"
    _assert_matches_encode(cache, list_records(tmp_path / "src")[:2], vq)  # the other shards read as before


def test_source_and_argument_errors_are_user_errors(tmp_path, vq):
    from hermesflow_fast.errors import UserError

    (tmp_path / "bin.jsonl").write_bytes(b'{"id": "a", "image": "x.png"}\n\xff\xfe\x00')
    with pytest.raises(UserError, match=r"bin\.jsonl:2: not UTF-8 text"):
        list_records(tmp_path / "bin.jsonl")
    with pytest.raises(UserError, match="nowhere does not exist"):
        list_records(tmp_path / "nowhere")
    with pytest.raises(UserError, match="--batch-size must be ≥ 1, got 0"):
        tokenize_command(tmp_path, tmp_path / "tok", tmp_path / "out", batch_size=0)
    with pytest.raises(UserError, match=r"is not a token cache: cache\.json not found"):
        TokenCache(tmp_path)
    assert not (tmp_path / "out").exists()
