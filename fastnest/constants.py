"""Constants shared by every layer of fastnest: the bottom floor, importing nothing from fastnest."""

IGNORE_INDEX = -100  # target of a position that adds to no loss (PyTorch's cross-entropy default)
DEFAULT_SCALES: tuple[int, ...] = (1, 9, 36, 144, 576)  # tokens per image of the released M3 scales, 24x24 grid
