"""Property tests of the decomposition engine on random small CNNs (hypothesis; strategy in tests/cnn_strategies.py).

Models are float64 wherever exact equality is asserted; expectations come from plain Keras sub-models or the literal
reference (`cnnmodules.reference`), never from the engine under test.

1. Modules whose masks keep every node reproduce the parent's concerned logit and, composed by voting, its top-1
   and top-5 (ranking) predictions exactly.
2. The steps nest: CI ⊆ CI+TI; CI+TI+MC ⊇ +MC-BLN ⊇ +MC-BI; CI/TI masks are the nodes Keras shows active; MC-BLN
   equals the literal Algorithm 2; the reported removal counts match the masks.
3. CI and TI are exact on the inputs they looked at: a module reproduces the channeled parent on every concerned and
   tangling input, on any architecture (Add included).
4. Backtracking never changes a module's output, on any input (random masks, residual blocks with shared tensors,
   both node rules); the fan-out and linear-conv-before-Add reproductions of issue 6.
5. Seeded sampling: same seed, same masks; another seed, another sample.
6. save -> load keeps scores, p_concerned and the standalone Keras export.
7. Exact-mode `module_scores` equals running each module's `to_keras()` one by one, on random masks.
8. Unsupported models and inputs fail with a `DecompositionError` that names the culprit.
"""
import tempfile
from pathlib import Path

import numpy as np
import pytest
import keras
import tensorflow as tf
from keras import layers
from hypothesis import given, assume, event, strategies as st

from cnn_strategies import cnn_specs, build, props, make_data

from cnnmodules.graph import LayerGraph, forward, DecompositionError
from cnnmodules.concern import sample_inputs
from cnnmodules.modularize import channel_head, mc_bi, backtrack, head_rule
from cnnmodules.reference import reference_mc_bln
from cnnmodules.modules import Module, ModuleSet
from cnnmodules.graph import graph_of
from cnnmodules.compose import module_scores, vote
from cnnmodules.decompose import decompose

# Keras' own .keras saving calls np.array on a tensor without `copy` (a NumPy 2 deprecation inside Keras, not ours)
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning")



# ---------------------------------------------------------------- random small CNNs (tests/cnn_strategies.py)

# every hypothesis property runs on models without and with residual blocks (Add)
ADD = pytest.mark.parametrize('residual', [False, True], ids=['no_add', 'add'])


def parent_logits(model, x):
    "(z, h): the parent's pre-softmax logits and the head's input, via a sub-model to the head's input."
    sub = keras.Model(model.inputs[0], model.layers[-1].input)
    h = np.asarray(sub(x))
    W, b = model.layers[-1].get_weights()
    return h @ W + b, h


def full_modules(model):
    "One module per class whose masks keep every node, with the channeled head."
    g = graph_of(model)
    W, b = model.layers[-1].get_weights()
    hk, hb = channel_head(W, b, range(g.num_classes))
    return [Module(c, str(c), [np.ones(s, bool) for s in g.node_shapes], hk[c], hb[c], np.ones(W.shape[0], bool), model)
            for c in range(g.num_classes)]


def module_logits(mods, x, rule='backtrack'):
    "(n, M, 2) pre-softmax [z_concerned, z_unconcerned] of modules of one parent, through the engine's masked forward."
    g = graph_of(mods[0].parent, rule)
    M = len(mods)
    masks = [np.stack([m.masks[j] for m in mods]) for j in range(len(g.node_ops))]
    h = np.asarray(forward(g, tf.constant(x), masks, n_modules=M)).reshape(M, len(x), -1)
    hk = np.stack([m.head_kernel * m.head_keep[:, None] for m in mods])
    hb = np.stack([m.head_bias for m in mods])
    return np.einsum('mnd,mdk->nmk', h, hk) + hb[None]


def concerned_inputs(y, N, E, seed, c, classes=None):
    "Indices of the E concerned inputs `decompose(..., seed=seed)` observed for class c's module."
    s = sample_inputs(y, N, E, classes=classes, seed=seed)
    return s.index[s.label == c]


def sigmoid(t): return 1 / (1 + np.exp(-t))


