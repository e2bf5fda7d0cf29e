"""Do LoftQ / PiSSA initialisation, DoRA or LoRA+ close the 4-bit gap? (issue 30; method as bench/quality.py)

On the embedded SmolLM2-135M-Instruct, for each variant and seed and task (bench/quality.py's two: ``demo``,
learning made-up facts; ``extract``, sentence -> JSON on held-out templates):

* ``ppl_init``: perplexity on the pydoc_data topics text of the model as it starts training (4-bit base +
  initial adapter: for LoftQ/PiSSA the corrected base + B A), and from it, in the table, the share of the
  4-bit gap closed: ``(ppl(nf4) - ppl(variant)) / (ppl(nf4) - ppl(bf16))``;
* held-out accuracy (and loss) after the same training as bench/quality.py (r 16, alpha 32, lr 1e-3, batch 8,
  3 epochs, AdamW, no dropout); ``train_s``: the training time.

Variants (all NF4 + double quantization, block 64, except ``bf16``):

    nf4     gaussian init (A Kaiming-uniform, B = 0): plain QLoRA
    loftq   --init loftq, 1 iteration, alpha = r = 16 (peft's LoftQ applies B A unscaled, so its start is
            W only at scale 1; at alpha 32 it would add the correction twice)
    pissa   --init pissa
    dora    --dora
    lora+   --lora-plus-ratio 16 (the paper's suggestion)
    bf16    gaussian init on the bf16 base (16-bit LoRA, the reference)

    python bench/quality_variants.py --device cpu --seeds 1 --tasks demo --epochs 1 --text-tokens 2048
    python bench/quality_variants.py --device cuda --jobs 12     # 6 variants x 3 seeds x 2 tasks
    python bench/quality_variants.py --ppl-only --seeds 1 --tasks demo   # the perplexity at init only
    python bench/quality_variants.py --device cuda --jobs 12 --variants nf4,pissa@2e-4,lora+@1e-4  # lr sweep

A variant written ``NAME@LR`` trains at learning rate LR instead of the shared 1e-3 (its rows and table line
keep the whole spec, so ``pissa@2e-4`` and ``pissa`` are separate lines).

Each job prints one JSON line and appends it to ``--out`` (JSONL); the markdown table (mean ± std over seeds)
comes last; ``--summarize ROWS.jsonl`` prints the table of saved rows.
"""
import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench import quality as q  # noqa: E402  (the tasks, perplexity and scoring of QUALITY.md)

VARIANTS = {  # name -> (quant_type, LoraSettings overrides, TrainConfig overrides)
    "nf4": ("nf4", {}, {}),
    "loftq": ("nf4", {"init": "loftq", "alpha": 16}, {"init": "loftq", "alpha": 16}),
    "pissa": ("nf4", {"init": "pissa"}, {"init": "pissa"}),
    "dora": ("nf4", {"dora": True}, {"dora": True}),
    "lora+": ("nf4", {}, {"lora_plus_ratio": 16.0}),
    "bf16": (None, {}, {}),
}


def _task(task: str, work: Path, tok):
    """(train file, held-out records, score(answers))."""
    from qlora.demo import accuracy
    from qlora.demo_data import write
    if task == "demo":
        train_file, held_file, keys = write(work / "data")
        held = [json.loads(x) for x in held_file.read_text().splitlines()]
        return train_file, held, lambda answers: accuracy(answers, keys)
    if task != "extract":
        raise SystemExit(f"unknown task {task!r}: demo or extract")
    tr, held, refs = q.extract_task(0)
    (work / "data").mkdir()
    train_file = work / "data" / "train.jsonl"
    train_file.write_text("".join(json.dumps(r) + "\n" for r in tr))
    return train_file, held, lambda answers: q.json_accuracy(answers, refs)


