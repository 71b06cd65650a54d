"""A small VLAA-Thinking-shaped dataset drawn by code, with real answers for all five reward types.

Layout written to `out` (the released repository layout):
    VLAA-Thinking-SFT-126K.json   one JSON array (released shape; every 5th record in the dataset-card
                                  pipeline shape: id / ds_answer / caption / meta)
    VLAA-Thinking-GRPO-25K.json   JSON Lines with `verifier_type`
    images/<source>.tar.gz        clevr_math (digit), geoqa170k (mcq), synthesis (math), coco (iou),
                                  allava_laion (open_ended)
    heldout_ids.txt               ids held out for evaluation (every 10th record of each source in each file); the TFDS
                                  builder puts them in the `validation` split, the rest in `train`.
Tasks: CLEVR-like counting after removing a colour (digit), a triangle's missing angle with four options
(mcq), an arithmetic expression with fractions rendered as text (math, LaTeX ground truth), the bounding
box of a drawn target shape (iou, box normalised to [0, 1] as [x1, y1, x2, y2]), and a scene to describe
(open-ended, reference description as ground truth). Images are 112-336 px so a CPU demo stays fast.
"""
from __future__ import annotations

import io
import json
import os
import random
import shutil
import tempfile
from fractions import Fraction
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from data_pipeline.records import HELDOUT_IDS_FILE, SPLIT_FILES, read_records
from data_pipeline.release import write_release

COLORS = {"red": (220, 40, 40), "blue": (40, 80, 220), "green": (40, 170, 60), "yellow": (230, 200, 40),
          "purple": (140, 60, 170)}
SOURCES = ("clevr_math", "geoqa170k", "synthesis", "coco", "allava_laion")
VERIFIER = {"clevr_math": "digit", "geoqa170k": "mcq", "synthesis": "math", "coco": "iou", "allava_laion": "open_ended"}


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)  # scalable built-in font (Pillow >= 10.1 with FreeType)
    except (TypeError, ImportError, OSError):
        return ImageFont.load_default()


def _size(rng: random.Random) -> tuple[int, int]:
    return rng.choice([112, 140, 168, 224, 280, 336]), rng.choice([112, 168, 196, 224, 336])


def _think(reasoning: str, answer: str) -> str:
    return f"<think>\n{reasoning}\n</think>\n<answer>{answer}</answer>"


