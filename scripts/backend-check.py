"""The model side of the pipeline on another Keras 3 backend (JAX, PyTorch): on a GPU machine without TensorFlow.

The stages need TensorFlow (tf.data, tf.distribute); the models do not: they are built-in Keras layers
(pipeline/models.py), and the saved model is a plain `.keras` file. This checks, on whatever backend
KERAS_BACKEND names and whatever device it finds:

1. saved: the raw-pixel model the train stage saved (under TensorFlow) loads and predicts the labeled
   test split's raw images as it did there (--reference: its probabilities, written by --write-reference
   on the machine that trained it);
2. wrapper: the raw-pixel wrapper on raw images equals the network on preprocessed, normalised arrays;
3. catalogue: every preset builds and takes one training step in mixed_bfloat16, with a finite loss;
4. recipe: the default params' model, optimizer, schedule and label smoothing, fitted on the real
   data in float32 and in mixed_bfloat16 (Keras' own fit on NumPy arrays): epoch times, test accuracy.

Usage, where the pipeline's dependencies are installed:
    python scripts/backend-check.py --write-reference data/train/model.keras --reference ref.npy
Then on the other machine (only keras, numpy, pandas, pydantic, pyyaml, scikit-learn and the backend needed):
    KERAS_BACKEND=jax python scripts/backend-check.py --data-dir <IDX folder> --model model.keras \
        --reference ref.npy --out check.json
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def say(*args) -> None:
    print(*args, flush=True)


def facts() -> dict:
    import keras

    try:
        gpu = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True).stdout.strip()
    except FileNotFoundError:
        gpu = "none (no nvidia-smi)"
    try:
        import tensorflow  # noqa: F401

        tf_status = "installed"
    except ImportError as exc:
        tf_status = f"not installed ({exc})"
    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        devices, version = [str(d) for d in jax.devices()], jax.__version__
    elif backend == "torch":
        import torch

        devices = [torch.cuda.get_device_name(0)] if torch.cuda.is_available() else ["cpu"]
        version = torch.__version__
    else:
        devices, version = [], ""
    return {"gpu": gpu, "tensorflow": tf_status, "keras": keras.__version__, "backend": f"{backend} {version}",
            "devices": devices, "python": sys.version.split()[0]}


def recipe(cfg, data, policy: str) -> dict:
    """The default params' training, as the train stage compiles it, through Keras' fit on NumPy arrays."""
    import keras
    import numpy as np

    from pipeline.models import build_model
    from pipeline.preprocess import network_input
    from pipeline.train import build_optimizer, learning_rate_schedule, training_loss

    keras.mixed_precision.set_global_policy(policy)
    keras.utils.set_random_seed(cfg.seed)
    classes = len(data.class_names)
    network = build_model(cfg.model, data.input_shape, classes)
    steps = math.ceil(len(data.train_x) / cfg.train.batch_size)
    loss, one_hot = training_loss(cfg.train.label_smoothing, classes)
    network.compile(optimizer=build_optimizer(cfg.optimizer, learning_rate_schedule(cfg.optimizer, steps, cfg.train.epochs)),
                    loss=loss, metrics=["accuracy"])
    train_x, val_x, test_x = (network_input(x, data.stats) for x in (data.train_x, data.val_x, data.test_x))
    train_y, val_y = (np.eye(one_hot, dtype="float32")[y] if one_hot else y for y in (data.train_y, data.val_y))
    epoch_seconds = []

    class Clock(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.start = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            epoch_seconds.append(time.perf_counter() - self.start)

    start = time.perf_counter()
    history = network.fit(train_x, train_y, validation_data=(val_x, val_y), epochs=cfg.train.epochs,
                          batch_size=cfg.train.batch_size, callbacks=[Clock()], verbose=0)
    fit_seconds = time.perf_counter() - start
    predicted = np.asarray(network.predict(test_x, batch_size=1000, verbose=0)).argmax(1)
    later = sum(epoch_seconds[1:])
    return {"policy": policy, "fit_s": round(fit_seconds, 2), "epoch_s": [round(t, 2) for t in epoch_seconds],
            "steady_img_s_with_val": round((len(epoch_seconds) - 1) * len(train_x) / later) if later else None,
            "test_accuracy": float((predicted == data.test_y).mean()),
            "val_accuracy": [round(v, 4) for v in history.history["val_accuracy"]]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--write-reference", metavar="MODEL", help="write MODEL's probabilities on the test split to "
                        "--reference, and stop (on the machine that trained it)")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--data-dir", help="the data's files (data.dir); default: params.yaml's")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a params override, as "
                        "`pipeline --set` (repeatable)")
    parser.add_argument("--model", help="a model.keras the train stage saved")
    parser.add_argument("--reference", help="its probabilities (.npy), from --write-reference")
    parser.add_argument("--train-images", type=int, help="train on only these many images (a dry run)")
    parser.add_argument("--presets", type=int, help="build only the first N presets (a dry run)")
    parser.add_argument("--out", help="write the results here as JSON")
    args = parser.parse_args()
    if args.write_reference and not args.reference:
        parser.error("--write-reference needs --reference, the .npy file to write")

    import keras
    import numpy as np

    from pipeline.config import load_config
    from pipeline.fetch import fetch_dataset
    from pipeline.models import PRESETS, build_model, minimum_input_size, raw_input_model
    from pipeline.preprocess import network_input, preprocess

    overrides = [f"data.dir={args.data_dir}", "data.download=false"] if args.data_dir else []
    cfg = load_config(args.params, [*overrides, *args.set])
    raw = fetch_dataset(cfg.data)
    if args.write_reference:
        model = keras.models.load_model(args.write_reference)
        np.save(args.reference, np.asarray(model.predict(raw.test_x, batch_size=1000, verbose=0), dtype="float32"))
        say(f"wrote {args.reference}")
        return 0
    results = {"facts": facts()}
    say("facts", json.dumps(results["facts"]))
    data = preprocess(raw, cfg.preprocess, cfg.seed)
    if args.train_images:
        data.train_x, data.train_y = data.train_x[: args.train_images], data.train_y[: args.train_images]

    if args.model:
        probs = np.asarray(keras.models.load_model(args.model).predict(raw.test_x, batch_size=1000, verbose=0))
        results["saved"] = {"test_accuracy": float((probs.argmax(1) == raw.test_y).mean())}
        if args.reference:
            reference = np.load(args.reference)
            results["saved"].update(argmax_agree=float((probs.argmax(1) == reference.argmax(1)).mean()),
                                    max_abs_diff=float(np.abs(probs - reference).max()))
        say("saved", json.dumps(results["saved"]))

    network = build_model(cfg.model, data.input_shape, len(data.class_names))
    wrapped = np.asarray(raw_input_model(network, data.stats).predict(data.test_x[:2000], verbose=0))
    plain = np.asarray(network.predict(network_input(data.test_x[:2000], data.stats), verbose=0))
    results["wrapper"] = {"argmax_agree": float((wrapped.argmax(1) == plain.argmax(1)).mean()),
                          "max_abs_diff": float(np.abs(wrapped - plain).max())}
    say("wrapper", json.dumps(results["wrapper"]))

    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    rng = np.random.default_rng(0)
    results["catalogue"] = {}
    for name in list(PRESETS)[: args.presets]:
        try:
            model_cfg = load_config(args.params, [*args.set, f"model.name={name}"]).model
            height, width = (max(28, size) for size in minimum_input_size(model_cfg))
            net = build_model(model_cfg, (height, width, 1), 10)
            net.compile(optimizer=keras.optimizers.SGD(0.01), loss="sparse_categorical_crossentropy")
            start = time.perf_counter()
            loss = float(net.train_on_batch(rng.normal(size=(64, height, width, 1)).astype("float32"),
                                            rng.integers(0, 10, 64)))
            row = {"input": [height, width], "params": int(net.count_params()), "loss": round(loss, 4),
                   "finite": math.isfinite(loss), "first_step_s": round(time.perf_counter() - start, 2)}
        except Exception as exc:  # a preset that fails is the finding: record it, go on with the others
            row = {"error": f"{type(exc).__name__}: {exc}"[:300]}
        results["catalogue"][name] = row
        say("catalogue", name, json.dumps(row))

    results["recipe"] = []
    for policy in ("float32", "mixed_bfloat16"):
        results["recipe"].append(recipe(cfg, data, policy))
        say("recipe", json.dumps(results["recipe"][-1]))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))
    failed = [name for name, row in results["catalogue"].items() if not row.get("finite")]
    if failed:
        say("presets that failed:", ", ".join(failed))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
