"""How long `pipeline compare` takes over 100 runs, against `mlflow.search_runs` of the same runs.

Logs RUNS realistic runs into a fresh SQLite store through MLflow's API (every param of params.yaml
with a few varied, as the train stage logs them; 5-epoch histories of the six per-epoch metrics; the
totals and evaluate's metrics, per-class accuracies included), then times, in this process:

- baseline: `mlflow.search_runs(experiment_names=[...])`, the runs into a pandas DataFrame;
- ours: `select_runs` + `write_report` (what `pipeline compare --experiment` does after start-up),
  and within it the history fetch, bulk (one SQL query per metric) against one call per run and metric;
- the whole command, `pipeline compare --experiment bench` as a subprocess (Python start-up and imports
  included; once untimed first, so that modules are compiled to bytecode).

Usage: python scripts/bench-compare.py [--runs 100] [--repeat 3]
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EPOCH_METRICS = ("loss", "accuracy", "val_loss", "val_accuracy", "learning_rate", "epoch_seconds")
CLASSES = ("T-shirt_top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle_boot")


def log_runs(client, experiment_id: str, count: int) -> None:
    import random

    from mlflow.entities import Metric, Param

    from pipeline.config import load_config

    base = load_config(ROOT / "params.yaml").flat()
    grid = itertools.product(["adam", "sgd", "rmsprop", "nadam"], [0.01, 0.005, 0.002, 0.001, 0.0005],
                             [64, 128, 256, 512, 1024], [0.25, 0.5])
    rng = random.Random(0)
    now = int(time.time() * 1000)
    for i, (optimizer, rate, batch, dropout) in zip(range(count), grid):
        params = {**base, "optimizer.name": optimizer, "optimizer.learning_rate": rate, "train.batch_size": batch,
                  "model.dropout": dropout, "derived.input_shape": "28x28x1", "derived.num_classes": 10,
                  "derived.precision": "float32", "derived.learning_rate": rate, "derived.global_batch_size": batch}
        run = client.create_run(experiment_id, run_name=f"cnn-{optimizer}-lr{rate:g}-bs{batch}",
                                tags={"data.digest": "a" * 32, "git.dirty": "false"})
        run_id = run.info.run_id
        items = [Param(k, str(v)) for k, v in params.items()]
        for start in range(0, len(items), 100):  # log_batch takes at most 100 params a call
            client.log_batch(run_id, params=items[start:start + 100])
        quality = rng.uniform(0.80, 0.92)
        metrics = []
        for epoch in range(1, 6):
            accuracy = quality - 0.1 / epoch
            values = {"loss": 1.2 - accuracy, "accuracy": accuracy, "val_loss": 1.25 - accuracy + rng.uniform(0, 0.02),
                      "val_accuracy": accuracy - rng.uniform(0, 0.02), "learning_rate": rate, "epoch_seconds": 40.0}
            metrics += [Metric(k, v, now + epoch, epoch) for k, v in values.items()]
        seconds = rng.uniform(150, 250)
        totals = {"train_seconds": seconds, "images_per_second": 48000 * 5 / seconds, "epochs_run": 5.0,
                  "best_val_accuracy": quality - 0.02, "best_epoch": 5.0, "stopped_epoch": 0.0, "restored_epoch": 5.0,
                  "param_count": 886245.0, "train_images": 48000.0, "val_images": 12000.0, "test_images": 10000.0,
                  "final_val_accuracy": quality - 0.02, "final_val_loss": 1.25 - quality, "test_accuracy": quality,
                  "test_loss": 1.2 - quality}
        totals.update({f"{split}_class_accuracy/{name}": rng.uniform(0.6, 1.0)
                       for split in ("val", "test") for name in CLASSES})
        metrics += [Metric(k, v, now + 6, 0) for k, v in totals.items()]
        client.log_batch(run_id, metrics=metrics)
        client.set_terminated(run_id, "FINISHED")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--repeat", type=int, default=3, help="each timing is the best of this many")
    parser.add_argument("--keep", type=Path, default=None, help="make the store in this new folder and keep it")
    args = parser.parse_args()

    import mlflow
    from mlflow.tracking import MlflowClient

    from pipeline import compare
    from pipeline.bench import best_of

    if args.keep:
        args.keep.mkdir(parents=True)
    with tempfile.TemporaryDirectory() if args.keep is None else contextlib.nullcontext(args.keep) as tmp:
        uri = f"sqlite:///{tmp}/mlflow.db"
        client = MlflowClient(tracking_uri=uri)
        start = time.perf_counter()
        experiment_id = client.create_experiment("bench", artifact_location=f"{tmp}/artifacts")
        log_runs(client, experiment_id, args.runs)
        print(f"logged {args.runs} runs in {time.perf_counter() - start:.1f} s", file=sys.stderr)

        mlflow.set_tracking_uri(uri)
        baseline = best_of(args.repeat, lambda: mlflow.search_runs(experiment_names=["bench"]))
        runs = compare.select_runs(client, experiment="bench")
        assert len(runs) == args.runs, len(runs)
        ids = [run.info.run_id for run in runs]
        select = best_of(args.repeat, lambda: compare.select_runs(client, experiment="bench"))
        bulk = best_of(args.repeat, lambda: compare.metric_histories(client, ids))

        def one_by_one():
            for run_id in ids:
                for key in compare.HISTORY_METRICS:
                    client.get_metric_history(run_id, key)

        sequential = best_of(args.repeat, one_by_one)

        pooled = best_of(args.repeat, lambda: compare.histories_one_by_one(client, ids))  # without the bulk query
        ours = best_of(args.repeat, lambda: compare.write_report(
            client, compare.select_runs(client, experiment="bench"), Path(tmp) / "report"))

        env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
        env.pop("PYTHONDONTWRITEBYTECODE", None)  # timed warm: the first start compiles every module imported

        def command_once():
            subprocess.run([str(Path(sys.executable).parent / "pipeline"), "compare", "--experiment", "bench",
                            "--out", str(Path(tmp) / "report-cli")], check=True, capture_output=True, env=env,
                           cwd=ROOT)

        command_once()
        command = best_of(args.repeat, command_once)

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "unknown CPU")
    print(f"{args.runs} runs, SQLite, best of {args.repeat}, on {cpu} ({os.cpu_count()} cores)")
    print(f"  baseline mlflow.search_runs -> DataFrame   {baseline:7.3f} s")
    print(f"  ours: select_runs + write_report          {ours:7.3f} s   ratio {ours / baseline:.1f}x")
    print(f"    of which select_runs                     {select:7.3f} s")
    print(f"    histories, bulk query                    {bulk:7.3f} s")
    print(f"    histories, one call per run and metric   {sequential:7.3f} s   ({sequential / bulk:.1f}x the bulk)")
    print(f"    histories, {compare.HISTORY_THREADS} threads                       {pooled:7.3f} s")
    print(f"  the `pipeline compare --experiment` command   {command:7.3f} s (Python start-up and imports included)")


if __name__ == "__main__":
    main()
