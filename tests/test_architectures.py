"""Issue 16: the `keras.applications` families, decomposed soundly.

Each family is built untrained (`weights=None`) at the smallest input it allows with four classes; its
BatchNormalization statistics are set from one batch of random images (an untrained network otherwise gives every
input the same output: argmax ties). Three random images are given once to every class, so each module observes
all of them: under the default node rule with CI, TI, channeling and MC-BI (backtracking, which never changes an
output), every module reproduces its channeled parent on them, and the composed vote must give the parent's argmax
exactly. The standalone masked export and the slim export must both compute what the engine computes.

Cost per family, measured on the shared 2-core machine (seconds, test call): ConvNeXtTiny 13, VGG16 27,
EfficientNetV2B0 27, Xception 31, EfficientNetB0 33, MobileNetV2 64, InceptionV3 74-114, ResNet50V2 75, ResNet50 81,
NASNetMobile 92-143, DenseNet121 132 (MobileNet and MobileNetV3Small about a minute), most of it TensorFlow tracing
graphs of 100-800 layers: about 15 minutes for all; on a quieter moment 3.4 minutes for all thirteen (DenseNet121
38 s, NASNetMobile 36 s, the others 5-20 s). The normal suite runs `QUICK`; `CNNMODULES_FAMILIES=all` runs
every family (all thirteen passed when this was written).
"""
import os

import numpy as np
import pytest
import keras

from cnnmodules.graph import graph_of, DecompositionError
from cnnmodules.decompose import decompose
from cnnmodules.compose import module_logits, vote_margin, calibration_of

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning")

# family -> smallest square input it builds at
FAMILIES = {'VGG16': 32, 'ResNet50': 32, 'ResNet50V2': 32, 'MobileNet': 32, 'MobileNetV2': 32, 'MobileNetV3Small': 32,
            'DenseNet121': 32, 'EfficientNetB0': 32, 'EfficientNetV2B0': 32, 'Xception': 71, 'InceptionV3': 75,
            'NASNetMobile': 32, 'ConvNeXtTiny': 32}
QUICK = ('VGG16', 'MobileNetV3Small', 'ConvNeXtTiny')   # the slim path; ops, squeeze-excite and a 1×1-conv head; nesting, LayerNorm, groups
ALL = os.environ.get('CNNMODULES_FAMILIES', '') == 'all'


def family_model(name, classes=4, seed=0):
    "The untrained family model, BatchNormalization statistics set from one batch of random images."
    s = FAMILIES[name]
    keras.utils.set_random_seed(seed)
    m = getattr(keras.applications, name)(weights=None, input_shape=(s, s, 3), classes=classes)
    bns = [l for l in m._flatten_layers() if isinstance(l, keras.layers.BatchNormalization)]
    for l in bns: l.momentum = 0.0
    if bns: m(np.random.default_rng(seed + 1).uniform(0, 255, (16, s, s, 3)).astype('float32'), training=True)
    return m


@pytest.mark.parametrize('name', list(FAMILIES))
def test_family_decomposes_soundly(name):
    if name not in QUICK and not ALL: pytest.skip('heavy: set CNNMODULES_FAMILIES=all')
    m = family_model(name)
    g = graph_of(m)
    s = FAMILIES[name]
    x3 = np.random.default_rng(2).uniform(0, 255, (3, s, s, 3)).astype('float32')
    x, y = np.tile(x3, (4, 1, 1, 1)), np.repeat(np.arange(4), 3)     # every class sees the same three images
    ms = decompose(m, x, y, n_concerned=3, steps=('ci', 'ti', 'mc', 'bi'), progress=False)
    assert len(ms) == 4 and all(0 < mod.kept_fraction() <= 1 for mod in ms)
    z = module_logits(ms, x3)                                        # logits: an untrained net's softmax saturates (ties at 1.0)
    parent = np.asarray(m(x3)).argmax(1)
    np.testing.assert_array_equal(vote_margin(z[..., 0] - z[..., 1]), parent)
    a, b = calibration_of(ms[1])                                     # the module's calibration map, folded into its .keras head
    pc1 = 0.5 * (1 + np.tanh((a * (z[:, 1, 0] - z[:, 1, 1]) + b) / 2))   # p_concerned, without overflow
    np.testing.assert_allclose(np.asarray(ms[1].to_keras()(x3))[:, 0], pc1, rtol=1e-4, atol=1e-5)
    slim = ms[1].to_keras(slim=True)                                # every family exports slim (spaces it cannot cut stay whole)
    np.testing.assert_allclose(np.asarray(slim(x3))[:, 0], pc1, rtol=1e-4, atol=1e-5)
    assert ms[1].size()['params'] == slim.count_params() <= m.count_params()
    print(name, g, f'kept {np.mean([mod.kept_fraction() for mod in ms]):.3f}')


