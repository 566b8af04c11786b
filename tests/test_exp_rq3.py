"RQ3's notebook (rq3_co2) at its CI-sized defaults: a file of its own, so that pytest-xdist (--dist loadfile) can run it beside the other experiment notebooks."
import csv, json

import pytest
from conftest import TRAINED_PARENT, needs_data, require_file, run_experiment

pytest.importorskip('papermill')

@needs_data('cifar10-jpeg.zip', 'tiny-imagenet-202.zip')
def test_rq3_co2(tmp_path):
    model = TRAINED_PARENT
    require_file(model)
    run_experiment('rq3_co2.ipynb', tmp_path / 'rq3_co2.ipynb', model_path=str(model), out_dir=str(tmp_path / 'rq3'), models_dir=str(tmp_path / 'models'))   # its defaults
    m = json.loads((tmp_path / 'rq3' / 'metrics.json').read_text())
    assert len(m['rows']) == 8 and {r['task'] for r in m['ratios']} == {'reuse (intra)', 'reuse + update (inter)', 'replace (inter)'}
    for r in m['rows']:
        assert r['seconds'] > 0 and r['kwh'] > 0 and r['co2e_g_codecarbon'] > 0
        # the paper's equation (1): kWh = 1.58 * hours * (CPU + RAM watts) / 1000, from the same time and power
        assert abs(r['kwh_paper_eq'] - 1.58 * r['seconds'] / 3600 * (r['cpu_w'] + r['ram_w']) / 1000) <= 1e-12
        assert abs(r['co2e_lbs_paper_eq'] - 0.954 * r['kwh_paper_eq']) <= 1e-12
    assert m['scale']['train_epochs'] == 1 and m['scale']['n_concerned'] == 10 and m['scale']['test_per_class'] == 20
    # the ratios, recomputed from the energy table (energy.csv, one row per measured run) with the pairing the paper
    # makes: each task's training from scratch against the modules doing the same task (not the decompositions)
    energy = {r['scenario']: r for r in csv.DictReader((tmp_path / 'rq3' / 'energy.csv').open())}
    assert len(energy) == 8
    kwh = {k: float(r['kwh']) for k, r in energy.items()}
    pairs = {'reuse (intra)': ('train (intra pair)', 'reuse (intra)'), 'reuse + update (inter)': ('train (inter pair)', 'reuse + update (inter)'),
             'replace (inter)': ('train (new 10 classes)', 'replace (inter)')}
    parent_epochs = json.loads(model.with_suffix('.json').read_text())['epochs']   # the parent's own training record
    ratios_csv = {r['task']: r for r in csv.DictReader((tmp_path / 'rq3' / 'ratios.csv').open())}
    for r in m['ratios']:
        train, mods = pairs[r['task']]
        assert r['training_over_modules_fixed_epochs'] == pytest.approx(kwh[train] / kwh[mods], rel=1e-9)
        assert r['training_kwh_per_epoch'] == pytest.approx(kwh[train] / 1, rel=1e-9)       # one epoch trained
        # at the parent's epochs, training costs parent_epochs times the measured epoch; the modules' cost is unchanged
        assert r['parent_epochs'] == parent_epochs
        assert r['extrapolated_at_parent_epochs'] == pytest.approx(kwh[train] * parent_epochs / kwh[mods], rel=1e-9)
        assert r['best_epoch'] == 1                  # one epoch trained: it is the best
        assert float(ratios_csv[r['task']]['training_over_modules_best_epoch']) == pytest.approx(r['training_over_modules_best_epoch'], rel=1e-9)
        assert 0 <= r['training_top1'] <= 1 and 0 <= r['modules_top1'] <= 1
        # the training ran on at most 30 images of each of the task's classes (two classes, or ten for the replacement)
        assert r['train_images'] == (300 if r['task'] == 'replace (inter)' else 60)
        assert float(energy[train]['top1']) == r['training_top1'] and float(energy[mods]['top1']) == r['modules_top1']
        # both sides predicted the same 20 test images of each of the task's classes: every top-1 is a count of them
        n_test = 20 * (10 if r['task'] == 'replace (inter)' else 2)
        for k in ('training_top1', 'modules_top1'): assert r[k] * n_test == pytest.approx(round(r[k] * n_test), abs=1e-9)
    for f in ('energy.csv', 'energy.md', 'ratios.csv', 'ratios.md', 'figure6.png'): assert (tmp_path / 'rq3' / f).exists()
