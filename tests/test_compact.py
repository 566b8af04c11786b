"""Compact modules (issue 10, `nbs/12_compact.ipynb`): the generalised concern rule, channel granularity, head re-fit,
learned channel masks and the slim Keras export, on random small CNNs (hypothesis; tests/cnn_strategies.py).

Expectations come from plain Keras sub-models, the literal reference (`cnnmodules.reference`), scikit-learn or the
masked module's own standalone model — never from the code under test.

1. `min_rate=0` gives exactly the paper's masks (the literal reference); masks shrink monotonically with `min_rate`
   (node and channel granularity).
2. Channel granularity: masks are whole channels, equal across the node layers of a residual stream, and keep exactly
   the channels whose activity rate (counted here from Keras sub-model activations) reaches `min_rate`.
3. The slim model predicts what the masked module predicts (float64, tight tolerance) on random residual models
   with random channel and node masks; `size()` counts the slim model's parameters; removed channels shrink the file.
4. The re-fitted head is scikit-learn's logistic regression on the masked module's head inputs.
5. Learned masks train masks only: the weights are untouched, masks only shrink and stay whole channels, a larger
   sparsity weight gives fewer FLOPs; the options are recorded in the provenance.
6. Bad options are one `DecompositionError` naming the argument.
"""
import tempfile
from pathlib import Path

import numpy as np
import pytest
import keras
from keras import layers
from hypothesis import given, strategies as st

from cnn_strategies import cnn_specs, build, props, make_data

from cnnmodules.graph import graph_of, DecompositionError
from cnnmodules.concern import sample_inputs
from cnnmodules.modules import Module, ModuleSet
from cnnmodules.modularize import channel_head
from cnnmodules.decompose import decompose
from cnnmodules.reference import reference_kept
from cnnmodules.compact import channel_spaces, slim_channels, parent_size, refit_heads

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning")


def node_values(model, x):
    "Node-layer name -> (n, *shape) values, from a plain Keras sub-model (independent of the engine's forward)."
    g = graph_of(model)
    probe = keras.Model(model.inputs[0], [model.get_layer(n).output for n in g.node_names])
    out = probe(x)
    return dict(zip(g.node_names, [np.asarray(v) for v in (out if isinstance(out, (list, tuple)) else [out])]))


def masks_of(ms): return [[np.asarray(k) for k in m.masks] for m in ms]


# ---------------------------------------------------------------- 1. min_rate

@props(6)
@given(st.data())
def test_min_rate_zero_is_the_paper_rule(data):
    spec = data.draw(cnn_specs(), label='spec')
    m = build(spec)
    x, y = make_data(spec, 8)
    E = 6
    ms = decompose(m, x, y, n_concerned=E, steps=('ci', 'ti', 'mc'), min_rate=0.0, progress=False)
    ref = reference_kept(m, x, sample_inputs(y, spec['N'], E, seed=0))
    for i, mod in enumerate(ms):
        for j, k in enumerate(mod.masks): np.testing.assert_array_equal(k, ref[j][i])


@pytest.mark.parametrize('granularity', ['node', 'channel'])
@props(5)
@given(st.data())
def test_masks_shrink_with_min_rate(granularity, data):
    spec = data.draw(cnn_specs(), label='spec')
    m = build(spec)
    x, y = make_data(spec, 8)
    rates = sorted(data.draw(st.lists(st.floats(0, 1), min_size=2, max_size=4), label='rates'))
    prev = None
    for r in rates:
        cur = masks_of(decompose(m, x, y, n_concerned=6, steps=('ci', 'ti', 'mc'), min_rate=r, granularity=granularity, progress=False))
        if prev is not None:
            for a, b in zip(prev, cur):
                for ka, kb in zip(a, b): assert not (kb & ~ka).any(), f'min_rate {r} keeps a node a lower rate removed'
        prev = cur


# ---------------------------------------------------------------- 2. channel granularity

