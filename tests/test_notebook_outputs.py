"""The outputs committed in executed notebooks stay documentation (issue 14, section 4): small, with their figures,
and free of TensorFlow's start-up lines, warnings that are noise, progress bars and the paths of the machine that ran them.

Only the notebooks executed with a quiet first cell are checked; 02, 03, 06 and 10 join the list when they are
executed that way (their committed outputs predate it)."""
import json, re
from pathlib import Path

import pytest

NBS = Path(__file__).resolve().parents[1] / 'nbs'
# notebook -> does it hold a figure?
EXECUTED = {'04_modularize': True, '08_compose': True, '11_scenarios': False, '12_compact': True, '13_bench': True, '14_experiments': False}
MAX_BYTES = 300_000
# machine paths: a home or work folder (the pattern test_package uses for sources), or the temporary folder
NOISE = re.compile(r'I0000 |absl::|WARNING:tensorflow|Warning:|\x1b\[|\r|' + r'(?<![\w.~-])/(?:' + '|'.join(['work', 'home', 'root', 'Users', 'tmp']) + ')/')


def outputs(nb):
    for c in nb['cells']:
        for o in c.get('outputs', []): yield c.get('id'), o


@pytest.mark.parametrize('name', sorted(EXECUTED))
def test_executed_notebook_outputs(name):
    path = NBS / f'{name}.ipynb'
    assert path.stat().st_size < MAX_BYTES, f'{path.name} is {path.stat().st_size:,} bytes; keep it under {MAX_BYTES:,}'
    nb = json.loads(path.read_text())
    outs = list(outputs(nb))
    assert outs, f'{path.name} is committed without outputs: execute it (see the quiet first cell) and nbdev_clean it'
    for cid, o in outs:
        text = ''.join(o.get('text', [])) + ''.join(o.get('data', {}).get('text/plain', [])) + ''.join(o.get('traceback', []))
        assert o.get('output_type') != 'error', f'{path.name}, cell {cid}: an error is committed'
        m = NOISE.search(text)
        assert m is None, f'{path.name}, cell {cid}: noise in a committed output ({m.group()!r}): {text[max(0, m.start() - 80):m.end() + 80]!r}'
    if EXECUTED[name]:
        assert any('image/png' in o.get('data', {}) for _, o in outs), f'{path.name} should show its figure'
