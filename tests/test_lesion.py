"""The lesion map: where it lands on the camera frame, what the log keeps, when it is shown, and bundles
without it. Real models (trained and exported through the real CLI), real ONNX Runtime, real threads."""
import json

import numpy as np
import pytest
import torch

from edge_pfm.decision import DecisionConfig, DecisionEngine
from edge_pfm.lesion import LesionMap
from edge_pfm.preprocess import PreprocessSpec
from edge_pfm.synthetic import SCENES, render_pair
from evaluation.lesion_metrics import lesion_scores, lesion_target, map_agreement

SPEC = PreprocessSpec(size=(128, 128))
LESION = ("lsil", "hsil")


def test_a_cell_lands_where_the_crop_put_it():
    """720p frame, 128 px centre crop: the crop is x 280..1000, each of 16 cells is 45 px."""
    grid = np.zeros((16, 16), np.float32)
    grid[2, 15] = 0.9  # third row, last column
    lm = LesionMap.from_output(grid[None], (720, 1280, 3), SPEC)
    assert lm.box == (0, 720, 280, 1000)
    s = lm.summary()
    assert s["bbox"] == [955.0, 90.0, 1000.0, 135.0]
    assert s["centroid"] == [977.5, 112.5] and s["peak_xy"] == [977.5, 112.5] and s["peak"] == 0.9
    assert s["area_fraction"] == round(1 / 256, 4)
    dense = lm.dense()
    assert dense.shape == (720, 1280)
    ys, xs = np.nonzero(dense >= 0.5)
    assert xs.min() >= 950 and xs.max() < 1000 and ys.min() >= 85 and ys.max() < 140
    assert dense[:, :280].max() == 0 and dense[:, 1000:].max() == 0  # never seen: never drawn


@pytest.mark.parametrize("size", [(1280, 720), (640, 480), (720, 1280)])
def test_a_known_lesion_maps_back_onto_itself(size):
    """A synthetic lesion at a known position -> the map's target grid -> back to the frame: the same place."""
    scene = render_pair("hsil", 4, size)
    back = LesionMap.from_output(lesion_target(scene.lesion_mask, SPEC), scene.lesion_mask.shape, SPEC).dense() >= 0.5
    y0, y1, x0, x1 = LesionMap.from_output(np.zeros((1, 16, 16)), scene.lesion_mask.shape, SPEC).box
    truth = scene.lesion_mask[y0:y1, x0:x1]
    got = back[y0:y1, x0:x1]
    iou = (truth & got).sum() / (truth | got).sum()
    assert iou > 0.45, iou  # lesions cover 1-4 % of the crop: 2-8 cells of 16x16, so the outline is coarse
    cy, cx = np.argwhere(scene.lesion_mask).mean(0)
    gy, gx = np.argwhere(back).mean(0)
    cell = (y1 - y0) / 16
    assert abs(cy - gy) < cell and abs(cx - gx) < cell, (cy, gy, cx, gx, cell)  # within one cell
    assert not back[:, :x0].any() and not back[:, x1:].any() and not back[:y0].any() and not back[y1:].any()


def test_metrics_on_known_maps():
    targets = np.zeros((4, 1, 4, 4), np.float32)
    targets[1:, 0, :2, :2] = 1.0  # three lesion pairs, top-left quarter
    maps = np.zeros_like(targets)
    maps[1, 0, :2, :2] = 0.9  # perfect
    maps[2, 0, :2, :] = 0.9  # twice too wide: Dice 2*4/(8+4)
    maps[3, 0, 3, 3] = 0.9  # elsewhere: 0, and the peak misses
    labels = np.array([0, 2, 3, 3])
    s = lesion_scores(maps, targets, labels, SCENES)
    assert s["normal"]["clean"]["rate"] == 1.0 and s["normal"]["dice"]["mean"] == 1.0
    assert s["lsil"]["dice"]["mean"] == 1.0 and s["lsil"]["pointing"]["rate"] == 1.0
    assert s["hsil"]["dice"]["mean"] == pytest.approx((2 * 4 / 12 + 0) / 2, abs=1e-4)
    assert s["lesion_classes"]["pointing_interval"]["k"] == 2 and s["lesion_classes"]["pointing_interval"]["n"] == 3
    ag = map_agreement(maps, maps, labels, SCENES)
    assert ag["iou_all"]["mean"] == 1.0 and ag["max_abs_diff"] == 0.0


