"""Reuse as a small model (issue 17, `nbs/12_compact.ipynb` and `nbs/experiments/small_reuse.ipynb`).

Expectations come from the composed vote of the same modules (`cnnmodules.compose.module_logits`, the batched
masked `forward` of 08 — another implementation than the exported Keras model), from Keras layer shapes counted
here, from plain Keras with numpy, or from scikit-learn — never from the code under test.

1. The subset model (`ModuleSet.to_keras(slim=True)`) gives each module's calibrated p_concerned, so its argmax
   is the composed vote, on random residual CNNs with random node, channel and all-kept masks that differ between
   the modules (the branched case) and with calibrations; `slim=False` gives the same; `exact=False` is the vote
   of the modules with the union of the set's masks.
2. It loads and predicts with Keras alone.
3. Its MACs (counted on the traced model) are the parent's for the parent (checked against layer shapes), and
   less than the parent's, with fewer parameters, when the masks are small.
4. Gates at budget 1.0 are the unpruned union; at a smaller budget the exported model fits it, the weights are
   untouched, the gates are whole channels tied through Add, and the held-out best point is the one returned.
5. The papermill run of the frontier notebook at its CI defaults.
"""
import dataclasses, json, os, subprocess, sys

import numpy as np
import pytest
import keras
from keras import layers
from hypothesis import given, strategies as st

from cnn_strategies import cnn_specs, build, props
from conftest import DATA, TRAINED_PARENT as PARENT, needs_data, require_file, run_experiment

from cnnmodules.graph import graph_of, DecompositionError
from cnnmodules.modules import Module, ModuleSet
from cnnmodules.modularize import channel_head
from cnnmodules.compose import module_logits, vote_margin, calibration_record, calibration_of
from cnnmodules.decompose import decompose
from cnnmodules.compact import channel_spaces, model_macs, model_sizes, learn_subset_gates, reengineer_subset, _space_nodes

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning")


def sigmoid(z): return 1 / (1 + np.exp(-z))


def random_masks(g, rng, p_keep):
    "Per node layer: random node masks, whole-channel masks or all kept, in turn."
    out = []
    for i, s in enumerate(g.node_shapes):
        if i % 3 == 0: out.append(rng.random(s) < p_keep)
        elif i % 3 == 1: out.append(np.broadcast_to(rng.random(s[-1]) < p_keep, s).copy())
        else: out.append(np.ones(s, bool))
    return out


def random_set(m, rng, classes, p_keep=0.7, calibrate=False):
    g = graph_of(m)
    hk, hb = channel_head(*g.head.layer.get_weights()[:2], classes)
    mods = []
    for i, c in enumerate(classes):
        mod = Module(c, str(c), random_masks(g, rng, p_keep), hk[i], hb[i], rng.random(hk.shape[1]) < .9, m)
        if calibrate: mod.calibration = calibration_record(mod, float(rng.uniform(0.3, 3)), float(rng.normal()))   # fitted for this head
        mods.append(mod)
    return ModuleSet(mods)


# ---------------------------------------------------------------- 1. the subset model is the composed vote

@props(8)
@given(st.data())
def test_subset_model_is_the_composed_vote(data):
    spec = data.draw(cnn_specs(residual=True), label='spec')
    m = build(spec)
    N = m.output_shape[-1]
    k = data.draw(st.integers(1, N), label='k')
    classes = data.draw(st.permutations(range(N)), label='order')[:k]
    calibrate = data.draw(st.booleans(), label='calibrate')
    rng = np.random.default_rng(spec['seed'])
    ms = random_set(m, rng, classes, calibrate=calibrate)
    x = rng.normal(size=(64,) + tuple(spec['shape']))
    z = module_logits(ms, x)
    a = np.array([(mod.calibration or {'a': 1.0})['a'] for mod in ms])
    b = np.array([(mod.calibration or {'b': 0.0})['b'] for mod in ms])
    cal = a * (z[..., 0] - z[..., 1]) + b
    for slim in (True, False):
        p = np.asarray(ms.to_keras(slim=slim)(x))
        assert p.shape == (64, k)
        np.testing.assert_allclose(p, sigmoid(cal), atol=1e-9)
        np.testing.assert_array_equal(p.argmax(1), cal.argmax(1))
        np.testing.assert_allclose(np.asarray(ms.to_keras(slim=slim, output='logit')(x)), cal, atol=1e-8)
    if not calibrate:   # the library's voting rule itself
        np.testing.assert_array_equal(np.asarray(ms.to_keras(slim=True)(x)).argmax(1), vote_margin(z[..., 0] - z[..., 1]))


