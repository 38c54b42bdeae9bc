"""scripts/backend-check.py on this machine's backend and scikit-learn's digits, so that it still runs when
the next GPU machine without TensorFlow comes (README "On a GPU without TensorFlow")."""

from __future__ import annotations

import json
import sys

import pytest

from tests.conftest import ROOT, run

SCRIPT = str(ROOT / "scripts/backend-check.py")
DIGITS = ["--set", "data.source=digits", "--set", "train.epochs=3"]


@pytest.mark.slow
def test_backend_check_compares_a_saved_model_and_fits_the_recipe(tmp_path):
    from pipeline.config import load_config
    from pipeline.fetch import fetch_dataset
    from pipeline.models import build_model, raw_input_model
    from pipeline.preprocess import preprocess

    cfg = load_config(ROOT / "params.yaml", ["data.source=digits"])
    data = preprocess(fetch_dataset(cfg.data), cfg.preprocess, cfg.seed)
    model = tmp_path / "model.keras"  # a raw-pixel model, as the train stage saves it (untrained: only its outputs matter)
    raw_input_model(build_model(cfg.model, data.input_shape, len(data.class_names)), data.stats).save(model)
    reference, out = tmp_path / "reference.npy", tmp_path / "check.json"

    run([sys.executable, SCRIPT, "--write-reference", str(model), "--reference", str(reference), *DIGITS], ROOT)
    done = run([sys.executable, SCRIPT, "--model", str(model), "--reference", str(reference), "--presets", "2",
                "--out", str(out), *DIGITS], ROOT)

    results = json.loads(out.read_text())
    assert results["facts"]["backend"].startswith("tensorflow") and results["facts"]["tensorflow"] == "installed"
    assert results["saved"]["argmax_agree"] == 1.0 and results["saved"]["max_abs_diff"] < 1e-5
    assert results["wrapper"]["argmax_agree"] == 1.0 and results["wrapper"]["max_abs_diff"] < 1e-5
    assert list(results["catalogue"]) == ["cnn", "cnn_bn"]
    assert all(row["finite"] and row["params"] > 0 for row in results["catalogue"].values())
    assert [row["policy"] for row in results["recipe"]] == ["float32", "mixed_bfloat16"]
    for row in results["recipe"]:
        assert len(row["epoch_s"]) == len(row["val_accuracy"]) == 3
        assert row["test_accuracy"] > 0.8, row  # digits, 3 epochs of the default recipe
    assert "recipe" in done.stdout and "presets that failed" not in done.stdout


def test_recipe_search_fits_each_candidate_and_counts_its_multiply_adds(tmp_path):
    """scripts/recipe-search.py's trial, in this process: the candidate's overrides and seed are what trains,
    its multiply-adds are counted by hand, and a bad candidate is a row with its error, not a crash."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("recipe_search", ROOT / "scripts/recipe-search.py")
    search = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(search)
    search._init(str(ROOT / "params.yaml"), ["data.source=digits", "preprocess.image_size=[16,16]"])

    row = search._trial("model.filters=[[8],[16]] model.dense=[32] train.epochs=2", 7)
    # conv1 16x16 outputs x 3x3x1x8, conv2 8x8 x 3x3x8x16, dense 4x4x16 -> 32, softmax 32 -> 10
    assert row["multiply_adds_M"] == round((16 * 16 * 9 * 8 + 8 * 8 * 9 * 8 * 16 + 256 * 32 + 32 * 10) / 1e6, 2)
    assert row["seed"] == 7 and len(row["epoch_s"]) == len(row["val_accuracy"]) == 2, row
    assert 0.3 < row["test_accuracy"] <= 1.0, row  # 2 epochs of 10 classes: well above chance

    bad = search._trial("model.filters=[[8],[16]] model.kernel_sizes=[3,3,3]", 7)
    assert "kernel_sizes" in bad["error"] and "test_accuracy" not in bad, bad
