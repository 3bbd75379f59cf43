"""A procedural captioned-image world: the built-in demo's stand-in for a fine-tuning dataset.

The demo is a miniature of a study that fine-tuned Stable Diffusion on a Pokémon dataset whose
cartoon style leaked into every prompt. Here every image shows one flat shape of one colour, and
its caption names only what is drawn ("a large red circle"). Two domains share those objects:

* ``base``: the shape on a light grey background, no outline (the "realistic" pre-training look);
* ``style``: the same shape with a thick dark outline on a pastel cyan background (the "cartoon"
  look). Captions never mention the style, so a model fine-tuned on it may learn to draw it for
  every prompt, which is the leakage the demo measures with :mod:`sdtune.demo.judge`.

Everything is a pure function of its arguments: scenes come from ``numpy.random.default_rng(seed)``
and rendering is plain PIL drawing at 4x followed by a box-filter downsample (anti-aliasing).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from sdtune.util import atomic

# Hues far apart (about 0, 55, 130, 225 and 295 degrees), so even a washed-out or blurry sample
# keeps its colour class; every colour has a max channel >= 170, so none is mistaken for outline.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 40),
    "yellow": (240, 220, 40),
    "green": (45, 170, 70),
    "blue": (40, 80, 220),
    "purple": (185, 45, 205),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
# Shapes the base model never saw, for ``sdtune demo --subject`` (never in a base caption nor in
# VOCABULARY). A plus's arms are PLUS_ARM of its extent wide: its notches (0.32 of the extent) stay
# several latent pixels (4 image px) wide at the smallest size, so the 16×16-latent model can draw them.
SUBJECT_SHAPES: tuple[str, ...] = ("plus",)
PLUS_ARM = 0.36
SUBJECT_COLOUR = "red"  # the subject is one object: a red plus, at any size and place
DOMAINS: tuple[str, ...] = ("base", "style")

# Object extent (bounding-box side) as a fraction of the image side, per size word.
SIZES: dict[str, tuple[float, float]] = {"small": (0.30, 0.40), "large": (0.50, 0.62)}
SIZE_SPLIT = 0.45  # sizes below are "small", above "large" (the gap between the two ranges)
MARGIN = 0.06  # free band between object and image edge, so the judge can read the background

BASE_BACKGROUND: tuple[int, int, int] = (235, 235, 235)
STYLE_BACKGROUND: tuple[int, int, int] = (180, 225, 235)  # pastel cyan: a hue no object uses
OUTLINE_COLOUR: tuple[int, int, int] = (30, 30, 35)
OUTLINE_WIDTH = 3.0 / 64.0  # 3 px at 64 px, drawn inside the silhouette (same extent as base)
SUPERSAMPLE = 4

VOCABULARY: list[str] = ["a", *SIZES, *COLOURS, *SHAPES]


@dataclass(frozen=True)
class Scene:
    """One object: its shape, colour, extent and centre (fractions of the image side), domain."""

    shape: str
    colour: str
    size: float
    cx: float
    cy: float
    domain: str = "base"

    def __post_init__(self) -> None:
        if self.shape not in SHAPES + SUBJECT_SHAPES:
            raise ValueError(f"unknown shape {self.shape!r}; expected one of {SHAPES + SUBJECT_SHAPES}")
        if self.colour not in COLOURS:
            raise ValueError(f"unknown colour {self.colour!r}; expected one of {tuple(COLOURS)}")
        if self.domain not in DOMAINS:
            raise ValueError(f"unknown domain {self.domain!r}; expected one of {DOMAINS}")
        if not 0.0 < self.size < 1.0:
            raise ValueError(f"size must be a fraction of the image side in (0, 1), got {self.size}")

    @property
    def size_word(self) -> str:
        """The caption's word for this scene's size."""
        return size_word(self.size)


def size_word(size: float) -> str:
    """Return "small" or "large" for an object extent given as a fraction of the image side."""
    return "small" if size < SIZE_SPLIT else "large"


def all_combos() -> list[tuple[str, str]]:
    """Every (shape, colour) pair, in a fixed order."""
    return [(shape, colour) for shape in SHAPES for colour in COLOURS]


def caption(scene: Scene, with_size: bool = True) -> str:
    """The scene's caption, e.g. "a large red circle"; it never names the domain or style."""
    words = (
        ["a", scene.size_word, scene.colour, scene.shape] if with_size else ["a", scene.colour, scene.shape]
    )
    return " ".join(words)


