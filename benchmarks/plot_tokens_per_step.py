"""Tokens per step of `batchllm bench --json-out` results, as a PNG (one line per configuration).

    pip install matplotlib    (optional; the `plot` extra)
    python benchmarks/plot_tokens_per_step.py RESULT.json [MORE.json ...] -o tokens_per_step.png
"""

from __future__ import annotations

import argparse
import json

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("results", nargs="+")
    parser.add_argument("-o", "--output", default="tokens_per_step.png")
    args = parser.parse_args()
    fig, axes = plt.subplots(len(args.results), 1, figsize=(9, 3.2 * len(args.results)), squeeze=False)
    for ax, path in zip(axes[:, 0], args.results):
        with open(path) as f:
            data = json.load(f)
        for r in data["results"]:
            ax.plot(r["tokens_per_step"], label=f"{r['config']}: {r['requests_per_s']:.1f} req/s", lw=0.9)
        ax.set_title(f"{data['results'][0]['workload']} ({data['device']})", fontsize=9)
        ax.set_xlabel("step")
        ax.set_ylabel("tokens in step")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.output, dpi=110)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
