"""``python -m hermesflow_fast.world``: write a shapes-world data set.

    python -m hermesflow_fast.world --records 2000 --seed 0 --out data/shapes

writes ``out/train.jsonl`` (``--records`` records), ``out/heldout.jsonl`` (``--heldout``, default a quarter of
``--records``), their PNGs under ``out/images/{train,heldout}/`` and the word tokenizer under ``out/tokenizer/``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from hermesflow_fast.data.text import build_word_tokenizer
from hermesflow_fast.world.records import make_records, write_records
from hermesflow_fast.world.vocabulary import world_words


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m hermesflow_fast.world", description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=2000, help="train records (default 2000)")
    parser.add_argument("--heldout", type=int, default=None, help="held-out records (default records // 4)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    args = parser.parse_args(argv)
    if args.records < 0 or (args.heldout is not None and args.heldout < 0):
        parser.error("--records and --heldout must be ≥ 0")
    heldout = args.records // 4 if args.heldout is None else args.heldout
    for split, n in (("train", args.records), ("heldout", heldout)):
        records = make_records(n, args.seed, split)
        path = write_records(args.out / f"{split}.jsonl", records, args.out / "images" / split)
        print(f"{split}: {n} records -> {path}")
    build_word_tokenizer(world_words(), args.out / "tokenizer")
    print(f"tokenizer -> {args.out / 'tokenizer'}")


if __name__ == "__main__":
    main()