def test_map_is_smoothed_and_shown_only_for_a_shown_map_class():
    eng = DecisionEngine(SCENES, DecisionConfig(alpha=0.5, enter=0.5, hold=1), map_classes=("lsil", "hsil"))
    hot = np.zeros((16, 16), np.float32)
    hot[4:8, 4:8] = 1.0
    lm = LesionMap.from_output(hot, (720, 1280), SPEC)
    hsil = np.array([0.02, 0.02, 0.06, 0.9])
    d = eng.update(hsil, 1_000_000, [], lm)
    assert d.shown_class == "hsil" and d.lesion is not None and d.lesion.probs.max() == 1.0
    d = eng.update(hsil, 2_000_000, [], lm.with_probs(np.zeros_like(hot)))
    assert d.lesion.probs.max() == pytest.approx(0.5)  # EMA with alpha 0.5, like the class
    assert eng.update(hsil, 3_000_000, ["white_light:glare"], lm).lesion is None  # gated: no map
    assert eng.current(3_000_000 + int(10e9)).lesion is None  # stale: no map
    eng.reset()
    d = eng.update(np.array([0.9, 0.04, 0.03, 0.03]), 4_000_000, [], lm)
    assert d.shown_class == "normal" and d.lesion is None  # normal: never a map
    eng.reset()
    d = eng.update(np.array([0.04, 0.9, 0.03, 0.03]), 5_000_000, [], lm)
    assert d.shown_class == "inflammation" and d.lesion is None  # not a biopsy target: no map by default
    d = DecisionEngine(SCENES, DecisionConfig(enter=0.5)).update(hsil, 6_000_000, [], lm)
    assert d.shown_class == "hsil" and d.lesion is None  # an engine told no map classes never shows one


def _measurement(pairs=120, dice=(0.8, 0.75, 0.85), pointing=(0.95, 0.9, 0.98), classes=("lsil", "hsil")):
    return {"source": "test", "classes": list(classes), "threshold": 0.5, "pairs": pairs,
            "dice": dict(zip(("mean", "low", "high"), dice), n=pairs),
            "pointing": dict(zip(("rate", "low", "high"), pointing), k=round(pairs * pointing[0]), n=pairs)}


@pytest.mark.parametrize("measurement, shown, why", [
    (_measurement(), True, "Dice 0.800 [0.750, 0.850]"),
    (None, False, "no held-out measurement of its fp32 map"),
    (_measurement(pairs=49), False, "fewer than 50 pairs"),
    (_measurement(dice=(0.55, 0.49, 0.6)), False, "Dice lower bound under 0.5"),
    (_measurement(pointing=(0.85, 0.79, 0.9)), False, "pointing lower bound under 80%"),
    (_measurement(dice=(float("nan"),) * 3), False, "Dice lower bound"),
    (_measurement(classes=("hsil",)), False, "measured on hsil but would be shown for lsil, hsil"),
])
def test_the_map_is_shown_only_with_a_measurement_above_the_floors(measurement, shown, why):
    from edge_pfm.lesion import judge_map

    entry = {"shown_for": ["lsil", "hsil"], "measurements": {"fp32": measurement} if measurement else {}}
    v = judge_map(entry, LESION, "fp32")
    assert v.shown is shown and why in v.reason, v.reason
    assert v.classes == (("lsil", "hsil") if shown else ())
    assert not judge_map(entry, LESION, "int8").shown  # each precision needs its own measurement
    assert "no lesion-map head" in judge_map(None, LESION, "fp32").reason
    assert "no class is named" in judge_map({**entry, "shown_for": []}, LESION, "fp32").reason


def test_the_calibrated_bundle_shows_its_measured_map_for_the_lesion_classes(calibrated_bundle):
    """Calibration on 256 held-out synthetic pairs with masks measured every precision's map (128 lesion pairs)."""
    from edge_pfm.bundle import Bundle
    from edge_pfm.lesion import map_verdict

    b = Bundle.load(calibrated_bundle)
    assert b.lesion_map["shown_for"] == ["lsil", "hsil"]
    assert set(b.lesion_map["measurements"]) == {"fp32", "int8", "fp16"}
    for precision in ("fp32", "int8", "fp16"):
        v = map_verdict(b, precision)
        assert v.shown and v.classes == ("lsil", "hsil"), v.reason
        assert v.measurement["pairs"] == 128 and "calibration held-out" in v.measurement["source"]


