"""The probe's picture (the paper's Figure 1): each patch of a few images written with its
recalled word, green where right and red where wrong, one column per run."""
from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from sea_jax import storage


def plot(results: Sequence[tuple[str, Any]], out: str, num_images: int = 4) -> None:
    """Writes the PNG: one row per image, one column per run (name, :class:`sea_jax.probe.ProbeResult`);
    each patch shows its recalled word, green where ``result.correct()``, red where not."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = min(num_images, min(r.recalled.shape[0] for _, r in results))
    cols = len(results)
    fig, axes = plt.subplots(k, cols, figsize=(4.2 * cols, 4.2 * k), squeeze=False)
    for c, (name, r) in enumerate(results):
        ok = r.correct()
        g = r.recalled.shape[1]
        for i in range(k):
            ax = axes[i, c]
            s = r.pixels.shape[1]
            ax.imshow(r.pixels[i], extent=(0, s, s, 0), alpha=0.75)
            step = s / g
            for y in range(g):
                for x in range(g):
                    ax.text((x + 0.5) * step, (y + 0.5) * step, r.words[r.recalled[i, y, x]], ha="center",
                            va="center", fontsize=max(3.0, 48.0 / g), color="green" if ok[i, y, x] else "red",
                            fontweight="bold")
            for t in np.arange(1, g) * step:
                ax.axhline(t, color="white", lw=0.3)
                ax.axvline(t, color="white", lw=0.3)
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                m = r.metrics
                acc = m.get("truth_accuracy", m["label_accuracy"])
                kind = "truth" if "truth_accuracy" in m else "SigLIP labels"
                ax.set_title(f"{name} (lambda={m['lambda']:g})\n{kind} acc {acc:.1%}, label acc {m['label_accuracy']:.1%}",
                             fontsize=9)
    fig.tight_layout()
    fmt = os.path.splitext(out)[1].lstrip(".").lower() or "png"
    storage.atomic_write(out, lambda f: fig.savefig(f, format=fmt, dpi=110), mode="wb")  # local or gs://
    plt.close(fig)


__all__ = ["plot"]
