"""Every word the shapes world writes or reads: its captions, questions, answers, the self-VQA prompt and the
understanding template, so ``build_word_tokenizer(world_words(), dir)`` never meets an unknown word in the world's
text (the tokenizer splits on whitespace and punctuation: "image?" is "image" and "?").

    python -m pytest -q tests/world/test_world_records.py
"""

from __future__ import annotations

from hermesflow_fast.data.text import UND_TEMPLATE
from hermesflow_fast.world.grammar import NUMBER_WORDS, RELATION_PHRASES, plural
from hermesflow_fast.world.scene import COLOURS, RELATIONS, SHAPES

__all__ = ["world_words"]

_GRAMMAR = ("a", "and", ".")
_QUESTIONS = ("what", "shape", "shapes", "is", "are", "in", "the", "image", "how", "many", "there", "colour", "or",
              "of", "?", "choices", ":", ",")
_ANSWERS = ("yes", "no", "none", "left", "right", "above", "below")


def world_words() -> list[str]:
    """The sorted distinct words (and punctuation) of the world's text."""
    words = {*SHAPES, *(plural(s) for s in SHAPES), *COLOURS, *NUMBER_WORDS, *RELATIONS, *_GRAMMAR, *_QUESTIONS,
             *_ANSWERS}
    for phrase in RELATION_PHRASES.values():
        words.update(phrase.split())
    words.update(UND_TEMPLATE.format(question="").replace(":", " : ").split())
    return sorted(words)
