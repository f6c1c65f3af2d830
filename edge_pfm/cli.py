"""`edge-pfm` command line: info, build, run, serve, update, record, selftest, bench, verify, service-unit.

Every command reads the device configuration the same way (edge_pfm.config.find_config: --config, else
$EDGE_PFM_CONFIG, else /etc/edge-pfm/device.toml) and loads the bundle under its [security] trust."""
from __future__ import annotations

import argparse
import sys

from edge_pfm import __version__

CONFIG_HELP = ("device.toml (default: $EDGE_PFM_CONFIG, else /etc/edge-pfm/device.toml when it exists): cameras, "
               "gates, decision, outputs, and [security]'s trusted keys")


def _device(args: argparse.Namespace):
    """-> (the device config as every command finds it, its Trust)."""
    from edge_pfm.config import load_device_config
    from edge_pfm.trust import Trust

    path, cfg = load_device_config(getattr(args, "config", None))
    return cfg, Trust.from_config(cfg, path)


def _bundle(args: argparse.Namespace, trust, cfg: dict | None = None):
    """The command's --bundle (else the config's [run] bundle), loaded under the device's trust (signature,
    rollback floor)."""
    from edge_pfm.bundle import Bundle
    from edge_pfm.errors import InvalidArgument

    path = args.bundle or (cfg or {}).get("run", {}).get("bundle")
    if not path:
        raise InvalidArgument("no bundle: give --bundle DIR, or set [run] bundle in the device config (--config)")
    return Bundle.load(path, trust=trust)


def _cmd_info(args: argparse.Namespace) -> int:
    from edge_pfm.info import describe

    cfg, trust = _device(args)
    bundle = _bundle(args, trust) if args.bundle else None
    print(describe(bundle, args.cache_dir, _camera_sources(args, cfg.get("cameras", {}), required=False),
                   args.seconds))
    if "bundles" in cfg:
        from edge_pfm.config import find_config
        from edge_pfm.store.store import store_settings

        print(store_settings(cfg, find_config(args.config))[0].describe())
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    _, trust = _device(args)
    bundle = _bundle(args, trust)  # a refusal raises: exit 2 with its reason and file
    verdict = bundle.signature
    print(f"{bundle.root}: {verdict.describe()}")
    if not verdict.verified:
        from edge_pfm.trust.signature import SignatureError

        raise SignatureError(f"{bundle.root} was not verified: no trusted key in {trust.trusted_keys}; install the "
                             "signer's public key there (or set [security] trusted_keys in device.toml)")
    print(f"  key {verdict.key_id}\n  bundle version {verdict.bundle_version}\n  {len(verdict.digests)} files, "
          f"each matching its signed sha256")
    return 0


def _cmd_build(args: argparse.Namespace) -> int:
    from edge_pfm.build import build

    _, trust = _device(args)
    for line in build(_bundle(args, trust), args.backend, args.precision, args.int8_source, args.dla_core, args.workspace_mib,
                      args.max_batch, args.cache_dir, not args.no_build, args.threads):
        print(line)
    return 0