def test_runtime_log_summary_matches_the_shown_map(calibrated_bundle, tmp_path):
    from edge_pfm.decision_log import read_log
    from edge_pfm.runtime import RunConfig, Runner
    from edge_pfm.sources.simulated.cameras import SceneBank, SyntheticSource

    bank = SceneBank((640, 360), label="hsil", seed=4)
    log = tmp_path / "d.jsonl"
    runner = Runner(calibrated_bundle, SyntheticSource("white_light", bank, fps=30),
                    SyntheticSource("fluorescence", bank, fps=30, seed=1),
                    config=RunConfig(backend="onnxruntime", log=str(log), decision=DecisionConfig(enter=0.3)))
    shown = {}
    runner.observers.append(lambda work, d: shown.__setitem__(d.t_update_ns, d.lesion))
    runner.run(3.0)
    records, _ = read_log(log)
    inferred = [r for r in records if "seq_white" in r]
    assert len(inferred) > 20
    with_map = 0
    for r in inferred:
        lesion = shown[next(t for t in shown if abs(t - r["t_ns"]) < 50_000_000 and t <= r["t_ns"])]
        if r["state"] != "ok" or r["shown_class"] == "normal":
            assert r["lesion"] is None
        if lesion is not None:
            with_map += 1
    assert all(r["lesion"] is None for r in inferred if r["shown_class"] not in ("lsil", "hsil"))
    # every logged summary is the summary of the map that decision showed, in 640x360 camera pixels
    matched = 0
    for t, lesion in shown.items():
        rec = next((r for r in inferred if r["t_ns"] >= t and r["t_ns"] - t < 50_000_000), None)
        if rec is not None and lesion is not None:
            assert rec["lesion"] == json.loads(json.dumps(lesion.summary()))
            assert 140 <= rec["lesion"]["peak_xy"][0] <= 500  # inside the 360x360 centre crop
            matched += 1
    assert matched > 10 and with_map > 10


def test_two_line_api_gives_the_map_in_camera_coordinates(calibrated_bundle):
    from edge_pfm.classifier import Classifier

    scene = render_pair("hsil", 3, (960, 540))
    with Classifier(calibrated_bundle, "onnxruntime") as clf:
        r = clf.classify(scene.white_light, scene.fluorescence)
    assert r.lesion_map is not None and r.lesion_map.frame_shape == (540, 960)
    assert r.lesion_map.box == (0, 540, 210, 750)
    assert r.lesion_map.dense().shape == (540, 960)


@pytest.fixture(scope="module")
def headless_checkpoint(tmp_path_factory):
    """A checkpoint from before the lesion head: its config has no lesion_map key at all."""
    from export.checkpoint import save_checkpoint
    from export.model import create_model
    from export.train import default_preprocessing

    torch.manual_seed(0)
    model = create_model("pfm_tiny", lesion_map=False).eval()
    out = tmp_path_factory.mktemp("headless") / "old.pt"
    save_checkpoint(out, model, "pfm_tiny", SCENES, default_preprocessing("pfm_tiny"), extra={})
    ckpt = torch.load(out, weights_only=True)
    for key in ("lesion_map", "decoder_width"):
        ckpt["config"].pop(key)
    torch.save(ckpt, out)
    return out


def test_a_checkpoint_from_before_the_head_exports_without_the_output(headless_checkpoint, tmp_path):
    from edge_pfm.bundle import Bundle
    from edge_pfm.classifier import Classifier
    from export.bundle_export import export_bundle

    out = tmp_path / "bundle"
    manifest = export_bundle(headless_checkpoint, out, parity_random=4, parity_scenes=4)
    assert [o["name"] for o in manifest["outputs"]] == ["logits"]
    bundle = Bundle.load(out)
    assert bundle.lesion_map is None
    scene = render_pair("lsil", 1, (640, 360))
    with Classifier(bundle, "onnxruntime") as clf:
        r = clf.classify(scene.white_light, scene.fluorescence)
    assert r.lesion_map is None and r.label in SCENES


