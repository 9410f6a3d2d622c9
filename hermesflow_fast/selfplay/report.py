"""The self-play report: ``summary.json`` (the interface scripts read), ``report.md`` and ``gap.png``.

    summary.json = {"rounds": [{"round": 0, "und": float, "gen": float, "gap": float, ...}, ...]}   round 0 = base

Rounds 1.. also carry "diagnostics" (selfplay/diagnose.py: pass@1 / pass@M per category by the judge and by
self-VQA, their agreement and correlation, the judge on self-VQA's winners vs losers, pairs kept / dropped);
``format_diagnostics`` renders them as markdown, for report.md and ``hermesflow diagnose``.

Real data (``data.records``) has no held-out evaluation: its rounds carry null und / gen / gap and a "skipped"
reason; the table shows n/a and no plot is drawn.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = ["DEFINITIONS", "format_diagnostics", "format_score", "format_table", "write_report"]


def _num(x: float | None, fmt: str = ".3f") -> str:
    return "n/a" if x is None else format(x, fmt)


def format_score(r: dict, key: str, fmt: str = ".3f") -> str:
    """The score, ± its standard deviation over evaluation seeds when the round has several."""
    std = r.get(f"{key}_std")
    return _num(r[key], fmt) + ("" if std is None or r[key] is None else f" ± {std:.3f}")


def format_table(rounds: list[dict]) -> str:
    lines = ["| round | und | gen | gap = und − gen | caption agreement |", "|---|---|---|---|---|"]
    for r in rounds:
        name = "base" if r["round"] == 0 else str(r["round"])
        scores = " | ".join(format_score(r, k, f) for k, f in (("und", ".3f"), ("gen", ".3f"), ("gap", "+.3f")))
        lines.append(f"| {name} | {scores} | "
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
    seeds = next((r["seeds"] for r in rounds if len(r.get("seeds", [])) > 1), None)
    if seeds:
        lines += [f"± = standard deviation over the {len(seeds)} evaluation seeds {seeds} (the same weights, other "
                  "samples); it says nothing of the spread across training seeds.", ""]
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
        if r.get("diagnostics"):
            lines += [format_diagnostics(r["diagnostics"], f"## Diagnostics of round {r['round']}"), ""]
        elif (run_dir / d / "stats.json").is_file():
            lines += [f"Pairs of round {r['round']}: `{(run_dir / d / 'stats.json').read_text().strip()}`", ""]
    if any(r.get("diagnostics") for r in rounds):
        lines += ["## Definitions", "", DEFINITIONS, ""]
    (run_dir / "report.md").write_text("\n".join(lines))
    return run_dir / "report.md"


DEFINITIONS = (
    "A candidate is *fully right* when every question of its record is answered right (by the judge on its decoded "
    "pixels; by self-VQA: accuracy 1.0). pass@k per record of n samples with c fully right is Codex's unbiased "
    "1 − C(n−c, k) / C(n, k), averaged over records: pass@1 is the mean over records and samples of fully right, "
    "pass@M the fraction of records with at least one fully-right sample. *Question acc.*: the judge's accuracy over "
    "all (candidate, question). *Self-VQA's pick*: the judge's pass on the candidate self-VQA ranks first (between "
    "pass@1, a random pick, and pass@M, a perfect one). *Self-VQA score*: the mean fraction of the model's answers "
    "about its own images that match the record (self-consistency). *Ties*: records whose M candidates share one "
    "self-VQA score. *Agreement*: fraction of candidates where self-VQA's fully right equals the judge's. *Pearson r*: "
    "Pearson's correlation of self-VQA's and the judge's score per candidate (n/a when one is constant). *Pairs*: "
    "kept and dropped per side (stats.json); the judge's mean score of the chosen vs the rejected generated image.")


def _f(x: Any, fmt: str = ".3f") -> str:
    return "n/a" if x is None else format(x, fmt)


def _drops(dropped: dict | None) -> str:
    if dropped is None:
        return "unknown"
    return ", ".join(f"{k} {v}" for k, v in sorted(dropped.items(), key=lambda kv: -kv[1])) or "none"


def _reading(d: dict) -> list[str]:
    """Plain sentences on what limited or drove the round, from the "all" row and the generation pairs."""
    a = d["categories"]["all"]
    j, s = a.get("judge"), a.get("self_vqa")
    gen = (d.get("pairs") or {}).get("gen") or {}
    out = []
    if j:
        pick, p1 = j["self_vqa_pick"], j["pass_at_1"]
        than = "" if pick is None or p1 is None else (
            " (better than a random sample)" if pick > p1 else " (worse than a random sample)" if pick < p1 else
            " (no better than a random sample)")
        out.append(f"Headroom: by the judge, one sample is fully right for {_f(p1)} of prompts and the best of M for "
                   f"{_f(j['pass_at_m'])}; the image self-VQA ranks first is fully right for {_f(pick)}{than}.")
    if j and s:
        out.append(f"Recognition: self-VQA and the judge agree on fully right for {_f(a['agreement'])} of candidates "
                   f"(Pearson r of their scores {_f(a['pearson'])}); self-VQA calls {_f(s['pass_at_1'])} of images "
                   f"fully right, the judge {_f(j['pass_at_1'])}.")
    if gen.get("judge_chosen") is not None:
        jc, jr = gen["judge_chosen"], gen["judge_rejected"]
        verdict = ("they lean the judge's way" if jc > jr else "they lean against the judge" if jc < jr else
                   "they carry no preference the judge sees")
        out.append(f"Generation pairs: the judge scores self-VQA's winners {_f(jc)} and its losers {_f(jr)}, and "
                   f"prefers the winner in {gen['judge_prefers_chosen']}, the loser in "
                   f"{gen['judge_prefers_rejected']} ({gen['judge_ties']} ties): {verdict}.")
    if s and not j:
        out.append(f"Self-consistency: on average the model answers {_f(s['mean_score'])} of the questions about each "
                   f"of its own images as the record says; self-VQA calls {_f(s['pass_at_1'])} of images fully right "
                   f"and finds one for {_f(s['pass_at_m'])} of prompts; {_f(s['ties'])} of records tie (no "
                   f"preference to learn).")
    if gen:
        records = (d.get("pairs") or {}).get("records") or d["records"]
        out.append(f"Generation pairs kept: {gen['kept']} of {records} records (dropped: "
                   f"{_drops(gen.get('dropped'))}).")
    return out


def format_diagnostics(d: dict, title: str | None = None) -> str:
    """One round's diagnostics (``diagnose.diagnose_round``'s dict) as markdown: a table per category, the pairs, a
    few sentences reading them, and what could not be computed."""
    spr = d["samples_per_record"]
    lines = [title or f"## Diagnostics of {d['round_dir']}", "",
             f"{d['source']}: {d['records']} records × {spr if isinstance(spr, int) else spr} samples "
             f"(round candidates, not held-out records).", "",
             "| category | records | judge pass@1 | judge pass@M | judge question acc. | judge on self-VQA's pick | "
             "self-VQA pass@1 | self-VQA pass@M | self-VQA score | ties | agreement | Pearson r |",
             "|---|" + "---|" * 11]
    for cat, v in d["categories"].items():
        j, s = v.get("judge") or {}, v.get("self_vqa") or {}
        name = f"**{cat}**" if cat == "all" else cat
        cells = [v["records"], _f(j.get("pass_at_1")), _f(j.get("pass_at_m")), _f(j.get("question_accuracy")),
                 _f(j.get("self_vqa_pick")), _f(s.get("pass_at_1")), _f(s.get("pass_at_m")),
                 _f(s.get("mean_score")), _f(s.get("ties")), _f(v.get("agreement")), _f(v.get("pearson"), "+.3f")]
        lines.append(f"| {name} | " + " | ".join(str(c) for c in cells) + " |")
    p = d.get("pairs")
    if p:
        lines += ["", "| pairs | kept | dropped | score: chosen | score: rejected | judge: chosen | judge: rejected | "
                      "judge prefers chosen / tie / rejected |", "|---|" + "---|" * 7]
        for side in ("und", "gen"):
            x = p[side]
            prefs = (f"{x['judge_prefers_chosen']} / {x['judge_ties']} / {x['judge_prefers_rejected']}"
                     if "judge_chosen" in x else "n/a")
            lines.append(f"| {side} | {x['kept']} | {_drops(x['dropped'])} | {_f(x['score_chosen'])} | "
                         f"{_f(x['score_rejected'])} | {_f(x.get('judge_chosen'))} | {_f(x.get('judge_rejected'))} | "
                         f"{prefs} |")
    reading = _reading(d)
    if reading:
        lines += [""] + [f"- {x}" for x in reading]
    if d.get("unavailable"):
        lines += ["", "Not available:"] + [f"- {x}" for x in d["unavailable"]]
    if d.get("notes"):
        lines += ["", "Notes:"] + [f"- {x}" for x in d["notes"]]
    return "\n".join(lines)