def _run_config(args: argparse.Namespace, cfg: dict):
    """The RunConfig of `run` and `record`: the flags over the config file's sections."""
    from edge_pfm.config import ConfigError
    from edge_pfm.decision import DecisionConfig
    from edge_pfm.outputs import LOG_RETENTION, MIB, MIN_FREE_BYTES, VIDEO_RETENTION, Retention
    from edge_pfm.runtime import RunConfig
    from edge_pfm.runtime.modality import ModalityRule
    from edge_pfm.runtime.quality import GateConfig

    run_cfg = cfg.get("run", {})
    try:
        gates = GateConfig.from_dict(cfg.get("gates", {}))
        if args.no_gates:
            gates = GateConfig(enabled=False)
        decision = DecisionConfig.from_dict(cfg.get("decision", {}))
        modality = ModalityRule.from_dict(cfg.get("modality", {}))
        out = cfg.get("outputs", {})
        outputs = {"log_retention": Retention.from_config(out, "log", LOG_RETENTION),
                   "video_retention": Retention.from_config(out, "video", VIDEO_RETENTION),
                   "min_free_bytes": int(float(out.get("min_free_mb", MIN_FREE_BYTES / MIB)) * MIB)}
    except (ValueError, TypeError) as exc:  # the dataclasses' own checks
        raise ConfigError(f"{args.config}: {exc}") from None
    return RunConfig(backend=args.backend or run_cfg.get("backend", "auto"),
                     precision=args.precision or run_cfg.get("precision"),
                     threads=args.threads or run_cfg.get("threads"),
                     cache_dir=args.cache_dir or run_cfg.get("cache_dir"),
                     tolerance_ms=args.tolerance_ms or run_cfg.get("tolerance_ms"),
                     seconds=args.seconds, log=args.log or run_cfg.get("log"),
                     video=getattr(args, "video", None) or run_cfg.get("video"),
                     preview=getattr(args, "preview", False), gates=gates, decision=decision, modality=modality,
                     **outputs)


def _write_summary(args: argparse.Namespace, summary: dict) -> None:
    import json

    from edge_pfm.runtime import format_summary

    print(format_summary(summary))
    if args.summary_json:
        from edge_pfm.fileio import atomic_write_text

        atomic_write_text(args.summary_json, json.dumps(summary, indent=2) + "\n")


def _configured_run(args: argparse.Namespace):
    """-> (the bundle, RunConfig, the Runner's sources) from the flags and the device config, as `run` and `record`
    take them."""
    from edge_pfm.memory import limit_heap_fragmentation

    cfg, trust = _device(args)
    config = _run_config(args, cfg)
    sources = _camera_sources(args, cfg.get("cameras", {}))  # usage errors before the bundle is read
    bundle = _bundle(args, trust, cfg)
    limit_heap_fragmentation()
    return bundle, config, sources


def _cmd_run(args: argparse.Namespace) -> int:
    from edge_pfm.runtime import Runner

    bundle, config, sources = _configured_run(args)
    if not args.view:
        runner = Runner(bundle, config=config, **sources)
        _write_summary(args, runner.run(install_signal_handlers=True))
        return 0
    from edge_pfm.config import find_config, load_device_config
    from edge_pfm.service.serve import view_listeners
    from edge_pfm.service.settings import ServeSettings, ViewSettings
    from edge_pfm.service.view import LiveView

    path, cfg = load_device_config(args.config)
    settings = ViewSettings(args.view, ViewSettings.from_config(cfg, path).max_clients, key="--view")
    security = ServeSettings.from_config(cfg, find_config(args.config)).security  # [serve] token and TLS
    security.check(settings.address)
    view = LiveView()
    runner = Runner(bundle, config=config, view=view, **sources)
    (listener,) = view_listeners(view, settings, security)
    listener.start()
    print(f"live view on {listener.url}/", file=sys.stderr)
    try:
        _write_summary(args, runner.run(install_signal_handlers=True))
    finally:
        listener.stop()
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    import dataclasses
    import faulthandler

    from edge_pfm.config import ConfigError, find_config
    from edge_pfm.runtime import format_summary
    from edge_pfm.service.serve import serve
    from edge_pfm.service.settings import ServeSettings, ViewSettings

    faulthandler.enable()  # a hang or a crash in native code leaves the threads' stacks in the journal
    if find_config(args.config) is None:
        raise ConfigError("edge-pfm serve runs from its device config: give --config FILE, or set $EDGE_PFM_CONFIG, "
                          "or write /etc/edge-pfm/device.toml (docs: The device > edge-pfm serve)")
    cfg, trust = _device(args)
    settings = ServeSettings.from_config(cfg, find_config(args.config))
    view = ViewSettings.from_config(cfg, find_config(args.config))
    flags = argparse.Namespace(**{k: None for k in ("backend", "precision", "threads", "cache_dir", "tolerance_ms",
                                                    "seconds", "log", "video", "white", "fluo", "alternating",
                                                    "bundle")}, no_gates=False, loop=False, config=args.config)
    config = dataclasses.replace(_run_config(flags, cfg), backend_load_s=None, missing_cameras_ok=True,
                                 frozen_frames=settings.frozen_frames, camera_stall_s=settings.camera_stall_s,
                                 camera_give_up_s=settings.camera_give_up_s)
    sources = _camera_sources(flags, cfg.get("cameras", {}), missing_ok=True)
    updates = None
    if cfg.get("run", {}).get("bundle"):
        bundle = _bundle(flags, trust, cfg)  # a refused bundle: exit 2, before READY
    else:  # the store's current version, with updates (edge_pfm.store)
        from edge_pfm.store import update as store_update
        from edge_pfm.store.store import StoreError, store_settings

        store, health_pairs = store_settings(cfg, find_config(args.config))
        pending = store_update.recover_pending(store.ensure(), trust)
        current = store.link("current")
        if current is None:
            raise StoreError(f"no bundle to serve: [run] bundle is not set and the store {store.root} has no current "
                             "version; install one: edge-pfm update BUNDLE_DIR_OR_TAR")
        bundle = store_update.load_store_bundle(current, trust)
        config = dataclasses.replace(config, raise_floor_at_start=False)
        updates = {"store": store, "trust": trust, "health_pairs": health_pairs, "pending": pending}
    from edge_pfm.memory import limit_heap_fragmentation

    limit_heap_fragmentation()
    print(format_summary(serve(bundle, config, sources, settings, view, updates)))
    return 0


