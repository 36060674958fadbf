"""``batchnorm.keras.BatchNormalization`` against ``keras.layers.BatchNormalization``.

The course's two models, built once with Keras's layer and once with ours
from the same weights, trained on the same batches (torch backend, CPU).
"""

import os

os.environ["KERAS_BACKEND"] = "torch"

import subprocess  # noqa: E402
import sys  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

keras = pytest.importorskip("keras")
if keras.backend.backend() != "torch":  # pragma: no cover
    pytest.skip("keras was imported with another backend", allow_module_level=True)

import batchnorm  # noqa: E402
import batchnorm.keras as bk  # noqa: E402

pytestmark = pytest.mark.filterwarnings(
    "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning")

RTOL, ATOL = 1e-4, 1e-5
CLASSES = 3


def data(n=16, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(1.0, 2.0, size=(n, 8, 8, 1)).astype("float32")
    y = rng.integers(0, CLASSES, size=(n,))
    return x, y


def course_model(bn, placement="after"):
    """The course's CNN: BN after the ReLU, or before it (activation=None, BN, ReLU)."""
    layers = [keras.Input((8, 8, 1))]
    if placement == "after":
        layers += [keras.layers.Conv2D(4, 3, activation="relu"), bn(), keras.layers.Flatten(),
                   keras.layers.Dense(16, activation="relu"), bn()]
    elif placement == "before":
        layers += [keras.layers.Conv2D(4, 3), bn(), keras.layers.Activation("relu"),
                   keras.layers.Flatten(), keras.layers.Dense(16), bn(),
                   keras.layers.Activation("relu")]
    else:  # ours, "before" with the ReLU fused into the BN layer
        layers += [keras.layers.Conv2D(4, 3), bn(activation="relu"), keras.layers.Flatten(),
                   keras.layers.Dense(16), bn(activation="relu")]
    layers.append(keras.layers.Dense(CLASSES, activation="softmax"))
    model = keras.Sequential(layers)
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="sparse_categorical_crossentropy")
    return model


def twin_models(placement="after", ours_placement=None):
    keras.utils.set_random_seed(0)
    theirs = course_model(keras.layers.BatchNormalization, placement)
    ours = course_model(bk.BatchNormalization, ours_placement or placement)
    ours.set_weights(theirs.get_weights())
    return theirs, ours


def assert_weights_close(a, b):
    wa, wb = a.get_weights(), b.get_weights()
    assert len(wa) == len(wb)
    for u, v in zip(wa, wb, strict=True):
        np.testing.assert_allclose(u, v, rtol=RTOL, atol=ATOL)


def as_numpy(t):
    return keras.ops.convert_to_numpy(t)


@pytest.mark.parametrize("placement,ours_placement", [
    ("after", None), ("before", None), ("before", "fused")])