@props(6)
@given(st.data())
def test_channel_granularity_rule_and_ties(data):
    spec = data.draw(cnn_specs(residual=True), label='spec')
    m = build(spec)
    x, y = make_data(spec, 8)
    E, N = 6, spec['N']
    r = data.draw(st.sampled_from([0.0, 0.2, 0.5]), label='min_rate')
    ms = decompose(m, x, y, n_concerned=E, steps=('ci', 'ti', 'mc'), granularity='channel', min_rate=r, progress=False)
    g = graph_of(m)
    sp = channel_spaces(g)
    s = sample_inputs(y, N, E, seed=0)
    vals = node_values(m, x)
    groups = {}
    for j, op in enumerate(g.node_ops):
        if sp[op.idx] != sp[0]: groups.setdefault(sp[op.idx], []).append(j)
    for i, mod in enumerate(ms):
        c = mod.class_index
        conc, tang = s.index[s.label == c], s.index[s.tangling & (s.label != c)]
        for space, js in groups.items():
            act_c = np.concatenate([(vals[g.node_names[j]][conc] > 0).reshape(len(conc), -1, g.node_shapes[j][-1]) for j in js], 1)
            act_t = np.concatenate([(vals[g.node_names[j]][tang] > 0).reshape(len(tang), -1, g.node_shapes[j][-1]) for j in js], 1)
            want = (act_c.any((0, 1)) & (act_c.mean((0, 1)) >= r)) | (act_t.any((0, 1)) & (act_t.mean((0, 1)) >= r))
            for j in js:   # whole channels, the same in every node layer of the space
                k = mod.masks[j].reshape(-1, g.node_shapes[j][-1])
                np.testing.assert_array_equal(k, np.broadcast_to(want, k.shape))


# ---------------------------------------------------------------- 3. slim = masked

def random_module(m, data, c=0):
    "A module of parent `m` with random masks: some channels dropped whole (per stream), some single nodes, some head inputs."
    g = graph_of(m)
    sp = channel_spaces(g)
    rng = np.random.default_rng(data.draw(st.integers(0, 2 ** 16), label='mask seed'))
    p_chan, p_node = data.draw(st.sampled_from([0.0, 0.3, 0.6])), data.draw(st.sampled_from([0.0, 0.1]))
    chan = {}
    masks = []
    for op in g.node_ops:
        C = op.shape[-1]
        if sp[op.idx] not in chan: chan[sp[op.idx]] = rng.random(C) >= p_chan
        k = np.broadcast_to(chan[sp[op.idx]], op.shape) & (rng.random(op.shape) >= p_node)
        masks.append(np.array(k))
    W, b = m.layers[-1].get_weights()
    hk, hb = channel_head(W, b, [c])
    head_keep = rng.random(W.shape[0]) >= data.draw(st.sampled_from([0.0, 0.2]))
    return Module(c, 'c', masks, hk[0], hb[0], head_keep, m, {'parent_hash': 'x'})


@props(12)
@given(st.data())
def test_slim_equals_masked(data):
    spec = data.draw(cnn_specs(residual=True), label='spec')
    m = build(spec)
    x, _ = make_data(spec, 3)
    mod = random_module(m, data)
    masked, slim = mod.to_keras(), mod.to_keras(slim=True)
    np.testing.assert_allclose(np.asarray(slim(x)), np.asarray(masked(x)), rtol=1e-9, atol=1e-12)
    sz = mod.size()
    assert sz['params'] == slim.count_params()
    assert parent_size(graph_of(m))['params'] == m.count_params() == sz['parent_params']
    assert sz['params'] <= masked.count_params() and sz['flops'] <= sz['parent_flops']
    # a channel the slim model keeps is one some op of its space needs; a dropped one is needed nowhere
    keep = slim_channels(mod)
    g = graph_of(m)
    assert all(len(keep[op.idx]) == op.shape[-1] for op in g.ops[1:-1])


def test_slim_drops_a_whole_stream_channel():
    keras.utils.set_random_seed(0)
    D = dict(dtype='float64')
    inp = keras.Input((6, 6, 1), **D)
    x = layers.Conv2D(4, 3, padding='same', activation='relu', name='stem', **D)(inp)
    h = layers.Conv2D(4, 3, padding='same', activation='relu', name='c1', **D)(x)
    h = layers.Conv2D(4, 3, padding='same', name='c2', **D)(h)
    x = layers.ReLU(name='out', **D)(layers.Add(**D)([h, x]))
    m = keras.Model(inp, layers.Dense(3, activation='softmax', **D)(layers.GlobalAveragePooling2D(**D)(x)))
    g = graph_of(m)
    full = [np.ones(s, bool) for s in g.node_shapes]
    W, b = m.layers[-1].get_weights()
    hk, hb = channel_head(W, b, [1])
    def module(masks): return Module(1, '1', masks, hk[0], hb[0], np.ones(4, bool), m, {})
    # channel 2 removed in the stem only: the stream still carries c2's channel 2 through the Add, so nothing is cut
    part = [k.copy() for k in full]; part[g.node_names.index('stem')][..., 2] = False
    assert module(part).size()['params'] == module(full).size()['params']
    # removed in every ReLU of the stream: stem's filter, c1's input, c2's filter and the head row go
    whole = [k.copy() for k in part]; whole[g.node_names.index('out')][..., 2] = False
    s_full, s_whole = module(full).size(), module(whole).size()
    removed = (9 * 1 + 1) + 9 * 4 + (9 * 4 + 1) + 2    # stem filter, c1 input slice, c2 filter, head row
    assert s_full['params'] - s_whole['params'] == removed
    x = np.random.default_rng(0).normal(size=(5, 6, 6, 1))
    np.testing.assert_allclose(np.asarray(module(whole).to_keras(slim=True)(x)), np.asarray(module(whole).to_keras()(x)), rtol=1e-12)
    with tempfile.TemporaryDirectory() as d:
        a, b_ = Path(d) / 'masked.keras', Path(d) / 'slim.keras'
        module(whole).to_keras().save(a); module(whole).to_keras(slim=True).save(b_)
        back = keras.saving.load_model(b_)
        np.testing.assert_allclose(np.asarray(back(x)), np.asarray(module(whole).to_keras()(x)), rtol=1e-12)
        assert back.count_params() < m.count_params()


