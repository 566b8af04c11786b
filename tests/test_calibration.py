"""Calibrated votes (issue 15): every module carries a map p_concerned = σ(a·margin + b), shared per parent.

1. A set of one parent composes to the parent's argmax under the calibrated vote, whatever the shared map (a > 0, any
   b), in every mode; its p_concerned is σ(a·margin + b) of the parent's own margins (plain Keras, not the engine).
2. A fitted map is increasing and has an intercept: a > 0, the intercept's score equation holds (mean fitted
   probability = share of positives, which a map through 0 cannot meet), and shifting every margin by c moves b by −a·c.
   Across parents of different class counts the vote compares evidence, not priors: for margins drawn from two
   normals the vote's score is their log-likelihood ratio whatever the parent's base rate 1/K.
3. `calibrate` fits any grouping, a lone foreign module included; it refuses margins that anti-separate.
4. The map travels: `.cnnm` save/load, the standalone `.keras` (masked and slim), and a head changed afterwards reads
   as uncalibrated; files written without maps load with identity maps and a warning.
5. The command line: decompose/compose/replace/update write calibrated sets, `--calibrate-on` re-fits, `evaluate
   --json` says which vote it used and takes `--vote paper`.
"""
import json
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
import keras
from hypothesis import given, assume, strategies as st

from cnn_strategies import cnn_specs, build, props, make_data
from conftest import cli_main

from cnnmodules.graph import graph_of, DecompositionError
from cnnmodules.modularize import channel_head
from cnnmodules.modules import Module, ModuleSet
from cnnmodules.compose import (MODES, calibrate, calibration_of, calibration_record, compose_vote, fit_calibration,
                                module_logits, vote_scores, vote_offset, calibrated_margins)
from cnnmodules.decompose import decompose

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning")


def parent_logits(model, x):
    "The parent's pre-softmax logits through a plain Keras sub-model."
    sub = keras.Model(model.inputs[0], model.layers[-1].input)
    W, b = model.layers[-1].get_weights()
    return np.asarray(sub(x)) @ W + b


def full_modules(model, a=None, b=None, base_rate=None):
    "One module per class keeping every node, optionally all carrying the map (a, b) fitted at `base_rate`."
    g = graph_of(model)
    W, bias = model.layers[-1].get_weights()
    hk, hb = channel_head(W, bias, range(g.num_classes))
    mods = [Module(c, str(c), [np.ones(s, bool) for s in g.node_shapes], hk[c], hb[c], np.ones(W.shape[0], bool), model)
            for c in range(g.num_classes)]
    if a is not None:
        for m in mods: m.calibration = calibration_record(m, a, b, base_rate=base_rate)
    return mods


def sigmoid(t): return 0.5 * (1 + np.tanh(t / 2))


# ---------------------------------------------------------------- 1. one parent = its argmax

@props(8)
@given(st.data(), st.floats(-3, 3), st.floats(-40, 40))
def test_one_parent_set_composes_to_the_parents_argmax_under_any_shared_map(data, log_a, b):
    spec = data.draw(cnn_specs(), label='spec')
    m = build(spec)
    N = spec['N']
    x, _ = make_data(spec, 5)
    a = float(10 ** log_a)
    ms = ModuleSet(full_modules(m, a, b))
    z = parent_logits(m, x)
    parent = np.asarray(m(x)).argmax(1)
    for mode in MODES:
        ev = ms.evaluate(x, parent, mode=mode, jaccard=False)
        assert ev['top1'] == 1.0 and ev['vote'] == 'calibrated', mode
    # p_concerned is the map applied to the parent's margin z_c − mean of the others (plain Keras)
    margin = z - (z.sum(1, keepdims=True) - z) / (N - 1)
    pc, pu = ms.predict(x)
    np.testing.assert_allclose(pc, sigmoid(a * margin + b), rtol=1e-9, atol=1e-12)
    pcr, _ = ms.predict(x, vote='paper')
    np.testing.assert_allclose(pcr, sigmoid(margin), rtol=1e-9, atol=1e-12)


