"""What a new user hit (issue 14 §6), run as a user runs the command — through `cnnmodules.cli.main` in this process
(conftest.cli_main), and in a process of its own where the process matters (another copy of the package, a terminal):
data it cannot find or use, sets it must not build, paths it cannot write — each one line, the right status, nothing
written — progress on long work, and the README's command-line block as written."""
import json, os, re, shlex, shutil, subprocess, sys, tempfile
from pathlib import Path

import numpy as np
import pytest
from conftest import cli_main, write_mnist_like

REPO = Path(__file__).resolve().parents[1]
MAIN = 'import sys; from cnnmodules.cli import main; sys.exit(main())'
NO_NET = {'HTTPS_PROXY': 'http://127.0.0.1:9', 'HTTP_PROXY': 'http://127.0.0.1:9', 'https_proxy': 'http://127.0.0.1:9',
          'http_proxy': 'http://127.0.0.1:9', 'NO_PROXY': '', 'no_proxy': ''}   # every download is refused at once

def env_for(cwd, **extra):
    "The environment of a run: this worktree's package, a private cache, no `CNNMODULES_DATA` unless given."
    e = {**os.environ, 'PYTHONPATH': str(REPO), 'CNNMODULES_CACHE': str(Path(cwd) / 'cache')}
    e.pop('CNNMODULES_DATA', None)
    e.update(extra)
    return e

def run(args, cwd, **extra):
    "`cnnmodules ARGS` in `cwd` with `env_for`'s environment, in this process (no TensorFlow start-up per call)."
    return cli_main(args, cwd, env_for(cwd, **extra))

