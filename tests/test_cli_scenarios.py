"The scenario subcommands as a user runs them (through `cnnmodules.cli.main` in this process, conftest.cli_main): train → decompose → evaluate, compose, replace, update, run, and bad input."
import json, os, subprocess, sys
from pathlib import Path

import numpy as np
import pytest
from conftest import cli_main, write_mnist_like

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / 'shared' / 'data'   # the offline copies, when this is a checkout beside them (nothing here needs them)

def run(args, cwd):
    "`cnnmodules ARGS` in `cwd` with a private cache, in this process: the CompletedProcess."
    env = {**os.environ, 'CNNMODULES_CACHE': str(Path(cwd) / 'cache')}
    if SHARED.is_dir(): env['CNNMODULES_DATA'] = str(SHARED)
    return cli_main(args, cwd, env)

def ok(r):
    assert r.returncode == 0, r.stderr[-3000:]
    assert 'Traceback' not in r.stderr
    return r

@pytest.fixture(scope='module')
def work(tmp_path_factory):
    "Two digits models of different seeds, trained and decomposed through the command line."
    d = tmp_path_factory.mktemp('cli')
    for seed in (0, 1):
        ok(run(['train', '--data', 'digits', '--epochs', 5, '--seed', seed, '--out', f'm{seed}.keras', '--quiet'], d))
        ok(run(['decompose', f'm{seed}.keras', '--data', 'digits', '--out', f's{seed}.cnnm', '--n-concerned', 100], d))
    return d

def own_top1(path):
    "The model's test top-1 on digits, measured without cnnmodules' evaluation code: Keras' own loader and predict."
    import keras
    from cnnmodules.data import load_dataset
    d = load_dataset('digits')
    m = keras.saving.load_model(path)
    p = m.predict(d.x_test.astype('float32'), verbose=0).argmax(1)
    return float((p == d.y_test).mean())

def test_train_decompose_evaluate(work):
    r = json.loads(ok(run(['evaluate', 's0.cnnm', '--data', 'digits', '--json'], work)).stdout)
    m = json.loads(ok(run(['evaluate', 'm0.keras', '--data', 'digits', '--json'], work)).stdout)
    own = own_top1(work / 'm0.keras')
    print(f'composed top-1 {r["top1"]:.4f}, model via cnnmodules {m["top1"]:.4f}, model via Keras {own:.4f}')
    assert r['kind'] == 'modules' and m['kind'] == 'model' and r['n'] == m['n'] == 360
    assert {'top1', 'top5', 'voters', 'jaccard'} <= set(r)
    assert abs(m['top1'] - own) < 1e-9                   # the command scores the model as Keras does
    assert own > 0.5 and abs(r['top1'] - own) <= 0.03      # five epochs learn digits; the modules keep the model's accuracy
    sub = json.loads(ok(run(['evaluate', 's0.cnnm:3,5', '--data', 'digits', '--json'], work)).stdout)
    assert sub['classes'] == ['3', '5'] and sub['n'] == 74
    assert json.loads(ok(run(['evaluate', 's0.cnnm', '--classes', '3,5', '--data', 'digits', '--json'], work)).stdout) == sub

def test_compose_and_replace_round_trip(work):
    from cnnmodules.modules import ModuleSet
    ok(run(['compose', 's0.cnnm:0,1,2,3,4', 's1.cnnm:5,6,7,8,9', '--out', 'c.cnnm'], work))
    c = ModuleSet.load(work / 'c.cnnm')
    assert c.class_names == [str(i) for i in range(10)] and len(c.parents()) == 2
    assert [m.parent is c.parents()[0] for m in c] == [True] * 5 + [False] * 5
    r = json.loads(ok(run(['evaluate', 'c.cnnm', '--data', 'digits', '--json'], work)).stdout)
    assert r['n'] == 360 and r['top1'] > 0.3
    ok(run(['replace', 's0.cnnm', '--class', 3, '--with', 's1.cnnm', '--out', 'r.cnnm'], work))
    s0, s1, rs = (ModuleSet.load(work / f) for f in ('s0.cnnm', 's1.cnnm', 'r.cnnm'))
    assert rs[3].provenance['replaced_from']['parent_hash'] == s1[3].provenance['parent_hash'] != s0[3].provenance['parent_hash']
    assert rs[3].provenance['replaces']['position'] == 3
    for i in (3, 4):
        src = s1 if i == 3 else s0
        assert all((a == b).all() for a, b in zip(rs[i].masks, src[i].masks)) and np.array_equal(rs[i].head_kernel, src[i].head_kernel)
    ok(run(['compose', 's0.cnnm:0,1,2,3', '--out', 'four.cnnm'], work))       # no module of 5: position 3 may become a 5
    ok(run(['replace', 'four.cnnm', '--class', '3', '--with', 's1.cnnm:5', '--out', 'r5.cnnm'], work))
    assert ModuleSet.load(work / 'r5.cnnm').class_names == ['0', '1', '2', '5']