@props(6)
@given(st.data())
def test_decompose_fits_one_increasing_map_per_parent_and_keeps_its_argmax(data):
    spec = data.draw(cnn_specs(), label='spec')
    m = build(spec, 'float32')
    x, _ = make_data(spec, 40, 'float32')
    y = np.asarray(m(x)).argmax(1)                        # labels the parent's margins do separate
    assume(np.bincount(y, minlength=spec['N']).min() >= 2)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        ms = decompose(m, x, y, steps=('mc',), progress=False)   # keeps every node: composes to the parent
    cal = [m_.calibration for m_ in ms]
    assume(cal[0] is not None)
    assert all(c['a'] == cal[0]['a'] and c['b'] == cal[0]['b'] for c in cal) and cal[0]['a'] > 0
    assert cal[0]['source'] in ('held_out', 'all', 'all (too few held out)') and cal[0]['inputs'] <= len(x)
    xt, _ = make_data({**spec, 'seed': spec['seed'] + 5}, 6, 'float32')
    parent = np.asarray(m(xt)).argmax(1)
    z = module_logits(ms, xt)
    np.testing.assert_array_equal(compose_vote(ms, z[..., 0] - z[..., 1]), parent)
    assert ms.evaluate(xt, parent, jaccard=False)['top1'] == 1.0


# ---------------------------------------------------------------- 2. the fitted map

@props(40)
@given(st.integers(30, 3000), st.floats(0.05, 20), st.floats(-6, 6), st.floats(-50, 50), st.floats(0.1, 20), st.integers(0, 2**31))
def test_fitted_map_is_increasing_with_a_fitted_intercept(n, a_true, b_true, shift, spread, seed):
    rng = np.random.default_rng(seed)
    m = rng.normal(0, spread, n)
    t = rng.random(n) < sigmoid(a_true * m + b_true)
    m[:2], t[:2] = m.max() + 1, [True, False]   # both kinds present
    t[2] = False; m[2] = m.min() - 1
    try: a, b = fit_calibration(m, t)
    except DecompositionError:                  # allowed only when the sample's margins really point the other way
        assert np.corrcoef(m, t)[0, 1] <= 0.05; return
    assert a > 0
    # the intercept's score equation: the mean fitted probability is the share of positives
    np.testing.assert_allclose(sigmoid(a * m + b).mean(), t.mean(), rtol=1e-6, atol=1e-8)
    # an increasing map: order kept
    p = sigmoid(a * m + b); i = np.argsort(m, kind='stable')
    assert (np.diff(p[i]) >= 0).all()
    # shifting the margins moves the intercept, not the scale
    a2, b2 = fit_calibration(m + shift, t)
    np.testing.assert_allclose(a2, a, rtol=1e-5)
    np.testing.assert_allclose(b2, b - a * shift, rtol=1e-5, atol=1e-5 * (1 + abs(a * shift)))


def test_map_through_zero_cannot_meet_the_score_equation():
    "A data set where the best map has a clearly non-zero intercept: the fitted b is far from 0."
    rng = np.random.default_rng(1)
    m = rng.normal(0, 1, 5000)
    t = rng.random(5000) < sigmoid(2 * m - 3)
    a, b = fit_calibration(m, t)
    assert 1.6 < a < 2.4 and -3.5 < b < -2.5


