"""FP32 vs INT8 (Q/DQ) vs FP16 on a held-out labelled set, on ONNX Runtime CPU, and the INT8 gate.

The gate decides on 95 % intervals, never on a point estimate (evaluation.stats):
- top-1 agreement with FP32: the Wilson lower bound must reach 99 %, i.e. agreement is >= 99 % with 95 %
  confidence. (At 2000 pairs that takes <= 11 disagreements; below ~380 pairs even 100 % cannot show it.)
- recall of the highest grade (the last class, `hsil`), as a paired change against FP32: refused if INT8
  loses significantly (exact one-sided McNemar p < 0.05 on the samples one model gets right and the other
  wrong), or if the whole 95 % interval of the change lies below -1 pp;
- overall accuracy, as a paired change: refused if its whole 95 % interval lies below -1 pp.
Thresholds are compared with a 1e-9 tolerance: 0.95 - 0.94 is not > 0.01.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np

from calibration.data import Pair, pair_feed
from calibration.sessions import cpu_session
from edge_pfm.decision import softmax
from evaluation.stats import max_failures, paired_delta, wilson
from export.progress import progress as progress_bar

GATE = {"int8_top1_agreement": 0.99, "top_class_recall_drop": 0.01, "accuracy_drop": 0.01, "alpha": 0.05}
EPS = 1e-9  # tolerance for threshold comparisons


def evaluate_stream(models: dict[str, object], chunks: Iterable[list[Pair]], specs: dict, input_names: dict,
                    check_pair: Callable[[Pair], None] = lambda p: None, batch: int = 16,
                    progress: str | None = "evaluating",
                    lesion: dict | None = None, spin: bool = True,
                    labelled: bool = True, noise: dict[str, float] | None = None
                    ) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Run every model (path or ModelProto) on every labelled pair (any pair with `labelled=False`: its label is
    then -1 where it has none), one chunk at a time, each pair preprocessed once -> ({model: logits (N, classes)},
    labels (N,)). `check_pair` may refuse a pair (raise) before it runs.
    `lesion`, if given and the models have a lesion_map output, is filled with {"maps": {model: (N, 1, h, w)}}
    and, when the pairs carry lesion masks (synthetic ones do), "targets": (N, 1, h, w). `spin=False` when the
    chunks are rendered by other processes meanwhile (calibration.sessions.cpu_session). `noise` {model: sigma}:
    that model reads its pairs with Gaussian pixel noise of sigma grey levels added (seeded; NOISE_FLOOR)."""
    from evaluation.lesion_metrics import lesion_target

    noise = noise or {}
    rng = np.random.default_rng(0)
    grey = {input_names[m]: 1.0 / (255.0 * np.asarray(specs[m].std, np.float32).reshape(1, -1, 1, 1))
            for m in input_names if noise}  # one grey level in each input's normalised units

    sessions = {name: cpu_session(m, spin) for name, m in models.items()}
    logits: dict[str, list] = {name: [] for name in models}
    maps: dict[str, list] = {name: [] for name in models}
    targets: list[np.ndarray] = []
    labels: list[int] = []
    bar = progress_bar(desc=f"{progress} {', '.join(models)}", enabled=bool(progress))
    for chunk in chunks:
        for pair in chunk:
            if pair[2] is None and labelled:
                raise ValueError("every held-out pair needs a label (labels.csv)")
            check_pair(pair)
        feeds = [pair_feed(p, specs, input_names) for p in chunk]
        for i in range(0, len(feeds), batch):
            stacked = {k: np.concatenate([f[k] for f in feeds[i:i + batch]]) for k in feeds[0]}
            for name, sess in sessions.items():
                feed = stacked if name not in noise else {
                    k: (v + rng.standard_normal(v.shape, np.float32) * (noise[name] * grey[k])).astype(v.dtype)
                    for k, v in stacked.items()}
                outs = sess.run(None, feed)
                logits[name].append(outs[0])
                if len(outs) > 1 and name not in noise:
                    maps[name].append(outs[1])
        labels += [-1 if p[2] is None else p[2] for p in chunk]
        if lesion is not None:  # None: a lesion pair without an outline, unscored
            targets += [lesion_target(p[3], specs["white_light"]) if len(p) > 3 and p[3] is not None else None
                        for p in chunk]
        bar.update(len(chunk))
    bar.close()
    if lesion is not None and all(v for name, v in maps.items() if name not in noise):
        lesion["maps"] = {name: np.concatenate(v) for name, v in maps.items() if name not in noise}
        known = np.array([t is not None for t in targets], bool)
        if known.any():
            lesion["targets"] = np.stack([t for t in targets if t is not None])
            lesion["known"] = known
    return {name: np.concatenate(v) for name, v in logits.items()}, np.array(labels)