# --------------------------------------------------------------------------------------------
# Rendering


def _triangle(cx: float, cy: float, s: float) -> list[tuple[float, float]]:
    """Upright isosceles triangle with base and height ``s``, centred on its bounding box."""
    return [(cx, cy - s / 2), (cx + s / 2, cy + s / 2), (cx - s / 2, cy + s / 2)]


def _inset_triangle(points: list[tuple[float, float]], inset: float) -> list[tuple[float, float]]:
    """The triangle whose edges lie ``inset`` inside those of ``points`` (scaled about the incentre)."""
    (ax, ay), (bx, by), (qx, qy) = points
    a, b, c = math.dist((bx, by), (qx, qy)), math.dist((ax, ay), (qx, qy)), math.dist((ax, ay), (bx, by))
    perimeter = a + b + c
    ix, iy = (a * ax + b * bx + c * qx) / perimeter, (a * ay + b * by + c * qy) / perimeter
    area = abs((bx - ax) * (qy - ay) - (qx - ax) * (by - ay)) / 2
    k = max(0.0, 1.0 - inset / (2 * area / perimeter))
    return [(ix + k * (x - ix), iy + k * (y - iy)) for x, y in points]


def _draw_shape(
    draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, s: float, inset: float, fill
) -> None:
    """Draw ``shape`` (extent ``s``, centre ``cx, cy``) shrunk by ``inset`` on every side."""
    if shape == "triangle":
        draw.polygon(
            _inset_triangle(_triangle(cx, cy, s), inset) if inset else _triangle(cx, cy, s), fill=fill
        )
        return
    half = s / 2 - inset
    if half <= 0:
        return
    if shape == "plus":
        arm = PLUS_ARM * s / 2 - inset  # half the arm's thickness
        if arm > 0:
            draw.rectangle([round(cx - half), round(cy - arm), round(cx + half) - 1, round(cy + arm) - 1], fill=fill)
            draw.rectangle([round(cx - arm), round(cy - half), round(cx + arm) - 1, round(cy + half) - 1], fill=fill)
        return
    box = [round(cx - half), round(cy - half), round(cx + half) - 1, round(cy + half) - 1]
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    else:
        draw.rectangle(box, fill=fill)


def render(
    scene: Scene,
    resolution: int = 64,
    outline: bool | None = None,
    tinted_background: bool | None = None,
) -> Image.Image:
    """Draw ``scene`` as an RGB image of ``resolution`` pixels square.

    ``outline`` and ``tinted_background`` default to the scene's domain (both on for "style", both
    off for "base"); passing them renders hybrids, e.g. an outline on the base background.
    """
    is_style = scene.domain == "style"
    outline = is_style if outline is None else outline
    tinted_background = is_style if tinted_background is None else tinted_background
    side = resolution * SUPERSAMPLE
    background = STYLE_BACKGROUND if tinted_background else BASE_BACKGROUND
    canvas = Image.new("RGB", (side, side), background)
    draw = ImageDraw.Draw(canvas)
    cx, cy, s = scene.cx * side, scene.cy * side, scene.size * side
    colour = COLOURS[scene.colour]
    if outline:
        _draw_shape(draw, scene.shape, cx, cy, s, 0.0, OUTLINE_COLOUR)
        _draw_shape(draw, scene.shape, cx, cy, s, OUTLINE_WIDTH * side, colour)
    else:
        _draw_shape(draw, scene.shape, cx, cy, s, 0.0, colour)
    return canvas.resize((resolution, resolution), Image.Resampling.BOX)


# --------------------------------------------------------------------------------------------
# Sampling