def _run_logged(bundle, tmp_path, label="hsil", seconds=2.5) -> tuple[dict, list[dict]]:
    from edge_pfm.decision_log import read_log
    from edge_pfm.runtime import RunConfig, Runner
    from edge_pfm.sources.simulated.cameras import SceneBank, SyntheticSource

    bank = SceneBank((640, 360), label=label, seed=4)
    log = tmp_path / "d.jsonl"
    summary = Runner(bundle, SyntheticSource("white_light", bank, fps=30), SyntheticSource("fluorescence", bank, fps=30,
                     seed=1), config=RunConfig(backend="onnxruntime", log=str(log), video=str(tmp_path / "v.avi"),
                                               decision=DecisionConfig(enter=0.3))).run(seconds)
    return summary, read_log(log)[0]


def test_a_dataset_without_masks_trains_and_exports_no_head(tmp_path, capsys):
    """The documented paired layout (docs/bring-your-own.md) (no masks/), through the real trainer and export: no head, no map output, and
    the runtime logs lesion: null throughout."""
    from edge_pfm.bundle import Bundle
    from edge_pfm.info import describe
    from edge_pfm.synthetic import write_dataset
    from export import train
    from export.bundle_export import export_bundle
    from export.checkpoint import load_checkpoint

    ds = write_dataset(tmp_path / "ds", 40, seed=2, size=(320, 180))
    ckpt = tmp_path / "c.pt"
    assert train.main(["--data", str(ds), "--epochs", "1", "--out", str(ckpt), "--quiet", "--threads", "2"]) == 0
    err = capsys.readouterr().err
    assert f"no lesion masks in {ds}: training without the lesion-map head" in err
    _, meta = load_checkpoint(ckpt)
    assert meta["config"]["lesion_map"] is False and "lesion_map" not in meta["extra"]
    manifest = export_bundle(ckpt, tmp_path / "b", parity_random=4, parity_scenes=4)
    assert [o["name"] for o in manifest["outputs"]] == ["logits"]
    assert "lesion map: off: the model has no lesion-map head" in describe(str(tmp_path / "b"))
    summary, records = _run_logged(Bundle.load(tmp_path / "b"), tmp_path)
    assert summary["pairs_inferred"] > 10 and summary["lesion_map"].startswith("lesion map: off")
    assert records and all(r["lesion"] is None for r in records)


def _without_measurement(src, dst):
    """A copy of a bundle whose lesion_map entry carries no measurement (as an exporter that never measured
    it would write): the manifest's entry edited, every artifact untouched."""
    from conftest import copy_bundle

    b = copy_bundle(src, dst)
    m = json.loads((b / "manifest.json").read_text())
    for o in m["outputs"]:
        if o["name"] == "lesion_map":
            o["measurements"] = {}
    (b / "manifest.json").write_text(json.dumps(m))
    return b


def test_a_map_without_a_measurement_is_not_shown(calibrated_bundle, tmp_path):
    from edge_pfm.bundle import Bundle
    from edge_pfm.classifier import Classifier
    from edge_pfm.info import describe

    b = _without_measurement(calibrated_bundle, tmp_path / "b")
    assert any(line.strip().startswith("lesion map: off: the bundle carries no held-out measurement of its fp32 map")
               for line in describe(str(b)).splitlines())  # info judges the precision auto runs: fp32, unmeasured
    scene = render_pair("hsil", 3, (640, 360))
    with Classifier(b, "onnxruntime", "fp32") as clf:
        assert not clf.lesion_verdict.shown
        assert clf.classify(scene.white_light, scene.fluorescence).lesion_map is None
    summary, records = _run_logged(Bundle.load(b), tmp_path)
    assert summary["pairs_inferred"] > 10 and any(r["shown_class"] == "hsil" for r in records)
    assert all(r["lesion"] is None for r in records)


def test_a_map_measured_below_the_floors_is_not_shown(tiny_bundle):
    """The exported (uncalibrated) bundle carries the trainer's validation measurement: 48 lesion pairs of a
    480-pair split, under the 50-pair floor."""
    from edge_pfm.bundle import Bundle
    from edge_pfm.classifier import Classifier
    from edge_pfm.info import describe

    b = Bundle.load(tiny_bundle)
    m = b.lesion_map["measurements"]["fp32"]
    assert m["pairs"] == 48 and "trainer validation split" in m["source"]
    line = next(x for x in describe(str(tiny_bundle)).splitlines() if "lesion map" in x)
    assert line.strip().startswith("lesion map: off: below the floors (fewer than 50 pairs")
    scene = render_pair("hsil", 3, (640, 360))
    with Classifier(b, "onnxruntime") as clf:
        assert clf.classify(scene.white_light, scene.fluorescence).lesion_map is None