def metrics(logits: np.ndarray, labels: np.ndarray, ref_logits: np.ndarray, classes: tuple[str, ...]) -> dict:
    pred, ref_pred = logits.argmax(1), ref_logits.argmax(1)
    recall = {c: float((pred[labels == i] == i).mean()) if (labels == i).any() else None
              for i, c in enumerate(classes)}
    conf = np.zeros((len(classes), len(classes)), int)
    np.add.at(conf, (labels, pred), 1)
    agree = int((pred == ref_pred).sum())
    return {
        "samples": int(len(labels)),
        "accuracy": float((pred == labels).mean()),
        "top1_agreement": float((pred == ref_pred).mean()),
        "agreement_ci95": list(wilson(agree, len(labels))),
        "disagreements": int(len(labels) - agree),
        "recall": recall,
        "max_abs_prob_diff": float(np.abs(softmax(logits) - softmax(ref_logits)).max()),
        "logit_rmse": float(np.sqrt(((logits - ref_logits) ** 2).mean())),
        "confusion": conf.tolist(),
    }


def evaluate(logits: dict[str, np.ndarray], labels: np.ndarray, classes: tuple[str, ...]) -> dict:
    """Metrics of every model against the truth and against logits["fp32"], with the paired changes."""
    ref = logits["fp32"]
    out = {name: metrics(lg, labels, ref, classes) for name, lg in logits.items()}
    ref_ok = ref.argmax(1) == labels
    for name in out:
        ok = logits[name].argmax(1) == labels
        out[name]["accuracy_change"] = paired_delta(ref_ok, ok)
        out[name]["recall_change"] = {c: paired_delta(ref_ok[labels == i], ok[labels == i])
                                      for i, c in enumerate(classes)}
        out[name]["recall_delta"] = {c: rc["delta"] for c, rc in out[name]["recall_change"].items()}
    return out


NOISE_FLOOR = 1.0  # grey levels of Gaussian pixel noise under which FP32's own decisions are counted (noise_floor)


def noise_floor(logits: dict[str, np.ndarray], source: str, sigma: float = NOISE_FLOOR) -> dict:
    """How many of FP32's decisions change when its pixels get `sigma` grey levels of Gaussian noise (logits
    "fp32" and "fp32_noise", from evaluate_stream's `noise`), beside INT8's changes on the same pairs. INT8
    perturbs a model about as much as one grey level of noise does (measured on a team model: 21 of 3000 changed
    under 1 grey level, 19 under INT8), so where FP32 itself changes more than the gate allows, the model's
    decision margins, not the INT8 recipe, are what keeps INT8 from the gate."""
    ref = logits["fp32"].argmax(1)
    changed = int((logits["fp32_noise"].argmax(1) != ref).sum())
    n = len(ref)
    out = {"source": source, "sigma_grey_levels": sigma, "samples": n, "fp32_changed": changed,
           "fp32_agreement_ci95": list(wilson(n - changed, n))}
    if "int8" in logits:
        out["int8_changed"] = int((logits["int8"].argmax(1) != ref).sum())
    return out


def agreement_report(logits: dict[str, np.ndarray], source: str) -> dict:
    """Top-1 agreement of each model with logits["fp32"] on pairs that need no labels (--agreement-data)."""
    ref = logits["fp32"].argmax(1)
    out = {"source": source, "samples": int(len(ref))}
    for name, lg in logits.items():
        if name != "fp32":
            agree = int((lg.argmax(1) == ref).sum())
            out[name] = {"samples": int(len(ref)), "top1_agreement": agree / len(ref) if len(ref) else float("nan"),
                         "agreement_ci95": list(wilson(agree, len(ref))), "disagreements": int(len(ref) - agree)}
    return out


def _floor_words(floor_report: dict | None, allowed: int) -> str:
    """The noise floor's clause in the agreement reason, where FP32 itself changes more decisions than pass."""
    if not floor_report or floor_report["fp32_changed"] <= allowed:
        return ""
    return (f" (FP32 itself changes {floor_report['fp32_changed']} of {floor_report['samples']} decisions under "
            f"{floor_report['sigma_grey_levels']:g} grey level of pixel noise, about what INT8 perturbs: its decision "
            "margins, not the recipe, set this floor; wider margins (more or cleaner training data, fewer ambiguous "
            "pairs) pass)")


