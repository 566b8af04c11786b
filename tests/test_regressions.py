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


# --- issue 14 §6: what a new user hit ---------------------------------------------------------------

def _digits_cnn(activation='softmax'):
    "An untrained small CNN on the digits' shape (the checks and the equalities below need no training)."
    from cnnmodules.models import small_cnn
    keras.utils.set_random_seed(0)
    m = small_cnn(10)
    if activation == 'softmax': return m
    out = layers.Dense(10, activation=activation, name='logits')
    twin = keras.Model(m.inputs, out(m.layers[-2].output))
    out.set_weights(m.layers[-1].get_weights())
    return m, twin


def test_logits_output_decomposes_like_softmax():
    "A plain-logits output Dense is accepted (02_graph's decision) and gives the modules its softmax twin gives."
    from cnnmodules.decompose import decompose
    from cnnmodules.data import load_dataset
    d = load_dataset('digits')
    soft, logits = _digits_cnn('linear')
    assert logits.layers[-1].activation.__name__ == 'linear'
    a = decompose(soft, d.x_train, d.y_train, n_concerned=20, progress=False)
    b = decompose(logits, d.x_train, d.y_train, n_concerned=20, progress=False)
    assert sum(int((~m).sum()) for u in a for m in u.masks) > 0    # the decomposition removed something to compare
    for u, v in zip(a, b):
        for p, q in zip(u.masks, v.masks): np.testing.assert_array_equal(p, q)
        np.testing.assert_array_equal(u.head_kernel, v.head_kernel); np.testing.assert_array_equal(u.head_keep, v.head_keep)
    ra, rb = a.evaluate(d.x_test, d.y_test, jaccard=False), b.evaluate(d.x_test, d.y_test, jaccard=False)
    assert (ra['top1'], ra['top5']) == (rb['top1'], rb['top5'])


def test_decompose_takes_a_keras_file(tmp_path):
    "decompose('model.keras', x, y) reads the file (str or Path) and gives the modules of the model in it; a bad path is one DecompositionError."
    import pytest
    from cnnmodules.decompose import decompose
    from cnnmodules.graph import DecompositionError
    from cnnmodules.data import load_dataset
    d = load_dataset('digits')
    m = _digits_cnn(); m.save(tmp_path / 'model.keras')
    ref = decompose(m, d.x_train, d.y_train, n_concerned=20, progress=False)
    for p in (str(tmp_path / 'model.keras'), tmp_path / 'model.keras'):
        ms = decompose(p, d.x_train, d.y_train, n_concerned=20, progress=False)
        assert ms[0].provenance['parent_hash'] == ref[0].provenance['parent_hash']
        for u, v in zip(ref, ms):
            for a, b in zip(u.masks, v.masks): np.testing.assert_array_equal(a, b)
    (tmp_path / 'junk.keras').write_text('not a model')
    for p, msg in [(tmp_path / 'missing.keras', 'no file'), (tmp_path / 'junk.keras', 'cannot read'),
                   (tmp_path, 'not a Keras model file'), (tmp_path / 'model.txt', 'not a Keras model file'), (42, 'Keras model or the path')]:
        with pytest.raises(DecompositionError, match=msg) as e: decompose(p, d.x_train, d.y_train, progress=False)
        assert str(e.value).startswith('model')


def _small_set():
    keras.utils.set_random_seed(0)
    inp = keras.Input((6, 6, 1))
    h = layers.Flatten()(layers.Conv2D(2, 3, activation='relu', name='c')(inp))
    m = keras.Model(inp, layers.Dense(3, activation='softmax')(h))
    g = graph_of(m); hk, hb = channel_head(*m.layers[-1].get_weights(), range(3))
    rng = np.random.default_rng(0)
    return ModuleSet([Module(c, f'class {c}', [rng.random(s) < .5 for s in g.node_shapes], hk[c], hb[c],
                             rng.random(hk.shape[1]) < .8, m, {'note': c}) for c in range(3)], name='tiny')


