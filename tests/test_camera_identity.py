"""Cameras that cannot swap unnoticed: stable names (/dev/v4l/by-id links, serial numbers) and the per-modality
plausibility check on real rendered white-light and fluorescence frames."""
import numpy as np
import pytest

from edge_pfm.config import load_config
from edge_pfm.runtime.modality import ModalityRule, ModalityWatch, looks_like
from edge_pfm.sources import factory
from edge_pfm.sources.base import SourceError
from edge_pfm.sources.opencv import OpenCVSource
from edge_pfm.synthetic import scenes


@pytest.fixture(scope="module")
def pairs():
    return [(s.white_light, s.fluorescence, s.label) for s in scenes(12, seed=9, size=(640, 360))]


def test_each_modality_looks_like_itself_and_grey_or_dark_frames_claim_nothing(pairs):
    rule = ModalityRule()
    for white, fluo, label in pairs:
        assert looks_like(white, rule) == "white_light", label
        assert looks_like(fluo, rule) == "fluorescence", label
    grey = np.full((360, 640, 3), 128, np.uint8)
    assert looks_like(grey, rule) is None
    assert looks_like((pairs[0][0] // 40).astype(np.uint8), rule) is None  # too dark to say
    assert looks_like(grey[..., 0], rule) is None  # a mono camera
    assert looks_like(None, rule) is None and looks_like(np.empty((0, 0, 3), np.uint8), rule) is None


def _watch(frames_by_camera, rule=None):
    watch = ModalityWatch(rule or ModalityRule())
    t = 0
    for white, fluo in frames_by_camera:
        t += 1_100_000_000  # past every_s: each frame is judged
        watch.observe("white_light", t, white)
        watch.observe("fluorescence", t, fluo)
    return watch


def test_swapped_cameras_are_refused_with_the_numbers_and_right_ones_pass(pairs):
    right = _watch([(w, f) for w, f, _ in pairs[:3]])
    assert right.refusal() is None and right.flags() == []
    swapped = _watch([(f, w) for w, f, _ in pairs[:3]])
    why = swapped.refusal()
    assert "the white_light camera delivers fluorescence-like frames (3 of 3: blue" in why
    assert "the fluorescence camera delivers white_light-like frames" in why
    assert "/dev/v4l/by-id" in why and "[modality]" in why


def test_a_swap_during_the_run_flags_once_five_judged_frames_agree(pairs):
    watch = _watch([(w, f) for w, f, _ in pairs[:3]])
    t = 10_000_000_000
    for i, (w, f, _) in enumerate(pairs[3:9]):
        t += 1_100_000_000
        assert watch.wants("white_light", t)
        watch.observe("white_light", t, f)
        watch.observe("fluorescence", t, w)
        assert watch.flags() == ([] if i < 4 else ["white_light:modality", "fluorescence:modality"])
    assert not watch.wants("white_light", t + 10)  # judged once a second, not every frame
    assert watch.report()["white_light:fluorescence"] == 6


def test_the_check_can_be_turned_off_and_unknown_keys_are_refused(pairs):
    off = _watch([(f, w) for w, f, _ in pairs[:3]], ModalityRule(enabled=False))
    assert off.refusal() is None
    with pytest.raises(ValueError, match=r"unknown \[modality\] keys \['green'\]"):
        ModalityRule.from_dict({"green": 0.5})


@pytest.fixture
def by_id(tmp_path, monkeypatch):
    d = tmp_path / "by-id"
    d.mkdir()
    devices = tmp_path / "dev"
    devices.mkdir()
    for n, name in ((0, "usb-Acme_ColpoCam_SN1234-video-index0"), (1, "usb-Acme_ColpoCam_SN1234-video-index1"),
                    (2, "usb-Acme_ColpoCam_SN5678-video-index0")):
        (devices / f"video{n}").write_text("")
        (d / name).symlink_to(devices / f"video{n}")
    monkeypatch.setattr(factory, "BY_ID", str(d))
    return d, devices


def test_a_serial_names_its_capture_node_and_a_stable_link_opens_its_device(by_id):
    d, devices = by_id
    assert factory.by_serial("SN1234", "white_light") == str(d / "usb-Acme_ColpoCam_SN1234-video-index0")
    src = factory.open_source("serial:SN5678", "fluorescence", exposure=300)
    assert isinstance(src, OpenCVSource) and src.device == str(devices / "video2")
    assert src.settings["exposure"] == 300 and "SN5678" in src.name
    with pytest.raises(SourceError, match=r"serial:SN9 \(white_light\): no camera in .* match \(there: usb-Acme"):
        factory.open_source("serial:SN9", "white_light")
    with pytest.raises(SourceError, match="2 cameras"):
        factory.by_serial("ColpoCam", "white_light")


def test_device_toml_takes_stable_names_and_the_modality_section(tmp_path):
    cfg = tmp_path / "device.toml"
    cfg.write_text('[cameras.white_light]\nsource = "/dev/v4l/by-id/usb-Acme_ColpoCam_SN1234-video-index0"\n'
                   'stamps = "host"\n[cameras.fluorescence]\nsource = "serial:SN5678"\n'
                   '[modality]\nfluo_green_share_min = 0.42\n')
    loaded = load_config(cfg)
    assert loaded["cameras"]["fluorescence"]["source"] == "serial:SN5678"
    assert ModalityRule.from_dict(loaded["modality"]).fluo_green_share_min == 0.42
