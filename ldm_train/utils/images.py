"""PNG grids with captions and loss-curve plots: what people look at instead of reading logs."""
from __future__ import annotations

import textwrap
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Float images in [-1, 1] -> uint8 [0, 255], rounded like a saved PNG: what FID sees of a
    generated image, and the exact inverse of :func:`ldm_train.data.preprocess` on its own output.

    Computed in float32 whatever the input dtype, so fp16/bf16 decoder output quantises like fp32.
    Values outside [-1, 1] (an overshooting decoder) clamp to 0 / 255; clamping before or after
    the rounding gives the same bytes, so every caller can share this one definition."""
    return ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def to_pil(x: torch.Tensor) -> Image.Image:
    """CHW tensor in [-1, 1] -> RGB PIL image."""
    return Image.fromarray(to_uint8(x.cpu()).permute(1, 2, 0).numpy(), "RGB")


def image_grid(
    images: torch.Tensor,
    ncols: int,
    captions: list[str] | None = None,
    cell: int = 128,
    caption_lines: int = 3,
) -> Image.Image:
    """Tile images (NCHW in [-1, 1]) into a grid, each upscaled to ``cell`` px, captions underneath."""
    n = images.shape[0]
    nrows = (n + ncols - 1) // ncols
    font = ImageFont.load_default()
    line_h = 12
    text_h = caption_lines * line_h + 4 if captions else 0
    grid = Image.new("RGB", (ncols * cell, nrows * (cell + text_h)), "white")
    draw = ImageDraw.Draw(grid)
    chars = max(8, cell // 6)
    for i in range(n):
        r, c = divmod(i, ncols)
        x0, y0 = c * cell, r * (cell + text_h)
        grid.paste(to_pil(images[i]).resize((cell, cell), Image.NEAREST), (x0, y0))
        if captions:
            lines = textwrap.wrap(captions[i], chars)[:caption_lines]
            for j, line in enumerate(lines):
                draw.text((x0 + 2, y0 + cell + 2 + j * line_h), line, fill="black", font=font)
    return grid


def save_grid(path: Path, images: torch.Tensor, ncols: int, captions: list[str] | None = None, cell: int = 128) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image_grid(images, ncols, captions, cell).save(path)
    return path


def plot_losses(path: Path, curves: dict[str, list[tuple[int, float]]]) -> Path:
    """One panel per curve (step, loss), log-scale y; written as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(curves), figsize=(5 * len(curves), 3.5), squeeze=False)
    for ax, (name, points) in zip(axes[0], curves.items()):
        if points:
            steps, values = zip(*points)
            ax.plot(steps, values, lw=1)
            if min(values) > 0:
                ax.set_yscale("log")
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def prompt_grid(images: torch.Tensor, captions: list[str], per_prompt: int,
                references: dict[str, torch.Tensor] | None = None, cell: int = 96, label_w: int = 180) -> Image.Image:
    """One row per prompt, the prompt written at the left, so prompts compare at a glance: then,
    with ``references``, the real image of that prompt (a blank where there is none), then its
    ``per_prompt`` samples. ``images`` are grouped by prompt (as ``generate`` returns them)."""
    font = ImageFont.load_default()
    rows = len(captions) // per_prompt
    extra = 1 if references is not None else 0
    head = 16
    grid = Image.new("RGB", (label_w + (extra + per_prompt) * cell, head + rows * cell), "white")
    draw = ImageDraw.Draw(grid)
    titles = (["real"] if extra else []) + [f"sample {j + 1}" for j in range(per_prompt)]
    for j, title in enumerate(titles):
        draw.text((label_w + j * cell + 4, 2), title, fill="black", font=font)
    for r in range(rows):
        y = head + r * cell
        prompt = captions[r * per_prompt]
        for k, line in enumerate(textwrap.wrap(prompt, max(8, label_w // 7))[: cell // 13]):
            draw.text((4, y + 4 + k * 13), line, fill="black", font=font)
        if extra and prompt in references:
            grid.paste(to_pil(references[prompt]).resize((cell, cell), Image.NEAREST), (label_w, y))
        for j in range(per_prompt):
            grid.paste(to_pil(images[r * per_prompt + j]).resize((cell, cell), Image.NEAREST),
                       (label_w + (extra + j) * cell, y))
        draw.line([(0, y), (grid.width, y)], fill=(200, 200, 200))
    return grid
