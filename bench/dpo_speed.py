"""DPO speed and peak memory of qlora beside TRL's DPOTrainer (transformers + bitsandbytes + peft), one GPU call.

    python bench/dpo_speed.py --out dpo.jsonl                 # 8B shape, seq 1024, 2 pairs, rows ours,sft,trl
    python bench/dpo_speed.py --precompute-ref                # + a row with precomputed reference log-probs
    python bench/dpo_speed.py --small                         # a tiny shape on the CPU: checks the script
    python bench/dpo_speed.py --rows ours-pre,sft,trl --memory-budget auto  # our rows spend memory on speed

Rows (``--rows``), each in its own subprocess so that each peak of ``torch.cuda.max_memory_allocated`` is its own:

* ``ours``     DPO (sigmoid loss) through qlora's training path (:class:`qlora.train.Run`: ``train_step`` ->
               ``MicroStep`` -> :class:`qlora.methods.Preference`), reference = the same model with LoRA off,
               computed in the step, with qlora train's default ``--share-prompt auto``; ``ours-shared``:
               each pair's shared prompt run once (``--share-prompt true``; auto does the same with sdpa attention);
               ``ours-whole``: every sequence run whole (``--share-prompt false``, what TRL does);
               ``ours-pre`` (with ``--precompute-ref``): reference log-probs computed once
               before the first step (not in the step time; its seconds are reported as ``ref_precompute_s``);
               ``-stream`` (last): the blocks' frozen weights streamed from pinned CPU memory
               (``--offload-weights true``, the model built straight into host memory) and the input embeddings
               in CPU memory (``--offload-embeddings``), e.g. ``ours-pre-shared-stream``: the peak without the 4-bit
               blocks on the GPU, and what the copies cost (``copied_gib_per_step``).
               The suffixes combine, and ``@BUDGET`` gives one row its own ``--memory-budget``:
               ``ours-pre-shared@auto`` is DPO with a precomputed reference, each prompt run once, and every
               block that fits keeping its activations.
* ``sft``      our SFT step on the same tokens (each pair's two sequences as SFT rows, loss on the answers),
               with what ``qlora train`` uses by default (CUDA graphs where they apply): for "our DPO step
               <= 1.6x our SFT step".
* ``trl``      ``trl.DPOTrainer`` as its docs show for QLoRA: the model given as a path, ``quantization_config``
               (bitsandbytes NF4 + double quant, bf16 compute) and ``peft_config`` (LoRA) passed to the trainer,
               reference = the adapters disabled (``precompute_ref_log_probs=False``), sigmoid loss, gradient
               checkpointing without reentrance, ``paged_adamw_32bit``, bf16.

Both stacks: the same random weights (``qlora.model.RandomSource``: ours quantizes them as they are drawn, with no
16-bit copy of the model; the parent process writes the very same tensors once to an HF safetensors folder for
TRL, ``--model-dir``), LoRA r=``--rank`` alpha 16 without dropout on every block linear, lr 2e-4 constant, clipping
0.3, ``--pairs`` pairs per micro-batch and no accumulation, ``--steps`` steps, median step time after ``--warmup``.
tok/s counts every token of both sequences of every pair (``2 * pairs * seq`` per step).

The data are the same token ids for both stacks: pairs of random ids (no special token), a prompt of ``seq // 2``
ids and two different answers filling each sequence to exactly ``--seq`` tokens, the last answer token being EOS.
TRL 1.16 does not take pre-tokenized pairs: ``DPOTrainer._prepare_dataset`` always extracts a prompt, appends EOS
to text answers and tokenizes ``prompt``, ``prompt + chosen`` and ``prompt + rejected``. So the rows are given to it
as text that its tokenizer turns back into exactly these ids: the benchmark's tokenizer (saved in the model folder,
used by both stacks) is a word-level one whose words are the ids written in decimal ("17 90210 ..."), EOS being
"<eos>"; each answer is the text " id id ... <eos>", so TRL adds no EOS and the prompt is a token prefix of both
sequences. A real tokenizer would not do: random ids do not survive decode -> encode, and the speed does not
depend on the tokenizer. The TRL child checks that its tokenized dataset holds exactly our ids.

``--small``: a tiny Llama shape on the CPU, seq 64, 4 steps, seconds per row (fp32; ours with plain AdamW, TRL with
``adamw_torch``: paged optimizers need CUDA). TRL's row still loads the model in bitsandbytes 4-bit when that works
on the CPU (bitsandbytes 0.50.2 does), else without quantization, and says which in its JSON line (``quantized``).

The GPU machine lacks trl and datasets' pure-Python dependencies: install the carried wheels first (see
docs/preference.md, "Speed against TRL"); the TRL child runs with the same ``PYTHONPATH``.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GiB = 1 << 30
EOS_TEXT = "<eos>"
MARK = "RESULT "  # a child's result line

# a tiny untied Llama for --small (untied: the HF folder then holds the lm_head we draw)
SMALL = dict(model_type="llama", vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
             tie_word_embeddings=False, bos_token_id=0, eos_token_id=1)


# --------------------------------------------------------------------------------------------- shared
def shape_config(a):
    """The transformers config of ``--shape`` (or the tiny --small one)."""
    if a.small:
        from transformers import AutoConfig
        kw = dict(SMALL)
        return AutoConfig.for_model(kw.pop("model_type"), **kw)
    from qlora.plan import shape_config as plan_shape
    return plan_shape(a.shape)


def eos_id(config) -> int:
    e = config.eos_token_id
    return int(e[0] if isinstance(e, (list, tuple)) else e)


def make_pairs(vocab: int, eos: int, seq: int, n: int, seed: int) -> list[tuple[list[int], list[int], list[int]]]:
    """``n`` (prompt, chosen, rejected) id lists: random ids other than ``eos``, answers ending in ``eos``;
    ``len(prompt) + len(answer) == seq``. The same arguments give the same pairs in every process."""
    import torch
    g = torch.Generator().manual_seed(seed)
    p_len, a_len = seq // 2, seq - seq // 2

    def ids(k: int) -> list[int]:
        t = torch.randint(0, vocab - 1, (k,), generator=g)
        return (t + (t >= eos).long()).tolist()  # skip the eos id: it only ends answers

    out = []
    for _ in range(n):
        prompt = ids(p_len)
        chosen, rejected = ids(a_len - 1) + [eos], ids(a_len - 1) + [eos]
        out.append((prompt, chosen, rejected))
    return out


def word_tokenizer(vocab: int, eos: int):
    """A fast tokenizer whose words are token ids in decimal (id ``eos`` is ``<eos>``): the text of an id list
    tokenizes back to exactly that list, with no special token added."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    words = {str(i): i for i in range(vocab) if i != eos}
    words[EOS_TEXT] = eos
    t = Tokenizer(models.WordLevel(words, unk_token=EOS_TEXT))
    t.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=t, eos_token=EOS_TEXT, pad_token=EOS_TEXT)


