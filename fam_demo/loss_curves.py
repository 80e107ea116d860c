"""The demo model's training curves as one PNG, drawn from the CSVs that training
writes (``fam_demo/train.py``): the UNet's ``loss.csv`` (step, loss, loss_avg100, lr,
elapsed_s) and ``vae_loss.csv`` (step, l1, mse, kl_per_dim). A model trained in
stages (``--init-from``: 64 px, then 128 px) has one UNet CSV per stage, drawn one after
the other on one step axis. The shipped model's curves are ``docs/demo/unet_loss_64px.csv``,
``docs/demo/unet_loss.csv`` (128 px) and ``docs/demo/vae_loss.csv``:

    python -m fam_demo.loss_curves       # -> docs/demo/loss_curves.png (run from the repository root)
"""

from __future__ import annotations

import argparse
import csv
import sys
from typing import Dict, List, Sequence

import numpy as np

from fam._io import atomic_open

DOCS = "docs/demo"


def read_columns(path: str) -> Dict[str, np.ndarray]:
    """Column name -> values of a numeric CSV."""
    with open(path, newline="") as f:
        rows: List[Dict[str, str]] = list(csv.DictReader(f))
    if not rows:
        raise ValueError(f"{path}: no rows")
    return {key: np.array([float(r[key]) for r in rows]) for key in rows[0]}


def running_mean(values: np.ndarray, window: int) -> np.ndarray:
    """Mean of the last ``window`` values at every step (fewer at the start)."""
    sums = np.cumsum(np.concatenate([[0.0], values]))
    counts = np.minimum(np.arange(1, len(values) + 1), window)
    return (sums[1:] - sums[np.arange(1, len(values) + 1) - counts]) / counts


def join_stages(stages: Sequence[Dict[str, np.ndarray]]) -> Dict[str, np.ndarray]:
    """UNet loss logs of consecutive training stages as one log: each stage's steps are
    shifted to start after the previous stage's last step; ``stage`` numbers them."""
    out: Dict[str, List[np.ndarray]] = {}
    offset = 0.0
    for i, stage in enumerate(stages):
        shifted = dict(stage, step=stage["step"] + offset, stage=np.full(len(stage["step"]), float(i)))
        for key, values in shifted.items():
            out.setdefault(key, []).append(values)
        offset = shifted["step"][-1] + 1
    return {key: np.concatenate(parts) for key, parts in out.items()}


def plot_loss_curves(unet_csvs: Sequence[str] | str, vae_csv: str, png_path: str,
                     stage_labels: Sequence[str] = ()) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    unet_csvs = [unet_csvs] if isinstance(unet_csvs, str) else list(unet_csvs)
    unet, vae = join_stages([read_columns(p) for p in unet_csvs]), read_columns(vae_csv)
    fig, (unet_ax, vae_ax) = plt.subplots(1, 2, figsize=(12, 4), layout="constrained")
    unet_ax.plot(unet["step"] + 1, unet["loss"], color="lightgrey", linewidth=0.5, label="loss (per step)")
    for i in range(len(unet_csvs)):
        part = unet["stage"] == i
        unet_ax.plot(unet["step"][part] + 1, unet["loss_avg100"][part], color="tab:blue",
                     label="mean of the last 100 steps" if i == 0 else None)
        if i < len(stage_labels):
            unet_ax.axvline(unet["step"][part][0] + 1, color="black", linewidth=0.6, alpha=0.5)
            unet_ax.text(unet["step"][part][0] + 1, 0.98, f" {stage_labels[i]}",
                         transform=unet_ax.get_xaxis_transform(), va="top", fontsize="small")
    unet_ax.set(yscale="log", xlabel="UNet step (batch 32)", ylabel="min-SNR weighted MSE (log)",
                title="UNet + text encoders")
    lr_ax = unet_ax.twinx()
    lr_ax.plot(unet["step"] + 1, unet["lr"], color="tab:orange", linestyle="--", label="learning rate")
    lr_ax.set(ylabel="learning rate")
    lines = unet_ax.get_legend_handles_labels()
    lr_lines = lr_ax.get_legend_handles_labels()
    unet_ax.legend(lines[0] + lr_lines[0], lines[1] + lr_lines[1], fontsize="small",
                   loc="lower left" if len(unet_csvs) > 1 else "upper right")

    for key, color in (("l1", "tab:blue"), ("mse", "tab:green")):
        vae_ax.plot(vae["step"] + 1, vae[key], color=color, alpha=0.25, linewidth=0.5)
        vae_ax.plot(vae["step"] + 1, running_mean(vae[key], 50), color=color, label=f"{key} (mean of 50)")
    vae_ax.set(yscale="log", xlabel="VAE step (batch 16 of 32x32 crops)", ylabel="reconstruction loss (log)",
               title="VAE" + (" (trained in the first stage, then reused)" if len(unet_csvs) > 1 else ""))
    kl_ax = vae_ax.twinx()
    kl_ax.plot(vae["step"] + 1, running_mean(vae["kl_per_dim"], 50), color="tab:red", linestyle="--",
               label="KL per latent dim (mean of 50)")
    kl_ax.set(ylabel="KL per latent dimension")
    lines = vae_ax.get_legend_handles_labels()
    kl_lines = kl_ax.get_legend_handles_labels()
    vae_ax.legend(lines[0] + kl_lines[0], lines[1] + kl_lines[1], fontsize="small", loc="upper right")
    for ax in (unet_ax, vae_ax):
        ax.grid(True, which="both", alpha=0.3)
    with atomic_open(png_path, "wb") as f:
        fig.savefig(f, format="png", dpi=100, metadata={"Software": None})
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--unet", default=f"{DOCS}/unet_loss_64px.csv,{DOCS}/unet_loss.csv",
                   help="the UNet loss CSV, or comma-separated CSVs of consecutive stages")
    p.add_argument("--stage-labels", default="64 px,128 px",
                   help="comma-separated labels of the stages ('' for none)")
    p.add_argument("--vae", default=f"{DOCS}/vae_loss.csv", help="the VAE loss CSV")
    p.add_argument("--out", default=f"{DOCS}/loss_curves.png", help="the PNG to write")
    args = p.parse_args(argv)
    try:
        plot_loss_curves(args.unet.split(","), args.vae, args.out,
                         [label for label in args.stage_labels.split(",") if label])
    except (OSError, KeyError, ValueError) as error:
        print(f"loss_curves: error: {type(error).__name__}: {error}", file=sys.stderr)
        return 2
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
