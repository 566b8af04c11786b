"""The shared test set-up of conftest.py, run on small generated test folders (pytest in a subprocess, with a copy of
this conftest.py): the one summary line counting skips for missing offline data, and the private caches."""
import os, re
from pathlib import Path

import pytest

CONFTEST = Path(__file__).with_name('conftest.py')
REPO = CONFTEST.parents[1]

SKIPPING = '''
import pytest
from conftest import needs_data, require_data

@needs_data('cifar10-jpeg.zip')
def test_present(): pass

@needs_data('tiny-imagenet-202.zip')
def test_absent_mark(): pass

@pytest.fixture(scope='module')
def both(): require_data('tiny-imagenet-202.zip', 'mnist')

def test_fixture_one(both): pass
def test_fixture_two(both): pass

def test_unrelated_skip(): pytest.skip('needs a GPU')
'''

@pytest.fixture
def data_dir(tmp_path):
    "An offline data folder with only a CIFAR-10 copy in it."
    d = tmp_path / 'offline'
    d.mkdir()
    (d / 'cifar10-jpeg.zip').write_bytes(b'')
    return d

def summary_lines(result): return [l for l in result.outlines if l.startswith('offline data absent')]

def test_offline_skips_counted_in_one_line(pytester, monkeypatch, data_dir):
    pytester.makeconftest(CONFTEST.read_text())
    pytester.makepyfile(test_generated=SKIPPING)
    monkeypatch.setenv('CNNMODULES_DATA', str(data_dir))
    r = pytester.runpytest_subprocess('-q', '-p', 'no:cacheprovider')
    r.assert_outcomes(passed=1, skipped=4)
    # the three tests skipped for missing copies (a mark, a module fixture used twice), not the unrelated skip
    assert summary_lines(r) == [f'offline data absent (no tiny-imagenet-202.zip, mnist in {data_dir}; set CNNMODULES_DATA): 3 tests skipped']
    # the same line with -rs (the per-reason lines are extra) and in a verbose run
    r = pytester.runpytest_subprocess('-v', '-rs', '-p', 'no:cacheprovider')
    assert len(summary_lines(r)) == 1 and summary_lines(r)[0].endswith(': 3 tests skipped')

def test_no_line_when_nothing_skipped_for_data(pytester, monkeypatch, data_dir):
    pytester.makeconftest(CONFTEST.read_text())
    pytester.makepyfile(test_generated=SKIPPING)
    for name in ('tiny-imagenet-202.zip', 'mnist'): (data_dir / name).write_bytes(b'')
    monkeypatch.setenv('CNNMODULES_DATA', str(data_dir))
    r = pytester.runpytest_subprocess('-q', '-p', 'no:cacheprovider')
    r.assert_outcomes(passed=4, skipped=1)
    assert summary_lines(r) == []

def test_one_test_is_singular(pytester, monkeypatch, data_dir):
    pytester.makeconftest(CONFTEST.read_text())
    pytester.makepyfile(test_generated="from conftest import needs_data\n@needs_data('mnist')\ndef test_it(): pass\n")
    monkeypatch.setenv('CNNMODULES_DATA', str(data_dir))
    r = pytester.runpytest_subprocess('-q', '-p', 'no:cacheprovider')
    assert summary_lines(r) == [f'offline data absent (no mnist in {data_dir}; set CNNMODULES_DATA): 1 test skipped']

def test_missing_data_folder(pytester, monkeypatch, tmp_path):
    pytester.makeconftest(CONFTEST.read_text())
    pytester.makepyfile(test_generated="from conftest import needs_data\n@needs_data()\ndef test_it(): pass\n"
                                       "@needs_data('mnist')\ndef test_named(): pass\n")
    monkeypatch.setenv('CNNMODULES_DATA', str(tmp_path / 'nowhere'))
    r = pytester.runpytest_subprocess('-q', '-p', 'no:cacheprovider')
    r.assert_outcomes(skipped=2)
    assert summary_lines(r) == [f"offline data absent (no folder {tmp_path / 'nowhere'}; set CNNMODULES_DATA): 2 tests skipped"]

