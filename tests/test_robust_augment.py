"""Background randomisation and capture augmentation (the `robust` recipe's)."""

import numpy as np
import torch
from PIL import Image, ImageDraw

from foldercnn.data.augment import AugmentConfig, augment_batch, capture_batch
from foldercnn.data.backgrounds import background_bank, plain_background, replace_backgrounds, subject_mask

SIZE = 48


def hand_like(background, seed):
    """A dark blob (the subject) touching the bottom edge, on a plain colour or on busy noise."""
    rng = np.random.default_rng(seed)
    if background == "plain":
        im = Image.new("RGB", (SIZE, SIZE), tuple(int(v) for v in rng.integers(200, 256, 3)))
    else:
        im = Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8))
    d = ImageDraw.Draw(im)
    d.ellipse([14, 10, 34, 30], fill=(90, 50, 30))
    d.rectangle([19, 25, 29, SIZE], fill=(90, 50, 30))  # the wrist reaches the border
    return torch.from_numpy(np.array(im)).permute(2, 0, 1).float() / 255


def batch(kinds=("plain", "busy") * 4):
    return torch.stack([hand_like(k, i) for i, k in enumerate(kinds)])


def test_plain_background_detector():
    plain, colour = plain_background(batch())
    assert plain.tolist() == [True, False] * 4
    assert (colour[0] > 0.75).all()  # the light wall's colour, not the subject's


def test_subject_mask_covers_the_subject_not_the_wall():
    x = batch(("plain",))
    mask = subject_mask(x, plain_background(x)[1])[0, 0]
    assert mask[20, 24] > 0.95 and mask[40, 24] > 0.95  # blob and wrist
    assert mask[3, 3] < 0.05 and mask[24, 3] < 0.05  # the wall


def test_backgrounds_replace_plain_walls_only_and_keep_the_subject():
    x = batch()
    y = replace_backgrounds(x, 1.0, torch.Generator().manual_seed(0))
    assert y.shape == x.shape and y.min() >= 0 and y.max() <= 1
    for i in range(len(x)):
        if i % 2:  # busy border: untouched
            assert torch.equal(y[i], x[i])
        else:
            assert (y[i, :, :6, :] - x[i, :, :6, :]).abs().mean() > 0.05  # the wall changed
            assert torch.allclose(y[i, :, 20, 24], x[i, :, 20, 24], atol=1e-4)  # the subject did not


def test_backgrounds_off_and_seeded():
    x = batch()
    assert torch.equal(replace_backgrounds(x, 0.0), x)
    a = replace_backgrounds(x, 0.7, torch.Generator().manual_seed(3))
    b = replace_backgrounds(x, 0.7, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


def test_background_bank_mixes_photos_and_textures():
    bank = background_bank(SIZE)
    assert bank.shape == (96, 3, SIZE, SIZE) and bank.min() >= 0 and bank.max() <= 1
    # photos have detail everywhere; some procedural ones are flat colour fields
    spread = bank.flatten(1).std(1)
    assert (spread > 0.1).sum() > 30 and (spread < 0.02).sum() >= 1


def test_capture_augmentation_shapes_identity_and_seed():
    x = torch.rand(8, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    off = AugmentConfig()
    assert torch.equal(augment_batch(x, off), x)
    cfg = AugmentConfig(colour_cast=0.2, grey=0.5, low_res=0.5, noise=0.05)
    a = capture_batch(x, cfg, torch.Generator().manual_seed(1))
    b = capture_batch(x, cfg, torch.Generator().manual_seed(1))
    assert a.shape == x.shape and torch.equal(a, b) and a.min() >= 0 and a.max() <= 1
    assert not torch.equal(a, x)
    grey = capture_batch(x, AugmentConfig(grey=1.0), torch.Generator().manual_seed(0))
    assert torch.allclose(grey[:, 0], grey[:, 1]) and torch.allclose(grey[:, 1], grey[:, 2])
    smooth = capture_batch(x, AugmentConfig(low_res=1.0), torch.Generator().manual_seed(0))
    assert smooth.diff(dim=-1).abs().mean() < 0.5 * x.diff(dim=-1).abs().mean()  # detail gone


def test_jpeg_recompression_is_seeded_and_loses_detail():
    x = torch.rand(6, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    a = capture_batch(x, AugmentConfig(jpeg=1.0), torch.Generator().manual_seed(2))
    assert torch.equal(a, capture_batch(x, AugmentConfig(jpeg=1.0), torch.Generator().manual_seed(2)))
    assert a.shape == x.shape and a.dtype == x.dtype and 0 <= a.min() and a.max() <= 1
    assert a.diff(dim=-1).abs().mean() < 0.8 * x.diff(dim=-1).abs().mean()  # JPEG drops the noise's detail
    assert torch.equal(capture_batch(x, AugmentConfig(jpeg=0.0, noise=0.0, grey=0.0)), x.clamp(0, 1))


def test_full_robust_config_runs_end_to_end():
    cfg = AugmentConfig(
        rotation=180,
        zoom=0.3,
        horizontal_flip=True,
        backgrounds=0.8,
        colour_cast=0.2,
        grey=0.2,
        low_res=0.3,
        noise=0.05,
    )
    x = batch()
    a = augment_batch(x, cfg, torch.Generator().manual_seed(5))
    assert a.shape == x.shape and torch.equal(a, augment_batch(x, cfg, torch.Generator().manual_seed(5)))


def test_weight_space_ensemble_mixes_floats_and_keeps_counters():
    from foldercnn.training.strategy import weight_space_ensemble

    probe = {"w": torch.zeros(3), "n": torch.tensor(5)}
    tuned = {"w": torch.full((3,), 2.0), "n": torch.tensor(9)}
    mixed = weight_space_ensemble(probe, tuned, 0.25)
    assert torch.equal(mixed["w"], torch.full((3,), 0.5)) and mixed["n"] == 9
    assert torch.equal(weight_space_ensemble(probe, tuned, 1.0)["w"], tuned["w"])
