"""Read a running server's Prometheus page: the queue gauges that tests and the soak watch."""

from __future__ import annotations

import re
import urllib.request

GAUGES = (("nv_inference_pending_request_count", "pending"),
          ("defcnn_queue_max_depth", "max_depth"))  # fmt: skip


def queue_gauges(metrics_port: int, model: str, host: str = "127.0.0.1") -> dict[str, float]:
    """`pending` (requests queued now) and `max_depth` (the deepest the queue has been) for
    `model`, the largest over its versions; 0.0 for a model the page does not list."""
    url = f"http://{host}:{metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    out = {}
    for name, key in GAUGES:
        found = re.findall(rf'^{name}{{model="{re.escape(model)}",version="\d+"}} (\S+)$', text,
                           flags=re.M)  # fmt: skip
        out[key] = max((float(v) for v in found), default=0.0)
    return out
