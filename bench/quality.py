"""Does NF4 + double quantization keep 16-bit quality, and is NF4 better than FP4 and Int4?

On the embedded SmolLM2-135M-Instruct (real weights; the file stores them as Q4_1, read as fp32:
"bf16" below means that base in bf16), for each base format bf16 / nf4+DQ / nf4 / fp4 / int4:

1. weight reconstruction error per layer type: mean |w - dq(q(w))| / mean |w|, averaged over layers;
2. perplexity of the (quantized) base on the pydoc_data topics text shipped with Python, before
   any fine-tuning (never trained on);
3. fine-tuning with the same seed, data and steps on two tasks, then held-out loss and accuracy:
   * ``demo``: the demo FAQ (qlora/demo_data.py: 216 questions about 36 made-up facts, 72 held-out
     rephrasings; correct = the answer contains the fact): learning new facts;
   * ``extract``: turn a sentence about a person into a JSON object (name, age, job, city); 240
     training sentences from 6 templates, 60 held-out sentences from 2 other templates with names,
     jobs and cities never seen in training, one template giving the age in words ("forty-two")
     (correct = the parsed JSON equals the reference): a skill and a strict output format, which
     leans on the base model's reading and number knowledge rather than on memory.

    python bench/quality.py --quick                        # CPU: 1 seed, 2 epochs, demo task
    python bench/quality.py --device cuda --jobs 16        # 3 seeds, 3 epochs, both tasks, 16 at once

Each (format, seed, task) is one job; with ``--jobs N`` they run as N parallel processes (spread
over the visible GPUs). Prints one JSON line per job, then the table (mean ± std over seeds); rows
are appended to --out.
"""
import argparse
import json
import math
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


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
            dq = m.base_weight(torch.float32)
            w = source.get(name + ".weight").float().to(dq.device)
            per[name.rsplit(".", 1)[-1]].append(((w - dq).abs().mean() / w.abs().mean()).item())
    return {t: round(statistics.mean(v), 5) for t, v in per.items() if v}


def perplexity(model, tok, n_tokens: int, window: int = 512) -> float:
    import torch
    from pydoc_data.topics import topics

    from qlora.linear import dequant_cache
    text = "\n\n".join(topics[k] for k in sorted(topics))
    ids = tok(text, return_tensors="pt").input_ids[0, :n_tokens]
    nll, n = 0.0, 0
    dev = next(p for p in model.parameters()).device
    model.eval()
    with torch.no_grad(), dequant_cache(model):
        for s in range(0, len(ids) - 1, window):
            x = ids[s:s + window].unsqueeze(0).to(dev)
            out = model(input_ids=x, labels=x, use_cache=False)
            nll += out.loss.item() * (x.shape[1] - 1)
            n += x.shape[1] - 1
    return math.exp(nll / n)


# ---------------------------------------------------------------------------------------------
# the second task: structured extraction, held-out templates and values

FIRST = ["Amara", "Bastian", "Chiara", "Dmitri", "Elif", "Farid", "Greta", "Hiroshi", "Ines", "Jonas", "Kalani",
         "Lorenzo", "Mireille", "Nikolai", "Oona", "Pedro", "Quinn", "Rosalind", "Sven", "Tamsin"]
HELD_FIRST = ["Ulrike", "Viggo", "Wanjiru", "Ximena", "Yusuf", "Zofia"]
JOBS = ["baker", "pilot", "nurse", "architect", "plumber", "chemist", "teacher", "librarian", "welder", "surgeon",
        "florist", "journalist"]
HELD_JOBS = ["geologist", "carpenter", "translator"]
CITIES = ["Lisbon", "Oslo", "Nairobi", "Osaka", "Quito", "Tallinn", "Perth", "Lyon", "Hanoi", "Tunis", "Bergen",
          "Cusco"]
