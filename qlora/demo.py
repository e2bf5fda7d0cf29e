"""`qlora demo`: fine-tune the embedded SmolLM2-135M-Instruct on the support FAQ of a fictional
product (see :mod:`qlora.demo_data`) and show held-out accuracy and sample answers before and
after; ``--method dpo``: preference-tune it to answer short and sign off as the support team, and
show the share of held-out answers that do, before and after. Runs on a CPU in a few minutes; on a
GPU when there is one."""
from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path

from .config import COMPUTE_DTYPES
from .errors import QLoraError

SAMPLES = (0, 41)  # held-out questions shown before/after


def _norm(s: str) -> str:
    return re.sub(r"\s+", " ", s.lower()).strip()


def held_out_answers(model, tok, records, max_new_tokens=32, batch_size=24):
    from .validation import answer
    return answer(model, tok, [r["messages"][:-1] for r in records], max_new_tokens, batch_size=batch_size)


def accuracy(answers, keys) -> float:
    return sum(_norm(k) in _norm(a) for a, k in zip(answers, keys)) / len(keys)


def _load(cfg, dev, compute, progress: bool, log):
    """The embedded model in NF4 with the LoRA settings of ``cfg`` (step 1 of either demo)."""
    from .model import LoraSettings, QuantSettings, load_model
    log(f"[1/4] loading the embedded SmolLM2-135M-Instruct into NF4 on {dev}; {compute.header()} ...")
    if compute.warning:
        log(f"      warning: {compute.warning}")
    return load_model(None, QuantSettings(compute_dtype=cfg.compute_dtype),
                      LoraSettings(cfg.rank, cfg.alpha, cfg.dropout, cfg.target), dev, cfg.compute_dtype,
                      seed=cfg.seed, progress=progress)


def run_demo(output="runs/demo", epochs: float = 3, lr: float = 1e-3, rank: int = 16, alpha: float = 32,
             batch_size: int = 16, device: str = "auto", overwrite: bool = True, progress: bool = True,
             log=print, compute_dtype: str = "auto") -> dict:
    from .demo_data import write
    from .hardware import resolve
    from .train import TrainConfig, _device, train
    from .validation import side_by_side
    t0 = time.time()
    out = Path(output)
    train_file, held_file, keys = write(out / "data")
    held = [json.loads(x) for x in held_file.read_text().splitlines()]
    dev = _device(device)
    compute = resolve(compute_dtype, dev)
    cfg = TrainConfig(data=str(train_file), output=str(out / "run"), rank=rank, alpha=alpha, dropout=0.0, lr=lr,
                      compute_dtype=compute.dtype, batch_size=batch_size, grad_accum=1, epochs=epochs, max_length=128,
                      optim="adamw", grad_checkpointing=dev.type == "cuda", save_every=0, keep_last=1, device=str(dev),
                      overwrite=overwrite, progress=progress, seed=0,
                      val_split=0.0, compare_prompts=0)  # the demo holds out its own 72 rephrasings
    model, tok = _load(cfg, dev, compute, progress, log)
    t_load = time.time() - t0
    log(f"      loaded in {t_load:.0f}s; data: {out / 'data'} (216 training questions, 72 held-out rephrasings)")
    log("[2/4] answering the 72 held-out questions before fine-tuning ...")
    before = held_out_answers(model, tok, held)
    acc0 = accuracy(before, keys)
    log(f"      accuracy before: {acc0:.0%}")
    log(f"[3/4] fine-tuning ({epochs:g} epochs, LoRA r={rank} on all linear layers, lr {lr:g}) ...")
    s = train(cfg, log=lambda m: log("      " + m), model=model, tokenizer=tok)
    log("[4/4] answering the held-out questions after fine-tuning ...")
    after = held_out_answers(model, tok, held)
    acc1 = accuracy(after, keys)
    total = time.time() - t0
    log("")
    side_by_side(log, [{"question": held[i]["messages"][1]["content"], "before": before[i], "after": after[i],
                        "expected": keys[i]} for i in SAMPLES])  # as `qlora train` prints its own
    log("")
    log(f"held-out accuracy: {acc0:.0%} before -> {acc1:.0%} after fine-tuning "
        f"({sum(_norm(k) in _norm(a) for a, k in zip(after, keys))}/{len(keys)})")
    log(f"training: {s['steps']} steps, {s['tokens']} tokens in {s['train_time_s']:.0f}s ({s['tok_s']:.0f} tokens/s); "
        f"total {total:.0f}s; adapter: {s['adapter']}")
    log(f"try it: qlora generate --adapter {s['adapter']} --prompt \"What is the price of the Nimbus T7?\"")
    result = {"accuracy_before": acc0, "accuracy_after": acc1, "train_tok_s": s["tok_s"],
              "train_time_s": s["train_time_s"], "total_time_s": round(total, 1), "load_time_s": round(t_load, 1),
              "steps": s["steps"], "final_loss": s["final_loss"], "adapter": s["adapter"],
              "samples": [{"question": held[i]["messages"][1]["content"], "before": before[i], "after": after[i],
                           "expected": keys[i]} for i in SAMPLES]}
    (out / "demo_result.json").write_text(json.dumps(result, indent=1))
    return result


