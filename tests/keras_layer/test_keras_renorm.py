"""``batchnorm.keras.BatchNormalization(renorm=True)``: Keras 2's Batch Renormalization.

The oracle is :func:`keras_renorm_call` below, Keras 2's algorithm (tf_keras
``BatchNormalizationBase`` with ``renorm=True``) written out in float64 NumPy:
``r`` and ``d`` from the separate ``renorm_mean`` / ``renorm_stddev`` weights
(``renorm_momentum``), the inference variance derived from ``moving_stddev``,
and the gradient of batch norm with ``r`` and ``d`` held constant.
``batchnorm.reference.renorm_forward_train`` is the paper's rule on PyTorch's
running statistics, with ``r`` clipped to ``[1/rmax, rmax]``; it is Keras's
rule only after a change of variables, which one test checks. Keras 3's own
``keras.layers.BatchNormalization(renorm=True)`` implements the same algorithm
and is compared in float32.
"""

import os

os.environ["KERAS_BACKEND"] = "torch"

import math  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

keras = pytest.importorskip("keras")
if keras.backend.backend() != "torch":  # pragma: no cover
    pytest.skip("keras was imported with another backend", allow_module_level=True)

import batchnorm  # noqa: E402
import batchnorm.keras as bk  # noqa: E402
from batchnorm import reference  # noqa: E402

pytestmark = pytest.mark.filterwarnings(
    "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning")

NAMES = ["gamma", "beta", "moving_mean", "moving_variance", "moving_stddev", "renorm_mean",
         "renorm_stddev"]
