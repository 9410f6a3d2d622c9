"""The world's imperfect data: near-miss captions change exactly one thing, the pretraining prompts are noisy at
exactly the configured rate (seeded), perturbed images miss their caption by what the judge reads."""

from __future__ import annotations

import numpy as np
import pytest

from hermesflow_fast.world import make_records
from hermesflow_fast.world.grammar import caption, parse_caption
from hermesflow_fast.world.judge import JUDGE
from hermesflow_fast.world.noise import near_miss, noisy_prompts, perturb
from hermesflow_fast.world.scene import cell_of, render_objects


@pytest.fixture(scope="module")
def records():
    return make_records(300, seed=5)


def _facts(scene) -> tuple:
    return (scene.kind, len(scene.objects), scene.relation, tuple((o.shape, o.colour) for o in scene.objects))


def test_near_miss_is_a_world_scene_with_one_thing_wrong(records):
    rng = np.random.default_rng(0)
    for r in records:
        miss = near_miss(r.scene, rng)
        text = caption(miss)
        assert text != r.caption and parse_caption(text) is not None
        a, b = r.scene, miss
        if len(a.objects) != len(b.objects):  # the count moved by one, same shape and colour
            assert a.kind == "count" and abs(len(a.objects) - len(b.objects)) == 1
            assert {(o.shape, o.colour) for o in b.objects} == {(a.objects[0].shape, a.objects[0].colour)}
            continue
        changed = [k for k in ("relation", "shapes", "colours")
                   if (a.relation if k == "relation" else [getattr(o, k[:-1]) for o in a.objects])
                   != (b.relation if k == "relation" else [getattr(o, k[:-1]) for o in b.objects])]
        assert len(changed) == 1, (r.caption, text)
        assert [cell_of(o) for o in a.objects] == [cell_of(o) for o in b.objects]  # objects keep their cells


def test_noisy_prompts_have_exactly_the_configured_rate_and_are_seeded(records):
    scenes = [r.scene for r in records]
    for rate in (0.0, 0.25, 0.4, 1.0):
        prompts, noisy = noisy_prompts(scenes, rate, seed=3)
        assert sum(noisy) == round(rate * len(scenes))
        for r, p, bad in zip(records, prompts, noisy):
            assert (p != r.caption) == bad and parse_caption(p) is not None
    assert noisy_prompts(scenes, 0.4, 3) == noisy_prompts(scenes, 0.4, 3)
    assert noisy_prompts(scenes, 0.4, 3)[1] != noisy_prompts(scenes, 0.4, 4)[1]
    with pytest.raises(ValueError, match="rate"):
        noisy_prompts(scenes, 1.5, 0)


def test_perturbed_images_miss_their_caption_by_what_the_judge_reads(records):
    rng = np.random.default_rng(1)
    missed = []
    for r in records:
        objects = perturb(r.scene, rng)
        answers = JUDGE.answers(render_objects(objects), r.questions)
        missed.append(any(a != q.answer for a, q in zip(answers, r.questions)))
    assert np.mean(missed) >= 0.9  # the rest: an extra object no question of the record asks about


def test_pretraining_prompts_are_noisy_at_the_configured_rate(tmp_path):
    from hermesflow_fast.data.text import caption_ids, prompt_ids
    from hermesflow_fast.world.pretrain import PretrainConfig, prepare_world

    cfg = PretrainConfig(records=60, vq_images=30, caption_noise=0.25, eval_records=0)
    wm, data = prepare_world(cfg, tmp_path)
    assert sum(data.noisy) == 15
    for r, ids, cap, bad in zip(data.records, data.prompts, data.captions, data.noisy):
        assert (ids != prompt_ids(wm.text_tokenizer, r.caption)) == bad
        assert cap == caption_ids(wm.text_tokenizer, r.caption)  # the understanding side keeps the true caption
