"""Token partition: coverage rules, the margin disk, reference frames and edge cases, against brute-force loops."""

import pytest
import torch

from hetcache.errors import UserError
from hetcache.tokens import (
    CONTEXT,
    GENERATIVE,
    MARGIN,
    MaskShapeError,
    TokenPartition,
    partition_from_pixel_mask,
    partition_tokens,
    token_coverage,
)

P = 16  # pixels per token side


def reference_labels(mask, grid_hw, *, margin, threshold=0.0, temporal_margin=0):
    """Labels [T, H', W'] by plain loops over tokens: the rule of DESIGN section 3 written out directly."""
    frames, height, width = mask.shape
    rows, cols = grid_hw
    bh, bw = height // rows, width // cols
    groups = [[0]] + [list(range(4 * j - 3, 4 * j + 1)) for j in range(1, (frames - 1) // 4 + 1)]
    generative = set()
    for t, group in enumerate(groups):
        for h in range(rows):
            for w in range(cols):
                block = mask[group, h * bh : (h + 1) * bh, w * bw : (w + 1) * bw]
                if block.float().mean().item() > threshold:
                    generative.add((t, h, w))
    labels = torch.full((len(groups), rows, cols), CONTEXT, dtype=torch.int8)
    for t in range(len(groups)):
        for h in range(rows):
            for w in range(cols):
                if (t, h, w) in generative:
                    labels[t, h, w] = GENERATIVE
                elif any(
                    abs(t - gt) <= temporal_margin and (h - gh) ** 2 + (w - gw) ** 2 <= margin**2
                    for gt, gh, gw in generative
                ):
                    labels[t, h, w] = MARGIN
    return labels


def assert_matches(partition: TokenPartition, labels: torch.Tensor, references: int = 0):
    """The partition's three index sets are exactly the reference labels (shifted past reference frames)."""
    full = torch.cat([torch.full((references, *labels.shape[1:]), CONTEXT, dtype=torch.int8), labels]).flatten()
    assert partition.grid == (labels.shape[0] + references, *labels.shape[1:])
    assert partition.num_tokens == full.numel()
    sets = ((GENERATIVE, partition.generative), (MARGIN, partition.margin), (CONTEXT, partition.context))
    for value, indices in sets:
        assert indices.dtype == torch.int64
        assert torch.equal(indices, torch.nonzero(full == value).flatten())
    assert torch.equal(partition.labels(), full)
    assert torch.equal(torch.cat([partition.generative, partition.margin, partition.context]).sort().values,
                       torch.arange(full.numel()))
    counts = partition.counts()
    assert counts == {
        "generative": int((full == GENERATIVE).sum()),
        "margin": int((full == MARGIN).sum()),
        "context": int((full == CONTEXT).sum()),
        "total": full.numel(),
    }


def box_mask(frames, height, width, boxes):
    """Bool mask with one (y0, y1, x0, x1) box per frame (half-open pixel ranges); None leaves a frame empty."""
    mask = torch.zeros(frames, height, width, dtype=torch.bool)
    for f, box in enumerate(boxes):
        if box is not None:
            y0, y1, x0, x1 = box
            mask[f, y0:y1, x0:x1] = True
    return mask


def test_box_mask_gives_exact_generative_tokens_and_disk_margin():
    mask = box_mask(5, 12 * P, 14 * P, [(70, 120, 90, 130)] * 5)
    partition = partition_tokens(token_coverage(mask, (12, 14)), margin=3)
    labels = reference_labels(mask, (12, 14), margin=3)
    assert_matches(partition, labels)
    # rows 70..119 touch token rows 4..7, cols 90..129 touch token cols 5..8
    expected_g = torch.zeros(12, 14, dtype=torch.bool)
    expected_g[4:8, 5:9] = True
    assert torch.equal(labels[0] == GENERATIVE, expected_g)
    # the ring is a rounded rectangle: (1, 2) is 3 rows above and 3 cols left of the corner (4, 5), outside the disk
    assert labels[0, 2, 3] == MARGIN and labels[0, 1, 2] == CONTEXT and labels[0, 1, 5] == MARGIN


def test_any_masked_pixel_makes_a_token_generative():
    mask = torch.zeros(1, 4 * P, 4 * P, dtype=torch.bool)
    mask[0, P + 15, 2 * P] = True  # the last row, first column of token (1, 2)
    partition = partition_tokens(token_coverage(mask, (4, 4)), margin=0)
    assert partition.generative.tolist() == [1 * 4 + 2]
    assert partition.margin.numel() == 0


def test_gen_threshold_needs_more_than_that_fraction():
    mask = torch.zeros(5, 2 * P, 2 * P)
    mask[1:5, :8, :P] = 1.0  # token (0, 0) of latent frame 1: exactly half of its 4 x 256 pixels
    mask[1:5, :8, P:] = 1.0
    mask[1, 8, P] = 1.0  # token (0, 1): one pixel more than half
    coverage = token_coverage(mask, (2, 2))
    assert coverage[1, 0, 0].item() == 0.5
    half = partition_tokens(coverage, margin=0, gen_threshold=0.5)
    assert half.generative.tolist() == [4 + 1]
    assert partition_tokens(coverage, margin=0).generative.tolist() == [4 + 0, 4 + 1]


def test_float_mask_counts_pixels_above_one_half():
    mask = torch.full((1, P, P), 0.5)
    mask[0, 3, 3] = 0.51
    assert token_coverage(mask, (1, 1)).item() == 1 / 256


@pytest.mark.parametrize(("pixel_frame", "latent_frame"), [(0, 0), (1, 1), (3, 1), (4, 1), (5, 2), (8, 2)])
def test_latent_frame_groups_pixel_frames(pixel_frame, latent_frame):
    mask = torch.zeros(9, P, P, dtype=torch.bool)
    mask[pixel_frame, 0, 0] = True
    coverage = token_coverage(mask, (1, 1))
    assert coverage.shape == (3, 1, 1)
    assert torch.nonzero(coverage.flatten()).flatten().tolist() == [latent_frame]


def test_moving_mask_matches_brute_force():
    boxes = [(8 * f, 8 * f + 20, 12 * f, 12 * f + 30) for f in range(9)]
    mask = box_mask(9, 10 * P, 12 * P, boxes)
    partition = partition_tokens(token_coverage(mask, (10, 12)), margin=2)
    assert_matches(partition, reference_labels(mask, (10, 12), margin=2))


def test_temporal_margin_reaches_neighbouring_frames():
    mask = box_mask(13, 8 * P, 8 * P, [None] * 5 + [(3 * P, 4 * P, 3 * P, 4 * P)] + [None] * 7)  # latent frame 2
    coverage = token_coverage(mask, (8, 8))
    flat = partition_tokens(coverage, margin=2)
    assert_matches(flat, reference_labels(mask, (8, 8), margin=2))
    assert flat.margin.numel() == 12  # the radius-2 disk minus its centre, in frame 2 only
    reach = partition_tokens(coverage, margin=2, temporal_margin=1)
    assert_matches(reach, reference_labels(mask, (8, 8), margin=2, temporal_margin=1))
    assert reach.margin.numel() == 12 + 2 * 13


def test_frames_without_generative_tokens_have_no_margin():
    mask = box_mask(9, 6 * P, 6 * P, [(0, 8, 0, 8)] + [None] * 8)  # latent frame 0 only, in a corner
    partition = partition_tokens(token_coverage(mask, (6, 6)), margin=3)
    frames = partition.margin // 36
    assert partition.margin.numel() > 0 and frames.max().item() == 0


def test_empty_mask_has_only_context():
    partition = partition_tokens(token_coverage(torch.zeros(5, 4 * P, 6 * P), (4, 6)), margin=4)
    assert partition.counts() == {"generative": 0, "margin": 0, "context": 48, "total": 48}
    assert torch.equal(partition.context, torch.arange(48))


def test_full_mask_has_no_context_except_reference_frames():
    coverage = token_coverage(torch.ones(5, 4 * P, 6 * P, dtype=torch.bool), (4, 6))
    assert partition_tokens(coverage, margin=4).counts() == {"generative": 48, "margin": 0, "context": 0, "total": 48}
    with_refs = partition_tokens(coverage, margin=4, num_reference_frames=1)
    assert torch.equal(with_refs.context, torch.arange(24))
    assert torch.equal(with_refs.generative, torch.arange(24, 72))


def test_reference_frames_are_prepended_as_context():
    mask = box_mask(5, 6 * P, 8 * P, [(20, 50, 40, 90)] * 5)
    labels = reference_labels(mask, (6, 8), margin=1)
    plain = partition_tokens(token_coverage(mask, (6, 8)), margin=1)
    shifted = partition_from_pixel_mask(mask, (4, 6, 8), margin=1)
    assert shifted.num_reference_frames == 2
    assert_matches(shifted, labels, references=2)
    assert torch.equal(shifted.generative, plain.generative + 2 * 48)
    assert torch.equal(shifted.margin, plain.margin + 2 * 48)
    assert torch.equal(shifted.context[:96], torch.arange(96))
    explicit = partition_from_pixel_mask(mask, (4, 6, 8), margin=1, num_reference_frames=2)
    assert torch.equal(explicit.generative, shifted.generative)


def test_driving_example_rectangle():
    """480x832, 33 frames, rectangle y 120-359, x 208-623, margin 5 (the shipped example mask)."""
    mask = box_mask(33, 480, 832, [(120, 360, 208, 624)] * 33)
    partition = partition_from_pixel_mask(mask, (9, 30, 52), margin=5)
    labels = partition.labels().reshape(9, 30, 52)
    # any touched token is generative: rows 7..22 (row 7 and row 22 are half covered), cols 13..38
    expected_g = torch.zeros(30, 52, dtype=torch.bool)
    expected_g[7:23, 13:39] = True
    assert torch.equal(labels == GENERATIVE, expected_g.expand(9, -1, -1))
    # a top-left-quarter test (the released code's) would drop row 7 and keep 15 x 26 = 390 per frame
    assert int(expected_g.sum()) - 26 == 390
    first = reference_labels(mask[:1], (30, 52), margin=5)[0]
    assert torch.equal(labels, first.expand(9, -1, -1))
    assert partition.counts() == {"generative": 3744, "margin": 4320, "context": 5976, "total": 14040}


def test_mask_of_another_size_is_resized_by_pixel_centres():
    mask = torch.zeros(5, 9, 12, dtype=torch.bool)
    mask[:, 3:6, 6:12] = True  # rows 1/3..2/3 and the right half of the frame
    partition = partition_from_pixel_mask(mask, (2, 6, 8), margin=0)
    expected = torch.zeros(2, 6, 8, dtype=torch.bool)
    expected[:, 2:4, 4:8] = True
    assert torch.equal(partition.generative, torch.nonzero(expected.flatten()).flatten())


def test_mask_at_a_multiple_of_the_grid_keeps_its_coverage():
    full = box_mask(5, 4 * P, 4 * P, [(16, 40, 0, 20)] * 5)
    half = box_mask(5, 2 * P, 2 * P, [(8, 20, 0, 10)] * 5)
    assert torch.equal(token_coverage(full, (4, 4)), token_coverage(half, (4, 4)))


@pytest.mark.parametrize(
    ("frames", "grid", "references"),
    [(6, (2, 4, 4), None), (9, (2, 4, 4), None), (5, (4, 4, 4), 1), (5, (2, 4, 4), 2)],
)
def test_mask_length_that_does_not_fit_raises(frames, grid, references):
    mask = torch.zeros(frames, 4 * P, 4 * P)
    with pytest.raises(MaskShapeError) as error:
        partition_from_pixel_mask(mask, grid, margin=1, num_reference_frames=references)
    assert isinstance(error.value, ValueError) and isinstance(error.value, UserError)
    assert "frames" in str(error.value) and "\n" not in str(error.value)


def test_coverage_rejects_blocks_that_do_not_divide():
    with pytest.raises(ValueError, match="token blocks"):
        token_coverage(torch.zeros(1, 50, 64), (4, 4))
    with pytest.raises(ValueError, match="frames"):
        token_coverage(torch.zeros(3, 64, 64), (4, 4))
    with pytest.raises(ValueError):
        token_coverage(torch.zeros(64, 64), (4, 4))


def test_negative_margin_raises():
    with pytest.raises(ValueError):
        partition_tokens(torch.zeros(1, 4, 4), margin=-1)


def test_margin_disk_area_matches_lattice_count():
    """A lone token's margin is the lattice disk of radius r minus its centre, for several radii."""
    coverage = torch.zeros(1, 21, 21)
    coverage[0, 10, 10] = 1.0
    for radius in range(6):
        lattice = sum(1 for y in range(-radius, radius + 1) for x in range(-radius, radius + 1)
                      if y * y + x * x <= radius * radius)
        assert partition_tokens(coverage, margin=radius).margin.numel() == lattice - 1
