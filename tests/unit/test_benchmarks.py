"""Benchmark adapters on tiny fake trees in the official layouts (8x8 PNGs, hand-written split lists)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from oscar_common.data.datasets import (
    BenchmarkError,
    benchmark_class_names,
    benchmark_clients,
    benchmark_config,
    load_benchmark_partition,
)
from oscar_common.data.datasets.cli import main as class_names_cli
from oscar_common.data.datasets.common import BenchmarkOptions, images_under
from oscar_common.data.datasets.domainnet import DOMAINS
from oscar_common.data.datasets.folders import LabelSkew
from oscar_common.data.datasets.nico import DG_DOMAINS


def _png(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (len(path.name) * 20 % 256, 0, 0)).save(path)
    return path


def _write_list(path: Path, lines: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in lines))


def _rel(samples, root: Path) -> list[str]:
    return [s.path.relative_to(root).as_posix() for s in samples]


# --------------------------------------------------------------------------- DomainNet

DN_CLASSES = {0: "aircraft_carrier", 1: "airplane", 2: "alarm_clock", 3: "ambulance"}


@pytest.fixture
def domainnet(tmp_path: Path) -> Path:
    """Official layout: <root>/<domain>/<class>/<file>, <root>/<domain>_{train,test}.txt; 3 train + 2 test
    per class, train lines listed in reverse file order (listing order must win over path order)."""
    root = tmp_path / "domainnet"
    for domain in DOMAINS:
        train, test = [], []
        for label, name in DN_CLASSES.items():
            files = [f"{domain}/{name}/{domain}_{label:03d}_{i:06d}.png" for i in range(5)]
            for rel in files:
                _png(root / rel)
            train += [f"{rel} {label}" for rel in reversed(files[:3])]
            test += [f"{rel} {label}" for rel in files[3:]]
        _write_list(root / f"{domain}_train.txt", train)
        _write_list(root / f"{domain}_test.txt", test)
    return root


def _dn(root: Path, **keys) -> dict:
    return {"benchmark": "domainnet", "benchmark-root": str(root), **keys}


def test_domainnet_client_gets_its_domain_from_the_official_lists(domainnet):
    classes = ["airplane", "aircraft_carrier", "ambulance"]  # alarm_clock is not in this run
    part = load_benchmark_partition(_dn(domainnet, client="painting"), classes, seed=0)
    assert part.name == "painting" and part.skipped_classes == ["alarm_clock"]
    train_lines = (domainnet / "painting_train.txt").read_text().split()[::2]
    assert _rel(part.train, domainnet) == [p for p in train_lines if "/alarm_clock/" not in p]
    assert {s.path.parent.name for s in part.train + part.test} == set(classes)
    assert all(s.path.parent.name == s.class_name and s.path.parts[-3] == "painting"
               for s in part.train + part.test)
    assert Counter(s.class_name for s in part.test) == {c: 2 for c in classes}
    # client-index counts the six official domains in order
    assert load_benchmark_partition(_dn(domainnet, **{"client-index": 4}), classes).name == "real"
    assert benchmark_clients("domainnet", domainnet) == list(DOMAINS)


def test_train_and_test_shots_keep_the_first_images_in_list_order(domainnet):
    part = load_benchmark_partition(_dn(domainnet, client="sketch", **{"train-shots": 2, "test-shots": 1}),
                                    list(DN_CLASSES.values()))
    assert Counter(s.class_name for s in part.train) == {c: 2 for c in DN_CLASSES.values()}
    assert Counter(s.class_name for s in part.test) == {c: 1 for c in DN_CLASSES.values()}
    # the list holds files 2, 1, 0 per class: the first two listed are 2 and 1
    assert [s.path.stem[-1] for s in part.train if s.class_name == "airplane"] == ["2", "1"]


def test_domainnet_split_files_in_splits_folder_or_split_dir(domainnet, tmp_path):
    (domainnet / "splits").mkdir()
    for path in domainnet.glob("*_t*.txt"):
        path.rename(domainnet / "splits" / path.name)
    assert len(load_benchmark_partition(_dn(domainnet, client="clipart"), ["airplane"]).train) == 3
    elsewhere = tmp_path / "lists"
    (domainnet / "splits").rename(elsewhere)
    part = load_benchmark_partition(_dn(domainnet, client="clipart", **{"split-dir": str(elsewhere)}), ["airplane"])
    assert len(part.test) == 2


def test_missing_split_file_names_it(domainnet):
    (domainnet / "quickdraw_test.txt").unlink()
    with pytest.raises(BenchmarkError, match=r"quickdraw_test\.txt"):
        load_benchmark_partition(_dn(domainnet, client="quickdraw"), ["airplane"])


def test_unknown_domain_lists_the_known_ones(domainnet):
    with pytest.raises(BenchmarkError, match="clipart, infograph, painting, quickdraw, real, sketch"):
        load_benchmark_partition(_dn(domainnet, client="cartoon"), ["airplane"])
    with pytest.raises(BenchmarkError, match="out of range"):
        load_benchmark_partition(_dn(domainnet, **{"client-index": 6}), ["airplane"])


def test_missing_images_and_wrong_root_fail_clearly(domainnet, tmp_path):
    (domainnet / "real" / "airplane" / "real_001_000000.png").unlink()
    with pytest.raises(BenchmarkError, match="1 listed image.*real_001_000000"):
        load_benchmark_partition(_dn(domainnet, client="real"), ["airplane"])
    with pytest.raises(BenchmarkError, match="does not exist"):
        load_benchmark_partition(_dn(tmp_path / "nowhere", client="real"), ["airplane"])
    with pytest.raises(BenchmarkError, match="unknown benchmark 'imagenet'; known: domainnet, nico-dg"):
        load_benchmark_partition({"benchmark": "imagenet", "benchmark-root": str(domainnet)}, ["airplane"])


@pytest.fixture
def domainnet_345(tmp_path: Path) -> Path:
    """Split lists only (no images): 345 labels, class 'c<label>', as class-name listing needs."""
    root = tmp_path / "dn345"
    root.mkdir()
    _write_list(root / "clipart_train.txt", [f"clipart/c{label:03d}/x.jpg {label}" for label in range(345)])
    return root


def test_the_90_class_subsets_pick_the_documented_labels(domainnet_345):
    oscar = benchmark_class_names("domainnet", domainnet_345, "oscar90")
    expected_labels = [*range(0, 30), *range(220, 230), *range(40, 90)]  # OSCAR's relabelled order
    assert oscar == [f"c{label:03d}" for label in expected_labels] and len(oscar) == 90
    fedcado = benchmark_class_names("domainnet", domainnet_345, "fedcado90")
    assert fedcado == [f"c{label:03d}" for label in range(90)]
    assert len(benchmark_class_names("domainnet", domainnet_345)) == 345
    assert benchmark_class_names("domainnet", domainnet_345, "5-7, 300") == ["c005", "c006", "c007", "c300"]
    assert benchmark_class_names("domainnet", domainnet_345, "c100,c002") == ["c100", "c002"]
    with pytest.raises(BenchmarkError, match="oscar90, fedcado90"):
        benchmark_class_names("domainnet", domainnet_345, "oscar91")
    with pytest.raises(BenchmarkError, match=r"label\(s\) \[345\]"):
        benchmark_class_names("domainnet", domainnet_345, "340-345")


def test_class_names_cli(domainnet_345, capsys):
    class_names_cli(["--benchmark", "domainnet", "--root", str(domainnet_345), "--subset", "0-2"])
    assert capsys.readouterr().out == "c000,c001,c002\n"
    class_names_cli(["--benchmark", "domainnet", "--root", str(domainnet_345), "--subset", "oscar90", "--toml"])
    line = capsys.readouterr().out
    assert line.startswith('class-names = "c000,c001,') and ",c220," in line and line.count(",") == 89
    class_names_cli(["--benchmark", "domainnet", "--root", str(domainnet_345), "--clients"])
    assert capsys.readouterr().out.split() == list(DOMAINS)
    with pytest.raises(SystemExit, match="split file clipart_train.txt not found"):
        class_names_cli(["--benchmark", "domainnet", "--root", str(domainnet_345.parent)])


# --------------------------------------------------------------------------- NICO++

def test_nico_dg_reads_official_lists_with_any_prefix(tmp_path):
    root = tmp_path / "NICOpp"
    classes = ["bear", "airplane", "cactus"]
    for domain in DG_DOMAINS:
        lines = {"train": [], "test": []}
        for label, name in enumerate(classes):
            for i in range(3):
                _png(root / "NICO_DG" / domain / name / f"{i}.jpg.png")
                split = "train" if i < 2 else "test"
                # official lists carry the authors' absolute paths
                lines[split].append(f"/home/someone/NICO_DG/{domain}/{name}/{i}.jpg.png {label}")
        for split, split_lines in lines.items():
            _write_list(root / "NICO_DG_official" / f"{domain}_{split}.txt", split_lines)
    config = {"benchmark": "nico-dg", "benchmark-root": str(root), "client": "grass"}
    part = load_benchmark_partition(config, ["airplane", "bear", "cactus"])
    assert _rel(part.train, root) == [f"NICO_DG/grass/{c}/{i}.jpg.png" for c in classes for i in range(2)]
    assert [s.class_name for s in part.test] == classes
    assert benchmark_class_names("nico-dg", root) == ["airplane", "bear", "cactus"]  # sorted, as FedCADO
    assert load_benchmark_partition({**config, "client": None, "client-index": 0}, classes).name == "autumn"
    # a line of another domain in a domain's list is an error, not a silent mix
    with (root / "NICO_DG_official" / "rock_train.txt").open("a") as handle:
        handle.write("/x/NICO_DG/water/bear/0.jpg.png 1\n")
    with pytest.raises(BenchmarkError, match=r"rock_train\.txt:\d+: image of domain 'water'"):
        load_benchmark_partition({**config, "client": "rock"}, classes)


@pytest.fixture
def nico_unique(tmp_path: Path) -> Path:
    """<root>/NICO_unique/<class>/<domain>/, lists <class>_<domain>_<split>.txt with absolute prefixes."""
    root = tmp_path / "NICOpp"
    domains = {"dog": ["snow", "beach", "indoor"], "car": ["road", "desert", "city"], "ant": ["leaf", "sand"]}
    for cls, class_domains in domains.items():
        for domain in class_domains:
            for split, ids in (("train", range(2)), ("test", range(2, 3))):
                lines = []
                for i in ids:
                    _png(root / "NICO_unique" / cls / domain / f"{i}.png")
                    lines.append(f"/a/b/c/NICO_unique/{cls}/{domain}/{i}.png 7")
                _write_list(root / "txtlist" / "NICO_unique_official" / f"{cls}_{domain}_{split}.txt", lines)
    with (root / "txtlist" / "NICO_unique_official" / "dog_snow_train.txt").open("a") as handle:
        handle.write("/a/b/c/NICO_unique/dog/snow/.DS_Store 7\n")  # the official lists have such lines
    return root


def test_nico_unique_client_k_gets_the_kth_sorted_domain_of_each_class(nico_unique):
    config = {"benchmark": "nico-unique", "benchmark-root": str(nico_unique)}
    classes = benchmark_class_names("nico-unique", nico_unique)
    assert classes == ["ant", "car", "dog"]
    assert benchmark_clients("nico-unique", nico_unique) == ["client-0", "client-1", "client-2"]
    expected = {0: {"ant": "leaf", "car": "city", "dog": "beach"},
                1: {"ant": "sand", "car": "desert", "dog": "indoor"},
                2: {"car": "road", "dog": "snow"}}  # ant has only two domains
    for k, domains in expected.items():
        part = load_benchmark_partition({**config, "client-index": k}, classes)
        assert part.name == f"client-{k}"
        for samples, n in ((part.train, 2), (part.test, 1)):
            assert {(s.class_name, s.path.parent.name) for s in samples} == set(domains.items())
            assert Counter(s.class_name for s in samples) == {c: n for c in domains}
            assert all(s.path.parts[-3] == s.class_name and s.path.is_file() for s in samples)


def test_nico_unique_without_lists_names_the_folder(tmp_path):
    (tmp_path / "NICOpp").mkdir()
    with pytest.raises(BenchmarkError, match=r"\*_train\.txt in .*txtlist/NICO_unique_official"):
        benchmark_class_names("nico-unique", tmp_path / "NICOpp")


# --------------------------------------------------------------------------- OpenImage

def _openimage_tree(root: Path, n: int) -> None:
    for super_class, subs in {"Bird": ["Parrot", "Eagle", "Magpie"], "Fruit": ["Lemon", "Apple", "Peach"]}.items():
        for sub in subs:
            for i in range(n):
                _png(root / super_class / sub / f"{sub.lower()}{i}.png")


def test_openimage_labels_are_super_classes_and_client_i_gets_sub_class_i(tmp_path):
    _openimage_tree(tmp_path / "train", 4)
    _openimage_tree(tmp_path / "test", 2)
    assert benchmark_class_names("openimage", tmp_path / "train") == ["Bird", "Fruit"]
    config = {"benchmark": "openimage", "benchmark-root": str(tmp_path / "train"),
              "test-root": str(tmp_path / "test")}
    sorted_subs = {"Bird": ["Eagle", "Magpie", "Parrot"], "Fruit": ["Apple", "Lemon", "Peach"]}
    for i in range(3):
        part = load_benchmark_partition({**config, "client-index": i}, ["Bird", "Fruit"])
        for samples, root, n in ((part.train, "train", 4), (part.test, "test", 2)):
            assert {(s.class_name, s.path.parent.name) for s in samples} == {(c, subs[i]) for c, subs in
                                                                            sorted_subs.items()}
            assert all(s.path.is_relative_to(tmp_path / root) for s in samples) and len(samples) == 2 * n
    with pytest.raises(BenchmarkError, match="client-index 3 is out of range"):
        load_benchmark_partition({**config, "client-index": 3}, ["Bird", "Fruit"])


# --------------------------------------------------------------------------- generic folder trees

def test_domain_folders_split_each_domain_deterministically(tmp_path):
    for domain in ("photo", "art"):
        for cls in ("cat", "dog"):
            for i in range(5):
                _png(tmp_path / domain / cls / f"{i}.png")
    config = {"benchmark": "domains", "benchmark-root": str(tmp_path), "client": "photo", "test-fraction": 0.4}
    first = load_benchmark_partition(config, ["cat", "dog"], seed=3)
    assert first == load_benchmark_partition(config, ["cat", "dog"], seed=3)
    assert Counter(s.class_name for s in first.test) == {"cat": 2, "dog": 2}
    assert {s.path.parts[-3] for s in first.train + first.test} == {"photo"}
    assert sorted(_rel(first.train + first.test, tmp_path)) == sorted(
        f"photo/{c}/{i}.png" for c in ("cat", "dog") for i in range(5))
    assert benchmark_clients("domains", tmp_path) == ["art", "photo"]
    assert benchmark_class_names("domains", tmp_path) == ["cat", "dog"]


@pytest.fixture
def single_domain(tmp_path: Path) -> Path:
    root = tmp_path / "cifar-like"
    for c in range(10):
        for i in range(40):
            _png(root / f"class{c}" / f"{i:02d}.png")
    return root


def _skew(root: Path, alpha: float, seed: int, clients: int = 4) -> list[list]:
    return LabelSkew(BenchmarkOptions("label-skew", root, num_clients=clients, alpha=alpha), seed).partition(root)


def test_label_skew_is_seeded_covers_every_image_once_and_skews_with_low_alpha(single_domain):
    shares = _skew(single_domain, 0.5, seed=1)
    assert shares == _skew(single_domain, 0.5, seed=1)
    assert shares != _skew(single_domain, 0.5, seed=2)
    everything = [s.path for share in shares for s in share]
    assert len(everything) == len(set(everything)) == 400
    skew = LabelSkew(BenchmarkOptions("label-skew", single_domain, num_clients=4, alpha=0.5), 1)
    assert [skew.share(single_domain, k) for k in range(4)] == shares  # what one client computes alone

    def mean_distance_from_uniform(shares) -> float:
        # total-variation distance of each client's label distribution from the global (uniform) one
        out = []
        for share in shares:
            counts = np.array([sum(s.class_name == f"class{c}" for s in share) for c in range(10)], float)
            out.append(0.5 * np.abs(counts / max(counts.sum(), 1) - 0.1).sum())
        return float(np.mean(out))

    low = np.mean([mean_distance_from_uniform(_skew(single_domain, 0.05, seed)) for seed in range(3)])
    high = np.mean([mean_distance_from_uniform(_skew(single_domain, 100.0, seed)) for seed in range(3)])
    assert low > 0.5 > 0.15 > high


def test_label_skew_partition_through_the_node_config(single_domain):
    classes = [f"class{c}" for c in range(10)]
    config = {"benchmark": "label-skew", "benchmark-root": str(single_domain), "num-clients": 3,
              "alpha": 0.3, "train-shots": 5}
    parts = [load_benchmark_partition({**config, "client-index": k}, classes, seed=0) for k in range(3)]
    assert [p.name for p in parts] == ["client-0", "client-1", "client-2"]
    assert all(n <= 5 for p in parts for n in Counter(s.class_name for s in p.train).values())
    tests = [s.path for p in parts for s in p.test]
    trains = [s.path for p in parts for s in p.train]
    assert len(set(tests)) == len(tests) and not set(tests) & set(trains)
    with pytest.raises(BenchmarkError, match="num-clients"):
        load_benchmark_partition({**config, "num-clients": 0, "client-index": 0}, classes)


def test_images_under_lists_what_rglob_listed_in_the_same_order(tmp_path):
    """The fast listing every label-skew client runs over the whole tree keeps the partitions of the
    pathlib version: same files (hidden, linked folders and non-images left out), same path order."""
    root = tmp_path / "cls"
    for rel in ("b.png", "a.PNG", "a-b/1.jpg", "a/z/2.jpeg", "a/1.png", "A/0.png", "notes.txt", "noext",
                ".hidden.png", ".cache/x.png", "a/.thumbs/y.png", "deep/er/est/3.webp"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"x")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "linked.png").write_bytes(b"x")
    (root / "linked-folder").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    (root / "link.png").symlink_to(root / "b.png")
    (root / "broken.png").symlink_to(root / "missing.png")
    (root / "folder.png").mkdir()

    expected = [root / rel for rel in ("A/0.png", "a/1.png", "a/z/2.jpeg", "a-b/1.jpg", "a.PNG", "b.png",
                                       "deep/er/est/3.webp", "link.png")]
    assert images_under(root) == expected
    assert images_under(root) == sorted(  # the listing it replaced (pathlib's rglob)
        p for p in root.rglob("*") if p.suffix.lower() in {".png", ".jpg", ".jpeg", ".webp"}
        and not any(part.startswith(".") for part in p.relative_to(root).parts) and p.is_file())


# --------------------------------------------------------------------------- node and run config

def test_benchmark_config_merges_run_defaults_under_node_keys():
    run = {"benchmark": "domainnet", "benchmark-root": "/sim/dn", "train-shots": 10, "split-dir": "",
           "seed": 0}
    assert benchmark_config({"partition-id": 2}, run) == {
        "benchmark": "domainnet", "benchmark-root": "/sim/dn", "train-shots": 10, "partition-id": 2}
    node = {"benchmark-root": "/data/dn", "client": "real"}
    assert benchmark_config(node, run)["benchmark-root"] == "/data/dn"
    assert benchmark_config({"data-dir": "/data/mine"}, run) is None  # a plain client folder wins
    assert benchmark_config({"partition-id": 0}, {"benchmark": ""}) is None
    assert BenchmarkOptions.from_config(benchmark_config({"partition-id": 2}, run)).client_index == 2