def test_update(work):
    from cnnmodules.modules import ModuleSet
    ok(run(['decompose', 'm0.keras', '--data', 'digits:0,1', '--out', 'lo.cnnm', '--n-concerned', 50], work))
    ok(run(['update', 'lo.cnnm', '--foreign', 'digits:7', '--per-class', 30, '--out', 'lo_h.cnnm'], work))
    ok(run(['update', 'lo.cnnm', '--foreign', 'digits:7', '--per-class', 30, '--method', 'tangling', '--out', 'lo_t.cnnm'], work))
    h, t, lo = (ModuleSet.load(work / f) for f in ('lo_h.cnnm', 'lo_t.cnnm', 'lo.cnnm'))
    rec = h[0].provenance['updates'][-1]
    assert rec['method'] == 'head' and rec['foreign_inputs'] == 30 and rec['head_refit']['concerned'] == 30
    assert not np.array_equal(h[0].head_kernel, lo[0].head_kernel)
    assert t[1].provenance['updates'][-1]['nodes_after'] >= t[1].provenance['updates'][-1]['nodes_before']

BAD = [(['evaluate', 'missing.cnnm', '--data', 'digits'], 2, 'no module set or Keras model file'),
       (['evaluate', 's0.cnnm:cat', '--data', 'digits'], 1, "unknown class 'cat'"),
       (['evaluate', 's0.cnnm', '--data', 'digits:cat'], 1, "unknown class 'cat'"),
       (['evaluate', 'corrupt.cnnm', '--data', 'digits'], 1, 'not a readable module set'),
       (['decompose', 'corrupt.keras', '--data', 'digits', '--out', 'x.cnnm'], 1, 'not a readable Keras model'),
       (['train', '--data', 'digits', '--epochs', 0, '--out', 'x.keras'], 2, '--epochs'),
       (['train', '--data', 'digits', '--depth', 21, '--epochs', 1, '--out', 'x.keras'], 2, '6n+2'),
       (['train', '--data', 'nosuchdata', '--epochs', 1, '--out', 'x.keras'], 1, "unknown dataset 'nosuchdata'"),
       (['decompose', 'm0.keras', '--data', 'digits', '--steps', 'ci,ti', '--out', 'x.cnnm'], 2, 'mc'),
       (['compose', 's0.cnnm', 'small.cnnm', '--out', 'x.cnnm'], 1, 'input shapes match'),
       (['replace', 's0.cnnm', '--class', 12, '--with', 's1.cnnm', '--out', 'x.cnnm'], 1, 'out of range'),
       (['update', 's0.cnnm', '--foreign', 'mnistlike:5', '--out', 'x.cnnm'], 1, 'shape (28, 28, 1)'),
       (['replace', 's0.cnnm', '--class', 3, '--with', 's1.cnnm:5', '--out', 'x.cnnm'], 1, "two modules of class '5'"),
       (['compose', 's0.cnnm', '--out', 'afile/x.cnnm'], 2, '--out'),
       (['run', 'nosuch'], 2, 'unknown experiment'),
       (['run', 'train_resnet', '-p', 'nosuch', '1'], 2, "no parameter 'nosuch'")]

@pytest.fixture(scope='module')
def small_set(work):
    "A module set of a 6×6 model, whose inputs do not match the digits sets."
    from cnnmodules.models import small_cnn
    from cnnmodules.graph import graph_of
    from cnnmodules.modules import Module, ModuleSet
    m = small_cnn(10, (6, 6, 1))
    ModuleSet([Module(0, '0', [np.ones(s, bool) for s in graph_of(m).node_shapes], np.zeros((64, 2), 'float32'),
                      np.zeros(2, 'float32'), np.ones(64, bool), m)]).save(work / 'small.cnnm')
    (work / 'corrupt.cnnm').write_bytes((work / 's0.cnnm').read_bytes()[:5000])
    (work / 'corrupt.keras').write_bytes(b'not a model')
    (work / 'afile').write_text('a file, not a folder')
    write_mnist_like(work / 'mnistlike')

@pytest.mark.parametrize('args,status,msg', BAD, ids=[' '.join(map(str, a)) for a, _, _ in BAD])
def test_bad_input_is_one_line_and_writes_nothing(work, small_set, args, status, msg):
    before = sorted(p.name for p in work.iterdir() if p.name != 'cache')   # the dataset cache may be filled
    r = run(args, work)
    assert r.returncode == status, (r.returncode, r.stderr[-2000:])
    lines = [l for l in r.stderr.strip().splitlines() if l.strip()]
    assert len(lines) == 1 and 'Traceback' not in r.stderr, r.stderr[-2000:]
    assert msg in lines[0], lines[0]
    assert sorted(p.name for p in work.iterdir() if p.name != 'cache') == before, 'a file was written'
    print(lines[0])

def test_run_lists_experiments(tmp_path):
    r = ok(run(['run'], tmp_path))
    names = {l.split(':')[0] for l in r.stdout.splitlines()}
    assert names == {p.stem for p in (REPO / 'nbs' / 'experiments').glob('*.ipynb')}
    assert 'epochs=' in r.stdout

@pytest.mark.parametrize('cmd', ['train', 'decompose', 'evaluate', 'compose', 'replace', 'update', 'run'])
def test_help_has_an_example_and_imports_no_tensorflow(cmd):
    code = f'''
import sys
from cnnmodules.cli import main
try: main([{cmd!r}, '--help'])
except SystemExit as e: assert e.code == 0
print('HEAVY', sorted(m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'keras')))
'''
    r = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=120, env={**os.environ, 'PYTHONPATH': str(REPO)})
    assert 'example:\n  cnnmodules ' + cmd in r.stdout, r.stdout
    assert 'HEAVY []' in r.stdout, r.stdout[-500:]