def text(ids: list[int], eos: int) -> str:
    return " ".join(EOS_TEXT if i == eos else str(i) for i in ids)


def device_of(a) -> str:
    return "cpu" if a.small else "cuda"


def sync(device: str) -> None:
    if device == "cuda":
        import torch
        torch.cuda.synchronize()


def peak_gib(device: str) -> float | None:
    if device != "cuda":
        return None
    import torch
    return round(torch.cuda.max_memory_allocated() / GiB, 2)


def median_after(times: list[float], warmup: int) -> float:
    steady = sorted(times[warmup:] if len(times) > warmup else times)
    return steady[len(steady) // 2]


# ------------------------------------------------------------------------------------- the HF folder
def write_hf(a, path: Path) -> None:
    """The random weights ours builds (same RandomSource arguments, read in the same order), as an HF
    safetensors folder with config and tokenizer, tensor by tensor: no copy of the whole model on the device.
    Kept between runs (a marker names the settings it was written for)."""
    marker = path / "dpo_speed.json"
    want = {"shape": "small" if a.small else a.shape, "seed": a.seed, "device": device_of(a)}
    if marker.is_file() and json.loads(marker.read_text()) == want:
        return
    import torch
    from safetensors.torch import save_file

    from qlora.model import RandomSource, skeleton
    t = time.time()
    config = shape_config(a)
    dtype = torch.float32 if a.small else torch.bfloat16
    src = RandomSource(config, dtype, device_of(a), seed=a.seed)
    path.mkdir(parents=True, exist_ok=True)
    shard, size, files, index = {}, 0, [], {}

    def flush():
        name = f"model-{len(files) + 1:05d}.safetensors"
        save_file(shard, str(path / name), metadata={"format": "pt"})
        files.append(name)
        index.update({k: name for k in shard})

    for name in src.names():  # the order build_from_source reads them in: the generator draws the same values
        shard[name] = src.get(name).cpu().contiguous()
        size += shard[name].numel() * shard[name].element_size()
        if size >= 2 * GiB:
            flush()
            shard, size = {}, 0
    if shard:
        flush()
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": index}))
    config.dtype, config.architectures = dtype, [type(skeleton(config, dtype)).__name__]
    config.save_pretrained(path)
    word_tokenizer(config.vocab_size, eos_id(config)).save_pretrained(path)
    marker.write_text(json.dumps(want))
    print(f"wrote the random weights to {path} in {time.time() - t:.1f}s", flush=True)


# ----------------------------------------------------------------------------------------------- ours
def ours_examples(method: str, pairs):
    """Our training examples of the pairs: DPO pairs, or each pair's two sequences as SFT rows (both trained
    on their answer tokens, as the DPO loss scores them)."""
    from qlora.data import IGNORE, Example
    from qlora.preference_data import Pair

    def seq(prompt, answer):
        return Example(prompt + answer, [IGNORE] * len(prompt) + answer)

    if method == "sft":
        return [seq(p, x) for p, c, r in pairs for x in (c, r)]
    return [Pair(seq(p, c), seq(p, r), "synthetic") for p, c, r in pairs]


ROW = re.compile(r"^(ours(-pre)?(-shared|-whole)?(-stream)?|sft|trl)(@[^,@]+)?$")


def row_options(row: str, budget: str) -> dict:
    """What a row name asks of our run: ``ours[-pre][-shared|-whole][-stream][@BUDGET]`` (-pre: --precompute-ref;
    -shared/-whole: --share-prompt true/false, else auto; -stream: --offload-weights true and --offload-embeddings;
    @BUDGET: this row's --memory-budget, else ``budget``)."""
    m = ROW.match(row)
    return dict(precompute=bool(m.group(2)), share={"-shared": "true", "-whole": "false"}.get(m.group(3), "auto"),
                stream=bool(m.group(4)), budget=m.group(5)[1:] if m.group(5) else budget)


def run_ours(a, row: str) -> dict:
    """One of our rows through qlora.train.Run, its data the synthetic pairs' token ids (:class:`Given`)."""
    import contextlib

    import torch

    from qlora.model import LoraSettings, QuantSettings, build_random
    from qlora.train import Run, TrainConfig
    device = device_of(a)
    method = "sft" if row.split("@")[0] == "sft" else "dpo"
    config = shape_config(a)
    pairs = make_pairs(config.vocab_size, eos_id(config), a.seq, a.pairs * a.steps, a.seed)
    examples = ours_examples(method, pairs)
    dtype = "fp32" if a.small else "bf16"
    out = Path(tempfile.mkdtemp(prefix=f"dpo_speed_{row}_")) / "run"
    # model=None: the model is given to the run (its log line then names the embedded default model)
    opts = row_options(row, a.memory_budget)
    if opts["stream"] and device == "cpu":  # --small: the streaming path between CPU buffers (a check of the script)
        os.environ["QLORA_STREAM_CPU"] = "1"
        from qlora import settings
        settings.refresh()
    cfg = TrainConfig(data="synthetic", method=method, beta=a.beta, loss="sigmoid", precompute_ref=opts["precompute"],
                      share_prompt=opts["share"],
                      model=None, rank=a.rank, alpha=16.0, dropout=0.0, lr=2e-4, max_grad_norm=0.3,
                      warmup_ratio=0.0, optim="adamw" if a.small else "paged_adamw", compute_dtype=dtype,
                      batch_size=a.pairs * (2 if method == "sft" else 1), grad_accum=1, max_steps=a.steps,
                      max_length=a.seq, grad_checkpointing=True, cuda_graphs=not a.no_cuda_graphs, output=str(out),
                      val_split=0.0, save_every=0, progress=False, device=device, seed=a.seed,
                      memory_budget=opts["budget"], offload_weights="true" if opts["stream"] else "false",
                      offload_embeddings=opts["stream"])
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t = time.time()
    # the weights write_hf gave TRL: build_random draws from RandomSource with the same seed, on the same device
    # (-stream: each block's weights go to pinned host memory as soon as it is built; the run finds them streamed)
    from qlora.stream import WeightStreamer
    streamer = WeightStreamer(include_cpu=device == "cpu", only=streamed_only(cfg, device, config)) \
        if opts["stream"] else None
    model = build_random(config, QuantSettings(compute_dtype=dtype), LoraSettings(r=a.rank, alpha=16.0, dropout=0.0),
                         device, dtype, seed=a.seed, progress=False, stream=streamer)
    build_s = time.time() - t
    from qlora.methods import method_for
    run = Run(cfg, log=lambda m: print(m, file=sys.stderr), model=model,
              tokenizer=word_tokenizer(config.vocab_size, eos_id(config)), method=Given(method_for(cfg), examples))
    t = time.time()
    run.setup()  # with ours-pre: the reference log-probs of every pair, before the first step
    setup_s = time.time() - t
    times, rows = [], []
    copied = streamer.stats["bytes"] if streamer is not None else 0
    with contextlib.ExitStack() as stack:
        run._enter(stack)  # what Run.fit runs its steps inside (dequant cache, micro-step, CUDA graphs)
        run.t_loop = time.time()
        for i in range(a.steps):
            sync(device)
            prof = profiler(device) if a.profile and i == a.steps - 1 else contextlib.nullcontext()
            with prof:
                t = time.time()
                rows.append(run.train_step())
                sync(device)
                times.append(time.time() - t)
    profiled = {}
    if a.profile:
        from bench.train_speed import profile_summary
        profiled = profile_summary(prof, times[-1], top=20)
    step = median_after(times, a.warmup)
    return dict(row=row, stack="qlora", method=method, reference="precomputed" if opts["precompute"] else
                ("live (adapters off)" if method == "dpo" else None), shape=a.shape, seq=a.seq, pairs=a.pairs,
                rank=a.rank, steps=a.steps, step_s=round(step, 4), tok_s=round(2 * a.pairs * a.seq / step, 1),
                peak_gib=peak_gib(device), build_s=round(build_s, 1), memory_budget=opts["budget"],
                share_prompt=cfg.share_prompt if method == "dpo" else None,
                **({"policy": run.policy.describe(), "plan_peak_gib": round(run.policy.peak / 2**30, 2)}
                   if run.policy is not None else {}),
                **({"ref_precompute_s": round(setup_s, 1)} if opts["precompute"] else {}),
                **({"offload_weights": True, "host_weights_gib": round(streamer.host_bytes / 2**30, 3),
                    "copied_gib_per_step": round((streamer.stats["bytes"] - copied) / a.steps / 2**30, 3)}
                   if streamer is not None else {}),
                cuda_graphs=run.graphed is not None, loss=rows[-1]["loss"], times=[round(x, 4) for x in times],
                **profiled)


def streamed_only(cfg, device: str, config) -> list[int] | None:
    """With a memory budget, the blocks whose weights its policy streams (the fewest that fit, spread: what
    ``qlora train --memory-budget`` builds); None (all of them) without one, or where it streams every block."""
    if cfg.memory_budget == "off":
        return None
    import dataclasses

    import torch

    from qlora.budget import for_train
    from qlora.plan import streamed_blocks
    pol = for_train(dataclasses.replace(cfg, offload_weights="auto"), torch.device(device), config)
    layers = int(config.num_hidden_layers)
    return streamed_blocks(layers, pol.stream) if pol is not None and 0 < pol.stream < layers else None


def profiler(device: str):
    """torch's profiler over one step: CPU ops, and CUDA kernels and copies on a GPU."""
    import torch
    acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if device == "cuda" else [])
    return torch.profiler.profile(activities=acts)


