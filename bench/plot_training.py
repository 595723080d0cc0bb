"""Draw a reader-adapter training run: loss and held-out accuracy against the step.

    python bench/plot_training.py RUN_DIR [OUT.png]

Reads RUN_DIR/log.jsonl (written by `m3db train`); writes OUT.png (default RUN_DIR/curve.png).
"""

import json
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot(log_path, png_path):
    with open(log_path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    steps = [r for r in rows if "loss_memory" in r]
    evals = [r for r in rows if "eval" in r]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    a.plot(
        [r["step"] for r in steps], [r["loss_memory"] for r in steps], lw=0.8, label="memory examples (answer tokens)"
    )
    a.plot([r["step"] for r in steps], [r["loss_text"] for r in steps], lw=0.8, label="text, no memory")
    a.set_xlabel("step")
    a.set_ylabel("cross-entropy")
    a.legend()
    b.plot(
        [r["step"] for r in evals],
        [r["eval"]["fact_accuracy"] for r in evals],
        marker="o",
        label="held-out invented facts",
    )
    b.set_xlabel("step")
    b.set_ylabel("accuracy (answer tokens all argmax)")
    b.set_ylim(0, 1)
    ax = b.twinx()
    ax.plot(
        [r["step"] for r in evals],
        [r["eval"]["text_perplexity"] for r in evals],
        color="gray",
        ls="--",
        label="held-out text perplexity",
    )
    ax.set_ylabel("perplexity, no memory")
    b.legend(loc="upper left")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)


if __name__ == "__main__":
    run = sys.argv[1]
    out = sys.argv[2] if len(sys.argv) > 2 else os.path.join(run, "curve.png")
    plot(os.path.join(run, "log.jsonl"), out)
    print(f"wrote {out}")
