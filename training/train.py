"""Training loop: truncated BPTT with carried state, Adam with warmup + cosine decay, gradient
clipping, sampled or full softmax, early stopping on validation perplexity, checkpoints with
resume, and data-parallel training under ``torchrun`` (DistributedDataParallel, gloo on CPU).

Why a sampled softmax: with an ~18k-word vocabulary the output layer costs ~3/4 of every
training step on a 2-core CPU. Sampling 1–2k negatives (unigram^0.75 proposal, log-Q corrected,
Jean et al. 2015) makes a step ~3× cheaper; the last epochs switch to the exact softmax so the
final model is trained on the same objective it is evaluated on.

Regularisation beyond the model's dropouts (``training/model.py``):

* AR/TAR (Merity et al. 2017): ``ar`` × mean square of the (dropped) decoder input, and ``tar`` ×
  mean square of the step-to-step change of the last recurrent layer's (undropped) output, added
  to the training loss. The logged ``loss``/``ppl`` stay the cross-entropy alone; the two terms
  are logged beside it.
* Weight averaging (``average``: ``ema`` or ``uniform``, see ``training/averaging.py``) from
  ``average_start`` (a fraction of training progress) on; validation, checkpoints' ``model`` and
  therefore export use the averaged weights.

``time_schedule``: with ``time_limit_minutes``, training progress is the larger of the step
fraction and the elapsed fraction of the time limit, and the cosine LR, the switch to the exact
softmax (the last ``full_softmax_epochs / epochs`` of progress) and the start of averaging all
follow it, so a run cut by its time limit still ends with a decayed LR, exact-softmax steps and
an average. (Runs with it are reproducible only up to machine speed.)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

from nextword.vocab import Vocab
from training.averaging import WeightAverage
from training.data import Splits, build_vocab, load_corpus
from training.metrics import StreamMetrics
from training.model import LanguageModel, ModelConfig, State


@dataclass
class TrainConfig:
    corpus: str
    out_dir: str
    corpus_format: str = "auto"
    batch_size: int = 64
    bptt: int = 35
    epochs: int = 10
    lr: float = 2e-3
    min_lr_ratio: float = 0.05
    warmup_steps: int = 200
    weight_decay: float = 0.0
    clip: float = 1.0
    softmax: str = "full"  # or "sampled"
    samples: int = 1024
    full_softmax_epochs: int = 0  # with softmax=sampled: the last N epochs use the exact softmax
    patience: int = 3
    seed: int = 0
    min_count: int = 3
    max_vocab: int | None = None
    time_limit_minutes: float | None = None
    max_train_tokens: int | None = None  # a token budget: the LR schedule ends exactly there
    log_every: int = 25
    eval_bptt: int = 128
    valid_tokens: int | None = 40000  # validation during training reads the first N tokens (full split at the end)
    max_eval_tokens: int | None = None
    threads: int | None = None
    ar: float = 0.0  # activation regularisation weight
    tar: float = 0.0  # temporal activation regularisation weight
    average: str = "none"  # weight averaging: none, ema or uniform
    average_start: float = 0.5  # fraction of training progress at which averaging starts
    ema_decay: float = 0.999
    time_schedule: bool = False  # LR/exact softmax/averaging follow the time limit too
    model: dict[str, Any] = field(default_factory=dict)


MODEL_ARGS = (  # ModelConfig fields set from the command line
    "cell",
    "embedding_size",
    "hidden_size",
    "num_layers",
    "dropout_embedding",
    "dropout",
    "dropout_output",
    "tied",
    "zoneout",
    "locked_dropout",
    "dropout_words",
    "weight_drop",
)


def train_config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The training configuration given on the command line (``nextword-train train`` and ``compare``)."""
    names = {f.name for f in fields(TrainConfig)} - {"model", "corpus", "out_dir"}
    return TrainConfig(
        corpus=args.corpus,
        out_dir=args.out,
        model={k: getattr(args, k) for k in MODEL_ARGS},
        **{k: getattr(args, k) for k in names if hasattr(args, k)},
    )