CACHES = '''
import os, subprocess, sys
from pathlib import Path

def test_caches(session_cache):
    env = {k: Path(os.environ[k]) for k in ('CNNMODULES_CACHE', 'KERAS_HOME', 'TMPDIR')}
    assert env['CNNMODULES_CACHE'] == session_cache
    root = session_cache.parent
    assert all(p.is_dir() and p.parent == root for p in env.values())
    from cnnmodules.data import cache_dir          # where the package puts decoded datasets
    assert cache_dir() == session_cache
    (session_cache / 'big.npz').write_bytes(bytes(10 ** 6))
    child = subprocess.run([sys.executable, '-c', 'import os, tempfile; print(os.environ["CNNMODULES_CACHE"], tempfile.gettempdir())'],
                           capture_output=True, text=True, check=True).stdout.split()
    assert child == [str(session_cache), str(env['TMPDIR'])]      # subprocesses and notebook kernels inherit it
    import tempfile
    leak = tempfile.mkdtemp()                                      # in this process too: a folder nobody removes
    assert Path(leak).parent == env['TMPDIR']
    print('ROOT=' + str(root))
'''

def test_private_caches_removed_at_the_end(pytester, monkeypatch, tmp_path):
    user_cache = tmp_path / 'user-cache'
    monkeypatch.setenv('CNNMODULES_CACHE', str(user_cache))      # a user's own setting is not written into either
    monkeypatch.setenv('PYTHONPATH', os.pathsep.join([str(REPO), os.environ.get('PYTHONPATH', '')]))
    pytester.makeconftest(CONFTEST.read_text())
    pytester.makepyfile(test_generated=CACHES)
    r = pytester.runpytest_subprocess('-q', '-s', '-p', 'no:cacheprovider')
    r.assert_outcomes(passed=1)
    root = Path(next(m.group(1) for l in r.outlines if (m := re.search(r'ROOT=(\S+)', l))))
    assert root.name.startswith('cnnmodules-tests-') and not root.exists()     # removed when the run ended
    assert not user_cache.exists()
    assert Path.home() not in root.parents

def test_private_caches_removed_after_a_failure(pytester, monkeypatch):
    pytester.makeconftest(CONFTEST.read_text())
    pytester.makepyfile(test_generated="import os\ndef test_fails():\n    print('ROOT=' + os.path.dirname(os.environ['CNNMODULES_CACHE']))\n    assert False\n")
    r = pytester.runpytest_subprocess('-q', '-s', '-p', 'no:cacheprovider')
    r.assert_outcomes(failed=1)
    root = Path(next(m.group(1) for l in r.outlines if (m := re.search(r'ROOT=(\S+)', l))))
    assert root.name.startswith('cnnmodules-tests-') and not root.exists()

def test_tmp_path_kept_only_when_failed(pytester):
    "With the repository's pytest.ini, a passing test's tmp_path (datasets, models) is gone after the run; a failing one's stays."
    pytester.makeini((REPO / 'pytest.ini').read_text())
    pytester.makeconftest(CONFTEST.read_text())
    pytester.makepyfile(test_generated="""
def test_passes(tmp_path):
    (tmp_path / 'model.keras').write_bytes(bytes(1000)); print('PASS=' + str(tmp_path))
def test_fails(tmp_path):
    (tmp_path / 'model.keras').write_bytes(bytes(1000)); print('FAIL=' + str(tmp_path)); assert False
""")
    r = pytester.runpytest_subprocess('-q', '-s', '-p', 'no:cacheprovider', '-n', '0')   # in one process: workers' prints are not shown
    r.assert_outcomes(passed=1, failed=1)
    where = {m.group(1): Path(m.group(2)) for l in r.outlines if (m := re.search(r'^\.?(PASS|FAIL)=(/\S+)', l))}
    assert not where['PASS'].exists() and (where['FAIL'] / 'model.keras').exists()
