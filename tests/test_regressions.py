"Regression tests for bugs found by the property tests (each failed before its fix)."
import numpy as np
import keras
from keras import layers

from cnnmodules.modules import Module, ModuleSet
from cnnmodules.graph import graph_of
from cnnmodules.modularize import channel_head
from cnnmodules.jaccard import jaccard_positional


def test_to_keras_keeps_float64():
    "A float64 parent's module exports to a float64 Keras model that equals the batched composition exactly."
    F = dict(dtype='float64'); keras.utils.set_random_seed(0)
    inp = keras.Input((6, 6, 1), **F)
    h = layers.Conv2D(4, 3, activation='relu', **F)(inp); h = layers.Conv2D(4, 3, activation='relu', **F)(h)
    m = keras.Model(inp, layers.Dense(3, activation='softmax', **F)(layers.Flatten(**F)(h)))
    g = graph_of(m); W, b = m.layers[-1].get_weights(); hk, hb = channel_head(W, b, [0])
    rng = np.random.default_rng(0)
    mod = Module(0, '0', [rng.random(s) < .7 for s in g.node_shapes], hk[0], hb[0], np.ones(len(W), bool), m)
    x = rng.normal(size=(16, 6, 6, 1))
    km = mod.to_keras()
    assert {l.dtype_policy.name for l in km.layers if l.weights} == {'float64'}
    out = np.asarray(km(x))
    assert out.dtype == np.float64
    pc, pu = ModuleSet([mod]).predict(x)
    np.testing.assert_allclose(out[:, 0], pc[:, 0], rtol=0, atol=1e-12)


def test_jaccard_dense_after_flatten_of_conv():
    "Dense weights read from removed conv nodes through a Flatten are not counted as kept."
    keras.utils.set_random_seed(0)
    inp = keras.Input((4, 4, 1))
    h = layers.Conv2D(2, 3, activation='relu', name='conv')(inp)                 # 2x2x2 = 8 nodes
    h = layers.Dense(3, activation='relu', name='hidden')(layers.Flatten()(h))   # 8*3 + 3 weights
    m = keras.Model(inp, layers.Dense(2, activation='softmax')(h))
    g = graph_of(m); hk, hb = channel_head(*m.layers[-1].get_weights(), [0])
    masks = [np.zeros(g.node_shapes[0], bool), np.ones(g.node_shapes[1], bool)]   # every conv node removed
    mod = Module(0, '0', masks, hk[0], hb[0], np.ones(3, bool), m)
    total = (3 * 3 * 1 * 2 + 2) + (8 * 3 + 3)
    assert jaccard_positional(mod) == 3 / total   # only the hidden layer's biases remain
