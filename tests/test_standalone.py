"Standalone modules (Keras only, compact masks) and module-set file hygiene (issue 6, items 3 and 7)."
import ast, json, os, signal, stat, subprocess, sys
from pathlib import Path

import numpy as np
import keras
from keras import layers
import pytest

import cnnmodules
from cnnmodules.data import atomic_path
from cnnmodules.decompose import decompose
from cnnmodules.graph import DecompositionError, graph_of
from cnnmodules.modularize import channel_head
from cnnmodules.models import atomic_write_bytes, resnet_v1, save_model_atomic
from cnnmodules.modules import Module, ModuleSet

PKG_ROOT = str(Path(cnnmodules.__file__).resolve().parent.parent)
QUIET = {'TF_CPP_MIN_LOG_LEVEL': '3'}


def _keras_only(code, cwd):
    "Run `code` in a fresh Python where importing cnnmodules fails and the worktree is not on the path."
    code = "import sys; sys.modules['cnnmodules'] = None\n" + code
    return subprocess.run([sys.executable, '-c', code], cwd=cwd, capture_output=True, text=True, timeout=600,
                          env={**os.environ, 'PYTHONPATH': '', **QUIET})


def _varied_parent():
    "A small CNN with every kind of node layer and shape the masks must handle."
    keras.utils.set_random_seed(3)
    inp = keras.Input((8, 8, 2))
    a = layers.Conv2D(64, 3, padding='same', activation='relu', name='a')(inp)             # 8x8x64 = 4096 nodes: 64 words
    b = layers.BatchNormalization(name='b_bn')(layers.Conv2D(64, 3, padding='same', name='b')(a))
    b = layers.ReLU(name='b_relu')(b)
    c = layers.Conv2D(64, 1, name='c')(b)
    h = layers.Activation('relu', name='add_relu')(layers.Add(name='add')([a, c]))
    h = layers.MaxPooling2D(2)(layers.ZeroPadding2D(1)(h))                               # 5x5x64
    h = layers.Conv2D(5, 3, activation='relu', name='d')(h)                                # 3x3x5 = 45 nodes
    h = layers.Dropout(0.5)(layers.Flatten()(layers.AveragePooling2D(1)(h)))
    h = layers.Dense(7, activation='relu', name='e')(h)
    m = keras.Model(inp, layers.Dense(4, activation='softmax', name='out')(h))
    bn = m.get_layer('b_bn')   # non-trivial statistics, so that a BN copied without its weights would show
    bn.set_weights([w + np.random.default_rng(0).uniform(.2, .8, w.shape).astype('float32') for w in bn.get_weights()])
    return m


def _mixed_masks(g, rng):
    "Per node layer in turn: random (bits), whole channels, everything kept."
    out = []
    for i, s in enumerate(g.node_shapes):
        if i % 3 == 0: out.append(rng.random(s) < .7)
        elif i % 3 == 1: out.append(np.broadcast_to(rng.random(s[-1]) < .6, s).copy())
        else: out.append(np.ones(s, bool))
    return out


