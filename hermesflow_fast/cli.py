"""The ``hermesflow`` command line.

    hermesflow env                       what a bug report needs: torch, CUDA, Triton, extension, optional extras
    hermesflow bench logprobs [ARGS...]  fused head + DPO benchmark (hermesflow_fast/benchmarks; --help for its flags)
    hermesflow bench dpo [ARGS...]       DPO / Pair-DPO loss benchmark (benchmarks/dpo.py)
    hermesflow bench nearest [ARGS...]   nearest-code search vs cdist+argmin and the one-hot way (benchmarks/nearest.py)
    hermesflow bench generate KIND ...   caption decoding and MaskGIT sampling (checkout: bench/bench_generate.py)
    hermesflow bench step [ARGS...]      one Pair-DPO training step vs a HermesFlow-style one (checkout: bench_step.py)
    hermesflow tokenize SOURCE ...       images (folder or records JSONL) → token cache (safetensors shards + index)
    hermesflow train --config Y [...]    Pair-DPO training (torchrun underneath with --nproc N)
    hermesflow demo [--run-dir D]        two self-play rounds from the shipped shapes-world base (CPU, minutes)
    hermesflow pretrain --world shapes   pretrain the shapes world's base model (world/pretrain.py)
    hermesflow eval --checkpoint P ...   understanding / generation / gap on held-out world records (Table 4)
    hermesflow selfplay --run-dir D ...  self-play rounds on the shapes world (curate → pairs → train → evaluate)
    hermesflow bundle --model M ...      a model + its tokenizers as one folder self-play starts from (Show-o's too)
    hermesflow images ROUND_DIR          a round's generated candidates as PNGs (ROUND_DIR/images/<id>/<k>.png)
    hermesflow diagnose ROUND_DIR        why a round helped or not: pass@k by judge and self-VQA, agreement, pairs
    hermesflow bench curation [ARGS...]  one curation pass vs a HermesFlow-style one (checkout: bench_curation.py)
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import platform
import subprocess
import sys
from pathlib import Path

import click

from hermesflow_fast.config import knob_options, options_to_overrides
from hermesflow_fast.selfplay.config import SelfPlayConfig
from hermesflow_fast.train.config import TrainConfig
from hermesflow_fast.world.config import PretrainConfig

REPO_ROOT = Path(__file__).resolve().parent.parent
EVAL_RECIPE = "selfplay-shapes"  # `hermesflow eval` evaluates the way this recipe's rounds do


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5
        )
        return out.stdout.strip() or "n/a"
    except (OSError, subprocess.SubprocessError):
        return "n/a"


def env_report() -> list[tuple[str, str]]:
    """(name, value) rows describing this environment."""
    import torch

    from hermesflow_fast import __version__, _native

    rows = [
        ("hermesflow_fast", f"{__version__} ({_git_commit()})"),
        ("python", sys.version.split()[0]),
        ("platform", platform.platform()),
        ("cpu cores", str(os.cpu_count())),
        ("torch", torch.__version__),
        ("torch CUDA build", str(torch.version.cuda)),
        ("CUDA available", str(torch.cuda.is_available())),
    ]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            cap = torch.cuda.get_device_capability(i)
            rows.append((f"cuda:{i}", f"{torch.cuda.get_device_name(i)} (sm_{cap[0]}{cap[1]})"))
    try:
        import triton

        rows.append(("triton", triton.__version__))
    except Exception as exc:  # noqa: BLE001 - any import failure is worth reporting
        rows.append(("triton", f"not importable ({type(exc).__name__}: {exc})"))
    if _native.has_extension():
        kinds = "CPU + CUDA kernels" if _native.has_cuda_kernels() else "CPU kernels only"
        rows.append(("extension hermesflow_fast._C", f"built ({kinds})"))
    else:
        rows.append(("extension hermesflow_fast._C", f"missing: {_native.extension_error()}"))
    for dist in ("flash-attn", "flash-attn-4", "liger-kernel", "transformers", "numba"):
        rows.append((dist, _version(dist) or "not installed"))
    rows.append(("TRITON_INTERPRET", os.environ.get("TRITON_INTERPRET", "unset")))
    return rows


class _Main(click.Group):
    """The ``hermesflow`` group: a ``UserError`` from any subcommand is one ``error: …`` line (errors.py)."""

    def invoke(self, ctx: click.Context):
        from hermesflow_fast.errors import user_errors

        with user_errors():
            return super().invoke(ctx)


@click.group(cls=_Main, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="show tracebacks of user errors (same as HFF_DEBUG=1)")
def main(debug: bool) -> None:
    """hermesflow_fast: HermesFlow Pair-DPO, fast."""
    if debug:
        os.environ["HFF_DEBUG"] = "1"  # also seen by the ranks torchrun starts


@main.command()
def env() -> None:
    """Print the environment (paste it into bug reports)."""
    rows = env_report()
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        click.echo(f"{k:<{width}}  {v}")


# `hermesflow bench NAME [FLAGS]` → `python -m MODULE [FLAGS or the defaults]`, in the current folder. The op
# benchmarks ship with the package (hermesflow_fast.benchmarks); the end-to-end ones (bench.*) are scripts of the
# source checkout's bench/ and need it.
BENCHES: dict[str, tuple[str, tuple[str, ...], str]] = {
    "logprobs": ("hermesflow_fast.benchmarks.logprobs", (), "Fused head + DPO, fwd+bwd of policy + reference: ours vs "
                 "naive, TRL, liger, torch chunked, GEMM floor."),
    "dpo": ("hermesflow_fast.benchmarks.dpo", (), "DPO / Pair-DPO loss on sequence log-probs."),
    "nearest": ("hermesflow_fast.benchmarks.nearest", (),
                "Nearest-code search: ours vs torch.cdist+argmin and the full-distance one-hot way."),
    "generate": ("bench.bench_generate", ("all",),
                 "Generation: `decode` (KV cache vs recomputation), `maskgit` (batched CFG + text cache), or `all`."),
    "step": ("bench.bench_step", (), "One Pair-DPO training step, pairs/s and peak memory: ours vs a faithful "
             "HermesFlow-style step, and ablations."),
    "curation": ("bench.bench_curation", (), "One curation pass (K captions + M images + self-VQA per record): ours vs "
                 "a HermesFlow-style pass."),
}


def _run_bench(name: str, module: str, args: tuple[str, ...]) -> None:
    env = None
    if module.startswith("bench."):
        script = REPO_ROOT / "bench" / (module.split(".")[-1] + ".py")
        if not script.exists():
            raise click.ClickException(
                f"`hermesflow bench {name}` runs {script.relative_to(REPO_ROOT)} of the source checkout, which this "
                f"install does not have ({script} not found): run it from a checkout installed with `pip install -e "
                ".`. The op benchmarks (logprobs, dpo, nearest) ship with the package and run anywhere."
            )
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH"))
                                                           if p)}
    cmd = [sys.executable, "-m", module, *args]
    click.echo("$ " + " ".join(cmd), err=True)
    raise SystemExit(subprocess.call(cmd, env=env))


@main.group()
def bench() -> None:
    """Benchmarks; flags pass through (`hermesflow bench dpo --help`). Rows append to bench/results/<name>.csv in a
    checkout, else ./bench-results/ (--out FILE or --results DIR to choose)."""


def _bench_command(name: str, module: str, defaults: tuple[str, ...], text: str) -> None:
    def run(args: tuple[str, ...]) -> None:
        _run_bench(name, module, args or defaults)

    settings = {"ignore_unknown_options": True, "allow_extra_args": True, "help_option_names": []}
    bench.command(name, help=text, context_settings=settings)(
        click.argument("args", nargs=-1, type=click.UNPROCESSED)(run))


for _name, (_module, _defaults, _text) in BENCHES.items():
    _bench_command(_name, _module, _defaults, _text)


@main.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True,
                                "help_option_names": []})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def selfplay(args: tuple[str, ...]) -> None:
    """Self-play rounds: --run-dir D [--config Y] [--rounds R] [--resume] [--nproc N] [key=value ...]."""
    from hermesflow_fast.selfplay.cli import selfplay_main

    raise SystemExit(selfplay_main(list(args)))


@main.command()
@click.argument("source", type=click.Path())
@click.option("--tokenizer", "tokenizer_path", required=True, type=click.Path(),
              help="local image tokenizer folder (MAGVIT-v2 weights or a patch-VQ save)")
@click.option("--out", "out_dir", required=True, type=click.Path(), help="token cache folder (resumable)")
@click.option("--batch-size", default=64, show_default=True)
@click.option("--shard-size", default=4096, show_default=True, help="records per safetensors shard")
@click.option("--device", default="auto", show_default=True, help="auto | cpu | cuda")
def tokenize(source: str, tokenizer_path: str, out_dir: str, batch_size: int, shard_size: int, device: str) -> None:
    """Tokenize images once: SOURCE is a folder of images or a records JSONL (`id`, `image`).

    Rerunning continues where a previous run stopped and re-encodes the records of shards found missing or damaged;
    unreadable images are listed in OUT/errors.jsonl. Bad arguments are one `error: …` line (exit 2)."""
    from hermesflow_fast.data.token_cache import tokenize_command

    summary = tokenize_command(source, tokenizer_path, out_dir, batch_size=batch_size, shard_size=shard_size,
                               device=device)
    click.echo(str(summary))


@main.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True,
                                "help_option_names": []})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def train(args: tuple[str, ...]) -> None:
    """Pair-DPO training: --config Y --run-dir D [--resume auto] [--nproc N] [--dry-run] [key=value ...]."""
    from hermesflow_fast.train.cli import launch

    raise SystemExit(launch(list(args)))


@main.command()
@click.option("--run-dir", default="runs/demo", show_default=True, help="run folder (a finished one is reported again)")
@click.option("--rounds", type=int, default=2, show_default=True, help="self-play rounds after the base")
def demo(run_dir: str, rounds: int) -> None:
    """Self-play from the shipped shapes-world base on CPU: R rounds, then the und / gen / gap table per round."""
    from hermesflow_fast.selfplay.cli import demo as run_demo

    raise SystemExit(run_demo(run_dir, rounds))


_PRETRAIN_OPTIONS = {"--world": "world", "--records": "records", "--steps": "steps", "--seed": "seed",
                     "--eval-records": "eval_records"}


@main.command(context_settings={"ignore_unknown_options": True})
@knob_options(PretrainConfig, _PRETRAIN_OPTIONS)
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=None,
              help="output folder  [default: hermesflow_fast/world/base, the shipped base]")
@click.option("--threads", type=int, default=None, help="torch CPU threads  [default: torch's]")
@click.argument("overrides", nargs=-1)
def pretrain(out_dir: str | None, threads: int | None, overrides: tuple[str, ...], **given) -> None:
    """Pretrain the world's tiny Show-o-architecture base from scratch (t2i + captioning + VQA), seeded.
    OVERRIDES: any other PretrainConfig knob as key=value (world/config.py), e.g. lr=1e-3 eval.steps=16."""
    import torch

    from hermesflow_fast.config import load_config
    from hermesflow_fast.world.pretrain import pretrain as run_pretrain
    from hermesflow_fast.world.shipped import BASE_DIR

    if threads is not None:
        torch.set_num_threads(threads)
    cfg = load_config(None, [*options_to_overrides(_PRETRAIN_OPTIONS, given), *overrides], schema=PretrainConfig)
    run_pretrain(cfg, Path(out_dir) if out_dir else BASE_DIR, log=click.echo)


_EVAL_OPTIONS = {"--records": "world.heldout_records", "--seed": "run.seed",
                 "--images-per-prompt": "eval.images_per_prompt", "--steps": "eval.steps",
                 "--guidance-scale": "eval.guidance_scale", "--noise-temperature": "eval.noise_temperature",
                 "--seeds": "eval.seeds", "--batch-size": "eval.batch_size"}


@main.command("eval")
@click.option("--checkpoint", required=True, type=click.Path(exists=True, file_okay=False),
              help="a model folder (the shipped base hermesflow_fast/world/base, or a self-play round's model/)")
@click.option("--run-dir", required=True, type=click.Path(file_okay=False), help="writes eval.json and samples.png")
@click.option("--config", "recipe", default=EVAL_RECIPE, show_default=True,
              help="the recipe whose eval.* and world.* settings are the defaults (a file or a shipped recipe)")
@knob_options(SelfPlayConfig, _EVAL_OPTIONS, defaults_from=EVAL_RECIPE)
@click.option("--device", default="cpu", show_default=True)
def eval_command(checkpoint: str, run_dir: str, recipe: str, device: str, **given) -> None:
    """Understanding vs generation on held-out world records: und, gen, gap, per category (the paper's Table 4),
    the way a self-play round evaluates (mean ± std over eval.seeds seeds). --seed seeds the held-out records and
    the sampling; the other defaults are the recipe's (configs/selfplay-shapes.yaml)."""
    import json

    from hermesflow_fast.config import load_config
    from hermesflow_fast.selfplay.report import format_score
    from hermesflow_fast.world import make_records
    from hermesflow_fast.world.evaluate import evaluate_seeds, save_grid, seed_stats
    from hermesflow_fast.world.shipped import load_base

    overrides = options_to_overrides(_EVAL_OPTIONS, given)
    cfg = load_config(recipe, overrides, schema=SelfPlayConfig)
    seed = cfg.run.seed
    wm = load_base(checkpoint, device=device)
    runs = evaluate_seeds(wm, make_records(cfg.world.heldout_records, seed, "heldout"), cfg.eval, seed=seed)
    res = runs[0]
    out = Path(run_dir)
    out.mkdir(parents=True, exist_ok=True)
    # the first seed's full result, its scores replaced by the mean over seeds (and their std, per-seed values)
    summary = {"checkpoint": str(checkpoint), **res.to_dict(samples=False), **seed_stats(runs),
               "seeds": [r.settings["seed"] for r in runs],
               "samples": {k: res.samples[k] for k in ("prompts", "captions")}}
    (out / "eval.json").write_text(json.dumps(summary, indent=1) + "\n")
    save_grid(wm, res, out / "samples.png")
    click.echo(res.table())
    click.echo(f"over {len(runs)} seed(s): und {format_score(summary, 'und')}  gen {format_score(summary, 'gen')}  "
               f"gap {format_score(summary, 'gap', '+.3f')}")
    click.echo(f"wrote {out / 'eval.json'} and {out / 'samples.png'}")


_BUNDLE_OPTIONS = {"--t2i-text-len": "data.t2i_text_len", "--mmu-text-len": "data.max_caption_tokens"}


@main.command("bundle")
@click.option("--model", "model_dir", required=True, type=click.Path(exists=True, file_okay=False),
              help="transformer folder: Show-o's (e.g. show-o-512x512, `showo.` keys), HF Phi, or ours")
@click.option("--image-tokenizer", required=True, type=click.Path(exists=True, file_okay=False),
              help="image tokenizer folder: MAGVIT-v2 as Show-o publishes it (magvitv2), or a patch-VQ save")
@click.option("--text-tokenizer", required=True, type=click.Path(exists=True, file_okay=False),
              help="HF tokenizer folder (phi-1_5 for Show-o)")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="the bundle folder to write")
