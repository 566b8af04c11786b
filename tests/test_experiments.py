"Papermill smoke runs of the experiment notebooks at their CI-sized defaults, on the offline data copies."
import json
from pathlib import Path

import pytest

papermill = pytest.importorskip('papermill')

REPO = Path(__file__).resolve().parents[1]
EXP = REPO / 'nbs' / 'experiments'
SHARED = REPO.parent / 'shared' / 'data'
needs_data = pytest.mark.skipif(not (SHARED / 'cifar10-jpeg.zip').exists(), reason=f'no offline CIFAR-10 copy at {SHARED}')

def run(nb, tmp_path, **params):
    out = tmp_path / nb
    papermill.execute_notebook(str(EXP / nb), str(out), parameters=dict(data_dir=str(SHARED), **params),
                               cwd=str(EXP), kernel_name='python3', progress_bar=False)
    return out

@needs_data
def test_train_resnet(tmp_path):
    run('train_resnet.ipynb', tmp_path, out_dir=str(tmp_path / 'models'), depth=8, train_per_class=20, epochs=2,
        checkpoint_dir=str(tmp_path / 'ckpt'))
    rec = json.loads((tmp_path / 'models' / 'cifar10_resnet8_ci.json').read_text())
    assert rec['epochs'] == 2 and rec['train_images'] == 200 and 0 <= rec['test_top1'] <= 1
    assert (tmp_path / 'models' / 'cifar10_resnet8_ci.keras').exists()
    assert (tmp_path / 'ckpt' / 'best.keras').exists()

@needs_data
def test_rq1_decomposition(tmp_path):
    model = REPO / 'reports' / 'models' / 'cifar10_resnet20.keras'
    if not model.exists(): pytest.skip(f'no trained parent at {model}')
    run('rq1_decomposition.ipynb', tmp_path, model_path=str(model), out_dir=str(tmp_path / 'rq1' / 'cifar10_r20'),
        collect_dir=str(tmp_path / 'rq1'))   # the notebook's CI-sized defaults
    m = json.loads((tmp_path / 'rq1' / 'cifar10_r20' / 'metrics.json').read_text())
    assert m['scale']['row'] == 'CIFAR10-R20' and m['paper_row']['model'][0] == 0.871   # the paper's row for this dataset and depth
    assert {r['rule'] for r in m['steps']} == {'backtrack', 'paper'}
    for rule in ('backtrack', 'paper'):
        steps = {r['steps']: r for r in m['steps'] if r['rule'] == rule}
        # the ablation ran every step under both node rules; CI keeps no more than CI+TI; MC-BI no more than MC-BLN
        assert set(steps) >= {'CI+MC', 'CI+TI+MC', 'CI+TI+MC-BLN', 'CI+TI+MC-BLN+MC-BI'}
        assert steps['CI+MC']['kept_nodes'] <= steps['CI+TI+MC']['kept_nodes']
        assert steps['CI+TI+MC-BLN+MC-BI']['kept_nodes'] <= steps['CI+TI+MC-BLN']['kept_nodes'] <= steps['CI+TI+MC']['kept_nodes']
    control = next(r for r in m['steps'] if r['steps'] == 'MC only (all nodes kept)')
    assert control['top1'] == m['model']['top1']    # the all-kept control composes to the model exactly
    assert m['speed']['literal_equals_batched'] is True
    for f in ('table1.md', 'steps_ablation.csv', 'delta_ablation.png', 'kept_per_layer.png'): assert (tmp_path / 'rq1' / 'cifar10_r20' / f).exists()
    # the collected Table 1: our one row, in the paper's layout, and the paper's nine rows with what we ran of them
    import csv
    ours = list(csv.DictReader((tmp_path / 'rq1' / 'table1.csv').open()))
    assert [r['row'] for r in ours] == ['CIFAR10-R20']
    bln = next(r for r in m['steps'] if r['rule'] == 'backtrack' and r['steps'] == 'CI+TI+MC-BLN')
    assert float(ours[0]['bln_top1']) == bln['top1'] and float(ours[0]['model_top1']) == m['model']['top1']
    paper = {r['row']: r for r in csv.DictReader((tmp_path / 'rq1' / 'table1_paper.csv').open())}
    assert len(paper) == 9 and paper['CIFAR10-R20']['ours'] == 'run' and paper['CIFAR100-R20']['ours'].startswith('not run')