@props(12)
@given(st.floats(0.7, 3.0), st.integers(2, 250), st.integers(2, 250), st.integers(0, 2**31))
def test_the_vote_compares_evidence_not_the_parents_base_rate(two_parents, mu, ka, kb, seed):
    """Two parents whose modules' margins follow the same laws — N(μ, 1) on inputs of the module's class, N(0, 1) on
    the others — but that have K_a and K_b classes, so their maps are fitted at base rates 1/K_a and 1/K_b. The vote's
    score must be the same evidence for both: the log-likelihood ratio μ·m − μ²/2 of the two normals (a fact of the
    laws, not of the fit), so equal margins tie; the maps themselves (p_concerned) keep their parents' priors."""
    rng = np.random.default_rng(seed)
    mods = full_modules(two_parents[0])[:2]
    for mod, K in zip(mods, (ka, kb)):
        npos = 4000
        m = np.concatenate([rng.normal(mu, 1, npos), rng.normal(0, 1, npos * (K - 1))])
        t = np.arange(m.size) < npos
        a, b = fit_calibration(m, t)
        mod.calibration = calibration_record(mod, a, b, base_rate=t.mean())
        np.testing.assert_allclose(vote_offset(mod), -np.log(K - 1), rtol=1e-9)       # logit(1/K)
    ms = ModuleSet(mods)
    grid = np.linspace(0, mu, 7)
    s = vote_scores(ms, np.stack([grid, grid], 1))
    np.testing.assert_allclose(s, np.stack([mu * grid - mu * mu / 2] * 2, 1), atol=0.25)
    # p_concerned stays under each parent's prior (Bayes): its logit is the log-likelihood ratio + logit(1/K)
    prior = -np.log(np.array([ka, kb]) - 1.0)
    np.testing.assert_allclose(calibrated_margins(ms, np.stack([grid, grid], 1)), (mu * grid - mu * mu / 2)[:, None] + prior, atol=0.25)


def test_fit_calibration_refusals():
    with pytest.raises(DecompositionError, match='do not separate'): fit_calibration(np.ones(10), np.arange(10) < 3)
    with pytest.raises(DecompositionError, match='other classes'): fit_calibration(np.arange(10.), np.ones(10, bool))
    with pytest.raises(DecompositionError, match='do not separate'): fit_calibration(np.arange(10.), np.arange(10) < 5)   # the low margins are the positives


# ---------------------------------------------------------------- 3. calibrate: any grouping

@pytest.fixture(scope='module')
def two_parents():
    spec = dict(shape=(8, 8, 1), zeropad=None, convs=[dict(f=4, k=3, s=1, pad='same', act='relu')], blocks=[], pool=None,
                dense=None, top='gap', N=4, seed=3, bias=(-0.1, 0.15))
    m1, m2 = build(spec), build({**spec, 'seed': 11})
    x, _ = make_data(spec, 60)
    return m1, m2, x


def test_calibrate_fits_a_lone_foreign_module_and_keeps_each_parents_order(two_parents):
    m1, m2, x = two_parents
    mods = full_modules(m1)[:3] + full_modules(m2)[3:]          # three of parent 1, a lone module of parent 2
    ms = ModuleSet(mods)
    z = module_logits(ms, x); raw = z[..., 0] - z[..., 1]
    y = ((raw - raw.mean(0)) / raw.std(0)).argmax(1)             # labels the margins separate (each module's on its own scale)
    assert np.bincount(y, minlength=4).min() >= 3
    c = calibrate(ms, x, y)
    ab = [calibration_of(m) for m in c]
    assert ab[0] == ab[1] == ab[2] and ab[3] != ab[0] and all(a > 0 for a, _ in ab)
    assert all(m.calibration['per'] == 'parent' and m.calibration['inputs'] == len(x) for m in c)
    # the map is a logistic regression with intercept: its score equations hold per group, pooled over the group's modules
    for g in ([0, 1, 2], [3]):
        a, b = ab[g[0]]
        np.testing.assert_allclose(sigmoid(a * raw[:, g] + b).mean(), (y[:, None] == np.asarray(g)[None]).mean(), rtol=1e-6)
    # within parent 1, the calibrated vote orders exactly as the raw margins
    np.testing.assert_array_equal(compose_vote(c[[0, 1, 2]], raw[:, :3]), raw[:, :3].argmax(1))
    per_module = calibrate(ms, x, y, per='module')
    assert len({calibration_of(m) for m in per_module}) == 4
    with pytest.raises(DecompositionError, match='needs inputs of their classes'): calibrate(ms, x[y < 3], y[y < 3])
    with pytest.raises(DecompositionError, match='positions'): calibrate(ms, x, y + 1)


