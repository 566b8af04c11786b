"Papermill runs of nbs/experiments/rq2_reuse.ipynb (the paper's Tables 2-3, module reuse) at its CI-sized defaults: twice on one model cache."
import csv, json, math

import pytest
from conftest import TRAINED_PARENT as PARENT, needs_data, require_file, run_experiment

pytest.importorskip('papermill')
needs_cifar_tiny = needs_data('cifar10-jpeg.zip', 'tiny-imagenet-202.zip')

def run(tmp_path, name, **params):
    out = tmp_path / name
    run_experiment('rq2_reuse.ipynb', tmp_path / f'{name}.ipynb', out_dir=str(out), models_dir=str(tmp_path / 'models'), **params)
    return json.loads((out / 'metrics.json').read_text()), out

def csv_rows(path):
    with open(path, newline='') as f: return list(csv.DictReader(f))

def snapshot(folder):
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob('*') if p.is_file()}

@needs_cifar_tiny
def test_rq2_reuse(tmp_path):
    require_file(PARENT)
    from cnnmodules.experiments import paper_numbers
    m, out = run(tmp_path, 'first')
    assert {'scale', 'table2', 'table3', 'summary', 'paper', 'tma_models'} <= set(m)
    sc, t2, t3, s = m['scale'], m['table2'], m['table3'], m['summary']
    for f in ('table2.csv', 'table2.md', 'table3.csv', 'table3.md', 'metrics.json'): assert (out / f).exists(), f
    assert (out / 'reuse.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'

    # Table 2: every pair of the n_classes distinct classes drawn, once
    n = sc['n_classes']
    assert len(set(sc['classes'])) == n and len(t2) == math.comb(n, 2) == 3   # the CI default: 3 classes
    assert {(r['class_a'], r['class_b']) for r in t2} == {(a, b) for i, a in enumerate(sc['classes']) for b in sc['classes'][i + 1:]}
    for r in t2:
        assert r['class_a'] != r['class_b']
        for k in ('TMA', 'MA', 'MA_recall_a', 'MA_recall_b'): assert 0 <= r[k] <= 1, (k, r)
        assert r['MA_minus_TMA'] == pytest.approx(r['MA'] - r['TMA'])
        assert r['test_images'] == 2 * sc['test_per_class']
        assert r['MA'] == pytest.approx((r['MA_recall_a'] + r['MA_recall_b']) / 2)   # equal test images per class
        assert r['TMA_train_images'] == 2 * sc['tma_train_per_class']

    # Table 3: inter_classes x inter_classes pairs, each with TMA, MA and MMA (balanced accuracy) consistent with its parts
    k = sc['inter_classes']
    assert len(t3) == k * k and len({(r['other_index'], r['class_index']) for r in t3}) == k * k
    assert not set(sc['inter_other_class_names']) & set(r['class'] for r in t3)   # names distinct across the datasets
    for r in t3:
        for key in ('TMA', 'MA', 'MMA', 'TMA_pooled', 'MA_pooled', 'MMA_pooled', 'MA_recall_other', 'MA_recall_class', 'MMA_recall_other', 'MMA_recall_class'):
            assert 0 <= r[key] <= 1, (key, r)
        assert r['MA'] == pytest.approx((r['MA_recall_other'] + r['MA_recall_class']) / 2)
        assert r['MMA'] == pytest.approx((r['MMA_recall_other'] + r['MMA_recall_class']) / 2)
        no, nc = r['test_images_other'], r['test_images_class']
        assert (no, nc) == (min(50, sc['test_per_class']), sc['test_per_class'])
        assert r['MA_pooled'] == pytest.approx((r['MA_recall_other'] * no + r['MA_recall_class'] * nc) / (no + nc))
        assert r['MMA_minus_MA'] == pytest.approx(r['MMA'] - r['MA']) and r['update_method'] == 'head'
        for key in ('MA_calibrated', 'MMA_calibrated', 'MA_calibrated_pooled', 'MMA_calibrated_pooled'):   # the calibrated vote beside
            assert 0 <= r[key] <= 1, (key, r)
        for key in ('MA_calibrated_pooled', 'MMA_calibrated_pooled'):   # a share of the pair's test images
            assert r[key] * (no + nc) == pytest.approx(round(r[key] * (no + nc)))
        assert r['MA_calibrated_minus_TMA'] == pytest.approx(r['MA_calibrated'] - r['TMA'])
        assert r['MA_calibrated_minus_MA'] == pytest.approx(r['MA_calibrated'] - r['MA'])
        for key in ('MA_minus_TMA', 'MMA_minus_MA', 'MA_calibrated_minus_TMA', 'MMA_tangling_minus_MA', 'MA_calibrated_minus_MA'):   # 95% intervals around each difference
            lo, hi = r[f'{key}_ci']
            assert lo - 1e-4 <= r[key] <= hi + 1e-4, (key, r)
        # the paper's own update (§3.5) beside the head re-fit, in balanced and plain accuracy
        for key in ('MMA_tangling', 'MMA_tangling_pooled', 'MMA_tangling_calibrated'): assert 0 <= r[key] <= 1, (key, r)
        assert r['MMA_tangling_minus_MA'] == pytest.approx(r['MMA_tangling'] - r['MA'])
        assert r['MMA_tangling_pooled'] * (no + nc) == pytest.approx(round(r['MMA_tangling_pooled'] * (no + nc)))
        assert 0 <= r['MMA_tangling_changed_predictions'] <= no + nc
        if r['MMA_tangling_changed_predictions'] == 0: assert r['MMA_tangling'] == r['MA']
        for key, point in (('MMA_minus_MA_pooled', r['MMA_pooled'] - r['MA_pooled']), ('MMA_tangling_minus_MA_pooled', r['MMA_tangling_pooled'] - r['MA_pooled'])):
            lo, hi = r[f'{key}_ci']
            assert lo - 1e-4 <= point <= hi + 1e-4, (key, r)

    # every column swap was checked against composing the actual two-module set
    assert sc['swap_checked_inputs'] > 0 and sc['swap_checked_inputs'] % (len(t2) + len(t3)) == 0

    # the summary is the rows' means, the paper's averages come from paper_numbers.json
    mean = lambda rows, key: sum(r[key] for r in rows) / len(rows)
    assert s['intra_mean_MA_minus_TMA'] == pytest.approx(mean(t2, 'MA_minus_TMA'))
    assert s['inter_mean_MA_minus_TMA'] == pytest.approx(mean(t3, 'MA_minus_TMA'))
    assert s['inter_mean_MMA_minus_MA'] == pytest.approx(mean(t3, 'MMA_minus_MA'))
    assert s['inter_mean_MA_calibrated'] == pytest.approx(mean(t3, 'MA_calibrated'))
    assert s['inter_mean_MA_calibrated_minus_TMA'] == pytest.approx(mean(t3, 'MA_calibrated_minus_TMA'))
    assert s['inter_mean_MMA_tangling_minus_MA'] == pytest.approx(mean(t3, 'MMA_tangling_minus_MA'))
    assert s['inter_changed_predictions_tangling'] == sum(r['MMA_tangling_changed_predictions'] for r in t3)
    assert s['intra_pairs_MA_ge_TMA'] == sum(r['MA'] >= r['TMA'] for r in t2)
    assert s['intra_pairs_MA_above_TMA_ci'] == sum(r['MA_minus_TMA_ci'][0] > 0 for r in t2)
    for r in t2: assert r['MA_minus_TMA_ci'][0] - 1e-4 <= r['MA_minus_TMA'] <= r['MA_minus_TMA_ci'][1] + 1e-4
    p2, p3 = paper_numbers('table2'), paper_numbers('table3')
    assert s['paper_intra_mean_MA_minus_TMA'] == pytest.approx(sum(v['MA'] - v['TMA'] for v in p2['CIFAR-10'].values()) / 6)
    cells = [v for row in p3['pairs'].values() for v in row.values()]
    assert s['paper_inter_mean_MA_minus_TMA'] == pytest.approx(sum(v[1] - v[0] for v in cells) / len(cells))
    assert s['paper_inter_mean_MMA_minus_MA'] == pytest.approx(sum(v[2] - v[1] for v in cells) / len(cells))

    # the CSVs hold the same rows as metrics.json
    c2, c3 = csv_rows(out / 'table2.csv'), csv_rows(out / 'table3.csv')
    assert len(c2) == len(t2) and len(c3) == len(t3)
    for c, r in zip(c2, t2): assert c['pair'] == r['pair'] and float(c['MA']) == pytest.approx(r['MA']) and float(c['TMA']) == pytest.approx(r['TMA'])
    for c, r in zip(c3, t3): assert float(c['MMA']) == pytest.approx(r['MMA']) and float(c['TMA']) == pytest.approx(r['TMA'])
    assert 'paper' in (out / 'table2.md').read_text() and 'CIFAR-100' in (out / 'table3.md').read_text()

    # one TMA model per pair, trained in this run, its record scored on the same test images as the table
    models = tmp_path / 'models'
    tm = m['tma_models']
    assert len(tm) == len(t2) + len(t3) and len({t['file'] for t in tm}) == len(tm)
    assert all((models / t['file']).exists() and not t['cached_before'] for t in tm)
    for t, r in zip(tm[:len(t2)], t2): assert t['record_test_top1'] == pytest.approx(r['TMA'], abs=1.5 / r['test_images'])
    for t, r in zip(tm[len(t2):], t3): assert t['record_test_top1'] == pytest.approx(r['TMA_pooled'], abs=1.5 / (r['test_images_other'] + r['test_images_class']))

    # a second run on the same cache trains nothing: it loads every model, writes no model file, and reproduces the table.
    # Table 2 only (inter=False): its TMA models go through the same cached training as Table 3's, at half the run's time
    before = snapshot(models)
    m2, _ = run(tmp_path, 'second', inter=False)
    assert snapshot(models) == before and m2['table3'] == []
    assert all(t['cached_before'] for t in m2['tma_models']) and [t['file'] for t in m2['tma_models']] == [t['file'] for t in tm[:len(t2)]]
    for a, b in zip(m2['table2'], t2): assert (a['pair'], a['MA']) == (b['pair'], b['MA']) and a['TMA'] == pytest.approx(b['TMA'], abs=1.5 / b['test_images'])