def split_spec(spec: str) -> tuple[str, float]:
    """``NAME`` or ``NAME@LR`` -> (variant name, learning rate; the shared 1e-3 when none is given)."""
    name, _, lr = spec.partition("@")
    try:
        return name, float(lr) if lr else 1e-3
    except ValueError:
        raise SystemExit(f"variant {spec!r}: the learning rate after @ is not a number") from None


def run_job(variant: str, seed: int, task: str, device: str, epochs: float, n_text: int,
            ppl_only: bool = False) -> dict:
    from qlora.data import Batches, pad_id
    from qlora.demo import held_out_answers
    from qlora.embedded import embedded_model_path
    from qlora.loss import evaluate_loss
    from qlora.model import LoraSettings, QuantSettings, build_from_source
    from qlora.sources import open_source
    from qlora.train import TrainConfig, train
    t0 = time.time()
    source = open_source(embedded_model_path())
    tok = source.load_tokenizer()
    work = Path(tempfile.mkdtemp(prefix=f"qlora-variants-{variant}-{seed}-{task}-"))
    train_file, held, score = _task(task, work, tok)
    name, lr = split_spec(variant)
    qt, lora_kw, cfg_kw = VARIANTS[name]
    lora = LoraSettings(**{**dict(r=16, alpha=32, dropout=0.0), **lora_kw})
    t_init = time.time()
    model = build_from_source(source, QuantSettings(quant_type=qt), lora, device, "auto", seed, progress=False)
    row = {"variant": variant, "seed": seed, "task": task, "device": device,
           "load_init_s": round(time.time() - t_init, 1), "ppl_init": round(q.perplexity(model, tok, n_text), 3)}
    if ppl_only:
        return row
    row["lr"] = lr
    settings = dict(data=str(train_file), output=str(work / "run"), rank=16, alpha=32, dropout=0.0, lr=lr,
                    batch_size=8, grad_accum=1, epochs=epochs, max_length=128, optim="adamw",
                    grad_checkpointing=False, save_every=0, keep_last=1, device=device, overwrite=True,
                    progress=False, seed=seed, quant_type=qt or "none")
    cfg = TrainConfig(**{**settings, **cfg_kw})  # the variant's own settings win (LoftQ's alpha 16)
    s = train(cfg, log=lambda m: None, model=model, tokenizer=tok)
    held_path = work / "data" / "held.jsonl"
    held_path.write_text("".join(json.dumps(r) + "\n" for r in held))
    from qlora.data import load_examples
    held_ex, _ = load_examples(held_path, tok, max_length=128)
    held_batches = list(Batches(held_ex, 8, pad_id(tok), shuffle=False, max_length=128).epoch(0))
    row["final_train_loss"] = s["final_loss"]
    row["heldout_loss"] = round(evaluate_loss(model, held_batches, device), 4)
    row["heldout_acc"] = round(score(held_out_answers(model, tok, held, max_new_tokens=48)), 4)
    row["train_s"] = s["train_time_s"]
    row["seconds"] = round(time.time() - t0, 1)
    return row


