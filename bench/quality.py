"""Does NF4 + double quantization keep 16-bit quality, and is NF4 better than FP4 and Int4?

On the embedded SmolLM2-135M-Instruct (real weights; the file stores them as Q4_1, read as fp32:
"bf16" below means that base in bf16), for each base format bf16 / nf4+DQ / nf4 / fp4 / int4:

1. weight reconstruction error per layer type: mean |w - dq(q(w))| / mean |w|, averaged over layers;
2. perplexity of the (quantized) base on the pydoc_data topics text shipped with Python, before
   any fine-tuning (never trained on);
3. fine-tuning on the demo task (qlora/demo_data.py: 216 questions, 72 held-out rephrasings) with the
   same seed, data and steps, then held-out loss and accuracy (answer contains the fact).

    python bench/quality.py --quick            # CPU: 1 seed, 2 epochs, 2,048 tokens of text
    python bench/quality.py --device cuda      # 3 seeds, 3 epochs, 16,384 tokens of text

Prints one JSON line per (format, seed) and a table; raw rows also go to --out.
"""
import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

FORMATS = {  # name -> (quant_type, double_quant)
    "bf16": (None, False), "nf4+dq": ("nf4", True), "nf4": ("nf4", False), "fp4": ("fp4", True), "int4": ("int4", True),
}
TYPES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def recon_error(model, source) -> dict:
    import torch

    from qlora.linear import QLoRALinear
    per = {t: [] for t in TYPES}
    for name, m in model.named_modules():
        if isinstance(m, QLoRALinear):
            w = source.get(name + ".weight").float()
            dq = m.base_weight(torch.float32)
            per[name.rsplit(".", 1)[-1]].append(((w - dq).abs().mean() / w.abs().mean()).item())
    return {t: round(statistics.mean(v), 5) for t, v in per.items() if v}


def perplexity(model, tok, n_tokens: int, window: int = 512) -> float:
    import torch
    from pydoc_data.topics import topics

    from qlora.linear import dequant_cache
    text = "\n\n".join(topics[k] for k in sorted(topics))
    ids = tok(text, return_tensors="pt").input_ids[0, :n_tokens]
    nll, n = 0.0, 0
    model.eval()
    with torch.no_grad(), dequant_cache(model):
        for s in range(0, len(ids) - 1, window):
            x = ids[s:s + window].unsqueeze(0)
            out = model(input_ids=x, labels=x, use_cache=False)
            nll += out.loss.item() * (x.shape[1] - 1)
            n += x.shape[1] - 1
    return math.exp(nll / n)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="CPU budget: 1 seed, 2 epochs, 2,048 text tokens")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--formats", default=",".join(FORMATS))
    ap.add_argument("--seeds", type=int, default=None)
    ap.add_argument("--epochs", type=float, default=None)
    ap.add_argument("--text-tokens", type=int, default=None)
    ap.add_argument("--out", default="quality_results.jsonl")
    a = ap.parse_args()
    seeds = a.seeds or (1 if a.quick else 3)
    epochs = a.epochs or (2 if a.quick else 3)
    n_text = a.text_tokens or (2048 if a.quick else 16384)

    from qlora.data import Batches, load_examples
    from qlora.demo import accuracy, held_out_answers
    from qlora.demo_data import write
    from qlora.embedded import embedded_model_path
    from qlora.model import LoraSettings, QuantSettings, build_from_source
    from qlora.sources import open_source
    from qlora.train import TrainConfig, evaluate_loss, train
    source = open_source(embedded_model_path())
    tok = source.load_tokenizer()
    work = Path(tempfile.mkdtemp(prefix="qlora-quality-"))
    train_file, held_file, keys = write(work / "data")
    held = [json.loads(x) for x in held_file.read_text().splitlines()]
    held_ex, _ = load_examples(held_file, tok, max_length=128)
    held_batches = list(Batches(held_ex, 8, tok.pad_token_id, shuffle=False, max_length=128).epoch(0))
    rows = []
    out = open(a.out, "a")
    for fmt in a.formats.split(","):
        qt, dq = FORMATS[fmt]
        for seed in range(seeds):
            t0 = time.time()
            quant = QuantSettings(quant_type=qt, double_quant=dq)
            model = build_from_source(source, quant, LoraSettings(16, 32, 0.0), a.device, "bf16", seed, progress=False)
            row = {"format": fmt, "seed": seed}
            if seed == 0:
                row["recon"] = recon_error(model, source)
                row["ppl_base"] = round(perplexity(model, tok, n_text), 3)
            cfg = TrainConfig(data=str(train_file), output=str(work / f"run-{fmt}-{seed}"), rank=16, alpha=32,
                              dropout=0.0, lr=1e-3, batch_size=8, grad_accum=1, epochs=epochs, max_length=128,
                              optim="adamw", grad_checkpointing=a.device != "cpu", save_every=0, keep_last=1,
                              device=a.device, overwrite=True, progress=False, seed=seed,
                              quant_type=qt or "none", double_quant=dq)
            s = train(cfg, log=lambda m: None, model=model, tokenizer=tok)
            row["final_train_loss"] = s["final_loss"]
            row["heldout_loss"] = round(evaluate_loss(model, held_batches, a.device), 4)
            row["heldout_acc"] = round(accuracy(held_out_answers(model, tok, held), keys), 4)
            row["seconds"] = round(time.time() - t0, 1)
            print(json.dumps(row), flush=True)
            out.write(json.dumps(row) + "\n")
            out.flush()
            rows.append(row)
            del model
    print(f"\nembedded SmolLM2-135M, demo task, {epochs:g} epochs, {seeds} seed(s), text {n_text} tokens")
    print("| base | recon err (mean over q/k/v/o/gate/up/down) | base ppl | held-out loss | held-out acc |")
    print("|---|---|---|---|---|")
    for fmt in a.formats.split(","):
        rs = [r for r in rows if r["format"] == fmt]
        first = rs[0]
        rec = statistics.mean(first["recon"].values())
        hl = [r["heldout_loss"] for r in rs]
        ha = [r["heldout_acc"] for r in rs]
        sd = (lambda v: f" ± {statistics.stdev(v):.3f}" if len(v) > 1 else "")
        print(f"| {fmt} | {rec:.4f} | {first['ppl_base']:.3f} | {statistics.mean(hl):.4f}{sd(hl)} | "
              f"{statistics.mean(ha):.3f}{sd(ha)} |")


if __name__ == "__main__":
    main()
