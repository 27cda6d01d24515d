"""A built-in, deterministic visual-question dataset of graded granularity (no downloads).

Each image is a 12x12 board of 4-pixel cells (48x48 pixels: a 24x24 grid of 2-pixel patches, so the default
scales 1/9/36/144/576 apply). A background colour fills the board; 1-3 "shapes" (2x2-cell squares, distinct
colours) sit on a 6x6 grid of slots; one "dot", a square of 2-pixel units in a palette of its own, sits on the
background; single cells of the shape colours ("clutter") are scattered over the rest. Questions of four kinds:

- ``global``: the background colour (most of the image: a single pooled token suffices);
- ``regional``: the quadrant holding the red shape (needs coarse spatial layout);
- ``fine``: the colour of the dot, in evaluation one 2x2-pixel unit, i.e. one patch and 1/576 of the image: a
  token pooled over k x k patches holds it diluted k^2-fold among its neighbours (4-fold at 144 tokens,
  64-fold at 9, 576-fold at 1);
- ``counting``: the number of shapes.

Training dots are 2, 4 or 6 units square (``TRAIN_DOT_SIZES``). With dots of one cell at most, the tiny model
trained from scratch never started to look the dot up (every scale's loss stayed equal): under its initial
near-uniform attention a dot moves the answer in proportion to its area, the same tiny amount at every scale.
Larger dots start the content lookup, which then reads a one-unit dot wherever a token still holds it
undiluted enough.

Sample ``i`` of a split depends only on ``(seed, i)``, so any position in the stream can be regenerated.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

BOARD = 12  # cells per side
CELL = 4  # pixels per cell side
UNIT = 2  # pixels per unit side: the dot's size step, one vision patch
IMAGE_SIZE = BOARD * CELL
# Shapes and dots take the six saturated corners of the RGB cube. A uniform patch reaches the tiny tower as a
# layer-normalised linear image of its RGB (a direction, not a brightness), where these corners lie far apart;
# with mid-tones (orange, pink, lime, navy, ...) the trained features of neighbouring colours stayed nearly
# parallel and the model could not tell the dot's colour even when it attended to it.
SHAPE_COLOURS = {"red": (230, 20, 20), "green": (20, 200, 20), "blue": (20, 20, 230)}
DOT_COLOURS = {"yellow": (240, 240, 0), "cyan": (0, 230, 230), "magenta": (230, 0, 230)}
BACKGROUNDS = {"black": (0, 0, 0), "white": (255, 255, 255), "gray": (128, 128, 128), "brown": (110, 65, 25)}
QUESTION_TYPES = ("global", "regional", "fine", "counting")
TRAIN_DOT_SIZES = (2, 4, 6)  # dot sides in units (2 pixels) during training; evaluation uses 1
NUMBERS = ("one", "two", "three")  # shapes have distinct colours
QUADRANTS = {(0, 0): "top left", (0, 1): "top right", (1, 0): "bottom left", (1, 1): "bottom right"}

QUESTIONS = {
    "global": "what colour is the background ?",
    "regional": "where is the red shape ?",
    "fine": "what colour is the dot ?",
    "counting": "how many shapes are there ?",
}


def vocabulary() -> list[str]:
    """Every word a question or an answer can hold (the tokenizer adds the template's words)."""
    words = {w for q in QUESTIONS.values() for w in q.split()}
    words |= set(SHAPE_COLOURS) | set(BACKGROUNDS) | set(DOT_COLOURS) | set(NUMBERS)
    words |= {w for q in QUADRANTS.values() for w in q.split()}
    return sorted(words)


@dataclass(frozen=True)
class SyntheticSample:
    image: np.ndarray  # uint8 [IMAGE_SIZE, IMAGE_SIZE, 3]
    questions: tuple[tuple[str, str, str], ...]  # (question type, question, answer) per turn

    @property
    def question_type(self) -> str:
        """The type of the first question (the only one in an evaluation sample)."""
        return self.questions[0][0]

    def conversation(self) -> list[dict]:
        """The sample in LLaVA's conversation format: the image leads the first human turn."""
        turns = []
        for i, (_, question, answer) in enumerate(self.questions):
            turns.append({"from": "human", "value": f"<image>\n{question}" if i == 0 else question})
            turns.append({"from": "gpt", "value": answer})
        return turns


class SyntheticVQA:
    """``dataset[i]`` for ``0 <= i < size``, regenerated from ``(seed, i)`` on every access.

    ``turns=1``: one question per image, of type ``QUESTION_TYPES[i % 4]`` (evaluation). ``turns>1``: that
    many questions of distinct types in a random order (training: every image is paid for once in the vision
    tower and at every scale, so asking it several questions is cheap supervision).
    """

    def __init__(
        self,
        size: int,
        seed: int = 0,
        turns: int = 1,
        clutter: tuple[int, int] = (10, 20),
        dot_sizes: tuple[int, ...] = (1,),
    ) -> None:
        if size < 1:
            raise ValueError(f"size must be positive, got {size}")
        if not 1 <= turns <= len(QUESTION_TYPES):
            raise ValueError(f"turns must be in 1..{len(QUESTION_TYPES)} (one question per type), got {turns}")
        if not dot_sizes or not all(1 <= d <= 8 for d in dot_sizes):
            raise ValueError(f"dot_sizes must be sides in units (2 pixels) from 1 to 8, got {dot_sizes}")
        self.size, self.seed, self.turns, self.clutter, self.dot_sizes = size, seed, turns, clutter, tuple(dot_sizes)

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> SyntheticSample:
        if not 0 <= index < self.size:
            raise IndexError(f"index {index} out of range for {self.size} samples")
        rng = np.random.default_rng([self.seed, index])
        scene = Scene.draw(rng, self.clutter, int(rng.choice(self.dot_sizes)))
        if self.turns == 1:
            types = [QUESTION_TYPES[index % len(QUESTION_TYPES)]]
        else:
            types = [QUESTION_TYPES[i] for i in rng.permutation(len(QUESTION_TYPES))[: self.turns]]
        return SyntheticSample(scene.render(), tuple((t, *scene.ask(t)) for t in types))


@dataclass(frozen=True)
class Scene:
    units: np.ndarray  # [2 * BOARD, 2 * BOARD] colour name per patch-sized unit (a cell is 2x2 units)
    background: str
    n_shapes: int
    red_slot: tuple[int, int]  # (row, col) on the (BOARD/2)^2 slot grid
    dot: str  # the dot's colour

    @classmethod
    def draw(cls, rng: np.random.Generator, clutter: tuple[int, int], dot_size: int = 1) -> Scene:
        """Background, 1-3 shapes of distinct colours (exactly one red), the dot (``dot_size`` units square) on
        background, then single-cell clutter (never red) on whole background cells."""
        background = str(rng.choice(list(BACKGROUNDS)))
        cells = np.full((BOARD, BOARD), background, dtype=object)
        n_shapes = int(rng.integers(1, len(SHAPE_COLOURS) + 1))
        others = [c for c in SHAPE_COLOURS if c != "red"]
        colours = ["red", *(str(c) for c in rng.choice(others, size=n_shapes - 1, replace=False))]
        slots = [divmod(int(s), BOARD // 2) for s in rng.choice((BOARD // 2) ** 2, size=n_shapes, replace=False)]
        for (r, c), colour in zip(slots, colours):
            cells[2 * r : 2 * r + 2, 2 * c : 2 * c + 2] = colour
        units = np.repeat(np.repeat(cells, 2, axis=0), 2, axis=1)
        empty = np.lib.stride_tricks.sliding_window_view(units == background, (dot_size, dot_size)).all((2, 3))
        r, c = divmod(int(rng.choice(np.flatnonzero(empty))), empty.shape[1])  # 3 shapes leave room for 8x8
        dot = str(rng.choice(list(DOT_COLOURS)))
        units[r : r + dot_size, c : c + dot_size] = dot
        free = np.flatnonzero((units == background).reshape(BOARD, 2, BOARD, 2).all((1, 3)))  # whole cells
        for flat in rng.choice(free, size=min(int(rng.integers(clutter[0], clutter[1] + 1)), free.size), replace=False):
            r, c = divmod(int(flat), BOARD)
            units[2 * r : 2 * r + 2, 2 * c : 2 * c + 2] = str(rng.choice(others))
        return cls(units, background, n_shapes, slots[0], dot)

    def ask(self, question_type: str) -> tuple[str, str]:
        """(question, answer) of the given type about this scene."""
        if question_type == "global":
            return QUESTIONS["global"], self.background
        if question_type == "regional":
            half = BOARD // 4  # slots per half board
            return QUESTIONS["regional"], QUADRANTS[(int(self.red_slot[0] >= half), int(self.red_slot[1] >= half))]
        if question_type == "counting":
            return QUESTIONS["counting"], NUMBERS[self.n_shapes - 1]
        if question_type == "fine":
            return QUESTIONS["fine"], self.dot
        raise ValueError(f"question_type {question_type!r} is not one of {QUESTION_TYPES}")

    def render(self) -> np.ndarray:
        palette = SHAPE_COLOURS | BACKGROUNDS | DOT_COLOURS
        rgb = np.array([[palette[c] for c in row] for row in self.units], dtype=np.uint8)
        return np.repeat(np.repeat(rgb, UNIT, axis=0), UNIT, axis=1)
