"""Two recipes' training against each other: fit time (ratio against the baseline) and test accuracy.

Fits the baseline recipe and the candidate alternately (so that drift in the machine's speed hits both
alike), REPEAT times each, in this process, with the train stage's own `train_model` on the data as
params.yaml builds it (the preprocess stage's output, in memory), and prints the fastest fit of each,
every timing, the ratio and the test accuracy of each. The candidate is params.yaml as it is; the
baseline, by default, is the default recipe as it was before cnn_fast lost its second 28x28 conv (3 epochs):

    python scripts/bench-recipe.py                                   # the default job's network against it
    python scripts/bench-recipe.py --baseline "" --candidate "train.epochs=4 model.filters=[[32,32],[64]]"
    python scripts/bench-recipe.py --set data.source=digits          # seconds: a check that it runs

Overrides are `key=value` separated by spaces (as `pipeline --set`); --set applies to both sides.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

EARLIER_DEFAULT = "model.filters=[[32,32],[96]] train.epochs=3"  # before cnn_fast lost its second 28x28 conv


def fit(params: str, overrides: list[str], data) -> tuple[float, float]:
    """(seconds of the fit, test accuracy) of one training of params.yaml with `overrides`."""
    from pipeline.config import load_config
    from pipeline.evaluate import predict_probs
    from pipeline.train import train_model

    cfg = load_config(params, overrides)
    start = time.perf_counter()
    result = train_model(cfg, data, verbose=0)
    seconds = time.perf_counter() - start
    test_x, test_y = (data.test_x, data.test_y) if data.test_x is not None else (data.val_x, data.val_y)
    accuracy = float(np.mean(predict_probs(result.network, test_x, data.stats).argmax(axis=1) == test_y))
    return seconds, accuracy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default=str(ROOT / "params.yaml"))
    parser.add_argument("--baseline", default=EARLIER_DEFAULT, help="overrides of the baseline recipe")
    parser.add_argument("--candidate", default="", help="overrides of the candidate recipe (default: none)")
    parser.add_argument("--set", action="append", default=[], dest="common", help="an override for both sides")
    parser.add_argument("--repeat", type=int, default=2, help="fits of each side, alternated")
    args = parser.parse_args()

    from pipeline import fetch, hardware, preprocess
    from pipeline.config import load_config

    common = [o for text in args.common for o in text.split()]
    sides = {"baseline": [*common, *args.baseline.split()], "candidate": [*common, *args.candidate.split()]}
    base = load_config(args.params, sides["candidate"])
    data = preprocess.preprocess(fetch.fetch_dataset(base.data), base.preprocess, base.seed)
    cpu = hardware.cpu_info()
    print(f"CPU: {cpu['model']} ({cpu['cores']} cores; {' '.join(cpu['flags'])}); {len(data.train_x)} training "
          f"images; {args.repeat} fits each, alternated", flush=True)
    times: dict[str, list[float]] = {side: [] for side in sides}
    accuracy: dict[str, float] = {}
    for attempt in range(args.repeat):
        for side, overrides in sides.items():
            seconds, accuracy[side] = fit(args.params, overrides, data)
            times[side].append(seconds)
            print(f"{side} ({attempt + 1}/{args.repeat}): {seconds:.1f} s, test accuracy {accuracy[side]:.4f}",
                  flush=True)
    print("| recipe | overrides | fit (fastest) | every fit | test accuracy |")
    print("|---|---|---|---|---|")
    for side, overrides in sides.items():
        print(f"| {side} | {' '.join(overrides) or '(params.yaml)'} | {min(times[side]):.1f} s | "
              f"{', '.join(f'{t:.1f}' for t in times[side])} s | {accuracy[side] * 100:.2f}% |")
    print(f"candidate's fit: {min(times['baseline']) / min(times['candidate']):.2f}x the baseline's speed "
          f"(fastest against fastest); test accuracy {100 * (accuracy['candidate'] - accuracy['baseline']):+.2f} "
          "points")


if __name__ == "__main__":
    from pipeline.errors import PipelineError

    try:
        main()
    except PipelineError as exc:  # a bad override or data: one line, as the pipeline's commands say it
        sys.exit(f"error: {exc}")
