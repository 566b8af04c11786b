"""The one hypothesis strategy for random small CNNs that the property and reference tests share, and the profiles.

`cnn_specs` draws 6-10 px inputs with 1-2 channels, an optional ZeroPadding2D, 1-3 Conv2D layers (kernel 1-3,
stride 1-2, 'same'/'valid', with a fused ReLU, a separate ReLU or BatchNormalization + ReLU), 0-2 ResNet-v1 residual
blocks (conv-ReLU, linear conv, Add with an identity or 1x1 strided projection shortcut, ReLU: the block's input is a
tensor read by two layers), optional max/average pooling, Flatten or GlobalAveragePooling2D, an optional hidden Dense
(+ Dropout) and a softmax head with 3-4 classes. `build` makes the Keras model with seeded random weights and small
random biases (mostly negative, so some nodes are inactive), random BatchNormalization statistics.

Profiles (environment variable CNNMODULES_HYPOTHESIS): `ci` (default) runs each property on a fixed, derandomized
set of examples, small enough for CI; `thorough` runs at least 200 random examples per property (run it before
resolving an engine change and record the result in reports/).
"""
import os

import numpy as np
import keras
from keras import layers
from hypothesis import settings, event, currently_in_test_context, strategies as st, HealthCheck

PROFILE = os.environ.get('CNNMODULES_HYPOTHESIS', 'ci')
if PROFILE not in ('ci', 'thorough'): raise ValueError(f"CNNMODULES_HYPOTHESIS must be 'ci' or 'thorough'; got {PROFILE!r}")
_COMMON = dict(deadline=None, database=None,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])


def props(n_ci:int):
    "Hypothesis settings: `n_ci` fixed examples in the ci profile, at least 200 random ones in the thorough profile."
    if PROFILE == 'thorough': return settings(max_examples=max(200, n_ci), derandomize=False, **_COMMON)
    return settings(max_examples=n_ci, derandomize=True, **_COMMON)


def _out(n, k, s, pad): return (n - k) // s + 1 if pad == 'valid' else -(-n // s)


@st.composite
def cnn_specs(draw, residual=None, fused_relu=False, shape=None, dense=None):
    """A random small CNN. `residual`: None = maybe, True = at least one, False = no Add block.
    `fused_relu`: every hidden Conv2D has activation='relu' on the layer itself. `dense`: None = maybe, False = never."""
    if shape is None: shape = (draw(st.integers(6, 10)), draw(st.integers(6, 10)), draw(st.integers(1, 2)))
    H, W, C = shape
    zeropad = None if fused_relu else draw(st.sampled_from([None, None, 1, ((0, 1), (1, 0))]))
    h, w = (H, W) if zeropad is None else ((H + 2, W + 2) if zeropad == 1 else (H + 1, W + 1))
    ch = C
    convs = []
    for _ in range(draw(st.integers(1, 3))):
        k, s = draw(st.integers(1, 3)), draw(st.integers(1, 2))
        pad = draw(st.sampled_from(['same', 'valid']))
        if pad == 'valid' and min(h, w) < k: pad = 'same'
        act = 'relu' if fused_relu else draw(st.sampled_from(['relu', 'linear+relu', 'bn+relu']))
        ch = draw(st.integers(2, 4))
        convs.append(dict(f=ch, k=k, s=s, pad=pad, act=act))
        h, w = _out(h, k, s, pad), _out(w, k, s, pad)
    blocks = []
    n_blocks = 0 if residual is False else draw(st.integers(1 if residual else 0, 2))
    for _ in range(n_blocks):
        s = draw(st.integers(1, 2))
        shortcut = 'projection' if s == 2 else draw(st.sampled_from(['identity', 'projection']))
        f = ch if shortcut == 'identity' else draw(st.integers(2, 4))
        blocks.append(dict(f=f, k=draw(st.integers(1, 3)), s=s, shortcut=shortcut))
        h, w, ch = _out(h, 1, s, 'same'), _out(w, 1, s, 'same'), f
    pool = None
    if draw(st.booleans()):
        p, s = draw(st.integers(2, 3)), draw(st.integers(1, 2))
        pad = draw(st.sampled_from(['same', 'valid']))
        if pad == 'valid' and min(h, w) < p: pad = 'same'
        pool = dict(kind=draw(st.sampled_from(['max', 'avg'])), p=p, s=s, pad=pad)
    return dict(shape=shape, zeropad=zeropad, convs=convs, blocks=blocks, pool=pool,
                dense=None if dense is False else draw(st.sampled_from([None, 3, 6])), top=draw(st.sampled_from(['flatten', 'gap'])),
                N=draw(st.integers(3, 4)), seed=draw(st.integers(0, 2 ** 16)),
                bias=draw(st.sampled_from([(-0.1, 0.15), (-0.05, 0.1), (-0.3, 0.2), (0.0, 0.05)])))


