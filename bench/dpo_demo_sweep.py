"""Settings of the DPO demo (`qlora demo --method dpo`) side by side: the share of held-out answers that follow
the preference before/after, the training time and the final loss, for a grid of learning rate, epochs and beta.

Usage: python bench/dpo_demo_sweep.py [--device cuda] [--grid lr:epochs:beta[:sft_weight],...] [--out FILE.jsonl]
(default grid: the demo's default and lower learning rates). Each setting reloads the embedded model."""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

DEFAULT_GRID = "5e-4:2:0.1,2e-4:2:0.1,1e-4:2:0.1,5e-5:2:0.1,2e-4:1:0.1,1e-4:2:0.5"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--grid", default=DEFAULT_GRID,
                    help="lr:epochs:beta[:sft_weight] settings, comma separated (sft_weight: DPO's --sft-weight, default 0)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--out", default=None, help="append one JSON line per setting to this file")
    args = ap.parse_args(argv)
    from qlora.demo import run_preference_demo
    rows = []
    for item in args.grid.split(","):
        lr, epochs, beta, sft = ([float(x) for x in item.split(":")] + [0.0])[:4]
        with tempfile.TemporaryDirectory() as d:
            r = run_preference_demo(output=str(Path(d) / "demo"), epochs=epochs, lr=lr, beta=beta, sft_weight=sft,
                                    batch_size=args.batch_size, device=args.device, progress=False,
                                    log=lambda m: None)
        row = dict(lr=lr, epochs=epochs, beta=beta, sft_weight=sft, batch_size=args.batch_size,
                   **{k: r[k] for k in ("preference_before", "preference_after", "train_time_s", "total_time_s",
                                        "steps", "final_loss")}, sample_after=r["samples"][0]["after"])
        print(json.dumps(row), flush=True)
        rows.append(row)
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(row) + "\n")
    print("| lr | epochs | beta | sft weight | before | after | train s | final loss |\n|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['lr']:g} | {r['epochs']:g} | {r['beta']:g} | {r['sft_weight']:g} | {r['preference_before']:.0%} | "
              f"{r['preference_after']:.0%} | {r['train_time_s']:.0f} | {r['final_loss']:.4f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