CLIP = {"rmax": 1.5, "rmin": 0.5, "dmax": 0.5}
F64 = dict(rtol=1e-10, atol=1e-10)
F32 = dict(rtol=1e-5, atol=1e-6)
KERAS_TOL = dict(rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------- oracle

def keras_renorm_call(x, w, dy, *, axis=-1, momentum=0.99, renorm_momentum=0.99, eps=1e-3,
                      clipping=None, training=True, virtual_batch_size=None):
    """One call of Keras 2's ``BatchNormalization(renorm=True)``, float64 NumPy.

    ``w`` maps the weight names to arrays (``gamma`` / ``beta`` may be
    missing: 1 / 0). Returns ``(y, grads, new_w, r, d)``: ``grads`` holds
    ``x``, ``gamma``, ``beta`` for the loss ``sum(y * dy)``; ``new_w`` the
    weights after the call.
    """
    x = np.moveaxis(np.asarray(x, np.float64), axis, -1)                   # (N, ..., C)
    dy = np.moveaxis(np.asarray(dy, np.float64), axis, -1)                 # (N, ..., C)
    C = x.shape[-1]
    w = {k: np.asarray(v, np.float64) for k, v in w.items()}
    gamma, beta = w.get("gamma", np.ones(C)), w.get("beta", np.zeros(C))
    new_w = dict(w)
    if not training:
        y = gamma * (x - w["moving_mean"]) / np.sqrt(w["moving_variance"] + eps) + beta
        return np.moveaxis(y, -1, axis), None, new_w, None, None
    # Ghost batches as Keras 2 builds them: (G, B, ..., C), statistics per ghost batch.
    G = 1 if virtual_batch_size is None else x.shape[0] // virtual_batch_size
    xg = x.reshape(G, -1, *x.shape[1:])                                    # (G, B, ..., C)
    dyg = dy.reshape(xg.shape)
    axes = tuple(range(1, xg.ndim - 1))
    mean_g = xg.mean(axis=axes, keepdims=True)                             # (G, 1.., C)
    var_g = ((xg - mean_g) ** 2).mean(axis=axes, keepdims=True)            # (G, 1.., C) biased
    mean, var = mean_g.reshape(G, C).mean(0), var_g.reshape(G, C).mean(0)  # (C,)
    sigma_B = np.sqrt(var + eps)                                           # (C,)
    s = np.maximum(w["renorm_stddev"], math.sqrt(eps))                     # (C,)
    clipping = clipping or {}
    rmin = clipping.get("rmin") if clipping.get("rmin") is not None else 0.0
    rmax = clipping.get("rmax") if clipping.get("rmax") is not None else np.inf
    dmax = clipping.get("dmax") if clipping.get("dmax") is not None else np.inf
    r = np.clip(sigma_B / s, rmin, rmax)                                   # (C,)
    d = np.clip((mean - w["renorm_mean"]) / s, -dmax, dmax)                # (C,)
    sigma_g = np.sqrt(var_g + eps)                                         # (G, 1.., C)
    xhat = (xg - mean_g) / sigma_g                                         # (G, B, ..., C)
    y = gamma * (xhat * r + d) + beta
    # Backward with r, d constant: batch norm's, per ghost batch, for dxhat = dy * gamma * r.
    dxhat = dyg * gamma * r
    dx = (dxhat - dxhat.mean(axis=axes, keepdims=True)
          - xhat * (dxhat * xhat).mean(axis=axes, keepdims=True)) / sigma_g
    red = tuple(range(xg.ndim - 1))
    grads = {"x": np.moveaxis(dx.reshape(x.shape), -1, axis),
             "gamma": (dyg * (xhat * r + d)).sum(axis=red), "beta": dyg.sum(axis=red)}
    new_w["renorm_mean"] = w["renorm_mean"] * renorm_momentum + mean * (1 - renorm_momentum)
    new_w["renorm_stddev"] = (w["renorm_stddev"] * renorm_momentum
                              + sigma_B * (1 - renorm_momentum))
    new_w["moving_mean"] = w["moving_mean"] * momentum + mean * (1 - momentum)
    new_w["moving_stddev"] = w["moving_stddev"] * momentum + sigma_B * (1 - momentum)
    new_w["moving_variance"] = np.maximum(new_w["moving_stddev"] ** 2 - eps, 0.0)
    return np.moveaxis(y.reshape(x.shape), -1, axis), grads, new_w, r, d


# --------------------------------------------------------------------------- helpers

def batch(shape, axis, seed):
    """Channels with std 5, 0.1, 1.2 and means 3, -3, 0.2 (more channels repeat them):
    from a start of mean 0, stddev 1, the first two push r and d past any small clipping."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=shape)
    C = shape[axis]
    scale = np.resize([5.0, 0.1, 1.2], C)
    shift = np.resize([3.0, -3.0, 0.2], C)
    view = [1] * len(shape)
    view[axis] = C
    return x * scale.reshape(view) + shift.reshape(view)


def weights(layer):
    return {w.path.split("/")[-1]: np.asarray(w.numpy(), np.float64) for w in layer.weights}


def as_numpy(t):
    return keras.ops.convert_to_numpy(t)


def train_call(layer, x, dy):
    """``layer(x, training=True)`` and the gradients of ``sum(y * dy)`` (torch autograd)."""
    dtype = torch.float64 if layer.dtype == "float64" else torch.float32
    xt = torch.tensor(x, dtype=dtype, requires_grad=True)
    params = {name: getattr(layer, name).value for name in ("gamma", "beta")
              if getattr(layer, name) is not None}
    for p in params.values():
        p.grad = None
    y = layer(xt, training=True)
    (y * torch.as_tensor(dy, dtype=y.dtype)).sum().backward()
    grads = {"x": xt.grad.numpy()}
    grads.update({name: p.grad.numpy() for name, p in params.items()})
    return y.detach().numpy(), grads


def assert_state(layer, expected, tol):
    got = weights(layer)
    assert set(got) == set(expected)
    for name, value in expected.items():
        np.testing.assert_allclose(got[name], value, **tol, err_msg=name)


# --------------------------------------------------------------------------- tests

@pytest.fixture(autouse=True)
def _seeded():
    """Random initializers draw the same values whatever the test order."""
    keras.utils.set_random_seed(0)


@pytest.mark.parametrize("shape,axis,kw", [
    ((16, 3), -1, dict(renorm_clipping=CLIP)),
    ((6, 4, 4, 3), -1, dict(renorm_clipping=CLIP, momentum=0.9, renorm_momentum=0.5)),
    ((6, 5, 3, 3), 1, dict(renorm_clipping={"rmax": 2.0, "dmax": 1.0}, epsilon=1e-5)),
    ((16, 3), -1, dict(renorm_clipping=None, renorm_momentum=0.0)),
    ((16, 3), -1, dict(renorm_clipping={"rmin": 0.9, "rmax": None}, center=False, scale=False)),
    ((12, 3, 2), -1, dict(renorm_clipping=CLIP, virtual_batch_size=4, activation=None)),
    # renorm_stddev starts at 0: r and d divide by Keras's floor sqrt(epsilon)
    ((16, 3), -1, dict(renorm_clipping={"rmax": 3.0, "dmax": 1.0}, renorm_momentum=0.9,
                       moving_variance_initializer="zeros")),
])
def test_training_steps_match_keras2_oracle_float64(shape, axis, kw):
    kw = {"moving_variance_initializer": keras.initializers.Constant(2.25), **kw}
    layer = bk.BatchNormalization(axis=axis, renorm=True, dtype="float64",
                                  gamma_initializer="random_normal",
                                  beta_initializer="random_normal",
                                  moving_mean_initializer=keras.initializers.Constant(0.25),
                                  **kw)
    layer.build(shape)
    state = weights(layer)
    # Keras's initial values: the stddevs are sqrt of the variance initializer's
    np.testing.assert_allclose(state["moving_stddev"], np.sqrt(state["moving_variance"]))
    np.testing.assert_allclose(state["renorm_stddev"], np.sqrt(state["moving_variance"]))
    np.testing.assert_allclose(state["renorm_mean"], 0.25)
    opts = dict(axis=axis, momentum=layer.momentum, renorm_momentum=layer.renorm_momentum,
                eps=layer.epsilon, clipping=layer.renorm_clipping,
                virtual_batch_size=layer.virtual_batch_size)
    clipped = set()
    for step in range(3):
        x = batch(shape, axis, seed=step)
        dy = np.random.default_rng(10 + step).normal(size=shape)
        y, grads = train_call(layer, x, dy)
        y_ref, g_ref, state, r, d = keras_renorm_call(x, state, dy, **opts)
        np.testing.assert_allclose(y, y_ref, **F64)
        assert set(grads) == {"x"} | ({"gamma", "beta"} & set(state))
        for name in grads:
            np.testing.assert_allclose(grads[name], g_ref[name], **F64, err_msg=name)
        assert_state(layer, state, F64)
        clip = layer.renorm_clipping or {}
        for key, hit in (("rmax", np.isclose(r, clip.get("rmax") or np.inf)),
                         ("rmin", np.isclose(r, clip.get("rmin") or 0.0)),
                         ("dmax", np.isclose(np.abs(d), clip.get("dmax") or np.inf))):
            if hit.any():
                clipped.add(key)
    # every bound the case sets is reached at least once, so clipping is exercised
    assert clipped == {k for k, v in (layer.renorm_clipping or {}).items() if v is not None}
    # inference: the moving statistics, nothing updated
    x = batch(shape, axis, seed=9)
    y_ref = keras_renorm_call(x, state, x, training=False, **opts)[0]
    np.testing.assert_allclose(as_numpy(layer(x, training=False)), y_ref, **F64)
    np.testing.assert_allclose(as_numpy(layer(x)), y_ref, **F64)
    assert_state(layer, state, F64)


def test_matches_keras3_renorm_layer_float32():
    """Keras 3's renorm layer is Keras 2's algorithm. Its torch backend computes the
    variance as E[x^2] - E[x]^2, which loses ~1e-5 (relative to the output's scale)
    on the channel with mean -3 and std 0.1, so the two layers agree to KERAS_TOL,
    and ours is checked against the float64 oracle on the same float32 data to F32."""
    shape = (8, 5, 5, 3)
    kw = dict(renorm=True, renorm_clipping=dict(CLIP), momentum=0.8, renorm_momentum=0.7,
              gamma_initializer="random_normal", beta_initializer="random_normal")
    theirs = keras.layers.BatchNormalization(**kw)
    ours = bk.BatchNormalization(**kw)
    theirs.build(shape)
    ours.build(shape)
    ours.set_weights(theirs.get_weights())
    assert [w.path.split("/")[-1] for w in theirs.weights] == NAMES
    assert [w.path.split("/")[-1] for w in ours.weights] == NAMES
    assert len(ours.trainable_weights) == 2
    state = weights(ours)
    for step in range(3):
        x = batch(shape, -1, seed=step).astype("float32")
        y = as_numpy(ours(x, training=True))
        y_ref, _, state, _, _ = keras_renorm_call(x, state, x, momentum=0.8,
                                                  renorm_momentum=0.7, clipping=CLIP)
        np.testing.assert_allclose(y, y_ref, **F32)
        assert_state(ours, state, F32)
        np.testing.assert_allclose(y, as_numpy(theirs(x, training=True)), **KERAS_TOL)
        for u, v, name in zip(theirs.get_weights(), ours.get_weights(), NAMES, strict=True):
            np.testing.assert_allclose(v, u, **KERAS_TOL, err_msg=name)
    np.testing.assert_allclose(as_numpy(ours(x, training=False)),
                               as_numpy(theirs(x, training=False)), **KERAS_TOL)


def test_model_trains_like_keras3_renorm():
    """A small classifier with renorm layers, fit on the same batches: losses and all weights."""
    def model(bn):
        keras.utils.set_random_seed(3)
        m = keras.Sequential([keras.Input((6,)), keras.layers.Dense(8), bn(),
                              keras.layers.Activation("relu"), keras.layers.Dense(3)])
        m.compile(optimizer=keras.optimizers.SGD(0.1),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        return m

    kw = dict(renorm=True, renorm_clipping={"rmax": 1.2, "dmax": 0.3}, renorm_momentum=0.9)
    theirs = model(lambda: keras.layers.BatchNormalization(**kw))
    ours = model(lambda: bk.BatchNormalization(**kw))
    ours.set_weights(theirs.get_weights())
    rng = np.random.default_rng(4)
    for _ in range(3):
        x = (rng.normal(size=(16, 6)) * 3 + 1).astype("float32")
        y = rng.integers(0, 3, size=16)
        np.testing.assert_allclose(ours.train_on_batch(x, y), theirs.train_on_batch(x, y),
                                   **KERAS_TOL)
        for u, v in zip(theirs.get_weights(), ours.get_weights(), strict=True):
            np.testing.assert_allclose(v, u, **KERAS_TOL)


def test_keras_rule_is_the_references_after_a_change_of_variables():
    """reference.renorm_forward_train clips r to [1/rmax, rmax] and reads sigma from
    running_var + eps: with rmin = 1/rmax and running_var = renorm_stddev**2 - eps
    it computes Keras's r, d and output."""
    shape, eps = (10, 3), 1e-3
    layer = bk.BatchNormalization(renorm=True, dtype="float64", epsilon=eps,
                                  renorm_clipping={"rmax": 2.0, "rmin": 0.5, "dmax": 0.5},
                                  gamma_initializer="random_normal")
    layer.build(shape)
    layer.renorm_stddev.assign(np.array([0.5, 2.0, 1.5]))
    layer.renorm_mean.assign(np.array([1.0, -1.0, 0.0]))
    state = weights(layer)
    x = batch(shape, -1, seed=5)
    y_ref, cache = reference.renorm_forward_train(
        x, state["gamma"], state["beta"], state["renorm_mean"],
        state["renorm_stddev"] ** 2 - eps, rmax=2.0, dmax=0.5, eps=eps)
    y_keras, _, _, r, d = keras_renorm_call(x, state, x, eps=eps,
                                            clipping=layer.renorm_clipping)
    np.testing.assert_allclose(cache["r"], r, **F64)
    np.testing.assert_allclose(cache["d"], d, **F64)
    np.testing.assert_allclose(as_numpy(layer(x, training=True)), y_ref, **F64)


def test_renorm_runs_through_our_functional(monkeypatch):
    import batchnorm.keras.layer as layer_module
    seen = []

    def spy(*args, **kwargs):
        seen.append((args[3], args[5]))  # weight, training
        return batchnorm.functional.batch_norm(*args, **kwargs)

    monkeypatch.setattr(layer_module, "batch_norm", spy)
    layer = bk.BatchNormalization(renorm=True, renorm_clipping={"rmax": 1.0, "rmin": 1.0})
    x = batch((8, 3), -1, seed=0).astype("float32")
    layer(x, training=True)
    layer(x, training=False)
    assert [training for _, training in seen] == [True, False]
    # rmin = rmax = 1 pins r: the weight handed to batch_norm is gamma * r = gamma
    np.testing.assert_allclose(seen[0][0].detach().numpy(), layer.gamma.numpy())


def test_fused_activation_applies_after_the_renorm_correction():
    shape = (8, 3)
    layer = bk.BatchNormalization(activation="relu", renorm=True, renorm_clipping=CLIP,
                                  dtype="float64", beta_initializer="random_normal")
    layer.build(shape)
    state = weights(layer)
    for step in range(2):
        x = batch(shape, -1, seed=step)
        dy = np.random.default_rng(step).normal(size=shape)
        y, grads = train_call(layer, x, dy)
        z = keras_renorm_call(x, state, dy, clipping=CLIP)[0]
        assert (z < 0).any() and (z > 0).any()
        # relu(renorm(x)); backward: the ReLU's mask on dy, then renorm's backward
        y_ref, g_ref, state, _, _ = keras_renorm_call(x, state, dy * (z > 0), clipping=CLIP)
        np.testing.assert_allclose(y, np.maximum(y_ref, 0.0), **F64)
        for name in ("x", "gamma", "beta"):
            np.testing.assert_allclose(grads[name], g_ref[name], **F64, err_msg=name)
        assert_state(layer, state, F64)


def test_trainable_false_is_inference_and_updates_nothing():
    layer = bk.BatchNormalization(renorm=True, renorm_clipping=CLIP)
    x = batch((8, 3), -1, seed=1).astype("float32")
    layer(x, training=True)
    layer.trainable = False
    before = layer.get_weights()
    np.testing.assert_allclose(as_numpy(layer(x, training=True)),
                               as_numpy(layer(x, training=False)), rtol=1e-6, atol=1e-7)
    for u, v in zip(before, layer.get_weights(), strict=True):
        np.testing.assert_array_equal(u, v)


def test_config_round_trip_and_keras_config_loads():
    clip = {"rmax": float("inf"), "dmax": 2.0}
    layer = bk.BatchNormalization(renorm=True, renorm_clipping=clip, renorm_momentum=0.9,
                                  virtual_batch_size=4, name="rn")
    config = layer.get_config()
    assert (config["renorm"], config["renorm_clipping"], config["renorm_momentum"]) == (
        True, clip, 0.9)
    clone = bk.BatchNormalization.from_config(config)
    assert clone.get_config() == config
    assert bk.BatchNormalization().get_config()["renorm"] is False
    # Keras's own renorm config loads into ours (it also has `synchronized`, which ours lacks)
    theirs = keras.layers.BatchNormalization(renorm=True, renorm_clipping=dict(CLIP),
                                             renorm_momentum=0.8).get_config()
    theirs.pop("synchronized")
    loaded = bk.BatchNormalization.from_config(theirs)
    assert (loaded.renorm, loaded.renorm_clipping, loaded.renorm_momentum) == (True, CLIP, 0.8)


def test_save_and_load_keras_file(tmp_path):
    def model():
        return keras.Sequential([keras.Input((5,)), keras.layers.Dense(3),
                                 bk.BatchNormalization(renorm=True,
                                                       renorm_clipping={"rmax": 1.5,
                                                                        "dmax": float("inf")},
                                                       renorm_momentum=0.5)])
    ours = model()
    x = batch((8, 3), -1, seed=2)[:, [0, 1, 2, 0, 1]].astype("float32")
    ours(x, training=True)
    ours(x * 2, training=True)
    path = tmp_path / "renorm.keras"
    ours.save(path)
    loaded = keras.saving.load_model(path)
    a, b = ours.layers[1], loaded.layers[1]
    assert isinstance(b, bk.BatchNormalization)
    assert (b.renorm, b.renorm_clipping, b.renorm_momentum) == (True, a.renorm_clipping, 0.5)
    assert [w.path.split("/")[-1] for w in b.weights] == NAMES
    for u, v in zip(ours.get_weights(), loaded.get_weights(), strict=True):
        np.testing.assert_array_equal(u, v)
    # same inference, and the next training step moves both the same way
    for training in (False, True):
        np.testing.assert_allclose(as_numpy(loaded(x, training=training)),
                                   as_numpy(ours(x, training=training)), rtol=1e-6, atol=1e-6)
    for u, v in zip(ours.get_weights(), loaded.get_weights(), strict=True):
        np.testing.assert_allclose(u, v, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(renorm_clipping={"rmax": 3.0, "max": 1.0}), ValueError, "renorm_clipping.*'max'"),
    (dict(renorm_clipping={"rmax": 0.5}), ValueError, "renorm_clipping.*rmax >= 1"),
    (dict(renorm_clipping={"rmin": 1.5}), ValueError, "renorm_clipping.*rmin <= 1"),
    (dict(renorm_clipping={"rmin": -0.1}), ValueError, "renorm_clipping.*0 <= rmin"),
    (dict(renorm_clipping={"dmax": -1.0}), ValueError, "renorm_clipping.*dmax >= 0"),
    (dict(renorm_clipping={"dmax": float("nan")}), ValueError, "renorm_clipping.*dmax"),
    (dict(renorm_clipping={"rmax": torch.tensor(3.0)}), TypeError, r"renorm_clipping\['rmax'\]"),
    (dict(renorm_clipping={"rmax": True}), TypeError, r"renorm_clipping\['rmax'\]"),
    (dict(renorm_clipping=[("rmax", 3.0)]), TypeError, "renorm_clipping"),
    (dict(renorm_momentum=1.0), ValueError, "renorm_momentum"),
    (dict(renorm_momentum=-0.5), ValueError, "renorm_momentum"),
])
def test_bad_arguments_get_keras_style_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        bk.BatchNormalization(renorm=True, **kwargs)