def randomize(model, seed=0, bias=(-0.1, 0.15), head='head'):
    "Small random biases (mean bias[0], sd bias[1]; the head's N(0, 0.5)) and random BatchNormalization statistics."
    rng = np.random.default_rng(seed)
    for l in model.layers:
        if isinstance(l, layers.BatchNormalization):
            C = l.moving_mean.shape[0]
            w = ([rng.uniform(0.5, 1.5, C)] if l.scale else []) + ([rng.normal(0, 0.1, C)] if l.center else [])
            l.set_weights(w + [rng.normal(0, 0.2, C), rng.uniform(0.5, 1.5, C)])
        elif getattr(l, 'use_bias', False) and l.get_weights():
            Wk, B = l.get_weights()
            l.set_weights([Wk, rng.normal(0.0, 0.5, B.shape) if l.name == head else rng.normal(bias[0], bias[1], B.shape)])
    return model


def build(spec, dtype='float64'):
    "The Keras model of `spec`, with seeded glorot kernels and `randomize`d biases."
    if currently_in_test_context():
        event(f"residual blocks: {[b['shortcut'] for b in spec['blocks']]}")
        event(f"pool: {spec['pool']['kind'] if spec['pool'] else 'none'}; dense: {bool(spec['dense'])}; top: {spec['top']}")
    D = dict(dtype=dtype)
    keras.utils.set_random_seed(spec['seed'])
    inp = keras.Input(spec['shape'], **D)
    x = inp if spec['zeropad'] is None else layers.ZeroPadding2D(spec['zeropad'], **D)(inp)
    for c in spec['convs']:
        if c['act'] == 'relu': x = layers.Conv2D(c['f'], c['k'], strides=c['s'], padding=c['pad'], activation='relu', **D)(x)
        else:
            x = layers.Conv2D(c['f'], c['k'], strides=c['s'], padding=c['pad'], **D)(x)
            if c['act'] == 'bn+relu': x = layers.BatchNormalization(**D)(x)
            x = layers.ReLU(**D)(x)
    for i, r in enumerate(spec['blocks']):    # ResNet v1: conv-ReLU, linear conv, Add(shortcut), ReLU
        h = layers.Conv2D(r['f'], r['k'], strides=r['s'], padding='same', activation='relu', **D)(x)
        h = layers.Conv2D(r['f'], r['k'], padding='same', name=f'res{i}_linear', **D)(h)
        sc = x if r['shortcut'] == 'identity' else layers.Conv2D(r['f'], 1, strides=r['s'], padding='same', name=f'res{i}_proj', **D)(x)
        x = layers.Activation('relu', **D)(layers.Add(**D)([h, sc]))
    p = spec['pool']
    if p is not None:
        Pool = layers.MaxPooling2D if p['kind'] == 'max' else layers.AveragePooling2D
        x = Pool(p['p'], strides=p['s'], padding=p['pad'], **D)(x)
    x = layers.Flatten(**D)(x) if spec['top'] == 'flatten' else layers.GlobalAveragePooling2D(**D)(x)
    if spec['dense']: x = layers.Dropout(0.1, **D)(layers.Dense(spec['dense'], activation='relu', **D)(x))
    m = keras.Model(inp, layers.Dense(spec['N'], activation='softmax', name='head', **D)(x))
    return randomize(m, spec['seed'], spec.get('bias', (-0.1, 0.15)))


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