def test_union_model_is_the_vote_of_the_union_masks():
    m = build_fixed()
    rng = np.random.default_rng(1)
    ms = random_set(m, rng, [0, 2, 1])
    union = [np.logical_or.reduce([mod.masks[j] for mod in ms]) for j in range(len(ms[0].masks))]
    ums = ModuleSet([dataclasses.replace(mod, masks=[u.copy() for u in union]) for mod in ms])
    x = rng.normal(size=(50, 8, 8, 2))
    z = module_logits(ums, x)
    p = np.asarray(ms.to_keras(slim=True, exact=False)(x))
    np.testing.assert_allclose(p, sigmoid(z[..., 0] - z[..., 1]), atol=1e-9)
    # and the union differs from the exact set here: the masks did differ
    assert np.abs(np.asarray(ms.to_keras(slim=True)(x)) - p).max() > 1e-6


def build_fixed(dtype='float64'):
    "A residual CNN with BatchNormalization, a projection block, max pooling, Flatten and a hidden Dense."
    keras.utils.set_random_seed(5)
    D = dict(dtype=dtype)
    inp = keras.Input((8, 8, 2), **D)
    a = layers.Conv2D(6, 3, padding='same', activation='relu', name='a', **D)(inp)
    h = layers.ReLU(name='b_relu', **D)(layers.BatchNormalization(name='b_bn', **D)(layers.Conv2D(6, 3, padding='same', name='b', **D)(a)))
    h = layers.Conv2D(6, 3, padding='same', name='c', **D)(h)
    x = layers.ReLU(name='r1', **D)(layers.Add(name='add1', **D)([a, h]))
    h = layers.Conv2D(8, 3, strides=2, padding='same', activation='relu', name='d', **D)(x)
    h = layers.Conv2D(8, 3, padding='same', name='e', **D)(h)
    p = layers.Conv2D(8, 1, strides=2, name='proj', **D)(x)
    x = layers.ReLU(name='r2', **D)(layers.Add(name='add2', **D)([h, p]))
    x = layers.Flatten(**D)(layers.MaxPooling2D(2, **D)(x))
    x = layers.Dense(10, activation='relu', name='fc', **D)(x)
    m = keras.Model(inp, layers.Dense(4, activation='softmax', name='out', **D)(x))
    bn = m.get_layer('b_bn')
    bn.set_weights([w + np.random.default_rng(0).uniform(.2, .8, w.shape) for w in bn.get_weights()])
    return m


def test_sets_of_several_parents_are_refused():
    m1, m2 = build_fixed(), build_fixed()
    rng = np.random.default_rng(0)
    ms = random_set(m1, rng, [0]) + random_set(m2, rng, [1])
    with pytest.raises(DecompositionError, match='one parent'): ms.to_keras(slim=True)
    with pytest.raises(DecompositionError, match="'p' or 'logit'"): random_set(m1, rng, [0]).to_keras(output='probs')


# ---------------------------------------------------------------- 2. Keras alone

def test_subset_model_opens_with_keras_alone(tmp_path):
    m = build_fixed('float32')
    rng = np.random.default_rng(2)
    ms = random_set(m, rng, [3, 1, 0], p_keep=0.6, calibrate=True)
    km = ms.to_keras(slim=True)
    km.save(tmp_path / 'subset.keras')
    x = rng.normal(size=(20, 8, 8, 2)).astype('float32')
    np.save(tmp_path / 'x.npy', x)
    code = ("import sys; sys.modules['cnnmodules'] = None\nimport numpy as np, keras\n"
            "np.save('p.npy', keras.saving.load_model('subset.keras').predict(np.load('x.npy'), verbose=0))")
    r = subprocess.run([sys.executable, '-c', code], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                       env={**os.environ, 'PYTHONPATH': '', 'TF_CPP_MIN_LOG_LEVEL': '3'})
    assert r.returncode == 0, r.stderr[-3000:]
    z = module_logits(ms, x)
    cal = np.array([mod.calibration['a'] for mod in ms]) * (z[..., 0] - z[..., 1]) + np.array([mod.calibration['b'] for mod in ms])
    np.testing.assert_allclose(np.load(tmp_path / 'p.npy'), sigmoid(cal), atol=1e-5)


# ---------------------------------------------------------------- 3. sizes

def macs_by_hand(model):
    "Conv2D and Dense multiply-accumulates of one input, from the layers' kernels and output shapes."
    t = 0
    for l in model.layers:
        if isinstance(l, layers.Conv2D): t += int(np.prod(l.output.shape[1:3])) * int(np.prod(l.kernel.shape))
        elif isinstance(l, layers.Dense): t += int(np.prod(l.kernel.shape))
    return t