def test_failed_calls_and_assignments_change_nothing():
    layer = bk.BatchNormalization(renorm=True, renorm_clipping=CLIP)
    x = batch((8, 3), -1, seed=3).astype("float32")
    layer(x, training=True)
    before = layer.get_weights()
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        layer(x[:1], training=True)  # one value per channel in training
    with pytest.raises(ValueError, match="rmax >= 1"):
        layer.renorm_clipping = {"rmax": 0.9}
    assert layer.renorm_clipping == CLIP
    for u, v in zip(before, layer.get_weights(), strict=True):
        np.testing.assert_array_equal(u, v)
    # a valid new dict (a schedule's next step) takes effect on the next call
    layer.renorm_clipping = {"rmax": 1.0, "rmin": 1.0, "dmax": 0.0}
    plain = bk.BatchNormalization()
    plain.build(x.shape)
    plain.set_weights(layer.get_weights()[:4])
    np.testing.assert_allclose(as_numpy(layer(x, training=True)),
                               as_numpy(plain(x, training=True)), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("renorm", [False, True])
def test_empty_batch_updates_nothing(renorm):
    layer = bk.BatchNormalization(renorm=renorm)
    layer.build((None, 3))
    before = layer.get_weights()
    out = layer(np.zeros((0, 3), "float32"), training=True)
    assert tuple(out.shape) == (0, 3)
    for u, v in zip(before, layer.get_weights(), strict=True):
        np.testing.assert_array_equal(u, v)


def test_converters_rebuild_renorm_weights():
    layer = bk.BatchNormalization(renorm=True, renorm_clipping=CLIP, momentum=0.5,
                                  epsilon=1e-3)
    x = batch((8, 3), -1, seed=4).astype("float32")
    layer(x, training=True)
    # to torch: the inference statistics, so eval outputs agree
    module = batchnorm.BatchNorm1d(3, eps=layer.epsilon, momentum=0.5).eval()
    module.load_state_dict(bk.keras_to_torch_state(layer))
    np.testing.assert_allclose(module(torch.from_numpy(x)).detach().numpy(),
                               as_numpy(layer(x, training=False)), rtol=1e-5, atol=1e-6)
    # back: moving_stddev and renorm_stddev are sqrt(variance + epsilon), renorm_mean the mean
    back = bk.torch_to_keras_weights(module.state_dict(), renorm=True, epsilon=layer.epsilon)
    fresh = bk.BatchNormalization(renorm=True, epsilon=layer.epsilon)
    fresh.build(x.shape)
    fresh.set_weights(back)
    got = weights(fresh)
    state = weights(layer)
    np.testing.assert_allclose(got["moving_stddev"], state["moving_stddev"], rtol=1e-6)
    np.testing.assert_allclose(got["renorm_stddev"], got["moving_stddev"], rtol=0)
    np.testing.assert_allclose(got["renorm_mean"], state["moving_mean"], rtol=0)
    with pytest.raises(ValueError, match="epsilon"):
        bk.torch_to_keras_weights(module.state_dict(), renorm=True, epsilon=0.0)