def summarize(rows: list[dict], variants: list[str], tasks: list[str]) -> None:
    def ms(v, scale=1.0, f=".1f", unit=""):
        if not v:
            return "—"
        sd = f" ± {statistics.stdev(v) * scale:{f}}" if len(v) > 1 else ""
        return f"{statistics.mean(v) * scale:{f}}{unit}{sd}"
    ppl = {v: [r["ppl_init"] for r in rows if r["variant"] == v] for v in variants}
    base = {v: [r["ppl_init"] for r in rows if split_spec(r["variant"])[0] == v] for v in ("nf4", "bf16")}
    p4 = statistics.mean(base["nf4"]) if base["nf4"] else None
    p16 = statistics.mean(base["bf16"]) if base["bf16"] else None
    print("| variant | ppl at init | 4-bit gap closed | " +
          " | ".join(f"{t} held-out acc | {t} train s" for t in tasks) + " | seeds |")
    print("|---|---|---|" + "---|---|" * len(tasks) + "---|")
    for v in variants:
        gap = "—"
        if ppl[v] and p4 is not None and p16 is not None and p4 != p16:
            gap = f"{100 * (p4 - statistics.mean(ppl[v])) / (p4 - p16):.0f}%"
        cells = [ms(ppl[v], f=".2f"), gap]
        n = 0
        for t in tasks:
            rs = [r for r in rows if r["variant"] == v and r["task"] == t]
            n = max(n, len(rs))
            rs = [r for r in rs if "heldout_acc" in r]  # (--ppl-only rows have none)
            cells += [ms([r["heldout_acc"] for r in rs], 100, ".1f", "%"), ms([r["train_s"] for r in rs], f=".0f")]
        print(f"| {v} | " + " | ".join(cells) + f" | {n} |")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", help="cpu or cuda (with --jobs, spread over the visible GPUs)")
    ap.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 (default 3)")
    ap.add_argument("--first-seed", type=int, default=0, help="start the seeds here (K..K+N-1): add seeds to a grid")
    ap.add_argument("--tasks", default="demo,extract", help="comma list of demo,extract")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma list of " + ",".join(VARIANTS))
    ap.add_argument("--epochs", type=float, default=3.0)
    ap.add_argument("--text-tokens", type=int, default=16384, help="pydoc text tokens for the perplexity")
    ap.add_argument("--ppl-only", action="store_true", help="only the perplexity at init (no training; fast)")
    ap.add_argument("--jobs", type=int, default=1, help="run this many jobs at once, as separate processes")
    ap.add_argument("--out", default="quality_variants.jsonl")
    ap.add_argument("--summarize", default=None, metavar="ROWS.jsonl", help="only print the table of saved rows")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)  # VARIANT:SEED:TASK:DEVICE
    a = ap.parse_args()
    variants, tasks = a.variants.split(","), a.tasks.split(",")
    unknown = [v for v in variants if split_spec(v)[0] not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variant(s) {', '.join(unknown)}: choose from {', '.join(VARIANTS)}")
    if a.summarize:
        rows = [json.loads(x) for x in Path(a.summarize).read_text().splitlines() if x.strip()]
        summarize(rows, variants, [t for t in tasks if any(r["task"] == t for r in rows)])
        return

    def record(row):
        print(json.dumps(row), flush=True)
        with open(a.out, "a") as f:
            f.write(json.dumps(row) + "\n")
        rows.append(row)
    rows: list[dict] = []
    if a.one:
        v, s, t, dev = a.one.split(":", 3)
        record(run_job(v, int(s), t, dev, a.epochs, a.text_tokens, a.ppl_only))
        return
    seeds = range(a.first_seed, a.first_seed + a.seeds)
    jobs = [(v, s, t) for t in tasks for s in seeds for v in variants]
    if a.ppl_only:  # the perplexity does not depend on the task
        jobs = [(v, s, tasks[0]) for s in seeds for v in variants]
    ngpu = 0
    if a.device.startswith("cuda"):
        import torch
        ngpu = torch.cuda.device_count()
    if a.jobs <= 1:
        for v, s, t in jobs:
            record(run_job(v, s, t, a.device, a.epochs, a.text_tokens, a.ppl_only))
    else:
        def command(k, v, s, t):
            dev = f"cuda:{k % ngpu}" if ngpu else "cpu"
            return [sys.executable, __file__, "--one", f"{v}:{s}:{t}:{dev}", "--epochs", str(a.epochs),
                    "--text-tokens", str(a.text_tokens), "--out", os.devnull] + (["--ppl-only"] if a.ppl_only else [])
        commands = [((v, s, t), command(k, v, s, t)) for k, (v, s, t) in enumerate(jobs)]
        q.run_parallel(commands, a.jobs, record)
    print(f"\nembedded SmolLM2-135M on {a.device}, {a.epochs:g} epochs, {a.seeds} seed(s), perplexity on "
          f"{a.text_tokens} tokens of pydoc_data text")
    summarize(rows, variants, tasks)


if __name__ == "__main__":
    main()
