"""Fit warnings for `qlora train`, one line each with the fix: too few optimizer steps for LoRA to learn
(at the start, with --batch-size/--grad-accum/--epochs that would give enough), most examples truncated,
validation loss rising at two evaluations in a row while the training loss falls (overfitting; names the
best step and its checkpoint), a training loss that does not move; and ``--early-stop N``, which stops
after N evaluations without a better validation loss and keeps the best adapter. Each warning is logged
and written to metrics.jsonl as ``{"step", "warning", "kind"}`` (the report reads it back)."""
from __future__ import annotations

import json
import math
from pathlib import Path

from .errors import QLoraError

MIN_STEPS = 50  # fewer optimizer steps than this rarely move a LoRA adapter far enough (issue 33: 108 -> 31%)
FLAT_MIN_STEPS, FLAT_CHANGE = 20, 0.02  # "not moving": the last fifth's mean within 2% of the first fifth's
TRUNCATED_SHARE = 0.5


def steps_for(n: int, batch_size: int, grad_accum: int, epochs: float, world: int = 1) -> int:
    """Optimizer steps of a run over ``n`` examples (unpacked; as qlora/train.py counts them)."""
    return max(1, math.ceil(epochs * math.ceil(n / batch_size) / (grad_accum * world)))


def few_steps(total: int, n: int, cfg, world: int = 1) -> str | None:
    """The warning for a run of fewer than MIN_STEPS optimizer steps, with settings that give enough."""
    if total >= MIN_STEPS:
        return None
    head = (f"{total} optimizer steps in the whole run ({n} examples, {cfg.batch_size}x{cfg.grad_accum}"
            + (f"x{world}" if world > 1 else "") + " per step")
    if cfg.max_steps:
        return f"{head}): too few updates to learn much — try --max-steps {MIN_STEPS} or more"
    head += f", {cfg.epochs:g} epochs): too few updates to learn much — try "
    tries = [f"--batch-size {b} --grad-accum 1 ({steps_for(n, b, 1, cfg.epochs, world)} steps)"
             for b in (8, 4, 2, 1) if b <= cfg.batch_size and steps_for(n, b, 1, cfg.epochs, world) >= MIN_STEPS][:1]
    per_epoch = steps_for(n, cfg.batch_size, cfg.grad_accum, 1, world)
    tries.append(f"--epochs {math.ceil(MIN_STEPS / per_epoch)}")
    return head + " or ".join(tries)


def truncated(stats: dict, max_length: int) -> str | None:
    n, k = stats.get("records", 0), stats.get("truncated", 0)
    if not n or k <= TRUNCATED_SHARE * n:
        return None
    return (f"{k} of {n} examples were cut to --max-length {max_length} (the longest has {stats.get('longest')} "
            f"tokens): the model learns answers without their ends — raise --max-length to {stats.get('longest')}")


def checkpoint_name(step: int) -> str:
    return f"step-{step:07d}"  # qlora/run_checkpoints.py's folder name


def overfitting(rows: list[dict], out: Path | None = None) -> str | None:
    """Validation loss up at each of the last two evaluations while the training loss went down over them."""
    evals = [r for r in rows if "eval_loss" in r]
    if len(evals) < 3:
        return None
    a, b, c = evals[-3:]
    if not a["eval_loss"] < b["eval_loss"] < c["eval_loss"]:
        return None
    def mean(lo, hi):
        xs = [r["loss"] for r in rows if "loss" in r and lo < r["step"] <= hi]
        return sum(xs) / len(xs) if xs else None
    before, after = mean(-1, a["step"]), mean(b["step"], c["step"])
    if before is None or after is None or not after < before:
        return None
    best = min(evals, key=lambda r: r["eval_loss"])
    ck = Path(out or ".") / "checkpoints" / checkpoint_name(best["step"])
    where = f"its checkpoint {ck}" if ck.is_dir() else "no checkpoint at that step (--save-every sets how often)"
    return (f"overfitting: validation loss rose at two evaluations in a row ({a['eval_loss']:g} -> {b['eval_loss']:g} "
            f"-> {c['eval_loss']:g}) while training loss fell; best was {best['eval_loss']:g} at step {best['step']} "
            f"({where}) — train fewer epochs, or pass --early-stop 2 to keep the best adapter")