class CheckpointError(Exception):
    """A checkpoint that cannot be resumed with the requested configuration."""


def batchify(ids: list[int], batch: int, rank: int = 0, world: int = 1) -> Tensor:
    """Cut the stream into ``batch * world`` equal columns; this process keeps its ``batch``."""
    cols = batch * world
    n = len(ids) // cols
    if n < 2:
        raise ValueError(f"corpus of {len(ids)} tokens is too small for batch size {cols}")
    data = torch.tensor(ids[: n * cols], dtype=torch.long).view(cols, n)
    return data[rank::world].contiguous()


def detach(state: State) -> State:
    return tuple(s.detach() for s in state)


class NegativeSampler:
    """Negatives drawn from unigram^0.75, with the log expected count used for log-Q correction."""

    def __init__(self, counts: np.ndarray, samples: int, generator: torch.Generator) -> None:
        q = np.power(np.maximum(counts, 1.0), 0.75)
        self.probs = torch.tensor(q / q.sum(), dtype=torch.float32)
        self.log_expected = torch.log(self.probs * samples)
        self.samples = samples
        self.generator = generator

    def sample(self) -> Tensor:
        return torch.multinomial(self.probs, self.samples, replacement=True, generator=self.generator)


def sampled_softmax_loss(model: LanguageModel, feats: Tensor, targets: Tensor, sampler: NegativeSampler) -> Tensor:
    weight, bias = model.decoder.weight, model.decoder.bias
    flat, tgt = feats.reshape(-1, feats.shape[-1]), targets.reshape(-1)
    neg = sampler.sample()
    true_logit = (flat * weight[tgt]).sum(-1) + bias[tgt] - sampler.log_expected[tgt]
    neg_logit = flat @ weight[neg].t() + bias[neg] - sampler.log_expected[neg]
    neg_logit = neg_logit.masked_fill(neg[None, :] == tgt[:, None], float("-inf"))  # accidental hits
    logits = torch.cat([true_logit[:, None], neg_logit], dim=1)
    return F.cross_entropy(logits, torch.zeros_like(tgt))


def full_softmax_loss(model: LanguageModel, feats: Tensor, targets: Tensor) -> Tensor:
    logits = model.decoder(feats)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