# --method dpo (SFT's: run_demo's own). DPO alone left the 135M model at 0% at every lr/epochs/beta tried
# (BENCHMARKS, DPO demo grid); with the chosen answers' NLL term (--sft-weight 1) 5e-4 reaches 100%
PREFERENCE_DEFAULTS = dict(epochs=2, lr=5e-4, batch_size=8, sft_weight=1.0)


def run_preference_demo(output="runs/demo-dpo", epochs: float = 2, lr: float = 5e-4, rank: int = 16,
                        alpha: float = 32, batch_size: int = 8, device: str = "auto", overwrite: bool = True,
                        progress: bool = True, log=print, compute_dtype: str = "auto", beta: float = 0.1,
                        sft_weight: float = 1.0) -> dict:
    """DPO on 72 pairs (two phrasings of each of the 36 FAQ questions; chosen: the short fact signed
    "— Nimbus Support", rejected: the model's own answer to the question, or a long answer without the sign-off
    where its own already follows the preference), then the share of greedy answers to the 36 held-out phrasings
    that follow the preference (demo_data.follows_preference), before and after."""
    from .demo_data import SIGN_OFF, SYSTEM, follows_preference, preference_questions, write_preference
    from .hardware import resolve
    from .train import TrainConfig, _device, train
    t0 = time.time()
    out = Path(output)
    pairs_file = out / "data" / "pairs.jsonl"  # written once the model has answered the training questions
    dev = _device(device)
    compute = resolve(compute_dtype, dev)
    cfg = TrainConfig(data=str(pairs_file), output=str(out / "run"), method="dpo", beta=beta, precompute_ref=True,
                      sft_weight=sft_weight,
                      rank=rank, alpha=alpha, dropout=0.0, lr=lr, compute_dtype=compute.dtype, batch_size=batch_size,
                      grad_accum=1, epochs=epochs, max_length=192, optim="adamw", warmup_ratio=0.0,
                      grad_checkpointing=dev.type == "cuda", save_every=0, keep_last=1, device=str(dev),
                      overwrite=overwrite, progress=progress, seed=0, val_split=0.0, compare_prompts=0)
    model, tok = _load(cfg, dev, compute, progress, log)
    t_load = time.time() - t0
    questions = preference_questions()
    log(f"      loaded in {t_load:.0f}s")
    log(f"[2/4] answering the {len(questions)} training questions (the model's own answers become the rejected "
        "ones, where they are not short and signed) and the held-out ones before preference tuning ...")
    from .validation import answer
    mine = answer(model, tok, [[{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}]
                               for q in questions], 48, batch_size=24)  # as held_out_answers asks them
    _, held = write_preference(out / "data", own=dict(zip(questions, mine)))
    n = len(held)
    before = held_out_answers(model, tok, held, max_new_tokens=48)
    k0 = sum(map(follows_preference, before))
    log(f"      data: {out / 'data'} ({len(questions)} preference pairs, {n} held-out questions); short and signed "
        f"\"{SIGN_OFF}\" before: {k0 / n:.0%}")
    log(f"[3/4] DPO ({epochs:g} epochs, beta {beta:g}, chosen-answer NLL weight {sft_weight:g}, LoRA r={rank} on all "
        f"linear layers, lr {lr:g}) ...")
    s = train(cfg, log=lambda m: log("      " + m), model=model, tokenizer=tok)
    log("[4/4] answering the held-out questions after preference tuning ...")
    after = held_out_answers(model, tok, held, max_new_tokens=48)
    k1 = sum(map(follows_preference, after))
    total = time.time() - t0
    log("")
    for i in SAMPLES[:1] + (n // 2,):
        log(f"Q: {held[i]['messages'][1]['content']}\n   before: {before[i].strip()}\n   after:  {after[i].strip()}")
    log("")
    log(f"held-out answers that are short and end with \"{SIGN_OFF}\": {k0 / n:.0%} before -> {k1 / n:.0%} after "
        f"DPO ({k1}/{n})")
    log(f"training: {s['steps']} steps, {s['tokens']} tokens in {s['train_time_s']:.0f}s ({s['tok_s']:.0f} tokens/s); "
        f"total {total:.0f}s; adapter: {s['adapter']}")
    result = {"preference_before": k0 / n, "preference_after": k1 / n, "train_time_s": s["train_time_s"],
              "total_time_s": round(total, 1), "load_time_s": round(t_load, 1), "steps": s["steps"],
              "final_loss": s["final_loss"], "adapter": s["adapter"],
              "samples": [{"question": h["messages"][1]["content"], "before": b, "after": a}
                          for h, b, a in list(zip(held, before, after))[:4]]}
    (out / "demo_result.json").write_text(json.dumps(result, indent=1))
    return result


def add_cli(sub) -> None:
    p = sub.add_parser("demo", help="fine-tune the embedded model on a generated product FAQ; show before/after",
                       description="Generates the support FAQ of a fictional drone (36 facts, 216 training questions, "
                                   "72 held-out rephrasings), fine-tunes the embedded SmolLM2-135M-Instruct with QLoRA, "
                                   "and prints held-out accuracy and sample answers before and after.")
    p.add_argument("--method", default="sft", choices=["sft", "dpo"],
                   help="sft: learn the FAQ's facts (default); dpo: preference-tune on 72 pairs to answer short and "
                        "sign off \"— Nimbus Support\", and report the share of held-out answers that do")
    p.add_argument("--output", default=None,
                   help="directory for data, run and adapter (default runs/demo, with --method dpo runs/demo-dpo)")
    p.add_argument("--epochs", type=float, default=None,
                   help="passes over the 216 questions (default 3; --method dpo: over the 72 pairs, default 2)")
    p.add_argument("--lr", type=float, default=None, help="learning rate (default 1e-3; --method dpo: 5e-4)")
    p.add_argument("--sft-weight", type=float, default=None,
                   help="--method dpo: weight of the chosen answers' NLL added to the DPO loss (qlora train "
                        "--sft-weight; default 1; 0 = DPO alone)")
    p.add_argument("--rank", type=int, default=16, help="LoRA rank (default 16)")
    p.add_argument("--alpha", type=float, default=32, help="LoRA alpha (default 32)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="examples per step (default 16: on a CPU bigger matmuls run closer to peak, "
                        "so 16 trains faster per token than 8; --method dpo: 8 pairs)")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (default)")
    p.add_argument("--compute-dtype", "--dtype", dest="compute_dtype", default="auto", choices=COMPUTE_DTYPES,
                   help="matmul dtype; auto = what the hardware runs fast (bf16 on GPUs of compute capability >= 8.0 "
                        "and CPUs with native bf16, fp16 on older GPUs, fp32 on other CPUs) (default: auto)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_run)


def _run(args) -> int:
    dpo = args.method == "dpo"
    defaults = PREFERENCE_DEFAULTS if dpo else dict(epochs=3, lr=1e-3, batch_size=16)
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.epochs <= 0:
        raise QLoraError("--epochs must be > 0")
    if args.sft_weight is not None and not dpo:
        raise QLoraError("--sft-weight applies to --method dpo")
    run = run_preference_demo if dpo else run_demo
    extra = dict(sft_weight=args.sft_weight) if dpo else {}
    run(args.output or ("runs/demo-dpo" if dpo else "runs/demo"), args.epochs, args.lr, args.rank, args.alpha,
        args.batch_size, args.device, progress=not args.no_progress, log=lambda m: print(m, flush=True),
        compute_dtype=args.compute_dtype, **extra)
    return 0


if __name__ == "__main__":
    sys.exit(_run(None))
