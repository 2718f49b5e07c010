"""Pictures of what a compression did (matplotlib, imported only when a plot is asked for)."""

from __future__ import annotations

from pathlib import Path


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(fig, path: str | Path, dpi: int = 110) -> Path:
    """Write ``fig`` to ``path`` and release it (a PNG as a palette image: :func:`shrink_png`)."""
    path = Path(path)
    fig.savefig(path, dpi=dpi)
    pyplot().close(fig)
    if path.suffix.lower() == ".png":
        shrink_png(path)
    return path


def shrink_png(path: str | Path) -> Path:
    """Rewrite a PNG as a 256-colour palette image (no dithering): a plot's flat colours and anti-aliased edges fit
    in a palette, and the file is about a third of matplotlib's RGBA one."""
    from PIL import Image

    path = Path(path)
    with Image.open(path) as image:
        if image.mode == "P":
            return path
        palette = image.convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT,
                                                dither=Image.Dither.NONE)
    palette.save(path, format="PNG", optimize=True)
    return path


def plot_layer_budgets(kept: list[int], prompt_tokens: int, path: str | Path, title: str = "") -> Path:
    """Bar chart of tokens kept per layer after prefill against the prompt length; written to ``path``."""
    fig, ax = pyplot().subplots(figsize=(max(6, 0.25 * len(kept) + 2), 3.2))
    ax.bar(range(len(kept)), kept, color="#c0504d", label="kept after prefill")
    ax.axhline(prompt_tokens, color="gray", linestyle="--", linewidth=1, label=f"prompt ({prompt_tokens} tokens)")
    ax.axhline(sum(kept) / max(len(kept), 1), color="black", linewidth=1, label="mean kept per layer")
    ax.set_xlabel("layer")
    ax.set_ylabel("tokens")
    ax.set_title(title or "tokens kept per layer")
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    return save(fig, path, dpi=120)
