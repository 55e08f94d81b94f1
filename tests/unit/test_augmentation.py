"""Per-sample crops and flips on the device: drawn from (seed, epoch, index), applied exactly."""

from __future__ import annotations

import math

import pytest
import torch
from torchvision.transforms import RandomResizedCrop

from oscar_common.training.augmentation import model_inputs, plan_epoch, random_resized_crop_boxes

SCALE, RATIO = (0.08, 1.0), (3 / 4, 4 / 3)


def _plan(seed: int, epoch: int, n: int = 64, side: int = 37):
    return plan_epoch(seed=seed, epoch=epoch, num_samples=n, side=side, augment=True, crop_scale=SCALE,
                      crop_ratio=RATIO)


def test_plan_is_reproducible_from_seed_and_epoch_and_differs_between_them():
    a, b = _plan(3, 2), _plan(3, 2)
    assert torch.equal(a.order, b.order) and torch.equal(a.boxes, b.boxes) and torch.equal(a.flips, b.flips)
    for other in (_plan(3, 3), _plan(4, 2)):
        assert not torch.equal(a.order, other.order) and not torch.equal(a.boxes, other.boxes)
    assert sorted(a.order.tolist()) == list(range(64))


def test_every_sample_gets_its_own_crop_and_flip():
    plan = _plan(0, 1)
    assert len({tuple(box) for box in plan.boxes.tolist()}) == 64  # no two samples share a crop
    assert 10 < int(plan.flips.sum()) < 54  # about half are flipped


def test_crop_boxes_follow_random_resized_crop():
    boxes = random_resized_crop_boxes(2000, 37, 37, scale=SCALE, ratio=RATIO, generator=torch.Generator().manual_seed(0))
    x1, y1, x2, y2 = boxes.unbind(1)
    w, h = x2 - x1, y2 - y1
    assert torch.all(boxes == boxes.round()) and x1.min() >= 0 and y1.min() >= 0
    assert x2.max() <= 37 and y2.max() <= 37 and w.min() >= 1 and h.min() >= 1
    area = w * h / 37**2  # areas and aspect ratios in range, up to the rounding of w and h to pixels
    assert area.min() >= 0.08 * 0.7 and area.max() <= 1.0
    aspect = w / h
    assert aspect.min() >= 3 / 4 * 0.8 and aspect.max() <= 4 / 3 * 1.25
    assert abs(float(torch.log(aspect).mean())) < 0.05  # log-uniform around 1
    assert 0.45 < float(area.mean()) < 0.6  # uniform area in [0.08, 1] (about 0.54)


def test_no_fitting_attempt_falls_back_to_the_whole_image():
    # Ratios far from the (square) image's and a scale of 1: no attempt fits.
    boxes = random_resized_crop_boxes(5, 10, 10, scale=(1.0, 1.0), ratio=(3.0, 4.0),
                                      generator=torch.Generator().manual_seed(0))
    top, left, height, width = RandomResizedCrop.get_params(torch.zeros(3, 10, 10), [1.0, 1.0], [3.0, 4.0])
    assert boxes.tolist() == [[left, top, left + width, top + height]] * 5 == [[0.0, 3.0, 10.0, 6.0]] * 5


def test_a_sample_looks_the_same_whatever_its_batch():
    images = torch.randint(0, 256, (6, 3, 37, 37), dtype=torch.uint8)
    plan = _plan(7, 1, n=6)
    kwargs = dict(size=32, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    whole = model_inputs(images, boxes=plan.boxes, flips=plan.flips, **kwargs)
    for i in range(6):
        alone = model_inputs(images[i:i + 1], boxes=plan.boxes[i:i + 1], flips=plan.flips[i:i + 1], **kwargs)
        assert torch.equal(alone[0], whole[i])
    assert not torch.equal(whole[0], whole[1])


def test_integer_box_of_output_size_copies_pixels_and_flip_mirrors_them():
    images = torch.randint(0, 256, (2, 3, 37, 37), dtype=torch.uint8)
    boxes = torch.tensor([[2.0, 5.0, 34.0, 37.0], [0.0, 0.0, 32.0, 32.0]])
    out = model_inputs(images, size=32, mean=(0, 0, 0), std=(1 / 255,) * 3, boxes=boxes,
                       flips=torch.tensor([False, True]))
    assert torch.allclose(out[0], images[0, :, 5:37, 2:34].float(), atol=1e-4)
    assert torch.allclose(out[1], images[1, :, 0:32, 0:32].float().flip(-1), atol=1e-4)


def test_normalisation_without_augmentation():
    white = torch.full((1, 3, 8, 8), 255, dtype=torch.uint8)
    out = model_inputs(white, size=8, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    assert out[0, :, 3, 3].tolist() == pytest.approx([(1 - 0.485) / 0.229, (1 - 0.456) / 0.224, (1 - 0.406) / 0.225],
                                                     rel=1e-5)
    with pytest.raises(ValueError, match="expected 16x16"):
        model_inputs(white, size=16, mean=(0, 0, 0), std=(1, 1, 1))


def test_shrinking_crops_average_rather_than_alias():
    # A 1-pixel checkerboard shrunk 2x averages to grey (aliasing would keep black or white).
    board = ((torch.arange(32)[:, None] + torch.arange(32)[None, :]) % 2 * 255).to(torch.uint8)
    images = board.expand(1, 3, 32, 32).contiguous()
    out = model_inputs(images, size=16, mean=(0, 0, 0), std=(1 / 255,) * 3,
                       boxes=torch.tensor([[0.0, 0.0, 32.0, 32.0]]))
    assert torch.allclose(out, torch.full_like(out, 127.5), atol=1e-3)
    assert math.isclose(float(out.mean()), 127.5, abs_tol=1e-3)