def test_module_opens_with_keras_alone(tmp_path):
    "A saved module loads and predicts in a Python that cannot import cnnmodules, equal to the batched masked computation."
    m = _varied_parent(); g = graph_of(m)
    hk, hb = channel_head(*m.get_layer('out').get_weights(), [2])
    rng = np.random.default_rng(0)
    mods = [Module(2, 'two', _mixed_masks(g, rng), hk[0], hb[0], rng.random(7) < .8, m),
            Module(2, 'all', [rng.random(s) < .99 for s in g.node_shapes], hk[0], hb[0], np.ones(7, bool), m)]
    x = rng.normal(size=(16, 8, 8, 2)).astype('float32')
    np.save(tmp_path / 'x.npy', x)
    for i, mod in enumerate(mods):
        km = mod.to_keras(); km.save(tmp_path / f'm{i}.keras')
        cfg = json.loads(json.dumps(km.get_config()))
        modules_used = {v for v in _values(cfg, 'module')}
        assert all(v.startswith('keras') for v in modules_used), modules_used
    r = _keras_only("import numpy as np, keras\nx = np.load('x.npy')\n"
                    "for i in range(2): np.save(f'p{i}.npy', keras.saving.load_model(f'm{i}.keras').predict(x, verbose=0))",
                    tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    for i, mod in enumerate(mods):
        pc, pu = ModuleSet([mod]).predict(x)                  # compose's batched `forward` with masks: another implementation
        p = np.load(tmp_path / f'p{i}.npy')
        np.testing.assert_allclose(p[:, 0], pc[:, 0], atol=1e-5)
        np.testing.assert_allclose(p[:, 1], pu[:, 0], atol=1e-5)
    # and the masks did something: the module differs from the unmasked one
    full = Module(2, 'full', [np.ones(s, bool) for s in g.node_shapes], hk[0], hb[0], np.ones(7, bool), m)
    assert np.abs(ModuleSet([full]).predict(x)[0] - np.load(tmp_path / 'p0.npy')[:, :1]).max() > 1e-3


def _values(o, key):
    if isinstance(o, dict):
        for k, v in o.items():
            if k == key and isinstance(v, str): yield v
            yield from _values(v, key)
    elif isinstance(o, list):
        for v in o: yield from _values(v, key)


def test_masks_cost_no_ops_when_all_kept_and_one_multiply_per_channel_mask():
    "A mask that keeps every node adds nothing to the model; a whole-channel (or Dense) mask is a single multiplication."
    m = _varied_parent(); g = graph_of(m)
    hk, hb = channel_head(*m.get_layer('out').get_weights(), [0])
    all_kept = Module(0, 'a', [np.ones(s, bool) for s in g.node_shapes], hk[0], hb[0], np.ones(7, bool), m).to_keras()
    assert [o.name for o in all_kept.operations if 'mask' in o.name] == []
    rng = np.random.default_rng(1)
    chans = [np.broadcast_to(rng.random(s[-1]) < .5, s).copy() for s in g.node_shapes]
    km = Module(0, 'c', chans, hk[0], hb[0], np.ones(7, bool), m).to_keras()
    mask_ops = [o for o in km.operations if 'mask' in o.name]
    assert sorted(o.name for o in mask_ops) == sorted(f'{op.name}_mask' for op in g.node_ops)
    assert {type(o).__name__ for o in mask_ops} == {'Multiply'}


def test_standalone_module_is_compact(tmp_path):
    "On ResNet-20, masks keeping 99% of the nodes at random cost under 4 bits a node in the .keras file (float32 masks: 32)."
    m = resnet_v1(20, 10); g = graph_of(m)
    hk, hb = channel_head(*m.get_layer('predictions').get_weights(), [0])
    rng = np.random.default_rng(0)
    sizes = {}
    for k, masks in {'all': [np.ones(s, bool) for s in g.node_shapes],
                     'random': [rng.random(s) < .99 for s in g.node_shapes]}.items():
        Module(0, '0', masks, hk[0], hb[0], np.ones(hk.shape[1], bool), m).to_keras().save(tmp_path / f'{k}.keras')
        sizes[k] = (tmp_path / f'{k}.keras').stat().st_size
    m.save(tmp_path / 'parent.keras')
    assert sizes['all'] <= (tmp_path / 'parent.keras').stat().st_size
    assert 8 * (sizes['random'] - sizes['all']) / g.n_nodes() < 4


def _tiny_data():
    keras.utils.set_random_seed(0)
    inp = keras.Input((6, 6, 1)); h = layers.Conv2D(3, 3, activation='relu')(inp)
    m = keras.Model(inp, layers.Dense(3, activation='softmax')(layers.Flatten()(h)))
    x = np.random.default_rng(0).random((30, 6, 6, 1)).astype('float32'); y = np.repeat(np.arange(3), 10)
    return m, x, y


def test_load_restores_removed_and_timings(tmp_path):
    m, x, y = _tiny_data()
    ms = decompose(m, x, y, n_concerned=4, progress=False)
    assert ms.removed and ms.timings
    ms2 = ModuleSet.load(ms.save(tmp_path / 's.cnnm'))
    assert ms2.removed == ms.removed
    assert ms2.timings == ms.timings


def _mode(p): return stat.S_IMODE(os.stat(p).st_mode)


@pytest.mark.parametrize('umask, expected', [(0o022, 0o644), (0o077, 0o600)])
def test_written_files_get_the_umask_mode(tmp_path, umask, expected):
    m, _, _ = _tiny_data()
    g = graph_of(m); hk, hb = channel_head(*m.layers[-1].get_weights(), [0])
    ms = ModuleSet([Module(0, '0', [np.ones(s, bool) for s in g.node_shapes], hk[0], hb[0], np.ones(hk.shape[1], bool), m)])
    old = os.umask(umask)
    try:
        ms.save(tmp_path / 's.cnnm'); atomic_write_bytes(tmp_path / 'state.json', b'{}'); save_model_atomic(m, tmp_path / 'm.keras')
    finally: os.umask(old)
    assert [_mode(tmp_path / n) for n in ('s.cnnm', 'state.json', 'm.keras')] == [expected] * 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ['m.keras', 's.cnnm', 'state.json']   # no temporaries left


def test_next_save_removes_what_a_killed_save_left(tmp_path):
    "A writer killed with SIGKILL leaves its temporary; the next save of that path removes it and nothing else."
    target = tmp_path / 's.cnnm'
    writer = ("import sys, time\nfrom cnnmodules.data import atomic_path\n"
              f"with atomic_path({str(target)!r}) as t:\n    t.write_bytes(b'half'); print(t.name, flush=True); time.sleep(600)")
    p = subprocess.Popen([sys.executable, '-c', writer], stdout=subprocess.PIPE, text=True,
                         env={**os.environ, 'PYTHONPATH': PKG_ROOT})
    try: tmp_name = p.stdout.readline().strip()
    finally: p.send_signal(signal.SIGKILL); p.wait(60); p.stdout.close()
    assert tmp_name.startswith('s.cnnm.') and (tmp_path / tmp_name).exists()
    others = [tmp_path / f'other.cnnm.{p.pid}-0123abcd.tmp',             # another path's temporary
              tmp_path / f's.cnnm.{os.getpid()}-0123abcd.tmp',           # a running writer's (this process)
              tmp_path / 's.cnnm.bak', tmp_path / 's.cnnm.old.tmp', tmp_path / 'x.s.cnnm.1-0123abcd.tmp']
    for f in others: f.write_bytes(b'keep')
    m, _, _ = _tiny_data()
    g = graph_of(m); hk, hb = channel_head(*m.layers[-1].get_weights(), [0])
    ModuleSet([Module(0, '0', [np.ones(s, bool) for s in g.node_shapes], hk[0], hb[0], np.ones(hk.shape[1], bool), m)]).save(target)
    assert not (tmp_path / tmp_name).exists()
    assert all(f.read_bytes() == b'keep' for f in others)
    assert ModuleSet.load(target).class_names == ['0']


def test_save_model_atomic_removes_its_stale_temporary(tmp_path):
    dead = subprocess.Popen([sys.executable, '-c', 'pass']); dead.wait()
    stale = tmp_path / f'm.keras.{dead.pid}-89abcdef.tmp.keras'; stale.write_bytes(b'half')
    m, _, _ = _tiny_data()
    save_model_atomic(m, tmp_path / 'm.keras')
    assert sorted(p.name for p in tmp_path.iterdir()) == ['m.keras']


def test_save_to_a_folder_is_a_clear_error(tmp_path):
    m, _, _ = _tiny_data()
    g = graph_of(m); hk, hb = channel_head(*m.layers[-1].get_weights(), [0])
    ms = ModuleSet([Module(0, '0', [np.ones(s, bool) for s in g.node_shapes], hk[0], hb[0], np.ones(hk.shape[1], bool), m)])
    with pytest.raises(DecompositionError, match='is a folder'): ms.save(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_modules_and_compose_do_not_import_each_other_in_a_loop():
    "compose needs ModuleSet only for annotations; modules imports compose once, at the top."
    def imports(mod):
        tree = ast.parse(Path(PKG_ROOT, 'cnnmodules', f'{mod}.py').read_text())
        guarded = {id(n) for s in ast.walk(tree) if isinstance(s, ast.If) and 'TYPE_CHECKING' in ast.unparse(s.test)
                   for n in ast.walk(s)}
        out = []
        for n in ast.walk(tree):
            if isinstance(n, ast.ImportFrom) and id(n) not in guarded:
                out.append((n.module or '').split('.')[-1] + ('@top' if n in tree.body else '@nested'))
        return out
    assert not any(i.startswith('modules') for i in imports('compose'))
    assert 'compose@top' in imports('modules') and 'compose@nested' not in imports('modules')