def _cmd_update(args: argparse.Namespace) -> int:
    from edge_pfm.config import find_config
    from edge_pfm.errors import InvalidArgument
    from edge_pfm.store import update as store_update
    from edge_pfm.store.store import store_settings

    cfg, trust = _device(args)
    store, health_pairs = store_settings(cfg, find_config(args.config))
    store.ensure()
    if args.rollback:
        if args.source:
            raise InvalidArgument("give SOURCE or --rollback, not both")
        target = store_update.rollback(store, "asked for (edge-pfm update --rollback)", log=print)
        print(f"current: {target.name}; a running serve switches to it at its next pair boundary")
        return 0
    if not args.source:
        raise InvalidArgument("give the bundle to install (a directory or a .tar), or --rollback")
    run = cfg.get("run", {})
    backend, cache_dir = run.get("backend", "auto"), run.get("cache_dir")
    running = store_update.running_selection(store, trust, backend, cache_dir)
    installed = store_update.prepare(store, args.source, trust, backend=backend, running=running,
                                     cache_dir=cache_dir, threads=run.get("threads"), log=print)
    before = store_update.switch(store, installed.path)
    print(f"current: {installed.path.name} (was {before.name if before else 'none'}); a running serve switches to "
          f"it at its next pair boundary and commits it after {health_pairs} healthy pairs (else rolls back); "
          "otherwise the next serve start does")
    return 0


def _cmd_service_unit(args: argparse.Namespace) -> int:
    from edge_pfm.service.unit import render_unit

    sys.stdout.write(render_unit(args.executable, args.config))
    return 0


def _cmd_record(args: argparse.Namespace) -> int:
    from edge_pfm.recording import record

    bundle, config, sources = _configured_run(args)
    summary = record(bundle, sources, args.out, args.mode, pairs=args.pairs, every_s=args.every,
                     keep_gated=args.keep_gated, codec=args.codec, max_mb=args.max_mb, config=config)
    _write_summary(args, summary)
    rec = summary["outputs"].get("recording") or summary["outputs"].get("dataset") or {}
    print(f"recorded into {args.out}: " + ", ".join(f"{k} {v}" for k, v in rec.items() if k != "path"))
    return 0


