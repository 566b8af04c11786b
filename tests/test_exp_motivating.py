"Papermill smoke run of the motivating example (the paper's Figure 1 / Table 6) at its CI-sized defaults, on the offline Tiny-ImageNet-202 copy."
import csv, json, math

import pytest
from conftest import EXP, require_data, run_experiment

pytest.importorskip('papermill')
ROWS = ('Initial Model', 'MA', 'Option 1', 'Option 2', 'Option 3', 'Option 4', 'Option 1, calibrated vote', 'Option 2, calibrated vote')

@pytest.fixture(scope='module')
def result(tmp_path_factory):
    require_data('tiny-imagenet-202.zip')
    tmp = tmp_path_factory.mktemp('motivating')
    out = tmp / 'out'
    run_experiment('motivating_example.ipynb', tmp / 'motivating_example.ipynb', out_dir=str(out), models_dir=str(tmp / 'models'))
    return out, json.loads((out / 'metrics.json').read_text())

def test_files_and_keys(result):
    out, m = result
    for f in ('metrics.json', 'table6.csv', 'table6.md', 'table6.png'): assert (out / f).stat().st_size > 0, f
    assert {'scale', 'rows', 'checks', 'models', 'paper', 'longer_model', 'timings_s'} <= set(m)
    assert tuple(m['rows']) == ROWS
    with open(out / 'table6.csv') as fh: table = list(csv.DictReader(fh))
    assert [r['strategy'] for r in table] == list(ROWS)
    assert {'paper_top1', 'paper_top5', 'person_as_gorilla', 'gorilla_as_person'} <= set(table[0])
    # the paper's numbers come from paper_numbers.json, next to ours
    paper = json.loads((EXP / 'paper_numbers.json').read_text())['table6']
    for r in table:
        if r['strategy'] not in paper['rows']:   # our calibrated-vote rows: the paper has none
            assert r['strategy'].endswith('calibrated vote') and r['paper_top1'] == r['paper_top5'] == ''; continue
        assert float(r['paper_top1']) == pytest.approx(paper['rows'][r['strategy']][0])
        assert float(r['paper_top5']) == pytest.approx(paper['rows'][r['strategy']][1])
    assert m['paper']['table6']['MA']['top1'] == paper['rows']['MA'][0]

def test_scale_and_models(result):
    out, m = result
    s = m['scale']
    assert s['dataset'] == 'tiny-imagenet-202' and s['image_size'][:2] == [32, 32]
    assert s['test_images'] == 202 * s['test_per_class']
    assert s['focus_person_images'] == s['focus_gorilla_images'] == 20
    init, longer, pair = m['models']['initial'], m['models']['longer'], m['models']['pair']
    assert init['model'] == longer['model']                     # option 1's model is the same run, continued
    assert (init['epochs'], longer['epochs']) == (s['epochs'], s['longer_epochs']) and longer['epochs'] > init['epochs']
    assert init['classes'] == 202 and pair['classes'] == 2
    assert init['train_images'] == s['train_images'] == 202 * s['train_per_class']
    assert pair['train_images'] == s['pair_train_images'] and pair['test_images'] == 100
    assert m['longer_model']['gain_pp_full_test'] == pytest.approx(100 * (longer['test_top1'] - init['test_top1']))
    assert m['longer_model']['paper_gain_pp'] > 0
    # intervals: paired over the scored test images, around their point estimate
    lo, hi = m['longer_model']['gain_pp_scored_test_ci']
    assert lo <= 100 * (m['longer_model']['top1_longer_scored_test'] - m['rows']['Initial Model']['top1']) + 1e-9 <= hi + 2e-9
    with open(out / 'table6.csv') as fh: table = {r['strategy']: r for r in csv.DictReader(fh)}
    assert table['MA']['d_top1_vs_MA_ci_pp'] == ''
    for name, r in table.items():
        if name == 'MA': continue
        lo, hi = json.loads(r['d_top1_vs_MA_ci_pp'])
        assert lo - 1e-9 <= float(r['d_top1_vs_MA_pp']) <= hi + 1e-9, name
    assert m['decomposition']['tangling_per_class'] == s['E'] // 201
    assert m['decomposition']['tangling_per_class_pair'] == s['E_pair']

def test_rows_in_range(result):
    _, m = result
    s = m['scale']
    for name, r in m['rows'].items():
        for k in ('top1', 'top5', 'top1_other_201', 'person_recall'): assert 0 <= r[k] <= 1, (name, k)
        assert r['top1'] <= r['top5'] + 1e-12, name
        for k, bound in (('person_as_gorilla', s['focus_person_images']), ('gorilla_as_person', s['focus_gorilla_images']),
                         ('predicted_gorilla', s['test_images']), ('predicted_person', s['test_images'])):
            assert isinstance(r[k], int) and 0 <= r[k] <= bound, (name, k)
        assert r['gorilla_recall'] is None or 0 <= r['gorilla_recall'] <= 1
        assert r['gorilla_precision'] is None or 0 <= r['gorilla_precision'] <= 1
        assert (r['gorilla_precision'] is None) == (r['predicted_gorilla'] == 0), name

def test_checks_and_scenario_properties(result):
    _, m = result
    s, rows = m['scale'], m['rows']
    assert m['checks'] and all(v is True for v in m['checks'].values()), m['checks']
    assert {'option1_swap_equals_direct', 'option2_swap_equals_direct', 'option3_drop_equals_direct', 'option4_equals_reverify'} <= set(m['checks'])
    mv = m['mode_vs_exact']   # the run's mode against the exact composition on the check images; the CI run composes as the full run, in candidates mode
    assert mv['mode'] == s['compose_mode'] == 'candidates' and mv['images'] == s['check_inputs'] and 0 < mv['person_or_gorilla_images'] <= mv['images']
    for k in ('top1_agreement', 'top5_set_agreement', 'top1_mode', 'top1_exact'): assert 0 <= mv[k] <= 1, (k, mv)
    # a share of the check images each
    for k in ('top1_agreement', 'top5_set_agreement'): assert mv[k] * mv['images'] == pytest.approx(round(mv[k] * mv['images']))
    n = s['test_images']
    # option 3: gorilla is gone, so nothing is called gorilla and no gorilla image is right
    o3 = rows['Option 3']
    assert o3['predicted_gorilla'] == 0 and o3['person_as_gorilla'] == 0 and o3['gorilla_recall'] == 0
    n_gorilla = n // 202
    assert o3['top1'] == pytest.approx(o3['top1_other_201'] * (n - n_gorilla) / n)
    # options 1-3 change only the gorilla column: a prediction can change only where MA or the option says gorilla
    for o in ('Option 1', 'Option 2', 'Option 3'):
        assert abs(rows[o]['top1'] - rows['MA']['top1']) * n <= rows['MA']['predicted_gorilla'] + rows[o]['predicted_gorilla'] + 1e-9, o
    # option 4 re-decides only the model's person and gorilla predictions
    init, o4 = rows['Initial Model'], rows['Option 4']
    assert abs(o4['top1'] - init['top1']) * n <= init['predicted_gorilla'] + init['predicted_person'] + 1e-9
    assert o4['predicted_gorilla'] + o4['predicted_person'] == init['predicted_gorilla'] + init['predicted_person']
    assert o4['top1_other_201'] >= 0 and math.isfinite(o4['top5'])
