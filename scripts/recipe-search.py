"""Candidate recipes' test accuracy, many at once, on any Keras 3 backend (a GPU machine without TensorFlow).

Which default network and schedule reach 92% on Fashion-MNIST in the fewest CPU seconds is a question of
accuracy per recipe (this script, fast on a GPU) and of CPU cost per network (measured on the CPU). Each
candidate is a line of params overrides (`key=value` separated by spaces, as `pipeline --set`); every
candidate is fitted once per seed, by backend-check's `recipe` (the train stage's network, optimizer,
schedule and label smoothing, Keras' fit on NumPy arrays, float32), in a pool of processes, and each
result is appended to --out as one JSON line as soon as it ends. The train/val split is params.yaml's;
the seed changes only the training (weights, shuffling, dropout).

    KERAS_BACKEND=jax python scripts/recipe-search.py --data-dir <IDX folder> --candidates cands.txt \
        --seeds 42,1,2 --workers 12 --out results.jsonl
    python scripts/recipe-search.py --set data.source=digits --candidates cands.txt --workers 1   # a check
"""

from __future__ import annotations

import argparse
import concurrent.futures
import importlib.util
import json
import multiprocessing
import os
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

_state: dict = {}


def _init(params: str, overrides: list[str]) -> None:
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # JAX: many processes share one GPU
    import keras

    if keras.backend.backend() == "jax":
        import jax

        jax.config.update("jax_default_matmul_precision", "highest")  # float32 as on a CPU, not TF32
    from pipeline.config import load_config
    from pipeline.fetch import fetch_dataset
    from pipeline.preprocess import preprocess

    spec = importlib.util.spec_from_file_location("backend_check", ROOT / "scripts" / "backend-check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cfg = load_config(params, overrides)
    _state.update(params=params, overrides=overrides, recipe=module.recipe,
                  data=preprocess(fetch_dataset(cfg.data), cfg.preprocess, cfg.seed))


def multiply_adds(network) -> int:
    """Multiply-adds of one image's forward pass through the network's Conv2D and Dense layers."""
    import keras
    import numpy as np

    total = 0
    for layer in network.layers:
        if isinstance(layer, keras.layers.Conv2D):
            total += int(np.prod(layer.output.shape[1:3])) * int(np.prod(layer.kernel.shape))
        elif isinstance(layer, keras.layers.Dense):
            total += int(np.prod(layer.kernel.shape))
    return total


def _trial(candidate: str, seed: int) -> dict:
    from pipeline.config import load_config
    from pipeline.models import build_model

    row = {"candidate": candidate, "seed": seed}
    try:
        data = _state["data"]
        cfg = load_config(_state["params"], [*_state["overrides"], *candidate.split(), f"seed={seed}"])
        row["multiply_adds_M"] = round(multiply_adds(build_model(cfg.model, data.input_shape,
                                                                 len(data.class_names))) / 1e6, 2)
        row.update(_state["recipe"](cfg, data, "float32"))
    except Exception as exc:  # a candidate that fails is a finding: record it, go on
        row["error"] = "".join(traceback.format_exception_only(exc)).strip()[-500:]
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--params", default=str(ROOT / "params.yaml"))
    parser.add_argument("--data-dir", help="the data's files (data.dir); default: params.yaml's")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="an override for every "
                        "candidate (repeatable)")
    parser.add_argument("--candidates", required=True, help="a file of candidates, one line of overrides each "
                        "(an empty line: params.yaml as it is; '#' starts a comment)")
    parser.add_argument("--seeds", default="42", help="comma-separated training seeds")
    parser.add_argument("--workers", type=int, default=1, help="processes fitting at once")
    parser.add_argument("--out", required=True, help="JSON lines, one per fit, appended as fits end")
    args = parser.parse_args()

    overrides = [f"data.dir={args.data_dir}", "data.download=false"] if args.data_dir else []
    overrides += [o for text in args.set for o in text.split()]
    candidates = [line.split("#")[0].strip() for line in Path(args.candidates).read_text().splitlines()
                  if not line.lstrip().startswith("#")]
    seeds = [int(s) for s in args.seeds.split(",")]
    trials = [(candidate, seed) for seed in seeds for candidate in candidates]  # every candidate's first seed first
    start = time.perf_counter()
    context = multiprocessing.get_context("spawn")
    with open(args.out, "a") as out, concurrent.futures.ProcessPoolExecutor(
            args.workers, mp_context=context, initializer=_init, initargs=(args.params, overrides)) as pool:
        futures = [pool.submit(_trial, *trial) for trial in trials]
        for future in concurrent.futures.as_completed(futures):
            row = future.result()
            row["elapsed_s"] = round(time.perf_counter() - start, 1)
            out.write(json.dumps(row) + "\n")
            out.flush()
            print(json.dumps({k: row.get(k) for k in ("candidate", "seed", "multiply_adds_M", "test_accuracy",
                                                        "fit_s", "error", "elapsed_s")}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
