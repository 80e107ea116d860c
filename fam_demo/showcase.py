"""`fam demo`: native, 2x, 3x, 4x and 2x4 images in modes fam / direct / direct_native
from the embedded model, written as PNGs plus one labelled contact sheet. Sizes in
labels and file names are height x width, like ``--scale 2x4`` and torch."""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from fam._io import save_png

from .dataset import caption
from .evaluation import SCALES, _slug

DEMO_PROMPTS: List[str] = [
    caption("star", "red", "striped grey"),
    caption("ring", "blue", "checkered beige"),
    caption("triangle", "yellow", "noisy slate"),
]
DEMO_MODES: List[str] = ["fam", "direct", "direct_native"]
DEMO_SCALES: List[str] = ["2x2", "3x3", "4x4", "2x4"]


@dataclass
class DemoResult:
    out_dir: str
    sheet: str
    files: List[str] = field(default_factory=list)
    seconds: Dict[Tuple[str, str, str], float] = field(default_factory=dict)  # (prompt, mode, scale) -> s
    total_seconds: float = 0.0


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: fixed-size bitmap font
        return ImageFont.load_default()


def _fit(img: Image.Image, cell: int) -> Image.Image:
    """Scale so that the longer side is exactly ``cell``: every scale is shown at one
    display size, side by side (the pixel size is in the column label). An integer
    enlargement is nearest-neighbour (the pixels stay visible), any other is Lanczos."""
    w, h = img.size
    if cell % max(w, h) == 0:
        k = cell // max(w, h)
        return img.resize((w * k, h * k), Image.NEAREST)
    f = cell / max(w, h)
    return img.resize((max(1, round(w * f)), max(1, round(h * f))), Image.LANCZOS)


def contact_sheet(rows: Sequence[Tuple[str, Sequence[Optional[Image.Image]]]], columns: Sequence[str],
                  cell: int = 256, label_width: int = 250, pad: int = 8) -> Image.Image:
    """Grid with a header row of column labels and a label per row (PIL default font)."""
    font, small = _font(16), _font(13)
    header = 28
    W = label_width + len(columns) * (cell + pad) + pad
    H = header + len(rows) * (cell + pad) + pad
    sheet = Image.new("RGB", (W, H), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for j, name in enumerate(columns):
        draw.text((label_width + pad + j * (cell + pad), 6), name, fill=(0, 0, 0), font=font)
    for i, (label, images) in enumerate(rows):
        y = header + pad + i * (cell + pad)
        draw.multiline_text((6, y + 4), label, fill=(0, 0, 0), font=small, spacing=3)
        for j, img in enumerate(images):
            if img is None:
                continue
            x = label_width + pad + j * (cell + pad)
            draw.rectangle([x - 1, y - 1, x + cell, y + cell], outline=(200, 200, 200))
            sheet.paste(_fit(img, cell), (x, y))
    return sheet


def _wrap(text: str, width: int = 30) -> str:
    lines, cur = [], ""
    for word in text.split():
        if cur and len(cur) + 1 + len(word) > width:
            lines.append(cur)
            cur = word
        else:
            cur = f"{cur} {word}".strip()
    return "\n".join(lines + [cur])


def run_demo(fam_pipe, out_dir: str = "fam-demo-output", prompts: Sequence[str] = DEMO_PROMPTS,
             modes: Sequence[str] = DEMO_MODES, scales: Sequence[str] = DEMO_SCALES, steps: int = 25,
             guidance_scale: float = 5.0, seed: int = 0, cell: int = 384,
             log: Callable[[str], None] = print) -> DemoResult:
    os.makedirs(out_dir, exist_ok=True)
    out_dir = os.path.abspath(out_dir)
    result = DemoResult(out_dir=out_dir, sheet=os.path.join(out_dir, "contact_sheet.png"))
    total = len(prompts) * len(modes) * len(scales)
    k = 0
    t_all = time.perf_counter()
    sheet_rows = []
    for prompt in prompts:
        folder = os.path.join(out_dir, _slug(prompt))
        os.makedirs(folder, exist_ok=True)
        native_img: Optional[Image.Image] = None
        per_mode: Dict[str, List[Image.Image]] = {m: [] for m in modes}
        for mode in modes:
            for scale in scales:
                k += 1
                t0 = time.perf_counter()
                out = fam_pipe(prompt=prompt, scale=SCALES[scale], mode=mode, num_inference_steps=steps,
                               guidance_scale=guidance_scale, generator=torch.Generator().manual_seed(seed),
                               output_type="pil")
                dt = time.perf_counter() - t0
                result.seconds[(prompt, mode, scale)] = dt
                img = out.images[0]
                settings = {"prompt": prompt, "seed": seed, "steps": steps, "guidance": guidance_scale}
                path = os.path.join(folder, f"{mode}_{scale}_{img.height}x{img.width}.png")
                save_png(img, path, json.dumps({**settings, "mode": mode, "scale": scale}, sort_keys=True))
                result.files.append(path)
                per_mode[mode].append(img)
                if native_img is None and out.native_images is not None:
                    native_img = out.native_images[0]
                    npath = os.path.join(folder, f"native_{native_img.height}x{native_img.width}.png")
                    save_png(native_img, npath, json.dumps({**settings, "image": "native"}, sort_keys=True))
                    result.files.append(npath)
                done = time.perf_counter() - t_all
                log(f"[{k}/{total}] {mode:>13} {scale} ({img.height}x{img.width}) '{prompt}': {dt:.1f}s "
                    f"(elapsed {done:.0f}s, eta {done / k * (total - k):.0f}s)")
        for mode in modes:
            sheet_rows.append((f"{_wrap(prompt)}\n\nmode: {mode}", [native_img] + per_mode[mode]))
    first = per_mode[modes[0]][0]  # the native size, from the first high-res image and its factors
    nh, nw = first.height // SCALES[scales[0]][0], first.width // SCALES[scales[0]][1]
    columns = [f"native {nh}x{nw}"] + [f"{s} ({nh * SCALES[s][0]}x{nw * SCALES[s][1]})" for s in scales]
    save_png(contact_sheet(sheet_rows, columns, cell=cell), result.sheet, optimize=True)
    result.total_seconds = time.perf_counter() - t_all
    return result


def summarize(result: DemoResult, modes: Sequence[str] = DEMO_MODES, scales: Sequence[str] = DEMO_SCALES) -> str:
    """Mean seconds per image for each (mode, scale)."""
    lines = ["mean seconds per image (native + high-res pass):",
             "mode".rjust(14) + "".join(s.rjust(8) for s in scales)]
    for mode in modes:
        vals = [np.mean([v for (p, m, s), v in result.seconds.items() if m == mode and s == sc]) for sc in scales]
        lines.append(mode.rjust(14) + "".join(f"{v:8.1f}" for v in vals))
    return "\n".join(lines)