# ---------------------------------------------------------------- issue 16: the layers of the keras.applications families

ACTS = ('relu6', 'hard_silu', 'hard_sigmoid', 'leaky_relu', 'elu', 'silu', 'gelu', 'sigmoid', 'tanh')
KINDS = ('act', 'dwconv', 'sepconv', 'gconv', 'concat', 'se', 'crop', 'layernorm', 'ops', 'relu_layer')


@st.composite
def arch_specs(draw, kinds=None):
    """A random small CNN built from the new layer kinds: a stem Conv2D, then 1-3 blocks of `kinds` (default: any),
    a top (Flatten, GlobalAveragePooling2D or GlobalMaxPooling2D, maybe a Reshape), an optional hidden Dense with a
    random activation, and a head (Dense softmax; linear Dense + Softmax layer; 1×1 Conv2D + Flatten + softmax)."""
    kinds = kinds or KINDS
    H = draw(st.integers(6, 9))
    blocks = [dict(kind=draw(st.sampled_from(kinds)), act=draw(st.sampled_from(ACTS)), fused=draw(st.booleans()),
                   c=draw(st.sampled_from([2, 4])), k=draw(st.integers(1, 3)), s=draw(st.integers(1, 2)), dm=draw(st.integers(1, 2)))
              for _ in range(draw(st.integers(1, 3)))]
    return dict(shape=(H, H, draw(st.integers(1, 2))), stem=draw(st.sampled_from(ACTS + ('relu',))), blocks=blocks,
                top=draw(st.sampled_from(['flatten', 'gap', 'gmp', 'reshape'])), dense=draw(st.sampled_from([None, 'relu', 'silu', 'tanh', 'relu6'])),
                head=draw(st.sampled_from(['dense', 'softmax_layer', 'activation', 'conv1x1'])),
                N=draw(st.integers(3, 4)), seed=draw(st.integers(0, 2 ** 16)))


def _act(x, name, D):
    if name == 'relu6': return layers.ReLU(6.0, **D)(x)
    if name == 'leaky_relu': return layers.LeakyReLU(0.2, **D)(x)
    return layers.Activation(name, **D)(x)


