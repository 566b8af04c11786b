"The activation-statistics pass under tf.distribute: MirroredStrategy on two logical CPU devices gives the masks of the single-device path."
import json
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent('''
    import json, os
    import numpy as np
    import tensorflow as tf
    cpu = tf.config.list_physical_devices('CPU')[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    import keras
    from keras import layers
    from cnnmodules.decompose import decompose
    keras.utils.set_random_seed(0)
    inp = keras.Input((10, 10, 1))
    a = layers.Conv2D(4, 3, padding='same', activation='relu')(inp)
    h = layers.Conv2D(4, 3, padding='same', activation='relu')(a)
    h = layers.Conv2D(4, 3, padding='same')(h)
    x = layers.ReLU()(layers.Add()([h, a]))
    m = keras.Model(inp, layers.Dense(4, activation='softmax')(layers.Flatten()(layers.MaxPooling2D(2)(x))))
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 10, 10, 1)).astype('float32'); y = np.repeat(np.arange(4), 50)
    for c in range(4): x[y == c, c * 2:c * 2 + 3] = 0
    strategy = tf.distribute.MirroredStrategy(['/cpu:0', '/cpu:1'])
    kw = dict(n_concerned=30, steps=('ci', 'ti', 'mc', 'blc', 'bi'), delta=0.1, batch_size=16, progress=False)
    one = decompose(m, x, y, **kw)
    two = decompose(m, x, y, strategy=strategy, **kw)
    same = all(np.array_equal(a, b) for u, v in zip(one, two) for a, b in zip(u.masks, v.masks))
    removed = sum(int((~k).sum()) for u in one for k in u.masks)
    print(json.dumps({'replicas': strategy.num_replicas_in_sync, 'identical': same, 'removed': removed}))
''')


def test_mirrored_strategy_masks_identical(tmp_path):
    r = subprocess.run([sys.executable, '-c', SCRIPT], capture_output=True, text=True, timeout=600,
                       env={**__import__('os').environ, 'TF_CPP_MIN_LOG_LEVEL': '2'})
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out['replicas'] == 2
    assert out['removed'] > 0          # the comparison is not vacuous: the masks remove nodes
    assert out['identical'] is True