def run_process(args, cwd, timeout=600, **extra):
    "The same in a process of its own: for a run whose package is another copy (its PYTHONPATH)."
    return subprocess.run([sys.executable, '-c', MAIN, *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          env=env_for(cwd, **extra), cwd=cwd)

def ok(r):
    assert r.returncode == 0, r.stderr[-3000:]
    assert 'Traceback' not in r.stderr
    return r

def one_line(r, status, *msgs):
    "The run failed with `status` and exactly one non-empty stderr line containing every one of `msgs`; the line."
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert r.returncode == status, (r.returncode, r.stderr[-2000:])
    assert len(lines) == 1 and 'Traceback' not in r.stderr, r.stderr[-2000:]
    for m in msgs: assert m in lines[0], lines[0]
    return lines[0]

def files(d): return sorted(p.name for p in Path(d).iterdir() if p.name != 'cache')

@pytest.fixture(scope='module')
def work(tmp_path_factory):
    "A digits model (m), a model of digits 0-4 (lo), m's module set, and an MNIST-shaped folder."
    d = tmp_path_factory.mktemp('inputs')
    ok(run(['train', '--data', 'digits', '--epochs', 5, '--out', 'm.keras', '--quiet'], d))
    ok(run(['train', '--data', 'digits:0,1,2,3,4', '--epochs', 5, '--out', 'lo.keras', '--quiet'], d))
    ok(run(['decompose', 'm.keras', '--data', 'digits', '--out', 'm.cnnm', '--n-concerned', 50], d))
    write_mnist_like(d / 'mnistlike')
    (d / 'fake.keras').write_text('not a model')
    return d

# 1. the documented default data folder, and a failed download

def test_data_lookup_default_folder_then_download_fails_in_one_line(work, tmp_path):
    "Without CNNMODULES_DATA: `shared/data` beside the checkout when it exists; else a download, whose failure is one line."
    clone = tmp_path / 'clone'                 # a checkout with nothing beside it: tmp_path/shared/data is absent
    shutil.copytree(REPO / 'cnnmodules', clone / 'cnnmodules', ignore=shutil.ignore_patterns('__pycache__'))
    shutil.copy(work / 'm.keras', tmp_path / 'm.keras')
    env = dict(NO_NET, PYTHONPATH=str(clone), KERAS_HOME=str(tmp_path / 'keras'))
    r = run_process(['evaluate', 'm.keras', '--data', 'mnist'], tmp_path, **env)
    one_line(r, 1, 'mnist not found', 'downloading it through keras.datasets failed', 'CNNMODULES_DATA')
    assert not (tmp_path / 'keras' / 'datasets' / 'mnist.npz').exists()
    write_mnist_like(tmp_path / 'shared' / 'data' / 'mnist')      # now there is an offline copy beside the checkout
    r = run_process(['evaluate', 'm.keras', '--data', 'mnist'], tmp_path, **env)
    one_line(r, 1, '(8, 8, 1)', '(28, 28, 1)')                      # found it (no download): it is the wrong shape for m
    r = run_process(['evaluate', 'm.keras', '--data', 'mnist'], tmp_path, **env, CNNMODULES_DATA=str(tmp_path / 'nowhere'))
    one_line(r, 1, 'nowhere does not exist', '$CNNMODULES_DATA')   # the variable wins over the default folder

# 2. images of another shape than the model's

@pytest.mark.parametrize('args', [['evaluate', 'm.keras', '--data', 'mnistlike'],
                                  ['decompose', 'm.keras', '--data', 'mnistlike', '--out', 'x.cnnm'],
                                  ['evaluate', 'm.cnnm', '--data', 'mnistlike']], ids=' '.join)
def test_shape_mismatch_names_both_shapes(work, args):
    before = files(work)
    one_line(run(args, work), 1, '(8, 8, 1)', '(28, 28, 1)')
    assert files(work) == before

# 3. a model trained on a class subset

def test_subset_model_needs_its_classes_named(work):
    for args in (['decompose', 'lo.keras', '--data', 'digits', '--out', 'x.cnnm'], ['evaluate', 'lo.keras', '--data', 'digits']):
        one_line(run(args, work), 1, 'the model has 5 outputs but digits has 10 classes', '--data digits:0,1,2,3,4')
    one_line(run(['evaluate', 'lo.keras', '--data', 'digits:0,1,2'], work), 1, 'name the 5 classes')
    assert not (work / 'x.cnnm').exists()

def test_subset_model_decomposes_and_evaluates_with_its_classes(work):
    import keras
    from cnnmodules.data import load_dataset
    from cnnmodules.modules import ModuleSet
    ok(run(['decompose', 'lo.keras', '--data', 'digits:0,1,2,3,4', '--out', 'lo.cnnm', '--n-concerned', 50], work))
    assert ModuleSet.load(work / 'lo.cnnm').class_names == ['0', '1', '2', '3', '4']
    m = json.loads(ok(run(['evaluate', 'lo.keras', '--data', 'digits:0,1,2,3,4', '--json'], work)).stdout)
    s = json.loads(ok(run(['evaluate', 'lo.cnnm', '--data', 'digits', '--json'], work)).stdout)
    d = load_dataset('digits')                                     # scored independently: Keras' own predict
    keep = d.y_test < 5
    own = float((keras.saving.load_model(work / 'lo.keras').predict(d.x_test[keep].astype('float32'), verbose=0).argmax(1) == d.y_test[keep]).mean())
    assert m['n'] == s['n'] == int(keep.sum()) and m['classes'] == s['classes'] == ['0', '1', '2', '3', '4']
    assert abs(m['top1'] - own) < 1e-9 and own > 0.5 and abs(s['top1'] - own) <= 0.05

# 4. one module per class

def test_two_modules_of_one_class_are_refused(work):
    before = files(work)
    one_line(run(['compose', 'm.cnnm:3', 'm.cnnm:3', '--out', 'x.cnnm'], work), 1, "two modules of class '3'")
    one_line(run(['compose', 'm.cnnm:0,3', 'm.cnnm:5,3', '--out', 'x.cnnm'], work), 1, "two modules of class '3'", '(positions 1 and 3)')
    assert files(work) == before
    from cnnmodules.modules import ModuleSet
    ms = ModuleSet.load(work / 'm.cnnm')
    import dataclasses                             # a set of an older version, or whose modules record no dataset
    anon = dataclasses.replace(ms[3], provenance={k: v for k, v in ms[3].provenance.items() if k != 'dataset'})
    ModuleSet([ms[3], ms[5], anon]).save(work / 'dup.cnnm')
    r = run(['evaluate', 'dup.cnnm', '--data', 'digits'], work)
    (work / 'dup.cnnm').unlink()
    one_line(r, 1, "two modules of class '3'")
    ok(run(['compose', 'm.cnnm:3', 'm.cnnm:5', '--out', 'two.cnnm'], work))
    two = json.loads(ok(run(['evaluate', 'two.cnnm', '--data', 'digits', '--json'], work)).stdout)
    from cnnmodules.data import load_dataset
    assert two['n'] == int(np.isin(load_dataset('digits').y_test, [3, 5]).sum())   # each image counted once

# 5. --out on a folder that cannot be written

def _unwritable_folders(tmp_path):
    "Folders where creating a file fails for this user: a 0o555 folder (not for root) and /sys (read-only for everyone)."
    ro = tmp_path / 'ro'; ro.mkdir(); ro.chmod(0o555)
    out = []
    for d in (ro, Path('/sys')):
        if not d.is_dir(): continue
        try: fd, f = tempfile.mkstemp(dir=d)
        except OSError: out.append(d); continue
        os.close(fd); os.unlink(f)
    return out

def test_out_in_an_unwritable_folder_exits_2_before_work(tmp_path):
    folders = _unwritable_folders(tmp_path)
    if not folders: pytest.skip('no folder here refuses a new file')
    for d in folders:
        for args in (['demo', '--epochs', 1, '--out', d / 'ms.cnnm'], ['demo', '--epochs', 1, '--out', f'{d}/'],
                     ['train', '--data', 'digits', '--epochs', 1, '--out', d / 'm.keras']):
            one_line(run(args, tmp_path), 2, '--out', str(d))
            assert not (tmp_path / 'cache' / 'models-2').exists(), 'trained before finding out it cannot save'
    print('refused:', ', '.join(map(str, folders)))

# 6. update with foreign classes the set already has

def test_update_refuses_foreign_classes_the_set_has(work):
    before = files(work)
    one_line(run(['update', 'm.cnnm', '--foreign', 'digits:5,6', '--out', 'x.cnnm'], work), 1, '--foreign digits:5,6', 'classes 5, 6 of digits')
    one_line(run(['update', 'm.cnnm', '--foreign', 'digits', '--out', 'x.cnnm'], work), 1, 'already has modules')
    assert files(work) == before

# 7. negative positions; a file that is not a Keras model

@pytest.mark.parametrize('args,status,msg', [
    (['replace', 'm.cnnm', '--class', -1, '--with', 'm.cnnm', '--out', 'x.cnnm'], 2, 'count from 0; got -1'),
    (['replace', 'm.cnnm', '--class', 3, '--with', 'm.cnnm:-2', '--out', 'x.cnnm'], 2, 'count from 0; got -2'),
    (['evaluate', 'm.cnnm:-1', '--data', 'digits'], 2, 'count from 0; got -1'),
    (['evaluate', 'm.cnnm', '--classes', '-1', '--data', 'digits'], 2, 'count from 0; got -1'),
    (['decompose', 'm.keras', '--data', 'digits:-1', '--out', 'x.cnnm'], 2, 'count from 0; got -1'),
    (['decompose', 'fake.keras', '--data', 'digits', '--out', 'x.cnnm'], 1, 'fake.keras is not a readable Keras model'),
    (['evaluate', 'fake.keras', '--data', 'digits'], 1, 'fake.keras is not a readable Keras model'),
    (['decompose', 'm.cnnm', '--data', 'digits', '--out', 'x.cnnm'], 1, 'm.cnnm is a module set, not a Keras model')],
    ids=lambda v: ' '.join(map(str, v)) if isinstance(v, list) else str(v))
def test_positions_and_model_files(work, args, status, msg):
    before = files(work)
    line = one_line(run(args, work), status, msg)
    assert 'File not found' not in line
    assert files(work) == before

# 8. progress on long work

def test_progress_plain_line_when_not_a_terminal(work):
    r = ok(run(['decompose', 'm.keras', '--data', 'digits', '--out', 'p.cnnm', '--n-concerned', 20], work))
    assert 'decomposing ' in r.stderr and 'into 10 modules' in r.stderr
    assert 'concern identification' not in r.stderr and '%|' not in r.stderr and '\x1b' not in r.stderr, repr(r.stderr[-500:])   # no tqdm bar
    r = ok(run(['evaluate', 'p.cnnm', '--data', 'digits', '--json'], work))
    assert 'composing 10 modules' in r.stderr and 'exact composition' not in r.stderr and '%|' not in r.stderr and '\x1b' not in r.stderr
    assert json.loads(r.stdout)['n'] == 360                     # stdout stays one JSON object

def test_progress_bars_on_a_terminal(work):
    "With stderr on a pseudo-terminal, decompose and evaluate draw tqdm bars."
    import fcntl, pty, struct, termios
    def tty_run(args):
        master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack('HHHH', 24, 100, 0, 0))   # a terminal 100 columns wide (0 draws no bar)
        p = subprocess.Popen([sys.executable, '-c', MAIN, *map(str, args)], stdout=subprocess.PIPE, stderr=slave,
                             env=env_for(work), cwd=work)
        os.close(slave)
        out = []
        while True:
            try: b = os.read(master, 65536)
            except OSError: break
            if not b: break
            out.append(b)
        p.wait(timeout=600); os.close(master)
        assert p.returncode == 0, b''.join(out)[-2000:]
        return b''.join(out).decode('utf-8', 'replace')
    err = tty_run(['decompose', 'm.keras', '--data', 'digits', '--out', 't.cnnm', '--n-concerned', 20])
    assert '\rconcern identification' in err, err[-1000:]
    err = tty_run(['evaluate', 't.cnnm', '--data', 'digits'])
    assert '\rexact composition' in err, err[-1000:]

# 9. the README's command-line block, as written

def readme_commands():
    "The `cnnmodules` lines of the bash block in the README's 'The command line' section, comments dropped."
    text = (REPO / 'README.md').read_text()
    sec = text.split('## The command line', 1)[1].split('\n## ', 1)[0]
    block = re.search(r'```bash\n(.*?)```', sec, re.S).group(1)
    return [shlex.split(l, comments=True) for l in block.splitlines() if l.strip()]

def test_readme_command_block_runs_top_to_bottom(tmp_path):
    cmds = readme_commands()
    assert len(cmds) >= 10 and all(c[0] == 'cnnmodules' for c in cmds), cmds
    for c in cmds:                       # every line, `cnnmodules run` included: without a name it only lists the experiments
        r = run(c[1:], tmp_path)
        assert r.returncode == 0 and 'Traceback' not in r.stderr, (' '.join(c), r.stderr[-3000:])
    made = {p.name for p in tmp_path.iterdir()}
    wanted = {a for c in cmds for a in c if a.endswith(('.keras', '.cnnm'))} | {Path(a.split(':')[0]).name for c in cmds for a in c if '.cnnm:' in a}
    assert wanted <= made, wanted - made