def test_calibrate_refuses_margins_that_anti_separate(two_parents):
    m1, _, x = two_parents
    ms = ModuleSet(full_modules(m1))
    z = module_logits(ms, x)
    y = (z[..., 0] - z[..., 1]).argmin(1)                        # each input labelled with its *lowest* margin
    with pytest.raises(DecompositionError, match='do not separate'): calibrate(ms, x, y)


def test_modes_use_the_same_calibrated_rule(two_parents):
    m1, m2, x = two_parents
    ms = ModuleSet(full_modules(m1, 0.3, 1.0)[:2] + full_modules(m2, 4.0, -2.0)[2:])
    y = np.arange(len(x)) % 4
    res = {mode: ms.evaluate(x, y, mode=mode, jaccard=False, k=2) for mode in MODES}
    assert len({r['top1'] for r in res.values()}) == 1 and len({r['top5'] for r in res.values()}) == 1
    z = module_logits(ms, x); raw = z[..., 0] - z[..., 1]
    cal = raw * np.array([0.3, 0.3, 4.0, 4.0]) + np.array([1.0, 1.0, -2.0, -2.0])
    assert res['exact']['top1'] == float((cal.argmax(1) == y).mean())
    assert ms.evaluate(x, y, vote='paper', jaccard=False)['top1'] == float((raw.argmax(1) == y).mean())
    with pytest.raises(DecompositionError, match='vote must be'): ms.evaluate(x, y, vote='raw')
    # maps fitted at different base rates (parents of 4 and of 200 classes): every mode votes on a·m + b − logit(π)
    ms = ModuleSet(full_modules(m1, 0.3, 1.0, 1 / 4)[:2] + full_modules(m2, 4.0, -2.0, 1 / 200)[2:])
    res = {mode: ms.evaluate(x, y, mode=mode, jaccard=False, k=2) for mode in MODES}
    ev = cal - np.log(np.array([1 / 3, 1 / 3, 1 / 199, 1 / 199]))
    assert len({r['top1'] for r in res.values()}) == 1 and len({r['top5'] for r in res.values()}) == 1
    assert res['exact']['top1'] == float((ev.argmax(1) == y).mean())
    assert (ev.argmax(1) != cal.argmax(1)).any()                  # the base rates do change this vote


# ---------------------------------------------------------------- 4. the map travels

def test_map_survives_save_load_and_is_folded_into_the_standalone_models(two_parents, tmp_path):
    m1, m2, x = two_parents
    ms = ModuleSet(full_modules(m1, 0.7, -1.3)[:2] + full_modules(m2, 3.0, 0.4)[2:])
    back = ModuleSet.load(ms.save(tmp_path / 's.cnnm'))
    assert [m.calibration for m in back] == [m.calibration for m in ms]
    for u, v in zip(ms.predict(x), back.predict(x)): np.testing.assert_array_equal(u, v)
    z = parent_logits(m2, x)
    margin = z - (z.sum(1, keepdims=True) - z) / 3
    for slim in (False, True):
        k = back[3].to_keras(slim=slim)
        np.testing.assert_allclose(np.asarray(k(x))[:, 0], sigmoid(3.0 * margin[:, 3] + 0.4), rtol=1e-6, atol=1e-9)
    k.save(tmp_path / 'm3.keras')
    np.testing.assert_allclose(np.asarray(keras.saving.load_model(tmp_path / 'm3.keras')(x))[:, 0], sigmoid(3.0 * margin[:, 3] + 0.4), rtol=1e-6, atol=1e-9)


def test_a_changed_head_reads_as_uncalibrated(two_parents):
    import dataclasses
    m1, _, _ = two_parents
    mod = full_modules(m1, 2.0, 1.0)[0]
    assert calibration_of(mod) == (2.0, 1.0)
    assert calibration_of(dataclasses.replace(mod, head_bias=mod.head_bias + 0.1)) == (1.0, 0.0)
    assert calibration_of(dataclasses.replace(mod, head_keep=~mod.head_keep)) == (1.0, 0.0)


