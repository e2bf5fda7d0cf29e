"""The demo fine-tune measured with lm-evaluation-harness (``qlora eval --harness``): a local
multiple-choice task built from the demo's 72 held-out questions (qlora.demo_data), scored on the
embedded SmolLM2-135M-Instruct without and with the demo's adapter.

Each held-out question (rendered with the model's chat template, the way the demo trains) has four
choices: its fact's answer sentence with the right key value, and the same sentence with three wrong
values of the same kind (other digits for numbers, other facts' names/words otherwise; a fixed
random pick); ``acc`` = the right one has the highest summed
log-likelihood, ``acc_norm`` = the same per byte.

    qlora demo --output runs/demo                       # writes runs/demo/run/adapter
    python bench/harness_demo.py --adapter runs/demo/run/adapter --work /tmp/harness-demo
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import subprocess
import sys
import time
from pathlib import Path


def _distractors(key: str, words: list[str], rng: random.Random) -> list[str]:
    """Three wrong values of the same kind: numbers with other digits ("47 minutes" -> "62 minutes"),
    names and words from the other facts' word-only values."""
    if not re.search(r"\d", key):
        return rng.sample([w for w in words if w != key], 3)
    out: list[str] = []
    while len(out) < 3:
        wrong = re.sub(r"\d+", lambda m: str(rng.randrange(1, 10)) + "".join(str(rng.randrange(10))
                                                                            for _ in m.group()[1:]), key)
        if wrong != key and wrong not in out:
            out.append(wrong)
    return out


def write_task(work: Path, tokenizer, seed: int = 0) -> Path:
    from qlora.demo_data import FACTS, build
    _, held, keys = build()
    rng = random.Random(seed)
    facts = {key: answer for _, key, answer in FACTS}
    docs = []
    words = [k for k in facts if not re.search(r"\d", k)]
    for rec, key in zip(held, keys):
        choices = [facts[key]] + [facts[key].replace(key, o) for o in _distractors(key, words, rng)]
        order = list(range(4))
        rng.shuffle(order)
        prompt = tokenizer.apply_chat_template(rec["messages"][:2], tokenize=False, add_generation_prompt=True)
        docs.append({"prompt": prompt, "choices": [choices[i] for i in order], "label": order.index(0)})
    tasks = work / "tasks"
    tasks.mkdir(parents=True, exist_ok=True)
    (tasks / "nimbus_heldout.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (tasks / "nimbus_heldout.yaml").write_text(f"""task: nimbus_heldout
dataset_path: json
dataset_kwargs:
  data_files:
    test: {tasks / 'nimbus_heldout.jsonl'}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{prompt}}}}"
target_delimiter: ""
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
    higher_is_better: true
  - metric: acc_norm
    higher_is_better: true
""")
    return tasks


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--adapter", required=True, help="the demo's adapter (runs/demo/run/adapter)")
    ap.add_argument("--work", default="/tmp/harness-demo", help="folder for the task files")
    ap.add_argument("--compute-dtype", default="auto", help="passed to qlora eval (default: auto)")
    args = ap.parse_args()
    from qlora.embedded import embedded_model_path
    from qlora.sources import open_source
    tasks = write_task(Path(args.work), open_source(embedded_model_path()).load_tokenizer())
    cpu = next((x.split(":", 1)[1].strip() for x in open("/proc/cpuinfo") if x.startswith("model name")), "?")
    flags = sorted({f for x in open("/proc/cpuinfo") if x.startswith("flags") for f in x.split()[2:]}
                   & {"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"})
    print(f"CPU: {cpu}, {os.cpu_count()} cores visible, flags {' '.join(flags)}", file=sys.stderr)
    rows = {}
    for label, extra in (("base", []), ("demo adapter", ["--adapter", args.adapter])):
        cmd = [sys.executable, "-m", "qlora.cli", "eval", "--harness", "nimbus_heldout", "--harness-include",
               str(tasks), "--compute-dtype", args.compute_dtype, "--json", *extra]
        t0 = time.time()
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        rows[label] = dict(json.loads(out)["nimbus_heldout"], seconds=round(time.time() - t0, 1))
        print(label, json.dumps(rows[label]), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
