"""``python -m hermesflow_fast.train`` — the training entry point torchrun runs on every rank.

    torchrun --nproc-per-node 2 -m hermesflow_fast.train --config configs/tiny.yaml --run-dir runs/x
    python -m hermesflow_fast.train --config configs/tiny.yaml --run-dir runs/x --resume auto train.lr=1e-5
"""

from hermesflow_fast.train.cli import main

if __name__ == "__main__":
    main()