def test_macs_of_the_parent_and_of_small_subset_models(tmp_path):
    m = build_fixed('float32')
    assert model_macs(m) == macs_by_hand(m)
    g = graph_of(m)
    hk, hb = channel_head(*g.head.layer.get_weights()[:2], [0, 1])
    def few(seed):   # whole channels, about a quarter of each layer's, the same along each residual stream
        r = np.random.default_rng(seed); sp = channel_spaces(g); keep = {}
        out = []
        for op, s in zip(g.node_ops, g.node_shapes):
            if sp[op.idx] not in keep: keep[sp[op.idx]] = r.random(s[-1]) < .25; keep[sp[op.idx]][r.integers(s[-1])] = True
            out.append(np.broadcast_to(keep[sp[op.idx]], s).copy())
        return out
    ms = ModuleSet([Module(c, str(c), few(c), hk[i], hb[i], np.ones(hk.shape[1], bool), m) for i, c in enumerate([0, 1])])
    km = ms.to_keras(slim=True)
    assert model_macs(km) < model_macs(m) and km.count_params() < m.count_params()
    # the masks differ from the first layer on: exactness carries the batch once per module over the union's channels
    one = ms.to_keras(slim=True, exact=False)
    assert model_macs(one) < model_macs(km) <= 2 * model_macs(one)
    assert max(model_macs(mod.to_keras(slim=True)) for mod in ms) <= model_macs(one)
    s = model_sizes(km, repeats=3, path=tmp_path / 'km.keras')
    assert s['file_bytes'] == (tmp_path / 'km.keras').stat().st_size and s['params'] == km.count_params()
    assert s['macs'] == model_macs(km) and s['latency_ms'] > 0


# ---------------------------------------------------------------- 4. gates

@pytest.fixture(scope='module')
def decomposed():
    m = build_fixed()
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(4), 40); x = rng.normal(size=(160, 8, 8, 2))
    for c in range(4): x[y == c, 2 * c:2 * c + 2] = 0
    ms = decompose(m, x, y, n_concerned=8, progress=False, granularity='channel', min_rate=0.2)
    return m, x, y, ms


def test_gates_at_budget_one_are_the_unpruned_union(decomposed):
    m, x, y, ms = decomposed
    sub = ms[[0, 2]]
    masks, info = learn_subset_gates(sub, x, y, budget=1.0)
    union = [np.logical_or.reduce([mod.masks[j] for mod in sub]) for j in range(len(sub[0].masks))]
    for a, b in zip(masks, union): np.testing.assert_array_equal(a, b)
    r = reengineer_subset(sub, x, y, budget=1.0, refit_head=False)
    ums = ModuleSet([dataclasses.replace(mod, masks=[u.copy() for u in union]) for mod in sub])
    z = module_logits(ums, x)
    a, b = np.array([calibration_of(mod) for mod in ums]).T            # decompose fitted them; the union keeps the heads
    np.testing.assert_allclose(np.asarray(r.to_keras(slim=True)(x)), sigmoid(a * (z[..., 0] - z[..., 1]) + b), atol=1e-9)


def test_gates_fit_the_budget_train_no_weight_and_tie_channels(decomposed):
    m, x, y, ms = decomposed
    sub = ms[[1, 2, 3]]
    before = [w.copy() for w in m.get_weights()]
    masks, info = learn_subset_gates(sub, x, y, budget=0.3, steps=40, eval_every=10, batch_size=16)
    for a, b in zip(before, m.get_weights()): np.testing.assert_array_equal(a, b)
    g = graph_of(m); sp = channel_spaces(g)
    union = [np.logical_or.reduce([mod.masks[j] for mod in sub]) for j in range(len(sub[0].masks))]
    for k, u in zip(masks, union): assert not (k & ~u).any()                                # gates only remove
    chans = {}
    for op, k in zip(g.node_ops, masks):
        chans.setdefault(sp[op.idx], []).append(k.reshape(-1, k.shape[-1]).any(0))
    for s, vs in chans.items():
        if s in _space_nodes(g): assert all((v == vs[0]).all() for v in vs), s                   # tied through Add
    hist = info['history']
    assert info['holdout_top1'] == max(h[3] for h in hist) and info['best_step'] in [h[0] for h in hist]
    assert info['best_step'] == min(h[0] for h in hist if h[3] == info['holdout_top1'])
    r = reengineer_subset(sub, x, y, budget=0.3, steps=40, eval_every=10, batch_size=16)
    km = r.to_keras(slim=True)
    head = g.head_input.shape[0] * 3
    assert model_macs(km) <= 0.3 * model_macs(m) + head
    assert isinstance(km.get_layer('subset_head'), layers.Dense)     # shared masks: no per-module copies
    # the re-fitted head is scikit-learn's multinomial regression on the gated features (computed by a Keras sub-model)
    from sklearn.linear_model import LogisticRegression
    cls = [mod.class_index for mod in sub]
    sel = np.flatnonzero(np.isin(y, cls))
    feats = keras.Model(km.inputs[0], km.get_layer('subset_head').input)(x[sel])
    lab = np.array([cls.index(c) for c in y[sel]])
    pred = np.asarray(km(x[sel])).argmax(1)
    tr = np.isin(sel, _train_part(sub, y))
    ref = LogisticRegression(C=1.0, max_iter=5000).fit(np.asarray(feats)[tr], lab[tr])
    assert (ref.predict(np.asarray(feats)) == pred).mean() >= 0.97


