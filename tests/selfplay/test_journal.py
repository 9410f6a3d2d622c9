"""Journals: resume after a torn write keeps every complete record once; rank shards merge by id."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from hermesflow_fast.selfplay.journal import Journal, merge_shards


def test_torn_last_line_is_cut_and_records_are_not_duplicated(tmp_path):
    p = tmp_path / "stage.jsonl"
    j = Journal(p)
    j.append({"id": "a", "v": 1})
    j.append({"id": "b", "v": 2})
    with p.open("a") as f:
        f.write('{"id": "c", "v"')  # killed mid-write
    j2 = Journal(p)
    assert [r["id"] for r in j2] == ["a", "b"] and "c" not in j2
    j2.append({"id": "c", "v": 3})
    assert [json.loads(x)["id"] for x in p.read_text().splitlines()] == ["a", "b", "c"]
    with pytest.raises(ValueError, match="already written"):
        j2.append({"id": "a"})


def test_sigkill_mid_stage_then_resume(tmp_path):
    p = tmp_path / "s.jsonl"
    code = (f"import time\nfrom hermesflow_fast.selfplay.journal import Journal\nj = Journal({str(p)!r})\n"
            "for i in range(1000):\n    if str(i) not in j:\n        j.append({'id': str(i), 'x': i})\n"
            "        time.sleep(0.002)\n")
    proc = subprocess.Popen([sys.executable, "-c", code])
    while not p.is_file() or len(p.read_text().splitlines()) < 50:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    subprocess.run([sys.executable, "-c", code], check=True)
    ids = [json.loads(x)["id"] for x in p.read_text().splitlines()]
    assert ids == [str(i) for i in range(1000)]


def test_merge_shards_by_id(tmp_path):
    p = tmp_path / "c.jsonl"
    for r, ids in enumerate((["b", "d"], ["a", "c"])):
        j = Journal(p, rank=r)
        for i in ids:
            j.append({"id": i})
    merged = merge_shards(p, 2, order=["a", "b", "c", "d"])
    assert [r["id"] for r in merged] == ["a", "b", "c", "d"]
    Journal(p, rank=1).append({"id": "b"})
    with pytest.raises(ValueError, match="two rank shards"):
        merge_shards(p, 2)