def flat(rows: list[dict], lr: float) -> str | None:
    xs = [r["loss"] for r in rows if "loss" in r]
    if len(xs) < FLAT_MIN_STEPS:
        return None
    k = max(1, len(xs) // 5)
    first, last = sum(xs[:k]) / k, sum(xs[-k:]) / k
    if abs(first - last) > FLAT_CHANGE * abs(first):
        return None
    return (f"training loss is not moving ({first:.4g} -> {last:.4g} over {len(xs)} steps): raise --lr "
            f"(now {lr:g}), or check that the data has answers to learn")


def check_early_stop(cfg, n_records: int, val_file: bool) -> None:
    """--early-stop needs validation data (before the model loads)."""
    from .validation import held_count, parse_split
    if cfg.early_stop and not val_file and held_count(n_records, parse_split(cfg.val_split)) == 0:
        raise QLoraError(f"--early-stop {cfg.early_stop} needs validation data: {n_records} records hold none out "
                         "with --val-split " + str(cfg.val_split) + "; pass --val-split F or --val-data FILE")


class Watch:
    """A run's warnings (each kind once) and its early stop (the best validation loss, its step and a copy
    of its LoRA tensors when --early-stop is on)."""

    def __init__(self, cfg, out: Path, log, main: bool = True):
        self.cfg, self.out, self.log, self.main = cfg, Path(out), log, main
        self.warned: set[str] = set()
        self.best, self.best_step, self.best_tensors, self.since_best, self.stop = math.inf, None, None, 0, False

    def resumed(self, metrics: Path, step: int) -> None:
        """A resumed run warns no kind twice (read on every process: the same on all). Early stop counts
        from the resume: the best adapter before it is not in memory."""
        rows = [json.loads(x) for x in metrics.read_text().splitlines()] if metrics.is_file() else []
        self.warned |= {r["kind"] for r in rows if "warning" in r and r.get("step", 0) <= step}

    def warn(self, kind: str, text: str | None, step: int) -> None:
        if not text or kind in self.warned:
            return
        self.warned.add(kind)
        self.log(f"warning: {text}")
        if self.main:
            with open(self.out / "metrics.jsonl", "a") as f:
                f.write(json.dumps({"step": step, "warning": text, "kind": kind}, ensure_ascii=False) + "\n")

    def start(self, step: int, total: int, n: int, stats: dict, world: int) -> None:
        self.warn("few_steps", few_steps(total, n, self.cfg, world), step)
        self.warn("truncated", truncated(stats, self.cfg.max_length), step)

    def _count(self, loss: float, step: int) -> bool:
        if loss < self.best:
            self.best, self.best_step, self.since_best = loss, step, 0
            return True
        self.since_best += 1
        return False

    def evaluated(self, step: int, loss: float, rows: list[dict], lora_tensors) -> None:
        """After an evaluation at ``step`` (``rows``: the run's rows up to it, this one included);
        ``lora_tensors()``: the adapter now (called, collectively, on every process when it is the best)."""
        if self._count(loss, step) and self.cfg.early_stop:
            self.best_tensors = {k: tuple(t.detach().to("cpu", copy=True) for t in ab)
                                 for k, ab in lora_tensors().items()}
        self.warn("overfitting", overfitting(rows, self.out), step)
        if self.cfg.early_stop and self.since_best >= self.cfg.early_stop:
            self.stop = True
            self.log(f"early stop: {self.since_best} evaluations without a better validation loss than "
                     f"{self.best:g} (step {self.best_step}); the adapter is that step's")

    def end(self, rows: list[dict], step: int) -> None:
        self.warn("flat", flat(rows, self.cfg.lr), step)


def adapter_now(par, model) -> dict:
    """{layer: (A, B)} of the adapter now: gathered from the shards under FSDP, else the model's own."""
    from .model import lora_modules
    return par.lora_tensors(model) or {n: (m.lora_A, m.lora_B) for n, m in lora_modules(model).items()}