def test_old_files_load_with_identity_maps_and_a_note(two_parents, tmp_path):
    m1, _, x = two_parents
    ms = ModuleSet(full_modules(m1, 0.5, 2.0))
    f = ms.save(tmp_path / 'new.cnnm')
    old = tmp_path / 'old.cnnm'
    with zipfile.ZipFile(f) as zin, zipfile.ZipFile(old, 'w') as zout:
        for item in zin.infolist():
            data = zin.read(item.filename)
            if item.filename == 'manifest.json':
                man = json.loads(data)
                for e in man['modules']: del e['calibration']
                data = json.dumps(man).encode()
            zout.writestr(item, data)
    with pytest.warns(UserWarning, match='no calibration'): back = ModuleSet.load(old)
    assert all(calibration_of(m) == (1.0, 0.0) for m in back)
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        ModuleSet.load(f)                                           # a new file: no note


# ---------------------------------------------------------------- 5. command line

def cli(*args, cwd):
    "`cnnmodules ARGS` through `cnnmodules.cli.main` in this process (conftest.cli_main): its stdout, after it succeeded."
    r = cli_main(args, cwd)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


def test_cli_writes_calibrated_sets_and_reports_the_vote(tmp_path):
    from cnnmodules.data import load_dataset
    from cnnmodules.models import small_cnn, train
    d = load_dataset('digits')
    for n, ep in (('a', 2), ('b', 3)):                    # two parents trained for different lengths, decomposed in-process
        keras.utils.set_random_seed(ep)
        m = small_cnn(10, d.input_shape, name=f'digits_{n}')
        train(m, d, epochs=ep, seed=ep, verbose=0)
        decompose(m, *d.train, class_names=d.class_names, dataset='digits', progress=False).save(tmp_path / f'{n}.cnnm')
    cli('replace', 'a.cnnm', '--class', 3, '--with', 'b.cnnm', '--out', 'r.cnnm', cwd=tmp_path)
    cli('compose', 'a.cnnm:0,1,2', 'b.cnnm:3,4', '--calibrate-on', 'digits', '--per-class', 50, '--out', 'c.cnnm', cwd=tmp_path)
    a, b, r, c = (ModuleSet.load(tmp_path / f'{n}.cnnm') for n in 'abrc')
    assert all(m.calibration and m.calibration['a'] > 0 for s in (a, b, r, c) for m in s)
    assert calibration_of(r[3]) == calibration_of(b[3]) and calibration_of(r[0]) == calibration_of(a[0]) != calibration_of(b[0])
    assert all(m.calibration['source'] == 'digits' and m.calibration['inputs'] == 250 for m in c)
    assert calibration_of(c[0]) != calibration_of(a[0]) and calibration_of(c[0]) == calibration_of(c[2]) != calibration_of(c[3])
    out = json.loads(cli('evaluate', 'r.cnnm', '--data', 'digits', '--json', cwd=tmp_path))
    paper = json.loads(cli('evaluate', 'r.cnnm', '--data', 'digits', '--json', '--vote', 'paper', cwd=tmp_path))
    assert out['vote'] == 'calibrated' and paper['vote'] == 'paper'
    assert out['top1'] == r.evaluate(d.x_test, d.y_test, jaccard=False)['top1']
    assert paper['top1'] == r.evaluate(d.x_test, d.y_test, jaccard=False, vote='paper')['top1']
    for vote, res in (('calibrated', out), ('paper', paper)):   # the plain-text line names the vote its score depends on
        text = cli('evaluate', 'r.cnnm', '--data', 'digits', '--vote', vote, cwd=tmp_path)
        assert f'(exact, {vote} vote)' in text and f"top-1 {res['top1']:.4f}" in text, text
    cli('update', 'c.cnnm', '--foreign', 'digits:7,8', '--data', 'digits', '--per-class', 30, '--out', 'u.cnnm', cwd=tmp_path)
    u = ModuleSet.load(tmp_path / 'u.cnnm')
    assert all(calibration_of(m) != (1.0, 0.0) and m.calibration['source'] == 'update' for m in u)
