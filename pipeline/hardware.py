"""What this machine is, and the numeric precision training runs in (`train.precision`).

`auto` picks bfloat16 mixed precision only where it is faster here, because
the CPU flags alone do not tell: on a CPU with AMX, bf16 convolutions run
several times faster than float32; with AVX512-BF16 and no AMX it depends on
the chip (about 1.4x faster on AMD Zen 4, but 2-3x slower than float32 on an
Intel Xeon whose hypervisor hides AMX, measured with TensorFlow 2.21). So on a
CPU with AVX512-BF16 and no AMX, `auto` times a small convolution and matmul in
both precisions once, and caches the verdict per CPU model, flags and
TensorFlow version, so every run on one machine decides the same way.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import time
from pathlib import Path

log = logging.getLogger(__name__)

POLICIES = ("float32", "mixed_bfloat16", "mixed_float16")  # keras.mixed_precision policy names
FLAGS_OF_INTEREST = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16")
BF16_SPEEDUP_NEEDED = 1.15  # the probe's bf16/fp32 speed ratio from which `auto` takes bf16
CACHE = Path("~/.cache/image-pipeline/precision.json")
ONEDNN_VARIABLE = "TF_ENABLE_ONEDNN_OPTS"
ONEDNN_SET_BY = "PIPELINE_SET_TF_ENABLE_ONEDNN_OPTS"  # "1": prefer_onednn set it, here or in a parent process
ONEDNN_TAG = "tensorflow.onednn"  # the run tag: onednn_state() of the process that trained


def cpu_info() -> dict[str, object]:
    """{'model': ..., 'flags': [...]} from /proc/cpuinfo (Linux); the flags that decide speed only."""
    model, flags = "", set()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and not model:
                    model = value.strip()
                elif key.strip() == "flags" and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    return {"model": model or platform.processor() or platform.machine(),
            "flags": [flag for flag in FLAGS_OF_INTEREST if flag in flags],
            "cores": os.cpu_count() or 1}


def prefer_onednn(environ=os.environ) -> None:
    """Have TensorFlow run CPU ops through oneDNN's primitives on every x86-64 CPU; call it before TensorFlow
    is imported (TensorFlow reads TF_ENABLE_ONEDNN_OPTS once, as it loads).

    TensorFlow turns oneDNN on by default only where the CPU has AVX512-VNNI, AVX512-BF16 or AMX; on an
    AVX2-only CPU it runs convolutions as Eigen's im2col with many small matrix products. There oneDNN's
    own convolution kernels train notebook 003's CNN 1.5x faster and cnn_fast 1.2-1.3x (AMD EPYC Zen 3, 2 cores,
    the train stage in float32). Where TensorFlow's default is already on this changes nothing; a value
    the user set, 0 included, is kept."""
    if ONEDNN_VARIABLE not in environ and platform.machine().lower() in ("x86_64", "amd64"):
        environ[ONEDNN_VARIABLE] = "1"
        environ[ONEDNN_SET_BY] = "1"  # inherited: subprocesses (dvc's stages, a sweep's trials) know it too


def onednn_state() -> str:
    """'on' where this process' TensorFlow runs its CPU ops through oneDNN, 'off' where through Eigen,
    'unknown' where TensorFlow does not say (the tag tensorflow.onednn)."""
    try:
        from tensorflow.python.util import _pywrap_util_port
    except ImportError:
        return "unknown"
    return "on" if _pywrap_util_port.IsMklEnabled() else "off"


def tensorflow_default_env(environ=os.environ) -> dict[str, str]:
    """`environ` as the user had it before prefer_onednn: a process started with it runs TensorFlow's
    default kernels for this CPU (unless the user chose others), as the user's own notebook does."""
    ours = environ.get(ONEDNN_SET_BY) == "1"
    return {key: value for key, value in environ.items()
            if key != ONEDNN_SET_BY and not (key == ONEDNN_VARIABLE and ours)}


def gpus() -> list:
    import tensorflow as tf

    return tf.config.list_physical_devices("GPU")


def gpu_supports_bf16(device) -> bool:
    """Compute capability 8.0 (Ampere) and later run bf16 on tensor cores."""
    import tensorflow as tf

    details = tf.config.experimental.get_device_details(device)
    return tuple(details.get("compute_capability") or (0, 0)) >= (8, 0)


def resolve_precision(setting: str, device: str | None = None) -> tuple[str, str]:
    """(keras mixed-precision policy, why) for train.precision = `setting` on `device` ('gpu', 'cpu';
    None: the GPUs if there are any). Run it after the distribution strategy exists: the probe runs TF ops."""
    if setting != "auto":
        return setting, "train.precision"
    devices = gpus() if device != "cpu" else []
    if devices:
        if all(gpu_supports_bf16(device) for device in devices):
            return "mixed_bfloat16", "GPU with compute capability >= 8.0"
        return "float32", "GPU without bf16 (compute capability < 8.0)"
    cpu = cpu_info()
    if "amx_bf16" in cpu["flags"]:
        return "mixed_bfloat16", "CPU with AMX-BF16"
    if "avx512_bf16" not in cpu["flags"]:
        return "float32", "CPU without AVX512-BF16 or AMX"
    ratio = probe_bf16_speedup(cpu)
    if ratio >= BF16_SPEEDUP_NEEDED:
        return "mixed_bfloat16", f"CPU with AVX512-BF16, bf16 measured {ratio:.2f}x fp32's speed"
    return "float32", f"CPU with AVX512-BF16, bf16 measured {ratio:.2f}x fp32's speed (< {BF16_SPEEDUP_NEEDED})"


def probe_bf16_speedup(cpu: dict) -> float:
    """fp32 time / bf16 time of a small CNN's training steps, cached per machine kind.

    A whole network, not one convolution: in bf16 the elementwise ops, pooling and casts around the
    convolutions can cost more than the convolutions save (they did on the Intel CPU named above).
    """
    import tensorflow as tf

    key = f"{cpu['model']}|{','.join(cpu['flags'])}|{cpu['cores']}|tensorflow {tf.__version__}"
    cache = CACHE.expanduser()
    try:
        known = json.loads(cache.read_text())
    except (OSError, ValueError):
        known = {}
    if isinstance(known.get(key), (int, float)):
        return float(known[key])
    ratio = _time_training("float32") / _time_training("mixed_bfloat16")
    log.info("precision probe: bf16 trains at %.2fx fp32's speed on %s", ratio, cpu["model"])
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({**known, key: round(ratio, 3)}, indent=1))
        os.replace(tmp, cache)
    except OSError:  # an unwritable home: probe again next time
        pass
    return ratio


def _time_training(policy: str, steps: int = 6) -> float:
    """Median seconds of a training step of a two-block CNN on 128 28x28 images under `policy`."""
    import keras
    import numpy as np
    from keras import layers

    rng = np.random.default_rng(0)
    images = rng.random((128, 28, 28, 1), dtype="float32")
    labels = rng.integers(0, 10, 128)
    model = keras.Sequential([
        keras.Input((28, 28, 1)),
        layers.Conv2D(32, 3, padding="same", activation="relu", dtype=policy),
        layers.MaxPooling2D(dtype=policy),
        layers.Conv2D(64, 3, padding="same", activation="relu", dtype=policy),
        layers.MaxPooling2D(dtype=policy),
        layers.Flatten(dtype=policy),
        layers.Dense(128, activation="relu", dtype=policy),
        layers.Dense(10, activation="softmax", dtype="float32"),
    ])
    model.compile("sgd", "sparse_categorical_crossentropy")
    model.train_on_batch(images, labels)  # trace and warm up
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        model.train_on_batch(images, labels)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]