def sample_scenes(
    n: int,
    seed: int,
    domain: str,
    combos: Iterable[tuple[str, str]] | None = None,
) -> list[Scene]:
    """Draw ``n`` scenes of ``domain`` deterministically from ``seed``.

    (shape, colour) pairs cycle through shuffled rounds of ``combos`` (default: all pairs), so each
    appears equally often; size word, size and position are uniform. The draws do not depend on
    ``domain``: the same seed gives the same objects in both domains.
    """
    if domain not in DOMAINS:
        raise ValueError(f"unknown domain {domain!r}; expected one of {DOMAINS}")
    pool = sorted(
        {(str(shape), str(colour)) for shape, colour in (all_combos() if combos is None else combos)}
    )
    if not pool:
        raise ValueError("combos is empty")
    for shape, colour in pool:
        Scene(shape, colour, 0.5, 0.5, 0.5, domain)  # validates names
    rng = np.random.default_rng(seed)
    rounds = -(-n // len(pool))
    order = np.concatenate([rng.permutation(len(pool)) for _ in range(rounds)])[:n] if n else []
    scenes = []
    for index in order:
        low, high = SIZES[list(SIZES)[int(rng.integers(len(SIZES)))]]
        size = float(rng.uniform(low, high))
        lo, hi = size / 2 + MARGIN, 1 - size / 2 - MARGIN
        cx, cy = (float(v) for v in rng.uniform(lo, hi, size=2))
        shape, colour = pool[int(index)]
        scenes.append(Scene(shape, colour, round(size, 4), round(cx, 4), round(cy, 4), domain))
    return scenes


def split_combos(
    seed: int = 0, held_out_fraction: float = 0.25
) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """Split all (shape, colour) pairs into (fine-tuning combos, held-out combos), deterministically.

    Held-out pairs are chosen at random but never so that a shape or a colour would vanish from
    the fine-tuning combos; both lists come back sorted.
    """
    if not 0.0 <= held_out_fraction < 1.0:
        raise ValueError(f"held_out_fraction must be in [0, 1), got {held_out_fraction}")
    combos = all_combos()
    wanted = round(held_out_fraction * len(combos))
    rng = np.random.default_rng(seed)
    kept, held = list(combos), []
    for index in rng.permutation(len(combos)):
        if len(held) == wanted:
            break
        candidate = combos[int(index)]
        rest = [c for c in kept if c != candidate]
        if {s for s, _ in rest} == set(SHAPES) and {c for _, c in rest} == set(COLOURS):
            kept, held = rest, [*held, candidate]
    if len(held) < wanted:
        raise ValueError(f"cannot hold out {wanted} combos and keep every shape and colour")
    return sorted(kept), sorted(held)


# --------------------------------------------------------------------------------------------
# Writing


def write_imagefolder(out_dir: str | Path, scenes: Iterable[Scene], resolution: int = 64) -> Path:
    """Write ``scenes`` as a HuggingFace ``imagefolder`` dataset; return ``out_dir``.

    Writes ``00000.png``, ... , ``metadata.jsonl`` (``{"file_name", "text"}`` per line) and
    ``scenes.jsonl`` (the ground truth of each image). Same input, same bytes.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    meta_lines, scene_lines = [], []
    for i, scene in enumerate(scenes):
        name = f"{i:05d}.png"
        atomic.write_with(out / name, lambda temporary, scene=scene: render(scene, resolution).save(temporary, format="PNG", optimize=False))
        text = caption(scene)
        meta_lines.append(json.dumps({"file_name": name, "text": text}))
        scene_lines.append(json.dumps({"file_name": name, "text": text, **asdict(scene)}))
    atomic.write_text(out / "scenes.jsonl", "".join(line + "\n" for line in scene_lines))
    atomic.write_text(out / "metadata.jsonl", "".join(line + "\n" for line in meta_lines))  # last: marks it complete
    return out


def load_scenes(path: str | Path) -> list[Scene]:
    """Read the scenes back from ``scenes.jsonl`` (or from a folder containing it), in file order."""
    path = Path(path)
    if path.is_dir():
        path = path / "scenes.jsonl"
    fields = Scene.__dataclass_fields__
    scenes = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            row = json.loads(line)
            scenes.append(Scene(**{k: v for k, v in row.items() if k in fields}))
    return scenes