def gate(results: dict, protected: tuple[str, ...], model: str = "int8", agreement: dict | None = None,
         floor_report: dict | None = None, confirm_count: int | None = None) -> list[str]:
    """Reasons the INT8 model must not ship (empty list = pass), decided on 95 % intervals (module docstring).
    `protected`: the classes whose recall must not drop (the critical role, ClassRoles.protected). `agreement`
    (agreement_report): an unlabelled set the agreement criterion is decided on instead of the held-out set.
    `floor_report` (noise_floor, on that same set): named in the agreement reason where it explains it.
    `confirm_count`: the set also confirms the recipe (nothing else could: calibration.mixed.confirming_count), so
    at most this many of its pairs may differ."""
    reasons = []
    m = results[model]
    a = agreement[model] if agreement else m
    lo, hi = a["agreement_ci95"]
    floor = GATE["int8_top1_agreement"]
    if lo < floor - EPS:
        n = a["samples"]
        where = f" on {agreement['source']}" if agreement else ""
        allowed = max_failures(n, floor)
        reasons.append(f"INT8 top-1 agreement with FP32{where} is {a['top1_agreement']:.2%} ({a['disagreements']} of "
                       f"{n} differ), 95 % interval {lo:.2%}-{hi:.2%}: not shown to be >= {floor:.0%}"
                       + (f"; it passes with at most {allowed} of {n} differing" + (
                           ", or on more pairs at this agreement (e.g. unlabelled pairs recorded on the device: "
                           "--agreement-data DIR)" if a["top1_agreement"] >= floor else
                           ": fewer flips, from another recipe or a model with wider logit margins")
                           + _floor_words(floor_report, allowed) if allowed >= 0 else
                          f" (with {n} pairs even 100 % cannot show it: measure it on >= 2000, e.g. unlabelled pairs "
                          "recorded on the device: --agreement-data DIR)"))
    elif confirm_count is not None and a["disagreements"] > confirm_count:
        where = f" on {agreement['source']}" if agreement else ""
        reasons.append(f"INT8 differs from FP32 on {a['disagreements']} of {a['samples']} pairs{where}; no pairs could "
                       "confirm the recipe before the gate (val too small to halve or to show the margin), so this "
                       + (f"set confirms it and may show at most {confirm_count} (a 97 % chance that a fresh set of "
                          f"{a['samples']} shows >= {floor:.0%}" if confirm_count >= 0 else
                          f"set must confirm it, and {a['samples']} pairs cannot even at full agreement (measure "
                          "agreement on >= 1000 pairs: --agreement-data DIR")
                       + "; or give a larger --val, for a confirmation set of its own)"
                       + _floor_words(floor_report, max(confirm_count, 0)))
    tol, alpha = GATE["top_class_recall_drop"], GATE["alpha"]
    for top in protected:
        rc = m["recall_change"][top]
        if rc["n"] and rc["mcnemar_p_loss"] < alpha:
            reasons.append(f"INT8 loses {top!r} (critical) cases significantly: {rc['lost']} lost vs {rc['gained']} "
                           f"gained of {rc['n']} (exact McNemar p = {rc['mcnemar_p_loss']:.3f} < {alpha})")
        elif rc["n"] and rc["ci95"][1] < -tol - EPS:
            reasons.append(f"INT8 recall of {top!r} drops by {-rc['delta']:.1%}, 95 % interval of the change "
                           f"{rc['ci95'][0]:+.1%} to {rc['ci95'][1]:+.1%}: entirely below -{tol:.0%}")
    ac, margin = m["accuracy_change"], GATE["accuracy_drop"]
    if ac["n"] and ac["ci95"][1] < -margin - EPS:
        reasons.append(f"INT8 accuracy drops by {-ac['delta']:.1%} ({ac['lost']} pairs lost vs {ac['gained']} gained), "
                       f"95 % interval {ac['ci95'][0]:+.1%} to {ac['ci95'][1]:+.1%}: entirely below -{margin:.0%}")
    return reasons


