"""The planner table rows of docs/planner.md from `experiments/plan.py --out FILE.json` files.

    .venv/bin/python dev/plan_rows.py rows/*.json

One Markdown row per compiled program, in docs/planner.md's columns: model, algo, weights, layers
(scanned or unrolled), topology (chips), batch x tokens, microbatches, program, args / temp GB,
total / HBM GB, fits, and the roofline tokens/s and MFU upper bounds ("—" where the compiler
refused the program).
"""

from __future__ import annotations

import json
import sys


def _weights(r: dict) -> str:
    if r.get("lora_rank"):
        base = f"LoRA r{r['lora_rank']}"
        return base if r.get("quantize", "none") == "none" else f"{base} ({r['quantize']})"
    return "full, ref precomputed" if r.get("ref") == "precomputed" else "full"


def row(r: dict) -> str:
    """One docs/planner.md row of a plan.py JSON row."""
    algo = r["algo"]
    if algo not in ("sft", "reward", "dpo", "ppo"):
        algo = f"{algo} (G={r['group_size']})"
    refused = bool(r.get("error"))
    fits = "yes" if r["fits"] and not refused else "**no**"
    speed = ("—", "—") if refused else (f"{r['tokens_per_s']:,.0f}", f"{100 * r['mfu']:.0f} %")
    cells = [
        r["model"], algo, _weights(r), "scan" if r.get("scan_layers") else "unrolled",
        f"{r['topology']} ({r['devices']})",
        f"{r['batch']} × {r['seq_len']}", str(r["microbatches"]), r["program"],
        f"{r['args_gb']:.1f}", f"{r['temp_gb']:.1f}",
        f"{r['total_gb']:.1f} / {r['hbm_gb']:.1f}", fits, *speed,
    ]  # fmt: skip
    return "| " + " | ".join(cells) + " |"


def main(argv: list[str]) -> None:
    for path in argv:
        with open(path) as f:
            for r in json.load(f):
                print(row(r))


if __name__ == "__main__":
    main(sys.argv[1:])
