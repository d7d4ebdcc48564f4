"""The loss-curve picture a training run leaves beside its checkpoint."""
from __future__ import annotations

from pathlib import Path


def plot_loss_curve(path: Path, history, unigram_loss: float, title: str) -> None:
    """Train loss (raw and smoothed) and validation loss against tokens seen, with the unigram baseline."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display, and no GUI toolkit needed
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    if history.train:
        _, tokens, losses = zip(*history.train)
        ax.plot(tokens, losses, color="tab:blue", alpha=0.25, linewidth=0.8)
        ax.plot(tokens, smoothed(losses), color="tab:blue", label="train loss (smoothed)")
    if history.val:
        _, tokens, losses = zip(*history.val)
        ax.plot(tokens, losses, "o-", color="tab:orange", label="validation loss")
    ax.axhline(unigram_loss, color="gray", linestyle="--", label=f"unigram baseline {unigram_loss:.2f}")
    ax.set_xlabel("tokens seen")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def smoothed(values, weight: float = 0.95) -> list[float]:
    """Exponential moving average, bias-corrected so the start is not pulled toward zero."""
    out, average = [], 0.0
    for i, value in enumerate(values, start=1):
        average = weight * average + (1 - weight) * value
        out.append(average / (1 - weight**i))
    return out
