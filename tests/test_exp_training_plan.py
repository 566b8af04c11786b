"Papermill runs of nbs/experiments/training_plan.ipynb (issue 18) on its CI plan: a budget pauses it at an epoch end, the next call resumes."
import json

import numpy as np
import pytest
from conftest import run_experiment

pytest.importorskip('papermill')


def status_rows(path):
    "The status table the notebook wrote, as {piece: row}."
    lines = [l for l in path.read_text().splitlines() if l.startswith('|')]
    head = [c.strip() for c in lines[0].strip('|').split('|')]
    rows = [dict(zip(head, (c.strip() for c in l.strip('|').split('|')))) for l in lines[2:]]
    return {r['piece']: r for r in rows}


def test_plan_pauses_at_the_budget_and_resumes(tmp_path):
    import keras
    from cnnmodules.data import load_dataset, resize
    models, status = tmp_path / 'models', tmp_path / 'status.md'
    run_experiment('training_plan.ipynb', tmp_path / 'a.ipynb', budget_minutes=0.001, models_dir=str(models), status_file=str(status))
    s = status_rows(status)
    assert (s['digits-r8']['state'], s['digits-r8']['epochs_done']) == ('paused', '1')   # one epoch, then the spent budget stopped it
    assert (s['digits-pair-0-1']['state'], s['digits-pair-0-1']['epochs_done']) == ('not started', '0')
    assert not list(models.glob('*.keras'))                          # nothing that looks finished
    assert json.loads((models / 'digits-16px_resnet8_n20.ckpt' / 'epochs.json').read_text())['epochs'] == 1

    run_experiment('training_plan.ipynb', tmp_path / 'b.ipynb', models_dir=str(models), status_file=str(status))
    s = status_rows(status)
    assert all(r['state'] == 'done' and r['epochs_done'] == r['epochs'] for r in s.values())
    assert not list(models.glob('*.ckpt'))                            # finished: the resumable state is removed
    rec = json.loads((models / 'digits-16px_resnet8_n20_e3.json').read_text())
    assert (rec['epochs'], rec['epochs_this_call'], rec['train_images']) == (3, 2, 200)   # resumed: only epochs 2 and 3 this call
    # the pair piece is a model of classes 0 and 1 only, under the key rq2_reuse's TMA models use; its record's score is
    # recomputed here with Keras alone on the digits test images of those two classes
    rec2 = json.loads((models / 'digits-16px-pair-0-1_resnet8_n20_e2.json').read_text())
    m = keras.saving.load_model(models / 'digits-16px-pair-0-1_resnet8_n20_e2.keras')
    d = resize(load_dataset('digits'), 16)
    keep = np.isin(d.y_test, [0, 1])
    assert m.output_shape[-1] == 2 and rec2['classes'] == 2 and rec2['train_images'] == 40
    top1 = float((m.predict(d.x_test[keep], verbose=0).argmax(1) == d.y_test[keep]).mean())
    assert top1 == pytest.approx(rec2['test_top1'])
