"""MatryoshkaScales / allowed_scales against a brute-force statement of the definition."""

import dataclasses
import itertools
import math
import re

import pytest

from fastnest.scales import MatryoshkaScales, allowed_scales


def reference_allowed(grid):
    """Every s = r*r (1 <= s <= grid*grid) whose side r divides the grid, by brute force."""
    out = []
    for s in range(1, grid * grid + 1):
        r = round(math.sqrt(s))
        if r * r == s and grid % r == 0:
            out.append(s)
    return tuple(out)


def numbers(text):
    return [int(t) for t in re.findall(r"-?\d+", text)]


def lists_in_order(msg, values):
    """True when ``values`` appear as a contiguous run of the integers written in ``msg``."""
    nums, vals = numbers(msg), list(values)
    return any(nums[i : i + len(vals)] == vals for i in range(len(nums) - len(vals) + 1))


@pytest.mark.parametrize("grid", list(range(1, 41)))
def test_allowed_scales_matches_brute_force(grid):
    assert allowed_scales(grid) == reference_allowed(grid)


def test_allowed_scales_known_grids():
    # 24 = 2^3 * 3: divisors 1, 2, 3, 4, 6, 8, 12, 24 -> squares of grid/k
    assert allowed_scales(24) == (1, 4, 9, 16, 36, 64, 144, 576)
    # 27 = 3^3: divisors 1, 3, 9, 27
    assert allowed_scales(27) == (1, 9, 81, 729)


def test_llava_default_scales():
    spec = MatryoshkaScales(24, (1, 9, 36, 144, 576))
    assert spec.grid == 24
    assert spec.scales == (1, 9, 36, 144, 576)
    assert spec.tokens_per_image == 576
    assert spec.kernels == (24, 8, 4, 2, 1)
    assert spec.offsets == (0, 1, 10, 46, 190)
    assert spec.total == 766


def test_siglip_grid_27_descending():
    spec = MatryoshkaScales(27, (729, 81, 9, 1))
    assert spec.scales == (729, 81, 9, 1)  # order kept, not sorted
    assert spec.tokens_per_image == 729
    assert spec.kernels == (1, 3, 9, 27)
    assert spec.offsets == (0, 729, 810, 819)
    assert spec.total == 820


@pytest.mark.parametrize(
    "grid, scales",
    [(24, (144, 1, 576, 9)), (24, (4, 16, 64)), (27, (9, 729)), (12, (1, 4, 9, 16, 36, 144)), (1, (1,)), (5, (25, 1))],
)
def test_properties_match_definition(grid, scales):
    spec = MatryoshkaScales(grid, iter(scales))  # any iterable is accepted
    assert spec.scales == tuple(scales)
    kernels = []
    for s in scales:
        k = grid / math.sqrt(s)
        assert k == int(k)
        kernels.append(int(k))
    assert spec.kernels == tuple(kernels)
    assert spec.offsets == tuple(itertools.accumulate((0, *scales[:-1])))
    assert spec.total == sum(scales)
    for i, s in enumerate(scales):
        assert spec.index(s) == i


@pytest.mark.parametrize("grid, bad", [(24, 25), (24, 10), (24, 2), (24, 0), (24, -1), (24, 577), (27, 36), (27, 4)])
def test_scale_that_does_not_divide_grid(grid, bad):
    with pytest.raises(ValueError) as err:
        MatryoshkaScales(grid, (1, bad))
    msg = str(err.value)
    assert bad in numbers(msg)
    assert lists_in_order(msg, allowed_scales(grid)), msg


@pytest.mark.parametrize("bad", [9.0, "9", True, None, 36.5])
def test_non_int_scale(bad):
    with pytest.raises(ValueError) as err:
        MatryoshkaScales(24, (1, bad))
    msg = str(err.value)
    assert repr(bad) in msg
    assert lists_in_order(msg, allowed_scales(24)), msg


def test_empty_scales():
    with pytest.raises(ValueError) as err:
        MatryoshkaScales(24, ())
    msg = str(err.value)
    assert "empty" in msg
    assert lists_in_order(msg, allowed_scales(24)), msg


@pytest.mark.parametrize("scales", [(9, 9), (1, 36, 1), (576, 144, 576)])
def test_duplicate_scales(scales):
    with pytest.raises(ValueError) as err:
        MatryoshkaScales(24, scales)
    msg = str(err.value)
    dup = next(s for s in scales if scales.count(s) > 1)
    assert dup in numbers(msg)


@pytest.mark.parametrize("grid", [0, -3, 2.0, "24", None])
def test_bad_grid(grid):
    with pytest.raises(ValueError) as err:
        MatryoshkaScales(grid, (1,))
    assert repr(grid) in str(err.value)


def test_index_and_only_errors_name_value_and_configured_set():
    spec = MatryoshkaScales(24, (36, 1, 9))
    for method in (spec.index, spec.only):
        # 4 is valid on a 24 grid but not configured; 25 is not valid at all
        for bad in (4, 576, 25):
            with pytest.raises(ValueError) as err:
                method(bad)
            msg = str(err.value)
            assert bad in numbers(msg), msg
            assert lists_in_order(msg, (36, 1, 9)), msg


def test_index_keeps_given_order():
    spec = MatryoshkaScales(24, (36, 1, 9))
    assert [spec.index(s) for s in (36, 1, 9)] == [0, 1, 2]


@pytest.mark.parametrize("scale", [1, 9, 36])
def test_only(scale):
    spec = MatryoshkaScales(24, (36, 1, 9))
    one = spec.only(scale)
    assert isinstance(one, MatryoshkaScales)
    assert one.grid == 24
    assert one.scales == (scale,)
    assert one.offsets == (0,)
    assert one.total == scale
    assert one.kernels == (24 // math.isqrt(scale),)
    assert spec.scales == (36, 1, 9)  # original untouched


def test_frozen_and_equal():
    a = MatryoshkaScales(24, [1, 9])
    b = MatryoshkaScales(24, (1, 9))
    assert a == b
    assert hash(a) == hash(b)
    assert a != MatryoshkaScales(24, (9, 1))
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.grid = 12