def build_arch(spec, dtype='float64'):
    "The Keras model of an `arch_specs` spec, seeded; the output layer is named 'head' (a Dense, or a 1×1 Conv2D)."
    from keras import ops
    if currently_in_test_context():
        event(f"blocks: {sorted({b['kind'] for b in spec['blocks']})}; top: {spec['top']}; head: {spec['head']}")
    D = dict(dtype=dtype)
    keras.utils.set_random_seed(spec['seed'])
    rng = np.random.default_rng(spec['seed'])
    inp = keras.Input(spec['shape'], **D)
    x = _act(layers.Conv2D(4, 3, padding='same', **D)(inp), spec['stem'], D)
    for b in spec['blocks']:
        k, c, a = b['kind'], b['c'], b['act']
        if k == 'act':
            x = layers.Conv2D(c, b['k'], activation=a, padding='same', **D)(x) if b['fused'] else _act(layers.Conv2D(c, b['k'], padding='same', **D)(x), a, D)
        elif k == 'relu_layer':   # ReLU variants: clipped, thresholded
            x = layers.ReLU(max_value=float(rng.choice([1.0, 6.0])), threshold=float(rng.choice([0.0, 0.05])), **D)(layers.Conv2D(c, b['k'], padding='same', **D)(x))
        elif k == 'dwconv':
            x = layers.DepthwiseConv2D(b['k'], strides=b['s'], depth_multiplier=b['dm'], padding='same', **D)(x)
            x = _act(layers.BatchNormalization(**D)(x), a, D)
        elif k == 'sepconv':
            x = layers.SeparableConv2D(c, b['k'], strides=b['s'], depth_multiplier=b['dm'], padding='same', activation=a if b['fused'] else None, **D)(x)
        elif k == 'gconv':
            x = layers.Conv2D(4, b['k'], groups=2, padding='same', **D)(layers.Conv2D(4, 1, activation='relu', **D)(x))
            x = _act(x, a, D)
        elif k == 'concat':
            p = layers.Conv2D(c, 1, activation='relu', **D)(x)
            q = _act(layers.Conv2D(2, b['k'], padding='same', **D)(x), a, D)
            x = layers.Concatenate(axis=-1 if b['fused'] else 3, **D)([p, q, x] if b['dm'] == 2 else [p, q])
        elif k == 'se':           # squeeze-excite: a gate per channel multiplies the block
            C = x.shape[-1]
            g = layers.GlobalAveragePooling2D(keepdims=True, **D)(x) if b['fused'] else layers.Reshape((1, 1, C), **D)(layers.GlobalAveragePooling2D(**D)(x))
            g = layers.Conv2D(2, 1, activation='relu', **D)(g)
            g = layers.Conv2D(C, 1, activation=('sigmoid' if b['dm'] == 1 else 'hard_sigmoid'), **D)(g)
            x = layers.Multiply(**D)([x, g])
        elif k == 'crop':
            x = layers.Cropping2D(((1, 0), (0, 1)), **D)(layers.ZeroPadding2D(1, **D)(x))
        elif k == 'layernorm':
            x = _act(layers.LayerNormalization(epsilon=1e-6, **D)(layers.Conv2D(c, b['k'], padding='same', **D)(x)), a, D)
        elif k == 'ops':          # keras.ops in the graph: a hard sigmoid written out (ReLU6(x + 3) / 6), and a residual +
            h = layers.Conv2D(x.shape[-1], 1, **D)(x)
            x = ops.add(x, ops.multiply(layers.ReLU(6.0, **D)(ops.add(h, 3.0)), 1.0 / 6.0))
    if spec['top'] == 'flatten': x = layers.Flatten(**D)(x)
    elif spec['top'] == 'gap': x = layers.GlobalAveragePooling2D(**D)(x)
    elif spec['top'] == 'gmp': x = layers.GlobalMaxPooling2D(**D)(x)
    else: x = layers.Reshape((-1,), **D)(layers.MaxPooling2D(2, padding='same', **D)(x))
    if spec['dense']: x = layers.Dense(5, activation=spec['dense'], **D)(x)
    N = spec['N']
    if spec['head'] == 'dense': out = layers.Dense(N, activation='softmax', name='head', **D)(x)
    elif spec['head'] == 'softmax_layer': out = layers.Softmax(**D)(layers.Dense(N, name='head', **D)(x))
    elif spec['head'] == 'activation': out = layers.Activation('softmax', **D)(layers.Dense(N, name='head', **D)(x))
    else:
        x = layers.Dropout(0.1, **D)(layers.Reshape((1, 1, x.shape[-1]), **D)(x))
        out = layers.Activation('softmax', **D)(layers.Flatten(**D)(layers.Conv2D(N, 1, name='head', **D)(x)))
    m = keras.Model(inp, out)
    for l in m.layers:   # random BatchNormalization statistics, small random biases (mostly negative: some nodes inactive)
        if isinstance(l, layers.BatchNormalization):
            C = l.moving_mean.shape[0]
            l.set_weights([rng.uniform(0.5, 1.5, C), rng.normal(0, 0.1, C), rng.normal(0, 0.2, C), rng.uniform(0.5, 1.5, C)])
        elif getattr(l, 'use_bias', False) and l.get_weights() and not isinstance(l, layers.LayerNormalization):
            w = l.get_weights()
            w[-1] = rng.normal(0.0, 0.5, w[-1].shape) if l.name == 'head' else rng.normal(-0.1, 0.15, w[-1].shape)
            l.set_weights(w)
    return m


def head_logits(model, x):
    "The parent's pre-softmax logits (n, N) and head inputs, from a Keras sub-model to the layer named 'head' (independent of the engine)."
    head = model.get_layer('head')
    h = np.asarray(keras.Model(model.inputs[0], head.input)(x)).reshape(len(x), -1)
    W = np.asarray(head.kernel).reshape(-1, head.kernel.shape[-1])
    return h @ W + np.asarray(head.bias), h