@knob_options(TrainConfig, _BUNDLE_OPTIONS)
@click.option("--device", default="cpu", show_default=True)
def bundle_command(model_dir: str, image_tokenizer: str, text_tokenizer: str, out_dir: str, device: str,
                   **given) -> None:
    """One folder holding a model, its tokenizers, vocabulary and token layout (model/bundle.py), what self-play
    starts from: `hermesflow selfplay --config selfplay-real world.base=OUT …`."""
    from hermesflow_fast.config import load_config
    from hermesflow_fast.model.bundle import assemble_bundle

    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise click.BadParameter(f"{out} is not empty; choose a new folder", param_hint="--out")
    d = load_config(None, options_to_overrides(_BUNDLE_OPTIONS, given), schema=TrainConfig).data
    b = assemble_bundle(model_dir, image_tokenizer, text_tokenizer, d.t2i_text_len, d.max_caption_tokens, device)
    b.save(out)
    click.echo(f"{b}\nwrote {out}")


@main.command("images")
@click.argument("round_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--model", default=None, type=click.Path(exists=True, file_okay=False),
              help="the world model whose image tokenizer decodes the grids  [default: the run's world.base from "
                   "ROUND_DIR/../config.yaml, else the shipped base]")
@click.option("--out", "out_dir", default=None, type=click.Path(file_okay=False),
              help="output folder  [default: ROUND_DIR/images]")