def test_refusals_name_the_layer():
    "What is still refused says which layer and why."
    inp = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(4, 3, dilation_rate=2, activation='relu', name='dil')(inp)
    m = keras.Model(inp, keras.layers.Dense(2, activation='softmax')(keras.layers.GlobalAveragePooling2D()(x)))
    with pytest.raises(DecompositionError, match="'dil'.*dilation_rate"): graph_of(m)
    x = keras.layers.Conv2D(4, 3, activation='relu')(inp)
    x = keras.layers.Concatenate(axis=1, name='rows')([x, x])
    m = keras.Model(inp, keras.layers.Dense(2, activation='softmax')(keras.layers.GlobalAveragePooling2D()(x)))
    with pytest.raises(DecompositionError, match="'rows'.*only the last"): graph_of(m)


import json
from conftest import needs_data, run_experiment

@needs_data('cifar10-jpeg.zip')
def test_architectures_notebook(tmp_path):
    "nbs/experiments/architectures.ipynb under papermill at its CI-sized defaults."
    pytest.importorskip('papermill')
    run_experiment('architectures.ipynb', tmp_path / 'out.ipynb', out_dir=str(tmp_path / 'arch'))
    m = json.loads((tmp_path / 'arch' / 'metrics.json').read_text())
    (row,) = m['rows']
    assert row['accepted'] and row['nodes'] > 0 and 0 < row['kept_share'] <= 1
    assert 0 <= row['argmax_agreement'] <= 1 and 0 <= row['composed_top1'] <= 1 and row['module_file_mb'] > 0
    assert row['disagreements'] == round((1 - row['argmax_agreement']) * 40)         # 4 classes × 10 test images
    assert row['decompose_s'] > 0 and row['predict_s'] > 0 and row['decompose_cold_s'] > 0
    assert row['decompose_over_predict'] == pytest.approx(row['decompose_s'] / row['predict_s'])
    assert set(row['unseen']) == {'calibrated', 'paper'}
    assert (tmp_path / 'arch' / 'table.md').exists() and (tmp_path / 'arch' / 'architectures.png').exists()
    # a second run with the same parameters resumes: the family done is not trained again (its timings are kept as they were)
    run_experiment('architectures.ipynb', tmp_path / 'again.ipynb', out_dir=str(tmp_path / 'arch'))
    (again,) = json.loads((tmp_path / 'arch' / 'metrics.json').read_text())['rows']
    assert again['train_s'] == row['train_s'] and again['decompose_s'] == row['decompose_s']
    # a family whose recipe is overridden is trained again with it, and its row records the recipe it was made with
    run_experiment('architectures.ipynb', tmp_path / 'other.ipynb', out_dir=str(tmp_path / 'arch'),
                   recipes={'MobileNetV3Small': {'learning_rate': 0.002}})
    (other,) = json.loads((tmp_path / 'arch' / 'metrics.json').read_text())['rows']
    assert row['recipe']['learning_rate'] == 1e-3 and other['recipe']['learning_rate'] == 0.002
    assert other['train_s'] != row['train_s']
