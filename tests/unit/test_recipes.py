"""Training recipes resolve to the documented values; clients get the matching preprocessing."""

from __future__ import annotations

import tomllib
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from oscar_common.choices import TRAIN_RECIPES
from oscar_common.config import OscarConfig
from oscar_common.training.classifier import eval_transform
from oscar_common.training.recipes import (
    RECIPES,
    Preprocessing,
    eval_preprocessing,
    resolve_recipe,
    standard_preprocessing,
)

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def test_official_recipe_is_the_official_train_py():
    recipe = resolve_recipe("official", epochs=0, lr=0, batch_size=0)
    assert (recipe.epochs, recipe.lr, recipe.batch_size, recipe.momentum) == (20, 5e-4, 256, 0.9)
    assert not recipe.augment and (recipe.mean, recipe.std) == IMAGENET
    assert [recipe.lr_at(e) for e in (1, 7, 8, 20)] == [5e-4] * 4
    assert recipe.cache_size(224) == 224  # no crops: the whole preprocessing happens once


def test_official_lr_is_what_steplr_stepped_with_the_loss_gives():
    """The official code calls StepLR(7, 0.1).step(epoch_loss): constant lr for any loss below 7."""
    recipe = resolve_recipe("official", epochs=0, lr=0, batch_size=0)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=recipe.lr, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=7, gamma=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch deprecates step(epoch)
        for epoch, loss in enumerate([4.50, 3.1, 1.7, 0.9, 0.4, 0.2, 0.1, 0.05, 0.02, 6.9], start=1):
            optimizer.step()
            scheduler.step(loss)
            assert optimizer.param_groups[0]["lr"] == pytest.approx(recipe.lr_at(epoch + 1))


def test_augmented_recipe_is_the_older_train_py():
    recipe = resolve_recipe("augmented", epochs=0, lr=0, batch_size=0)
    assert (recipe.epochs, recipe.lr, recipe.batch_size, recipe.momentum) == (25, 1e-3, 32, 0.9)
    assert recipe.augment and (recipe.crop_scale, recipe.crop_ratio) == ((0.08, 1.0), (3 / 4, 4 / 3))
    assert (recipe.mean, recipe.std) == IMAGENET
    # StepLR(7, 0.1) stepped once per epoch: x0.1 from epochs 8, 15 and 22.
    assert [recipe.lr_at(e) for e in (1, 7, 8, 14, 15, 22, 25)] == pytest.approx(
        [1e-3, 1e-3, 1e-4, 1e-4, 1e-5, 1e-6, 1e-6])
    assert recipe.cache_size(224) == 256 and recipe.cache_size(32) == 37


def test_official_openimage_recipe_is_the_official_openimage_loader():
    """train.py @4b6c7f5 with --dataset openimage: its lr, epochs and momentum, and the loader's batch 32,
    RandomResizedCrop(224) + flip and ImageNet statistics (utils/openimage_data.py:9-15, 88)."""
    recipe = resolve_recipe("official-openimage", epochs=0, lr=0, batch_size=0)
    assert (recipe.epochs, recipe.lr, recipe.batch_size, recipe.momentum) == (20, 5e-4, 32, 0.9)
    assert recipe.augment and (recipe.crop_scale, recipe.crop_ratio) == ((0.08, 1.0), (3 / 4, 4 / 3))
    assert (recipe.mean, recipe.std) == IMAGENET
    assert [recipe.lr_at(e) for e in (1, 8, 20)] == [5e-4] * 3  # the same StepLR.step(epoch_loss) as official
    assert eval_preprocessing(224, "official-openimage") == standard_preprocessing(224)  # Resize 256, crop 224


@pytest.mark.parametrize("benchmark, recipe", [("domainnet", "official"), ("nico-dg", "official"),
                                               ("nico-unique", "official"), ("openimage", "official-openimage")])
def test_each_example_trains_with_the_official_recipe_of_its_benchmark(benchmark, recipe):
    run_toml = Path(__file__).resolve().parents[2] / "examples" / benchmark / "run.toml"
    cfg = OscarConfig.from_run_config(tomllib.loads(run_toml.read_text()))
    assert (cfg.benchmark, cfg.train_recipe) == (benchmark, recipe)


def test_the_classifier_module_describes_the_default_recipe():
    import oscar_common.training.classifier

    default = RECIPES[OscarConfig().train_recipe]
    doc = " ".join(oscar_common.training.classifier.__doc__.split())
    said = (f"The default, ``{default.name}``", f"lr {default.lr:.0e}".replace("e-0", "e-"), f"{default.epochs} epochs",
            f"batch {default.batch_size}", "without crops or flips" if not default.augment else "random crops")
    assert [phrase for phrase in said if phrase not in doc] == []


def test_recipe_names_are_the_configs_choices():
    assert sorted(RECIPES) == sorted(TRAIN_RECIPES)
    assert all(RECIPES[name].name == name for name in RECIPES)


def test_overrides_replace_only_non_zero_values():
    recipe = resolve_recipe("official", epochs=3, lr=0, batch_size=16)
    assert (recipe.epochs, recipe.lr, recipe.batch_size) == (3, 5e-4, 16)
    assert resolve_recipe("augmented", epochs=0, lr=0.01, batch_size=0).lr == 0.01


def test_bad_recipe_values_are_named():
    with pytest.raises(ValueError, match=r"train-recipe must be one of \['augmented', 'official', "
                                         r"'official-openimage'\], got 'fast'"):
        resolve_recipe("fast", epochs=0, lr=0, batch_size=0)
    with pytest.raises(ValueError, match="epochs must be >= 0"):
        resolve_recipe("official", epochs=-1, lr=0, batch_size=0)
    with pytest.raises(ValueError, match="train-recipe must be one of"):
        OscarConfig(train_recipe="fast")
    with pytest.raises(ValueError, match="train-precision must be one of"):
        OscarConfig(train_precision="fp8")


def test_run_config_defaults_leave_the_recipe_in_charge():
    # (test_config checks that pyproject's defaults are these)
    cfg = OscarConfig()
    assert (cfg.epochs, cfg.batch_size, cfg.lr, cfg.train_recipe) == (0, 0, 0.0, "official")
    recipe = resolve_recipe(cfg.train_recipe, epochs=cfg.epochs, lr=cfg.lr, batch_size=cfg.batch_size)
    assert (recipe.epochs, recipe.lr, recipe.batch_size) == (20, 5e-4, 256)


def test_preprocessing_travels_as_plain_values_and_matches_eval_transform():
    pre = eval_preprocessing(32, "augmented")
    assert pre == Preprocessing(image_size=32, resize_size=37, mean=IMAGENET[0], std=IMAGENET[1])
    assert pre == eval_preprocessing(32, "official") == standard_preprocessing(32)  # one evaluation for both
    values = pre.to_config()
    assert values == {"image-size": 32, "resize-size": 37, "mean": list(IMAGENET[0]), "std": list(IMAGENET[1])}
    assert Preprocessing.from_config(values) == pre
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (45, 60, 3), dtype=np.uint8))
    assert torch.equal(Preprocessing.from_config(values).transform()(image), eval_transform(32, "augmented")(image))
    with pytest.raises(ValueError, match="preprocessing values .* malformed"):
        Preprocessing.from_config({"image-size": 32})
    with pytest.raises(ValueError, match="image-size <= resize-size"):
        Preprocessing.from_config({**values, "resize-size": 16})
