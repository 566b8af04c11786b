"""Property tests of the decomposition engine on random small CNNs (hypothesis).

Every property is checked on random architectures drawn by `cnn_specs` (6-10 px inputs, 1-2 channels, 1-3 Conv2D
layers with kernel 1-3, stride 1-2 and 'same'/'valid' padding, optional max/average pooling, an optional ResNet-v1
residual block with an identity or 1x1 strided projection shortcut and an Add, an optional hidden Dense, Flatten or
GlobalAveragePooling2D, and a softmax head with 3-4 classes), with random weights seeded from a drawn integer and
random inputs whose classes blank different bands of rows (so concern identification has class-dependent nodes
to remove). Models are float64 wherever exact equality is asserted.

1. Modules whose masks keep every node reproduce the parent's concerned logit and, composed by voting, its top-1
   and top-5 (ranking) predictions exactly.
2. The steps nest: CI ⊆ CI+TI; CI+TI+MC ⊇ +MC-BLN ⊇ +MC-BI; the reported removal counts match the masks.
3. Without Add (every hidden Conv2D/Dense with a fused ReLU), CI-only modules compute, on their concerned inputs,
   exactly the parent's node values and the channeled parent's output.
4. With a linear convolution feeding an Add (ResNet v1), masking its non-positive nodes can change the sum:
   a constructed example, and a printed measurement on random residual models.
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
from hypothesis import given, settings, assume, event, currently_in_test_context, strategies as st, HealthCheck

from cnnmodules.graph import LayerGraph, forward, DecompositionError
from cnnmodules.concern import sample_inputs
from cnnmodules.modularize import channel_head
from cnnmodules.modules import Module, ModuleSet
from cnnmodules.graph import graph_of
from cnnmodules.compose import module_scores, vote
from cnnmodules.decompose import decompose

# Keras' own .keras saving calls np.array on a tensor without `copy` (a NumPy 2 deprecation inside Keras, not ours)
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning")

# reproducible in CI: derandomized, no example database, no deadline (TensorFlow tracing times vary)
PROPS = dict(deadline=None, derandomize=True, database=None,
             suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])


# ---------------------------------------------------------------- random small CNNs

# every hypothesis property runs on models without and with a residual block (Add)
ADD = pytest.mark.parametrize('residual', [False, True], ids=['no_add', 'add'])


def _out(n, k, s, pad): return (n - k) // s + 1 if pad == 'valid' else -(-n // s)


@st.composite
def cnn_specs(draw, residual=None, fused_relu=False, shape=None):
    """A random small CNN. `residual`: None = maybe, True = always, False = never an Add block.
    `fused_relu`: every hidden Conv2D/Dense has activation='relu' on the layer itself (no separate ReLU layer)."""
    if shape is None: shape = (draw(st.integers(6, 10)), draw(st.integers(6, 10)), draw(st.integers(1, 2)))
    H, W, C = shape
    h, w, ch = H, W, C
    convs = []
    for _ in range(draw(st.integers(1, 3))):
        k, s = draw(st.integers(1, 3)), draw(st.integers(1, 2))
        pad = draw(st.sampled_from(['same', 'valid']))
        if pad == 'valid' and min(h, w) < k: pad = 'same'
        act = 'relu' if fused_relu else draw(st.sampled_from(['relu', 'linear+relu']))
        ch = draw(st.integers(2, 4))
        convs.append(dict(f=ch, k=k, s=s, pad=pad, act=act))
        h, w = _out(h, k, s, pad), _out(w, k, s, pad)
    res = None
    if residual is True or (residual is None and draw(st.booleans())):
        s = draw(st.integers(1, 2))
        shortcut = 'projection' if s == 2 else draw(st.sampled_from(['identity', 'projection']))
        f = ch if shortcut == 'identity' else draw(st.integers(2, 4))
        res = dict(f=f, k=draw(st.integers(1, 3)), s=s, shortcut=shortcut)
        h, w, ch = _out(h, 1, s, 'same'), _out(w, 1, s, 'same'), f
    pool = None
    if draw(st.booleans()):
        p, s = draw(st.integers(2, 3)), draw(st.integers(1, 2))
        pad = draw(st.sampled_from(['same', 'valid']))
        if pad == 'valid' and min(h, w) < p: pad = 'same'
        pool = dict(kind=draw(st.sampled_from(['max', 'avg'])), p=p, s=s, pad=pad)
    return dict(shape=shape, convs=convs, res=res, pool=pool,
                dense=draw(st.sampled_from([None, 3, 6])), top=draw(st.sampled_from(['flatten', 'gap'])),
                N=draw(st.integers(3, 4)), seed=draw(st.integers(0, 2 ** 16)))


def build(spec, dtype='float64'):
    "The Keras model of `spec`: glorot kernels seeded by spec['seed'], small random biases (mostly negative)."
    if currently_in_test_context():
        event(f"residual: {spec['res']['shortcut'] if spec['res'] else 'none'}")
        event(f"pool: {spec['pool']['kind'] if spec['pool'] else 'none'}; dense: {bool(spec['dense'])}; top: {spec['top']}")
    D = dict(dtype=dtype)
    keras.utils.set_random_seed(spec['seed'])
    inp = keras.Input(spec['shape'], **D)
    x = inp
    for c in spec['convs']:
        if c['act'] == 'relu': x = layers.Conv2D(c['f'], c['k'], strides=c['s'], padding=c['pad'], activation='relu', **D)(x)
        else: x = layers.ReLU(**D)(layers.Conv2D(c['f'], c['k'], strides=c['s'], padding=c['pad'], **D)(x))
    r = spec['res']
    if r is not None:    # ResNet v1: conv-ReLU, linear conv, Add(shortcut), ReLU
        h = layers.Conv2D(r['f'], r['k'], strides=r['s'], padding='same', activation='relu', **D)(x)
        h = layers.Conv2D(r['f'], r['k'], padding='same', name='res_linear', **D)(h)
        sc = x if r['shortcut'] == 'identity' else layers.Conv2D(r['f'], 1, strides=r['s'], padding='same', name='res_proj', **D)(x)
        x = layers.Activation('relu', **D)(layers.Add(**D)([h, sc]))
    p = spec['pool']
    if p is not None:
        Pool = layers.MaxPooling2D if p['kind'] == 'max' else layers.AveragePooling2D
        x = Pool(p['p'], strides=p['s'], padding=p['pad'], **D)(x)
    x = layers.Flatten(**D)(x) if spec['top'] == 'flatten' else layers.GlobalAveragePooling2D(**D)(x)
    if spec['dense']: x = layers.Dense(spec['dense'], activation='relu', **D)(x)
    m = keras.Model(inp, layers.Dense(spec['N'], activation='softmax', name='head', **D)(x))
    rng = np.random.default_rng(spec['seed'])
    for l in m.layers:
        if isinstance(l, (layers.Conv2D, layers.Dense)):
            Wk, B = l.get_weights()
            l.set_weights([Wk, rng.normal(0.0, 0.5, B.shape) if l.name == 'head' else rng.normal(-0.1, 0.15, B.shape)])
    return m


def make_data(spec, per_class, dtype='float64'):
    "Random normal inputs, `per_class` of each class in shuffled order; class c blanks its own band of rows."
    rng = np.random.default_rng(spec['seed'] + 1)
    H = spec['shape'][0]
    N = spec['N']
    y = rng.permutation(np.repeat(np.arange(N), per_class))
    x = rng.normal(size=(len(y),) + tuple(spec['shape']))
    for c in range(N):
        r0 = (c * H) // N
        x[np.ix_(y == c, np.arange(r0, min(H, r0 + max(1, H // 3))))] = 0
    return x.astype(dtype), y


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


def module_logits(mods, x):
    "(n, M, 2) pre-softmax [z_concerned, z_unconcerned] of modules of one parent, through the engine's masked forward."
    g = graph_of(mods[0].parent)
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
@settings(max_examples=10, **PROPS)
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


@ADD
@settings(max_examples=8, **PROPS)
@given(st.sampled_from([0.0, 0.1, 0.5]), st.data())
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
    act = [np.asarray(v) > 0 for v in forward(g, tf.constant(x[smp.index]), collect=True)]
    for a, b in zip(ci, ti):
        own, tang = smp.label == a.class_index, smp.tangling & (smp.label != a.class_index)
        for j, name in enumerate(g.node_names):
            np.testing.assert_array_equal(a.masks[j], act[j][own].any(0), err_msg=f'CI {name}')
            np.testing.assert_array_equal(b.masks[j], a.masks[j] | act[j][tang].any(0), err_msg=f'CI+TI {name}')
    for a, b, c_, d in zip(ci, ti, bln, bi):
        for j in range(len(g.node_ops)):
            assert _subset(a.masks[j], b.masks[j]), f'CI ⊄ CI+TI in {g.node_names[j]}'
            assert _subset(c_.masks[j], b.masks[j]), f'MC-BLN added nodes in {g.node_names[j]}'
            assert _subset(d.masks[j], c_.masks[j]), f'MC-BI added nodes in {g.node_names[j]}'
        for mod in (b, c_, d):   # the channeled head does not depend on the steps
            np.testing.assert_array_equal(mod.head_kernel, a.head_kernel)
            np.testing.assert_array_equal(mod.head_bias, a.head_bias)
        assert a.head_keep.all() and b.head_keep.all()
        hk = b.head_kernel
        np.testing.assert_array_equal(c_.head_keep, ~((hk[:, 0] <= -delta) & (hk[:, 1] >= delta)))
        np.testing.assert_array_equal(d.head_keep, c_.head_keep)
        # a removed head input that is itself a node (hidden Dense, or Flatten of a node layer) is masked
        hi = g.head_input
        src = hi if hi.node else (g.ops[hi.inputs[0]] if hi.kind == 'flatten' and g.ops[hi.inputs[0]].node else None)
        if src is not None:
            j = [op.idx for op in g.node_ops].index(src.idx)
            assert not c_.masks[j].reshape(-1)[~c_.head_keep].any()
    event(f"TI adds nodes: {_kept(ti) > _kept(ci)}; MC-BLN removes: {_kept(bln) < _kept(ti)}; MC-BI removes: {_kept(bi) < _kept(bln)}")
    # the reported removal counts are the differences of the masks
    assert bln.removed['blc'] == _kept(ti) - _kept(bln)
    assert bln.removed['blc_head_inputs'] == int(sum((~mod.head_keep).sum() for mod in bln))
    assert bi.removed['bi'] == _kept(bln) - _kept(bi)
    assert all(mod.provenance['kept'] == int(sum(mk.sum() for mk in mod.masks)) for mod in bi)
    assert all(mod.provenance['kept_ci'] == int(sum(mk.sum() for mk in c.masks)) for mod, c in zip(bi, ci))


# ---------------------------------------------------------------- 3. no Add, fused ReLU: CI changes nothing on concerned inputs

@settings(max_examples=12, **PROPS)
@given(cnn_specs(residual=False, fused_relu=True))
def test_ci_keeps_concerned_outputs_without_add(spec):
    m = build(spec)
    N, E = spec['N'], 4
    x, y = make_data(spec, E + 2)
    ms = decompose(m, x, y, n_concerned=E, steps=('ci', 'mc'), seed=spec['seed'], progress=False)
    g = graph_of(m)
    assert all(op.kind in ('conv', 'dense') and op.layer.activation.__name__ == 'relu' for op in g.node_ops)
    event(f"CI removed nodes: {_kept(ms) < len(ms) * g.n_nodes()}")
    for i, mod in enumerate(ms):
        xc = x[concerned_inputs(y, N, E, spec['seed'], mod.class_index)]
        assert len(xc) == E
        plain = [np.asarray(v) for v in forward(g, tf.constant(xc), collect=True)]
        # `collect` returns each node layer's output before its own mask (computed from masked upstream layers)
        pre = [np.asarray(v) for v in forward(g, tf.constant(xc), masks=[mk[None] for mk in mod.masks], n_modules=1, collect=True)]
        for name, mk, v, p in zip(g.node_names, mod.masks, plain, pre):
            np.testing.assert_array_equal(mk, (v > 0).any(0), err_msg=f'CI mask of {name}')   # Algorithm 1
            np.testing.assert_array_equal(p * mk, v, err_msg=f'masked {name} differs on a concerned input')
        # hence the module's output equals the channeled parent's
        z, _ = parent_logits(m, xc)
        zu = (z.sum(1) - z[:, mod.class_index]) / (N - 1)
        pc, pu = ms[i:i + 1].predict(xc)
        np.testing.assert_allclose(pc[:, 0], sigmoid(z[:, mod.class_index] - zu), rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(module_logits([mod], xc)[:, 0], np.stack([z[:, mod.class_index], zu], 1), rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------- 4. a linear conv feeding an Add: CI can change the sum

def test_linear_conv_before_add_masking_changes_output():
    "Constructed: b = -0.5·a ≤ 0 is inactive on every input, so CI removes it, and relu(b + a) = 0.5·a becomes a."
    F = dict(dtype='float64')
    inp = keras.Input((2, 2, 1), **F)
    a = layers.Conv2D(1, 1, activation='relu', name='stem', **F)(inp)
    b = layers.Conv2D(1, 1, name='linear_conv', **F)(a)
    s = layers.ReLU(**F)(layers.Add(**F)([b, a]))
    m = keras.Model(inp, layers.Dense(3, activation='softmax', name='head', **F)(layers.Flatten(**F)(s)))
    m.get_layer('stem').set_weights([np.ones((1, 1, 1, 1)), np.zeros(1)])
    m.get_layer('linear_conv').set_weights([np.full((1, 1, 1, 1), -0.5), np.zeros(1)])
    # z = [t, 1, 0] for t = sum of the head input: parent t = 0.5·sum(x) in (0.6, 0.9) -> class 1; masked t = sum(x) -> class 0
    m.get_layer('head').set_weights([np.stack([np.ones(4), np.zeros(4), np.zeros(4)], 1), np.array([0.0, 1.0, 0.0])])
    x = np.random.default_rng(0).uniform(0.3, 0.45, size=(12, 2, 2, 1))
    y = np.repeat(np.arange(3), 4)
    E = 3
    ms = decompose(m, x, y, n_concerned=E, steps=('ci', 'mc'), progress=False)
    g = graph_of(m)
    assert g.node_names == ['stem', 'linear_conv']
    for mod in ms:
        assert mod.masks[0].all() and not mod.masks[1].any()
    mod = ms[1]
    xc = x[concerned_inputs(y, 3, E, 0, 1)]
    assert (np.asarray(forward(g, tf.constant(xc), collect=True)[1]) <= 0).all()   # why CI removed linear_conv
    h_plain = np.asarray(forward(g, tf.constant(xc)))
    h_mask = np.asarray(forward(g, tf.constant(xc), masks=[mk[None] for mk in mod.masks], n_modules=1))
    assert not np.allclose(h_mask, h_plain)
    np.testing.assert_allclose(h_mask, 2 * h_plain, rtol=1e-12)
    z, _ = parent_logits(m, xc)
    assert (z.argmax(1) == 1).all()
    pc, pu = ms.predict(xc)
    zu = (z.sum(1) - z[:, 1]) / 2
    assert np.abs(pc[:, 1] - sigmoid(z[:, 1] - zu)).min() > 1e-3      # module != channeled parent
    assert (vote(pc, pu) == 0).all()                                    # and the composed top-1 changes
    # the same modules with every node kept reproduce the parent
    assert (vote(*ModuleSet(full_modules(m)).predict(xc)) == 1).all()


def _unchanged_by_ci(g):
    "Per op: does CI provably leave its output unchanged on concerned inputs? (Masked ReLU outputs were 0; masked linear ones ≤ 0.)"
    ok = {0: True}
    for op in g.ops[1:-1]:
        same_in = all(ok[i] for i in op.inputs)
        if op.node: ok[op.idx] = same_in and op.layer.activation.__name__ == 'relu'
        elif op.kind == 'relu' and g.ops[op.inputs[0]].node: ok[op.idx] = all(ok[i] for i in g.ops[op.inputs[0]].inputs)
        else: ok[op.idx] = same_in
    return ok


RESIDUAL_MEASURE = [
    dict(shape=(10, 10, 1), convs=[dict(f=4, k=3, s=1, pad='same', act='relu')], res=dict(f=4, k=3, s=1, shortcut='identity'),
         pool=None, dense=None, top='gap', N=4),
    dict(shape=(10, 10, 2), convs=[dict(f=3, k=3, s=1, pad='same', act='relu')], res=dict(f=4, k=3, s=2, shortcut='projection'),
         pool=None, dense=None, top='gap', N=4),
    dict(shape=(9, 9, 1), convs=[dict(f=3, k=3, s=1, pad='same', act='relu'), dict(f=4, k=3, s=2, pad='valid', act='relu')],
         res=dict(f=4, k=3, s=1, shortcut='identity'), pool=dict(kind='max', p=2, s=1, pad='valid'), dense=None, top='flatten', N=3),
]


@pytest.mark.parametrize('steps', [('ci', 'mc'), ('ci', 'ti', 'mc')], ids=['ci', 'ci+ti'])
def test_residual_masking_effect_measured(steps):
    "Share of concerned inputs whose module output / module decision / composed top-1 changes on random residual models."
    E, rows = 8, []
    tot = dict(n=0, out=0, dec=0, top1=0, dp=0.0)
    for arch_i, arch in enumerate(RESIDUAL_MEASURE):
        for seed in range(3):
            spec = dict(arch, seed=100 * arch_i + seed)
            m = build(spec)
            N = spec['N']
            x, y = make_data(spec, E + 2)
            g = graph_of(m)
            ms = decompose(m, x, y, n_concerned=E, steps=steps, seed=seed, progress=False)
            full = ModuleSet(full_modules(m))
            exact = _unchanged_by_ci(g)
            n = out = dec = top1 = 0
            dp = 0.0
            for i, mod in enumerate(ms):
                c = mod.class_index
                xc = x[concerned_inputs(y, N, E, seed, c)]
                plain = [np.asarray(v) for v in forward(g, tf.constant(xc), collect=True)]
                pre = [np.asarray(v) for v in forward(g, tf.constant(xc), masks=[mk[None] for mk in mod.masks], n_modules=1, collect=True)]
                for op, mk, v, p in zip(g.node_ops, mod.masks, plain, pre):
                    assert (v[:, ~mk] <= 0).all(), f'{op.name}: a removed node is active on a concerned input'
                    if steps == ('ci', 'mc'): np.testing.assert_array_equal(mk, (v > 0).any(0))
                    if exact[op.inputs[0]]: np.testing.assert_array_equal(p, v)        # same inputs, same values
                    if exact[op.idx]: np.testing.assert_array_equal(p * mk, v)         # removed nodes were 0 anyway
                pc, pu = ms.predict(xc)
                pcf, puf = full.predict(xc)
                changed = np.abs(pc[:, i] - pcf[:, c]) > 1e-9
                flipped = (pc[:, i] > pu[:, i]) != (pcf[:, c] > puf[:, c])
                top = np.asarray([m_.class_index for m_ in ms])[vote(pc, pu)]
                moved = top != np.asarray(m(xc)).argmax(1)
                any_changed = (np.abs(pc - pcf[:, [m_.class_index for m_ in ms]]) > 1e-9).any(1)
                assert _subset(flipped, changed) and _subset(moved, any_changed)
                n += len(xc); out += int(changed.sum()); dec += int(flipped.sum()); top1 += int(moved.sum())
                dp += float(np.abs(pc[:, i] - pcf[:, c]).sum())
            rows.append((spec['seed'], n, out / n, dec / n, top1 / n, dp / n))
            for k, v in zip(('n', 'out', 'dec', 'top1', 'dp'), (n, out, dec, top1, dp)): tot[k] += v
    print(f'\n[property 4, steps={"+".join(s.upper() for s in steps if s != "mc")}] random ResNet-v1 blocks, E={E}: '
          'share of concerned inputs whose module output changes / module decision flips / composed top-1 changes; mean |Δp_c|')
    for r in rows: print(f'  model seed {r[0]:3d}: n={r[1]:3d}  output {r[2]:.3f}  decision {r[3]:.3f}  top-1 {r[4]:.3f}  |Δp_c| {r[5]:.4f}')
    t = tot['n']
    print(f'  all: n={t}  output {tot["out"] / t:.3f}  decision {tot["dec"] / t:.3f}  top-1 {tot["top1"] / t:.3f}  |Δp_c| {tot["dp"] / t:.4f}')


# ---------------------------------------------------------------- 5. seeds

@ADD
@settings(max_examples=5, **PROPS)
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
@settings(max_examples=4, **PROPS)
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
        assert a.class_index == b.class_index and a.provenance == b.provenance
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

# float32 models and atol 1e-5 here and in 6: `to_keras()` builds its NodeMask layers and 2-unit head with Keras'
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
@settings(max_examples=6, **PROPS)
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
    'tanh_conv': (lambda t: layers.Conv2D(2, 3, activation='tanh', name='tanh_conv')(t), "activation 'tanh'"),
    'tanh_act': (lambda t: layers.Activation('tanh', name='tanh_act')(layers.Conv2D(2, 3)(t)), "activation 'tanh'"),
    'sigmoid_dense': (lambda t: layers.Dense(4, activation='sigmoid', name='sigmoid_dense')(layers.Flatten()(layers.Conv2D(2, 3, activation='relu')(t))), "activation 'sigmoid'"),
    'leaky': (lambda t: layers.LeakyReLU(name='leaky')(layers.Conv2D(2, 3)(t)), 'type LeakyReLU'),
    'slope_relu': (lambda t: layers.ReLU(negative_slope=0.1, name='slope_relu')(layers.Conv2D(2, 3)(t)), 'negative_slope'),
    'deconv': (lambda t: layers.Conv2DTranspose(2, 3, name='deconv')(t), 'type Conv2DTranspose'),
}


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