HELD_CITIES = ["Porto", "Gdansk", "Accra"]
TEMPLATES = ["{name} is {age} years old and works as a {job} in {city}.",
             "Meet {name}, a {age}-year-old {job} from {city}.",
             "{name}, aged {age}, lives in {city} where they work as a {job}.",
             "In {city}, {name} ({age}) earns a living as a {job}.",
             "Our new {job} is {name}; {name} is {age} and moved here from {city}.",
             "{name} has been a {job} in {city} since turning {age_words}.",
             "The {job} {name} from {city} celebrated their {age}th birthday.",
             "Age {age_words}, based in {city}: {name} is the {job} you asked about."]
UNITS = "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen " \
        "seventeen eighteen nineteen".split()
TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()


def words(n: int) -> str:
    """19 -> 'nineteen', 42 -> 'forty-two' (ages in words: the model must turn them into numbers)."""
    return UNITS[n] if n < 20 else TENS[n // 10] + ("" if n % 10 == 0 else "-" + UNITS[n % 10])
INSTRUCTION = "Extract the person's name, age, job and city from the sentence as JSON."


def extract_task(seed: int = 0, n_train: int = 240, n_held: int = 60):
    """Chat records (train, held-out) and the held-out reference objects."""
    rng = random.Random(seed)

    def rec(names, jobs, cities, templates):
        p = {"name": rng.choice(names), "age": rng.randint(19, 78), "job": rng.choice(jobs), "city": rng.choice(cities)}
        template = rng.choice(templates)
        text = template.format(**p, age_words=words(p["age"]))
        TEMPLATE_OF[json.dumps(p) + text] = TEMPLATES.index(template)
        answer = json.dumps(p)
        return {"messages": [{"role": "user", "content": f"{INSTRUCTION}\n{text}"},
                             {"role": "assistant", "content": answer}]}, p

    train = [rec(FIRST, JOBS, CITIES, TEMPLATES[:6])[0] for _ in range(n_train)]
    held = [rec(HELD_FIRST, HELD_JOBS, HELD_CITIES, TEMPLATES[6:]) for _ in range(n_held)]
    return train, [r for r, _ in held], [p for _, p in held]


TEMPLATE_OF: dict = {}


def json_correct(answer: str, ref: dict) -> bool:
    try:
        return json.loads(answer.strip()) == ref
    except ValueError:
        return False


def json_accuracy(answers, refs) -> float:
    return sum(json_correct(a, r) for a, r in zip(answers, refs)) / len(refs)


def extract_breakdown(answers, held, refs) -> dict:
    """Held-out accuracy per template, and which fields the wrong answers got wrong."""
    per, fields = {}, {"unparsable": 0}
    for a, h, r in zip(answers, held, refs):
        text = h["messages"][0]["content"].split("\n", 1)[1]
        t = TEMPLATE_OF[json.dumps(r) + text]
        per.setdefault(t, []).append(json_correct(a, r))
        if not json_correct(a, r):
            try:
                got = json.loads(a.strip())
                for k in r:
                    if not isinstance(got, dict) or got.get(k) != r[k]:
                        fields[k] = fields.get(k, 0) + 1
            except ValueError:
                fields["unparsable"] += 1
    return {"by_template": {f"t{t}": round(sum(v) / len(v), 3) for t, v in sorted(per.items())}, "wrong_fields": fields}


# ---------------------------------------------------------------------------------------------
# one job: (format, seed, task)


def run_job(fmt: str, seed: int, task: str, device: str, epochs: float, n_text: int, model_path: str | None,
            measure_base: bool, tokenizer: str | None = None) -> dict:
    from qlora.data import Batches, load_examples, pad_id
    from qlora.demo import accuracy, held_out_answers
    from qlora.demo_data import write
    from qlora.embedded import embedded_model_path
    from qlora.loss import evaluate_loss
    from qlora.model import LoraSettings, QuantSettings, build_from_source
    from qlora.sources import open_source
    from qlora.train import TrainConfig, train
    t0 = time.time()
    source = open_source(model_path or embedded_model_path())
    if tokenizer:
        from transformers import AutoTokenizer
        tok = AutoTokenizer.from_pretrained(tokenizer)
    else:
        tok = source.load_tokenizer()
    work = Path(tempfile.mkdtemp(prefix=f"qlora-quality-{fmt}-{seed}-{task}-"))
    if task == "demo":
        train_file, held_file, keys = write(work / "data")
        held = [json.loads(x) for x in held_file.read_text().splitlines()]
        score = lambda answers: accuracy(answers, keys)  # noqa: E731
    elif task == "extract":
        tr, held, refs = extract_task(0)
        (work / "data").mkdir()
        train_file, held_file = work / "data" / "train.jsonl", work / "data" / "heldout.jsonl"
        train_file.write_text("".join(json.dumps(r) + "\n" for r in tr))
        held_file.write_text("".join(json.dumps(r) + "\n" for r in held))
        score = lambda answers: json_accuracy(answers, refs)  # noqa: E731
    else:
        raise SystemExit(f"unknown task {task!r}")
    held_ex, _ = load_examples(held_file, tok, max_length=128)
    held_batches = list(Batches(held_ex, 8, pad_id(tok), shuffle=False, max_length=128).epoch(0))
    qt, dq = FORMATS[fmt]
    quant = QuantSettings(quant_type=qt, double_quant=dq)
    model = build_from_source(source, quant, LoraSettings(16, 32, 0.0), device, "auto", seed, progress=False)
    row = {"format": fmt, "seed": seed, "task": task}
    if measure_base:
        row["recon"] = recon_error(model, source)
        row["ppl_base"] = round(perplexity(model, tok, n_text), 3)
    row["heldout_acc_before"] = round(score(held_out_answers(model, tok, held, max_new_tokens=48)), 4)
    cfg = TrainConfig(data=str(train_file), output=str(work / "run"), rank=16, alpha=32, dropout=0.0, lr=1e-3,
                      batch_size=8, grad_accum=1, epochs=epochs, max_length=128, optim="adamw",
                      grad_checkpointing=False, save_every=0, keep_last=1, device=device, overwrite=True,
                      progress=False, seed=seed, quant_type=qt or "none", double_quant=dq)
    s = train(cfg, log=lambda m: None, model=model, tokenizer=tok)
    row["final_train_loss"] = s["final_loss"]
    row["heldout_loss"] = round(evaluate_loss(model, held_batches, device), 4)
    answers = held_out_answers(model, tok, held, max_new_tokens=48)
    row["heldout_acc"] = round(score(answers), 4)
    if task == "extract":
        row.update(extract_breakdown(answers, held, refs))
    row["train_s"] = s["train_time_s"]
    row["seconds"] = round(time.time() - t0, 1)
    row["device"] = device
    return row


def summarize(rows: list[dict], formats: list[str], tasks: list[str]) -> None:
    sd = (lambda v, f=".3f": f" ± {statistics.stdev(v):{f}}" if len(v) > 1 else "")
    print("| base | recon err (mean q/k/v/o/gate/up/down) | base ppl | " +
          " | ".join(f"{t} held-out loss | {t} held-out acc" for t in tasks) + " | seeds |")
    print("|---|---|---|" + "---|---|" * len(tasks) + "---|")
    for fmt in formats:
        base = [r for r in rows if r["format"] == fmt and "recon" in r]
        cells = [f"{statistics.mean(base[0]['recon'].values()):.4f}" if base else "—",
                 f"{base[0]['ppl_base']:.2f}" if base else "—"]
        n = 0
        for t in tasks:
            rs = [r for r in rows if r["format"] == fmt and r.get("task", "demo") == t]
            n = max(n, len(rs))
            hl, ha = [r["heldout_loss"] for r in rs], [r["heldout_acc"] for r in rs]
            cells += [f"{statistics.mean(hl):.4f}{sd(hl)}" if hl else "—",
                      f"{100 * statistics.mean(ha):.1f}%{sd([100 * x for x in ha], '.1f')}" if ha else "—"]
        print(f"| {fmt} | " + " | ".join(cells) + f" | {n} |")



def run_parallel(commands: list, parallel: int, on_row) -> None:
    """Run each ``(job, command)`` as a subprocess, at most ``parallel`` at once (2 threads each unless
    OMP_NUM_THREADS says otherwise); ``on_row`` gets the JSON of each finished job's last stdout line, and a
    failed job's stderr tail is printed."""
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    running, pending = [], list(commands)
    while pending or running:
        while pending and len(running) < parallel:
            job, cmd = pending.pop(0)
            running.append((subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                             text=True), job))
        time.sleep(1)
        for p, job in list(running):
            if p.poll() is None:
                continue
            running.remove((p, job))
            out, err = p.communicate()
            if p.returncode:
                print(f"job {job} failed:\n{err[-2000:]}", file=sys.stderr, flush=True)
            else:
                on_row(json.loads(out.strip().splitlines()[-1]))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="CPU budget: 1 seed, 2 epochs, demo task, 2,048 text tokens")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (jobs spread over the visible GPUs)")
    ap.add_argument("--formats", default=",".join(FORMATS))
    ap.add_argument("--tasks", default=None, help="comma list of demo,extract (default: both; --quick: demo)")
    ap.add_argument("--seeds", type=int, default=None)
    ap.add_argument("--epochs", type=float, default=None)
    ap.add_argument("--text-tokens", type=int, default=None)
    ap.add_argument("--model", default=None, help="model file (default: the embedded SmolLM2-135M GGUF)")
    ap.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the model's own)")
    ap.add_argument("--jobs", type=int, default=1, help="run this many jobs at once, as separate processes")
    ap.add_argument("--out", default="quality_results.jsonl")
    ap.add_argument("--summarize", default=None, metavar="ROWS.jsonl", help="only print the table of saved rows")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)  # FORMAT:SEED:TASK:MEASURE_BASE:DEVICE
    a = ap.parse_args()
    seeds = a.seeds or (1 if a.quick else 3)
    epochs = a.epochs or (2 if a.quick else 3)
    n_text = a.text_tokens or (2048 if a.quick else 16384)
    formats = a.formats.split(",")
    tasks = (a.tasks or ("demo" if a.quick else "demo,extract")).split(",")
    if a.summarize:
        rows = [json.loads(x) for x in Path(a.summarize).read_text().splitlines() if x.strip()]
        summarize(rows, formats, sorted({r.get("task", "demo") for r in rows}, key=["demo", "extract"].index))
        return
    if a.one:
        fmt, seed, task, base, dev = a.one.split(":", 4)
        row = run_job(fmt, int(seed), task, dev, epochs, n_text, a.model, base == "1", a.tokenizer)
        print(json.dumps(row), flush=True)
        with open(a.out, "a") as f:
            f.write(json.dumps(row) + "\n")
        return
    jobs = [(f, s, t) for t in tasks for s in range(seeds) for f in formats]
    jobs.sort(key=lambda j: (j[0] == "bf16" and j[2] == "demo" and j[1] == 0), reverse=True)  # longest first
    ngpu = 0
    if a.device.startswith("cuda"):
        import torch
        ngpu = torch.cuda.device_count()
    rows = []
    if a.jobs <= 1:
        for k, (f, s, t) in enumerate(jobs):
            row = run_job(f, s, t, a.device, epochs, n_text, a.model, s == 0 and t == tasks[0], a.tokenizer)
            print(json.dumps(row), flush=True)
            with open(a.out, "a") as fh:
                fh.write(json.dumps(row) + "\n")
            rows.append(row)
    else:
        commands = []
        for k, (f, s, t) in enumerate(jobs):
            dev = f"cuda:{k % ngpu}" if ngpu else "cpu"
            cmd = [sys.executable, __file__, "--one", f"{f}:{s}:{t}:{int(s == 0 and t == tasks[0])}:{dev}",
                   "--epochs", str(epochs), "--text-tokens", str(n_text), "--out", a.out]  # each job appends its row
            cmd += ["--model", a.model] if a.model else []
            cmd += ["--tokenizer", a.tokenizer] if a.tokenizer else []
            commands.append(((f, s, t), cmd))

        def on_row(row):
            print(json.dumps(row), flush=True)
            rows.append(row)
        run_parallel(commands, a.jobs, on_row)
    print(f"\nembedded SmolLM2-135M, tasks {', '.join(tasks)}, {epochs:g} epochs, {seeds} seed(s), "
          f"base perplexity on {n_text} tokens of pydoc_data text")
    summarize(rows, formats, tasks)


if __name__ == "__main__":
    main()
