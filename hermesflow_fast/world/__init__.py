"""The shapes world: the embedded default on which a tiny Show-o-architecture model is pretrained on CPU and then
aligned by self-play (DESIGN.md, "The embedded default: the shapes world").

A 32×32 picture on black holds one shape, two different shapes side by side or stacked, or 2–3 identical shapes
(circle / square / triangle in red / green / blue / yellow, 8–12 px, crisp edges). Its caption comes from a small
grammar ("a red circle", "a blue square to the left of a green triangle", "two yellow circles") and is also its t2i
prompt. Its questions are TIFA-style multiple-choice questions on what the caption states, in GenEval's six
categories (single_object, two_object, counting, colors, position, color_attr), with one-word answers. A
programmatic judge reads any RGB image (a rendered one, or one a model generated and the image tokenizer decoded)
and answers them; ``caption_agreement`` scores a caption against the true scene by exact attribute agreement. This
gives the paper's Table 4 measurement exactly: understanding score = the model's answers on the real
image, generation score = the judge's answers on the model's image, gap = their difference.

    scene.py       Scene, SceneObject, sample_scene, compose, render, relation_of, the palette and word sets
    grammar.py     caption, parse_caption
    questions.py   Question, make_questions, parse_question
    vocabulary.py  world_words (for data.text.build_word_tokenizer)
    records.py     WorldRecord, make_records, write_records, read_records
    judge.py       Judge (detect, estimate, answer, score), answer, score
    scoring.py     caption_agreement, answer_match, scene_facts

Make a data set (train + heldout JSONL with 32×32 PNGs, and the word tokenizer under ``out/tokenizer/``):

    python -m hermesflow_fast.world --records 2000 --seed 0 --out data/shapes

    python -m pytest -q tests/world
"""

from hermesflow_fast.world.grammar import caption, parse_caption
from hermesflow_fast.world.judge import JUDGE, Detection, Judge, answer, score
from hermesflow_fast.world.questions import QUESTION_CATEGORIES, Question, make_questions, parse_question
from hermesflow_fast.world.records import WorldRecord, make_records, read_records, write_records
from hermesflow_fast.world.scene import (
    CANVAS,
    CATEGORIES,
    COLOURS,
    PALETTE,
    RELATIONS,
    SHAPES,
    Scene,
    SceneObject,
    compose,
    relation_of,
    render,
    sample_scene,
)
from hermesflow_fast.world.scoring import answer_match, caption_agreement, scene_facts
from hermesflow_fast.world.vocabulary import world_words

__all__ = [
    "CANVAS",
    "CATEGORIES",
    "COLOURS",
    "JUDGE",
    "PALETTE",
    "QUESTION_CATEGORIES",
    "RELATIONS",
    "SHAPES",
    "Detection",
    "Judge",
    "Question",
    "Scene",
    "SceneObject",
    "WorldRecord",
    "answer",
    "answer_match",
    "caption",
    "caption_agreement",
    "compose",
    "make_questions",
    "make_records",
    "parse_caption",
    "parse_question",
    "read_records",
    "relation_of",
    "render",
    "sample_scene",
    "scene_facts",
    "score",
    "world_words",
    "write_records",
]