@needs_data
def test_compact_modules(tmp_path):
    model = REPO / 'reports' / 'models' / 'cifar10_resnet20.keras'
    if not model.exists(): pytest.skip(f'no trained parent at {model}')
    run('compact_modules.ipynb', tmp_path, model_path=str(model), out_dir=str(tmp_path / 'compact'),
        n_concerned=20, test_per_class=10, node_rates=[0.0, 0.2], channel_rates=[0.0, 0.4], sparsities=[2.0], mask_steps=3, mask_batch=4)
    m = json.loads((tmp_path / 'compact' / 'metrics.json').read_text())
    rows = {(r['variant'], r['value'], r['head']): r for r in m['rows']}
    assert len(rows) == 10 and m['scale']['n_concerned'] == 20 and m['scale']['test_images'] == 100
    # the paper's rule keeps every channel: all hidden FLOPs (only the 2-unit head is narrower than the 10-unit one)
    assert rows['node', 0.0, 'channeled']['flops_pct'] > 99.9
    # a higher min_rate never makes channel-granular modules larger
    assert rows['channel', 0.4, 'channeled']['flops_pct'] <= rows['channel', 0.0, 'channeled']['flops_pct']
    assert m['slim_export']['slim_params'] == m['slim_export']['size']['params']
    assert m['slim_export']['max_abs_diff_p_concerned_200_test_images_float32'] < 1e-4
    for f in ('frontier.png', 'frontier.csv', 'frontier.md'): assert (tmp_path / 'compact' / f).exists()

@needs_data
def test_rq3_co2(tmp_path):
    model = REPO / 'reports' / 'models' / 'cifar10_resnet20.keras'
    if not model.exists(): pytest.skip(f'no trained parent at {model}')
    run('rq3_co2.ipynb', tmp_path, model_path=str(model), out_dir=str(tmp_path / 'rq3'), models_dir=str(tmp_path / 'models'))   # its defaults
    m = json.loads((tmp_path / 'rq3' / 'metrics.json').read_text())
    assert len(m['rows']) == 8 and {r['task'] for r in m['ratios']} == {'reuse (intra)', 'reuse + update (inter)', 'replace (inter)'}
    for r in m['rows']:
        assert r['seconds'] > 0 and r['kwh'] > 0 and r['co2e_g_codecarbon'] > 0
        # the paper's equation (1): kWh = 1.58 * hours * (CPU + RAM watts) / 1000, from the same time and power
        assert abs(r['kwh_paper_eq'] - 1.58 * r['seconds'] / 3600 * (r['cpu_w'] + r['ram_w']) / 1000) <= 1e-12
        assert abs(r['co2e_lbs_paper_eq'] - 0.954 * r['kwh_paper_eq']) <= 1e-12
    for r in m['ratios']:
        assert 0 < r['training_over_modules_best_epoch'] <= r['training_over_modules_fixed_epochs']
        assert 0 <= r['training_top1'] <= 1 and 0 <= r['modules_top1'] <= 1 and r['train_images'] > 0
        # training energy grows with its epochs: at the parent's epochs (its record: 30) the ratio scales from the 1-epoch run
        assert r['parent_epochs'] == json.loads(model.with_suffix('.json').read_text())['epochs']
        assert r['extrapolated_at_parent_epochs'] == pytest.approx(r['training_over_modules_fixed_epochs'] * r['parent_epochs'])
    assert m['scale']['train_epochs'] == 1 and m['scale']['n_concerned'] == 10
    for f in ('energy.csv', 'energy.md', 'ratios.csv', 'ratios.md', 'figure6.png'): assert (tmp_path / 'rq3' / f).exists()
