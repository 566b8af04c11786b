"Properties of `cnnmodules.scenarios` on a tiny untrained model: facts the scenario code must respect whatever the weights."
import numpy as np
import pytest
import keras

from cnnmodules.models import small_cnn, model_logits
from cnnmodules.decompose import decompose
from cnnmodules.compose import module_logits
from cnnmodules.graph import graph_of, DecompositionError
from cnnmodules.scenarios import (head_inputs, active_nodes, update, calibrate, patch_model, reverify, composed_predict,
                                  removal_report, cross_foreign)

@pytest.fixture(scope='module')
def tiny():
    keras.utils.set_random_seed(0)
    m = small_cnn(4, (8, 8, 1), filters=(4, 8), dense=16)
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (120, 8, 8, 1)).astype('uint8'); y = np.repeat(np.arange(4), 30)
    return m, x, y

def full_keep(m, x, y): return decompose(m, x, y, steps=('mc',), progress=False)

def test_head_inputs_agree_with_composition(tiny):
    m, x, y = tiny
    ms = decompose(m, x, y, n_concerned=9, progress=False)
    for mod in ms:
        z = head_inputs(mod, x) @ (mod.head_kernel * mod.head_keep[:, None]) + mod.head_bias
        np.testing.assert_allclose(z, module_logits(ms[[mod.class_index]], x)[:, 0], rtol=1e-4, atol=1e-4)

def test_active_nodes_match_keras_activations(tiny):
    m, x, y = tiny
    g = graph_of(m)
    ref = keras.Model(m.inputs, [m.get_layer(n).output for n in g.node_names]).predict(x[:50].astype('float32'), verbose=0)
    for a, r in zip(active_nodes(g, x[:50], batch_size=16), ref): np.testing.assert_array_equal(a, (r > 0).any(0))

def test_tangling_update_keeps_exactly_the_foreign_active_nodes_without_backtracking(tiny):
    m, x, y = tiny
    ms = decompose(m, x, y, n_concerned=9, steps=('ci', 'mc'), progress=False)     # no backtracking to re-apply
    foreign = x[:40] // 2 + 100
    act = active_nodes(graph_of(m), foreign)
    new = update(ms, foreign, method='tangling')
    for a, b in zip(ms, new):
        for ma, mb, ac in zip(a.masks, b.masks, act): np.testing.assert_array_equal(mb, ma | ac)
        assert b.provenance['updates'][-1]['nodes_after'] == sum(int(k.sum()) for k in b.masks)
    assert all('updates' not in a.provenance for a in ms)                            # the input set is untouched

def test_head_refit_uses_concerned_against_all_others(tiny):
    m, x, y = tiny
    ms = full_keep(m, x, y)[[0, 1]]
    sel = y < 2
    new = update(ms, x[y == 3][:10], x[sel], y[sel], method='head')
    rec = new[0].provenance['updates'][-1]['head_refit']
    assert (rec['concerned'], rec['unconcerned']) == (30, 30 + 10)
    with pytest.raises(DecompositionError, match="no inputs of classes"): update(ms, x[:5], x[y == 0], y[y == 0], method='head')

def test_per_parent_calibration_changes_no_prediction_of_one_parent(tiny):
    m, x, y0 = tiny
    ms = full_keep(m, x, y0)
    y = model_logits(m, x).argmax(1)          # labels the untrained model's margins do separate
    c = calibrate(ms, x, y)
    np.testing.assert_array_equal(composed_predict(c, x), composed_predict(ms, x, vote='paper'))
    np.testing.assert_array_equal(composed_predict(c, x), y)
    a, b = c[0].calibration['a'], c[0].calibration['b']
    assert a > 0 and all((mm.calibration['a'], mm.calibration['b']) == (a, b) for mm in c)
    for u, v in zip(c, ms): np.testing.assert_array_equal(u.head_kernel, v.head_kernel)   # the heads are left alone

def test_full_keep_modules_patch_and_reverify_reproduce_the_model(tiny):
    "Design decision 9 (nbs/design.ipynb): modules that keep every node vote as their parent; a patch or a re-verification by them changes nothing."
    m, x, y = tiny
    ms = full_keep(m, x, y)
    top = model_logits(m, x).argmax(1)
    np.testing.assert_array_equal(composed_predict(ms, x), top)
    for k in range(4): np.testing.assert_array_equal(patch_model(m, ms[k], x), top)
    np.testing.assert_array_equal(reverify(m, ms[[1, 3]], [1, 3], x), top)

def test_replace_by_itself_and_remove(tiny):
    m, x, y = tiny
    ms = full_keep(m, x, y)
    np.testing.assert_array_equal(composed_predict(ms.replace(2, ms[2]), x), composed_predict(ms, x))
    rep = removal_report(ms, [0], x, y)
    top = composed_predict(ms, x)
    after = composed_predict(ms.remove(0), x) + 1                  # positions 1..3 of the full set
    assert rep['others_top1_after'] == float((after[y != 0] == y[y != 0]).mean())
    assert rep['removed_top1_before'] == float((top[y == 0] == 0).mean())
    assert cross_foreign(ms, x, y) == [None] * 4                  # one parent: nothing is foreign

def test_calibration_refuses_margins_that_do_not_separate(tiny):
    m, x, _ = tiny
    ms = full_keep(m, x, np.repeat(np.arange(4), 30))
    y = model_logits(m, x).argmin(1)          # every input labelled with the class its margin ranks lowest
    with pytest.raises(DecompositionError, match='do not separate'): calibrate(ms, x, y)
