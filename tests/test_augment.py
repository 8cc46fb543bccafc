"""Batch augmentation geometry."""

import torch

from foldercnn.data.augment import AugmentConfig, apply_affine, augment_batch, hflip, random_affine_matrices


def batch(n=4, size=16, seed=0):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_flip_twice_is_identity():
    x = batch()
    assert torch.equal(hflip(hflip(x)), x)
    assert not torch.equal(hflip(x), x)


def test_zero_ranges_are_identity():
    x = batch()
    assert torch.equal(augment_batch(x, AugmentConfig()), x)
    m = random_affine_matrices(4, AugmentConfig())
    assert torch.allclose(m, torch.tensor([[1.0, 0, 0], [0, 1, 0]]).expand(4, 2, 3))
    assert torch.allclose(apply_affine(x, m), x, atol=1e-6)


def test_flip_only_gives_original_or_mirror():
    x = batch(n=32)
    y = augment_batch(x, AugmentConfig(horizontal_flip=True), torch.Generator().manual_seed(0))
    same = [torch.equal(a, b) for a, b in zip(y, x)]
    mirrored = [torch.equal(a, b) for a, b in zip(y, hflip(x))]
    assert all(s or m for s, m in zip(same, mirrored)) and any(same) and any(mirrored)


def test_rotation_is_a_pure_rotation_within_range():
    m = random_affine_matrices(1000, AugmentConfig(rotation=40), torch.Generator().manual_seed(0))
    lin = m[:, :, :2]
    assert torch.allclose(lin @ lin.transpose(1, 2), torch.eye(2).expand(1000, 2, 2), atol=1e-5)
    angles = torch.rad2deg(torch.atan2(lin[:, 0, 1], lin[:, 0, 0]))
    assert angles.abs().max() <= 40 + 1e-3 and angles.abs().max() > 35
    assert torch.allclose(m[:, :, 2], torch.zeros(1000, 2))


def test_quarter_turn_matrix_matches_rot90():
    x = batch(n=1)
    # Keras' rotation matrix for +90 degrees, (row, col) [[0, -1], [1, 0]], written in (x, y) order;
    # on screen (row 0 at the top) it turns the picture clockwise
    quarter = torch.tensor([[[0.0, 1.0, 0.0], [-1.0, 0.0, 0.0]]])
    assert torch.allclose(apply_affine(x, quarter), torch.rot90(x, k=-1, dims=(-2, -1)), atol=1e-5)


def test_shift_moves_content_and_fills_with_edge():
    x = torch.zeros(1, 1, 8, 8)
    x[..., 3, 3] = 1.0
    m = torch.tensor([[[1.0, 0.0, -0.5], [0.0, 1.0, 0.0]]])  # sample from x - 2 pixels: content moves right by 2
    y = apply_affine(x, m)
    assert y[0, 0, 3, 5] > 0.99 and y[0, 0, 3, 3] < 0.01
    ramp = torch.arange(8.0).view(1, 1, 1, 8).expand(1, 1, 8, 8)
    y = apply_affine(ramp, m)
    assert torch.allclose(y[0, 0, :, 0], torch.zeros(8))  # left edge repeated, not black padding of new values
    assert torch.allclose(y[0, 0, :, 1], torch.zeros(8))


def test_augmentation_is_seeded_and_ranges_respected():
    cfg = AugmentConfig(rotation=40, width_shift=0.2, height_shift=0.2, shear=0.2, zoom=0.2, horizontal_flip=True)
    x = batch(n=8)
    a = augment_batch(x, cfg, torch.Generator().manual_seed(1))
    b = augment_batch(x, cfg, torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and a.shape == x.shape
    m = random_affine_matrices(10000, AugmentConfig(width_shift=0.2, zoom=0.2), torch.Generator().manual_seed(0))
    assert m[:, 0, 2].abs().max() <= 0.4 + 1e-6  # 20% of the width = 0.4 in [-1, 1] units
    assert m[:, 0, 0].min() >= 0.8 - 1e-6 and m[:, 0, 0].max() <= 1.2 + 1e-6


def test_colour_jitter_stays_in_range_and_saturation_keeps_grey_level():
    x = batch(n=16) * 0.5 + 0.25
    y = augment_batch(x, AugmentConfig(brightness=0.5, contrast=0.5, saturation=0.5), torch.Generator().manual_seed(0))
    assert y.min() >= 0 and y.max() <= 1 and not torch.equal(x, y)
    s = augment_batch(x, AugmentConfig(saturation=0.9), torch.Generator().manual_seed(0))
    assert torch.allclose(s.mean(1), x.mean(1), atol=1e-5)  # only the colourfulness changes