def test_to_keras_default_is_the_masked_model():
    spec = dict(shape=(6, 6, 1), zeropad=None, convs=[dict(f=3, k=3, s=1, pad='same', act='relu')],
                blocks=[dict(f=3, k=3, s=1, shortcut='identity')], pool=None, dense=None, top='gap', N=3, seed=1, bias=(-0.1, 0.15))
    m = build(spec)
    x, y = make_data(spec, 6)
    mod = decompose(m, x, y, n_concerned=4, progress=False)[0]
    a, b = mod.to_keras(), mod.to_keras(slim=False)
    assert [type(l).__name__ for l in a.layers] == [type(l).__name__ for l in b.layers]
    np.testing.assert_array_equal(np.asarray(a(x)), np.asarray(b(x)))


# ---------------------------------------------------------------- 4. head re-fit

@props(4)
@given(st.data())
def test_refit_head_is_logistic_regression(data):
    from sklearn.linear_model import LogisticRegression
    spec = data.draw(cnn_specs(), label='spec')
    m = build(spec)
    x, y = make_data(spec, 8)
    E, N = 6, spec['N']
    ms = decompose(m, x, y, n_concerned=E, granularity='channel', min_rate=0.3, progress=False)
    rf = refit_heads(ms, x, y, C=0.5)
    s = sample_inputs(y, N, E, seed=0)
    for mod, new in zip(ms, rf):
        c = mod.class_index
        k = mod.to_keras()
        feat = np.asarray(keras.Model(k.inputs[0], k.get_layer('module_head').input)(x)) * mod.head_keep
        ic, it = s.index[s.label == c], s.index[s.tangling & (s.label != c)]
        lr = LogisticRegression(C=0.5, max_iter=5000).fit(feat[np.r_[ic, it]], np.r_[np.ones(len(ic)), np.zeros(len(it))])
        np.testing.assert_allclose(np.asarray(new.to_keras()(x))[:, 0], lr.predict_proba(feat)[:, 1], rtol=1e-5, atol=1e-7)
        assert new.provenance['head']['refit'] == 'logistic regression'
        for a, b in zip(mod.masks, new.masks): np.testing.assert_array_equal(a, b)   # only the head changes


# ---------------------------------------------------------------- 5. learned masks

def test_learned_masks_train_masks_only():
    spec = dict(shape=(8, 8, 1), zeropad=None, convs=[dict(f=4, k=3, s=1, pad='same', act='relu')],
                blocks=[dict(f=4, k=3, s=1, shortcut='identity'), dict(f=6, k=3, s=2, shortcut='projection')],
                pool=None, dense=None, top='gap', N=3, seed=3, bias=(-0.05, 0.1))
    m = build(spec, dtype='float32')
    x, y = make_data(spec, 20, dtype='float32')
    before = [w.copy() for w in m.get_weights()]
    base = decompose(m, x, y, n_concerned=12, progress=False)
    small = decompose(m, x, y, n_concerned=12, mask_sparsity=0.0, mask_steps=150, mask_batch=8, progress=False)
    tiny = decompose(m, x, y, n_concerned=12, mask_sparsity=20.0, mask_steps=150, mask_batch=8, progress=False)
    for a, b in zip(before, m.get_weights()): np.testing.assert_array_equal(a, b)   # the weights are frozen
    g = graph_of(m)
    sp = channel_spaces(g)
    for ms in (small, tiny):
        for mb, mod in zip(base, ms):
            chans = {}
            for j, (kb, k) in enumerate(zip(mb.masks, mod.masks)):
                assert not (k & ~kb).any()                                     # only removes
                op = g.node_ops[j]
                on = k.reshape(-1, op.shape[-1]).any(0)
                chans.setdefault(sp[op.idx], on)
                if sp[op.idx] != sp[0]: np.testing.assert_array_equal(on, chans[sp[op.idx]])   # a whole stream channel
            assert mod.provenance['learned_masks']["steps"] == 150
    f_small = np.mean([mod.size()['flops'] for mod in small]); f_tiny = np.mean([mod.size()['flops'] for mod in tiny])
    assert f_tiny < f_small, (f_tiny, f_small)
    assert tiny[0].provenance['learned_masks']['sparsity'] == 20.0 and base[0].provenance['learned_masks'] is None


