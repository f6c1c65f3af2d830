import numpy as np
import pytest

from edge_pfm.dataset import DatasetError, PairedDataset
from edge_pfm.synthetic import SCENES, render_pair, write_dataset


def test_deterministic_per_seed():
    a = render_pair("hsil", 123, (320, 240))
    b = render_pair("hsil", 123, (320, 240))
    c = render_pair("hsil", 124, (320, 240))
    assert np.array_equal(a.white_light, b.white_light) and np.array_equal(a.fluorescence, b.fluorescence)
    assert not np.array_equal(a.white_light, c.white_light)
    assert a.white_light.shape == (240, 320, 3) and a.white_light.dtype == np.uint8


def test_camera_resolution():
    s = render_pair("lsil", 1, (1280, 720))
    assert s.white_light.shape == s.fluorescence.shape == (720, 1280, 3)


def _lesion_stats(label, seeds=range(12)):
    green, white = [], []
    for seed in seeds:
        s = render_pair(label, seed, (320, 240))
        m = s.lesion_mask
        green.append(s.fluorescence[..., 1][m].mean())
        white.append(s.white_light[m].mean())
    return float(np.mean(green)), float(np.mean(white))


def test_class_dependent_in_the_expected_direction():
    g = {c: _lesion_stats(c)[0] for c in SCENES}
    w = {c: _lesion_stats(c)[1] for c in SCENES}
    # fluorescence: green lost over neoplasia, in proportion to grade; not over inflammation
    assert g["hsil"] < g["lsil"] - 10 < g["normal"] - 20
    assert abs(g["inflammation"] - g["normal"]) < 6
    # white light: acetowhite over lesions, densest for hsil; inflammation whitens like lsil
    assert w["hsil"] > w["lsil"] + 10 and w["lsil"] > w["normal"] + 10
    assert abs(w["inflammation"] - w["lsil"]) < 8


def test_dataset_round_trip(tmp_path):
    root = write_dataset(tmp_path / "ds", 8, seed=3, size=(160, 120))
    ds = PairedDataset(root)
    assert len(ds) == 8 and ds.classes == SCENES and ds.labelled
    wl, fl, label = ds.load(0)
    assert wl.shape == (120, 160, 3) and fl.shape == (120, 160, 3)
    assert 0 <= label < 4
    assert sorted(s.label for s in ds.samples) == [0, 0, 1, 1, 2, 2, 3, 3]
    h1 = ds.content_hash()
    assert h1 == PairedDataset(root).content_hash()



def test_dataset_with_a_split_column_is_stratified_and_the_images_unchanged(tmp_path):
    from export.splits import dataset_splits

    root = write_dataset(tmp_path / "ds", 24, seed=3, size=(64, 48), split=(0.5, 0.25, 0.25))
    ds = PairedDataset(root)
    assert ds.has_splits
    for k, n in (("train", 2), ("val", 2), ("test", 2)):  # of each class's 6: round(1.5) = 2 val and 2 test
        assert sorted(s.label for s in ds.samples if s.split == k) == sorted(list(range(4)) * n), k
    assert dataset_splits(ds).source == "labels.csv split column"  # every class in every split, no pair in two
    plain = write_dataset(tmp_path / "plain", 24, seed=3, size=(64, 48))
    assert not PairedDataset(plain).has_splits and ds.content_hash() == PairedDataset(plain).content_hash()
    with pytest.raises(ValueError, match="summing to 1"):
        write_dataset(tmp_path / "bad", 24, seed=3, size=(64, 48), split=(0.5, 0.5, 0.5))
    with pytest.raises(ValueError, match="cannot fill train, val and test"):
        write_dataset(tmp_path / "few", 8, seed=3, size=(64, 48), split=(0.7, 0.15, 0.15))
    assert not (tmp_path / "bad").exists() and not (tmp_path / "few").exists()  # refused before rendering

def test_dataset_unpaired_and_unreadable_files_are_listed(tmp_path):
    root = write_dataset(tmp_path / "ds", 4, seed=3, size=(64, 48))
    (root / "white" / "s00000.png").unlink()
    with pytest.raises(DatasetError, match=r"unpaired.*fluorescence/s00000\.png"):
        PairedDataset(root)
    root2 = write_dataset(tmp_path / "ds2", 4, seed=3, size=(64, 48))
    (root2 / "fluorescence" / "s00001.png").write_bytes(b"not a png")
    ds = PairedDataset(root2)
    with pytest.raises(DatasetError, match=r"fluorescence/s00001\.png"):
        ds.validate_images()


def test_not_a_dataset(tmp_path):
    with pytest.raises(DatasetError, match="missing"):
        PairedDataset(tmp_path)


def test_a_blend_inside_the_weights_box_is_the_formula_everywhere():
    from edge_pfm.synthetic import _blend

    rng = np.random.default_rng(4)
    planes = [rng.random((90, 160), dtype=np.float32) for _ in range(3)]
    weight = np.zeros((90, 160), np.float32)
    weight[20:31, 40:47] = rng.random((11, 7), dtype=np.float32)
    weight[60, 120] = 0.5  # a second spot: the box spans both
    colour, cover = (0.12, 0.08, 0.25), 0.5
    expected = [p * (1 - cover * weight) + np.float32(c) * weight for p, c in zip(planes, colour)]
    _blend(planes, weight, colour, cover=cover)
    for got, want in zip(planes, expected):
        assert np.array_equal(got, want)
    untouched = [p.copy() for p in planes]
    _blend(planes, np.zeros_like(weight), colour)
    assert all(np.array_equal(a, b) for a, b in zip(planes, untouched))


def test_keeping_freed_memory_changes_no_pixel():
    """keep_freed_memory (the render workers' allocator tuning) leaves every rendered byte as it was."""
    import hashlib
    import subprocess
    import sys

    code = ("import hashlib, sys; from edge_pfm.synthetic import keep_freed_memory, render_pair; "
            "keep_freed_memory() if sys.argv[1] == '1' else None; h = hashlib.sha256(); "
            "[h.update(s.white_light.tobytes() + s.fluorescence.tobytes()) for s in "
            "(render_pair(lab, 7 + i, (640, 360), glare=0.02 if i == 3 else None) for i, lab in "
            "enumerate(['normal', 'inflammation', 'lsil', 'hsil'] * 2))]; print(h.hexdigest())")
    tuned, plain = (subprocess.run([sys.executable, "-c", code, flag], capture_output=True, text=True, check=True)
                    .stdout.strip() for flag in "10")
    here = hashlib.sha256()
    for i, lab in enumerate(["normal", "inflammation", "lsil", "hsil"] * 2):
        s = render_pair(lab, 7 + i, (640, 360), glare=0.02 if i == 3 else None)
        here.update(s.white_light.tobytes() + s.fluorescence.tobytes())
    assert tuned == plain == here.hexdigest()