class Given:
    """A training method (qlora.methods) whose data are examples given as token ids: ``read`` hands them over
    as the records and ``examples`` returns them as they are (no file, no tokenizer); batches, token counts and
    the loss are the wrapped method's. It plugs in at the run's method seam, so the rest of
    :class:`qlora.train.Run` (output folder, validation split, optimizer, reference, steps) is the run's own."""

    def __init__(self, method, examples: list):
        self.inner, self.given = method, examples
        self.name = method.name

    def __getattr__(self, name):  # batches, tokens, loss, graphs_refused, bar, core: the wrapped method's
        return getattr(self.inner, name)

    def read(self, path, cfg) -> tuple:
        return self.given, "token ids"

    def examples(self, records, fmt: str, tokenizer, cfg) -> tuple[list, dict]:
        seqs = [e for x in records for e in ((x.chosen, x.rejected) if hasattr(x, "chosen") else (x,))]
        trained = sum(sum(t != -100 for t in e.labels) for e in seqs)
        return list(records), {"examples": len(records), "kept": len(records), "tokens": sum(map(len, seqs)),
                               "trained_tokens": trained, "truncated": 0, "dropped": 0}


# ------------------------------------------------------------------------------------------------ TRL
def trl_dataset(pairs, eos: int):
    """The pairs as TRL's standard (text) preference layout; answers start with a space so that
    ``prompt + answer`` splits into the same words."""
    from datasets import Dataset
    return Dataset.from_list([{"prompt": text(p, eos), "chosen": " " + text(c, eos), "rejected": " " + text(r, eos)}
                              for p, c, r in pairs])


