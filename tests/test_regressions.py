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


def _seq_and_functional():
    keras.utils.set_random_seed(0)
    seq = keras.Sequential([keras.Input((8, 8, 1)), layers.Rescaling(1 / 255), layers.Conv2D(4, 3, activation='relu'),
                            layers.Conv2D(4, 3), layers.ReLU(), layers.Flatten(), layers.Dense(3, activation='softmax')])
    inp = keras.Input((8, 8, 1))
    h = layers.Conv2D(4, 3, padding='same', activation='relu')(layers.Rescaling(1 / 255)(inp))
    h = layers.ReLU()(layers.Add()([h, layers.Conv2D(4, 3, padding='same')(h)]))
    fun = keras.Model(inp, layers.Dense(3, activation='softmax')(layers.Flatten()(h)))
    return {'sequential': seq, 'functional': fun}


def test_saved_model_decomposes_and_round_trips(tmp_path):
    "A model read back from .keras (a Sequential records extra layer calls then) decomposes; its module set saves and loads with the same scores (issue 6, 1c)."
    from cnnmodules.decompose import decompose
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (60, 8, 8, 1)).astype('uint8'); y = np.arange(60) % 3
    for kind, m in _seq_and_functional().items():
        m.save(tmp_path / f'{kind}.keras')
        back = keras.saving.load_model(tmp_path / f'{kind}.keras')
        ms = decompose(back, x, y, n_concerned=10, progress=False)
        again = ModuleSet.load(ms.save(tmp_path / f'{kind}.cnnm'))
        ms2 = decompose(again.parents()[0], x, y, n_concerned=10, progress=False)
        final = ModuleSet.load(ms2.save(tmp_path / f'{kind}2.cnnm'))
        for a, b in zip(ms.predict(x), final.predict(x)): np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
        for u, v in zip(ms, final):
            for p, q in zip(u.masks, v.masks): np.testing.assert_array_equal(p, q)
        np.testing.assert_array_equal(np.asarray(back(x)).argmax(1), np.asarray(m(x)).argmax(1))


def test_kept_ci_follows_min_rate():
    "The provenance's CI-only node count is the CI-only decomposition's own count at the same min_rate (it ignored min_rate)."
    from cnnmodules.decompose import decompose
    m = _seq_and_functional()['functional']
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, (90, 8, 8, 1)).astype('uint8'); y = np.arange(90) % 3
    for rate in (0.0, 0.3):
        full = decompose(m, x, y, n_concerned=20, min_rate=rate, steps=('ci', 'ti', 'mc'), progress=False)
        ci = decompose(m, x, y, n_concerned=20, min_rate=rate, steps=('ci', 'mc'), progress=False)
        assert [u.provenance['kept_ci'] for u in full] == [int(sum(k.sum() for k in v.masks)) for v in ci]