def images_command(round_dir: str, model: str | None, out_dir: str | None) -> None:
    """Decode a self-play round's generated candidates (gen_candidates.jsonl) to PNGs, <out>/<id>/<k>.png."""
    from hermesflow_fast.selfplay.config import SelfPlayConfig
    from hermesflow_fast.selfplay.journal import Journal
    from hermesflow_fast.selfplay.stages import export_candidate_images
    from hermesflow_fast.train.config import load_config
    from hermesflow_fast.world.shipped import load_base

    rd = Path(round_dir)
    cands = rd / "gen_candidates.jsonl"
    if not cands.is_file():
        raise click.BadParameter(f"{cands} does not exist; run the round's gen_candidates stage first",
                                 param_hint="ROUND_DIR")
    if model is None and (rd.parent / "config.yaml").is_file():  # the run's own config, saved by selfplay
        model = load_config(rd.parent / "config.yaml", [], schema=SelfPlayConfig).world.base
    wm = load_base(model)
    out = Path(out_dir) if out_dir else rd / "images"
    n = export_candidate_images(wm.image_tokenizer, Journal(cands), out)
    click.echo(f"wrote {n} images under {out}")


@main.command("diagnose")
@click.argument("round_dir", type=click.Path())
@click.option("--model", default=None, type=click.Path(),
              help="the world model whose image tokenizer (vq/) decodes the grids for the judge  [default: the run's "
                   "world.base from ROUND_DIR/../config.yaml, else the shipped base]")
@click.option("--world-seed", type=int, default=None,
              help="world.seed of the run  [default: from ROUND_DIR/../config.yaml, else 0]")
@click.option("--out", "out_file", default=None, type=click.Path(),
              help="also write the diagnostics to FILE: FILE.json as JSON, any other name as the markdown printed")
@click.option("--batch-size", type=int, default=256, show_default=True, help="candidate grids per decode")
def diagnose_command(round_dir: str, model: str | None, world_seed: int | None, out_file: str | None,
                     batch_size: int) -> None:
    """Diagnostics of a self-play round: pass@1 / pass@M per category by the judge and by self-VQA, their agreement
    and correlation, the judge on self-VQA's winners vs losers, pairs kept / dropped. Reads ROUND_DIR only; on real
    data (no judge) reports what self-VQA gives and says what it cannot."""
    from hermesflow_fast.selfplay.diagnose import diagnose_command as run

    click.echo(run(round_dir, model=model, world_seed=world_seed, out=out_file, decode_batch=batch_size), nl=False)
    if out_file:
        click.echo(f"wrote {out_file}", err=True)


if __name__ == "__main__":
    main()
