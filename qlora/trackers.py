"""Training metrics to the dashboards teams watch: ``--report-to none|tensorboard|wandb|mlflow`` (a comma
list). Each tracker gets the run config once and, at every row written to ``metrics.jsonl``, the same
numbers under the same names (``loss``, ``lr``, ``grad_norm``, ``tokens``, ``tok_s``, ``eval_loss``...),
at that row's step. Only the main process (rank 0) reports.

Where they write (inside the run folder, so ``--overwrite`` removes them: qlora.outdir.RUN_NAMES):
TensorBoard event files in ``OUT/tb``; W&B's files in ``OUT/wandb`` (its own settings apply:
``WANDB_PROJECT`` (default ``qlora``), ``WANDB_MODE=offline``, ``WANDB_API_KEY``...); MLflow to
``MLFLOW_TRACKING_URI`` when set, else a file store in ``OUT/mlruns`` (experiment ``MLFLOW_EXPERIMENT_NAME``
or ``qlora``). Every tracker's package is optional and imported only when asked for; a missing one is
one line before the model loads (:func:`check`).
"""
from __future__ import annotations

import contextlib
import importlib.util
import json
import os
from pathlib import Path

from .errors import QLoraError

# tracker -> (the package it imports, the pip extra that installs it)
TRACKERS = {"tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb"), "mlflow": ("mlflow", "mlflow")}


def parse(text: str | None) -> list[str]:
    """``"tensorboard,wandb"`` -> ["tensorboard", "wandb"]; ``none`` or nothing -> []."""
    names = [n.strip().lower() for n in str(text or "none").split(",") if n.strip()]
    bad = [n for n in names if n not in TRACKERS and n != "none"]
    if bad:
        raise QLoraError(f"--report-to {text}: unknown tracker {bad[0]!r} (choose none, {', '.join(TRACKERS)}, "
                         "or a comma list)")
    return list(dict.fromkeys(n for n in names if n != "none"))


def check(text: str | None) -> list[str]:
    """The trackers asked for, each of whose package is installed (else one line naming the extra)."""
    names = parse(text)
    for n in names:
        package, extra = TRACKERS[n]
        if importlib.util.find_spec(package) is None:
            raise QLoraError(f"--report-to {n}: the {package} package is not installed: "
                             f"pip install 'qlora[{extra}]' (or pip install {package})")
    return names


def scalars(row: dict) -> dict[str, float]:
    """The numbers of a metrics.jsonl row (not its step)."""
    return {k: float(v) for k, v in row.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}


class Trackers:
    """The open trackers of a run: ``log(row)`` for each metrics row (closed by :func:`open_trackers`)."""

    def __init__(self, sinks: list):
        self.sinks = sinks

    def log(self, row: dict) -> None:
        values = scalars(row)
        if values:
            for s in self.sinks:
                s.log(values, int(row.get("step", 0)))


@contextlib.contextmanager
def open_trackers(text: str | None, out: Path, config: dict, main: bool = True):
    """The trackers of ``--report-to`` for the run in ``out`` (none off the main process), closed on exit."""
    sinks = []
    try:
        for n in (check(text) if main else []):
            sinks.append(_OPENERS[n](Path(out), config))
        yield Trackers(sinks)
    finally:
        for s in sinks:
            s.close()


class _TensorBoard:
    def __init__(self, out: Path, config: dict):
        from torch.utils.tensorboard import SummaryWriter
        self.w = SummaryWriter(log_dir=str(out / "tb"))
        self.w.add_text("config", "```\n" + json.dumps(config, indent=1, default=str) + "\n```", 0)

    def log(self, values: dict, step: int) -> None:
        for k, v in values.items():
            self.w.add_scalar(k, v, step)
        self.w.flush()

    def close(self) -> None:
        self.w.close()


class _WandB:
    def __init__(self, out: Path, config: dict):
        import wandb
        self.wandb = wandb
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "qlora"), dir=str(out), name=out.name,
                              config=config, reinit="finish_previous")

    def log(self, values: dict, step: int) -> None:
        self.run.log(values, step=step)

    def close(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None


class _MLflow:
    def __init__(self, out: Path, config: dict):
        import mlflow
        self.mlflow = mlflow
        if not os.environ.get("MLFLOW_TRACKING_URI"):
            # MLflow 3 keeps its file store only behind this opt-in; the run folder's own store needs no
            # database server or SQLAlchemy (a user's explicit setting wins)
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            mlflow.set_tracking_uri((out / "mlruns").resolve().as_uri())
        mlflow.set_experiment(os.environ.get("MLFLOW_EXPERIMENT_NAME", "qlora"))
        self.run = mlflow.start_run(run_name=out.name)
        mlflow.log_params({k: json.dumps(v) if isinstance(v, (list, dict)) else v for k, v in config.items()})

    def log(self, values: dict, step: int) -> None:
        self.mlflow.log_metrics(values, step=step)

    def close(self) -> None:
        if self.run is not None:
            self.mlflow.end_run()
            self.run = None


_OPENERS = {"tensorboard": _TensorBoard, "wandb": _WandB, "mlflow": _MLflow}