def trl_timer(device: str, times: list, marks: dict):
    """A TrainerCallback timing each optimizer step (synchronised), from on_step_begin to on_step_end."""
    from transformers import TrainerCallback

    class Timer(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            marks["train_begin_gib"] = peak_gib(device)

        def on_step_begin(self, args, state, control, **kw):
            sync(device)
            self.t = time.time()

        def on_step_end(self, args, state, control, **kw):
            sync(device)
            times.append(time.time() - self.t)

    return Timer()


def check_trl_tokens(trainer, pairs) -> None:
    """TRL's tokenized dataset holds exactly our ids (prompt, chosen, rejected): the rows compare like for like."""
    ds = trainer.train_dataset
    for i in (0, len(pairs) - 1):
        got = (ds[i]["prompt_ids"], ds[i]["chosen_ids"], ds[i]["rejected_ids"])
        if tuple(map(list, got)) != tuple(pairs[i]):
            raise SystemExit(f"TRL tokenized pair {i} differently from our ids: the comparison would not be fair")


def run_trl(a) -> dict:
    import torch
    from peft import LoraConfig
    from transformers import AutoTokenizer, BitsAndBytesConfig
    from trl import DPOConfig, DPOTrainer
    device, path = device_of(a), a.model_dir
    tok = AutoTokenizer.from_pretrained(path)
    config = shape_config(a)
    pairs = make_pairs(config.vocab_size, eos_id(config), a.seq, a.pairs * a.steps, a.seed)
    compute = torch.float32 if a.small else torch.bfloat16
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=compute)
    times, marks = [], {}
    args = DPOConfig(
        output_dir=tempfile.mkdtemp(prefix="dpo_speed_trl_"), per_device_train_batch_size=a.pairs,
        gradient_accumulation_steps=1, max_steps=a.steps, learning_rate=2e-4, lr_scheduler_type="constant",
        warmup_steps=0, max_grad_norm=0.3, optim="adamw_torch" if a.small else "paged_adamw_32bit",
        bf16=not a.small, use_cpu=a.small, gradient_checkpointing=True,
        gradient_checkpointing_kwargs={"use_reentrant": False}, beta=a.beta, loss_type=["sigmoid"],
        precompute_ref_log_probs=False, max_length=a.seq, logging_steps=1, report_to="none", save_strategy="no",
        seed=a.seed, disable_dropout=True,
        model_init_kwargs=dict(dtype="float32" if a.small else "bfloat16", attn_implementation="sdpa",
                               **({} if a.small else {"device_map": {"": 0}})))
    lora = LoraConfig(r=a.rank, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t = time.time()
    quantized = True
    try:
        trainer = DPOTrainer(model=str(path), args=args, train_dataset=trl_dataset(pairs, eos_id(config)),
                             processing_class=tok, peft_config=lora, quantization_config=quant,
                             callbacks=[trl_timer(device, times, marks)])
    except Exception as e:  # --small only: bitsandbytes 4-bit may not run on this CPU
        if not a.small:
            raise
        print(f"TRL row: no 4-bit model on the CPU ({type(e).__name__}: {e}); unquantized instead", file=sys.stderr)
        quantized = False
        trainer = DPOTrainer(model=str(path), args=args, train_dataset=trl_dataset(pairs, eos_id(config)),
                             processing_class=tok, peft_config=lora, callbacks=[trl_timer(device, times, marks)])
    load_s = time.time() - t
    check_trl_tokens(trainer, pairs)
    trainer.train()
    step = median_after(times, a.warmup)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    import trl
    return dict(row="trl", stack=f"trl {trl.__version__} DPOTrainer + bitsandbytes + peft", method="dpo",
                reference="live (adapters off)", shape=a.shape, seq=a.seq, pairs=a.pairs, rank=a.rank, steps=a.steps,
                step_s=round(step, 4), tok_s=round(2 * a.pairs * a.seq / step, 1), peak_gib=peak_gib(device),
                load_s=round(load_s, 1), quantized=quantized, weights_gib=marks.get("train_begin_gib"),
                loss=round(losses[-1], 5) if losses else None, times=[round(x, 4) for x in times])


# --------------------------------------------------------------------------------------------- parent
def child(a, row: str) -> dict | None:
    """Run ``row`` in a fresh process (its own CUDA memory and peak); its RESULT line, or None if it failed."""
    argv = [sys.executable, str(Path(__file__).resolve()), "--child", row] + a.passthrough
    root = str(Path(__file__).resolve().parents[1])  # `bench.train_speed` for --profile
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1",
               TOKENIZERS_PARALLELISM="false", PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
    p = subprocess.run(argv, env=env, stdout=subprocess.PIPE, stderr=None if a.verbose else subprocess.PIPE,
                       text=True)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith(MARK)]
    if p.returncode or not lines:
        tail = (p.stderr or "")[-3000:] + p.stdout[-1000:]
        print(f"row {row} failed (exit {p.returncode}):\n{tail}", file=sys.stderr, flush=True)
        return {"row": row, "error": f"exit {p.returncode}", "tail": tail[-600:]}
    return json.loads(lines[-1][len(MARK):])