ADVICE = ("what to try: (1) quantization-aware fine-tuning: python -m export.train --qat-from CKPT --qat-epochs 3 "
          "--synthetic N | --data DIR --out CKPT.qat.pt, then export and calibrate that checkpoint; (2) evaluate on "
          "more held-out pairs (>= 2000) so the interval is narrow; (3) more calibration pairs that cover every "
          "class, camera setting and illumination (--samples); (4) keep sensitive layers in float (--keep-float); "
          "or accept it with --allow-degraded (not for clinical use)")


def gate_rule(protected: tuple[str, ...]) -> str:
    names = ", ".join(f"`{c}`" for c in protected)
    return (f"INT8 agreement >= {GATE['int8_top1_agreement']:.0%} at 95 % confidence (Wilson lower bound); no "
            f"significant loss of {names} recall (exact McNemar, one-sided, p < "
            f"{GATE['alpha']}); the 95 % intervals of the {names} recall change and of the accuracy change not "
            f"entirely below -{GATE['top_class_recall_drop']:.0%} and -{GATE['accuracy_drop']:.0%}")


def _recipe_lines(recipe: dict | None) -> list[str]:
    if not recipe:
        return []
    val = recipe.get("val")
    evidence = (f"val agreement {val['agreement']:.2%} ({val['disagreements']} of {val['samples']} differ, 95 % CI "
                f"{val['agreement_ci95'][0]:.2%}-{val['agreement_ci95'][1]:.2%}); target: {recipe['target']}"
                if val else recipe["target"])
    floats = ", ".join(f"`{n}`" for n in recipe["float_layers"]) or "none"
    c = recipe.get("confirm")
    confirmed = (f"; confirmed on {c['samples']} pairs the search never saw: {c['agreement']:.2%} ({c['disagreements']} "
                 f"differ, 95 % CI {c['agreement_ci95'][0]:.2%}-{c['agreement_ci95'][1]:.2%})" if c else
                 f"; {recipe['confirm_note']}" if recipe.get("confirm_note") else "")
    missed = [x for x in recipe.get("confirmations", []) if not x["met"]]
    if missed:
        confirmed += "; " + ", ".join(f"{x['recipe']} met val but missed confirmation ({x['disagreements']} of "
                                      f"{x['samples']} differ)" for x in missed)
    return [f"- INT8 recipe: {recipe['kind']}, {recipe['method']} ranges; layers kept float beyond the inputs' first: "
            f"{floats}; {evidence}{confirmed}; Int8: {recipe['int8_share']['counted']}"
            + (f"; {recipe['reason']}" if recipe.get("reason") else "")]


def range_note_lines(notes: dict | None, shown: int = 5) -> list[str]:
    """What calibration.ranges did not take from a histogram: degenerate tensors (their largest |x|) and non-finite
    ones (float readers), a few named."""
    notes = notes or {}
    lines = []
    if notes.get("fallbacks"):
        fb = notes["fallbacks"]
        named = "; ".join(f"`{t}`: {why}" for t, why in list(fb.items())[:shown])
        lines.append(f"range fallbacks: {len(fb)} tensor(s) had a degenerate histogram and take their largest |x| "
                     f"for every method: {named}" + (f"; {len(fb) - shown} more in calibration.json" if len(fb) > shown
                                                     else ""))
    if notes.get("non_finite"):
        nf = notes["non_finite"]
        lines.append(f"non-finite inside the graph: {len(nf)} tensor(s) ({', '.join(f'`{t}`' for t in list(nf)[:shown])}"
                     f"); their range is their finite values', and the {len(notes.get('float_nodes', []))} "
                     "quantizable node(s) reading them stay float")
    return lines


def _agreement_lines(agreement: dict | None) -> list[str]:
    if not agreement:
        return []
    return [f"- agreement set (the gate's agreement criterion; labels not needed): {agreement['samples']} pairs "
            f"({agreement['source']}): " + ", ".join(
                f"{name.upper()} {a['top1_agreement']:.2%} [{a['agreement_ci95'][0]:.2%}, {a['agreement_ci95'][1]:.2%}]"
                f" ({a['disagreements']} differ)" for name, a in agreement.items() if isinstance(a, dict))
            + "; the held-out labelled set below decides accuracy and recall"]


