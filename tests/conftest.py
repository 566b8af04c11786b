"""Shared test set-up: where the offline data copies are, skips for their absence (counted in one summary line),
the papermill helper of the experiment tests, and private caches removed at the end of the run.

Helpers are imported by the test files (`from conftest import needs_data, run_experiment`); pytest puts this folder
on `sys.path` before importing it. Nothing here imports TensorFlow, so a run that only skips stays fast."""
import contextlib, io, os, shutil, subprocess, sys, tempfile, traceback, warnings
from pathlib import Path

import numpy as np
import pytest

pytest_plugins = ['pytester']

REPO = Path(__file__).resolve().parents[1]
EXP = REPO / 'nbs' / 'experiments'
# the offline copies: $CNNMODULES_DATA, else shared/data beside the repository (as cnnmodules.experiments.default_data_dir)
DATA = Path(os.environ.get('CNNMODULES_DATA') or REPO.parent / 'shared' / 'data')
TRAINED_PARENT = REPO / 'reports' / 'models' / 'cifar10_resnet20.keras'   # the committed CIFAR-10 ResNet-20

OFFLINE = 'offline data absent'   # every skip for missing offline copies starts with this; the summary counts them


# ---------------------------------------------------------------- offline data: skips and their summary line

def missing_data(*names) -> list:
    "The names of `names` (files or folders under `DATA`) that are absent; with no names, whether `DATA` itself is."
    if not names: return [] if DATA.is_dir() else [str(DATA)]
    return [n for n in names if not (DATA / n).exists()]

def data_reason(missing) -> str:
    where = f"no {', '.join(missing)} in {DATA}" if DATA.is_dir() else f'no folder {DATA}'
    return f"{OFFLINE}: {where} (set CNNMODULES_DATA)"

def needs_data(*names):
    "A skipif mark: skip when any of the offline copies `names` is absent (no names: the data folder itself)."
    missing = missing_data(*names)
    return pytest.mark.skipif(bool(missing), reason=data_reason(missing))

def require_data(*names):
    "Skip now (inside a test or fixture) when any of the offline copies `names` is absent."
    missing = missing_data(*names)
    if missing: pytest.skip(data_reason(missing))

def require_file(path, what='trained parent'):
    "Skip when a committed artefact the test needs is absent (a different reason from missing offline data)."
    if not Path(path).exists(): pytest.skip(f'no {what} at {path}')

def _skip_reason(report) -> str:
    lr = report.longrepr
    if isinstance(lr, tuple) and len(lr) == 3: return str(lr[2])
    return str(lr or '')

def pytest_terminal_summary(terminalreporter, exitstatus, config):
    "One line saying how many tests skipped for missing offline data, and which copies were missing where."
    reasons = [r for r in (_skip_reason(rep) for rep in terminalreporter.stats.get('skipped', [])) if OFFLINE in r]
    if not reasons: return
    missing = []
    for r in reasons:
        for name in r.split(OFFLINE + ': no ', 1)[1].split(' in ', 1)[0].split(', '):
            if name not in missing: missing.append(name)
    where = f"no {', '.join(missing)} in {DATA}" if DATA.is_dir() else f'no folder {DATA}'
    n = len(reasons)
    terminalreporter.write_line(f"{OFFLINE} ({where}; set CNNMODULES_DATA): {n} test{'s' if n != 1 else ''} skipped",
                                yellow=True, bold=True)


# ---------------------------------------------------------------- the command line, in this process

@contextlib.contextmanager
def _environment(env):
    "`env` as the whole of os.environ inside the block; the old environment restored after it."
    old = dict(os.environ)
    os.environ.clear(); os.environ.update(env)
    try: yield
    finally: os.environ.clear(); os.environ.update(old)

def _show_on_stderr(message, category, filename, lineno, file=None, line=None):
    sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))

def _fresh_process_warnings():
    "Inside `catch_warnings`: the filters a new Python process starts with, shown on (the current) sys.stderr."
    warnings.resetwarnings()                  # changing the filters also forgets which warnings were already shown
    for cat, action, module in ((ResourceWarning, 'ignore', ''), (ImportWarning, 'ignore', ''), (PendingDeprecationWarning, 'ignore', ''),
                                (DeprecationWarning, 'ignore', ''), (DeprecationWarning, 'default', '__main__')):
        warnings.filterwarnings(action, category=cat, module=module)   # each goes first: the last is checked first
    warnings.showwarning = _show_on_stderr

