"""The fast engine equals the literal NumPy reference of Algorithms 1, 2 and 3 (`cnnmodules.reference`).

Tiny float64 models (so no round-off can move a node across 0), random kernels, small random biases and random
inputs with class-dependent blank regions (so some nodes are always inactive, position by position, and MC-BI
has something to remove). For each model and both node rules: CI, CI+TI, MC-BLN and MC-BI kept nodes, fast == reference.
"""
import numpy as np
import pytest
import keras
from keras import layers
from hypothesis import given, strategies as st

from cnn_strategies import cnn_specs, build, props, randomize as _randomize

from cnnmodules.graph import LayerGraph
from cnnmodules.concern import sample_inputs, activation_counts, kept_nodes
from cnnmodules.modularize import modularize
from cnnmodules.reference import reference_kept, reference_mc_bi, reference_mc_bln, node_layer_names

F64 = dict(dtype='float64')


def randomize(model, seed=0, bias=(-0.15, 0.1)):
    "Small random biases (mean bias[0], sd bias[1]) and random BatchNormalization statistics (the shared helper, these biases)."
    return _randomize(model, seed, bias, head=None)


def make_data(shape, n_classes, per_class, seed=0, border=1):
    "Random inputs with a blank border (as MNIST) and, per class, a different blank band of rows or columns (zero input -> conv output = bias)."
    rng = np.random.default_rng(seed)
    H, W = shape[:2]
    x = rng.normal(size=(n_classes * per_class,) + tuple(shape))
    if border:
        x[:, :border] = 0; x[:, H - border:] = 0; x[:, :, :border] = 0; x[:, :, W - border:] = 0
    y = np.repeat(np.arange(n_classes), per_class)
    for c in range(n_classes):
        xs = x[y == c]
        if c % 2 == 0: xs[:, (c * H) // (2 * n_classes):(c * H) // (2 * n_classes) + H // 2] = 0
        else: xs[:, :, W - (c * W) // (2 * n_classes) - W // 2:W - (c * W) // (2 * n_classes)] = 0
        x[y == c] = xs
    return x, y


def check(model, x, y, E, classes=None, seed=0, linear_nodes='backtrack', delta=0.2):
    "Fast == reference for CI, CI+TI, MC-BLN and MC-BI; returns (fraction of nodes kept after CI+TI, nodes MC-BI removed)."
    g = LayerGraph(model, linear_nodes)
    N = g.num_classes
    assert node_layer_names(model, linear_nodes) == g.node_names
    s = sample_inputs(y, N, E, classes=classes, seed=seed)
    cnt = activation_counts(g, x, s, batch_size=64, progress=False)
    for steps in [('ci',), ('ci', 'ti')]:
        fast, ref = kept_nodes(cnt, steps), reference_kept(model, x, s, steps, linear_nodes)
        assert len(fast) == len(ref)
        for name, a, b in zip(g.node_names, fast, ref):
            assert a.shape == b.shape, (steps, name)
            np.testing.assert_array_equal(a, b, err_msg=f'{steps} {name}')
    bi = 0
    for steps in [('ci', 'mc', 'bi'), ('ci', 'ti', 'mc', 'bi'), ('ci', 'ti', 'mc', 'blc'), ('ci', 'ti', 'mc', 'blc', 'bi')]:
        keep = kept_nodes(cnt, steps)
        fast, hk, _, hkeep, removed = modularize(g, keep, s.classes, steps=steps, delta=delta)
        ref, ref_hkeep = reference_kept(model, x, s, steps, linear_nodes), None
        if 'blc' in steps:
            ref, ref_hkeep = reference_mc_bln(model, ref, hk, delta, linear_nodes)
            np.testing.assert_array_equal(hkeep, ref_hkeep)
        if 'bi' in steps: ref = reference_mc_bi(model, ref, head_keep=ref_hkeep, linear_nodes=linear_nodes)
        for name, a, b in zip(g.node_names, fast, ref):
            np.testing.assert_array_equal(a, b, err_msg=f'{steps} {name}')
        bi += removed.get('bi', 0)
    frac = sum(k.sum() for k in keep) / max(1, sum(k.size for k in keep))   # a model without node layers: 0
    return frac, bi


# ---------------------------------------------------------------- fixed models

def seq_model():
    keras.utils.set_random_seed(1)
    m = keras.Sequential([keras.Input((9, 9, 1), **F64),
                          layers.Conv2D(3, 3, padding='same', activation='relu', **F64),
                          layers.Conv2D(3, 3, strides=2, padding='valid', activation='relu', **F64),
                          layers.MaxPooling2D(2, **F64),
                          layers.Flatten(**F64),
                          layers.Dense(4, activation='relu', **F64),
                          layers.Dense(3, activation='softmax', **F64)])
    return randomize(m, 1)


def seq_avg_model():
    keras.utils.set_random_seed(2)
    m = keras.Sequential([keras.Input((8, 7, 2), **F64),
                          layers.Conv2D(3, 2, strides=2, padding='same', **F64),
                          layers.ReLU(**F64),
                          layers.AveragePooling2D(2, strides=1, padding='same', **F64),
                          layers.Conv2D(2, 3, padding='valid', activation='relu', **F64),
                          layers.MaxPooling2D(3, strides=2, padding='same', **F64),
                          layers.GlobalAveragePooling2D(**F64),
                          layers.Dense(4, activation='softmax', **F64)])
    return randomize(m, 2)


def bn_model():
    keras.utils.set_random_seed(3)
    inp = keras.Input((8, 8, 1), **F64)
    h = layers.Conv2D(3, 3, padding='same', use_bias=False, **F64)(inp)
    h = layers.Activation('relu', **F64)(layers.BatchNormalization(scale=False, **F64)(h))
    h = layers.Conv2D(3, 3, strides=2, padding='same', **F64)(h)
    h = layers.ReLU(**F64)(layers.BatchNormalization(**F64)(h))
    h = layers.Dropout(0.2, **F64)(h)
    h = layers.Dense(4, **F64)(layers.Flatten(**F64)(h))
    h = layers.ReLU(**F64)(layers.BatchNormalization(center=False, **F64)(h))
    return randomize(keras.Model(inp, layers.Dense(3, activation='softmax', **F64)(h)), 3)


def zeropad_model():
    keras.utils.set_random_seed(4)
    inp = keras.Input((7, 8, 1), **F64)
    h = layers.ZeroPadding2D(((1, 2), (2, 1)), **F64)(inp)
    h = layers.Conv2D(3, 3, strides=2, padding='valid', activation='relu', **F64)(h)
    h = layers.ZeroPadding2D(1, **F64)(h)
    h = layers.Conv2D(2, 2, strides=2, padding='valid', activation='relu', **F64)(h)
    h = layers.Flatten(**F64)(h)
    return randomize(keras.Model(inp, layers.Dense(3, activation='softmax', **F64)(h)), 4)


def residual_model():
    keras.utils.set_random_seed(5)
    inp = keras.Input((8, 8, 2), **F64)
    a = layers.Conv2D(3, 3, padding='same', activation='relu', name='stem', **F64)(inp)
    # identity block
    h = layers.Conv2D(3, 3, padding='same', activation='relu', name='b1c1', **F64)(a)
    h = layers.Conv2D(3, 3, padding='same', name='b1c2', **F64)(h)
    a = layers.Activation('relu', **F64)(layers.Add(**F64)([h, a]))
    # strided block with a 1x1 strided projection shortcut
    h = layers.Conv2D(4, 3, strides=2, padding='same', activation='relu', name='b2c1', **F64)(a)
    h = layers.Conv2D(4, 3, padding='same', name='b2c2', **F64)(h)
    s = layers.Conv2D(4, 1, strides=2, name='b2proj', **F64)(a)
    a = layers.ReLU(**F64)(layers.Add(**F64)([h, s]))
    a = layers.AveragePooling2D(2, **F64)(a)
    h = layers.Dense(5, activation='relu', name='d1', **F64)(layers.Flatten(**F64)(a))
    return randomize(keras.Model(inp, layers.Dense(4, activation='softmax', **F64)(h)), 5)


def residual_bn_model():
    "ResNet-v1 style: conv-BN-ReLU, conv-BN, projection conv-BN, Add, ReLU, 'same' max pooling, GAP."
    keras.utils.set_random_seed(6)
    inp = keras.Input((9, 9, 1), **F64)
    x = layers.ZeroPadding2D(1, **F64)(inp)
    a = layers.Conv2D(2, 3, strides=2, padding='valid', activation='relu', name='stem', **F64)(x)
    h = layers.Conv2D(3, 3, strides=2, padding='same', name='c1', **F64)(a)
    h = layers.ReLU(**F64)(layers.BatchNormalization(name='bn1', **F64)(h))
    h = layers.Conv2D(3, 3, padding='same', name='c2', **F64)(h)
    h = layers.BatchNormalization(name='bn2', **F64)(h)
    s = layers.Conv2D(3, 1, strides=2, padding='valid', name='proj', **F64)(a)
    s = layers.BatchNormalization(name='bnp', **F64)(s)
    x = layers.ReLU(**F64)(layers.Add(**F64)([h, s]))
    x = layers.MaxPooling2D(2, padding='same', **F64)(x)
    x = layers.GlobalAveragePooling2D(**F64)(x)
    return randomize(keras.Model(inp, layers.Dense(3, activation='softmax', **F64)(x)), 6)


FIXED = [(seq_model, 3, 6, None), (seq_avg_model, 4, 6, None), (bn_model, 3, 5, None), (zeropad_model, 3, 4, None),
         (residual_model, 4, 6, None), (residual_bn_model, 3, 6, [0, 2])]


@pytest.mark.parametrize('build,N,E,classes', FIXED, ids=[f[0].__name__ for f in FIXED])
def test_fixed_models(build, N, E, classes):
    m = build()
    x, y = make_data(m.inputs[0].shape[1:], N, E + 2, seed=N + E)
    for rule in ('backtrack', 'paper'):
        frac, bi = check(m, x, y, E, classes, linear_nodes=rule)
        assert 0 < frac < 1          # some nodes removed by CI+TI, some kept: the comparison is not vacuous


def test_mc_bi_removes_something():
    "Across the fixed models MC-BI does remove nodes (so its comparison is not vacuous either)."
    removed = {}
    for build_fixed, N, E, classes in FIXED:
        m = build_fixed()
        x, y = make_data(m.inputs[0].shape[1:], N, E + 2, seed=N + E)
        removed[build_fixed.__name__] = check(m, x, y, E, classes)[1]
    assert sum(v > 0 for v in removed.values()) >= 3, removed


def test_resnet8_mc_bi():
    "The library's ResNet v1 (depth 8, identity and strided 1x1 projection shortcuts, BN) under random position masks."
    from cnnmodules.models import resnet_v1
    keras.utils.set_random_seed(0)
    m = resnet_v1(8, 3, input_shape=(8, 8, 1), batch_norm=True)
    g = LayerGraph(m)
    rng = np.random.default_rng(0)
    keep = [(rng.random((2,) + s[:-1] + (1,)) < 0.6) & (rng.random((2,) + s) < 0.9) for s in g.node_shapes]
    fast = modularize(g, keep, [0, 2], steps=('ci', 'ti', 'mc', 'bi'))[0]
    for name, a, b in zip(g.node_names, fast, reference_mc_bi(m, keep)):
        np.testing.assert_array_equal(a, b, err_msg=name)


# ---------------------------------------------------------------- random architectures (tests/cnn_strategies.py)

@props(15)
@given(cnn_specs(), st.integers(3, 6))
def test_random_architectures(spec, E):
    m = build(spec)
    x, y = make_data(spec['shape'], spec['N'], E + 1, seed=spec['seed'])
    for rule in ('backtrack', 'paper'):
        check(m, x, y, E, seed=spec['seed'], linear_nodes=rule)


# ---------------------------------------------------------------- issue 16: the new layer kinds the reference computes

from cnn_strategies import arch_specs, build_arch

REF_KINDS = ('act', 'relu_layer', 'dwconv', 'sepconv', 'gconv', 'concat', 'se', 'crop', 'layernorm')   # all but keras.ops calls


@props(15)
@given(st.data(), st.integers(3, 5))
def test_new_layer_kinds_against_the_reference(data, E):
    """Clipped/hard/smooth activations, ReLU layers with max_value/threshold, DepthwiseConv2D (depth multiplier 1-2),
    SeparableConv2D, grouped Conv2D, Concatenate, squeeze-excite (GlobalAveragePooling2D with keepdims or a Reshape,
    a Multiply), Cropping2D, LayerNormalization, GlobalMaxPooling2D, a Reshape top and Softmax heads: the reference's
    float64 forward pass gives the Keras model's head inputs, and CI, CI+TI, MC-BLN and MC-BI of the engine equal the
    literal reference (exact node rule; a 1×1-conv head, which the reference does not compute, is drawn as a Dense)."""
    from cnn_strategies import head_logits
    from cnnmodules.reference import reference_values, reference_layers
    spec = data.draw(arch_specs(kinds=REF_KINDS), label='spec')
    spec = {**spec, 'head': 'dense' if spec['head'] == 'conv1x1' else spec['head']}
    m = build_arch(spec)
    x, y = make_data(spec['shape'], spec['N'], E + 1, seed=spec['seed'])
    order = reference_layers(m)
    _, h = head_logits(m, x[:1])
    np.testing.assert_allclose(reference_values(m, x[0], order)[order[-1].inputs[0]].reshape(-1), h[0], rtol=1e-6, atol=1e-9)   # float64, but Keras keeps some constants (a LeakyReLU slope) in float32
    check(m, x, y, E, seed=spec['seed'])
