"""The lesion map: where it lands on the camera frame, what the log keeps, when it is shown, and bundles
without it. Real models (trained and exported through the real CLI), real ONNX Runtime, real threads."""
import json

import numpy as np
import pytest
import torch

from calibration.lesion_metrics import lesion_scores, lesion_target, map_agreement
from edge_pfm.decision import DecisionConfig, DecisionEngine
from edge_pfm.lesion import LesionMap
from edge_pfm.preprocess import PreprocessSpec
from edge_pfm.synthetic import CLASSES, render_pair

SPEC = PreprocessSpec(size=(128, 128))


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
    s = lesion_scores(maps, targets, labels, CLASSES)
    assert s["normal"]["clean"]["rate"] == 1.0 and s["normal"]["dice"]["mean"] == 1.0
    assert s["lsil"]["dice"]["mean"] == 1.0 and s["lsil"]["pointing"]["rate"] == 1.0
    assert s["hsil"]["dice"]["mean"] == pytest.approx((2 * 4 / 12 + 0) / 2, abs=1e-4)
    assert s["lesion_classes"]["pointing_interval"]["k"] == 2 and s["lesion_classes"]["pointing_interval"]["n"] == 3
    ag = map_agreement(maps, maps, labels, CLASSES)
    assert ag["iou_all"]["mean"] == 1.0 and ag["max_abs_diff"] == 0.0


def test_map_is_smoothed_and_shown_only_for_a_shown_non_normal_class():
    eng = DecisionEngine(CLASSES, DecisionConfig(alpha=0.5, enter=0.5, hold=1))
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


def test_runtime_log_summary_matches_the_shown_map(calibrated_bundle, tmp_path):
    from edge_pfm.pipeline import RunConfig, Runner
    from edge_pfm.record import read_log
    from edge_pfm.sources import SceneBank, SyntheticSource

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
    save_checkpoint(out, model, "pfm_tiny", CLASSES, default_preprocessing("pfm_tiny"), extra={})
    ckpt = torch.load(out, weights_only=True)
    for key in ("lesion_map", "decoder_width"):
        ckpt["config"].pop(key)
    torch.save(ckpt, out)
    return out


def test_a_checkpoint_without_the_head_exports_and_runs_without_the_output(headless_checkpoint, tmp_path):
    from edge_pfm.bundle import Bundle
    from edge_pfm.classifier import Classifier
    from edge_pfm.pipeline import RunConfig, Runner
    from edge_pfm.record import read_log
    from edge_pfm.sources import SceneBank, SyntheticSource
    from export.bundle_export import export_bundle

    out = tmp_path / "bundle"
    manifest = export_bundle(headless_checkpoint, out, parity_random=4, parity_scenes=4)
    assert [o["name"] for o in manifest["outputs"]] == ["logits"]
    bundle = Bundle.load(out)
    assert bundle.lesion_map is None
    scene = render_pair("lsil", 1, (640, 360))
    with Classifier(bundle, "onnxruntime") as clf:
        r = clf.classify(scene.white_light, scene.fluorescence)
    assert r.lesion_map is None and r.label in CLASSES
    bank = SceneBank((640, 360), seed=1)
    log = tmp_path / "d.jsonl"
    summary = Runner(bundle, SyntheticSource("white_light", bank, fps=30), SyntheticSource("fluorescence", bank, fps=30,
                     seed=1), config=RunConfig(backend="onnxruntime", log=str(log), video=str(tmp_path / "v.avi"))
                     ).run(2.0)
    assert summary["pairs_inferred"] > 10
    records, _ = read_log(log)
    assert records and all(r["lesion"] is None for r in records)
