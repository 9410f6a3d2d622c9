"""The self-play report: ``summary.json`` (the interface scripts read), ``report.md`` and ``gap.png``.

    summary.json = {"rounds": [{"round": 0, "und": float, "gen": float, "gap": float, ...}, ...]}   round 0 = base

Real data (``data.records``) has no held-out evaluation: its rounds carry null und / gen / gap and a "skipped"
reason; the table shows n/a and no plot is drawn.
"""

from __future__ import annotations

import json
from pathlib import Path

__all__ = ["format_table", "write_report"]


def _num(x: float | None, fmt: str = ".3f") -> str:
    return "n/a" if x is None else format(x, fmt)


def format_table(rounds: list[dict]) -> str:
    lines = ["| round | und | gen | gap = und − gen | caption agreement |", "|---|---|---|---|---|"]
    for r in rounds:
        name = "base" if r["round"] == 0 else str(r["round"])
        lines.append(f"| {name} | {_num(r['und'])} | {_num(r['gen'])} | {_num(r['gap'], '+.3f')} | "
                     f"{_num(r.get('caption_agreement', None if r.get('skipped') else float('nan')))} |")
    return "\n".join(lines)


def _plot(rounds: list[dict], path: Path) -> Path | None:
    if all(r.get("und") is None for r in rounds):
        return None  # real data: nothing was evaluated
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    xs = [r["round"] for r in rounds]
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    ax.plot(xs, [r["und"] for r in rounds], "o-", label="understanding (answers on real images)")
    ax.plot(xs, [r["gen"] for r in rounds], "s-", label="generation (judge on generated images)")
    ax.plot(xs, [r["gap"] for r in rounds], "d--", label="gap = und − gen")
    ax.set_xticks(xs, ["base" if x == 0 else str(x) for x in xs])
    ax.set_xlabel("self-play round")
    ax.set_ylabel("accuracy on held-out records")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_report(run_dir: str | Path, rounds: list[dict], config: dict | None = None) -> Path:
    run_dir = Path(run_dir)
    (run_dir / "summary.json").write_text(json.dumps({"rounds": rounds}, indent=1) + "\n")
    plot = _plot(rounds, run_dir / "gap.png")
    cats = sorted({c for r in rounds for c in r.get("gen_by_category", {})})
    lines = ["# Self-play report", "", "Held-out records; und = accuracy of the model's answers on the real images, "
             "gen = accuracy of the judge on the model's generated images (the paper's Table 4 protocol).", "",
             format_table(rounds), ""]
    skipped = next((r["skipped"] for r in rounds if r.get("skipped")), None)
    if skipped:
        lines += [f"Held-out evaluation skipped: {skipped}.", ""]
    if cats:
        lines += ["Generation accuracy per category:", "", "| round | " + " | ".join(cats) + " |",
                  "|---|" + "---|" * len(cats)]
        for r in rounds:
            g = r.get("gen_by_category", {})
            lines.append(f"| {r['round']} | " + " | ".join(f"{g.get(c, float('nan')):.3f}" for c in cats) + " |")
        lines.append("")
    if plot is not None:
        lines += ["![gap](gap.png)", ""]
    for r in rounds:
        d = "round-0" if r["round"] == 0 else f"round-{r['round']}"
        if (run_dir / d / "samples.png").is_file():
            lines += [f"Samples, {'base' if r['round'] == 0 else 'round ' + str(r['round'])}:", "",
                      f"![samples {r['round']}]({d}/samples.png)", ""]
        if (run_dir / d / "stats.json").is_file():
            lines += [f"Pairs of round {r['round']}: `{(run_dir / d / 'stats.json').read_text().strip()}`", ""]
    (run_dir / "report.md").write_text("\n".join(lines))
    return run_dir / "report.md"
