"Papermill run of nbs/experiments/calibration.ipynb (issue 15: calibrated votes in the digits replace matrix) at its CI-sized defaults."
import json

import numpy as np
import pytest
from conftest import run_experiment

pytest.importorskip('papermill')


@pytest.fixture(scope='module')
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp('calibration')
    run_experiment('calibration.ipynb', tmp / 'calibration.ipynb', out_dir=str(tmp / 'out'))   # digits only at its defaults: no offline copy read
    return tmp, json.loads((tmp / 'out' / 'metrics.json').read_text())


def test_digits_replace_matrix(run):
    tmp, m = run
    d = m['digits']
    n = m['scale']['digits']['test_images']
    assert m['cifar10'] is None and m['scale']['cifar'] is False
    assert d['checks'] == [True, True]          # the column swaps equal ModuleSet.replace(...).evaluate under both votes
    assert d['models']['strong'] > d['models']['weak']
    assert d['donor_gap_pp'] == pytest.approx(100 * (d['models']['strong'] - d['models']['weak']))
    for direction in ('weak_from_strong', 'strong_from_weak'):
        rows, s = d[direction]['rows'], d[direction]['summary']
        assert [r['class'] for r in rows] == list(range(10))
        for r in rows:
            for v in ('raw', 'calibrated'):
                assert r[f'{v}_top1'] * n == pytest.approx(round(r[f'{v}_top1'] * n))          # a share of the test images
                assert r[f'{v}_delta_pp'] == pytest.approx(100 * (r[f'{v}_top1'] - s['prior_top1']))
                lo, hi = r[f'{v}_delta_ci_pp']
                assert lo - 1e-9 <= r[f'{v}_delta_pp'] <= hi + 1e-9 or hi - lo < 1e-9
            assert r['calibrated_minus_raw_pp'] == pytest.approx(r['calibrated_delta_pp'] - r['raw_delta_pp'])
        assert s['calibrated_mean_delta_pp'] == pytest.approx(np.mean([r['calibrated_delta_pp'] for r in rows]))
        assert s['raw_mean_delta_pp'] == pytest.approx(np.mean([r['raw_delta_pp'] for r in rows]))
        # calibration makes a swap across parents better than the raw vote on average, with an interval above 0
        assert s['mean_calibrated_minus_raw_pp'] > 0 and s['mean_calibrated_minus_raw_ci_pp'][0] > 0
    # the goals on digits
    ws = d['weak_from_strong']['summary']
    assert ws['calibrated_mean_delta_pp'] >= 0 and ws['calibrated_min_delta_pp'] >= -2
    assert all(r['calibrated_delta_pp'] >= -d['donor_gap_pp'] for r in d['strong_from_weak']['rows'])
    assert all(m['goals'].values())
    md = (tmp / 'out' / 'digits_swaps.md').read_text()
    assert 'weak←strong mean' in md and 'strong←weak class 9' in md