def _camera_sources(args: argparse.Namespace, cams: dict, required: bool = True,
                    missing_ok: bool = False) -> dict | None:
    """--white/--fluo/--alternating (or the config's [cameras]) -> the Runner's sources; None if none is given and
    none is `required`. `missing_ok`: a device camera not plugged in yet is looked for at every open (serve)."""
    from edge_pfm.errors import InvalidArgument
    from edge_pfm.sources import open_source

    def spec(name: str, flag: str | None) -> tuple[str | None, dict]:
        cam = dict(cams.get(name, {}))
        return (flag or cam.pop("source", None)), {k: v for k, v in cam.items() if k != "source"}

    white, white_opts = spec("white_light", args.white)
    fluo, fluo_opts = spec("fluorescence", args.fluo)
    alt, alt_opts = spec("alternating", args.alternating)
    if not required and not (white or fluo or alt):
        return None
    if not ((white and fluo) or alt) or (alt and (args.white or args.fluo)):
        raise InvalidArgument("give --white SRC and --fluo SRC, or --alternating SRC (or set them in --config)")
    if alt:
        return {"alternating": open_source(alt, "alternating", loop=args.loop, missing_ok=missing_ok, **alt_opts)}
    both_synthetic = white.startswith("synthetic") and fluo.startswith("synthetic")
    bank = None
    if both_synthetic:  # the two cameras see one scene
        from edge_pfm.sources.simulated.cameras import synthetic_bank

        bank = synthetic_bank(white)
    return {"white": open_source(white, "white_light", bank, loop=args.loop, missing_ok=missing_ok, **white_opts),
            "fluo": open_source(fluo, "fluorescence", bank, loop=args.loop, missing_ok=missing_ok, **fluo_opts)}


def _cmd_selftest(args: argparse.Namespace) -> int:
    from edge_pfm.errors import ExitCode
    from edge_pfm.selftest import selftest

    cfg, trust = _device(args)
    cams = cfg.get("cameras", {})
    _camera_sources(args, cams, required=False)  # bad camera arguments fail now, not after the engine step
    sources = None if not (args.white or args.fluo or args.alternating or cams) else (
        lambda: _camera_sources(args, cams))
    result = selftest(_bundle(args, trust), args.out, args.backend, sources, args.seconds, args.bench_seconds,
                      cache_dir=args.cache_dir, threads=args.threads)
    print(result.summary)
    print(f"report: {result.json_path} and {result.text_path}")
    return 0 if result.passed else int(ExitCode.RUNTIME_FAILURE)


def _cmd_bench(args: argparse.Namespace) -> int:
    from edge_pfm.bench import main as bench_main
    from edge_pfm.memory import limit_heap_fragmentation

    limit_heap_fragmentation()
    _, trust = _device(args)
    args.bundle = _bundle(args, trust)
    return bench_main(args)


