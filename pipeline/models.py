"""One model builder (STYLE 9), and the wrapper that makes the saved model take raw pixels."""

from __future__ import annotations

from pipeline.config import ModelConfig
from pipeline.preprocess import pixel_layers


def build_model(cfg: ModelConfig, input_shape, num_classes: int):
    """The `cnn` family; the defaults are notebook 003's CNN (886,245 params for 28x28x1, 5 classes).

    Each conv block: `filters[i]` convolutions of `kernel_sizes[i]` (SAME padding,
    ReLU), 2x2 max pooling, dropout. With `batch_norm`, batch normalisation
    follows each convolution as in notebook 003's model 7, whose last one comes
    after the final block's pooling and dropout (same parameter count: 887,013).
    """
    import keras
    from keras import layers

    inputs = keras.Input(shape=tuple(input_shape), name="image")
    x = inputs
    n_blocks = len(cfg.filters)
    for b, (filters, kernel) in enumerate(zip(cfg.filters, cfg.kernel_sizes)):
        last_block = b == n_blocks - 1
        for c, width in enumerate(filters):
            x = layers.Conv2D(width, kernel, padding="same", activation="relu", name=f"conv{b + 1}_{c + 1}")(x)
            last_conv = last_block and c == len(filters) - 1
            if cfg.batch_norm and not last_conv:
                x = layers.BatchNormalization(name=f"bn{b + 1}_{c + 1}")(x)
        x = layers.MaxPooling2D(pool_size=2, strides=2, name=f"pool{b + 1}")(x)
        if cfg.dropout:
            x = layers.Dropout(cfg.dropout, name=f"dropout{b + 1}")(x)
        if cfg.batch_norm and last_block:
            x = layers.BatchNormalization(name=f"bn{b + 1}_{len(filters)}")(x)
    x = layers.Flatten(name="flatten")(x)
    for d, width in enumerate(cfg.dense):
        x = layers.Dense(width, activation="relu", name=f"dense{d + 1}")(x)
        if cfg.dropout:
            x = layers.Dropout(cfg.dropout, name=f"dense_dropout{d + 1}")(x)
    outputs = layers.Dense(num_classes, activation="softmax", name="probabilities", dtype="float32")(x)
    return keras.Model(inputs, outputs, name="network")


def normalizer(stats: dict):
    """keras.layers.Normalization with the preprocess stage's statistics: (x - mean) / sqrt(variance)."""
    import keras

    return keras.layers.Normalization(mean=stats["mean"], variance=stats["variance"], name="normalize")


def raw_input_model(network, stats: dict):
    """Wrap the trained network so it takes raw uint8 images of the data's own size.

    The first layers are the preprocess stage's resizing, channel conversion
    and rounding (`pixel_layers`) and its normalisation, with the same
    statistics; the predict stage, `mlflow models serve` and a user's script
    feed it images as they come.
    """
    import keras

    inputs = keras.Input(shape=tuple(stats["raw_shape"]), dtype="uint8", name="pixels")
    x = keras.layers.Identity(dtype="float32", name="to_float")(inputs)
    for layer in pixel_layers(stats["raw_shape"], stats["input_shape"]):
        x = layer(x)
    x = normalizer(stats)(x)
    outputs = network(x)
    return keras.Model(inputs, outputs, name="classifier")
