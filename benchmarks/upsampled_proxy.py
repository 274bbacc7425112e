"""The proxy CNN's stride on inputs larger than the benchmark families' (results/upsampled_proxy.md).

No family holds images over 16 a side or sequences over 64 steps, where the proxy CNN strides its
first convolution (``poisonguard.proxy.cnn_stride``).  So the families' digits (8x8, each pixel
repeated 4x4: 32x32) and signals (each step repeated 4 times: 256 steps) are upsampled after
poisoning, and proxy mode runs on them strided (the default) and unstrided (``full``: the stride
rule turned off), one line per case:

    python benchmarks/upsampled_proxy.py strided digits:patch:0.05:0 signals:blend:0.1:0 ...
    python benchmarks/upsampled_proxy.py full digits:patch:0.05:0 ...
"""

from __future__ import annotations

import sys
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import families as F  # noqa: E402


def run(mode: str, case: str) -> str:
    import poisonguard
    import poisonguard.proxy as proxy
    from threadpoolctl import threadpool_limits

    if mode == "full":
        proxy.FULL_GRID.update({"image": 10**4, "sequence": 10**6})
    source, attack, rate, seed = case.split(":")
    x0, y0, target = F.load(source)
    x, y, truth = F.poison(x0, y0, source, target, attack, float(rate), int(seed))
    if source == "digits":
        x, shape = np.kron(x.reshape(-1, 8, 8), np.ones((4, 4), np.float32)).reshape(len(x), -1), [1, 32, 32]
    else:
        x, shape = np.repeat(x, 4, axis=1), [1, 4 * x.shape[1]]
    table = F.feature_table(x, y)
    config = {"seed": int(seed), "embedding": {"source": "proxy", "features": "features", "device": "cpu",
                                               "features_shape": shape}}
    start = time.perf_counter()
    with warnings.catch_warnings(), threadpool_limits(1):
        warnings.simplefilter("ignore")
        found = poisonguard.screen(table, config=config)
    metrics = F._metrics(found.rows["quarantined"].to_numpy(), truth)
    info = found.summary["embedding"]
    f1 = "-" if metrics["f1"] is None else f"{metrics['f1']:.3f}"
    recall = "-" if metrics["recall"] is None else f"{metrics['recall']:.3f}"
    return (f"| {mode} | {case} | {info['architecture']} | {info['epochs']} | {recall} | "
            f"{metrics['clean_flagged']:.2%} | {f1} | {time.perf_counter() - start:.0f} s |")


if __name__ == "__main__":
    for case in sys.argv[2:]:
        print(run(sys.argv[1], case), flush=True)