def table(results: list[dict], a) -> str:
    """Markdown table: speed and memory of each row against TRL's; the two targets of issue 26."""
    ok = [r for r in results if "error" not in r]
    trl = next((r for r in ok if r["row"] == "trl"), None)
    lines = [f"{'small CPU shape' if a.small else a.shape}, seq {a.seq} per sequence, {a.pairs} pairs per micro-batch "
             f"({2 * a.pairs * a.seq} tokens per step), LoRA r={a.rank} all-linear, median of steps after {a.warmup}",
             "", "| row | tok/s | step s | peak GiB | speed vs TRL | peak vs TRL |", "|---|---|---|---|---|---|"]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['row']} | failed: {r['error']} | | | | |")
            continue
        sp = f"{r['tok_s'] / trl['tok_s']:.2f}x" if trl else "-"
        mem = f"{r['peak_gib'] / trl['peak_gib']:.2f}x" if trl and r["peak_gib"] and trl["peak_gib"] else "-"
        peak = r["peak_gib"] if r["peak_gib"] is not None else "-"
        lines.append(f"| {r['row']} | {r['tok_s']:,.0f} | {r['step_s']:.3f} | {peak} | {sp} | {mem} |")
    lines.append("")
    if a.small:
        lines.append("(--small: a CPU check of the script; these figures say nothing about speed)")
    by = {r["row"]: r for r in ok}
    if "ours" in by and "sft" in by:
        ratio = by["ours"]["step_s"] / by["sft"]["step_s"]
        lines.append(f"our DPO step / our SFT step on the same tokens: {ratio:.2f}x (target <= 1.6x)")
    for name, r in by.items():  # each -stream row beside the same row without streaming
        base = by.get(name.replace("-stream", "", 1)) if "-stream" in name else None
        if base is not None and r["peak_gib"] and base["peak_gib"]:
            lines.append(f"{name}: peak {r['peak_gib']} GiB against {base['peak_gib']} ({base['peak_gib'] - r['peak_gib']:.2f} "
                         f"GiB less), step {r['step_s'] / base['step_s']:.2f}x as long, {r['copied_gib_per_step']} GiB "
                         f"copied a step")
    if "ours" in by and trl:
        mem = (f", peak {by['ours']['peak_gib'] / trl['peak_gib']:.2f}x TRL's (target <= 0.5x)"
               if by["ours"]["peak_gib"] and trl["peak_gib"] else "")
        lines.append(f"our DPO speed {by['ours']['tok_s'] / trl['tok_s']:.2f}x TRL's (target >= 3x){mem}")
    return "\n".join(lines)


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="llama-3.1-8b", help="a `qlora plan` shape (default llama-3.1-8b)")
    ap.add_argument("--seq", type=int, default=1024, help="tokens per sequence (prompt + answer)")
    ap.add_argument("--pairs", type=int, default=2, help="pairs per micro-batch (2 sequences each)")
    ap.add_argument("--steps", type=int, help="optimizer steps per row (default 8; 4 with --small)")
    ap.add_argument("--warmup", type=int, help="first steps left out of the median (CUDA graph capture, allocator and "
                    "paging warm-up; default 3; 1 with --small)")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rows", default="ours,sft,trl", help="comma list of ours[-pre][-shared|-whole][-stream][@BUDGET], "
                    "sft[@BUDGET] and trl (-pre: precomputed reference; -shared/-whole: --share-prompt true/false; "
                    "-stream: block weights streamed from CPU memory, input embeddings there too; "
                    "@BUDGET: that row's --memory-budget, e.g. ours-pre-shared@auto, ours-pre-shared-stream)")
    ap.add_argument("--precompute-ref", action="store_true", help="also the row ours-pre (reference log-probs "
                    "precomputed before training)")
    ap.add_argument("--no-cuda-graphs", action="store_true", help="our SFT row without CUDA graphs")
    ap.add_argument("--memory-budget", default="off", metavar="off|auto|SIZE",
                    help="our rows' --memory-budget (qlora train's: blocks that fit keep their activations instead "
                         "of being recomputed; default off: every block recomputed, as TRL's row)")
    ap.add_argument("--small", action="store_true", help="a tiny shape on the CPU (checks the script end to end)")
    ap.add_argument("--model-dir", help="HF folder of the random weights for TRL (default /tmp/dpo_speed_SHAPE; "
                    "written once, reused)")
    ap.add_argument("--out", help="append one JSON line per row to this file")
    ap.add_argument("--verbose", action="store_true", help="show the rows' own output")
    ap.add_argument("--profile", action="store_true", help="profile each of our rows' last step (top kernels, the "
                    "device's busy time against the step's)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.small:  # seconds on a CPU: bitsandbytes' CPU 4-bit path takes ~5 s a step even for this shape
        a.seq, a.shape = min(a.seq, 64), "small"
    a.steps = a.steps or (4 if a.small else 8)
    a.warmup = a.warmup if a.warmup is not None else (1 if a.small else 3)
    a.model_dir = Path(a.model_dir or f"/tmp/dpo_speed_{a.shape}")
    a.passthrough = [f"--shape={a.shape}", f"--seq={a.seq}", f"--pairs={a.pairs}", f"--steps={a.steps}",
                     f"--warmup={a.warmup}", f"--rank={a.rank}", f"--beta={a.beta}", f"--seed={a.seed}",
                     f"--model-dir={a.model_dir}", f"--memory-budget={a.memory_budget}"] + \
                    (["--small"] if a.small else []) + \
                    (["--no-cuda-graphs"] if a.no_cuda_graphs else []) + (["--profile"] if a.profile else [])
    return a


def main(argv=None) -> int:
    a = parse(argv)
    if a.child:  # one row, in this process
        r = run_trl(a) if a.child == "trl" else run_ours(a, a.child)
        print(MARK + json.dumps(r), flush=True)
        return 0
    rows = [r for r in a.rows.split(",") if r]
    if a.precompute_ref and "ours-pre" not in rows:
        rows.insert(rows.index("ours") + 1 if "ours" in rows else 0, "ours-pre")
    unknown = [r for r in rows if not ROW.match(r) or r.startswith("trl@")]
    if unknown:
        raise SystemExit(f"unknown rows: {', '.join(unknown)} (ours[-pre][-shared|-whole][-stream][@BUDGET], sft[@BUDGET], "
                         "trl)")
    if "trl" in rows:
        write_hf(a, a.model_dir)
    results = []
    for row in rows:
        r = child(a, row)
        results.append(r)
        print(json.dumps(r), flush=True)
        if a.out:
            with open(a.out, "a") as f:
                f.write(json.dumps(r) + "\n")
    print()
    print(table(results, a))
    return 0 if all("error" not in r for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
