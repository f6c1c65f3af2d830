import numpy as np

from edge_pfm.runtime.latency_window import LatencyWindow


def test_keeps_the_latest_samples_in_order_in_fixed_memory():
    w = LatencyWindow(4)
    assert len(w) == 0 and np.asarray(w).size == 0
    buf = w._buf
    for v in range(1, 7):
        w.append(float(v))
    assert len(w) == 4 and np.asarray(w).tolist() == [3.0, 4.0, 5.0, 6.0]
    assert w._buf is buf and buf.nbytes == 32  # preallocated: never grows
    assert np.percentile(w, 50) == 4.5
