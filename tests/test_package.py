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
