"""The Pair-DPO trainer: one readable class, setup → train → save / load.

Per optimizer step (E = ``train.batch_size`` × ``train.grad_accum`` pairs over all ranks, at most the data's pairs;
each rank takes a contiguous share):

    pairs of the step   = permutation(seed, epoch)[i·E : (i+1)·E]            deterministic: resume replays it exactly
                          (the epoch's last step also takes a remainder too small to give every rank a pair)
    micro-steps         = the rank's share cut into ``train.grad_accum`` consecutive groups (TRL's gradient
                          accumulation, with batch_size counted over all ranks: accum 2 × batch B = batch 2B)
    micro-batches       = each group packed into ``data.token_budget`` tokens (shared-prefix layouts, several
                          pairs per row); gradients accumulate over all of them (DDP syncs on the last one only)
    per micro-batch     reference forward (no grad) or precomputed reference log-probs → policy forward → fused head
                          on target rows → Pair-DPO, scaled by world_size / pairs_of_step (each pair weighs the same
                          however the step is split); the generation log-prob estimator (train.gen_masks,
                          train.gen_logp, train.gen_mask_ratio) and the RPO term (train.rpo_alpha): objective.py
    then                clip, NaN/inf check (stop or skip), AdamW, warm-up + cosine over the actual step count

Before anything in the run folder is written, ``resume.plan_run_dir`` decides whether the folder may be used as asked
(another run's folder, a resume with other settings, corrupt checkpoints), and on resume the checkpoint's tensor
shapes and vocabulary are checked against the model and data about to train.

``metrics.jsonl`` gets one line per logged step (TRL's names per side: ``und/rewards/margins`` …, plus ``loss``,
``lr``, ``grad_norm``, tokens/s, pairs/s, peak memory, MFU on CUDA). Checkpoints: ``run_dir/checkpoints/step-N/``.

    hermesflow train --config configs/tiny.yaml --run-dir runs/tiny
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from hermesflow_fast.data.batching import micro_batches
from hermesflow_fast.data.gen_mask import pair_generator
from hermesflow_fast.errors import UserError
from hermesflow_fast.io import write_atomic
from hermesflow_fast.model import ModelConfig, UnifiedTransformer, Vocabulary
from hermesflow_fast.train.checkpoint import CheckpointManager
from hermesflow_fast.train.config import ConfigError, TrainConfig, config_to_dict, save_config
from hermesflow_fast.train.dataset import TrainData, load_train_data
from hermesflow_fast.train.distributed import DistInfo, all_reduce_sum, barrier, init_distributed, wrap_model
from hermesflow_fast.train.objective import SIDES, PairDPOObjective, reference_logps, side_stats_names
from hermesflow_fast.train.optim import build_optimizer, resolve_warmup, warmup_cosine
from hermesflow_fast.train.resume import (
    CONFIG_FILE,
    IGNORED,
    METRICS_FILE,
    ResumeError,
    ResumePlan,
    changes_header,
    check_model_shapes,
    check_vocab,
    describe,
    logged_steps,
    move_aside,
    plan_run_dir,
)

__all__ = ["NonFiniteError", "Trainer"]

VOCAB_FILE = "vocab.json"


class NonFiniteError(RuntimeError):
    """A non-finite loss or gradient with ``train.nan_policy=stop``."""


class Trainer:
    def __init__(self, cfg: TrainConfig, run_dir: str | Path | None = None, resume: bool = False,
                 info: DistInfo | None = None, log=print, data: TrainData | None = None,
                 allow_config_change: bool = False, derived_keys: tuple[str, ...] = ()):
        """``data``: pairs already in memory (self-play hands its curated pairs over this way) instead of cfg.data.
        ``allow_config_change``: on resume, apply differences in ``resume.CHANGEABLE_ON_RESUME`` keys.
        ``derived_keys``: keys the caller sets itself and has already checked, left out of the run-folder comparison
        (self-play: ``model.init_from``, the previous round's model inside a run folder that may have moved)."""
        self.cfg = cfg
        self._given_data = data
        self.run_dir = Path(run_dir or cfg.run.run_dir or Path("runs") / cfg.run.name)
        self.resume = resume
        self.allow_config_change = allow_config_change
        self.derived_keys = tuple(derived_keys)
        self.info = info
        self._log = log
        self.step = 0
        self.skipped = 0

    # ---------------------------------------------------------------------------------------------------- setup ----
    def log(self, msg: str) -> None:
        if self.info is None or self.info.is_main:
            self._log(msg)

    def check_run_dir(self, verify: bool = True) -> ResumePlan:
        """What this run may do with its folder, read-only (``resume.plan_run_dir``); a UserError if it may not.
        ``model.init_from`` must exist. ``verify``: hash every checkpoint file (else sizes only)."""
        init = self.cfg.model.init_from
        if init and not Path(init).exists():
            raise ConfigError(f"--init-from / model.init_from {init!r}: no such file or folder")
        manager = CheckpointManager(self.run_dir, keep=self.cfg.checkpoint.keep)
        return plan_run_dir(self.run_dir, self.cfg, self.resume, self.allow_config_change, manager, verify=verify,
                            defaults=TrainConfig(), ignore=(*IGNORED, *self.derived_keys))

    def setup(self) -> Trainer:
        cfg = self.cfg
        self.info = self.info or init_distributed(cfg.dist.backend)
        info = self.info
        torch.manual_seed(cfg.run.seed + info.rank)
        np.random.seed((cfg.run.seed + info.rank) % 2**32)
        plan = self.check_run_dir()  # every rank reads; nothing is written before every check below has passed
        policy, vocab = self._build_model()
        self.data: TrainData = self._given_data or load_train_data(cfg, vocab, log=self.log)
        if policy is None:
            policy, _ = self._build_model(self.data.vocab)
        if policy.config.vocab_size != self.data.vocab.vocab_size:
            raise UserError(f"the model's vocabulary has {policy.config.vocab_size} ids but the token layout "
                            f"needs {self.data.vocab.vocab_size} (text + specials + image codes + mask)")
        if plan.checkpoint is not None:
            check_model_shapes(plan.checkpoint, {k: v.shape for k, v in policy.state_dict().items()})
            stored = plan.checkpoint_extra.get("vocab")
            where = plan.checkpoint / "state.json"
            if stored is None and (self.run_dir / VOCAB_FILE).is_file():
                stored, where = json.loads((self.run_dir / VOCAB_FILE).read_text()), self.run_dir / VOCAB_FILE
            check_vocab(stored, where, self.data.vocab.to_dict())
        t = cfg.train
        n = len(self.data.pairs)
        if n < max(1, info.world_size):
            raise UserError(f"{n} pairs for {info.world_size} processes: each process needs at least one pair")
        wanted = t.batch_size * t.grad_accum
        self.batch_size = min(wanted, n)  # pairs per optimizer step, over all ranks
        if wanted > n:
            self.log(f"note: train.batch_size {t.batch_size} × train.grad_accum {t.grad_accum} = {wanted} pairs per "
                     f"step, but the data holds {n}: each step takes all {n} pairs")
        if self.batch_size < info.world_size:
            raise UserError(f"train.batch_size {t.batch_size} × train.grad_accum {t.grad_accum} < {info.world_size} "
                            f"processes: each process needs at least one pair per step")
        self.steps_per_epoch = _steps_per_epoch(n, self.batch_size, info.world_size)
        self.total_steps = t.max_steps or t.epochs * self.steps_per_epoch
        if plan.step > self.total_steps:
            raise ResumeError(f"--resume: {plan.checkpoint} is at step {plan.step}, past this config's "
                              f"{self.total_steps} steps (train.max_steps / train.epochs)")
        self.policy = policy.to(info.device)
        # the reference is the model the run starts from (also on resume: copied before the checkpoint loads)
        frozen = copy.deepcopy(self.policy).eval().requires_grad_(False)
        self.reference = None if t.precompute_ref_logps else frozen
        self._configure_speed()
        self.objective = PairDPOObjective(self.policy, t.beta, t.loss_type, t.und_coeff, t.gen_coeff,
                                          t.label_smoothing, t.gen_logp, t.rpo_alpha)
        self.model = wrap_model(self.objective, info, cfg.dist.strategy)
        self.optimizer = build_optimizer(self.policy, t)
        self.scheduler = warmup_cosine(self.optimizer, resolve_warmup(t, self.total_steps), self.total_steps)
        self.ckpt = CheckpointManager(self.run_dir, keep=cfg.checkpoint.keep, rank=info.rank,
                                      world_size=info.world_size)
        if info.is_main:
            self._write_run_dir(plan)
        barrier()
        if plan.checkpoint is not None:
            self.load(plan.checkpoint)
        self.ref_cache: dict[str, dict[str, tuple[float, float]]] = {}
        if t.precompute_ref_logps:
            self._precompute_reference(frozen)
        del frozen
        accum = f" ({t.grad_accum} micro-steps)" if t.grad_accum > 1 else ""
        self.log(f"{self.data.summary}; {n} pairs, {self.total_steps} steps of {self.batch_size} pairs{accum} on "
                 f"{info.world_size} process(es), device {info.device}")
        return self

    def _write_run_dir(self, plan: ResumePlan) -> None:
        """The run folder's own files, once every check has passed (main rank): metrics of an attempt that starts
        over moved aside, config.yaml (with the changes a resume applied in its header), vocab.json."""
        run_dir = self.run_dir
        run_dir.mkdir(parents=True, exist_ok=True)
        metrics = run_dir / METRICS_FILE
        if plan.failed and plan.checkpoint is None:
            why = "; ".join(f"{p.name}: {reason}" for p, reason in plan.failed)
            self.log(f"--resume: no checkpoint in {run_dir / 'checkpoints'} can be used ({why}); starting again at "
                     f"step 0")
        elif plan.failed:
            why = "; ".join(f"{p.name}: {reason}" for p, reason in plan.failed)
            self.log(f"--resume: newer checkpoints failed verification ({why}); continuing from {plan.checkpoint}")
        elif self.resume and plan.checkpoint is None:
            self.log(f"--resume: no checkpoint in {run_dir / 'checkpoints'} yet; starting at step 0")
        if plan.restart and metrics.is_file():
            n = logged_steps(metrics)
            aside = move_aside(metrics)
            self.log(f"run dir {run_dir}: starting at step 0; the {n} steps an earlier attempt logged are kept in "
                     f"{aside} and {metrics.name} starts afresh")
        if plan.changes:
            if plan.history:
                self.log(f"--allow-config-change: applying {describe(plan.changes)} from step {plan.step} (recorded "
                         f"in {run_dir / CONFIG_FILE})")
            else:
                self.log(f"run dir {run_dir}: replacing the config of a run that never logged a step "
                         f"({describe(plan.changes)})")
        header = None
        if plan.history:
            header = changes_header(run_dir / CONFIG_FILE, plan.changes, f"on resume at step {plan.step}")
        save_config(self.cfg, run_dir / CONFIG_FILE, header=header)
        (run_dir / VOCAB_FILE).write_text(json.dumps(self.data.vocab.to_dict(), indent=1) + "\n")

    def _build_model(self, vocab: Vocabulary | None = None) -> tuple[UnifiedTransformer | None, Vocabulary | None]:
        """(policy, its stored vocabulary) from ``model.init_from``; or a fresh model sized for ``vocab``; or
        (None, None) when there are no weights to load and no vocabulary yet (the data decides it)."""
        m = self.cfg.model
        if m.init_from:
            src = Path(m.init_from)
            state = src / "state.json"  # one of our checkpoints: config and vocabulary live in its state
            if not (src / "config.json").is_file() and state.is_file():
                extra = json.loads(state.read_text()).get("extra", {})
                mc = ModelConfig.from_dict(extra["model_config"], where=str(state))
                mc.extra["vocab"] = extra["vocab"]
                policy = UnifiedTransformer.from_pretrained(src, config=mc)
            else:
                policy = UnifiedTransformer.from_pretrained(src)
            stored = None
            vf = src / VOCAB_FILE
            if "vocab" in policy.config.extra:
                stored = Vocabulary.from_dict(policy.config.extra["vocab"])
            elif vf.is_file():
                stored = Vocabulary.from_dict(json.loads(vf.read_text()))
            policy.config.attn_backend = m.attn_backend
            return policy, stored
        if vocab is None:
            return None, None
        torch.manual_seed(self.cfg.run.seed)  # the same initial weights on every rank
        size = vocab.vocab_size
        cfg = ModelConfig.show_o_512(vocab_size=size) if m.config == "show_o_512" else ModelConfig.tiny(vocab_size=size)
        cfg.attn_backend = m.attn_backend
        return UnifiedTransformer(cfg), None

    def _configure_speed(self) -> None:
        m, dev = self.cfg.model, self.info.device
        self.autocast = (torch.autocast("cuda", dtype=torch.bfloat16)
                         if dev.type == "cuda" and m.dtype in ("auto", "bf16") else contextlib.nullcontext())
        if m.activation_checkpointing:
            self.policy.gradient_checkpointing = True
        compile_on = m.compile if m.compile is not None else dev.type == "cuda"
        if compile_on:
            for model in (self.policy, self.reference):
                if model is not None:
                    for i, layer in enumerate(model.model.layers):
                        model.model.layers[i] = torch.compile(layer)

    # ----------------------------------------------------------------------------------------------------- data ----
    def step_pairs(self, step: int) -> tuple[list, int, int]:
        """(this rank's share of the pairs of optimizer step ``step``, the step's pairs over all ranks, epoch): a
        pure function of seed, epoch and step. The epoch's last step takes every pair left."""
        epoch, i = divmod(step, self.steps_per_epoch)
        g = torch.Generator().manual_seed(self.cfg.run.seed * 1_000_003 + epoch)
        end = (i + 1) * self.batch_size if i < self.steps_per_epoch - 1 else len(self.data.pairs)
        order = torch.randperm(len(self.data.pairs), generator=g)[i * self.batch_size:end]
        share = np.array_split(order.numpy(), self.info.world_size)[self.info.rank]
        return [self.data.pairs[j] for j in share.tolist()], len(order), epoch

    def _drop_text(self, pairs: list, epoch: int) -> list:
        """Prompt dropout for the t2i side (CFG training): ONE draw per pair and epoch, seeded by the pair id, so
        chosen and rejected (and policy and reference) always see the same condition (docs/differences.md)."""
        p = self.cfg.train.text_dropout
        if p <= 0:
            return pairs
        out = []
        for pair in pairs:
            u = float(torch.rand((), generator=pair_generator(pair.id, epoch, self.cfg.run.seed, "text-dropout")))
            out.append(dataclasses.replace(pair, prompt_ids=[]) if u < p else pair)
        return out

    def _micro_batches(self, pairs: list, epoch: int, budget: int | None = None) -> list:
        pairs = self._drop_text(pairs, epoch)
        t = self.cfg.train
        mbs = micro_batches(pairs, self.data.layout, budget or self.cfg.data.token_budget, epoch, self.cfg.run.seed,
                            gen_masks=t.gen_masks, gen_mask_ratio=t.gen_mask_ratio)
        return [mb.to(self.info.device) if hasattr(mb, "to") else mb for mb in mbs]

    @torch.no_grad()
    def _precompute_reference(self, reference: UnifiedTransformer) -> None:
        """Reference log-probs of every pair this rank will see, per epoch (the gen mask depends on the epoch)."""
        t0 = time.perf_counter()
        by_epoch: dict[int, dict[str, object]] = {}
        for step in range(self.step, self.total_steps):
            pairs, _, epoch = self.step_pairs(step)
            by_epoch.setdefault(epoch, {}).update({p.id: p for p in pairs})
        for epoch, pairs in by_epoch.items():
            for mb in self._micro_batches(list(pairs.values()), epoch, 4 * self.cfg.data.token_budget):
                with self.autocast:
                    out = reference_logps(reference, mb, self.cfg.train.gen_logp, self.cfg.train.loss_type)
                for side, (c, r) in out.items():
                    idx = getattr(mb, f"{side}_pairs")
                    for q, j in enumerate(idx):
                        key = f"{epoch}:{mb.pair_ids[j]}"
                        self.ref_cache.setdefault(key, {})[side] = (float(c[q]), float(r[q]))
        self.log(f"reference log-probs precomputed for {len(self.ref_cache)} (pair, epoch) in "
                 f"{time.perf_counter() - t0:.1f}s; no reference model is held during training")

    def _ref_logps_of(self, mb, epoch: int) -> dict:
        out = {}
        for side in SIDES:
            idx = getattr(mb, f"{side}_pairs")
            if len(idx) == 0:
                continue
            vals = [self.ref_cache[f"{epoch}:{mb.pair_ids[j]}"][side] for j in idx]
            t = torch.tensor(vals, dtype=torch.float32, device=self.info.device)
            out[side] = (t[:, 0], t[:, 1])
        return out

    # ---------------------------------------------------------------------------------------------------- train ----
    def accumulate(self, step: int) -> tuple[torch.Tensor, int, int]:
        """Forward and backward of every pair of optimizer step ``step`` on this rank: ``train.grad_accum``
        micro-steps, each packed into micro-batches; gradients add up in ``.grad`` (each pair weighs 1 / pairs of
        the step). → (summed stats + token count, pairs of the step over all ranks, epoch); nothing is reduced."""
        info = self.info
        pairs, n_step, epoch = self.step_pairs(step)
        groups = [g for g in np.array_split(np.arange(len(pairs)), self.cfg.train.grad_accum) if len(g)]
        mbs = [mb for g in groups for mb in self._micro_batches([pairs[j] for j in g.tolist()], epoch)]
        self.policy.train()
        sums = torch.zeros(len(side_stats_names()) + 1, dtype=torch.float64, device=info.device)
        scale = info.world_size / n_step
        ddp = isinstance(self.model, torch.nn.parallel.DistributedDataParallel)
        for k, mb in enumerate(mbs):
            sync = contextlib.nullcontext() if (not ddp or k == len(mbs) - 1) else self.model.no_sync()
            with sync:
                with self.autocast:
                    ref, ref_lp = None, None
                    if self.reference is not None:
                        with torch.no_grad():
                            h = self.reference(mb.input_ids, mb.mask, mb.position_ids)
                        ref = (h, self.reference.lm_head.weight, self.reference.lm_head.bias)
                    elif self.ref_cache:
                        ref_lp = self._ref_logps_of(mb, epoch)
                    loss, stats = self.model(mb, ref=ref, ref_logps=ref_lp, scale=scale)
                loss.backward()
            sums[:-1] += torch.stack([stats[k_] for k_ in side_stats_names()]).to(sums)
            sums[-1] += float(mb.input_ids.numel())
        return sums, n_step, epoch

    def train_step(self, step: int) -> dict:
        """One optimizer step; returns its metrics (identical on every rank)."""
        t = self.cfg.train
        sums, n_step, epoch = self.accumulate(step)
        all_reduce_sum(sums)
        grad_norm = self._clip()
        finite = math.isfinite(grad_norm) and all(math.isfinite(float(v)) for v in sums)
        if not finite:
            self.optimizer.zero_grad(set_to_none=True)
            if t.nan_policy == "stop":
                last = self.ckpt.latest()
                raise NonFiniteError(f"step {step}: non-finite loss or gradient (grad_norm={grad_norm}); "
                                     f"last good checkpoint: {last or 'none'}")
            self.skipped += 1
        else:
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        lr = self.scheduler.get_last_lr()[0]
        self.scheduler.step()
        return self._metrics(sums, n_step, grad_norm, lr, epoch, finite)

    def _clip(self) -> float:
        params = [p for p in self.policy.parameters() if p.grad is not None]
        max_norm = self.cfg.train.max_grad_norm
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm else float("inf"))
        return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)

    def _metrics(self, sums: torch.Tensor, n_step: int, grad_norm: float, lr: float, epoch: int, finite: bool
                 ) -> dict:
        names = side_stats_names()
        vals = dict(zip(names, sums[:-1].tolist()))
        m: dict[str, float] = {"step": self.step + 1, "epoch": epoch}
        loss = 0.0
        for side in SIDES:
            cnt = vals[f"{side}/count"]
            coeff = self.cfg.train.und_coeff if side == "und" else self.cfg.train.gen_coeff
            loss += coeff * vals[f"{side}/loss"] / n_step
            m[f"{side}/pairs"] = cnt
            if cnt > 0:
                for k in names:
                    if k.startswith(side + "/") and not k.endswith("/count"):
                        m[k] = vals[k] / cnt
        m.update({"loss": loss, "lr": lr, "grad_norm": grad_norm, "pairs": n_step, "tokens": sums[-1].item(),
                  "skipped_steps": self.skipped, "finite": finite})
        return m

    def train(self) -> list[dict]:
        """Run to ``total_steps``; returns the metrics of every step run here."""
        info, cfg = self.info, self.cfg
        history = []
        bar = None
        if info.is_main and cfg.log.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=self.total_steps, initial=self.step, desc="pair-dpo", dynamic_ncols=True)
        metrics_file = self.run_dir / "metrics.jsonl"
        sinks = self._extra_sinks() if info.is_main else []
        if info.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(info.device)
        # model FLOPs per token: the policy's forward + backward (3 forwards) and the reference's forward
        flops_tok = (4.0 if self.reference is not None else 3.0) * self.policy.config.forward_flops(1)
        while self.step < self.total_steps:
            t0 = time.perf_counter()
            m = self.train_step(self.step)
            if info.device.type == "cuda":
                torch.cuda.synchronize(info.device)
            dt = time.perf_counter() - t0
            m.update({"step_time_s": dt, "pairs_per_s": m["pairs"] / dt, "tokens_per_s": m["tokens"] / dt})
            if info.device.type == "cpu":
                import resource

                m["peak_memory_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # max RSS (KiB)
            if info.device.type == "cuda":
                m["peak_memory_gb"] = torch.cuda.max_memory_allocated(info.device) / 2**30
                peak = _peak_flops(info.device)
                if peak:
                    m["mfu"] = flops_tok * m["tokens_per_s"] / (peak * info.world_size)
            self.step += 1
            history.append(m)
            if info.is_main and (self.step % cfg.log.every == 0 or self.step == self.total_steps):
                with metrics_file.open("a") as f:
                    f.write(json.dumps(m) + "\n")
                for sink in sinks:
                    sink(m)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{m['loss']:.4f}", und=f"{m.get('und/rewards/margins', 0):.3f}",
                                gen=f"{m.get('gen/rewards/margins', 0):.3f}")
            if self.step % cfg.checkpoint.every == 0 or self.step == self.total_steps:
                self.save()
        if bar is not None:
            bar.close()
        return history

    def _extra_sinks(self) -> list:
        """Opt-in metric sinks, imported only when asked for (log.tensorboard, log.wandb)."""
        sinks = []
        if self.cfg.log.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as exc:
                raise RuntimeError("log.tensorboard=true needs tensorboard: pip install tensorboard") from exc
            writer = SummaryWriter(str(self.run_dir / "tensorboard"))

            def to_tensorboard(m: dict) -> None:
                for k, v in m.items():
                    if isinstance(v, (int, float)) and k != "step":
                        writer.add_scalar(k, v, m["step"])
                writer.flush()

            sinks.append(to_tensorboard)
        if self.cfg.log.wandb:
            try:
                import wandb
            except ImportError as exc:
                raise RuntimeError("log.wandb=true needs wandb: pip install wandb") from exc
            run = wandb.init(project="hermesflow_fast", name=self.cfg.run.name, dir=str(self.run_dir),
                             config=config_to_dict(self.cfg))
            sinks.append(lambda m: run.log({k: v for k, v in m.items() if k != "step"}, step=m["step"]))
        return sinks

    # ------------------------------------------------------------------------------------------ save / load -----
    def _model_state(self) -> dict[str, torch.Tensor]:
        if self.cfg.dist.strategy == "fsdp" and self.info.distributed:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            return get_model_state_dict(self.policy, options=StateDictOptions(full_state_dict=True,
                                                                                cpu_offload=True))
        return {k.replace("_orig_mod.", ""): v for k, v in self.policy.state_dict().items()}

    def _optim_state(self) -> dict:
        if self.cfg.dist.strategy == "fsdp" and self.info.distributed:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

            return get_optimizer_state_dict(self.policy, self.optimizer,
                                            options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return self.optimizer.state_dict()

    def save(self) -> Path:
        extra = {"step": self.step, "skipped_steps": self.skipped, "config": config_to_dict(self.cfg),
                 "vocab": self.data.vocab.to_dict(), "model_config": self.policy.config.to_hf_dict()}
        path = self.ckpt.save(self.step, self._model_state(), self._optim_state(), self.scheduler.state_dict(),
                              extra)
        return path

    def load(self, path: str | Path | None = None) -> None:
        """Continue from checkpoint ``path`` (default: the newest that checks out): weights, optimizer, scheduler
        position, RNG, step. The lr schedule is this config's (over its total steps), evaluated at that step."""
        path = Path(path) if path is not None else self.ckpt.latest()
        if path is None:
            self.log(f"--resume: no complete checkpoint in {self.run_dir / 'checkpoints'}; starting at step 0")
            return
        ck = self.ckpt.load(path)
        state = ck.model_state
        own = self.policy.state_dict()
        key_map = {k.replace("_orig_mod.", ""): k for k in own}
        state = {key_map[k]: v for k, v in state.items()}
        if self.cfg.dist.strategy == "fsdp" and self.info.distributed:
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                set_model_state_dict,
                set_optimizer_state_dict,
            )

            full = StateDictOptions(full_state_dict=True)
            set_model_state_dict(self.policy, state, options=full)
            set_optimizer_state_dict(self.policy, self.optimizer, ck.optimizer_state, options=full)
        else:
            self.policy.load_state_dict(state)
            self.optimizer.load_state_dict(ck.optimizer_state)
        self.scheduler.load_state_dict(ck.scheduler_state)
        self._rebase_schedule()
        self.step = int(ck.extra["step"])
        self.skipped = int(ck.extra.get("skipped_steps", 0))
        self.ckpt.restore_rng(path)
        metrics = self.run_dir / METRICS_FILE
        if self.info.is_main and metrics.is_file():  # steps logged after the checkpoint are run again
            keep = []
            for ln in metrics.read_text().splitlines():
                try:
                    if ln.strip() and json.loads(ln)["step"] <= self.step:
                        keep.append(ln)
                except (ValueError, KeyError, TypeError):  # a line cut short by a kill mid-write
                    continue
            write_atomic(metrics, "".join(ln + "\n" for ln in keep))
        self.log(f"resumed from {path} at step {self.step}")

    def _rebase_schedule(self) -> None:
        """Set every param group's lr to this scheduler's value at its loaded position: the optimizer state holds the
        lr the checkpoint's own schedule gave, which differs when the total steps changed on resume."""
        s = self.scheduler
        lrs = [base * fn(s.last_epoch) for base, fn in zip(s.base_lrs, s.lr_lambdas)]
        for group, lr in zip(self.optimizer.param_groups, lrs):
            group["lr"] = lr
        s._last_lr = lrs


def _steps_per_epoch(n: int, per_step: int, world_size: int) -> int:
    """Optimizer steps of one pass over ``n`` pairs at ``per_step`` pairs a step. A remainder smaller than the world
    joins the last step (a process without a pair would leave the others waiting in the gradient all-reduce)."""
    full, rest = divmod(n, per_step)
    return max(1, full + (1 if rest >= world_size else 0))


def _peak_flops(device: torch.device) -> float | None:
    """Dense bf16 peak of the card (for MFU); None when unknown."""
    name = torch.cuda.get_device_name(device)
    for key, flops in (("H200", 989e12), ("H100", 989e12), ("A100", 312e12), ("L40", 181e12), ("A10", 125e12)):
        if key in name:
            return flops
    return None
