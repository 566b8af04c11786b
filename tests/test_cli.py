"The `cnnmodules` command, run as a user runs it (a subprocess on this worktree's code): fast help, checks before work, `--out` semantics."
import configparser, os, subprocess, sys, time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MAIN = 'import sys; from cnnmodules.cli import main; sys.exit(main())'

def run(args, tmp_path, timeout=600):
    "Run `cnnmodules ARGS` on this worktree's package with a private cache; the CompletedProcess."
    env = {**os.environ, 'PYTHONPATH': str(REPO), 'CNNMODULES_CACHE': str(tmp_path / 'cache')}
    return subprocess.run([sys.executable, '-c', MAIN, *args], capture_output=True, text=True, timeout=timeout, env=env, cwd=tmp_path)

def test_runs_this_worktree(tmp_path):
    env = {**os.environ, 'PYTHONPATH': str(REPO)}
    r = subprocess.run([sys.executable, '-c', 'import cnnmodules; print(cnnmodules.__file__)'], capture_output=True, text=True, env=env)
    assert Path(r.stdout.strip()).parent == REPO / 'cnnmodules'

@pytest.mark.parametrize('args', [['--help'], ['demo', '--help'], ['--version']], ids=' '.join)
def test_help_is_fast_and_imports_no_tensorflow(args):
    code = f'''
import sys, time
t = time.perf_counter()
from cnnmodules.cli import main
try: main({args!r})
except SystemExit as e: code = e.code
dt = time.perf_counter() - t
heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'keras', 'jax', 'torch'))
print('RESULT', code, round(dt, 3), heavy, file=sys.stderr)
'''
    t = time.perf_counter()
    r = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=120, env={**os.environ, 'PYTHONPATH': str(REPO)})
    wall = time.perf_counter() - t
    line = [l for l in r.stderr.splitlines() if l.startswith('RESULT')][-1]
    _, status, dt, heavy = line.split(' ', 3)
    print(f"cnnmodules {' '.join(args)}: {float(dt):.3f} s in main (import included), {wall:.2f} s for the whole process")
    assert status == '0', r.stderr
    assert heavy == '[]', f'--help imported {heavy}'

def test_version(tmp_path):
    cfg = configparser.ConfigParser(); cfg.read(REPO / 'settings.ini')
    r = run(['--version'], tmp_path)
    assert r.returncode == 0 and r.stdout.strip() == f"cnnmodules {cfg['DEFAULT']['version']}", (r.stdout, r.stderr)

BAD = [(['--epochs', '0'], '--epochs'), (['--epochs', '-2'], '--epochs'), (['--epochs', 'ten'], '--epochs'),
       (['--n-concerned', '0'], '--n-concerned'), (['--n-concerned', '-1'], '--n-concerned'), (['--n-concerned', '2.5'], '--n-concerned'),
       (['--n-concerned', '5000'], '--n-concerned'), (['--seed', '-1'], '--seed'), (['--seed', 'x'], '--seed'),
       (['--out', 'afile/ms.cnnm'], '--out'), (['--bogus'], '--bogus')]

@pytest.mark.parametrize('args,arg', BAD, ids=[' '.join(a) for a, _ in BAD])
def test_bad_values_exit_2_with_one_line_before_work(tmp_path, args, arg):
    (tmp_path / 'afile').write_text('not a folder')
    t = time.perf_counter()
    r = run(['demo', *args], tmp_path, timeout=120)
    dt = time.perf_counter() - t
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert 'Traceback' not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert arg in lines[0] and lines[0].startswith(('cnnmodules demo: error:', 'cnnmodules: error:')), lines[0]
    assert not (tmp_path / 'cache' / 'models').exists(), 'a model was trained or cached for a bad value'
    print(f"{' '.join(args)}: exit 2 after {dt:.2f} s: {lines[0]}")

def test_out_semantics_end_to_end(tmp_path):
    "An existing folder and a path ending with / both get the default name inside; nothing called like the folder is written; no TensorFlow chatter."
    (tmp_path / 'existing').mkdir()
    r = run(['demo', '--epochs', '1', '--out', 'existing'], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / 'existing' / 'digits_small_cnn_e1_s0.cnnm').is_file()
    assert 'module set saved to existing/digits_small_cnn_e1_s0.cnnm' in r.stdout
    for chatter in ('I0000', 'absl::InitializeLog', 'cuInit', 'oneDNN', 'Traceback', 'concern identification', '\x1b'):   # no bar when stderr is not a terminal
        assert chatter not in r.stderr, f'{chatter!r} in stderr:\n{r.stderr[-2000:]}'
    r = run(['demo', '--epochs', '1', '--out', 'newfolder/'], tmp_path)    # the cached model this time
    assert r.returncode == 0, r.stderr[-3000:]
    assert 'loaded from' in r.stdout
    assert (tmp_path / 'newfolder').is_dir() and (tmp_path / 'newfolder' / 'digits_small_cnn_e1_s0.cnnm').is_file()

def test_resolve_out(tmp_path):
    from cnnmodules.cli import resolve_out
    name = 'm.cnnm'
    assert resolve_out(tmp_path, name) == tmp_path / name
    assert resolve_out(str(tmp_path / 'new') + os.sep, name) == tmp_path / 'new' / name
    assert resolve_out(tmp_path / 'new', name) == tmp_path / 'new'          # no separator, not a folder: the file
    assert resolve_out(tmp_path / 'x' / 'y.cnnm', name) == tmp_path / 'x' / 'y.cnnm'
    (tmp_path / 'f').write_text('')
    with pytest.raises(ValueError, match='--out .* is a file'): resolve_out(tmp_path / 'f' / 'y.cnnm', name)
    (tmp_path / name).mkdir()
    with pytest.raises(ValueError, match='--out .* is a folder, not a file'): resolve_out(tmp_path, name)

def test_library_error_while_working_is_one_line(monkeypatch, capsys):
    "A DecompositionError raised during the job: one line on stderr, exit status 1, no traceback."
    import cnnmodules.cli as cli
    from cnnmodules.graph import DecompositionError
    def fail(*a, **k): raise DecompositionError('class 7 has 0 training inputs in y')
    monkeypatch.setattr(cli, 'demo', fail)
    monkeypatch.setattr(cli, 'quiet_tensorflow', lambda: None)
    with pytest.raises(SystemExit) as e: cli.main(['demo', '--epochs', '1'])
    assert e.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ['cnnmodules: error: class 7 has 0 training inputs in y']

def test_demo_refuses_bad_epochs_from_python(tmp_path, monkeypatch):
    "The Python entry point refuses what the command line refuses, before training or caching."
    import cnnmodules.cli as cli
    monkeypatch.setenv('CNNMODULES_CACHE', str(tmp_path))
    for e in (0, -2, 2.5):
        with pytest.raises(ValueError, match='epochs must be a positive integer'): cli.demo_model(epochs=e)
    assert list(tmp_path.iterdir()) == []