def _floor_lines(floor: dict | None) -> list[str]:
    if not floor:
        return []
    lo, hi = floor["fp32_agreement_ci95"]
    return [f"- noise floor ({floor['samples']} pairs, {floor['source']}): FP32 with {floor['sigma_grey_levels']:g} "
            f"grey level of Gaussian pixel noise changes {floor['fp32_changed']} decisions (agreement [{lo:.2%}, "
            f"{hi:.2%}]); INT8 changes {floor.get('int8_changed', '-')} (INT8's error is of that order: a model whose "
            "decisions move with one grey level cannot agree better under any int8 recipe)"]


def _pct_ci(ci: list) -> str:
    return "-" if ci[0] is None else f"[{ci[0]:+.2%}, {ci[1]:+.2%}]"


def markdown(report: dict, classes: tuple[str, ...], protected: tuple[str, ...]) -> str:
    r = report["results"]
    top = protected[0]  # the table's recall-change column; the gate line covers every protected class
    lines = ["# Accuracy report: FP32 vs INT8 (Q/DQ) vs FP16, ONNX Runtime CPU", "",
             f"- held-out set: {report['eval']['samples']} labelled pairs ({report['eval']['source']}), "
             f"disjoint from the {report['calibration']['samples']} calibration pairs",
             f"- calibration: {report['calibration']['method']}, ranges: {report['calibration'].get('ranges', 'ptq')}, "
             f"data sha256 `{report['calibration']['data_sha256'][:16]}`",
             *(f"- {line}" for line in range_note_lines(report["calibration"].get("range_notes"))),
             *([f"- **training data unknown**: {report['training_data']}"] if report.get("training_data") else []),
             *_agreement_lines(report.get("agreement")),
             *_floor_lines(report.get("noise_floor")),
             *_recipe_lines(report.get("recipe")),
             f"- FP16: {report['fp16_method']}",
             "- intervals are 95 %: Wilson for agreement, paired bootstrap for changes (with exact McNemar p of a loss)",
             "",
             f"| model | accuracy | change vs FP32 [95 % CI] | top-1 agreement [95 % CI] | {top} recall change [95 % CI] "
             "| max abs dprob | logit RMSE | " + " | ".join(f"recall {c}" for c in classes) + " |",
             "|---|---|---|---|---|---|---|" + "---|" * len(classes)]
    for name in ("fp32", "int8", "fp16"):
        m = r[name]
        rec = " | ".join(f"{m['recall'][c]:.3f} ({m['recall_delta'][c]:+.3f})" if m["recall"][c] is not None else "-"
                         for c in classes)
        ac, rc = m["accuracy_change"], m["recall_change"][top]
        lo, hi = m["agreement_ci95"]
        lines.append(f"| {name} | {m['accuracy']:.4f} | {ac['delta']:+.2%} {_pct_ci(ac['ci95'])} p={ac['mcnemar_p_loss']:.2f} "
                     f"| {m['top1_agreement']:.2%} [{lo:.2%}, {hi:.2%}] | "
                     f"{(rc['delta'] or 0):+.2%} {_pct_ci(rc['ci95'])} ({rc['lost']} lost, {rc['gained']} gained) | "
                     f"{m['max_abs_prob_diff']:.4f} | {m['logit_rmse']:.4f} | {rec} |")
    if report.get("lesion_map"):
        lines += ["", lesion_markdown(report["lesion_map"], classes)]
    g = report["gate"]
    lines += ["", f"**Gate** ({g['rule']}): {'PASS' if g['passed'] else 'FAIL'}"]
    lines += [f"- {reason}" for reason in g["reasons"]]
    lines += ["", "![confusion matrices](confusion.png)"]
    return "\n".join(lines) + "\n"