@torch.no_grad()
def evaluate(model: LanguageModel, ids: list[int], bptt: int = 128, max_tokens: int | None = None) -> dict[str, float]:
    """Perplexity and top-k accuracy reading ``ids`` as one stream with carried state."""
    was_training = model.training
    model.eval()
    data = torch.tensor(ids[: (max_tokens + 1) if max_tokens else None], dtype=torch.long)[None, :]
    state = model.initial_state(1)
    metrics = StreamMetrics()
    for start in range(0, data.shape[1] - 1, bptt):
        x = data[:, start : start + bptt]
        y = data[:, start + 1 : start + 1 + bptt]
        x = x[:, : y.shape[1]]
        log_probs, state = model(x, state)
        target_lp = log_probs.gather(-1, y[..., None])
        ranks = (log_probs > target_lp).sum(-1)
        metrics.add(target_lp.numpy(), ranks.numpy())
    model.train(was_training)
    return metrics.result()


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _lr_lambda(cfg: TrainConfig, total_steps: int, clock: dict[str, float] | None = None):
    """Warm-up then cosine decay; with a ``clock``, progress is at least ``clock["progress"]``
    (the elapsed fraction of the time limit)."""

    def fn(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        progress = min(1.0, (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps))
        if clock is not None:
            progress = max(progress, min(1.0, clock["progress"]))
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return fn


class MetricsLog:
    """JSON lines, one object per event (``{"event": "train"|"valid"|"test", ...}``)."""

    def __init__(self, path: Path, enabled: bool) -> None:
        self.path, self.enabled = path, enabled

    def write(self, **record: Any) -> None:
        if self.enabled:
            with self.path.open("a", encoding="utf-8") as fh:
                fh.write(json.dumps(record) + "\n")


def prepare(cfg: TrainConfig) -> tuple[Splits, Vocab]:
    splits = load_corpus(cfg.corpus, cfg.corpus_format)
    return splits, build_vocab(splits.train, cfg.min_count, cfg.max_vocab)


def _check_resume(saved: dict[str, Any], cfg: TrainConfig, model_cfg: ModelConfig) -> None:
    if saved["model_config"] != model_cfg.to_dict():
        raise CheckpointError(
            f"checkpoint model {saved['model_config']} does not match the requested {model_cfg.to_dict()}"
        )
    for key in ("corpus_format", "min_count", "max_vocab", "batch_size", "bptt"):
        if saved["train_config"].get(key) != getattr(cfg, key):
            raise CheckpointError(
                f"checkpoint has {key}={saved['train_config'].get(key)!r}, run asks {getattr(cfg, key)!r}"
            )


def train(cfg: TrainConfig, resume: bool = False) -> dict[str, Any]:
    """Train a model; returns the summary (best validation, test metrics, timings)."""
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed:
        dist.init_process_group("gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    main_process = rank == 0
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    # Adam's moments of rarely-seen words decay geometrically into float32 denormals after ~800
    # steps, which makes the CPU optimizer step several times slower; flush them to zero.
    torch.set_flush_denormal(True)
    _seed_everything(cfg.seed)

    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    splits, vocab = prepare(cfg)
    model_cfg = ModelConfig(vocab_size=len(vocab), **cfg.model)
    model = LanguageModel(model_cfg)
    train_ids, valid_ids, test_ids = (vocab.encode(s) for s in (splits.train, splits.valid, splits.test))
    data = batchify(train_ids, cfg.batch_size, rank, world)
    steps_per_epoch = math.ceil((data.shape[1] - 1) / cfg.bptt)
    total_steps = steps_per_epoch * cfg.epochs
    if cfg.max_train_tokens:
        total_steps = min(total_steps, math.ceil(cfg.max_train_tokens / (cfg.batch_size * world * cfg.bptt)))

    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    timed = cfg.time_schedule and bool(cfg.time_limit_minutes)
    clock = {"progress": 0.0}
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(cfg, total_steps, clock if timed else None))
    averager = WeightAverage(cfg.average, cfg.ema_decay) if cfg.average != "none" else None
    exact_from = 1.0 - cfg.full_softmax_epochs / cfg.epochs  # progress where a timed run goes exact
    generator = torch.Generator().manual_seed(cfg.seed * 1000 + rank)
    counts = np.bincount(train_ids, minlength=len(vocab)).astype(np.float64)
    sampler = NegativeSampler(counts, cfg.samples, generator) if cfg.softmax == "sampled" else None

    start_epoch, step, best_valid, bad_epochs = 0, 0, float("inf"), 0
    last_path, best_path = out / "last.pt", out / "best.pt"
    if resume:
        if not last_path.exists():
            raise CheckpointError(f"--resume given but {last_path} does not exist")
        saved = torch.load(last_path, map_location="cpu", weights_only=False)
        _check_resume(saved, cfg, model_cfg)
        model.load_state_dict(saved.get("train_model", saved["model"]))
        if averager is not None and "average" in saved:
            averager.load_state_dict(saved["average"])
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        start_epoch, step = saved["epoch"] + 1, saved["step"]
        best_valid, bad_epochs = saved["best_valid"], saved["bad_epochs"]
        torch.set_rng_state(saved["rng"])
        generator.set_state(saved["sampler_rng"])
    elif main_process:
        (out / "metrics.jsonl").unlink(missing_ok=True)
    if main_process:
        vocab.save(out / "vocab.txt")
        run_config = {
            "train": asdict(cfg),
            "model": model_cfg.to_dict(),
            # export finds the corpus from here when it runs from another directory
            "corpus_resolved": str(Path(cfg.corpus).resolve()),
        }
        (out / "config.json").write_text(json.dumps(run_config, indent=2))

    net: torch.nn.Module = model
    if distributed:
        net = torch.nn.parallel.DistributedDataParallel(model)
    log = MetricsLog(out / "metrics.jsonl", main_process)
    started = time.time()
    budget_spent = False

    for epoch in range(start_epoch, cfg.epochs):
        exact = sampler is None or epoch >= cfg.epochs - cfg.full_softmax_epochs
        model.train()
        state = model.initial_state(data.shape[0])
        bar = tqdm(total=steps_per_epoch, desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not main_process, leave=True)
        window_loss, window_tokens, window_start = 0.0, 0, time.time()
        window_ar = window_tar = 0.0
        for start in range(0, data.shape[1] - 1, cfg.bptt):
            x = data[:, start : start + cfg.bptt]
            y = data[:, start + 1 : start + 1 + cfg.bptt]
            x = x[:, : y.shape[1]]
            if timed:
                clock["progress"] = (time.time() - started) / (cfg.time_limit_minutes * 60)
                exact = exact or (sampler is not None and clock["progress"] >= exact_from)
            state = detach(state)
            feats, state, hidden = _features(net, model, x, state)
            loss = full_softmax_loss(model, feats, y) if exact else sampled_softmax_loss(model, feats, y, sampler)
            ar_term, tar_term = activation_penalties(cfg, feats, hidden)
            optimizer.zero_grad(set_to_none=True)
            (loss + ar_term + tar_term).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip)
            optimizer.step()
            scheduler.step()
            step += 1
            if averager is not None and max(step / total_steps, clock["progress"]) >= cfg.average_start:
                averager.update(model)
            window_loss += loss.item() * y.numel()
            window_ar += float(ar_term.detach()) * y.numel()
            window_tar += float(tar_term.detach()) * y.numel()
            window_tokens += y.numel()
            bar.update(1)
            if step % cfg.log_every == 0:
                tps = window_tokens * world / (time.time() - window_start)
                mean = window_loss / window_tokens
                extra: dict[str, Any] = {}
                if cfg.ar:
                    extra["ar"] = window_ar / window_tokens
                if cfg.tar:
                    extra["tar"] = window_tar / window_tokens
                if averager is not None:
                    extra["averaging"] = averager.active
                bar.set_postfix(
                    loss=f"{mean:.3f}",
                    ppl=f"{math.exp(mean):.1f}",
                    tok_s=f"{tps:.0f}",
                    lr=f"{scheduler.get_last_lr()[0]:.2e}",
                    **{k: (("on" if v else "off") if isinstance(v, bool) else f"{v:.3f}") for k, v in extra.items()},
                )
                log.write(
                    event="train",
                    epoch=epoch,
                    step=step,
                    loss=mean,
                    ppl=math.exp(mean),
                    exact_softmax=exact,
                    tokens_per_s=tps,
                    lr=scheduler.get_last_lr()[0],
                    elapsed_s=time.time() - started,
                    **extra,
                )
                window_loss, window_tokens, window_start = 0.0, 0, time.time()
                window_ar = window_tar = 0.0
            if (cfg.time_limit_minutes and time.time() - started > cfg.time_limit_minutes * 60) or step >= total_steps:
                budget_spent = True
                break
        bar.close()

        stop = torch.zeros(2)
        if main_process:
            averaged = averager is not None and averager.active
            with averager.applied(model) if averaged else contextlib.nullcontext():
                valid = evaluate(model, valid_ids, cfg.eval_bptt, _min_opt(cfg.max_eval_tokens, cfg.valid_tokens))
                # clone the averaged weights: leaving the block puts the raw ones back
                evaluated_weights = {k: v.clone() for k, v in model.state_dict().items()} if averaged else None
            improved = valid["ppl"] < best_valid
            best_valid = min(best_valid, valid["ppl"])
            bad_epochs = 0 if improved else bad_epochs + 1
            averaging = {"averaged": averaged, "average_steps": averager.count} if averager is not None else {}
            log.write(
                event="valid",
                epoch=epoch,
                step=step,
                exact_softmax=exact,
                elapsed_s=time.time() - started,
                **averaging,
                **valid,
            )
            tqdm.write(
                f"epoch {epoch + 1}: valid ppl {valid['ppl']:.2f} top1 {valid['top1']:.3f}"
                f"{' (averaged weights)' if averaged else ''}{' (best)' if improved else ''}"
            )
            checkpoint = {
                # the weights evaluated above (averaged ones once averaging runs): what export reads
                "model": evaluated_weights or model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "epoch": epoch,
                "step": step,
                "best_valid": best_valid,
                "bad_epochs": bad_epochs,
                "rng": torch.get_rng_state(),
                "sampler_rng": generator.get_state(),
                "model_config": model_cfg.to_dict(),
                "train_config": asdict(cfg),
            }
            if averager is not None:
                checkpoint["train_model"] = model.state_dict()  # resume continues from the raw weights
                checkpoint["average"] = averager.state_dict()
            torch.save(checkpoint, last_path)
            if improved:
                torch.save(checkpoint, best_path)
            stop[0] = float(bad_epochs >= cfg.patience or budget_spent)
        if distributed:
            dist.broadcast(stop, src=0)
        if stop[0]:
            break

    summary: dict[str, Any] = {}
    if main_process:
        best = torch.load(best_path, map_location="cpu", weights_only=False)
        model.load_state_dict(best["model"])
        test = evaluate(model, test_ids, cfg.eval_bptt, cfg.max_eval_tokens)
        valid = evaluate(model, valid_ids, cfg.eval_bptt, cfg.max_eval_tokens)
        summary = {
            "best_valid_ppl": best_valid,
            "best_epoch": best["epoch"],
            "valid": valid,
            "test": test,
            "train_minutes": (time.time() - started) / 60,
            "steps": step,
            "parameters": model.num_parameters(),
            "processes": world,
            "corpus": splits.name,
            "protocol": splits.protocol,
            "vocab_size": len(vocab),
            "train_tokens": len(train_ids),
        }
        log.write(event="test", **test)
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        tqdm.write(
            f"test ppl {test['ppl']:.2f} top1 {test['top1']:.3f} top3 {test['top3']:.3f} top5 {test['top5']:.3f}"
        )
    if distributed:
        # Tear down together: a rank that destroys its process group while rank 0 is still
        # evaluating can abort at exit ("terminate called without an active exception").
        dist.barrier()
        dist.destroy_process_group()
    return summary


def _min_opt(a: int | None, b: int | None) -> int | None:
    return b if a is None else a if b is None else min(a, b)


def _features(net: torch.nn.Module, model: LanguageModel, x: Tensor, state: State) -> tuple[Tensor, State, Tensor]:
    # Under DDP the wrapped module's forward must run for gradients to be all-reduced, so route
    # through it and have it return decoder inputs rather than log-probabilities.
    if net is model:
        return model.features(x, state, with_hidden=True)
    return net(x, state, features_only=True, with_hidden=True)


def activation_penalties(cfg: TrainConfig, feats: Tensor, hidden: Tensor) -> tuple[Tensor, Tensor]:
    """AR: ``ar`` × mean square of the dropped decoder input; TAR: ``tar`` × mean square of the
    change between consecutive time steps of the last layer's undropped output."""
    zero = feats.new_zeros(())
    ar = cfg.ar * feats.pow(2).mean() if cfg.ar else zero
    tar = cfg.tar * (hidden[:, 1:] - hidden[:, :-1]).pow(2).mean() if cfg.tar and hidden.shape[1] > 1 else zero
    return ar, tar
