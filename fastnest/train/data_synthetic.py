"""A built-in, deterministic visual-question dataset of graded granularity (no downloads).

Each image is a 12x12 board of 4-pixel cells (48x48 pixels: a 24x24 grid of 2-pixel patches, so the default
scales 1/9/36/144/576 apply). A background colour fills the board; 1-4 "shapes" (2x2-cell squares, distinct
colours) sit on a 6x6 grid of slots; a sprinkling of single coloured cells ("dots") is scattered over the rest.
Questions, one per sample, of four kinds:

- ``global``: the background colour (most of the image: a single pooled token suffices);
- ``regional``: the quadrant holding the red shape (needs coarse spatial layout);
- ``fine``: the colour of the cell at a given row and column (a single 4-pixel cell: needs 144 tokens, one
  per cell, to be read unambiguously);
- ``counting``: the number of shapes.

Sample ``i`` of a split depends only on ``(seed, i)``, so any position in the stream can be regenerated.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

BOARD = 12  # cells per side
CELL = 4  # pixels per cell side
IMAGE_SIZE = BOARD * CELL
SHAPE_COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 170, 40),
    "blue": (40, 70, 230),
    "yellow": (235, 215, 30),
    "purple": (150, 50, 200),
    "orange": (250, 140, 20),
}
BACKGROUNDS = {"black": (0, 0, 0), "white": (255, 255, 255), "gray": (128, 128, 128), "brown": (110, 65, 25)}
QUESTION_TYPES = ("global", "regional", "fine", "counting")
NUMBERS = ("one", "two", "three", "four")
QUADRANTS = {(0, 0): "top left", (0, 1): "top right", (1, 0): "bottom left", (1, 1): "bottom right"}

QUESTIONS = {
    "global": "what colour is the background ?",
    "regional": "where is the red shape ?",
    "fine": "what colour is the cell at row {row} column {col} ?",
    "counting": "how many shapes are there ?",
}


def vocabulary() -> list[str]:
    """Every word a question or an answer can hold (the tokenizer adds the template's words)."""
    words = {w for q in QUESTIONS.values() for w in q.split() if "{" not in w}
    words |= set(SHAPE_COLOURS) | set(BACKGROUNDS) | set(NUMBERS)
    words |= {w for q in QUADRANTS.values() for w in q.split()}
    words |= {str(i + 1) for i in range(BOARD)}
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

    ``turns=1``: one question per image, of type ``QUESTION_TYPES[i % 4]`` (evaluation). ``turns>1``: one
    question of each type, then further ``fine`` ones, in a random order (training: every image is paid for
    once in the vision tower and at every scale, so asking it several questions is cheap supervision).
    """

    def __init__(self, size: int, seed: int = 0, turns: int = 1, dots: tuple[int, int] = (10, 20)) -> None:
        if size < 1:
            raise ValueError(f"size must be positive, got {size}")
        if turns < 1:
            raise ValueError(f"turns must be positive, got {turns}")
        self.size, self.seed, self.turns, self.dots = size, seed, turns, dots

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> SyntheticSample:
        if not 0 <= index < self.size:
            raise IndexError(f"index {index} out of range for {self.size} samples")
        rng = np.random.default_rng([self.seed, index])
        scene = Scene.draw(rng, self.dots)
        if self.turns == 1:
            types = [QUESTION_TYPES[index % len(QUESTION_TYPES)]]
        else:
            types = list(QUESTION_TYPES) + ["fine"] * (self.turns - len(QUESTION_TYPES))
            types = [types[i] for i in rng.permutation(len(types))][: self.turns]
        return SyntheticSample(scene.render(), tuple((t, *scene.ask(t, rng)) for t in types))


@dataclass(frozen=True)
class Scene:
    cells: np.ndarray  # [BOARD, BOARD] colour name per cell
    background: str
    n_shapes: int
    red_slot: tuple[int, int]  # (row, col) on the (BOARD/2)^2 slot grid

    @classmethod
    def draw(cls, rng: np.random.Generator, dots: tuple[int, int]) -> Scene:
        """Background, 1-4 shapes of distinct colours (exactly one red), then single-cell dots (never red)."""
        background = str(rng.choice(list(BACKGROUNDS)))
        cells = np.full((BOARD, BOARD), background, dtype=object)
        n_shapes = int(rng.integers(1, 5))
        others = [c for c in SHAPE_COLOURS if c != "red"]
        colours = ["red", *(str(c) for c in rng.choice(others, size=n_shapes - 1, replace=False))]
        slots = [divmod(int(s), BOARD // 2) for s in rng.choice((BOARD // 2) ** 2, size=n_shapes, replace=False)]
        for (r, c), colour in zip(slots, colours):
            cells[2 * r : 2 * r + 2, 2 * c : 2 * c + 2] = colour
        free = np.flatnonzero((cells == background).ravel())
        n_dots = min(int(rng.integers(dots[0], dots[1] + 1)), free.size)
        for flat in rng.choice(free, size=n_dots, replace=False):
            cells.ravel()[flat] = str(rng.choice(others))
        return cls(cells, background, n_shapes, slots[0])

    def ask(self, question_type: str, rng: np.random.Generator) -> tuple[str, str]:
        """(question, answer) of the given type about this scene."""
        if question_type == "global":
            return QUESTIONS["global"], self.background
        if question_type == "regional":
            half = BOARD // 4  # slots per half board
            return QUESTIONS["regional"], QUADRANTS[(int(self.red_slot[0] >= half), int(self.red_slot[1] >= half))]
        if question_type == "counting":
            return QUESTIONS["counting"], NUMBERS[self.n_shapes - 1]
        if question_type == "fine":
            # Half the time a coloured cell, else a background one, so neither answer is a safe guess.
            coloured = (self.cells != self.background).ravel()
            flat = int(rng.choice(np.flatnonzero(coloured if rng.random() < 0.5 else ~coloured)))
            row, col = divmod(flat, BOARD)
            return QUESTIONS["fine"].format(row=row + 1, col=col + 1), str(self.cells[row, col])
        raise ValueError(f"question_type {question_type!r} is not one of {QUESTION_TYPES}")

    def render(self) -> np.ndarray:
        palette = SHAPE_COLOURS | BACKGROUNDS
        rgb = np.array([[palette[c] for c in row] for row in self.cells], dtype=np.uint8)  # [BOARD, BOARD, 3]
        return np.repeat(np.repeat(rgb, CELL, axis=0), CELL, axis=1)
