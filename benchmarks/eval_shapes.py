"""Does each image show the prompt's shape and colour? Reads the PNGs that
``fam eval --save-images DIR`` wrote and classifies the main object of every image
(fam_demo.shapes.object_shape on the image area-downsampled to the native size, so
every scale is judged at the same resolution; a 2x4 image counts as the right shape
when it is right unstretched to the native square (FAM's upsampled latent stretches the
native picture) or as displayed (direct draws undistorted shapes on the wide canvas);
fam_demo.segmentation.object_color).

    python benchmarks/eval_shapes.py DIR [--out benchmarks/results/local]   # -> shapes.csv, shapes.md
"""

import argparse
import collections
import csv
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from benchmarks.common import DEFAULT_OUT, markdown_table  # noqa: E402
from fam._io import atomic_open  # noqa: E402
from fam_demo.dataset import parse_caption  # noqa: E402
from fam_demo.evaluation import EVAL_PROMPTS, MODES, SCALES, _slug  # noqa: E402
from fam_demo.metrics import downsample_area, to_float  # noqa: E402
from fam_demo.segmentation import count_objects, object_color  # noqa: E402
from fam_demo.shapes import object_shape  # noqa: E402

NAME = re.compile(r"^(?P<slug>.+)_s(?P<seed>\d+)_(?P<what>native|(?P<mode>[a-z_]+)_(?P<scale>\dx\d))\.png$")


def classify(folder: str):
    """One dict per image: prompt, seed, mode ("native" for the native image), scale,
    one object, shape right, colour right, all three."""
    by_slug = {_slug(p): p for p in EVAL_PROMPTS}
    natives = {}
    rows = []
    for name in sorted(os.listdir(folder)):
        m = NAME.match(name)
        if not m or m["slug"] not in by_slug:
            continue
        prompt = by_slug[m["slug"]]
        shape, color, _ = parse_caption(prompt)
        img = to_float(np.asarray(Image.open(os.path.join(folder, name)).convert("RGB")))
        mode = m["mode"] or "native"
        scale = m["scale"] or "1x1"
        if mode == "native":
            natives[(prompt, int(m["seed"]))] = img.shape[:2]
        rows.append({"prompt": prompt, "seed": int(m["seed"]), "mode": mode, "scale": scale, "image": img,
                     "shape": shape, "color": color})
    out = []
    for r in rows:
        img = r.pop("image")
        nh, nw = natives.get((r["prompt"], r["seed"]), img.shape[:2])
        fh, fw = (int(v) for v in r["scale"].split("x"))
        views = [downsample_area(img, (nh, nw)) if img.shape[:2] != (nh, nw) else img]
        if fh != fw:  # as displayed too (direct draws undistorted shapes on the wide canvas)
            views.append(downsample_area(img, (nh * fh // min(fh, fw), nw * fw // min(fh, fw))))
        one = count_objects(img) == 1
        shape_ok = any(object_shape(v) == r["shape"] for v in views)
        color_ok = object_color(img) == r["color"]
        out.append({**r, "one_object": one, "shape_ok": shape_ok, "color_ok": color_ok,
                    "follows": one and shape_ok and color_ok})
    return out


def summarize(samples):
    groups = collections.defaultdict(list)
    for s in samples:
        groups[(s["scale"], s["mode"])].append(s)
    order = ["1x1", *SCALES]
    modes = ["native", *MODES]
    rows = []
    for (scale, mode), g in sorted(groups.items(), key=lambda kv: (order.index(kv[0][0]), modes.index(kv[0][1]))):
        rows.append({"scale": scale, "mode": mode, "n": len(g),
                     "shape_right": f"{np.mean([s['shape_ok'] for s in g]):.2f}",
                     "color_right": f"{np.mean([s['color_ok'] for s in g]):.2f}",
                     "one_object": f"{np.mean([s['one_object'] for s in g]):.2f}",
                     "one_object_shape_and_color_right": f"{np.mean([s['follows'] for s in g]):.2f}"})
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("images", help="a folder written by fam eval --save-images")
    p.add_argument("--out", default=DEFAULT_OUT)
    args = p.parse_args(argv)
    if not os.path.isdir(args.images):
        p.error(f"images {args.images}: no such folder")
    samples = classify(args.images)
    if not samples:
        p.error(f"images {args.images}: no images named as fam eval --save-images names them")
    rows = summarize(samples)
    os.makedirs(args.out, exist_ok=True)
    with atomic_open(os.path.join(args.out, "shapes.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    text = ["# Prompt adherence: shape, colour, one object", "",
            f"Images of `fam eval --save-images` ({len(samples)}); shape by `fam_demo.shapes.object_shape` at the "
            "native resolution (validated on renders: 100%), colour by `fam_demo.segmentation.object_color`.", "",
            markdown_table(list(rows[0]), [list(r.values()) for r in rows]), ""]
    with atomic_open(os.path.join(args.out, "shapes.md"), "w") as f:
        f.write("\n".join(text))
    print("\n".join(text))
    return 0


if __name__ == "__main__":
    sys.exit(main())