def _train_part(sub, y, holdout=0.2, seed=0):
    "The training indices of the subset, re-derived here: per class in the set's order, a seeded permutation, the first `holdout` share held out."
    rng = np.random.default_rng(seed); tr = []
    for mod in sub:
        i = rng.permutation(np.flatnonzero(y == mod.class_index)); tr.append(i[int(round(holdout * len(i))):])
    return np.concatenate(tr)


def test_budget_is_checked(decomposed):
    m, x, y, ms = decomposed
    for bad in (0, -1, True, 'half'):
        with pytest.raises(DecompositionError, match='budget'): learn_subset_gates(ms[[0, 1]], x, y, budget=bad)


# ---------------------------------------------------------------- 5. the frontier notebook at its CI defaults

@needs_data('cifar10-jpeg.zip')
def test_frontier_notebook_runs_at_ci_defaults(tmp_path):
    require_file(PARENT)
    run_experiment('small_reuse.ipynb', tmp_path / 'small_reuse.ipynb', out_dir=str(tmp_path / 'out'))
    out = tmp_path / 'out'
    m = json.loads((out / 'metrics.json').read_text())
    assert (out / 'frontier.png').stat().st_size > 10_000 and (out / 'summary.md').exists() and (out / 'rows.csv').exists()
    s = m['scale']
    assert s['n_pairs'] == 1 and s['n_quads'] == 0 and s['budgets'] == [0.5, 0.2] and s['test_per_class'] == 50
    rec = json.loads(PARENT.with_suffix('.json').read_text())
    assert m['parent']['params'] == rec['parameters']                  # measured on the model = its training record
    # the parent restricted to the pair, computed here from the same seeded test images
    from cnnmodules.experiments import experiment_data
    ds, _ = experiment_data('cifar10', str(DATA))
    cls = s['subsets'][0]
    xt, yt = ds.sample_per_class(50, seed=0, split='test')        # the notebook's test images: 50 per class, seed 0
    sel = np.isin(yt, cls)
    p = keras.saving.load_model(PARENT).predict(xt[sel], verbose=0)[:, cls].argmax(1)
    ref = float((p == np.searchsorted(cls, yt[sel])).mean())
    rows = m['rows']
    assert all(r['parent_top1'] == pytest.approx(ref) for r in rows)
    assert all(c['argmax_equals_vote'] and c['images'] == 100 for c in m['checks'])
    gated = [r for r in rows if r['budget'] is not None]
    assert len(gated) == 4 and len(rows) == 5
    for r in gated:
        assert r['flops_pct'] <= 100 * r['budget'] + 0.1, r                        # the exported model fits its budget
        assert r['delta_top1_pp'] == pytest.approx(100 * (r['top1'] - r['parent_top1']))
        assert r['top1'] * 100 == pytest.approx(round(r['top1'] * 100))            # a share of the 100 test images
    for b in (0.5, 0.2):   # the fine-tune trains weights, not the architecture: same MACs and parameters
        fr, ft = [r for r in gated if r['budget'] == b and not r['finetune']][0], [r for r in gated if r['budget'] == b and r['finetune']][0]
        assert (fr['macs'], fr['params'], fr['file_bytes']) == (ft['macs'], ft['params'], ft['file_bytes'])   # no optimizer state in the file
    smaller = [r for r in gated if r['budget'] == 0.2][0]
    assert smaller['macs'] < [r for r in gated if r['budget'] == 0.5][0]['macs'] < m['parent']['macs']
    # the run resumes: the same command again keeps the subsets already in metrics.json (their rows as they were,
    # time included: nothing recomputed) and its figures are the same
    run_experiment('small_reuse.ipynb', tmp_path / 'again.ipynb', out_dir=str(out))
    m2 = json.loads((out / 'metrics.json').read_text())
    same = ('classes', 'variant', 'budget', 'finetune', 'top1', 'macs', 'params', 'file_bytes', 'latency_ms', 'seconds')
    assert [{k: r[k] for k in same} for r in m2['rows']] == [{k: r[k] for k in same} for r in rows]
    assert m2['checks'] == m['checks'] and m2['params'] == m['params']