def _draw_shape(d: ImageDraw.ImageDraw, kind: str, box: tuple[int, int, int, int], color) -> None:
    if kind == "circle":
        d.ellipse(box, fill=color, outline=(0, 0, 0))
    elif kind == "square":
        d.rectangle(box, fill=color, outline=(0, 0, 0))
    else:
        x1, y1, x2, y2 = box
        d.polygon([((x1 + x2) // 2, y1), (x2, y2), (x1, y2)], fill=color, outline=(0, 0, 0))


def _counting(rng: random.Random):
    w, h = _size(rng)
    img = Image.new("RGB", (w, h), (200, 200, 200))
    d = ImageDraw.Draw(img)
    n = rng.randint(3, 7)
    cell = 28  # one object per grid cell: no overlaps, so the count is unambiguous
    cells = rng.sample([(cx, cy) for cx in range(w // cell) for cy in range(h // cell)], n)
    objs = []
    for cx, cy in cells:
        s = rng.randint(14, 22)
        x, y = cx * cell + rng.randint(1, cell - s - 1), cy * cell + rng.randint(1, cell - s - 1)
        color = rng.choice(list(COLORS))
        kind = rng.choice(["circle", "square"])
        _draw_shape(d, kind, (x, y, x + s, y + s), COLORS[color])
        objs.append((color, kind))
    remove = rng.choice([c for c, _ in objs])
    removed = sum(c == remove for c, _ in objs)
    left = n - removed
    q = f"Subtract all {remove} objects. How many objects are left?"
    why = f"There are {n} objects in total. {removed} of them are {remove}. Removing them leaves {n} - {removed} = {left}."
    return img, "PNG", q, str(left), why, str(left)


def _geometry(rng: random.Random):
    w, h = _size(rng)
    img = Image.new("RGB", (w, h), (255, 255, 255))
    d = ImageDraw.Draw(img)
    a, b = rng.randint(30, 80), rng.randint(30, 80)
    c = 180 - a - b
    pts = [(10, h - 10), (w - 10, h - 10), (rng.randint(20, w - 20), 10)]
    d.polygon(pts, outline=(0, 0, 0))
    d.text((14, h - 26), f"{a}°", fill=(0, 0, 0), font=_font(14))
    d.text((w - 44, h - 26), f"{b}°", fill=(0, 0, 0), font=_font(14))
    d.text((pts[2][0] - 4, 14), "?", fill=(200, 0, 0), font=_font(14))
    options = sorted({c, c + 10, abs(c - 10) or 5, c + 20})
    while len(options) < 4:
        options.append(options[-1] + 5)
    rng.shuffle(options)
    letter = "ABCD"[options.index(c)]
    choices = "  ".join(f"{L}. {v}°" for L, v in zip("ABCD", options))
    q = f"In the triangle, two angles are {a}° and {b}°. What is the third angle?\nChoices: {choices}"
    why = f"The angles of a triangle sum to 180°, so the third angle is 180 - {a} - {b} = {c}°, option {letter}."
    return img, "PNG", q, letter, why, letter


def _arithmetic(rng: random.Random):
    w, h = rng.choice([224, 280, 336]), rng.choice([112, 140])
    img = Image.new("RGB", (w, h), (250, 250, 240))
    d = ImageDraw.Draw(img)
    p, q_, r = rng.randint(1, 9), rng.randint(2, 9), rng.randint(1, 12)
    op = rng.choice(["+", "-", "*"])
    lhs = Fraction(p, q_)
    val = lhs + r if op == "+" else lhs - r if op == "-" else lhs * r
    d.text((10, h // 2 - 12), f"{p}/{q_} {op} {r} = ?", fill=(0, 0, 0), font=_font(24))
    latex = str(val.numerator) if val.denominator == 1 else (
        ("-" if val < 0 else "") + f"\\frac{{{abs(val.numerator)}}}{{{val.denominator}}}")
    question = "Compute the value of the expression in the image. Give the exact answer."
    why = f"The expression is {p}/{q_} {op} {r}. Evaluating it exactly gives {val}."
    return img, "PNG", question, latex, why, f"${latex}$"


def _locate(rng: random.Random):
    w, h = _size(rng)
    img = Image.new("RGB", (w, h), (120, 160, 120))
    d = ImageDraw.Draw(img)
    target_color = rng.choice(list(COLORS))
    for _ in range(rng.randint(1, 3)):  # distractors of other colours
        s = rng.randint(12, 24)
        x, y = rng.randint(0, w - s - 1), rng.randint(0, h - s - 1)
        _draw_shape(d, "circle", (x, y, x + s, y + s), COLORS[rng.choice([c for c in COLORS if c != target_color])])
    bw, bh = rng.randint(20, w // 2), rng.randint(20, h // 2)
    x1, y1 = rng.randint(0, w - bw - 1), rng.randint(0, h - bh - 1)
    d.rectangle((x1, y1, x1 + bw, y1 + bh), fill=COLORS[target_color], outline=(0, 0, 0))
    box = [round(x1 / w, 3), round(y1 / h, 3), round((x1 + bw) / w, 3), round((y1 + bh) / h, 3)]
    q = (f"Please provide the bounding box coordinate of the region this sentence describes: the {target_color} "
         "rectangle. Answer with [x1, y1, x2, y2] normalised to [0, 1].")
    why = f"The {target_color} rectangle spans from ({x1}, {y1}) to ({x1 + bw}, {y1 + bh}) in a {w}x{h} image."
    return img, "JPEG", q, json.dumps(box), why, json.dumps(box)


def _scene(rng: random.Random):
    w, h = _size(rng)
    sky = rng.choice([("blue", (120, 170, 240)), ("orange", (250, 170, 90)), ("grey", (160, 160, 170))])
    img = Image.new("RGB", (w, h), sky[1])
    d = ImageDraw.Draw(img)
    d.rectangle((0, int(h * 0.7), w, h), fill=(60, 150, 60))
    parts = [f"a {sky[0]} sky", "green grass"]
    if rng.random() < 0.6:
        d.ellipse((w - 40, 8, w - 12, 36), fill=(250, 230, 60))
        parts.append("a yellow sun")
    if rng.random() < 0.7:
        hx = rng.randint(5, max(6, w // 2 - 40))
        d.rectangle((hx, int(h * 0.45), hx + 40, int(h * 0.7)), fill=(180, 80, 60))
        d.polygon([(hx - 5, int(h * 0.45)), (hx + 45, int(h * 0.45)), (hx + 20, int(h * 0.3))], fill=(120, 40, 30))
        parts.append("a small red house")
    if rng.random() < 0.7:
        tx = rng.randint(w // 2, w - 20)
        d.rectangle((tx, int(h * 0.5), tx + 6, int(h * 0.7)), fill=(100, 60, 20))
        d.ellipse((tx - 12, int(h * 0.3), tx + 18, int(h * 0.55)), fill=(30, 110, 30))
        parts.append("a tree")
    desc = "The picture shows " + ", ".join(parts[:-1]) + " and " + parts[-1] + "."
    q = "Describe the scene in the image in one sentence."
    why = "I look at the sky, the ground and the objects drawn on it: " + ", ".join(parts) + "."
    return img, "PNG", q, desc, why, desc


REASONING_TASKS = {"clevr_math": _counting, "geoqa170k": _geometry, "synthesis": _arithmetic, "coco": _locate,
                   "allava_laion": _scene}

# --- The "visual" tasks: what a tiny model can learn from a 56x56 image (4 image tokens, one per quadrant).
VISUAL_SIDE = 112  # square images: resized to 56x56 by the demo's pixel bounds, each quadrant one token
QUADRANTS = ("top left", "top right", "bottom left", "bottom right")  # numbered 1 to 4
COLOR_CHOICES = ("red", "blue", "green", "yellow")  # mcq options, always in this order (A to D)


def _quadrant_box(q: int, margin: float = 0.05) -> list[float]:
    """Normalised [x1, y1, x2, y2] of quadrant q (0 = top left, 1 = top right, 2 / 3 = bottom), inset by margin."""
    x, y = (q % 2) * 0.5, (q // 2) * 0.5
    return [round(x + margin, 2), round(y + margin, 2), round(x + 0.5 - margin, 2), round(y + 0.5 - margin, 2)]


def _visual_image(shapes: list[tuple[int, str, str]]) -> Image.Image:
    """A grey square with one shape (quadrant, colour, kind) filling each given quadrant."""
    img = Image.new("RGB", (VISUAL_SIDE, VISUAL_SIDE), (200, 200, 200))
    d = ImageDraw.Draw(img)
    for q, color, kind in shapes:
        box = [round(v * VISUAL_SIDE) for v in _quadrant_box(q)]
        _draw_shape(d, kind, tuple(box), COLORS[color])
    return img


def _visual_count(rng: random.Random):
    n = rng.randint(1, 4)
    shapes = [(q, rng.choice(COLOR_CHOICES), rng.choice(["circle", "square"])) for q in rng.sample(range(4), n)]
    q = "How many shapes are in the image?"
    return _visual_image(shapes), "PNG", q, str(n), f"I count the shapes: {n}.", str(n)


def _visual_colour(rng: random.Random):
    color = rng.choice(COLOR_CHOICES)
    img = _visual_image([(q, color, "square") for q in range(4)])
    letter = "ABCD"[COLOR_CHOICES.index(color)]
    choices = "  ".join(f"{L}. {c}" for L, c in zip("ABCD", COLOR_CHOICES))
    q = f"What colour are the shapes?\nChoices: {choices}"
    return img, "PNG", q, letter, f"The shapes are {color}, option {letter}.", letter


def _visual_position(rng: random.Random):
    q = rng.randrange(4)
    img = _visual_image([(q, rng.choice(COLOR_CHOICES), "circle")])
    question = ("The quadrants of the image are numbered 1 (top left), 2 (top right), 3 (bottom left) and "
                "4 (bottom right). In which quadrant is the circle?")
    return img, "PNG", question, str(q + 1), f"The circle is in the {QUADRANTS[q]} quadrant.", f"${q + 1}$"


def _visual_box(rng: random.Random):
    q, color = rng.randrange(4), rng.choice(COLOR_CHOICES)
    img = _visual_image([(q, color, "square")])
    box = json.dumps(_quadrant_box(q))
    question = (f"Please provide the bounding box coordinate of the region this sentence describes: the {color} "
                "square. Answer with [x1, y1, x2, y2] normalised to [0, 1].")
    return img, "JPEG", question, box, f"The {color} square is in the {QUADRANTS[q]} quadrant.", box


def _visual_describe(rng: random.Random):
    q, color, kind = rng.randrange(4), rng.choice(COLOR_CHOICES), rng.choice(["circle", "square"])
    desc = f"A {color} {kind} in the {QUADRANTS[q]} of a grey picture."
    return (_visual_image([(q, color, kind)]), "PNG", "Describe the image in one sentence.", desc,
            f"I see one {color} {kind}.", desc)


VISUAL_TASKS = {"clevr_math": _visual_count, "geoqa170k": _visual_colour, "synthesis": _visual_position,
                "coco": _visual_box, "allava_laion": _visual_describe}
# Task sets: "visual" (colours, counts and positions that a tiny model learns from a 56x56 image, the
# demo presets') and "reasoning" (counting after removal, a triangle's angle, arithmetic on fractions,
# a box, a scene: VLAA-Thinking-like questions for real checkpoints). In "visual" the GRPO split leaves
# the open-ended source out: without a reward model (reward.reward_model_url) its reward is always 0.
TASK_SETS = {"visual": VISUAL_TASKS, "reasoning": REASONING_TASKS}


def make_demo_data(out: str | os.PathLike, n: int = 200, seed: int = 0, heldout_every: int = 10,
                   tasks: str = "reasoning") -> dict:
    """Write the demo dataset (n records per split, the reward types of the task set `tasks`, a
    TASK_SETS key) to `out`; return a summary."""
    if tasks not in TASK_SETS:
        raise ValueError(f"demo tasks {tasks!r}: choose one of {sorted(TASK_SETS)}")
    task_fns = TASK_SETS[tasks]
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    images: dict[str, list[tuple[str, bytes]]] = {s: [] for s in SOURCES}
    rows: dict[str, list[dict]] = {"sft": [], "grpo": []}
    for split in ("sft", "grpo"):
        sources = SOURCES if split == "sft" or tasks == "reasoning" else SOURCES[:-1]
        for i in range(n):
            source = sources[i % len(sources)]
            img, fmt, question, gt, why, answer = task_fns[source](rng)
            name = f"{source}/{split}_{i:06d}.{'jpg' if fmt == 'JPEG' else 'png'}"
            buf = io.BytesIO()
            img.save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
            images[source].append((name, buf.getvalue()))
            response = _think(why, answer)
            if split == "grpo":
                row = {"image": name, "question": question, "answer": response, "gt": gt,
                       "verifier_type": VERIFIER[source]}
            elif i % 5 == 4:  # dataset-card pipeline shape
                row = {"id": f"demo-sft-{i:06d}", "image": name, "question": question, "gt": gt,
                       "ds_answer": response, "caption": why,
                       "meta": {"caption_model_id": "demo", "rationale": why, "text_question": question, "url": ""}}
            else:
                row = {"image": name, "question": question, "answer": response, "gt": gt}
            rows[split].append(row)
    written = write_release(out, rows, images)
    sft_file, grpo_file = written["sft"], written["grpo"]
    held = []
    for split, path in (("sft", sft_file), ("grpo", grpo_file)):
        # Every `heldout_every`-th record *of each source*, starting with its first, so the held-out set covers
        # all five reward types even in a small demo.
        seen: dict[str, int] = {}
        for r in read_records(path, split=split):
            seen[r.source] = k = seen.get(r.source, -1) + 1
            if heldout_every and k % heldout_every == 0:
                held.append(r.id)
    (out / HELDOUT_IDS_FILE).write_text("".join(i + "\n" for i in held))
    return {"out": str(out), "records_per_split": n, "heldout": len(held), "sources": list(SOURCES), "tasks": tasks}


def ensure_demo_data(out: str | os.PathLike, tasks: str = "visual") -> Path:
    """`out` holding the demo dataset of task set `tasks`, written once: built in a sibling temporary
    directory and renamed into place, so runs sharing a data directory (the default cache) never see a
    half-written one."""
    out = Path(out)
    if (out / SPLIT_FILES["grpo"][0]).is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    make_demo_data(tmp, tasks=tasks)
    try:
        tmp.rename(out)
    except OSError:  # another run got there first (or `out` exists and is not empty): use that one
        shutil.rmtree(tmp, ignore_errors=True)
        if not (out / SPLIT_FILES["grpo"][0]).is_file():
            raise
    return out