def confusion_png(results: dict, classes: tuple[str, ...], path: str | Path) -> Path:
    """Side-by-side confusion matrices, one per entry of `results` ({name: {"confusion", "accuracy"}});
    rows: truth, columns: prediction. Drawn with OpenCV."""
    import cv2

    cell, pad, label_w = 64, 24, 120
    n = len(classes)
    panels = []
    for name in results:
        conf = np.array(results[name]["confusion"])
        norm = conf / np.maximum(conf.sum(1, keepdims=True), 1)
        w, h = max(label_w + n * cell + pad, 300), pad * 3 + n * cell + 40
        img = np.full((h, w, 3), 255, np.uint8)
        cv2.putText(img, f"{name}  acc {results[name]['accuracy']:.3f}", (label_w, 28), cv2.FONT_HERSHEY_SIMPLEX,
                    0.6, (0, 0, 0), 1, cv2.LINE_AA)
        top = 48
        for i in range(n):
            cv2.putText(img, classes[i][:12], (4, top + i * cell + cell // 2 + 5), cv2.FONT_HERSHEY_SIMPLEX, 0.45,
                        (0, 0, 0), 1, cv2.LINE_AA)
            for j in range(n):
                shade = int(255 - 200 * norm[i, j])
                x0, y0 = label_w + j * cell, top + i * cell
                cv2.rectangle(img, (x0, y0), (x0 + cell - 2, y0 + cell - 2), (255, shade, shade), -1)
                colour = (255, 255, 255) if norm[i, j] > 0.6 else (0, 0, 0)
                cv2.putText(img, str(conf[i, j]), (x0 + 8, y0 + cell // 2 + 6), cv2.FONT_HERSHEY_SIMPLEX, 0.55,
                            colour, 1, cv2.LINE_AA)
        for j in range(n):
            cv2.putText(img, classes[j][:6], (label_w + j * cell + 4, top + n * cell + 18), cv2.FONT_HERSHEY_SIMPLEX,
                        0.4, (0, 0, 0), 1, cv2.LINE_AA)
        panels.append(img)
    out = np.hstack(panels)
    cv2.putText(out, "rows: truth   columns: prediction", (8, out.shape[0] - 8), cv2.FONT_HERSHEY_SIMPLEX, 0.45,
                (80, 80, 80), 1, cv2.LINE_AA)
    ok, buf = cv2.imencode(".png", out)
    if not ok:
        raise OSError(f"could not encode {path}")
    Path(path).write_bytes(buf.tobytes())
    return Path(path)


def _iv(d: dict, key: str = "mean") -> str:
    return f"{d[key]:.3f} [{d['low']:.3f}, {d['high']:.3f}]"


def lesion_markdown(lesion: dict, classes: tuple[str, ...]) -> str:
    """The lesion map's section of the accuracy report."""
    lines = [f"## Lesion map (threshold {lesion['threshold']}, {lesion['grid'][0]}x{lesion['grid'][1]} cells)", ""]
    if "scores" in lesion:
        lines += ["Against the lesion masks (pointing: the map's peak cell is lesion); 95 % intervals, n pairs:",
                  "", "| model | class | n | Dice | IoU | pointing / clean map |", "|---|---|---|---|---|---|"]
        for name, sc in lesion["scores"].items():
            for c in classes:
                row = sc[c]
                extra = (f"{row['pointing']['rate']:.3f} [{row['pointing']['low']:.3f}, {row['pointing']['high']:.3f}]"
                         if "pointing" in row else
                         f"clean {row['clean']['rate']:.3f} [{row['clean']['low']:.3f}, {row['clean']['high']:.3f}]")
                lines.append(f"| {name} | {c} | {row['dice']['n']} | {_iv(row['dice'])} | {_iv(row['iou'])} | {extra} |")
        lines.append("")
    lines += ["Reduced precision vs the FP32 map (IoU of the thresholded maps, per pair):", "",
              f"| model | IoU, all pairs | IoU, {' + '.join(lesion['map_classes']) or 'no map class'} | max abs dp |",
              "|---|---|---|---|"]
    for name, ag in lesion["agreement"].items():
        lines.append(f"| {name} | {_iv(ag['iou_all'])} | {_iv(ag['iou_lesion_classes'])} | {ag['max_abs_diff']:.4f} |")
    return "\n".join(lines)


def lesion_report(lesion: dict, labels: np.ndarray, classes: tuple[str, ...], map_classes: tuple[str, ...],
                  threshold: float = 0.5, roles=None) -> dict:
    """From evaluate_stream's `lesion` output: scores against the masks (when known) and agreement with FP32,
    the lesion-class figures over `map_classes` (the classes that show the map)."""
    from evaluation.lesion_metrics import lesion_scores, map_agreement

    maps = lesion["maps"]
    out = {"threshold": threshold, "grid": list(maps["fp32"].shape[-2:]), "map_classes": list(map_classes),
           "agreement": {name: map_agreement(maps["fp32"], m, labels, classes, threshold, map_classes)
                         for name, m in maps.items() if name != "fp32"}}
    if "targets" in lesion:
        known = lesion.get("known", np.ones(len(labels), bool))
        out["scored_pairs"] = int(known.sum())
        out["scores"] = {name: lesion_scores(m[known], lesion["targets"], labels[known], classes, threshold,
                                             map_classes, roles) for name, m in maps.items()}
    return out
