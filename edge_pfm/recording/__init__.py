"""`edge-pfm record`: the device's own frames back to the build machine, one job per file:

    video     --mode video: each camera's own frames into its own lossless video, with its frame record
    sidecar   the frame record beside each video: capture time, stamp kind, dequeue delay, seq, per frame
    stills    --mode dataset: gated, spaced pairs as stills in the paired dataset layout, unlabelled
    session   record(): a Runner with the recording attached (the cameras, pairing and gates of `edge-pfm run`)

A recording replays with its recorded timing: `edge-pfm run --white REC/white_light.000.avi --fluo
REC/fluorescence.000.avi` (sources.replay reads the frame records).
"""
from edge_pfm.recording.session import record

__all__ = ["record"]
