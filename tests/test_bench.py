"`cnnmodules bench --smoke --json FILE` (the smallest run that produces every figure) runs end to end and writes every figure the scale issue asks for."
import json
import math
import subprocess
import sys

KEYS = ['decompose_over_predict', 'exact_compose_over_n_predicts', 'fused_over_predict', 'fused_top1_delta_pp',
        'moduleset_over_model_size', 'decompose_over_predict_202', 'exact_compose_over_n_predicts_202',
        'exact_agreement_202', 'peak_rss_gb', 'distributed_masks_identical', 'machine']


def test_bench_smoke_json(tmp_path):
    out = tmp_path / 'bench.json'
    r = subprocess.run([sys.executable, '-c', 'import sys; from cnnmodules.cli import main; main(sys.argv[1:])',
                        'bench', '--smoke', '--repeats', '1', '--json', str(out)], capture_output=True, text=True, timeout=1800)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.read_text())
    missing = [k for k in KEYS if k not in res]
    assert not missing, missing
    for k in KEYS[:7] + ['peak_rss_gb']:
        assert isinstance(res[k], (int, float)) and math.isfinite(res[k]), (k, res[k])
    for k in ('decompose_over_predict', 'exact_compose_over_n_predicts', 'fused_over_predict', 'moduleset_over_model_size', 'peak_rss_gb'):
        assert res[k] > 0, (k, res[k])
    # 'exact' is exact: it agrees with the literal composition on every input, top-1 and top-5
    assert res['exact_agreement_202'] == {'top1': 1.0, 'top5': 1.0}
    assert res['distributed_masks_identical'] is True
    assert res['literal_equals_fast'] is True
    assert 'fused_top1_delta_pp' in r.stdout      # the table went to stdout
    assert res['size'] == 'smoke' and res['scale_202']['input'] == [32, 32, 3] and res['scale_202']['nodes_per_module'] > 0
    assert set(res['part_seconds']) == {'resnet20_10_classes', 'sizes', 'literal_reference', 'resnet_202_classes', 'trained_model', 'distributed'}
