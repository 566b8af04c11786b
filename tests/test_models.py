"Model side of the input contract, top-5 on logits, and deterministic training (issue 6, items 1c, 2 and 6)."
import numpy as np
import pytest
import keras
from keras import layers

from cnnmodules.data import Dataset, load_dataset, sample_per_class
from cnnmodules.graph import model_input
from cnnmodules.models import evaluate, model_logits, resnet_v1, small_cnn, topk_accuracy, train


@pytest.fixture(scope='module')
def digits():
    return load_dataset('digits')


# --- inputs reach the model as given ---------------------------------------------------------------

def test_model_input_only_casts():
    "uint8 pixels keep their values (0..255); the dtype is the model's."
    x = np.array([[0, 51, 255]], np.uint8)
    got = model_input(x, 'float32')
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, np.array([[0., 51., 255.]], np.float32))
    assert model_input(np.array([-1.5, 300.0]), 'float64').dtype == np.float64
    np.testing.assert_array_equal(model_input(np.array([-1.5, 300.0]), 'float64'), [-1.5, 300.0])


def test_model_input_rejects_non_numeric():
    with pytest.raises(ValueError, match='x'):
        model_input(np.array(['a', 'b']))


@pytest.mark.parametrize('build', [lambda: small_cnn(10), lambda: resnet_v1(8, 10, input_shape=(16, 16, 3))])
def test_builders_rescale_inside(build):
    "The builders start with Rescaling(1/255) right after the input: uint8 pixels in, [0, 1] to the first convolution."
    m = build()
    first = m.layers[1]
    assert isinstance(first, layers.Rescaling) and first.name == 'rescale'
    assert first.scale == pytest.approx(1 / 255) and first.offset == 0
    x = np.random.default_rng(0).integers(0, 256, size=(3,) + tuple(m.input_shape[1:])).astype(np.uint8)
    after = keras.Model(m.inputs, first.output)(x.astype('float32'))
    np.testing.assert_allclose(np.asarray(after), x / 255.0, rtol=1e-6)
    # the model on uint8 arrays equals the model on the same values as floats (a cast, no division)
    np.testing.assert_array_equal(m.predict(model_input(x), verbose=0), m.predict(x.astype('float32'), verbose=0))


class Spy(layers.Layer):
    "Identity that records the largest input value it saw while training."
    def build(self, shape): self.seen = self.add_weight(shape=(), initializer='zeros', trainable=False, name='seen')
    def call(self, x, training=False):
        if training: self.seen.assign(keras.ops.maximum(self.seen, keras.ops.max(x)))
        return x


def test_train_feeds_pixels_as_given(digits):
    "`train` casts the loader's uint8 images and does not divide them: the model's first layer sees 255."
    assert digits.x_train.dtype == np.uint8 and digits.x_train.max() == 255
    keras.utils.set_random_seed(0)
    inp = keras.Input(digits.input_shape); spy = Spy()
    h = layers.Rescaling(1 / 255)(spy(inp))
    m = keras.Model(inp, layers.Dense(10, activation='softmax')(layers.Flatten()(h)))
    small = Dataset(digits.x_train[:256], digits.y_train[:256], digits.x_test, digits.y_test, digits.class_names, 'd')
    train(m, small, epochs=1, augment=False, verbose=0)
    assert float(spy.seen.numpy()) == 255.0


def test_evaluate_casts_only(digits):
    "evaluate's top-1 equals the argmax of the model on the uint8 values as floats."
    keras.utils.set_random_seed(0)
    m = small_cnn(10, digits.input_shape)
    p = m.predict(digits.x_test.astype('float32'), verbose=0)
    assert evaluate(m, digits.x_test, digits.y_test)['top1'] == np.mean(p.argmax(1) == digits.y_test)


# --- top-5 on logits ------------------------------------------------------------------------------

def _saturating_rows(n=90):
    "Rows of logits: class 0 at 300, the label at 150 (second), the others 0..7: float32 softmax is exactly one-hot."
    rng = np.random.default_rng(0)
    y = np.tile(np.arange(1, 10), n // 9)
    z = np.zeros((len(y), 10), np.float32)
    for i, c in enumerate(y):
        others = [j for j in range(1, 10) if j != c]
        z[i, others] = rng.permutation(8)
        z[i, c], z[i, 0] = 150, 300
    return z, y


def _head_models():
    "The same affine head (x @ W + b, W = 2·I, b = -1) as three kinds of output."
    W, b = 2 * np.eye(10, dtype='float32'), -np.ones(10, 'float32')
    inp = keras.Input((10,))
    fused = keras.Model(inp, layers.Dense(10, activation='softmax', name='head')(inp))
    d = layers.Dense(10, name='head')
    split = keras.Model(inp, layers.Activation('softmax')(d(inp)))
    seq = keras.Sequential([keras.Input((10,)), layers.Dense(10, activation='softmax', name='head')])
    for m in (fused, split, seq): m.get_layer('head').set_weights([W, b])
    return (fused, split, seq), W, b


def test_model_logits_is_the_pre_softmax():
    (fused, split, seq), W, b = _head_models()
    x = np.random.default_rng(1).normal(size=(7, 10)).astype('float32')
    want = x.astype('float64') @ W + b
    for m in (fused, split, seq):
        np.testing.assert_allclose(model_logits(m, x, batch_size=3), want, rtol=1e-6, atol=1e-6)
    lin = keras.Model(fused.input, layers.Dense(10, name='lin')(fused.input))   # a model that outputs logits already
    np.testing.assert_allclose(model_logits(lin, x), lin.predict(x, verbose=0), rtol=0, atol=0)


def test_top5_ranks_logits_when_softmax_saturates():
    "Softmax one-hot in float32: ranking probabilities ties nine classes; the logits rank the label second."
    z, y = _saturating_rows()
    (fused, split, seq), W, b = _head_models()
    x = (z + 1) / 2                                            # so that x @ W + b == z
    p = fused.predict(x, verbose=0)
    assert (p == 0).sum(1).min() == 9                          # saturated: nine exact zeros per row
    assert topk_accuracy(p, y, 5) < 0.5                        # ranking probabilities misses most labels
    for m in (fused, split, seq):
        res = evaluate(m, x, y)
        assert res['top5'] == 1.0 and res['top1'] == 0.0


# --- same seed, same model -------------------------------------------------------------------------

def _fit(data, seed, init):
    m = small_cnn(10, data.input_shape); m.set_weights(init)
    train(m, data, epochs=2, batch_size=32, seed=seed, verbose=0)
    return m.get_weights()


def test_train_is_deterministic(digits):
    "Same seed → bit-identical weights; another seed → different weights (same initial weights)."
    xs, ys = sample_per_class(digits.x_train, digits.y_train, 30, seed=0)
    data = Dataset(xs, ys, digits.x_test, digits.y_test, digits.class_names, 'digits-300')
    keras.utils.set_random_seed(0)
    init = small_cnn(10, data.input_shape).get_weights()
    a, b, c = _fit(data, 0, init), _fit(data, 0, init), _fit(data, 1, init)
    assert all(np.array_equal(u, v) for u, v in zip(a, b))
    assert not all(np.array_equal(u, v) for u, v in zip(a, c))
    from tensorflow.python.framework import config as tfc
    assert not tfc.is_op_determinism_enabled()   # train restores the process-wide setting