def _camera_and_run_options(p: argparse.ArgumentParser) -> None:
    """The camera, backend and output options `record` shares with `run`."""
    p.add_argument("--white", help="white-light source: 0 | /dev/videoN | gst:PIPELINE | FILE | FOLDER | synthetic[:k=v,...]")
    p.add_argument("--fluo", help="fluorescence source (same syntax)")
    p.add_argument("--alternating", help="one source with alternating white/fluorescence illumination")
    p.add_argument("--backend", choices=("auto", "tensorrt", "onnxruntime"), help="auto: TensorRT if usable, else ONNX Runtime")
    p.add_argument("--precision", choices=("fp32", "fp16", "int8"),
                   help="default: the precision edge-pfm build measured and picked, else fp32")
    p.add_argument("--threads", type=int, help="inference threads (default: the thread plan; edge-pfm info shows it)")
    p.add_argument("--tolerance-ms", type=float, help="pairing tolerance (default: half a frame period)")
    p.add_argument("--log", help="append every decision to this JSONL file (rotated under a cap: [outputs] in --config)")
    p.add_argument("--seconds", type=float, help="stop after this long (default: until Ctrl-C or the sources end)")
    p.add_argument("--loop", action="store_true", help="loop video/folder sources")
    p.add_argument("--no-gates", action="store_true", help="disable the quality gates")
    p.add_argument("--config", help=CONFIG_HELP)
    p.add_argument("--summary-json", help="also write the exit summary here")
    p.add_argument("--cache-dir", help="engine cache, check records and the measured pick (default "
                                       "~/.cache/edge-pfm/engines; edge-pfm build writes them)")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="edge-pfm",
        description="Real-time dual-source colposcopy classification (PFM) on Jetson / ONNX Runtime.",
    )
    ap.add_argument("--version", action="version", version=f"edge-pfm {__version__}")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")
    p = sub.add_parser("info", help="versions, available backends, GPU/TensorRT, bundle summary")
    p.add_argument("--bundle", help="bundle directory to summarise")
    p.add_argument("--cache-dir", help="engine cache with the checks and the measured pick (default "
                                       "~/.cache/edge-pfm/engines)")
    p.add_argument("--white", help="also probe this white-light camera (the run's source syntax)")
    p.add_argument("--fluo", help="also probe this fluorescence camera")
    p.add_argument("--alternating", help="also probe this alternating-illumination camera")
    p.add_argument("--config", help=CONFIG_HELP)
    p.add_argument("--seconds", type=float, default=2.0, help="how long to probe the cameras (default 2)")
    p.add_argument("--loop", action="store_true", help=argparse.SUPPRESS)
    p.set_defaults(func=_cmd_info)

    p = sub.add_parser("build", help="build (or take from the cache) each engine and check it against the bundle's "
                                     "reference; --precision auto (the default) also measures the fastest checked one")
    p.add_argument("--bundle", required=True, help="the bundle directory")
    p.add_argument("--backend", default="auto", choices=("auto", "tensorrt", "onnxruntime"), help="auto: TensorRT if usable, else ONNX Runtime")
    p.add_argument("--precision", choices=("auto", "fp32", "fp16", "int8"), default="auto",
                   help="auto: check and time every precision the bundle allows, cache the fastest (a less accurate "
                        "one must be >= 10%% faster); `run`, `bench` and Classifier then use it")
    p.add_argument("--int8-source", choices=("qdq", "cache"), help="INT8 from the Q/DQ model or the calibration cache")
    p.add_argument("--dla-core", type=int, default=-1, help="build for this DLA core (AGX Orin: 0 or 1)")
    p.add_argument("--workspace-mib", type=int, default=1024, help="TensorRT builder workspace in MiB")
    p.add_argument("--max-batch", type=int, help="largest batch of the optimisation profile (default: the bundle's)")
    p.add_argument("--threads", type=int, help="ONNX Runtime inference threads to time with (default: the thread plan)")
    p.add_argument("--cache-dir", help="engine cache (default ~/.cache/edge-pfm/engines)")
    p.add_argument("--no-build", action="store_true", help="only look in the cache; fail with the reason if absent")
    p.add_argument("--config", help=CONFIG_HELP)
    p.set_defaults(func=_cmd_build)

    p = sub.add_parser("run", help="classify live (or recorded, or synthetic) camera pairs")
    p.add_argument("--bundle", help="the bundle directory (default: [run] bundle in --config)")
    p.add_argument("--video", help="write an annotated side-by-side video (.avi, MJPG; rotated under a cap)")
    p.add_argument("--preview", action="store_true", help="show a preview window (needs a display)")
    p.add_argument("--view", metavar="HOST:PORT",
                   help="serve the live view (the page, /stream.mjpg, /events, /snapshot.jpg) on this address, e.g. "
                        "127.0.0.1:8080; any other than loopback needs [serve] token, tls_cert and tls_key in --config")
    _camera_and_run_options(p)
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser("serve", help="run as a service until stopped: the config's bundle and cameras, systemd's "
                                     "notify protocol and watchdog, /healthz /readyz /metrics, cameras reopened",
                       description="`edge-pfm run` under supervision, everything from the device config: [run] "
                                   "bundle, log and video; [cameras]; [serve] health, camera_stall_s, frozen_frames, "
                                   "camera_give_up_s. Tells systemd READY=1 once the engine is checked and the "
                                   "outputs are open (a missing camera is reopened meanwhile), WATCHDOG=1 only while "
                                   "it makes progress. SIGTERM stops it cleanly (exit 0); bad config, a refused "
                                   "bundle or a port in use exit 2 before READY; a camera lost past "
                                   "camera_give_up_s exits 6. `edge-pfm service-unit` prints its systemd unit.")
    p.add_argument("--config", help=CONFIG_HELP + " (serve needs one)")
    p.set_defaults(func=_cmd_serve)

    p = sub.add_parser("update", help="install a bundle into the device's store: stage, verify, check the engine on "
                                      "this device, switch; serve commits it after healthy pairs or rolls back",
                       description="Stage SOURCE (a bundle directory or a .tar of one) into [bundles] store, verify "
                                   "its signature and version, build and check its engine as `edge-pfm build` does "
                                   "(no precision is timed: the running one is kept when allowed), install it and "
                                   "make it current. A running `serve` switches at a pair boundary and commits after "
                                   "[bundles] health_pairs pairs without error, else rolls back. A refusal leaves "
                                   "the current bundle as it is (exit 2, the bundle kept in the store's failed/).")
    p.add_argument("source", nargs="?", help="a bundle directory or a .tar of one")
    p.add_argument("--rollback", action="store_true", help="make the previous version current again")
    p.add_argument("--config", help=CONFIG_HELP)
    p.set_defaults(func=_cmd_update)

    p = sub.add_parser("service-unit", help="print the systemd unit for `edge-pfm serve`, with this installation's "
                                            "paths filled in",
                       description="Print edge-pfm.service (shipped with the package) with ExecStart naming this "
                                   "environment's edge-pfm and --config. Install: edge-pfm service-unit | sudo tee "
                                   "/etc/systemd/system/edge-pfm.service; sudo systemctl daemon-reload; sudo "
                                   "systemctl enable --now edge-pfm")
    p.add_argument("--executable", help="absolute path of the edge-pfm script ExecStart runs (default: this "
                                        "environment's)")
    p.add_argument("--config", default="/etc/edge-pfm/device.toml",
                   help="the device config serve reads (default /etc/edge-pfm/device.toml)")
    p.set_defaults(func=_cmd_service_unit)

    p = sub.add_parser("record", help="record both cameras for the build machine: their own frames as lossless "
                                      "videos with their timing (--mode video), or gated paired stills as an "
                                      "unlabelled dataset (--mode dataset)",
                       description="Record what the device's cameras see, through the run's own pairing and gates. "
                                   "--mode video: each camera's frames into OUT/<modality>.NNN.avi (FFV1, "
                                   "lossless) with a frame record beside each (capture time, stamp kind, dequeue "
                                   "delay); replay with `edge-pfm run --white OUT/white_light.000.avi --fluo "
                                   "OUT/fluorescence.000.avi`, which keeps the recorded timing. --mode dataset "
                                   "--pairs N: N pairs that pass the gates, in the paired dataset layout with empty "
                                   "labels, for labelling and for `python -m calibration --data OUT`. Both check "
                                   "the free space first, resume a folder that holds an earlier recording, and "
                                   "lose at most the frame or pair in flight when killed.")
    p.add_argument("--bundle", required=True, help="the bundle the device runs (its preprocessing and gates)")
    p.add_argument("--out", required=True, help="the recording's folder (an existing recording is resumed)")
    p.add_argument("--mode", choices=("video", "dataset"), default="video",
                   help="video: each camera's own frames, lossless, with their timing; dataset: paired stills "
                        "that pass the gates")
    p.add_argument("--pairs", type=int, help="dataset: stop when this many pairs are kept")
    p.add_argument("--every", type=float, default=0.0, metavar="SECONDS",
                   help="dataset: keep at most one pair every SECONDS (default 0: every pair that passes)")
    p.add_argument("--keep-gated", action="store_true", help="dataset: keep pairs the quality gates flag too")
    p.add_argument("--codec", choices=("ffv1", "mjpg"), default="ffv1",
                   help="video: ffv1 (lossless, the default) or mjpg (near-lossless, a quarter of the CPU)")
    p.add_argument("--max-mb", type=float, help="video: stop when the recording reaches this size")
    _camera_and_run_options(p)
    p.set_defaults(func=_cmd_record)

    p = sub.add_parser("selftest", help="prove this device: check and time every allowed precision, bench, a short "
                                        "two-camera run; one JSON report and one summary to send back")
    p.add_argument("--bundle", required=True, help="the bundle directory")
    p.add_argument("--out", default="selftest", help="folder for selftest.json and selftest.txt (default ./selftest)")
    p.add_argument("--backend", default="auto", choices=("auto", "tensorrt", "onnxruntime"), help="auto: TensorRT if usable, else ONNX Runtime")
    p.add_argument("--white", help="white-light camera for the run (default: synthetic cameras); same syntax as run")
    p.add_argument("--fluo", help="fluorescence camera")
    p.add_argument("--alternating", help="one camera with alternating illumination")
    p.add_argument("--config", help=CONFIG_HELP)
    p.add_argument("--loop", action="store_true", help="loop video/folder sources")
    p.add_argument("--seconds", type=float, default=5.0, help="length of the camera run")
    p.add_argument("--bench-seconds", type=float, default=2.0, help="per bench measurement")
    p.add_argument("--threads", type=int, help="inference threads (default: the thread plan)")
    p.add_argument("--cache-dir", help="engine cache (default ~/.cache/edge-pfm/engines)")
    p.set_defaults(func=_cmd_selftest)

    p = sub.add_parser("bench", help="backend vs naive loop vs pipeline, one process, one run")
    p.add_argument("--bundle", required=True, help="the bundle directory")
    p.add_argument("--resolution", default="1920x1080", help="synthetic camera frame size WIDTHxHEIGHT")
    p.add_argument("--seconds", type=float, default=8.0, help="per measurement")
    p.add_argument("--backend", default="auto", choices=("auto", "tensorrt", "onnxruntime"), help="auto: TensorRT if usable, else ONNX Runtime")
    p.add_argument("--precision", choices=("fp32", "fp16", "int8"),
                   help="default: the precision edge-pfm build measured and picked, else fp32")
    p.add_argument("--threads", type=int, help="inference threads (default: the thread plan)")
    p.add_argument("--json", dest="json_out", help="write the results here")
    p.add_argument("--config", help=CONFIG_HELP)
    p.add_argument("--cache-dir", help="engine cache, check records and the measured pick (default "
                                       "~/.cache/edge-pfm/engines)")
    p.set_defaults(func=_cmd_bench)

    p = sub.add_parser("verify", help="verify a bundle's signature against the device's trusted keys: the verdict, "
                                      "the key id and the bundle version (exit 2 when it is refused or unsigned)")
    p.add_argument("--bundle", required=True, help="the bundle directory")
    p.add_argument("--config", help=CONFIG_HELP)
    p.set_defaults(func=_cmd_verify)
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    if not getattr(args, "func", None):
        ap.print_help()
        return 0
    import logging

    from edge_pfm.errors import run_command

    # the device logs through `logging` (a service can route it); the command line shows it on stderr
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    return run_command(lambda: args.func(args))


if __name__ == "__main__":
    sys.exit(main())
