"The notebook bridge: every notebook under nbs/ runs clean through nbdev's own test runner (notest cells skipped)."
from pathlib import Path

import pytest
from nbdev.test import test_nb as run_notebook  # renamed so pytest does not collect it

NBS = Path(__file__).resolve().parents[1] / 'nbs'
NOTEBOOKS = sorted(p for p in NBS.glob('*.ipynb'))

@pytest.mark.parametrize('nb', NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(nb, monkeypatch):
    monkeypatch.chdir(nb.parent)
    ok, secs = run_notebook(nb, skip_flags=['notest'])
    assert ok, f'{nb.name} failed (see the traceback above)'