def test_course_models_train_like_keras(placement, ours_placement):
    theirs, ours = twin_models(placement, ours_placement)
    for step in range(3):
        x, y = data(seed=step)
        loss_theirs = theirs.train_on_batch(x, y)
        loss_ours = ours.train_on_batch(x, y)
        np.testing.assert_allclose(loss_ours, loss_theirs, rtol=RTOL, atol=ATOL)
        assert_weights_close(theirs, ours)  # includes moving_mean / moving_variance
    x, _ = data(seed=9)
    for training in (True, False):
        np.testing.assert_allclose(as_numpy(ours(x, training=training)),
                                   as_numpy(theirs(x, training=training)),
                                   rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(ours.predict(x, verbose=0), theirs.predict(x, verbose=0),
                               rtol=RTOL, atol=ATOL)


def test_computation_goes_through_our_functional(monkeypatch):
    import batchnorm.keras.layer as layer_module
    calls = []

    def spy(*args, **kwargs):
        calls.append(args[5])  # training
        return batchnorm.functional.batch_norm(*args, **kwargs)

    monkeypatch.setattr(layer_module, "batch_norm", spy)
    layer = bk.BatchNormalization()
    x = np.ones((4, 3), "float32")
    layer(x, training=True)
    layer(x, training=False)
    assert calls == [True, False]


def test_weights_names_and_order_match_keras():
    theirs, ours = twin_models()
    a = [w.path.split("/")[-1] for w in theirs.layers[1].weights]
    b = [w.path.split("/")[-1] for w in ours.layers[1].weights]
    assert a == b == ["gamma", "beta", "moving_mean", "moving_variance"]
    assert len(ours.layers[1].trainable_weights) == 2


def test_moving_variance_is_keras_biased_one():
    x = np.random.default_rng(1).normal(size=(4, 5, 3)).astype("float32")
    layer = bk.BatchNormalization(momentum=0.0)
    layer(x, training=True)
    xb = x.reshape(-1, 3)
    np.testing.assert_allclose(layer.moving_mean.numpy(), xb.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(layer.moving_variance.numpy(), xb.var(0), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("axis", [1, -1, 2])
def test_axes_center_scale_and_initializers_like_keras(axis):
    x = np.random.default_rng(2).normal(size=(6, 3, 4, 5)).astype("float32")
    kw = dict(axis=axis, center=False, momentum=0.9, epsilon=1e-2,
              gamma_initializer="random_normal", moving_variance_initializer="ones")
    a = keras.layers.BatchNormalization(**kw)
    b = bk.BatchNormalization(**kw)
    a.build(x.shape)
    b.build(x.shape)
    b.set_weights(a.get_weights())
    assert [w.shape for w in a.weights] == [w.shape for w in b.weights]
    for training in (True, False, True):
        np.testing.assert_allclose(as_numpy(b(x, training=training)),
                                   as_numpy(a(x, training=training)), rtol=RTOL, atol=ATOL)
        for u, v in zip(a.get_weights(), b.get_weights(), strict=True):
            np.testing.assert_allclose(v, u, rtol=RTOL, atol=ATOL)


def test_trainable_false_runs_in_inference_mode_as_keras():
    theirs, ours = twin_models()
    x, y = data(seed=3)
    theirs.train_on_batch(x, y)
    ours.train_on_batch(x, y)
    for model in (theirs, ours):
        for layer in model.layers:
            if "batch_normalization" in layer.name:
                layer.trainable = False
        model.compile(optimizer=keras.optimizers.SGD(0.1),
                      loss="sparse_categorical_crossentropy")
    before = ours.get_weights()
    np.testing.assert_allclose(as_numpy(ours(x, training=True)),
                               as_numpy(ours(x, training=False)), rtol=1e-6, atol=1e-7)
    x2, y2 = data(seed=4)
    np.testing.assert_allclose(ours.train_on_batch(x2, y2), theirs.train_on_batch(x2, y2),
                               rtol=RTOL, atol=ATOL)
    assert_weights_close(theirs, ours)
    bn = [i for i, layer in enumerate(ours.layers) if "batch_normalization" in layer.name]
    # the frozen BN layers' weights (gamma, beta, moving stats) did not move
    after = {id(w): w.numpy() for i in bn for w in ours.layers[i].weights}
    old = dict(zip([id(w) for w in ours.weights], before, strict=True))
    for key, value in after.items():
        np.testing.assert_array_equal(value, old[key])


def test_config_round_trip():
    layer = bk.BatchNormalization(axis=1, momentum=0.9, epsilon=1e-4, center=False,
                                  gamma_regularizer="l2", beta_constraint="non_neg",
                                  activation="relu", virtual_batch_size=4, name="bn")
    config = layer.get_config()
    clone = bk.BatchNormalization.from_config(config)
    assert clone.get_config() == config
    assert (clone.axis, clone.momentum, clone.epsilon, clone.center, clone.activation,
            clone.virtual_batch_size) == (1, 0.9, 1e-4, False, "relu", 4)
    # Keras's own arguments are there (renorm ones included; not `synchronized`,
    # TensorFlow-only), so a Keras config loads into ours
    theirs = keras.layers.BatchNormalization(momentum=0.9).get_config()
    theirs.pop("synchronized")
    assert bk.BatchNormalization.from_config(theirs).momentum == 0.9


def test_save_and_load_keras_file(tmp_path):
    _, ours = twin_models("before", "fused")
    x, y = data(seed=5)
    ours.train_on_batch(x, y)
    path = tmp_path / "model.keras"
    ours.save(path)
    loaded = keras.saving.load_model(path)
    assert isinstance(loaded.layers[1], bk.BatchNormalization)
    assert loaded.layers[1].activation == "relu"
    for training in (False, True):
        np.testing.assert_allclose(as_numpy(loaded(x, training=training)),
                                   as_numpy(ours(x, training=training)), rtol=1e-6, atol=1e-7)


def test_virtual_batch_size():
    x = np.random.default_rng(6).normal(2.0, 3.0, size=(8, 5)).astype("float32")
    layer = bk.BatchNormalization(virtual_batch_size=4, momentum=0.0, epsilon=1e-6)
    out = as_numpy(layer(x, training=True))
    for part in (out[:4], out[4:]):
        np.testing.assert_allclose(part.mean(0), 0.0, atol=1e-5)
        np.testing.assert_allclose(part.std(0), 1.0, rtol=1e-3)
    ghost = x.reshape(2, 4, 5)
    np.testing.assert_allclose(layer.moving_mean.numpy(), ghost.mean(1).mean(0), rtol=1e-5)
    np.testing.assert_allclose(layer.moving_variance.numpy(), ghost.var(1).mean(0), rtol=1e-5)
    whole = bk.BatchNormalization(virtual_batch_size=8)
    plain = bk.BatchNormalization()
    np.testing.assert_allclose(as_numpy(whole(x, training=True)),
                               as_numpy(plain(x, training=True)), rtol=1e-6, atol=1e-6)


def test_bad_arguments_get_keras_style_errors(monkeypatch):
    with pytest.raises(ValueError, match="momentum"):
        bk.BatchNormalization(momentum=1.0)
    with pytest.raises(ValueError, match="momentum"):
        bk.BatchNormalization(momentum=-0.1)
    with pytest.raises(ValueError, match="epsilon"):
        bk.BatchNormalization(epsilon=0.0)
    with pytest.raises(ValueError, match="activation"):
        bk.BatchNormalization(activation="softmax")
    with pytest.raises(TypeError, match="axis"):
        bk.BatchNormalization(axis=1.5)
    with pytest.raises(ValueError, match="out of bounds"):
        bk.BatchNormalization(axis=4).build((2, 3, 4))
    with pytest.raises(ValueError, match="batch axis"):
        bk.BatchNormalization(axis=0).build((2, 3))
    with pytest.raises(NotImplementedError, match="mask"):
        bk.BatchNormalization()(np.ones((2, 3, 4), "float32"), mask=np.ones((2, 3), bool))
    monkeypatch.setattr(keras.backend, "backend", lambda: "jax")
    with pytest.raises(RuntimeError, match="'jax'"):
        bk.BatchNormalization()


def test_converters_match_torch_modules():
    keras.utils.set_random_seed(7)
    x = np.random.default_rng(7).normal(size=(6, 4, 4, 3)).astype("float32")
    layer = keras.layers.BatchNormalization(gamma_initializer="random_normal",
                                            beta_initializer="random_normal")
    layer(x, training=True)
    layer(x * 2 + 1, training=True)
    module = batchnorm.BatchNorm2d(3, eps=layer.epsilon, momentum=1 - layer.momentum).eval()
    module.load_state_dict(bk.keras_to_torch_state(layer))
    got = module(torch.from_numpy(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
    np.testing.assert_allclose(got.detach().numpy(), as_numpy(layer(x, training=False)),
                               rtol=1e-5, atol=1e-6)
    # and back, into our Keras layer
    ours = bk.BatchNormalization()
    ours.build(x.shape)
    ours.set_weights(bk.torch_to_keras_weights(module.state_dict()))
    # copies: the module's own tensors are not marked unresizable by Tensor.numpy()
    assert all(t.untyped_storage().resizable() for t in module.state_dict().values())
    for u, v in zip(layer.get_weights(), ours.get_weights(), strict=True):
        np.testing.assert_array_equal(u, v)
    # count= rescales the biased variance to the unbiased one, and back
    n = 6 * 4 * 4
    state = bk.keras_to_torch_state(layer, count=n)
    np.testing.assert_allclose(state["running_var"].numpy(),
                               layer.moving_variance.numpy() * n / (n - 1), rtol=1e-6)
    back = bk.torch_to_keras_weights(state, count=n)
    np.testing.assert_allclose(back[3], layer.moving_variance.numpy(), rtol=1e-6)
    assert len(bk.torch_to_keras_weights(state, center=False, scale=False)) == 2


def test_import_batchnorm_does_not_import_keras():
    code = "import sys, batchnorm; assert 'keras' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_without_keras_the_error_says_how_to_install():
    code = ("import sys; sys.modules['keras'] = None\n"
            "try:\n    import batchnorm.keras\nexcept ImportError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                         text=True).stdout
    assert "pip install 'batchnorm[keras]'" in out