# ---------------------------------------------------------------- 6. bad options

@pytest.mark.parametrize('kw,name', [(dict(min_rate=-0.1), 'min_rate'), (dict(min_rate=1.5), 'min_rate'), (dict(min_rate='a'), 'min_rate'),
                                     (dict(granularity='layer'), 'granularity'), (dict(refit_head='yes'), 'refit_head'),
                                     (dict(mask_sparsity=-1), 'mask_sparsity'), (dict(mask_sparsity=float('nan')), 'mask_sparsity'),
                                     (dict(mask_sparsity=1.0, mask_steps=0), 'mask_steps'), (dict(mask_batch=2.5), 'mask_batch')])
def test_bad_options_name_the_argument(kw, name):
    spec = dict(shape=(6, 6, 1), zeropad=None, convs=[dict(f=3, k=3, s=1, pad='same', act='relu')], blocks=[], pool=None,
                dense=None, top='gap', N=3, seed=1, bias=(-0.1, 0.15))
    m = build(spec)
    x, y = make_data(spec, 6)
    with pytest.raises(DecompositionError, match=name): decompose(m, x, y, n_concerned=4, progress=False, **kw)


# ---------------------------------------------------------------- 3b. slim = masked on the issue-16 layer kinds

def random_arch_module(m, data, c=0):
    "A module of an `arch_specs` parent with random masks: whole channels per space, single nodes, head inputs."
    g = graph_of(m)
    sp = channel_spaces(g)
    rng = np.random.default_rng(data.draw(st.integers(0, 2 ** 16), label='mask seed'))
    p_chan, p_node = data.draw(st.sampled_from([0.0, 0.3, 0.6]), label='p_chan'), data.draw(st.sampled_from([0.0, 0.1]), label='p_node')
    chan, masks = {}, []
    for op in g.node_ops:
        if sp[op.idx] not in chan: chan[sp[op.idx]] = rng.random(op.shape[-1]) >= p_chan
        masks.append(np.array(np.broadcast_to(chan[sp[op.idx]], op.shape) & (rng.random(op.shape) >= p_node)))
    W, b = g.head_weights()
    hk, hb = channel_head(W, b, [c])
    head_keep = rng.random(W.shape[0]) >= data.draw(st.sampled_from([0.0, 0.2]), label='p_head')
    return Module(c, 'c', masks, hk[0], hb[0], head_keep, m, {'parent_hash': 'x'})


@props(16)
@given(st.data())
def test_slim_equals_masked_on_new_layer_kinds(data):
    """Depthwise, separable, grouped and per-channel convolutions, Concatenate, squeeze-excite Multiply, Reshape,
    LayerNormalization, keras.ops, the new activations and heads: the slim model computes the masked module's output
    (float64) on random inputs it never saw, has the parameters `size()` counts, and a subset model of two such
    modules is their composed vote."""
    from cnn_strategies import arch_specs, build_arch
    from cnnmodules.compose import module_logits, vote_margin
    spec = data.draw(arch_specs(), label='spec')
    m = build_arch(spec)
    x = np.random.default_rng(spec['seed'] + 1).normal(size=(4,) + spec['shape'])
    mod = random_arch_module(m, data)
    masked, slim = mod.to_keras(), mod.to_keras(slim=True)
    np.testing.assert_allclose(np.asarray(slim(x)), np.asarray(masked(x)), rtol=1e-9, atol=1e-12)
    assert mod.size()['params'] == slim.count_params()
    assert mod.size()['params'] <= masked.count_params()
    keep = slim_channels(mod)
    g = graph_of(m)
    for op in g.ops[1:-1]:
        assert len(keep[op.idx]) == op.shape[-1]
        if op.kind == 'concat':   # a concatenation keeps exactly its inputs' kept channels
            np.testing.assert_array_equal(keep[op.idx], np.concatenate([keep[i] for i in op.inputs]))
    pair = ModuleSet([mod, random_arch_module(m, data, c=1)])
    sub = np.asarray(pair.to_keras(slim=True, output='logit')(x))
    z = module_logits(pair, x)
    from cnnmodules.compose import calibrated_margins
    np.testing.assert_allclose(sub, calibrated_margins(pair, z[..., 0] - z[..., 1]), rtol=1e-7, atol=1e-9)