def cli_main(args, cwd, env=None) -> subprocess.CompletedProcess:
    """`cnnmodules ARGS` through `cnnmodules.cli.main` (what the console script calls) in this process, in `cwd` with `env`
    as the whole environment: its exit status and what it printed, as a CompletedProcess. An uncaught exception is a
    traceback on stderr and status 1, as in a process of its own; warnings are filtered and shown on stderr as in a
    fresh process.
    The command-line tests use it to skip TensorFlow's start-up per call (most of their time as subprocesses);
    tests/test_cli.py and CI's README command 1 run the real console script in processes of their own."""
    from cnnmodules.cli import main
    args, out, err = [str(a) for a in args], io.StringIO(), io.StringIO()
    with _environment(dict(os.environ) if env is None else env), contextlib.chdir(cwd), warnings.catch_warnings(), \
         contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        _fresh_process_warnings()
        try: code = main(args)
        except SystemExit as e:
            code = e.code
            if not isinstance(code, (int, type(None))): print(code, file=sys.stderr); code = 1
        except Exception: traceback.print_exc(); code = 1
    return subprocess.CompletedProcess(args, code or 0, out.getvalue(), err.getvalue())


# ---------------------------------------------------------------- experiment notebooks under papermill

def run_experiment(nb, out_nb, **params):
    "Execute `nbs/experiments/<nb>` with papermill into `out_nb`, on the offline copies (`data_dir`), from its folder."
    papermill = pytest.importorskip('papermill')
    papermill.execute_notebook(str(EXP / nb), str(out_nb), parameters=dict(data_dir=str(DATA), **params),
                               cwd=str(EXP), kernel_name='python3', progress_bar=False)
    return Path(out_nb)


# ---------------------------------------------------------------- private caches, removed at the end of the run

_SESSION = {}

def pytest_configure(config):
    """Point every cache the package (and Keras under it) writes to into one temporary folder for the whole run,
    so the user's ~/.cache/cnnmodules and ~/.keras are never written; subprocesses and notebook kernels inherit it.
    Tests that need their own cache still set CNNMODULES_CACHE themselves (monkeypatch), which wins."""
    if _SESSION: return                       # an in-process pytester run inside this one keeps the outer folder
    tempfile.gettempdir()                     # fix this process's temporary root (pytest's tmp_path lives there) first
    root = Path(tempfile.mkdtemp(prefix='cnnmodules-tests-'))
    old = {k: os.environ.get(k) for k in ('CNNMODULES_CACHE', 'KERAS_HOME', 'TMPDIR')}
    for k, sub in (('CNNMODULES_CACHE', 'cache'), ('KERAS_HOME', 'keras'), ('TMPDIR', 'tmp')):
        (root / sub).mkdir()
        os.environ[k] = str(root / sub)       # TMPDIR: what subprocesses and kernels put in tempfile goes here too
    _SESSION.update(root=root, old=old, config=config)

def pytest_unconfigure(config):
    if _SESSION.get('config') is not config: return
    for k, v in _SESSION['old'].items():
        if v is None: os.environ.pop(k, None)
        else: os.environ[k] = v
    shutil.rmtree(_SESSION['root'], ignore_errors=True)
    _SESSION.clear()

@pytest.fixture(scope='session', autouse=True)
def _private_tempdir(tmp_path_factory):
    "In this process too, what `tempfile` makes without removing (e.g. notebooks run in-process) goes into the run folder."
    tmp_path_factory.getbasetemp()            # pytest's own tmp_path root stays where it was (it keeps failed tests' folders)
    before = tempfile.tempdir
    tempfile.tempdir = str(_SESSION['root'] / 'tmp')
    yield
    tempfile.tempdir = before

@pytest.fixture(scope='session')
def session_cache() -> Path:
    "The run's dataset and model cache folder (`$CNNMODULES_CACHE` for this run), removed at its end."
    return _SESSION['root'] / 'cache'


# ---------------------------------------------------------------- small data the tests write themselves

def write_mnist_like(root, n=20, seed=0):
    "A folder in MNIST's idx layout (28x28 images, labels 0..9): what the real loader reads, without the offline copy or a download."
    import gzip, struct
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for pre in ('train', 't10k'):
        x, y = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), (np.arange(n) % 10).astype(np.uint8)
        for kind, a, magic in (('images-idx3', x, 0x803), ('labels-idx1', y, 0x801)):
            (root / f'{pre}-{kind}-ubyte.gz').write_bytes(gzip.compress(struct.pack('>i', magic) + struct.pack(f'>{a.ndim}i', *a.shape) + a.tobytes()))
    return root
