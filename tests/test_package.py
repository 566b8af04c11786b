"Tests of the installed package: what a user gets from `pip install`, not the notebooks."
import configparser, importlib, subprocess, sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]

def test_version_matches_settings():
    import cnnmodules
    cfg = configparser.ConfigParser(); cfg.read(REPO / 'settings.ini')
    assert cnnmodules.__version__ == cfg['DEFAULT']['version']

@pytest.mark.parametrize('mod', ['data', 'models', 'graph', 'concern', 'modularize', 'reference', 'modules', 'jaccard', 'compose', 'decompose', 'cli'])
def test_modules_export_what_they_declare(mod):
    m = importlib.import_module(f'cnnmodules.{mod}')
    assert m.__all__, f'cnnmodules.{mod} exports nothing'
    missing = [n for n in m.__all__ if not hasattr(m, n)]
    assert not missing, f'cnnmodules.{mod}.__all__ names missing objects: {missing}'

def test_console_script_help():
    r = subprocess.run(['cnnmodules', 'demo', '--help'], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert '--epochs' in r.stdout and 'no download' in r.stdout

def test_module_keras_file_opens_after_import(tmp_path):
    "A module saved with to_keras() loads with plain keras.saving.load_model once cnnmodules is imported."
    code = f'''
import numpy as np, keras, cnnmodules
from keras import layers
from cnnmodules.decompose import decompose
keras.utils.set_random_seed(0)
inp = keras.Input((6, 6, 1)); h = layers.Conv2D(3, 3, activation="relu")(inp)
m = keras.Model(inp, layers.Dense(3, activation="softmax")(layers.Flatten()(h)))
x = np.random.default_rng(0).random((30, 6, 6, 1)).astype("float32"); y = np.repeat(np.arange(3), 10)
ms = decompose(m, x, y, n_concerned=4, progress=False)
ms[1].to_keras().save(r"{tmp_path / 'mod.keras'}")
np.save(r"{tmp_path / 'ref.npy'}", ms[1].to_keras().predict(x, verbose=0))
'''
    subprocess.run([sys.executable, '-c', code], check=True, timeout=300, capture_output=True)
    check = f'''
import numpy as np, keras, cnnmodules
x = np.random.default_rng(0).random((30, 6, 6, 1)).astype("float32")
p = keras.saving.load_model(r"{tmp_path / 'mod.keras'}").predict(x, verbose=0)
assert np.allclose(p, np.load(r"{tmp_path / 'ref.npy'}"), atol=1e-6), "loaded module predicts differently"
'''
    r = subprocess.run([sys.executable, '-c', check], timeout=300, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]

@pytest.mark.parametrize('first', ['cnnmodules.modules', 'cnnmodules.compose', 'cnnmodules.decompose',
                                   'cnnmodules.compact', 'cnnmodules.scenarios', 'cnnmodules.cli'])
def test_public_api_whatever_is_imported_first(first):
    "`ModuleSet.replace/remove` and `Module.size/to_keras(slim=...)` exist in a fresh process whichever module it imports first."
    code = f'''
import importlib, inspect
importlib.import_module({first!r})
from cnnmodules.modules import Module, ModuleSet
missing = [n for c, n in [(ModuleSet, "replace"), (ModuleSet, "remove"), (Module, "size"), (Module, "to_slim_keras")] if not hasattr(c, n)]
assert not missing, missing
assert "slim" in inspect.signature(Module.to_keras).parameters
'''
    r = subprocess.run([sys.executable, '-c', code], timeout=300, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]

def test_runtime_dependencies_cover_runtime_imports():
    "Every third-party package the library imports is in `requirements` (not only in the dev extras)."
    import ast
    cfg = configparser.ConfigParser(); cfg.read(REPO / 'settings.ini')
    req = {r.split('<')[0].split('>')[0].split('=')[0].strip().lower() for r in cfg['DEFAULT']['requirements'].split()}
    names = {'sklearn': 'scikit-learn', 'PIL': 'pillow', 'keras': 'tensorflow', 'tensorflow': 'tensorflow'}
    found = set()
    for f in (REPO / 'cnnmodules').glob('*.py'):
        for node in ast.walk(ast.parse(f.read_text())):
            mods = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                   [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module else []
            for m in mods:
                top = m.split('.')[0]
                if top in sys.stdlib_module_names or top in ('cnnmodules', '__future__'): continue
                found.add((f.name, names.get(top, top).lower()))
    missing = sorted((f, p) for f, p in found if p not in req)
    assert not missing, f'imported at run time but not in settings.ini requirements: {missing}'

# ---------------------------------------------------------------- everything a reader follows is in the repository
TEXT_SUFFIXES = {'.ipynb', '.py', '.md', '.csv', '.json', '.txt', '.ini', '.cfg', '.toml', '.yml', '.yaml', '.sh'}
OUTSIDE_DOCS = ('DESIGN' + '.md', 'paper' + '.txt')   # documents that lived beside the repository, never in it
ABSOLUTE_HOME_OR_WORK = r'(?<![\w.~-])/(?:work|home|root|Users)/'

def product_files(*tops):
    "Text files of the product under the repository folders or files `tops`."
    for top in tops:
        p = REPO / top
        files = [p] if p.is_file() else sorted(f for f in p.rglob('*') if f.is_file())
        for f in files:
            if f.suffix in TEXT_SUFFIXES and '.ipynb_checkpoints' not in f.parts and '__pycache__' not in f.parts: yield f

def test_no_reference_to_documents_outside_the_repository():
    "No product file cites the design notes or the paper's text that lived outside the repository (the design is nbs/design.ipynb)."
    hits = [f'{f.relative_to(REPO)}: {d}' for f in product_files('nbs', 'cnnmodules', 'tests', 'reports', 'README.md')
            for d in OUTSIDE_DOCS if d in f.read_text(errors='replace')]
    assert not hits, 'references to documents outside the repository:\n' + '\n'.join(hits)

def test_design_decisions_cited_exist():
    "Every 'design decision N' a product file cites is a numbered section of nbs/design.ipynb."
    import json, re
    design = '\n'.join(''.join(c['source']) for c in json.loads((REPO / 'nbs' / 'design.ipynb').read_text())['cells'])
    numbers = {int(n) for n in re.findall(r'^## (\d+)\. ', design, re.M)}
    assert numbers == set(range(1, len(numbers) + 1)) and numbers, 'design decisions must be numbered 1..N'
    cited = {(str(f.relative_to(REPO)), int(n)) for f in product_files('nbs', 'cnnmodules', 'tests', 'README.md')
             for n in re.findall(r'[Dd]esign decisions? (\d+)', f.read_text(errors='replace'))}
    assert cited, 'no notebook cites a design decision'
    bad = sorted(c for c in cited if c[1] not in numbers)
    assert not bad, f'cited design decisions that nbs/design.ipynb does not have: {bad}'

def _source_text(f):
    "A file's text; for a notebook, its cells' sources (what its authors wrote; outputs are what a run printed)."
    import json
    if f.suffix != '.ipynb': return f.read_text(errors='replace')
    return '\n'.join(''.join(c['source']) for c in json.loads(f.read_text())['cells'])

def test_no_absolute_paths_of_a_machine_in_the_product():
    "No notebook source, library file, test or README names a home or work folder of some machine (reports: tests/test_reports.py)."
    import re
    hits = [f'{f.relative_to(REPO)}:{i}: {line.strip()[:120]}' for f in product_files('nbs', 'cnnmodules', 'tests', 'README.md')
            for i, line in enumerate(_source_text(f).splitlines(), 1) if re.search(ABSOLUTE_HOME_OR_WORK, line)]
    assert not hits, 'absolute paths of a machine:\n' + '\n'.join(hits[:20])
