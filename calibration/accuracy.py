"""FP32 vs INT8 (Q/DQ) vs FP16 (emulated) on a held-out labelled set, on ONNX Runtime CPU."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from calibration.data import PairReader

GATE = {"int8_top1_agreement": 0.99, "top_class_recall_drop": 0.01}


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def run_model(model, reader: PairReader) -> np.ndarray:
    """Logits (N, classes) of an ONNX model (path or ModelProto) on every pair, ORT CPU."""
    import onnxruntime as ort

    src = model.SerializeToString() if hasattr(model, "SerializeToString") else str(model)
    sess = ort.InferenceSession(src, providers=["CPUExecutionProvider"])
    return np.concatenate([sess.run(None, feed)[0] for feed in reader])


def metrics(logits: np.ndarray, labels: np.ndarray, ref_logits: np.ndarray, classes: tuple[str, ...]) -> dict:
    pred, ref_pred = logits.argmax(1), ref_logits.argmax(1)
    recall = {c: float((pred[labels == i] == i).mean()) if (labels == i).any() else None
              for i, c in enumerate(classes)}
    conf = np.zeros((len(classes), len(classes)), int)
    np.add.at(conf, (labels, pred), 1)
    return {
        "accuracy": float((pred == labels).mean()),
        "top1_agreement": float((pred == ref_pred).mean()),
        "recall": recall,
        "max_abs_prob_diff": float(np.abs(_softmax(logits) - _softmax(ref_logits)).max()),
        "logit_rmse": float(np.sqrt(((logits - ref_logits) ** 2).mean())),
        "confusion": conf.tolist(),
    }


def evaluate(models: dict[str, object], reader: PairReader, labels: np.ndarray, classes: tuple[str, ...]) -> dict:
    logits = {}
    for name, model in models.items():
        reader.rewind()
        reader.progress = f"evaluating {name}"
        logits[name] = run_model(model, reader)
    ref = logits["fp32"]
    out = {name: metrics(lg, labels, ref, classes) for name, lg in logits.items()}
    for name in out:
        out[name]["recall_delta"] = {c: (None if out[name]["recall"][c] is None else
                                         out[name]["recall"][c] - out["fp32"]["recall"][c]) for c in classes}
    return out


def gate(results: dict, classes: tuple[str, ...]) -> list[str]:
    """Reasons the INT8 model must not ship (empty list = pass). The last class is the highest grade."""
    reasons = []
    i8 = results["int8"]
    if i8["top1_agreement"] < GATE["int8_top1_agreement"]:
        reasons.append(f"INT8 top-1 agreement with FP32 is {i8['top1_agreement']:.2%} "
                       f"(< {GATE['int8_top1_agreement']:.0%})")
    top = classes[-1]
    drop = -(i8["recall_delta"][top] or 0.0)
    if drop > GATE["top_class_recall_drop"]:
        reasons.append(f"INT8 recall of {top!r} (highest grade) drops by {drop:.1%} (> {GATE['top_class_recall_drop']:.0%})")
    return reasons


ADVICE = ("what to try: (1) more calibration pairs that cover every class, camera setting and illumination "
          "(--samples); (2) another method (--method percentile | entropy | minmax); (3) keep sensitive layers in "
          "float (--keep-float /stem/ keeps the first convolution of each branch in FP32); or accept it with "
          "--allow-degraded")


def markdown(report: dict, classes: tuple[str, ...]) -> str:
    r = report["results"]
    lines = ["# Accuracy report: FP32 vs INT8 (Q/DQ) vs FP16 (emulated), ONNX Runtime CPU", "",
             f"- held-out set: {report['eval']['samples']} labelled pairs ({report['eval']['source']}), "
             f"disjoint from the {report['calibration']['samples']} calibration pairs",
             f"- calibration: {report['calibration']['method']}, data sha256 `{report['calibration']['data_sha256'][:16]}`",
             f"- FP16: {report['fp16_method']}", "",
             "| model | accuracy | top-1 agreement | max abs dprob | logit RMSE | " + " | ".join(f"recall {c}" for c in classes) + " |",
             "|---|---|---|---|---|" + "---|" * len(classes)]
    for name in ("fp32", "int8", "fp16"):
        m = r[name]
        rec = " | ".join(f"{m['recall'][c]:.3f} ({m['recall_delta'][c]:+.3f})" if m["recall"][c] is not None else "-"
                         for c in classes)
        lines.append(f"| {name} | {m['accuracy']:.4f} | {m['top1_agreement']:.4f} | {m['max_abs_prob_diff']:.4f} | "
                     f"{m['logit_rmse']:.4f} | {rec} |")
    g = report["gate"]
    lines += ["", f"**Gate** (INT8 agreement >= {GATE['int8_top1_agreement']:.0%}, recall of `{classes[-1]}` not lower "
              f"by more than {GATE['top_class_recall_drop']:.0%}): {'PASS' if g['passed'] else 'FAIL'}"]
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