def test_bundles_calibrated_before_the_manifest_held_measurements_keep_their_map(calibrated_bundle, tmp_path):
    """An earlier demo bundle: no shown_for or measurements in the manifest, calibration's held-out scores in
    accuracy.json: the map stays, for lsil and hsil."""
    from conftest import copy_bundle

    from edge_pfm.bundle import Bundle
    from edge_pfm.lesion import map_verdict

    b = copy_bundle(calibrated_bundle, tmp_path / "b")
    m = json.loads((b / "manifest.json").read_text())
    for o in m["outputs"]:
        o.pop("shown_for", None)
        o.pop("measurements", None)
    (b / "manifest.json").write_text(json.dumps(m))
    v = map_verdict(Bundle.load(b), "int8")
    assert v.shown and v.classes == ("lsil", "hsil") and v.measurement["pairs"] == 128, v.reason


def test_map_classes_are_chosen_when_calibrating(tiny_bundle, tmp_path):
    """--map-classes hsil: the map is re-measured over hsil and shown for hsil only; a class the model does not
    have is refused with the bundle untouched."""
    from conftest import copy_bundle

    from calibration.__main__ import main as calibrate
    from edge_pfm.bundle import Bundle
    from edge_pfm.lesion import map_verdict

    b = copy_bundle(tiny_bundle, tmp_path / "b")
    before = (b / "manifest.json").read_bytes()
    args = ["--bundle", str(b), "--synthetic", "32", "--eval-synthetic", "256", "--resolution", "320x240",
            "--allow-degraded"]
    assert calibrate([*args, "--map-classes", "hsil,cancer"]) == 2
    assert (b / "manifest.json").read_bytes() == before
    assert calibrate([*args, "--map-classes", "hsil"]) == 0
    bundle = Bundle.load(b)
    assert bundle.lesion_map["shown_for"] == ["hsil"]
    assert bundle.lesion_map["measurements"]["fp32"]["classes"] == ["hsil"]
    assert bundle.lesion_map["measurements"]["fp32"]["pairs"] == 64
    v = map_verdict(bundle, "fp32")
    assert v.classes == (("hsil",) if v.shown else ()), v.reason


def test_roles_come_from_the_model_not_from_class_names(tmp_path):
    """A bundle names its roles; ours are applied by name only where none were recorded; bad roles name the key."""
    from edge_pfm.roles import ClassRoles, RolesError

    assert ClassRoles.default_for(SCENES) == ClassRoles("normal", ("lsil", "hsil"), ("hsil",))
    assert ClassRoles.default_for(("benign", "cin1", "cin2+")) == ClassRoles(None, (), ())
    assert ClassRoles(None, (), ()).protected(("benign", "cin1")) == ("benign", "cin1")  # nothing named: all
    theirs = ClassRoles.from_dict({"no_lesion": "benign", "lesion": ["cin2+"], "critical": ["cin2+"]},
                                  ("benign", "cin1", "cin2+"))
    assert theirs.lesion == ("cin2+",) and theirs.protected(("benign", "cin1", "cin2+")) == ("cin2+",)
    with pytest.raises(RolesError, match=r"roles.critical names \['cin3'\]"):
        ClassRoles.from_dict({"critical": ["cin3"]}, ("benign", "cin2+"))
    with pytest.raises(RolesError, match="unknown keys"):
        ClassRoles.from_dict({"lesions": []}, ("benign",))


def test_a_bundle_carries_its_roles(tiny_bundle, tmp_path):
    from conftest import copy_bundle

    from edge_pfm.bundle import Bundle, BundleError
    from edge_pfm.roles import ClassRoles

    b = Bundle.load(tiny_bundle)
    assert b.manifest["model"]["roles"] == {"no_lesion": "normal", "lesion": ["lsil", "hsil"], "critical": ["hsil"]}
    assert b.roles == ClassRoles("normal", ("lsil", "hsil"), ("hsil",))
    bad = copy_bundle(tiny_bundle, tmp_path / "b")
    m = json.loads((bad / "manifest.json").read_text())
    m["model"]["roles"]["lesion"] = ["cancer"]
    (bad / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match=r"manifest model.roles.lesion names \['cancer'\]"):
        Bundle.load(bad)
