"""`qlora train`: the training run, readable top to bottom.

load model (4-bit base + LoRA) → read and tokenize data → batches → optimizer + schedule →
for each step: accumulate gradients over micro-batches (loss normalised by the step's trained
tokens) → clip → update → log → eval / checkpoint every N steps → final adapter (PEFT format).

:class:`Run` holds one run: ``setup`` (``_setup_output``, ``_setup_budget``, ``_setup_model``, ``_setup_data``,
``_setup_optimizer``, ``_resume``), ``fit`` (``train_step`` per optimizer step, each micro-batch
through the one :class:`MicroStep`, eager or replayed from a CUDA graph), ``evaluate``, ``save``
(a checkpoint) and ``finish``; what the steps run inside (signal handlers, the metrics file, the
dequantized-weight cache, the progress bar) is held by a ``contextlib.ExitStack``.
:func:`train` is the public entry point.

The seam for other training methods is ``method`` (qlora/methods.py): the run asks it for the
examples, the batches, the token count that normalises the loss, and the loss of a batch
(``loss(model, batch, device, static_shapes) -> (loss sum, metrics)``; the DDP/FSDP wrapper calls
it too). :class:`~qlora.methods.SFT` is the default; a preference method (DPO, ORPO) plugs in there
and leaves the run as it is.

Longer than 500 lines because it is the whole of `qlora train`: the configuration (one field per
flag, ~75 lines), its checks, the run and the command line; each part is short, and splitting them
would send a reader of the run to three files.

Output directory::

    OUT/config.yaml            the resolved configuration
    OUT/metrics.jsonl          one JSON object per step (and per evaluation)
    OUT/loss.png               train/eval loss curves, redrawn as training goes
    OUT/checkpoints/step-N/    adapter + optimizer + scheduler + RNG + data position, checksummed
    OUT/adapter/               the final adapter (PEFT directory, loads with peft)

Checkpoints are written to a temp directory and renamed into place, so an interrupted run never
leaves a half-written one; ``--resume`` takes the newest checkpoint whose checksums verify and
continues exactly (same losses as an uninterrupted run; format: qlora/run_checkpoints.py). Ctrl-C /
SIGTERM saves and exits.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from . import hub
from .compat import attention_implementation
from .config import COMPUTE_DTYPES, add_dataclass_args, build_config, is_int, is_number, opt, to_yaml
from .errors import QLoraError
from .hardware import resolve
from .run_checkpoints import latest_checkpoint, load_checkpoint, save_checkpoint
from .settings import switches
from .validation import AUTO_FROM, AUTO_MAX, AUTO_MIN
from .variants import BASE_FILE


@dataclass
class TrainConfig:
    # data
    data: str | None = opt(None, "training data: a JSONL, JSON, CSV or Parquet file, a datasets save_to_disk folder "
                           "(FOLDER[:split]) or a Hub data set hf:org/name[:split]", group="data", metavar="FILE")
    data_field: str | None = opt(None, "rename data columns to the format's fields, e.g. "
                                 "question=instruction,answer=output", group="data", metavar="COL=FIELD,...")
    format: str | None = opt(None, "record format (default: detected)", ["alpaca", "chat", "completion", "text"], group="data")
    val_data: str | None = opt(None, "validation data file (instead of --val-split)", group="data", metavar="FILE")
    val_split: str = opt("auto", f"records held out for validation: a fraction in [0, 1), or auto = 5%% (at least "
                         f"{AUTO_MIN}, at most {AUTO_MAX}) of data of {AUTO_FROM} records or more, none of smaller data",
                         group="data", metavar="F|auto", or_number=True)
    max_length: int = opt(1024, "maximum tokens per example", group="data")
    truncate: bool = opt(True, "truncate longer examples (and count them); false: refuse them", group="data")
    train_on_prompt: bool = opt(False, "also train on prompt tokens (default: response tokens only)", group="data")
    template: str = opt("auto", "prompt rendering: tokenizer chat template, or a plain template", ["auto", "chat", "plain"], group="data")
    packing: bool = opt(False, "pack several examples per row (attention stays inside each example); with --format "
                        "text: concatenate the documents (EOS between) and cut full rows", group="data")
    stride: int = opt(0, "--format text: tokens each window (or packed row) repeats from the previous one as "
                      "context, not trained again (long documents are cut into windows of --max-length, never "
                      "truncated)", group="data", metavar="N")
    # preference tuning (docs/preference.md)
    method: str = opt("sft", "what to learn: sft = supervised fine-tuning on the responses; dpo / orpo = preference "
                      "tuning on {prompt, chosen, rejected} pairs (--batch-size then counts pairs)",
                      ["sft", "dpo", "orpo"], group="preference")
    beta: float = opt(0.1, "DPO/ORPO strength: DPO's inverse temperature on the log-ratio to the reference, ORPO's "
                      "weight of the odds-ratio term", group="preference")
    loss: str = opt("sigmoid", "DPO loss: sigmoid (the DPO paper's) or ipo", ["sigmoid", "ipo"], group="preference")
    sft_weight: float = opt(0.0, "DPO: add this weight times the chosen answers' mean NLL per token to the loss (TRL's "
                            "loss_type [sigmoid, sft] with loss_weights [1, W]; RPO's alpha): keeps the chosen answers "
                            "likely while the margin grows; 0 = plain DPO", group="preference", metavar="W")
    precompute_ref: bool = opt(False, "DPO: compute the reference log-probs (model with LoRA off) once per pair before "
                               "training and keep them in OUT/ref_logps.safetensors, instead of one extra forward "
                               "pass per micro-batch", group="preference")
    share_prompt: str = opt("auto", "DPO/ORPO: run the prompt a pair's two answers share once, the rejected answer "
                            "attending to it but not to the chosen answer (same log-probs, fewer tokens; used where it "
                            "saves at least an eighth of a batch's tokens; sdpa attention: mask-free pair attention, "
                            "eager: a 4D mask). auto: on, except on CUDA with eager attention, where the masked version "
                            "made the step slower",
                            ["auto", "true", "false"], group="preference")
    # model
    model: str | None = opt(None, "base model: HF dir, GGUF file, 4-bit checkpoint or Hub id org/name[@revision] (default: embedded "
                                  "SmolLM2-135M-Instruct); "
                                  "shape:NAME builds random weights of a `qlora plan` shape (benchmarks; needs --tokenizer-from)",
                            group="model", metavar="SRC")
    tokenizer_from: str | None = opt(None, "take the tokenizer from this model source (for shape:NAME models)", group="model", metavar="SRC")
    quant_type: str = opt("nf4", "4-bit code of the frozen base; none = 16-bit LoRA", ["nf4", "fp4", "int4", "none"], group="model")
    blocksize: int = opt(64, "quantization block size", group="model")
    double_quant: bool = opt(True, "double-quantize the block scales", group="model")
    compute_dtype: str = opt("auto", "matmul dtype; auto = what the hardware runs fast: bf16 on CUDA of compute "
                             "capability >= 8.0 and on CPUs with native bf16 (AVX512-BF16/AMX), fp16 with loss scaling "
                             "on older GPUs, fp32 on other CPUs (measured once; the choice is printed and written to "
                             "config.yaml)", COMPUTE_DTYPES, group="model")
    attention: str = opt("auto", "attention implementation: sdpa or eager; auto = eager on a CPU when --max-length "
                         "is at most 512 (faster for short sequences there), sdpa otherwise", ["auto", "sdpa", "eager"],
                         group="model")
    rank: int = opt(64, "LoRA rank r", group="lora")
    alpha: float = opt(16.0, "LoRA alpha (scale = alpha / r)", group="lora")
    dropout: float = opt(0.05, "LoRA dropout (on a GPU each mask is a hash of --seed, the micro-batch and the "
                         "layer: a resumed run and a CUDA-graph replay draw the same masks)", group="lora")
    target: str = opt("all-linear", "layers that get LoRA: all-linear or names like q_proj,v_proj", group="lora")
    rslora: bool = opt(False, "rank-stabilised LoRA (scale = alpha / sqrt(r))", group="lora")
    init: str = opt("gaussian", "LoRA initialisation: gaussian = peft's default (A Kaiming-uniform, B = 0: the model "
                    "starts as the 4-bit base); loftq = A, B from SVDs of the quantization error, base re-quantized "
                    "(dequant(Q) + B A ~ W; exact at --alpha equal to --rank, as peft); pissa = A, B from the top "
                    "singular vectors of W, the residual quantized. loftq/pissa store the base they make in "
                    "OUT/qlora_base.safetensors and in each adapter folder", ["gaussian", "loftq", "pissa"], group="lora")
    loftq_iters: int = opt(1, "LoftQ alternating steps (quantize, SVD), as peft's loftq_iter", group="lora")
    dora: bool = opt(False, "DoRA: a trained magnitude per output row on top of the LoRA direction "
                     "(peft use_dora=True)", group="lora")
    lora_plus_ratio: float = opt(0.0, "LoRA+: learning rate of B (and of DoRA's magnitude) = this times --lr, "
                                 "as peft's create_loraplus_optimizer (0: off; the paper suggests 16)", group="lora")
    # optimisation
    optim: str = opt("paged_adamw", "optimizer", ["adamw", "adamw8bit", "paged_adamw", "paged_adamw8bit"], group="optimization")
    lr: float = opt(2e-4, "peak learning rate", group="optimization")
    weight_decay: float = opt(0.0, "AdamW weight decay", group="optimization")
    schedule: str = opt("constant", "learning-rate schedule after warmup", ["constant", "cosine", "linear"], group="optimization")
    warmup_ratio: float = opt(0.03, "fraction of steps for linear warmup", group="optimization")
    max_grad_norm: float = opt(0.3, "gradient clipping norm (0: off)", group="optimization")
    batch_size: int = opt(4, "examples (or packed rows) per micro-batch", group="optimization")
    grad_accum: int = opt(4, "micro-batches per optimizer step", group="optimization")
    epochs: float = opt(1.0, "passes over the data (ignored if --max-steps is set)", group="optimization")
    max_steps: int | None = opt(None, "optimizer steps to run", group="optimization")
    grad_checkpointing: bool = opt(True, "recompute activations in backward to save memory", group="optimization")
    offload_activations: bool = opt(False, "keep checkpointed block inputs in pinned CPU memory (long sequences)",
                                     group="optimization")
    offload_embeddings: bool = opt(False, "keep the input embedding table in CPU memory (untied models)",
                                   group="optimization")
    offload_optimizer: bool = opt(False, "keep a paged optimizer's state in CPU memory between steps (8 bytes per "
                                  "LoRA parameter off the GPU during forward/backward; copied in and out each step)",
                                  group="optimization")
    offload_weights: str = opt("auto", "keep decoder blocks' frozen 4-bit weights in pinned CPU memory and copy "
                               "them into the GPU as the block runs, two blocks there at a time, the next copy "
                               "overlapping the current block's compute (a streamed block is then recomputed in "
                               "backward; each step copies it about twice): true (every block), false, or auto = only "
                               "when the plan says the run does not fit the GPU (or --memory-budget) with them there, "
                               "even with every block recomputed and activations offloaded, and then the fewest blocks "
                               "that make it fit. CUDA (true is refused on a CPU device, where the weights are in CPU "
                               "memory already); with --gpus N each process pins its own copy", ["auto", "true", "false"],
                               group="optimization")
    memory_budget: str = opt("off", "memory the run may use on its device: off (the flags above decide), auto (the "
                             "device's free memory minus 5%%) or a size like 24GiB; the run then keeps the activations "
                             "of the blocks that fit (no recompute) and, in others, their MLP gate/up outputs (a "
                             "cheaper recompute), offloads block inputs, pages optimizer state and streams block "
                             "weights only as needed, within this machine's free CPU memory too (qlora plan's "
                             "estimate; the choice is printed)", group="optimization",
                             metavar="off|auto|SIZE")
    cuda_graphs: bool = opt(True, "on CUDA, replay each micro-batch's forward+backward from a CUDA graph (far fewer "
                            "host launches): packed rows are padded to --max-length, other batches to one of a few "
                            "bucket lengths (a graph each, one memory pool); needs one process, bf16, no "
                            "--offload-embeddings, no streamed weights, and --packing with --offload-activations; otherwise (or with "
                            "false) steps run eagerly", group="optimization")
    cache_dequant: str = opt("auto", "keep dequantized base weights in memory during training (same math, "
                             "+2 bytes/param; auto: on for CPU, off for GPU)", ["auto", "on", "off"], group="optimization")
    seed: int = opt(42, "random seed (LoRA init, dropout, data order)", group="optimization")
    # run
    output: str | None = opt(None, "output directory", group="run", metavar="DIR")
    eval_every: int = opt(0, "evaluate every N steps (0: at the end of each epoch and of the run, when there is "
                          "validation data)", group="run")
    eval_samples: int = opt(64, "validation records (with a reference answer) answered greedily at each evaluation "
                            "for exact_match/contains (0: loss only)", group="run")
    eval_max_new_tokens: int = opt(48, "most tokens per greedy answer at an evaluation and in the before/after "
                                   "comparison", group="run")
    compare_prompts: int = opt(4, "validation prompts answered before and after training, printed side by side "
                               "and kept in OUT/answers.json (0: none)", group="run")
    early_stop: int = opt(0, "stop after N evaluations without a better validation loss and keep the best adapter "
                          "as OUT/adapter (0: off)", group="run")
    save_every: int = opt(100, "checkpoint every N steps (0: only at the end)", group="run")
    keep_last: int = opt(3, "checkpoints to keep", group="run")
    log_every: int = opt(1, "write metrics every N steps", group="run")
    device: str = opt("auto", "cpu, cuda, cuda:N or auto", group="run")
    parallel: str = opt("auto", "with several processes (--gpus N / torchrun): ddp = every GPU holds the 4-bit model, "
                        "LoRA gradients all-reduced during backward; fsdp = FSDP2 shards the 4-bit base, LoRA and "
                        "optimizer state across GPUs (models too big for one); auto = ddp",
                        ["auto", "ddp", "fsdp"], group="run")
    resume: bool = opt(False, "continue from the newest good checkpoint in --output", group="run")
    overwrite: bool = opt(False, "replace a previous run in --output", group="run")
    progress: bool = opt(True, "show a progress bar", group="run")
    report_to: str = opt("none", "also send the metrics and the run config to these trackers (comma list): none, "
                         "tensorboard (OUT/tb), wandb (OUT/wandb), mlflow (MLFLOW_TRACKING_URI, else OUT/mlruns)",
                         group="run", metavar="LIST")


# ---------------------------------------------------------------------------------------------
# schedule, checkpoints


def lr_factor(step: int, total: int, warmup: int, schedule: str) -> float:
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    frac = (step - warmup) / max(1, total - warmup)
    if schedule == "linear":
        return max(0.0, 1.0 - frac)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, frac)))


# ---------------------------------------------------------------------------------------------
# the run


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.3g} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024


def _check_fsdp(cfg: TrainConfig) -> None:
    bad = [("8bit" in cfg.optim, f"--optim {cfg.optim}"),
           (cfg.cache_dequant == "on", "--cache-dequant on"), (cfg.offload_weights == "true", "--offload-weights true"),
           (cfg.dora, "--dora"), (cfg.init != "gaussian", f"--init {cfg.init}")]
    for cond, what in bad:
        if cond:
            raise QLoraError(f"--parallel fsdp does not support {what} (use --optim adamw or paged_adamw, "
                             "--cache-dequant off, --init gaussian, no --dora; FSDP2 shards the weights instead "
                             "of streaming them)")


def _check_host_memory(host: dict, processes: int) -> None:
    """What the run keeps in CPU memory (the plan's ``host`` parts: page-locked activations and streamed weights,
    paged-out optimizer state, an input embedding table), one copy per process of this machine: where that is more
    than the memory available, one line now rather than the system's out-of-memory killer (or a failed page-lock)
    mid-run."""
    from .budget import host_available
    from .plan import host_parts
    need, have = sum(host.values()) * processes, host_available()
    if need > have:
        per = f", each of {processes} processes" if processes > 1 else ""
        raise QLoraError(f"the run needs {need / 2**30:.1f} GiB of CPU memory ({host_parts(host)}{per}) but "
                         f"{have / 2**30:.1f} GiB is available; free memory, use fewer processes or a shorter "
                         f"--max-length, or give --memory-budget (it offloads only what must leave the GPU)")


def _step_with_retry(run_step, optimizer, device, log):
    """Run a step's forward/backward passes. On a CUDA out-of-memory (a long batch, a spike): drop the
    partial gradients, move every optimizer page to CPU memory, free the cache and run the step
    once more; a second failure explains what to change."""
    for attempt in (0, 1):
        try:
            return run_step()
        except torch.cuda.OutOfMemoryError:
            if attempt or device.type != "cuda":
                raise QLoraError("out of GPU memory: use a smaller --batch-size (with more --grad-accum), a shorter "
                                 "--max-length, --offload-activations, or --optim paged_adamw8bit; `qlora plan` "
                                 "predicts the peak") from None
            optimizer.zero_grad(set_to_none=True)
            if hasattr(optimizer, "evict_all"):
                optimizer.evict_all()
            torch.cuda.empty_cache()
            log("out of GPU memory in this step: moved the optimizer state to CPU memory, running the step again")


def _shared_prompt_note(cfg, device, stats: dict, model=None) -> str:
    """The data line's note on --share-prompt (pairs only): how many of the pairs' tokens it runs once."""
    from .shared_prefix import MIN_SAVED, wanted
    shared = stats.get("shared_prompt_tokens")
    if shared is None or not stats.get("tokens"):
        return ""
    if not wanted(cfg.share_prompt, device, model):
        why = " (auto: off on CUDA without sdpa's pair attention)" if cfg.share_prompt == "auto" else ""
        return f"; --share-prompt {cfg.share_prompt}: every sequence runs whole{why}"
    return (f"; shared prompts: {shared} of {stats['tokens']} tokens ({shared / stats['tokens']:.0%}) run once per pair "
            f"(a batch saving under {MIN_SAVED:.1%} runs whole)")


class MicroStep:
    """``step(batch, scale) -> detached loss``: forward and backward of one micro-batch, the loss sum
    times ``scale`` (1 / the step's trained tokens; a 0-dim device tensor when a CUDA graph captures
    it), under activation offload (``off``, if any), the LoRA casts and the batch's dropout key. The one
    micro-step of a run: the eager loop calls it, and :class:`~qlora.cuda_graphs.GraphedMicroStep` runs
    it eagerly and captures it (``static_shapes``: no shape depends on the data; a batch without mask
    or positions then runs SDPA's causal kernel, see cuda_graphs.causal_attention).

    ``forward(batch, static_shapes) -> (loss sum, metrics)`` is the method's loss through the parallel
    wrapper (:meth:`qlora.parallel.Parallel.forward`); ``sync(last)``: the wrapper's gradient-sync
    context; ``grad_scale`` and ``scaler`` (fp16 loss scaling) apply to the backward only."""

    def __init__(self, model, forward, off=None, casts=None, static_shapes: bool = False, sync=None,
                 grad_scale: float = 1.0, scaler=None):
        self.model, self.forward, self.off, self.static_shapes = model, forward, off, static_shapes
        self.casts = casts if casts is not None else contextlib.nullcontext()
        self.sync = sync or (lambda last: contextlib.nullcontext())
        self.grad_scale, self.scaler = grad_scale, scaler
        self.metrics: dict = {}  # the last call's (eager calls only: a graph replay runs no Python)

    def __call__(self, b: dict, scale, last: bool = True) -> torch.Tensor:
        from .cuda_graphs import causal_attention
        from .linear import keyed_dropout
        off = self.off
        if off is not None:
            off.begin_step()
        with (off.hooks() if off is not None else contextlib.nullcontext()), self.sync(last), self.casts, \
                keyed_dropout(self.model, b.get("dropout_key")), \
                causal_attention(self.model, enabled=self.static_shapes and "attention_mask" not in b
                                 and "position_ids" not in b):
            total, self.metrics = self.forward(b, self.static_shapes)
            loss = total * scale
            scaled = loss * self.grad_scale if self.grad_scale != 1.0 else loss
            (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
        return loss.detach()


def micro_step_fn(model, device, off, casts, static_shapes: bool = True, method=None) -> MicroStep:
    """The :class:`MicroStep` of ``model`` alone (one process, no loss scaling) with ``method``'s loss
    (default SFT), for callers outside a run (bench/train_speed.py)."""
    from .methods import SFT
    method = method if method is not None else SFT()
    return MicroStep(model, lambda b, static: method.loss(model, b, device, static), off, casts,
                     static_shapes=static_shapes)


def _graphed(cfg: TrainConfig, par, device, step: MicroStep, params, off, scaler, log, keyed: bool,
             refused: str | None = None):
    """``step`` as a :class:`~qlora.cuda_graphs.GraphedMicroStep` when ``--cuda-graphs`` and the run
    allows one (see cuda_graphs.supported; ``keyed``: LoRA dropout draws keyed masks; ``refused``: why the
    training method's steps cannot be graphed, if so), else None (eager)."""
    if not cfg.cuda_graphs or device.type != "cuda":
        return None
    if refused:
        log(f"CUDA graphs not used: {refused} (--method {cfg.method})")
        return None
    from .cuda_graphs import GraphedMicroStep, bucket_count, supported
    ok, why = supported(device, parallel=par.mode != "none", host_embeddings=cfg.offload_embeddings,
                        dropout=cfg.dropout, checkpointing=cfg.grad_checkpointing, keyed_dropout=keyed,
                        streamed_weights=cfg.offload_weights == "true")
    if ok and scaler is not None:
        ok, why = False, "fp16 loss scaling"
    if ok and not cfg.packing and off is not None:  # the offloader's pinned buffers are sized for one shape
        ok, why = False, "batches vary in shape (without --packing) and --offload-activations keeps one shape"
    if not ok:
        hint = {"dropout": "; --dropout 0 allows them", "packing": "; --packing allows them"}
        hint = next((h for k, h in hint.items() if k in why), "")
        log(f"CUDA graphs not used: {why}{hint}")
        return None
    # the train loop pads every packed batch to one shape (--max-length rows), and every length-grouped batch
    # to one of a few bucket lengths (cuda_graphs.bucket_length), one graph each
    graphs = 1 if cfg.packing else bucket_count(cfg.max_length) + 1  # + full rows without a mask
    step.static_shapes = True
    return GraphedMicroStep(step, params, device, log=log, accumulate=cfg.grad_accum > 1 or graphs > 1,
                            max_graphs=graphs)

def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError):
        raise QLoraError(f"--device {name!r}: use cpu, cuda, cuda:N or auto") from None
    if dev.type not in ("cpu", "cuda"):
        raise QLoraError(f"--device {name!r}: qlora trains on cpu or cuda (cuda:N); use auto to pick")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise QLoraError(f"--device {name}: CUDA is not available on this machine")
    return dev


def _prepare_output(cfg: TrainConfig, held: contextlib.ExitStack):
    """Check --output and lock it for the life of the run (``held`` releases the lock); --overwrite
    removes the previous run only at :meth:`~qlora.outdir.RunDir.clear`, once every check has passed.
    With --resume, the newest checkpoint's adapter is checked against the model's config first."""
    from .outdir import prepare_run_dir
    run_dir = prepare_run_dir(cfg.output, cfg.resume, cfg.overwrite)
    held.callback(run_dir.lock.release)
    if cfg.resume:
        from .adapters import check_resume_fits
        check_resume_fits(run_dir.path / "checkpoints", cfg.model, cfg.rank)
    return run_dir


PLOT_EVERY_S = 30.0


# matplotlib draws loss.png only: an optional extra, so a lighter install still trains (without the plot)
NO_PLOT = "loss.png skipped: matplotlib is not installed (pip install 'qlora[plot]'); metrics.jsonl has the numbers"


def _plot(path: Path, rows: list[dict]) -> bool:
    """Draw the loss curves into ``path`` (atomically); False when matplotlib is missing."""
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    tr = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    ev = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    if tr:
        ax.plot(*zip(*tr), label="train loss")
    if ev:
        ax.plot(*zip(*ev), "o-", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left")
    acc = [(r["step"], r["rewards/accuracies"]) for r in rows if "rewards/accuracies" in r]
    if acc:  # preference tuning: how often the chosen answer wins, on a second axis
        ax2 = ax.twinx()
        ax2.plot(*zip(*acc), color="tab:green", alpha=0.6, label="preference accuracy")
        ax2.set_ylim(0, 1.05)
        ax2.set_ylabel("accuracy")
        ax2.legend(loc="upper right")
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
    return True


def check_config(cfg: TrainConfig) -> None:
    """Reject settings that cannot train (or would train wrongly) before anything slow happens: each
    message names the flag. ``train`` calls it first; the data file is read next, also before the model
    loads, so a typo costs seconds, not a model load."""
    from .nf4 import check_blocksize
    from .optim import check_hparams

    def number(v) -> bool:  # finite
        return is_number(v) and math.isfinite(v)

    def need(ok: bool, flag: str, what: str, v) -> None:
        if not ok:
            raise QLoraError(f"--{flag} must be {what}, got {v!r}")

    if not cfg.data:
        raise QLoraError("--data FILE is required")
    for name in ("batch_size", "grad_accum", "max_length", "log_every", "keep_last", "rank"):
        v = getattr(cfg, name)
        need(is_int(v) and v >= 1, name.replace("_", "-"), "an integer >= 1", v)
    for name in ("eval_every", "save_every"):
        v = getattr(cfg, name)
        need(is_int(v) and v >= 0, name.replace("_", "-"), "an integer >= 0 (0: only at the end)", v)
    need(cfg.max_steps is None or (is_int(cfg.max_steps) and cfg.max_steps >= 1),
         "max-steps", "an integer >= 1 (leave it out to train for --epochs)", cfg.max_steps)
    if cfg.max_steps is None:  # (ignored otherwise)
        need(number(cfg.epochs) and cfg.epochs > 0, "epochs", "a number > 0", cfg.epochs)
    need(number(cfg.alpha) and cfg.alpha > 0, "alpha", "a number > 0", cfg.alpha)
    need(number(cfg.dropout) and 0 <= cfg.dropout < 1, "dropout", "in [0, 1)", cfg.dropout)
    need(number(cfg.warmup_ratio) and 0 <= cfg.warmup_ratio < 1, "warmup-ratio", "in [0, 1)", cfg.warmup_ratio)
    from .validation import check as check_validation
    check_validation(cfg)  # --val-split, --eval-samples, --compare-prompts, --early-stop
    need(is_number(cfg.max_grad_norm) and cfg.max_grad_norm >= 0, "max-grad-norm", "a number >= 0 (0: no clipping)", cfg.max_grad_norm)
    _check_method(cfg, need, number)
    _check_variants(cfg, need, number)
    need(cfg.offload_weights in ("auto", "true", "false"), "offload-weights", "one of auto, true, false",
         cfg.offload_weights)
    _device(cfg.device)  # a name torch does not know, or CUDA asked for without one
    from .budget import parse_budget
    parse_budget(cfg.memory_budget)
    if (cfg.model or "").startswith("shape:"):
        from .plan import shape_config
        shape_config(cfg.model[6:])  # an unknown name fails here
        if not cfg.tokenizer_from:
            raise QLoraError("--model shape:NAME builds random weights and has no tokenizer: add --tokenizer-from SRC "
                             "(a model directory or GGUF file whose tokenizer to use)")
    elif cfg.model and not Path(hub.local(cfg.model)).expanduser().exists():  # an id: its snapshot, fetched now
        raise QLoraError(f"--model {cfg.model}: no such file or directory")
    from .trackers import check as check_trackers
    check_trackers(cfg.report_to)  # a tracker asked for but not installed: one line before the model loads
    from .pretrain import check_stride
    check_stride(cfg.stride, cfg.max_length)
    if cfg.tokenizer_from and not Path(hub.local(cfg.tokenizer_from)).exists():
        raise QLoraError(f"--tokenizer-from {cfg.tokenizer_from}: no such file or directory")
    try:
        check_hparams(cfg.lr, (0.9, 0.999), 1e-8, cfg.weight_decay, None)
        if cfg.quant_type != "none":
            check_blocksize(cfg.blocksize)
    except ValueError as e:  # nf4's message, worded for its Python callers
        raise QLoraError(f"--blocksize: {e}") from None


def _check_method(cfg: TrainConfig, need, number) -> None:
    """``--method`` and the settings that go with it (or not)."""
    need(cfg.method in ("sft", "dpo", "orpo"), "method", "one of sft, dpo, orpo", cfg.method)
    need(number(cfg.beta) and cfg.beta > 0, "beta", "a finite number > 0", cfg.beta)
    need(cfg.loss in ("sigmoid", "ipo"), "loss", "one of sigmoid, ipo", cfg.loss)
    need(number(cfg.sft_weight) and cfg.sft_weight >= 0, "sft-weight", "a finite number >= 0", cfg.sft_weight)
    if cfg.sft_weight and cfg.method != "dpo":
        raise QLoraError(f"--sft-weight {cfg.sft_weight} adds an NLL term to DPO: use it with --method dpo "
                         f"(ORPO has its own; SFT is all NLL)")
    if cfg.loss != "sigmoid" and cfg.method != "dpo":
        raise QLoraError(f"--loss {cfg.loss} is a DPO loss: use it with --method dpo")
    if cfg.precompute_ref and cfg.method != "dpo":
        raise QLoraError("--precompute-ref applies to --method dpo (only DPO has a reference model)")
    if cfg.method == "sft":
        return
    for on, flag, why in ((cfg.packing, "--packing", "the two answers of a pair are batched side by side"),
                          (cfg.train_on_prompt, "--train-on-prompt", "the loss compares the answers only"),
                          (cfg.format, "--format", "preference records are read by their fields")):
        if on:
            raise QLoraError(f"{flag} does not apply to --method {cfg.method}: {why}")


REF_NAME = "ref_logps.safetensors"  # --precompute-ref's reference log-probs, in the run's folder


def _check_variants(cfg: TrainConfig, need, number) -> None:
    """--init, --loftq-iters, --dora, --lora-plus-ratio (qlora.variants)."""
    from .variants import INITS
    need(cfg.init in INITS, "init", f"one of {', '.join(INITS)}", cfg.init)
    need(is_int(cfg.loftq_iters) and cfg.loftq_iters >= 1, "loftq-iters", "an integer >= 1", cfg.loftq_iters)
    need(isinstance(cfg.dora, bool), "dora", "true or false", cfg.dora)
    need(number(cfg.lora_plus_ratio) and cfg.lora_plus_ratio >= 0, "lora-plus-ratio", "a number >= 0 (0: off)",
         cfg.lora_plus_ratio)
    if cfg.init == "loftq" and cfg.quant_type == "none":
        raise QLoraError("--init loftq corrects the 4-bit quantization error: it needs --quant-type nf4 (or fp4, "
                         "int4), not none")


class Run:
    """One training run: :meth:`setup` (output folder, model, data, optimizer, resume), :meth:`fit` (the
    steps, evaluating and checkpointing as configured), :meth:`finish` (final evaluation, checkpoint and
    adapter; the summary). :func:`train` runs the three. ``method`` (qlora.methods, default SFT) is what
    is learned: its examples, batches, token count and loss."""

    def __init__(self, cfg: TrainConfig, log=print, model=None, tokenizer=None, method=None,
                 held: contextlib.ExitStack | None = None):
        self.cfg, self.log, self.model, self.tok = cfg, log, model, tokenizer
        self.holds = held if held is not None else contextlib.ExitStack()  # what the run holds until train returns
        self.method = method  # chosen from cfg.method in setup, once the settings are checked
        self.t_start = time.time()
        self.step, self.rows, self.epochs = 0, [], {}
        self.tokens_seen, self.last_loss, self.last_eval, self.ck_path = 0, float("nan"), None, None
        self.eval_metrics: dict = {}
        self.stop = {"signal": None}
        self.stream, self.streamer = False, None  # --offload-weights (decided in setup)
        self.stream_only = None  # with stream: the blocks that stream (None: all)
        self.stream_count = True  # with stream: how many blocks stream (True: all)
        self.given_streamed = None  # a model given to the run streamed already: how many of its blocks

    # -- setup ---------------------------------------------------------------------------------------

    def setup(self) -> None:
        """Everything before the first step; settings and data files are checked before the model loads."""
        from .distributed import Dist
        from .methods import method_for
        from .optim import check_offload
        cfg = self.cfg
        check_config(cfg)  # before the model loads, as are the optimizer check and the data files below
        check_offload(cfg.optim, cfg.offload_optimizer)
        if self.method is None:
            self.method = method_for(cfg)
        self.records = self._read_data()
        self.dist = Dist.from_env(cfg.device)
        if not self.dist.main:
            self.log = lambda m: None  # noqa: E731  (rank 0 speaks for all)
        self._setup_output()
        self._setup_budget()
        self._setup_model()
        self._setup_data()
        self._setup_optimizer()
        if self.dist.main:  # every check has passed: only now may --overwrite remove the previous run
            self.run_dir.clear()
            (self.out / "config.yaml").write_text(to_yaml(self.cfg))
            from .validation import save_setup
            save_setup(self.out, len(self.records[0]), self.held, self.cfg.val_split, self.data_stats)
            if cfg.init != "gaussian" and not (cfg.resume and (self.out / BASE_FILE).is_file()):
                from .variants import save_base
                save_base(self.model, self.out / BASE_FILE)
        if cfg.init != "gaussian":
            self.model.qlora_base_file = self.out / BASE_FILE
        if cfg.precompute_ref:
            self._setup_reference()
        if cfg.resume:
            self._resume()

    def _read_data(self):
        """The training and validation files, read and checked by the method (before the model loads)."""
        from .methods import SFT
        cfg = self.cfg
        read = getattr(self.method, "read", None) or SFT().read  # a method without its own reads SFT records
        records, fmt = read(cfg.data, cfg)
        val = read(cfg.val_data, cfg) if cfg.val_data else None
        from .fitcheck import check_early_stop
        check_early_stop(cfg, len(records), val is not None)
        return records, fmt, val

    def _setup_output(self) -> None:
        from .model import LoraSettings, QuantSettings
        from .parallel import Parallel
        cfg, dist = self.cfg, self.dist
        self.run_dir = _prepare_output(cfg, self.holds) if dist.main else None  # rank 0 checks and locks the folder
        self.out = self.run_dir.path if self.run_dir else Path(cfg.output)
        dist.barrier()
        self.device = _device(dist.device(cfg.device))
        self._resolve_compute()
        cfg = self.cfg
        self.par = Parallel(dist, cfg.parallel, self.device)
        if self.par.sharded:
            _check_fsdp(cfg)
            if self.model is not None:
                raise QLoraError("--parallel fsdp loads the model itself (shards it as it loads): pass no model object")
        torch.manual_seed(cfg.seed)
        self.quant = QuantSettings(None if cfg.quant_type == "none" else cfg.quant_type, cfg.blocksize,
                                   cfg.double_quant, cfg.compute_dtype)
        # --resume with LoftQ/PiSSA: the stored base replaces the SVDs (see _setup_model)
        init = "gaussian" if cfg.resume and (self.out / BASE_FILE).is_file() else cfg.init
        self.lora = LoraSettings(cfg.rank, cfg.alpha, cfg.dropout, cfg.target, cfg.rslora, init, cfg.loftq_iters,
                                 cfg.dora)

    def _resolve_compute(self) -> None:
        """``--compute-dtype auto`` resolved for the device (qlora.hardware); the resolved value is what
        config.yaml records. The header says which dtype and kernels run, and why."""
        compute = resolve(self.cfg.compute_dtype, self.device)
        self.cfg = dataclasses.replace(self.cfg, compute_dtype=compute.dtype)
        self.log(compute.header())
        if compute.warning:
            self.log(f"warning: {compute.warning}")
        if self.device.type == "cuda":
            from .kernels import describe
            self.log(describe(self.device))

    def _setup_budget(self) -> None:
        """--memory-budget: the policy (blocks kept without recompute, offload, optimizer paging, weight streaming)
        chosen from the model's config before the model loads; a budget nothing fits is one line here. Then
        --offload-weights (:meth:`_setup_weights`)."""
        from .budget import for_train
        self._stream_allowed()
        self.policy = for_train(self.cfg, self.device, self.model.config if self.model is not None else None,
                                streamed=self.given_streamed, agree=self.dist.min)
        if self.policy is not None:
            self.log(self.policy.describe())
        self._setup_weights()
        self._check_host()

    def _check_host(self) -> None:
        """Without a budget (whose policy fits CPU memory itself): what the plan says the run keeps in CPU memory
        (:func:`_check_host_memory`; on the CPU only streamed weights count: there the rest is where it would be
        anyway). A model the plan does not know is not checked."""
        cfg, cuda = self.cfg, self.device.type == "cuda"
        if self.policy is not None or not (cuda or self.stream):
            return
        from .budget import card_memory
        from .plan import estimate, model_config, plan_kwargs, rows_per_micro_batch
        try:
            config = self.model.config if self.model is not None else model_config(cfg.model)
            kw = plan_kwargs(cfg)
            if self.stream:
                kw["offload_weights"] = self.stream_count
            est = estimate(config, cfg.max_length, rows_per_micro_batch(cfg),
                           gpu_mem=card_memory(self.device) if cuda else None, **kw)
        except (QLoraError, KeyError, AttributeError, TypeError, ValueError, OSError):
            return
        from .budget import local_processes
        _check_host_memory(est["host"] if cuda else {"weights": est["host"]["weights"]}, local_processes())

    def _stream_allowed(self) -> None:
        """--offload-weights where streaming cannot run: true is one line, auto turns into false; a model given to
        the run whose weights are streamed already (qlora.stream) makes it true."""
        cfg = self.cfg
        from .stream import streamer_of
        if self.model is not None and streamer_of(self.model) is not None:
            if cfg.offload_weights == "false":
                raise QLoraError("--offload-weights false: the model given to the run streams its weights already")
            self.cfg = cfg = dataclasses.replace(cfg, offload_weights="true")
            self.given_streamed = len(streamer_of(self.model).blocks)  # (its streamed blocks are fixed)
        if cfg.offload_weights == "false":
            return
        why = None
        if self.device.type != "cuda" and not switches().stream_cpu:
            why = (f"the run is on {self.device}, where the weights are in CPU memory already (it streams them into "
                   "a GPU)")
        elif self.par.sharded:
            why = "--parallel fsdp shards the weights instead"
        elif cfg.init != "gaussian":
            why = (f"--init {cfg.init} keeps the corrected base it writes to {BASE_FILE} in the model, which "
                   "streaming moves to CPU buffers (use --init gaussian)")
        elif cfg.cache_dequant == "on":
            why = "--cache-dequant on keeps a 16-bit copy of every weight on the device"
        if why is None:
            return
        if cfg.offload_weights == "true":
            raise QLoraError(f"--offload-weights true: {why}")
        self.cfg = dataclasses.replace(cfg, offload_weights="false")

    def _setup_weights(self) -> None:
        """--offload-weights (qlora.stream), decided before the model loads (the build then moves each block's
        weights to pinned CPU memory as soon as the block is complete): the budget's policy decides under
        --memory-budget; ``auto`` streams when the plan says the run does not fit this GPU otherwise, even with
        every block recomputed and the block inputs offloaded. The choice is resolved in the config (config.yaml
        records true or false) and said in the header on a GPU; streaming turns gradient checkpointing on."""
        cfg, value = self.cfg, self.cfg.offload_weights
        config = self.model.config if self.model is not None else None
        reason = ""
        if self.policy is not None:
            stream = self.policy.stream
            reason = "the memory budget's policy"
        elif value == "auto" and self.device.type == "cuda":
            from .budget import card_memory, stream_needed
            from .plan import model_config, required_bytes
            try:
                config = config if config is not None else model_config(cfg.model)
                gpu = card_memory(self.device)
                stream, est = stream_needed(cfg, config, gpu)
                need = required_bytes(est)
            except (QLoraError, KeyError, AttributeError, TypeError, ValueError, OSError):  # a model the plan
                stream, need, gpu = False, None, None  # does not know: its weights stay on the GPU
            if need is not None:
                reason = (f"auto: with them on the GPU the run needs {need / 2**30:.1f} GiB even with every block "
                          f"recomputed and the block inputs offloaded; the GPU has {gpu / 2**30:.1f} GiB"
                          if stream else "auto: the run fits with them on the GPU")
        else:
            stream = self.given_streamed or value == "true"
        self.stream = bool(stream)
        self.cfg = dataclasses.replace(cfg, offload_weights="true" if stream else "false",
                                       grad_checkpointing=cfg.grad_checkpointing or bool(stream))
        if stream and not cfg.grad_checkpointing:
            self.log("--offload-weights: gradient checkpointing on (a streamed block is recomputed in backward)")
        if not stream:
            if reason and self.device.type == "cuda":  # (on a CPU there is nowhere else for them)
                self.log(f"weights: on the GPU ({reason})")
            return
        from .plan import STREAM_SLOTS, streamed_blocks
        try:
            from .plan import counts_for, model_config, plan_kwargs
            c = counts_for(config if config is not None else model_config(cfg.model), **plan_kwargs(self.cfg))
        except (QLoraError, KeyError, AttributeError, TypeError, ValueError, OSError):
            c = None
        if c is None:  # a model the plan does not know: every block streams
            sizes = f"they wait in pinned CPU memory, {STREAM_SLOTS} blocks at a time on the device"
        else:
            n = c["layers"] if stream is True else min(int(stream), c["layers"])
            self.stream_count = n
            self.stream_only = None if n == c["layers"] else streamed_blocks(c["layers"], n)
            which = f"the {n} blocks'" if self.stream_only is None else f"{n} of the {c['layers']} blocks'"
            sizes = (f"{which} {c['blocks_bytes'] * n / c['layers'] / 2**30:.2f} GiB wait in pinned CPU memory, "
                     f"{STREAM_SLOTS} slots of {c['largest_block'] / 2**20:.1f} MiB on the device take them in turn")
        self.log(f"weights: streamed from CPU memory ({reason or '--offload-weights true'}): {sizes}; each streamed "
                 f"block is recomputed in backward, and each step copies it about twice")

    def _card_pages(self) -> int | None:
        """The paged optimizer's GPU share the plan leaves on this card (budget.plan_page_budget), on one CUDA
        device without --memory-budget; None elsewhere, or where the plan cannot model the run."""
        if self.device.type != "cuda" or self.par.sharded or self.dist.world > 1:
            return None
        from .budget import card_memory, plan_page_budget
        try:
            pages = plan_page_budget(self.cfg, self.model.config, card_memory(self.device))
        except (QLoraError, KeyError, AttributeError, TypeError, ValueError):  # a model the plan does not know:
            # the pager decides, as before there was this plan
            return None
        if pages is not None:
            self.log(f"optimizer: {_human(pages)} of its state stays on the GPU, the rest waits in CPU memory "
                     f"(what the plan leaves beside the step's peak on this card)")
        return pages

    def _setup_model(self) -> None:
        """Load (or build, for shape:NAME) the 4-bit model with LoRA, unless one was given; attention,
        embedding offload."""
        from .model import load_model
        cfg, device, main = self.cfg, self.device, self.dist.main
        dtype = cfg.compute_dtype
        shape, given = (cfg.model or "").startswith("shape:"), self.model is not None
        self.streamer = None
        if self.stream:  # (the build moves each block's weights to CPU memory as soon as it is complete)
            from .stream import WeightStreamer
            self.streamer = WeightStreamer(include_cpu=device.type == "cpu", only=self.stream_only)
        if self.model is None and device.type == "cuda" and not shape and self.policy is None:
            from .plan import check_train_config
            try:
                warning = check_train_config(cfg)
            except QLoraError:
                warning = None
            if warning:
                self.log(f"warning: {warning}")
        if self.model is None and shape:
            from .model import build_random
            from .plan import shape_config
            self.model = build_random(shape_config(cfg.model[6:]), self.quant, self.lora, device, dtype, cfg.seed,
                                      progress=cfg.progress and main, on_block=self.par.block_hook(),
                                      stream=self.streamer)
            self.tok = self._tokenizer_from(cfg.tokenizer_from) if cfg.tokenizer_from else None
        elif self.model is None:
            self.model, self.tok = load_model(cfg.model, self.quant, self.lora, device, dtype, cfg.seed,
                                              progress=cfg.progress and main, on_block=self.par.block_hook(),
                                              stream=self.streamer)  # one process's bars (each rank loads the same)
        elif self.streamer is not None:  # a model given to train: its blocks' weights leave the device now
            from .stream import streamer_of
            installed = streamer_of(self.model)  # (or they left as it was built)
            self.streamer = installed if installed is not None else self.streamer.install(self.model)
        model = self.model
        if switches().tile_all and not given:
            from .tiled import FORCED_ROWS
            self.log(f"QLORA_TILE_ALL: every MLP call runs tiled, {FORCED_ROWS} tokens a chunk")
        self._variant_base()
        attn = cfg.attention if cfg.attention != "auto" else (
            "eager" if device.type == "cpu" and cfg.max_length <= 512 else "sdpa")
        if hasattr(model, "set_attn_implementation") and attention_implementation(model.config) not in (attn, None):
            model.set_attn_implementation(attn)
        if cfg.offload_embeddings:
            from .offload import offload_embeddings
            offload_embeddings(model)
        if self.tok is None:
            raise QLoraError("the model has no tokenizer")

    def _variant_base(self) -> None:
        """LoftQ/PiSSA: the model's base is the corrected one; a resumed run reads it back from
        OUT/qlora_base.safetensors (an SVD is not bit-reproducible everywhere). Adapters saved from now on
        carry the file (``model.qlora_base_file``, set in :meth:`setup` once it is written)."""
        from .variants import load_base
        path = self.out / BASE_FILE
        if self.cfg.init != "gaussian" and self.cfg.resume and path.is_file():
            load_base(self.model, path)  # (A, B and a DoRA magnitude come from the checkpoint)
        self.model.qlora_init = {"init": self.cfg.init, "loftq_iters": self.cfg.loftq_iters, "dora": self.cfg.dora}

    @staticmethod
    def _tokenizer_from(src: str):
        from transformers import AutoTokenizer

        from .sources import open_source
        p = Path(hub.local(src))
        return (open_source(p).load_tokenizer() if p.suffix == ".gguf" or (p / "config.json").is_file()
                else AutoTokenizer.from_pretrained(str(p)))

    def _setup_data(self) -> None:
        """Hold out validation records (qlora/validation.py), tokenize (by the method), batch; the step count
        and warmup follow."""
        from . import validation
        cfg, tok = self.cfg, self.tok
        records, data_fmt, val_records = self.records
        from .data import pad_id
        self.pad_id = pad_id(tok)
        if val_records is not None:
            (val_recs, val_fmt), self.held = val_records, None
        else:
            records, val_recs, self.held = validation.split_records(records, cfg.val_split, cfg.seed, self.out,
                                                                    cfg.resume)
            val_fmt = data_fmt
        examples, stats = self.method.examples(records, data_fmt, tok, cfg)
        val = self.method.examples(val_recs, val_fmt, tok, cfg)[0] if val_recs else []
        self.data_stats = dict({"examples": len(examples)}, **stats, format=data_fmt,
                               lengths=validation.lengths(examples), validation=len(val))
        self.log(f"data: {self.data_stats['examples']} training examples ({data_fmt}, {stats['trained_tokens']} "
                 "trained tokens), "
                 f"{stats['truncated']} truncated to {cfg.max_length}, {stats['dropped']} dropped; "
                 + validation.describe(validation.parse_split(cfg.val_split), len(self.records[0]), len(val),
                                       cfg.val_data)
                 + (f"; {stats['documents']} documents, {stats['tokens']} tokens in {stats['windows']} "
                    f"{'rows' if cfg.packing else 'windows'} of up to {cfg.max_length}" if "windows" in stats else "")
                 + _shared_prompt_note(cfg, self.device, stats, self.model))
        from .fitcheck import Watch
        self.watch = Watch(cfg, self.out, self.log, self.dist.main)  # fit warnings, early stop
        self.validator = validation.Validator(cfg, val_recs, val_fmt, sft=self.method.name == "sft"
                                              and not self.par.sharded) if val_recs else None
        if self.stream and self.validator is not None and (cfg.eval_samples or cfg.compare_prompts):
            self.log("note: with streamed weights, greedy answers (--eval-samples, --compare-prompts) copy every block "
                     "for every token they generate: slow for a large model (0 skips them)")
        self.batches = self.method.batches(examples, cfg, self.pad_id, train=True)
        self.val_batches = list(self.method.batches(val, cfg, self.pad_id, train=False).epoch(0)) if val else []
        micro_per_step = cfg.grad_accum * self.dist.world  # global micro-batches per optimizer step
        self.per_epoch = max(1, len(self.batches) // micro_per_step)
        self.total = cfg.max_steps or max(1, math.ceil(cfg.epochs * len(self.batches) / micro_per_step))
        self.warmup = math.ceil(cfg.warmup_ratio * self.total)

    def _setup_optimizer(self) -> None:
        """Checkpointing (and activation offload), the parallel wrapper, optimizer and loss scaler."""
        from .optim import lora_plus_groups, make_optimizer
        cfg, model, par = self.cfg, self.model, self.par
        self.off, policy = None, self.policy
        if policy is not None:  # the budget's choice (it honours --grad-checkpointing false and the offload flags)
            from .offload import enable_checkpointing
            self.off = enable_checkpointing(model, offload=policy.offload, keep=policy.keep_indices,
                                            keep_gemms=policy.gemm_indices)
        elif cfg.grad_checkpointing:
            from .offload import enable_checkpointing
            self.off = enable_checkpointing(model, offload=cfg.offload_activations)
        elif cfg.offload_activations:
            raise QLoraError("--offload-activations needs gradient checkpointing")
        model.train()
        par.wrap(model, self.method)
        self.params = par.optimizer_params()
        names = [n for n, p in model.named_parameters() if p.requires_grad]
        pages = policy.page_budget if policy is not None else (0 if cfg.offload_optimizer else self._card_pages())
        groups = lora_plus_groups(names, self.params, cfg.lr, cfg.lora_plus_ratio)
        self.optimizer = make_optimizer(groups, cfg.optim, cfg.lr, weight_decay=cfg.weight_decay,
                                        page_budget_bytes=pages)
        self.scaler = torch.amp.GradScaler(self.device.type) if cfg.compute_dtype == "fp16" else None
        n_trainable = sum(p.numel() for p in par.params)
        if par.sharded:
            here, whole = par.local_bytes()
            self.log(f"fsdp: this process holds {_human(here)} of the model's {_human(whole)}")
        self.log(f"model: {cfg.model or 'embedded SmolLM2-135M-Instruct'} on {self.device}, "
                 f"{self.quant.quant_type or '16-bit'} base, LoRA r={cfg.rank} on {cfg.target}: "
                 f"{n_trainable / 1e6:.2f}M trainable parameters; {self.total} steps of "
                 f"{cfg.batch_size}x{cfg.grad_accum}"
                 + (f"x{self.dist.world} processes ({par.mode})" if self.dist.active else ""))

    def _setup_reference(self) -> None:
        """``--precompute-ref``: the reference log-probs of every training pair, one pass of the model with
        its adapters off; written to OUT/ref_logps.safetensors, and read back from there on --resume (so a
        resumed run uses the very values the first part used)."""
        from .preference import load_reference, precompute_reference, save_reference
        from .preference_data import pairs_digest
        path, digest = self.out / REF_NAME, pairs_digest(self.batches.pairs)
        if self.cfg.resume and path.is_file():
            ref = load_reference(path, digest)
            self.log(f"reference log-probs: read {path}")
        else:
            from .linear import dequant_cache
            t = time.time()
            was = self.model.training
            self.model.eval()
            with dequant_cache(self.model, enabled=self._cache_on()):  # as the steps will (a CPU: ~10x faster)
                ref = precompute_reference(self.model, self.batches, self.device, self.method.core.share_prompt)
            self.model.train(was)
            if self.dist.main:
                save_reference(path, ref, digest)
            self.log(f"reference log-probs: {len(ref)} pairs in {time.time() - t:.1f}s, kept in {path}")
        self.method.core.ref_logps = ref

    def _resume(self) -> None:
        out = self.out
        ck = latest_checkpoint(out, warn=self.log)
        if ck is None:
            raise QLoraError(f"--resume: no intact checkpoint in {out / 'checkpoints'}")
        self.step = load_checkpoint(ck, self.model, self.optimizer, self.par)["step"]
        mpath = out / "metrics.jsonl"
        if mpath.exists() and self.dist.main:  # keep the metrics up to the checkpoint
            self.rows = [r for r in map(json.loads, mpath.read_text().splitlines()) if r.get("step", 0) <= self.step]
            mpath.write_text("".join(json.dumps(r) + "\n" for r in self.rows))
        self.watch.resumed(mpath, self.step)
        self.log(f"resumed from {ck.name} (step {self.step})")

    # -- the steps ------------------------------------------------------------------------------------

    def _enter(self, stack: contextlib.ExitStack) -> None:
        """What the steps run inside, left in reverse order by ``stack``: Ctrl-C/SIGTERM handlers (they
        ask for a checkpoint and a clean stop), the metrics file, the dequantized-weight cache, the
        micro-step (CUDA-graphed where allowed) and the progress bar."""
        from tqdm.auto import tqdm

        from .linear import dequant_cache, keyed_dropout_usable, lora_cast
        cfg, par, device, dist = self.cfg, self.par, self.device, self.dist

        def on_signal(signum, frame):
            self.stop["signal"] = signal.Signals(signum).name

        for s in (signal.SIGINT, signal.SIGTERM):
            stack.callback(signal.signal, s, signal.signal(s, on_signal))
        self.metrics = stack.enter_context(open(self.out / "metrics.jsonl" if dist.main else os.devnull, "a"))
        from .trackers import open_trackers  # --report-to: open until train() returns (finish logs a last row)
        self.trackers = self.holds.enter_context(open_trackers(cfg.report_to, self.out, dataclasses.asdict(cfg),
                                                               dist.main))
        stack.enter_context(dequant_cache(self.model, enabled=self._cache_on(), training=True))
        self.keyed = cfg.dropout > 0 and keyed_dropout_usable(device)
        self.micro = MicroStep(self.model, par.forward, self.off,
                               lora_cast(self.model, enabled=par.mode == "none"),  # entered per micro-batch
                               sync=par.sync_context, grad_scale=par.grad_scale, scaler=self.scaler)
        self.graphed = _graphed(cfg, par, device, self.micro, self.params, self.off, self.scaler, self.log,
                                self.keyed, getattr(self.method, "graphs_refused", None))
        self.bar = stack.enter_context(tqdm(total=self.total, initial=self.step, desc="training", unit="step",
                                            disable=not (cfg.progress and dist.main), dynamic_ncols=True))

    def _cache_on(self) -> bool:
        """``--cache-dequant``: keep the dequantized base weights for the run (auto: on a CPU)."""
        cfg = self.cfg
        return not self.par.sharded and not self.stream and (
            cfg.cache_dequant == "on" or (cfg.cache_dequant == "auto" and self.device.type == "cpu"))

    def fit(self) -> bool:
        """Run the steps to the end; False when a signal stopped the run (a checkpoint was saved)."""
        with contextlib.ExitStack() as stack:
            self._enter(stack)
            if self.step == 0:  # a resumed run keeps the answers from before its first step
                self._compare("before")
            self.watch.start(self.step, self.total, self.data_stats["examples"], self.data_stats, self.dist.world)
            self.t_loop = self.last_plot = time.time()
            while self.step < self.total:
                row = self.train_step()
                self._record(row)
                if self.watch.stop:  # --early-stop: the same decision on every process (same eval losses)
                    break
                if self.cfg.save_every and self.step % self.cfg.save_every == 0 and self.step < self.total:
                    self.ck_path = self.save()
                if self.dist.sum(1.0 if self.stop["signal"] else 0.0) > 0:
                    self.stop["signal"] = self.stop["signal"] or "SIGTERM"
                    self.ck_path = self.save()
                    self.bar.close()
                    self.log(f"{self.stop['signal']}: saved {self.ck_path} at step {self.step}; continue with --resume")
                    self.dist.close()
                    return False
        return True

    def _micro_batches(self) -> list[dict]:
        """This step's micro-batches for this process; the data position follows from the step (exact
        resume), and so do the LoRA dropout keys (keyed on a GPU)."""
        from .linear import dropout_key
        cfg, dist = self.cfg, self.dist
        micro = []
        for i in range(cfg.grad_accum):
            gi = (self.step * cfg.grad_accum + i) * dist.world + dist.rank  # round-robin over ranks
            ep = gi // len(self.batches)
            if self.epochs.get("k") != ep:
                self.epochs.update(k=ep, batches=self.batches.epoch(ep))
            b = self.epochs["batches"][gi % len(self.batches)]
            micro.append(dict(b, dropout_key=torch.tensor(dropout_key(cfg.seed, gi))) if self.keyed else b)
        return micro

    def _forward_backward(self, micro: list[dict], n_tok: float) -> tuple[float, int, dict]:
        """Every micro-batch's forward and backward: (loss of the step, input tokens, mean metrics)."""
        from .kernels.loss import check_labels
        cfg, device, pad_id = self.cfg, self.device, self.pad_id
        total_loss, n_in, metrics = 0.0, 0, {}
        for i, b in enumerate(micro):
            n_in += int((b["input_ids"] != pad_id).sum()) if "attention_mask" not in b else int(b["attention_mask"].sum())
            if self.graphed is not None:  # the same forward+backward, replayed from a CUDA graph
                from .cuda_graphs import graph_batch
                # the graphed loss cannot check the labels on the GPU: check the host batch
                check_labels(b["labels"], self.model.get_output_embeddings().weight.shape[0])
                # few shapes: packed rows padded to --max-length, length-grouped rows (as packed rows of one
                # example each) to a bucket length; batches to --batch-size rows
                g = graph_batch({k: v for k, v in b.items() if k != "dropout_key"}, cfg.batch_size, cfg.max_length,
                                pad_id, cfg.packing)
                if "dropout_key" in b:
                    g = dict(g, dropout_key=b["dropout_key"])
                total_loss += self.graphed(g, 1.0 / n_tok).item()
                continue
            if "dropout_key" in b:
                b = dict(b, dropout_key=b["dropout_key"].to(device))
            total_loss += self.micro(b, 1.0 / n_tok, last=i == len(micro) - 1).item()
            for k, v in self.micro.metrics.items():
                metrics[k] = metrics.get(k, 0.0) + float(v) / len(micro)
        return total_loss, n_in, metrics

    def train_step(self) -> dict:
        """One optimizer step: learning rate, forward/backward over the micro-batches (again once after a
        CUDA out-of-memory), clipping, update; returns its metrics row."""
        cfg, dist, optimizer, par, scaler = self.cfg, self.dist, self.optimizer, self.par, self.scaler
        for g in optimizer.param_groups:  # lr_ratio: LoRA+'s B groups
            g["lr"] = cfg.lr * g.get("lr_ratio", 1.0) * lr_factor(self.step, self.total, self.warmup, cfg.schedule)
        micro = self._micro_batches()
        n_tok = dist.sum(sum(self.method.tokens(b) for b in micro))
        step_loss, n_in, metrics = _step_with_retry(lambda: self._forward_backward(micro, n_tok), optimizer,
                                                    self.device, self.log)
        self.tokens_seen += n_in
        step_loss = dist.sum(step_loss)
        if not math.isfinite(step_loss):
            good = latest_checkpoint(self.out)
            raise QLoraError(f"the loss became {step_loss} at step {self.step + 1}; stopped. Last good checkpoint: "
                             f"{good if good else 'none'}. Try a lower --lr or --compute-dtype bf16")
        par.before_optimizer()
        if scaler:
            scaler.unscale_(optimizer)
        gnorm = par.clip_grad_norm(cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf"))
        if scaler:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        keep = self.graphed is not None and self.graphed.accumulate  # a graph accumulates into fixed .grad tensors
        optimizer.zero_grad(set_to_none=not keep)
        if not keep:
            par.zero_grad()
        self.step += 1
        self.last_loss = step_loss
        tokens_all = dist.sum(self.tokens_seen)
        row = {"step": self.step, "epoch": round(self.step / self.per_epoch, 3), "loss": round(step_loss, 5),
               "lr": optimizer.param_groups[0]["lr"], "grad_norm": round(float(gnorm), 4),
               "tokens": int(tokens_all), "tok_s": round(tokens_all / max(time.time() - self.t_loop, 1e-9), 1)}
        row.update({k: round(dist.sum(v) / dist.world, 5) for k, v in metrics.items()})
        if self.device.type == "cuda":
            row["mem_gib"] = round(torch.cuda.max_memory_allocated(self.device) / 2**30, 2)
            if self.policy is not None:  # beside the measurement: plan and measurement in one row
                row["plan_peak_gib"] = round(self.policy.peak / 2**30, 2)
        from .validation import eval_due
        if self.val_batches and eval_due(self.step, self.total, cfg.eval_every, self.per_epoch):
            row.update(self.evaluation())
        return row

    def _record(self, row: dict) -> None:
        """The step's row into the metrics file (every --log-every steps, and with an evaluation), the
        progress bar and, now and then, the loss plot."""
        step, total = self.step, self.total
        self.rows.append(row)
        if step % self.cfg.log_every == 0 or "eval_loss" in row:
            self.metrics.write(json.dumps(row) + "\n")
            self.metrics.flush()
            self.trackers.log(row)
        shown = {label: f"{row[k]:.3f}" for label, k in getattr(self.method, "bar", {}).items() if k in row}
        self.bar.set_postfix(loss=f"{row['loss']:.4f}", **shown, lr=f"{row['lr']:.2e}", tok_s=f"{row['tok_s']:.0f}",
                             **({"mem": f"{row['mem_gib']}G"} if "mem_gib" in row else {}))
        self.bar.update(1)
        # the plot as training goes, at most every PLOT_EVERY_S seconds (drawing costs ~0.1 s, the
        # first one ~1.5 s with matplotlib's import: on a CPU run that is time taken from training)
        if self.dist.main and ("eval_loss" in row or step % max(10, total // 50) == 0) \
                and time.time() - self.last_plot >= PLOT_EVERY_S:
            _plot(self.out / "loss.png", self.rows)
            self.last_plot = time.time()

    # -- evaluation, saving, the end ----------------------------------------------------------------------

    def evaluation(self) -> dict:
        """An evaluation's metrics: the validation loss and, for records with a reference answer, the greedy
        answers' exact_match/contains (qlora/validation.py)."""
        row, self.eval_step = {"eval_loss": round(self.evaluate(), 5)}, self.step
        row.update(self._eval_row())  # the method's metrics (preference: eval_rewards/accuracies, ...)
        row.update(self.validator.metrics(self.model, self.tok) if self.validator else {})
        from .fitcheck import adapter_now
        self.watch.evaluated(self.step, row["eval_loss"], self.rows + [dict(step=self.step, loss=self.last_loss,
                                                                            **row)],
                             lambda: adapter_now(self.par, self.model))
        return row

    def evaluate(self) -> float:
        """The validation loss, normalised as in training (per token for SFT, per pair for DPO/ORPO),
        through the parallel wrapper; the method's metrics, each a mean weighted the same way, are kept
        in ``eval_metrics``."""
        model, tokens = self.model, self.method.tokens
        was = model.training
        model.eval()
        total, n, sums = 0.0, 0, {}
        with torch.no_grad():
            for b in self.val_batches:
                loss, metrics = self.par.forward(b)
                k = tokens(b)
                total, n = total + float(loss), n + k
                for name, v in metrics.items():
                    sums[name] = sums.get(name, 0.0) + float(v) * k
        model.train(was)
        self.eval_metrics = {name: v / max(1, n) for name, v in sums.items()}
        self.last_eval = total / max(1, n)
        return self.last_eval

    def _eval_row(self) -> dict:
        return {f"eval_{k}": round(v, 5) for k, v in self.eval_metrics.items()}

    def _compare(self, when: str) -> None:
        """Greedy answers to --compare-prompts validation prompts ``when`` (before/after training) into
        OUT/answers.json; after training, printed beside the answers from before."""
        if self.validator is None:
            return
        from .validation import side_by_side
        items = self.validator.compare(self.model, self.tok, self.out, when, main=self.dist.main)
        if items and when == "after":
            self.log("answers to validation prompts before and after training:")
            side_by_side(self.log, items)

    def save(self) -> Path | None:
        """A checkpoint of this step (collective: every process gathers, rank 0 writes); its path on rank 0."""
        path = None
        par, optimizer = self.par, self.optimizer
        lora_full, opt_full = par.lora_tensors(self.model), par.optimizer_state(optimizer.state_dict())  # collective
        if self.dist.main:
            path = save_checkpoint(self.out, self.step, self.model, optimizer,
                                   {"step": self.step, "total": self.total, "epoch_size": len(self.batches),
                                    "world": self.dist.world}, self.quant, self.cfg.keep_last,
                                   lora=lora_full, opt_state=opt_full)
        self.dist.barrier()
        return path

    def finish(self) -> dict:
        """The final evaluation (unless the last step had one), checkpoint and adapter; the summary."""
        from .adapters import save_adapter
        cfg, dist, out, step = self.cfg, self.dist, self.out, self.step
        if self.val_batches and getattr(self, "eval_step", None) != step:  # unless the last step had one
            self.rows.append({"step": step, "epoch": round(step / self.per_epoch, 3), **self.evaluation()})
            if dist.main:
                with open(out / "metrics.jsonl", "a") as f:
                    f.write(json.dumps(self.rows[-1]) + "\n")
                self.trackers.log(self.rows[-1])
        self.watch.end(self.rows, step)
        self.ck_path = self.save()
        if self.watch.best_tensors is not None:  # --early-stop: the adapter of the best evaluation
            self.par.load_lora(self.model, self.watch.best_tensors)
        adapter = out / "adapter"
        lora_full = self.par.lora_tensors(self.model)  # collective under FSDP
        if dist.main:
            save_adapter(self.model, adapter, base_model=cfg.model or "embedded:SmolLM2-135M-Instruct",
                         quant=self.quant, extra={"train": dataclasses.asdict(cfg)}, tensors=lora_full)
            self.tok.save_pretrained(adapter)
            if not _plot(out / "loss.png", self.rows):
                self.log(NO_PLOT)
        self._compare("after")
        if dist.main:
            from .report import write_report
            write_report(out)
        dist.barrier()
        tokens_seen = int(dist.sum(self.tokens_seen))
        now = time.time()
        summary = {"steps": step, "time_s": round(now - self.t_start, 1), "train_time_s": round(now - self.t_loop, 1),
                   "tokens": tokens_seen, "tok_s": round(tokens_seen / max(now - self.t_loop, 1e-9), 1),
                   "final_loss": round(self.last_loss, 4),
                   "eval_loss": None if self.last_eval is None else round(self.last_eval, 4),
                   "adapter": str(adapter), "checkpoint": str(self.ck_path), "output": str(out), "model": self.model,
                   "tokenizer": self.tok}
        if self.device.type == "cuda":
            summary["peak_mem_gib"] = round(torch.cuda.max_memory_allocated(self.device) / 2**30, 2)
            summary["peak_reserved_gib"] = round(torch.cuda.max_memory_reserved(self.device) / 2**30, 2)  # ~ nvidia-smi
        dist.close()
        return summary


def train(cfg: TrainConfig, log=print, model=None, tokenizer=None, method=None) -> dict:
    """Run training as configured; returns a summary dict (also printed by the CLI), or
    ``{"interrupted": True, "step", "checkpoint"}`` when Ctrl-C/SIGTERM stopped it.
    ``model``/``tokenizer``: an already loaded QLoRA model (from :func:`qlora.model.load_model`
    with the same settings) to train instead of loading ``cfg.model``; ``method``: what is learned
    (qlora.methods; default SFT). The output folder stays locked until it returns; a full disk or
    read-only folder ends it with one line naming the last good checkpoint (qlora/outdir.py)."""
    from .outdir import SPACE_ERRORS, guard_write
    last_good = lambda: latest_checkpoint(Path(cfg.output)) if cfg.output else None  # noqa: E731
    with contextlib.ExitStack() as held, guard_write(cfg.output or ".", last_good=last_good, codes=SPACE_ERRORS):
        run = Run(cfg, log, model, tokenizer, method, held)
        run.setup()
        if not run.fit():
            return {"interrupted": True, "step": run.step, "checkpoint": str(run.ck_path)}
        return run.finish()

# ---------------------------------------------------------------------------------------------
# CLI


def add_cli(sub) -> None:
    p = sub.add_parser("train", help="fine-tune a model on a data file (QLoRA)",
                       description="Fine-tune with QLoRA: the base model frozen in 4-bit NF4 with double quantization, "
                                   "LoRA adapters on every linear layer, paged AdamW. Defaults are the QLoRA paper's "
                                   "recipe. Every option is also a key of the YAML file given with --config.")
    p.add_argument("--config", metavar="FILE.yaml", help="YAML file of options (keys as below, with underscores)")
    p.add_argument("--gpus", type=int, default=None, metavar="N",
                   help="data-parallel over N processes (launches torchrun; one per GPU, or gloo on CPUs). "
                        "N processes with --grad-accum G equal one process with --grad-accum N*G; with --nnodes M, "
                        "N per machine")
    from .launch import add_args as add_launch_args
    add_launch_args(p)  # --nnodes, --node-rank, --rdzv-endpoint, --rdzv-timeout (qlora/launch.py)
    add_dataclass_args(p, TrainConfig)
    p.set_defaults(func=_run)


def _model_dims(model: str) -> dict | None:
    """The sizes of ``model`` (a shape name or a folder with config.json) that pick its kernels,
    read without transformers; None where unknown."""
    try:
        if model.startswith("shape:"):
            from .plan import SHAPES, shape_key
            c = SHAPES[shape_key(model[6:])]
        else:
            c = json.loads((Path(hub.local(model)) / "config.json").read_text())
        c = c.get("text_config", c)
        return dict(head_dim=int(c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]),
                    hidden=int(c["hidden_size"]), intermediate=int(c["intermediate_size"]), vocab=int(c["vocab_size"]))
    except Exception:
        return None


def _warm_up(cfg: TrainConfig):
    """Warm CUDA up and compile the step's Triton kernels in the background while transformers
    imports (lean_imports.warm_up_cuda); one process on one GPU only (data-parallel ranks would all
    warm their first visible GPU)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 or not (cfg.device == "auto" or cfg.device.startswith("cuda")):
        return None
    from .lean_imports import warm_up_cuda
    dims = _model_dims(cfg.model or "")
    shapes = None
    if dims is not None and cfg.compute_dtype in ("auto", "bf16", "fp16"):  # auto: bf16 on the GPUs that warm up
        shapes = dict(hidden=dims["hidden"], intermediate=dims["intermediate"], vocab=dims["vocab"],
                      tokens=cfg.batch_size * cfg.max_length, blocksize=cfg.blocksize,
                      double_quant=cfg.double_quant, quant_type=None if cfg.quant_type == "none" else cfg.quant_type,
                      dtype=torch.float16 if cfg.compute_dtype == "fp16" else torch.bfloat16,
                      rank=cfg.rank, dropout=cfg.dropout)
    return warm_up_cuda("cuda" if cfg.device == "auto" else cfg.device, dims["head_dim"] if dims else 128,
                        cfg.max_length, shapes)


def _run(args) -> int:
    from . import launch
    if args.gpus is not None and args.gpus < 1:
        raise QLoraError("--gpus must be >= 1")
    rdzv = launch.check(args.gpus or 1, args.nnodes, args.node_rank, args.rdzv_endpoint, args.rdzv_timeout)
    if ((args.gpus or 1) > 1 or rdzv is not None) and "LOCAL_RANK" not in os.environ:
        if torch.cuda.is_available() and torch.cuda.device_count() < (args.gpus or 1):
            raise QLoraError(f"--gpus {args.gpus}: only {torch.cuda.device_count()} GPU(s) visible")
        cfg = build_config(TrainConfig, args.config, args)  # bad options fail here, not in N processes
        if cfg.parallel == "fsdp":
            _check_fsdp(cfg)
        return launch.launch(args.gpus or 1, args.nnodes, args.node_rank, rdzv, args.rdzv_timeout)
    cfg = build_config(TrainConfig, args.config, args)
    _warm_up(cfg)
    s = train(cfg, log=lambda m: print(m, file=sys.stderr))
    if s.get("interrupted"):
        return _exit_worker(130)
    if int(os.environ.get("RANK", "0")) != 0:
        return _exit_worker(0)
    print(f"done: {s['steps']} steps in {s['time_s']}s ({s['tok_s']:.0f} tokens/s), final loss {s['final_loss']}"
          + (f", eval loss {s['eval_loss']}" if s["eval_loss"] is not None else "")
          + (f", peak GPU memory {s['peak_mem_gib']} GiB ({s['peak_reserved_gib']} GiB reserved by PyTorch's "
             "allocator)" if "peak_mem_gib" in s else ""))
    print(f"adapter: {s['adapter']}")
    return _exit_worker(0)


def _exit_worker(code: int) -> int:
    """A process of a multi-process run (torchrun) leaves with os._exit once its work is saved and
    the process group is closed: the interpreter's own teardown of the collective library's
    threads could abort it now and then ("terminate called without an active exception", seen
    with gloo after a finished FSDP2 run), which torchrun would report as a failed run."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code
