"""The device runtime, one job per file:

    paired_stream  frames from two cameras (or one alternating sensor) -> prepared pairs, in the reader threads
    prepare        one frame -> model input and quality gates, or the reason it is unusable
    pairing        the pairers: nearest timestamp within tolerance, or one illumination cycle
    quality        the quality gates (blur, exposure, glare)
    health         signal health, a pure function of the sources' last frames
    record         the decision record: the log line's schema and the latency stages
    sinks          where decisions go (decision log, annotated video and preview, observers), attached from outside
    summary        the run summary
    runner         the Runner: threads, the freshest-pair slot, start/stop
"""
from edge_pfm.runtime.config import RunConfig
from edge_pfm.runtime.runner import Runner
from edge_pfm.runtime.sinks import AnnotatedVideoSink, DecisionLogSink, MemorySink, ObserverSink, Sink
from edge_pfm.runtime.summary import format_summary

__all__ = ["AnnotatedVideoSink", "DecisionLogSink", "MemorySink", "ObserverSink", "RunConfig", "Runner", "Sink",
           "format_summary"]
