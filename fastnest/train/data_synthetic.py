"""A built-in, deterministic visual-question dataset whose granularity is known by construction (no downloads).

Each image is 48x48 pixels: a 24x24 grid of 2-pixel patches, so the default scales 1/9/36/144/576 pool it to
tokens of 24, 8, 4, 2 and 1 patches a side. A background colour fills it, and three objects sit on it, each sized
to be exactly ONE token at its own scale and aligned to that scale's token grid:

- ``global``: "what colour is the background ?" (71% of the image: one pooled token holds it);
- ``regional``: the colour of the *block*, 8x8 patches = one token at 9 (a ninth of the image);
- ``local``: the colour of the *tile*, 4x4 patches = one token at 36;
- ``fine``: the colour of the *dot*, 2x2 patches = one token at 144.

Each object's colour is one of a pair (its palette, used by nothing else), and the other colour of the pair is
its *decoy*: the same number of pixels, cut into four pieces of the next finer scale's token, each piece alone in
a token of the object's scale, all four inside one token of the next coarser scale. So, per object:

- at its own scale, the object is the one token filled with its palette; each decoy token is a quarter full;
- at every coarser scale, the object and its decoy put the same mass of colour into equally many, equally full
  tokens (the block and its decoy at 1 token: 64 patches each in the one token);
- at every finer scale, the object and its decoy are equally many full tokens.

Each object's and its decoy's cells hold nothing else, so swapping the pair's two colours only permutes the pooled
tokens at every scale but the object's own: there, no reading of the tokens one by one (and pooling leaves nothing
else at the coarser scales) tells the object from its decoy, and the pair's two colours are equally likely answers
(50%); at its own scale the answer is the pair's fullest token. At the finer scales the tokens' arrangement still
tells them apart (the object's tokens are adjacent, the decoy's are not): the trained tiny model learns that for
the block, which does not move the block's granularity (the fewest tokens that answer). The analysis of a trained
model finds each type's granularity where it was put: 1, 9, 36 and 144 tokens (``DESIGNED_SCALES``).

Training follows a curriculum (``curriculum=True``): images hold no decoy in the first quarter of the run; then the
chance of each decoy rises linearly to 1 at three quarters (``DECOY_RAMP``), and a tile or dot drawn without its
decoy is larger (``LONE_SIDES``: 4-8 and 2-6 patches wide), anywhere in its cell. With every decoy from the start,
the tiny model trained from scratch learned only the block in 2000 steps: while its attention is near uniform, an
object and its decoy pull the answer equally hard towards their two colours, so nothing starts the lookup. Without
the decoy, the pair's one colour present is the answer at every scale, which teaches the model where each palette is
and what to answer; the decoys then teach it to prefer the fullest token. With the decoys ramping in from the first
step and only the dot enlarged, one seed of two learned the tile and the dot; with this schedule both seeds checked
learned all four. Evaluation images always hold every decoy, at the designed sizes.

Sample ``i`` of a split depends only on ``(seed, i)``, so any position in the stream can be regenerated.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

GRID = 24  # patches per side
UNIT = 2  # pixels per patch side
IMAGE_SIZE = GRID * UNIT
# Objects take the six saturated corners of the RGB cube, one complementary pair per object. A uniform patch
# reaches the tiny tower as a layer-normalised linear image of its RGB (a direction, not a brightness), where these
# corners lie far apart; with mid-tones the trained features of neighbouring colours stayed nearly parallel.
PALETTES = {
    "regional": {"red": (230, 20, 20), "cyan": (0, 230, 230)},
    "local": {"green": (20, 200, 20), "magenta": (230, 0, 230)},
    "fine": {"blue": (20, 20, 230), "yellow": (240, 240, 0)},
}
BACKGROUNDS = {"black": (0, 0, 0), "white": (255, 255, 255), "gray": (128, 128, 128), "brown": (110, 65, 25)}
QUESTION_TYPES = ("global", "regional", "local", "fine")
# The object of each type is one token at this scale, and only there (see the module docstring).
DESIGNED_SCALES = {"global": 1, "regional": 9, "local": 36, "fine": 144}
OBJECT_SIDE = {"regional": 8, "local": 4, "fine": 2}  # patches: one token at the designed scale
LONE_SIDES = {"local": (4, 6, 8), "fine": (2, 4, 6)}  # patches: a training tile / dot without its decoy
DECOY_RAMP = (0.25, 0.75)  # fractions of the training stream where decoys start to appear and where all have

QUESTIONS = {
    "global": "what colour is the background ?",
    "regional": "what colour is the block ?",
    "local": "what colour is the tile ?",
    "fine": "what colour is the dot ?",
}


def vocabulary() -> list[str]:
    """Every word a question or an answer can hold (the tokenizer adds the template's words)."""
    words = {w for q in QUESTIONS.values() for w in q.split()}
    words |= set(BACKGROUNDS) | {c for palette in PALETTES.values() for c in palette}
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
    tower and at every scale, so asking it several questions is cheap supervision). ``curriculum``: the decoys
    come in over the stream as ``DECOY_RAMP`` says (training, read in order; see the module docstring).
    """

    def __init__(self, size: int, seed: int = 0, turns: int = 1, curriculum: bool = False) -> None:
        if size < 1:
            raise ValueError(f"size must be positive, got {size}")
        if not 1 <= turns <= len(QUESTION_TYPES):
            raise ValueError(f"turns must be in 1..{len(QUESTION_TYPES)} (one question per type), got {turns}")
        self.size, self.seed, self.turns, self.curriculum = size, seed, turns, curriculum

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> SyntheticSample:
        if not 0 <= index < self.size:
            raise IndexError(f"index {index} out of range for {self.size} samples")
        rng = np.random.default_rng([self.seed, index])
        start, full = DECOY_RAMP
        rate = min(1.0, max(0.0, (index / self.size - start) / (full - start))) if self.curriculum else 1.0
        scene = Scene.draw(rng, rate)
        if self.turns == 1:
            types = [QUESTION_TYPES[index % len(QUESTION_TYPES)]]
        else:
            types = [QUESTION_TYPES[i] for i in rng.permutation(len(QUESTION_TYPES))[: self.turns]]
        return SyntheticSample(scene.render(), tuple((t, QUESTIONS[t], scene.answers[t]) for t in types))


def _quarter(rng: np.random.Generator, corner: tuple[int, int], side: int) -> tuple[int, int]:
    """The top-left patch of a random ``side``-square quarter of the ``2 * side`` square at ``corner``."""
    return corner[0] + side * int(rng.integers(2)), corner[1] + side * int(rng.integers(2))


def _pieces(rng: np.random.Generator, corner: tuple[int, int], side: int) -> list[tuple[int, int]]:
    """The decoy of an object of ``side`` patches: four squares of ``side // 2``, one at a random place in each
    ``side``-square quarter of the ``2 * side`` square at ``corner`` (one per token of the object's scale, all
    inside one token of the next coarser scale)."""
    return [
        _quarter(rng, (corner[0] + qr * side, corner[1] + qc * side), side // 2) for qr in range(2) for qc in range(2)
    ]


@dataclass(frozen=True)
class Scene:
    patches: np.ndarray  # [GRID, GRID] colour name per patch
    answers: dict  # question type -> answer

    @classmethod
    def draw(cls, rng: np.random.Generator, decoy_rate: float = 1.0) -> Scene:
        """The background, then each object in one colour of its pair and, with probability ``decoy_rate``, its
        decoy in the other, where ``_layout`` puts them (a tile or dot without its decoy: ``LONE_SIDES``)."""
        background = str(rng.choice(list(BACKGROUNDS)))
        patches = np.full((GRID, GRID), background, dtype=object)
        answers = {"global": background}
        for qtype, (obj, decoy) in _layout(rng).items():
            colour, other = (str(c) for c in rng.permutation(list(PALETTES[qtype])))
            side = OBJECT_SIDE[qtype]
            r, c = obj
            with_decoy = rng.random() < decoy_rate
            if qtype in LONE_SIDES and not with_decoy:  # larger, anywhere in its 8-patch cell: starts the lookup
                side = int(rng.choice(LONE_SIDES[qtype]))
                r, c = 8 * (r // 8) + int(rng.integers(0, 9 - side)), 8 * (c // 8) + int(rng.integers(0, 9 - side))
            patches[r : r + side, c : c + side] = colour
            for r, c in decoy if with_decoy else ():
                patches[r : r + side // 2, c : c + side // 2] = other
            answers[qtype] = colour
        return cls(patches, answers)

    def render(self) -> np.ndarray:
        palette = BACKGROUNDS | {c: rgb for p in PALETTES.values() for c, rgb in p.items()}
        rgb = np.array([[palette[c] for c in row] for row in self.patches], dtype=np.uint8)
        return np.repeat(np.repeat(rgb, UNIT, axis=0), UNIT, axis=1)


def _layout(rng: np.random.Generator) -> dict[str, tuple[tuple[int, int], list[tuple[int, int]]]]:
    """Per object type: the object's top-left patch and its decoy pieces' top-left patches.

    The 3x3 grid of 8-patch cells (the tokens at 9): the block fills one; its decoy pieces (4 patches) sit one in
    each of four others; the tile's decoy fills a fifth (a 2-patch piece in each of its four 4-patch quarters) and
    the tile a 4-patch quarter of a sixth. The dot and its decoy take two 4-patch quarters (tokens at 36) of a
    seventh: the dot a 2-patch quarter of one, its decoy a patch in each quarter of the other.
    """
    cells = [divmod(int(i), 3) for i in rng.permutation(9)]
    at = lambda cell: (8 * cell[0], 8 * cell[1])  # noqa: E731
    block, decoy_cells, tile_decoy, tile_cell = cells[0], cells[1:5], cells[5], cells[6]
    block_decoy = [_quarter(rng, at(cell), 4) for cell in decoy_cells]
    tile = _quarter(rng, at(tile_cell), 4)
    # The dot and its decoy share an 8-patch cell of their own, so that at 9 tokens they are one token and at 1
    # they sit beside the same things.
    quarters = [(8 * cells[7][0] + 4 * (q // 2), 8 * cells[7][1] + 4 * (q % 2)) for q in rng.permutation(4)[:2]]
    dot_cell, dot_decoy_cell = quarters
    return {
        "regional": (at(block), block_decoy),
        "local": (tile, _pieces(rng, at(tile_decoy), 4)),
        "fine": (_quarter(rng, dot_cell, 2), _pieces(rng, dot_decoy_cell, 2)),
    }