def _same_set(a, b):
    assert (a.name, a.class_names, len(a)) == (b.name, b.class_names, len(b))
    for u, v in zip(a, b):
        assert u.class_index == v.class_index and u.provenance == v.provenance
        for p, q in zip(u.masks, v.masks): np.testing.assert_array_equal(p, q)
        for p, q in [(u.head_kernel, v.head_kernel), (u.head_bias, v.head_bias), (u.head_keep, v.head_keep)]: np.testing.assert_array_equal(p, q)
        for p, q in zip(u.parent.get_weights(), v.parent.get_weights()): np.testing.assert_array_equal(p, q)


def test_flipped_bits_load_or_raise_decomposition_error(tmp_path):
    "One flipped bit anywhere in a .cnnm's zip central directory (every byte), or at 40 seeded positions across the file: load gives the same set or one DecompositionError naming the file (before: RuntimeError, NotImplementedError...)."
    import struct
    from cnnmodules.graph import DecompositionError
    ms = _small_set()
    good = ms.save(tmp_path / 'set.cnnm').read_bytes()
    eocd = good.rindex(b'PK\x05\x06')
    cd_size, cd_start = struct.unpack('<II', good[eocd + 12:eocd + 20])
    assert cd_start + cd_size == eocd and cd_size > 100
    positions = list(range(cd_start, len(good)))                                   # the central directory and its end record
    positions += sorted(np.random.default_rng(14).choice(cd_start, 40, replace=False).tolist())   # and the rest of the file
    outcomes = {'loaded': 0, 'refused': 0}
    for i, pos in enumerate(positions):
        data = bytearray(good); data[pos] ^= 1 << (i % 8)
        f = tmp_path / f'flip_{pos}.cnnm'; f.write_bytes(bytes(data))
        try: back = ModuleSet.load(f)
        except DecompositionError as e:
            assert str(f) in str(e), str(e); outcomes['refused'] += 1
        except Exception as e:
            raise AssertionError(f'byte {pos} bit {i % 8}: {type(e).__name__}: {e}') from e
        else:
            _same_set(ms, back); outcomes['loaded'] += 1
        f.unlink()
    assert outcomes['refused'] > 0 and outcomes['loaded'] > 0, outcomes   # both branches ran: the flips were real


NOISE_SCRIPT = r'''
import tempfile
from pathlib import Path
import keras
from cnnmodules.data import load_dataset
from cnnmodules.models import small_cnn, train
from cnnmodules.decompose import decompose
from cnnmodules.modules import ModuleSet
d = load_dataset('digits')
keras.utils.set_random_seed(0)
m = small_cnn(d.num_classes, d.input_shape)
train(m, d, epochs=1, verbose=0)
t = Path(tempfile.mkdtemp())
for i, E in enumerate((10, 20, 30)):
    decompose(m, d.x_train, d.y_train, n_concerned=E, progress=False).save(t / f'set{i}.cnnm')
for mode in ('exact', 'full', 'fused', 'candidates'):
    for i in range(3):
        ModuleSet.load(t / f'set{i}.cnnm').evaluate(d.x_test[:40], d.y_test[:40], mode=mode)
print('finished')
'''

def test_training_and_loading_sets_print_no_tensorflow_noise():
    "Training a small model, then loading 3 module sets and evaluating each in every mode, prints no NodeDef line and no retracing warning (issue 14 §6.6)."
    import os, subprocess, sys
    from pathlib import Path
    env = {**os.environ, 'PYTHONPATH': str(Path(__file__).resolve().parents[1]), 'TF_CPP_MIN_LOG_LEVEL': '2'}
    r = subprocess.run([sys.executable, '-c', NOISE_SCRIPT], capture_output=True, text=True, env=env, timeout=600)
    out = r.stdout + r.stderr
    assert r.returncode == 0 and 'finished' in r.stdout, out[-3000:]
    assert 'NodeDef' not in out, out[-3000:]
    assert 'retracing' not in out, out[-3000:]
