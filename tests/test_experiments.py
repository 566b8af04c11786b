"Papermill smoke runs of the experiment notebooks at their CI-sized defaults, on the offline data copies."
import csv, json

import pytest
from conftest import DATA, TRAINED_PARENT, needs_data, require_file, run_experiment

pytest.importorskip('papermill')
needs_cifar = needs_data('cifar10-jpeg.zip')

def run(nb, tmp_path, **params): return run_experiment(nb, tmp_path / nb, **params)

def relu_kept_shares(model_path, n_concerned, seed=0):
    """Share of ReLU outputs a module keeps after CI and after CI+TI, averaged over the 10 CIFAR-10 modules, computed
    with Keras alone on the inputs the decomposition observes (E concerned inputs per class, the first
    E // 9 of each class's draw serving as its tangling inputs)."""
    import keras, numpy as np
    from cnnmodules.concern import sample_inputs
    from cnnmodules.experiments import experiment_data
    ds, _ = experiment_data('cifar10', str(DATA))
    model = keras.saving.load_model(model_path)
    s = sample_inputs(ds.y_train, 10, n_concerned, seed=seed)
    relus = [l.output for l in model.layers if isinstance(l, keras.layers.ReLU)
             or (isinstance(l, keras.layers.Activation) and l.get_config()['activation'] == 'relu')]
    acts = keras.Model(model.inputs, relus).predict(ds.x_train[s.index].astype('float32'), batch_size=64, verbose=0)
    on = [a.reshape(len(a), -1) > 0 for a in acts]
    total = sum(a.shape[1] for a in on)
    k = n_concerned // 9
    first = {c: np.flatnonzero(s.label == c)[:k] for c in range(10)}
    ci, ti = [], []
    for c in range(10):
        mine = np.flatnonzero(s.label == c)
        tangling = np.concatenate([first[j] for j in range(10) if j != c])
        ci.append(sum(a[mine].any(0).sum() for a in on) / total)
        ti.append(sum((a[mine].any(0) | a[tangling].any(0)).sum() for a in on) / total)
    return float(np.mean(ci)), float(np.mean(ti))

@needs_cifar
def test_rq1_decomposition(tmp_path):
    model = TRAINED_PARENT
    require_file(model)
    run('rq1_decomposition.ipynb', tmp_path, model_path=str(model), out_dir=str(tmp_path / 'rq1' / 'cifar10_r20'),
        collect_dir=str(tmp_path / 'rq1'))   # the notebook's CI-sized defaults
    m = json.loads((tmp_path / 'rq1' / 'cifar10_r20' / 'metrics.json').read_text())
    assert m['scale']['row'] == 'CIFAR10-R20' and m['paper_row']['model'][0] == 0.871   # the paper's row for this dataset and depth
    assert {r['rule'] for r in m['steps']} == {'backtrack', 'paper'}
    control = next(r for r in m['steps'] if r['steps'] == 'MC only (all nodes kept)')
    assert control['kept_nodes'] == 1.0 and control['removed_by_blc'] == control['removed_by_bi'] == 0
    n_modules = 10                                   # CIFAR-10: one module per class
    for rule in ('backtrack', 'paper'):
        steps = {r['steps']: r for r in m['steps'] if r['rule'] == rule}
        assert set(steps) >= {'CI+MC', 'CI+TI+MC', 'CI+TI+MC-BLN', 'CI+TI+MC-BLN+MC-BI'}
        ci, ti, bln, bi = (steps[k] for k in ('CI+MC', 'CI+TI+MC', 'CI+TI+MC-BLN', 'CI+TI+MC-BLN+MC-BI'))
        nodes = n_modules * ci['nodes_per_module']
        # each row is a separate decomposition with the same seed; each step starts from what the earlier ones kept, so
        # the share one row keeps is the earlier row's minus the nodes its own step reports removing (counted apart)
        assert ti['kept_after_ci'] == pytest.approx(ci['kept_nodes'], abs=1e-12)         # TI's run did the same CI first
        assert ci['kept_after_ci'] == pytest.approx(ci['kept_nodes'], abs=1e-12)         # CI+MC: no step removes after CI
        assert ti['removed_by_blc'] == ti['removed_by_bi'] == ci['removed_by_blc'] == 0
        assert bln['kept_nodes'] == pytest.approx(ti['kept_nodes'] - bln['removed_by_blc'] / nodes, abs=1e-12)
        assert bi['removed_by_blc'] == bln['removed_by_blc'] and bi['head_inputs_removed_by_blc'] == bln['head_inputs_removed_by_blc']
        assert bi['kept_nodes'] == pytest.approx(bln['kept_nodes'] - bi['removed_by_bi'] / nodes, abs=1e-12)
    # CI and CI+TI under the default rule, recomputed directly: a module keeps a ReLU output when it is positive for one of
    # its E concerned inputs (CI), or for one of the other classes' tangling inputs (TI), on the model run by Keras
    steps = {r['steps']: r for r in m['steps'] if r['rule'] == 'backtrack'}
    ci_share, ti_share = relu_kept_shares(model, n_concerned=m['scale']['n_concerned'])
    assert steps['CI+MC']['kept_nodes'] == pytest.approx(ci_share, abs=1e-4)
    assert steps['CI+TI+MC']['kept_nodes'] == pytest.approx(ti_share, abs=1e-4)
    assert ti_share > ci_share       # at E = 20, the 2 tangling inputs of each other class light up nodes CI left out
    assert control['top1'] == m['model']['top1']    # the all-kept control composes to the model exactly
    assert m['speed']['literal_equals_batched'] is True
    for f in ('table1.md', 'steps_ablation.csv', 'delta_ablation.png', 'kept_per_layer.png'): assert (tmp_path / 'rq1' / 'cifar10_r20' / f).exists()
    # the collected Table 1: our one row, in the paper's layout, and the paper's nine rows with what we ran of them
    ours = list(csv.DictReader((tmp_path / 'rq1' / 'table1.csv').open()))
    assert [r['row'] for r in ours] == ['CIFAR10-R20']
    bln = next(r for r in m['steps'] if r['rule'] == 'backtrack' and r['steps'] == 'CI+TI+MC-BLN')
    assert float(ours[0]['bln_top1']) == bln['top1'] and float(ours[0]['model_top1']) == m['model']['top1']
    paper = {r['row']: r for r in csv.DictReader((tmp_path / 'rq1' / 'table1_paper.csv').open())}
    assert len(paper) == 9 and paper['CIFAR10-R20']['ours'] == 'run' and paper['CIFAR100-R20']['ours'].startswith('not run')

@needs_cifar
def test_compact_modules(tmp_path):
    model = TRAINED_PARENT
    require_file(model)
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