# ---------------------------------------------------------------- 1. full modules = parent

@ADD
@props(10)
@given(st.data())
def test_full_modules_reproduce_parent(residual, data):
    spec = data.draw(cnn_specs(residual=residual), label='spec')
    m = build(spec)
    N = spec['N']
    x, _ = make_data(spec, 5)
    z, _ = parent_logits(m, x)
    np.testing.assert_allclose(np.asarray(m(x)), np.exp(z) / np.exp(z).sum(1, keepdims=True), rtol=1e-10, atol=1e-14)
    mods = full_modules(m)
    zm = module_logits(mods, x)
    # the concerned logit is the parent's; the unconcerned one the mean of the other N-1
    np.testing.assert_allclose(zm[..., 0], z, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(zm[..., 1], (z.sum(1, keepdims=True) - z) / (N - 1), rtol=1e-12, atol=1e-12)
    ms = ModuleSet(mods)
    pc, pu = ms.predict(x)
    np.testing.assert_allclose(pc, sigmoid(z - (z.sum(1, keepdims=True) - z) / (N - 1)), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(pc + pu, 1, rtol=1e-12)
    # p_c = sigmoid((N z_c - sum z) / (N-1)) is increasing in z_c: voting gives the parent's top-1, p_c its ranking
    parent_pred = np.asarray(m(x)).argmax(1)
    np.testing.assert_array_equal(vote(pc, pu), parent_pred)
    np.testing.assert_array_equal(np.argsort(-pc, 1, kind='stable')[:, :5], np.argsort(-z, 1, kind='stable')[:, :5])
    ev = ms.evaluate(x, parent_pred, jaccard=False)
    assert ev['top1'] == 1.0
    # with nothing masked, the fused mode (parent run once) is the exact mode
    pcf, puf = ms.predict(x, mode='fused')
    np.testing.assert_allclose(pcf, pc, rtol=1e-12, atol=1e-14)


# ---------------------------------------------------------------- 2. the steps nest

def _subset(a, b): return not np.any(np.asarray(a) & ~np.asarray(b))


def _kept(ms): return int(sum(mk.sum() for mod in ms for mk in mod.masks))


def keras_node_values(model, g, x):
    "The node layers' outputs through plain Keras sub-models (independent of the engine's `forward`)."
    probe = keras.Model(model.inputs[0], [op.layer.output for op in g.node_ops])
    out = probe(x)
    return [np.asarray(v) for v in (out if isinstance(out, (list, tuple)) else [out])]


@ADD
@props(8)
@given(st.sampled_from([0.01, 0.1, 0.5]), st.data())
def test_steps_nest(residual, delta, data):
    spec = data.draw(cnn_specs(residual=residual), label='spec')
    m = build(spec)
    N, E = spec['N'], 4
    x, y = make_data(spec, E + 2)
    classes = data.draw(st.none() | st.lists(st.integers(0, N - 1), min_size=1, max_size=N, unique=True), label='classes')
    kw = dict(n_concerned=E, classes=classes, delta=delta, seed=spec['seed'], progress=False)
    ci = decompose(m, x, y, steps=('ci', 'mc'), **kw)
    ti = decompose(m, x, y, steps=('ci', 'ti', 'mc'), **kw)
    bln = decompose(m, x, y, steps=('ci', 'ti', 'mc', 'blc'), **kw)
    bi = decompose(m, x, y, steps=('ci', 'ti', 'mc', 'blc', 'bi'), **kw)
    assert [mod.class_index for mod in bi] == (list(range(N)) if classes is None else classes)
    g = graph_of(m)
    # CI keeps the nodes active (> 0) on a concerned input; TI adds those active on another class's tangling input
    smp = sample_inputs(y, N, E, classes=classes, seed=spec['seed'])
    act = [v > 0 for v in keras_node_values(m, g, x[smp.index])]
    for a, b in zip(ci, ti):
        own, tang = smp.label == a.class_index, smp.tangling & (smp.label != a.class_index)
        for j, name in enumerate(g.node_names):
            np.testing.assert_array_equal(a.masks[j], act[j][own].any(0), err_msg=f'CI {name}')
            np.testing.assert_array_equal(b.masks[j], a.masks[j] | act[j][tang].any(0), err_msg=f'CI+TI {name}')
    # MC-BLN's kept head inputs and nodes are the literal Algorithm 2's (cnnmodules.reference, loops over sets)
    ref_keep, ref_hkeep = reference_mc_bln(m, [np.stack([mod.masks[j] for mod in ti]) for j in range(len(g.node_ops))],
                                           np.stack([mod.head_kernel for mod in ti]), delta)
    for a, b, c_, d, rh in zip(ci, ti, bln, bi, ref_hkeep):
        for j in range(len(g.node_ops)):
            assert _subset(a.masks[j], b.masks[j]), f'CI ⊄ CI+TI in {g.node_names[j]}'
            assert _subset(c_.masks[j], b.masks[j]), f'MC-BLN added nodes in {g.node_names[j]}'
            assert _subset(d.masks[j], c_.masks[j]), f'MC-BI added nodes in {g.node_names[j]}'
        for mod in (b, c_, d):   # the channeled head does not depend on the steps
            np.testing.assert_array_equal(mod.head_kernel, a.head_kernel)
            np.testing.assert_array_equal(mod.head_bias, a.head_bias)
        assert a.head_keep.all() and b.head_keep.all()
        np.testing.assert_array_equal(c_.head_keep, rh)
        np.testing.assert_array_equal(d.head_keep, c_.head_keep)
    for j in range(len(g.node_ops)):
        np.testing.assert_array_equal(np.stack([mod.masks[j] for mod in bln]), ref_keep[j], err_msg=f'MC-BLN {g.node_names[j]}')
    event(f"TI adds nodes: {_kept(ti) > _kept(ci)}; MC-BLN removes: {_kept(bln) < _kept(ti)}; MC-BI removes: {_kept(bi) < _kept(bln)}")
    # the reported removal counts are the differences of the masks
    assert bln.removed['blc'] == _kept(ti) - _kept(bln)
    assert bln.removed['blc_head_inputs'] == int(sum((~mod.head_keep).sum() for mod in bln))
    assert bi.removed['bi'] == _kept(bln) - _kept(bi)
    assert all(mod.provenance['kept'] == int(sum(mk.sum() for mk in mod.masks)) for mod in bi)
    assert all(mod.provenance['kept_ci'] == int(sum(mk.sum() for mk in c.masks)) for mod, c in zip(bi, ci))


# ---------------------------------------------------------------- 3. CI and TI are exact on the inputs they looked at

@ADD
@props(10)
@given(st.data())
def test_ci_ti_exact_on_observed_inputs(residual, data):
    "With the default node rule, every CI+TI module reproduces the channeled parent's logits on its concerned and tangling inputs."
    spec = data.draw(cnn_specs(residual=residual), label='spec')
    assert_ci_ti_exact(build(spec), spec, parent_logits, tol=1e-11)

def assert_ci_ti_exact(m, spec, logits, tol):
    "Decompose `m` with CI+TI (E = 4) and check every module against the channeled parent on the inputs it observed, the parent's logits from `logits(m, x)` (a Keras sub-model: independent of the engine); the set and the inputs."
    N, E = spec['N'], 4
    x, y = make_data(spec, E + 2)
    ms = decompose(m, x, y, n_concerned=E, steps=('ci', 'ti', 'mc'), seed=spec['seed'], progress=False)
    smp = sample_inputs(y, N, E, seed=spec['seed'])
    event(f"CI+TI removed nodes: {_kept(ms) < len(ms) * graph_of(m).n_nodes()}")
    for mod in ms:
        c = mod.class_index
        seen = smp.index[(smp.label == c) | (smp.tangling & (smp.label != c))]
        z, _ = logits(m, x[seen])
        want = np.stack([z[:, c], (z.sum(1) - z[:, c]) / (N - 1)], 1)
        np.testing.assert_allclose(module_logits([mod], x[seen])[:, 0], want, rtol=tol, atol=tol)
    return ms, x


# ---------------------------------------------------------------- 4. backtracking never changes a module's output

@pytest.mark.parametrize('rule', ['backtrack', 'paper'])
@props(12)
@given(st.floats(0.2, 0.95), st.data())
def test_backtracking_never_changes_output(rule, p_keep, data):
    "MC-BI, and the backtracking half of MC-BLN given its kept head inputs, remove only what no kept node reads: the module's logits are identical on any input."
    spec = data.draw(cnn_specs(residual=True, dense=False), label='spec')
    m = build(spec)
    g = graph_of(m, rule)
    rng = np.random.default_rng(data.draw(st.integers(0, 2 ** 16), label='mask seed'))
    M = 3
    keep = [(rng.random((M,) + s[:-1] + (1,)) < p_keep) & (rng.random((M,) + s) < (1 + p_keep) / 2) for s in g.node_shapes]
    head_keep = rng.random((M, g.head_input.shape[0])) < (1 + p_keep) / 2
    W, b = m.layers[-1].get_weights()
    hk, hb = channel_head(W, b, range(M))
    x = rng.normal(size=(16,) + tuple(spec['shape']))           # not the decomposition's inputs: any input
    def logits(masks):
        mods = [Module(i, str(i), [mk[i] for mk in masks], hk[i], hb[i], head_keep[i], m, {'linear_nodes': rule}) for i in range(M)]
        return module_logits(mods, x, rule)
    before = logits(keep)
    for through_conv in (False, True):
        after = [k.copy() for k in keep]
        backtrack(g, after, head_keep, through_conv=through_conv)
        for a, k in zip(after, keep): assert _subset(a, k)
        np.testing.assert_array_equal(logits(after), before)
        event(f'through_conv={through_conv} removes nodes: {sum(int(a.sum()) for a in after) < sum(int(k.sum()) for k in keep)}')


def fan_out_model():
    "input → a (1×1, ReLU) → h (3×3, ReLU, never fires) → Add([h, a]) → ReLU → Flatten → softmax (issue 6, item 1)."
    F = dict(dtype='float64')
    keras.utils.set_random_seed(0)
    inp = keras.Input((5, 5, 1), **F)
    a = layers.Conv2D(2, 1, activation='relu', name='a', **F)(inp)
    h = layers.Conv2D(2, 3, padding='same', activation='relu', name='h', kernel_initializer=keras.initializers.Constant(-1.),
                      bias_initializer=keras.initializers.Constant(-0.1), **F)(a)
    x = layers.ReLU(**F)(layers.Add(**F)([h, a]))
    return keras.Model(inp, layers.Dense(3, activation='softmax', name='head', **F)(layers.Flatten(**F)(x)))


def test_fan_out_reproduction():
    "The shortcut still reads `a`: after MC-BI the composed modules agree with the parent on every input."
    m = fan_out_model()
    rng = np.random.default_rng(0)
    x = np.abs(rng.normal(size=(60, 5, 5, 1))); y = np.repeat(np.arange(3), 20)
    xt = np.abs(rng.normal(size=(200, 5, 5, 1)))
    parent = np.asarray(m(xt)).argmax(1)
    for steps in [('ci', 'ti', 'mc'), ('ci', 'ti', 'mc', 'bi')]:
        ms = decompose(m, x, y, n_concerned=10, steps=steps, progress=False)
        assert not any(mod.masks[graph_of(m).node_names.index('h')].any() for mod in ms)   # h never fires: CI removes it
        pc, pu = ms.predict(xt)
        np.testing.assert_array_equal(vote(pc, pu), parent)


def add_model():
    "input → a (1×1, ReLU, weights [1, 2]) → lin (3×3, linear, zero kernel, bias −0.5) → Add([a, lin]) → ReLU → softmax (issue 6, item 1b)."
    F = dict(dtype='float64')
    keras.utils.set_random_seed(0)
    inp = keras.Input((4, 4, 1), **F)
    a = layers.Conv2D(2, 1, activation='relu', name='a', kernel_initializer=keras.initializers.Constant([[[[1., 2.]]]]),
                      bias_initializer='zeros', **F)(inp)
    lin = layers.Conv2D(2, 3, padding='same', name='lin', kernel_initializer='zeros', bias_initializer=keras.initializers.Constant(-0.5), **F)(a)
    x = layers.ReLU(**F)(layers.Add(**F)([a, lin]))
    return keras.Model(inp, layers.Dense(3, activation='softmax', name='head', **F)(layers.Flatten(**F)(x)))


def test_linear_conv_before_add():
    "The literal rule masks `lin` (always −0.5) and changes every sum; the default rule keeps the parent's decisions."
    m = add_model()
    rng = np.random.default_rng(1)
    x = rng.uniform(0, 1, size=(90, 4, 4, 1)); y = np.asarray(m(x)).argmax(1)   # balanced enough: labels are the parent's own
    E = int(np.bincount(y, minlength=3).min())
    assert E >= 5, np.bincount(y)
    xt = rng.uniform(0, 1, size=(300, 4, 4, 1)); parent = np.asarray(m(xt)).argmax(1)
    agree = {}
    for rule in ('backtrack', 'paper'):
        ms = decompose(m, x, y, n_concerned=E, steps=('ci', 'ti', 'mc', 'blc', 'bi'), linear_nodes=rule, progress=False)
        agree[rule] = float((vote(*ms.predict(xt)) == parent).mean())
    print(agree)
    assert agree['backtrack'] >= 0.95
    assert agree['paper'] < agree['backtrack']
    assert graph_of(m, 'paper').node_names == ['a', 'lin'] and 'lin' not in graph_of(m).node_names


# ---------------------------------------------------------------- 5. seeds

@ADD
@props(5)
@given(st.integers(0, 2 ** 31 - 1), st.integers(0, 2 ** 31 - 1), st.data())
def test_seeded_sampling(residual, s1, s2, data):
    spec = data.draw(cnn_specs(residual=residual), label='spec')
    assume(s1 != s2)
    m = build(spec)
    N, E = spec['N'], 3
    x, y = make_data(spec, 3 * E)           # every class has more examples than E
    a = decompose(m, x, y, n_concerned=E, seed=s1, progress=False)
    b = decompose(m, x, y, n_concerned=E, seed=s1, progress=False)
    for ma, mb in zip(a, b):
        for u, v in zip(ma.masks, mb.masks): np.testing.assert_array_equal(u, v)
        np.testing.assert_array_equal(ma.head_keep, mb.head_keep)
        assert ma.provenance == mb.provenance
    sa, sa2, sb = (sample_inputs(y, N, E, seed=s) for s in (s1, s1, s2))
    np.testing.assert_array_equal(sa.index, sa2.index)
    assert not np.array_equal(sa.index, sb.index)
    for s in (sa, sb):
        np.testing.assert_array_equal(y[s.index], s.label)
        assert all(len(set(s.index[s.label == c])) == E for c in range(N))
        assert s.tangling.sum() == N * (E // (N - 1))


# ---------------------------------------------------------------- 6. save -> load

@ADD
@props(4)
@given(st.data())
def test_save_load_roundtrip(residual, data):
    spec = data.draw(cnn_specs(residual=residual), label='spec')
    m = build(spec, 'float32')
    E = 4
    x, y = make_data(spec, E + 2, 'float32')
    ms = decompose(m, x, y, n_concerned=E, seed=spec['seed'], progress=False)
    with tempfile.TemporaryDirectory() as d:
        ld = ModuleSet.load(ms.save(Path(d) / 'set.cnnm'))
        # a single module exports to a standalone .keras file that keras.saving.load_model opens
        k0 = ms[0].to_keras()
        k0.save(Path(d) / 'module0.keras')
        np.testing.assert_array_equal(np.asarray(keras.saving.load_model(Path(d) / 'module0.keras')(x)), np.asarray(k0(x)))
    assert len(ld) == len(ms) and ld.class_names == ms.class_names and len(ld.parents()) == 1
    for a, b in zip(ms, ld):
        assert a.class_index == b.class_index and a.provenance == b.provenance and a.calibration == b.calibration
        for u, v in zip(a.masks, b.masks): np.testing.assert_array_equal(u, v)
        np.testing.assert_array_equal(a.head_kernel, b.head_kernel)
        np.testing.assert_array_equal(a.head_bias, b.head_bias)
        np.testing.assert_array_equal(a.head_keep, b.head_keep)
    for mode in ('exact', 'fused'):
        assert ms.evaluate(x, y, mode=mode) == ld.evaluate(x, y, mode=mode)
        for u, v in zip(ms.predict(x, mode=mode), ld.predict(x, mode=mode)): np.testing.assert_array_equal(u, v)
    pc, pu = ld.predict(x)
    for i, mod in enumerate(ld):
        p = np.asarray(mod.to_keras()(x))
        np.testing.assert_allclose(p[:, 0], pc[:, i], atol=1e-5)
        np.testing.assert_allclose(p[:, 1], pu[:, i], atol=1e-5)


# ---------------------------------------------------------------- 7. exact scores = to_keras() one by one

# float32 models and atol 1e-5 here and in 6: `to_keras()` builds its 2-unit head with Keras'
# default float32 policy, so even a float64 parent's standalone module computes in float32 after each node layer.

def random_modules(model, rng, p_keep):
    g = graph_of(model)
    W, b = model.layers[-1].get_weights()
    N = g.num_classes
    cls = rng.choice(N, size=rng.integers(1, N + 1), replace=False)
    hk, hb = channel_head(W, b, cls)
    return [Module(int(c), f'{model.name}:{c}', [rng.random(s) < p_keep for s in g.node_shapes], hk[i], hb[i],
                   rng.random(W.shape[0]) < 0.9, model) for i, c in enumerate(cls)]


@ADD
@props(6)
@given(st.integers(0, 2 ** 16), st.floats(0.3, 0.95), st.sampled_from([1, 3, 256]), st.data())
def test_exact_scores_equal_to_keras(residual, mseed, p_keep, batch_size, data):
    spec = data.draw(cnn_specs(residual=residual), label='spec')
    m1 = build(spec, 'float32')
    m2 = build(data.draw(cnn_specs(shape=spec['shape']), label='second parent'), 'float32')   # modules of two parents compose
    rng = np.random.default_rng(mseed)
    mods = random_modules(m1, rng, p_keep) + random_modules(m2, rng, p_keep)
    mods = [mods[i] for i in rng.permutation(len(mods))]
    ms = ModuleSet(mods)
    x, _ = make_data(spec, 3, 'float32')
    pc, pu = module_scores(ms, x, mode='exact', batch_size=batch_size)
    assert pc.shape == pu.shape == (len(x), len(mods))
    for i, mod in enumerate(mods):
        p = np.asarray(mod.to_keras()(x))
        np.testing.assert_allclose(pc[:, i], p[:, 0], atol=1e-5, err_msg=f'module {i} ({mod.class_name})')
        np.testing.assert_allclose(pu[:, i], p[:, 1], atol=1e-5, err_msg=f'module {i} ({mod.class_name})')


# ---------------------------------------------------------------- 8. clear errors

def _tiny(hidden, shape=(6, 6, 1)):
    inp = keras.Input(shape)
    x = hidden(inp)
    return keras.Model(inp, layers.Dense(3, activation='softmax')(layers.Flatten()(x)))


UNSUPPORTED = {   # layer name -> (hidden part of the model, what else the message must say)
    'logsm_conv': (lambda t: layers.Conv2D(2, 3, activation='log_softmax', name='logsm_conv')(t), "activation 'log_softmax'"),
    'dilated': (lambda t: layers.Conv2D(2, 3, dilation_rate=2, activation='relu', name='dilated')(t), 'dilation_rate'),
    'upsample': (lambda t: layers.UpSampling2D(name='upsample')(layers.Conv2D(2, 3, activation='relu')(t)), 'type UpSampling2D'),
    'deconv': (lambda t: layers.Conv2DTranspose(2, 3, name='deconv')(t), 'type Conv2DTranspose'),
}

# issue 16: accepted since; smooth activations are not nodes under the default rule
SMOOTH = {
    'tanh_conv': lambda t: layers.Conv2D(2, 3, activation='tanh', name='tanh_conv')(t),
    'tanh_act': lambda t: layers.Activation('tanh', name='tanh_act')(layers.Conv2D(2, 3)(t)),
    'leaky': lambda t: layers.LeakyReLU(name='leaky')(layers.Conv2D(2, 3)(t)),
    'slope_relu': lambda t: layers.ReLU(negative_slope=0.1, name='slope_relu')(layers.Conv2D(2, 3)(t)),
}


@pytest.mark.parametrize('name', list(SMOOTH))
def test_smooth_activations_are_not_nodes(name):
    m = _tiny(SMOOTH[name])
    assert name not in LayerGraph(m).node_names and name in LayerGraph(m, approx_nodes=0.01).node_names


@pytest.mark.parametrize('name', list(UNSUPPORTED))
def test_unsupported_layers_are_named(name):
    hidden, what = UNSUPPORTED[name]
    m = _tiny(hidden)
    x = np.zeros((9, 6, 6, 1), 'float32'); y = np.repeat(np.arange(3), 3)
    for call in (lambda: LayerGraph(m), lambda: decompose(m, x, y, n_concerned=2, progress=False)):
        with pytest.raises(DecompositionError) as e:
            call()
        assert f"'{name}'" in str(e.value) and what in str(e.value), str(e.value)


def test_too_few_examples_names_the_class():
    m = _tiny(lambda t: layers.Conv2D(2, 3, activation='relu')(t))
    x = np.random.default_rng(0).normal(size=(8, 6, 6, 1)).astype('float32')
    y = np.array([0, 0, 0, 1, 1, 1, 2, 2])
    with pytest.raises(DecompositionError, match=r'class 2 has 2 training inputs but 3 are needed'):
        decompose(m, x, y, n_concerned=3, progress=False)
    # a class that is only tangling (not decomposed) still needs floor(E/(N-1)) inputs
    y = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    with pytest.raises(DecompositionError, match=r'class 2 has 0 training inputs but 2 are needed as tangling'):
        decompose(m, x, y, n_concerned=4, classes=[0, 1], progress=False)


def test_shape_mismatches_are_clear():
    m = _tiny(lambda t: layers.Conv2D(2, 3, activation='relu')(t))
    y = np.repeat(np.arange(3), 3)
    with pytest.raises(DecompositionError, match=r'inputs have shape \(7, 6, 1\) but the model expects \(6, 6, 1\)'):
        decompose(m, np.zeros((9, 7, 6, 1), 'float32'), y, n_concerned=2, progress=False)
    with pytest.raises(DecompositionError, match=r'9 inputs but 8 labels'):
        decompose(m, np.zeros((9, 6, 6, 1), 'float32'), y[:8], n_concerned=2, progress=False)
    other = _tiny(lambda t: layers.Conv2D(2, 3, activation='relu')(t), shape=(8, 8, 1))
    mods = full_modules(m)[:2] + full_modules(other)[2:]
    with pytest.raises(DecompositionError, match=r'input shapes match.*\(6, 6, 1\).*\(8, 8, 1\)'):
        ModuleSet(mods)
    ms = ModuleSet(full_modules(m))
    with pytest.raises(DecompositionError, match=r'inputs have shape \(8, 8, 1\) but the modules expect \(6, 6, 1\)'):
        ms.predict(np.zeros((2, 8, 8, 1), 'float32'))
    with pytest.raises(DecompositionError, match=r'modules compose only when their input shapes match'):
        ms + ModuleSet(full_modules(other))


# ---------------------------------------------------------------- 9. issue 16: the layers of the keras.applications families

from cnn_strategies import arch_specs, build_arch, head_logits, KINDS
from cnnmodules.compose import calibration_of


@pytest.mark.parametrize('kind', KINDS)
@props(3)
@given(st.data())
def test_arch_ci_ti_exact_on_observed_inputs(kind, data):
    "Each new layer kind (activations of every sort, depthwise/separable/grouped convolutions, Concatenate, squeeze-excite Multiply, Cropping2D, LayerNormalization, keras.ops, ReLU variants; Softmax/1×1-conv heads): under the default rule every CI+TI module reproduces the channeled parent on its concerned and tangling inputs, and its masked Keras export computes what the engine computes."
    spec = data.draw(arch_specs(kinds=(kind,)), label='spec')
    ms, x = assert_ci_ti_exact(build_arch(spec), spec, head_logits, tol=1e-9)
    p = np.asarray(ms[0].to_keras()(x))                         # the standalone export, on all inputs
    zz = module_logits([ms[0]], x)[:, 0]
    a, b = calibration_of(ms[0])                                  # the module's calibration map is folded into its export
    np.testing.assert_allclose(p[:, 0], sigmoid(a * (zz[:, 0] - zz[:, 1]) + b), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize('kind', KINDS)
@props(3)
@given(st.floats(0.2, 0.95), st.data())
def test_arch_backtracking_never_changes_output(kind, p_keep, data):
    "MC-BI and MC-BLN's backtracking through the new layer kinds (channel ranges through Concatenate, a product skipping a factor where the other is 0, groups, depthwise channels, crops) remove only what no kept node reads: logits identical on any input."
    spec = data.draw(arch_specs(kinds=(kind,)), label='spec')
    m = build_arch(spec)
    g = graph_of(m)
    rng = np.random.default_rng(data.draw(st.integers(0, 2 ** 16), label='mask seed'))
    M = 3
    keep = [(rng.random((M,) + s[:-1] + (1,)) < p_keep) & (rng.random((M,) + s) < (1 + p_keep) / 2) for s in g.node_shapes]
    head_keep = rng.random((M, g.head_input.shape[0])) < (1 + p_keep) / 2
    head = m.get_layer('head')
    hk, hb = channel_head(np.asarray(head.kernel).reshape(-1, spec['N']), np.asarray(head.bias), range(M))
    x = rng.normal(size=(16,) + tuple(spec['shape']))
    def logits(masks):
        mods = [Module(i, str(i), [mk[i] for mk in masks], hk[i], hb[i], head_keep[i], m) for i in range(M)]
        return module_logits(mods, x)
    before = logits(keep)
    for through_conv in (False, True):
        after = [k.copy() for k in keep]
        backtrack(g, after, head_keep, through_conv=through_conv)
        for a, k in zip(after, keep): assert _subset(a, k)
        np.testing.assert_array_equal(logits(after), before)
        event(f'through_conv={through_conv} removes nodes: {sum(int(a.sum()) for a in after) < sum(int(k.sum()) for k in keep)}')


def test_approx_nodes_rule():
    "The approximate rule is explicit: smooth activations become nodes only with `approx_nodes`; a removed node was |value| ≤ eps on every observed input, so each observed logit moves by at most what those small values carry."
    spec = dict(shape=(7, 7, 1), stem='silu', blocks=[dict(kind='act', act='gelu', fused=True, c=4, k=3, s=1, dm=1)],
                top='gap', dense='tanh', head='dense', N=3, seed=5)
    m = build_arch(spec)
    assert graph_of(m).node_names == []
    ga = graph_of(m, approx_nodes=0.05)
    assert len(ga.node_ops) == 3 and all(op.active_above == 0.05 for op in ga.node_ops)
    x, y = make_data(spec, 8)
    exact = decompose(m, x, y, n_concerned=6, steps=('ci', 'ti', 'mc'), progress=False)
    approx = decompose(m, x, y, n_concerned=6, steps=('ci', 'ti', 'mc'), approx_nodes=0.05, progress=False)
    assert approx[0].provenance['approx_nodes'] == 0.05 and approx[0].graph is ga
    assert exact[0].kept_fraction() == 1.0
    with pytest.raises(DecompositionError, match='approx_nodes'): graph_of(m, approx_nodes=-1)
    # modules of one parent under both rules compose together, and the rule survives save -> load
    both = exact[:2] + approx[2:]
    pc, _ = both.predict(x)
    np.testing.assert_allclose(pc, np.concatenate([exact[:2].predict(x)[0], approx[2:].predict(x)[0]], 1), rtol=1e-12)
    with tempfile.TemporaryDirectory() as d:
        back = ModuleSet.load(approx.save(Path(d) / 'a.cnnmodules'))
        assert back[0].graph.approx_nodes == 0.05
        np.testing.assert_allclose(back.predict(x)[0], approx.predict(x)[0], rtol=1e-12)
