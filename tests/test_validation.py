"Bad input to `decompose`: one `DecompositionError` naming the argument, raised before the model sees any data; and the README's snippet runs as written."
import os, re
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
import keras
import cnnmodules.decompose as dec
from cnnmodules.decompose import decompose
from cnnmodules.graph import DecompositionError
from cnnmodules.data import load_dataset
from cnnmodules.models import small_cnn

REPO = Path(__file__).resolve().parents[1]

class WorkStarted(Exception): "Raised by the patched first step of real work: the checks let the arguments through."

@pytest.fixture(scope='module')
def digits(): return load_dataset('digits')

@pytest.fixture(scope='module')
def model():
    keras.utils.set_random_seed(0)
    return small_cnn(10)   # untrained: no check may depend on training

@pytest.fixture(autouse=True)
def no_work(monkeypatch):
    "Any call that samples inputs or runs the model's graph over data fails the test with WorkStarted."
    def boom(*a, **k): raise WorkStarted()
    monkeypatch.setattr(dec, 'sample_inputs', boom)
    monkeypatch.setattr(dec, 'activation_counts', boom)

def with_label(y, i, v):
    y = y.astype('float64').copy(); y[i] = v; return y

def with_value(x, v):
    x = x.astype('float32').copy(); x[20, 1, 2, 0] = v; return x

# (id, function of the dataset returning decompose's (x, y, kwargs), the argument name, a phrase of what was expected)
CASES = [
    ('n_concerned=2.5',      lambda d: (d.x_train, d.y_train, dict(n_concerned=2.5)),   'n_concerned', 'positive integer'),
    ("n_concerned='50'",     lambda d: (d.x_train, d.y_train, dict(n_concerned='50')),  'n_concerned', 'positive integer'),
    ('n_concerned=0',        lambda d: (d.x_train, d.y_train, dict(n_concerned=0)),     'n_concerned', 'positive integer'),
    ('n_concerned=-5',       lambda d: (d.x_train, d.y_train, dict(n_concerned=-5)),    'n_concerned', 'positive integer'),
    ('n_concerned=True',     lambda d: (d.x_train, d.y_train, dict(n_concerned=True)),  'n_concerned', 'positive integer'),
    ('n_concerned>class',    lambda d: (d.x_train, d.y_train, dict(n_concerned=5000)),  'n_concerned', 'training inputs but 5000 are needed'),
    ('label -1',             lambda d: (d.x_train, with_label(d.y_train, 5, -1), {}),   'y', 'labels must be in 0..9'),
    ('label 10',             lambda d: (d.x_train, with_label(d.y_train, 5, 10), {}),   'y', 'labels must be in 0..9'),
    ('label 3.7',            lambda d: (d.x_train, with_label(d.y_train, 5, 3.7), {}),  'y', 'integer class labels; found 3.7 at position 5'),
    ('label nan',            lambda d: (d.x_train, with_label(d.y_train, 5, np.nan), {}), 'y', 'integer class labels; found nan'),
    ('string labels',        lambda d: (d.x_train, d.y_train.astype(str), {}),          'y', 'integer class labels'),
    ('one-hot labels',       lambda d: (d.x_train, np.eye(10)[d.y_train], {}),          'y', 'one-hot'),
    ('classes [3, 12]',      lambda d: (d.x_train, d.y_train, dict(classes=[3, 12])),   'classes', '[12] are not classes of this 10-class model'),
    ('classes [3, 12] + E',  lambda d: (d.x_train, d.y_train, dict(classes=[3, 12], n_concerned=50)), 'classes', '[12] are not classes'),
    ('classes [-1]',         lambda d: (d.x_train, d.y_train, dict(classes=[-1])),      'classes', 'are not classes'),
    ('classes []',           lambda d: (d.x_train, d.y_train, dict(classes=[])),        'classes', 'at least one class'),
    ('classes duplicate',    lambda d: (d.x_train, d.y_train, dict(classes=[3, 5, 3])), 'classes', 'duplicates'),
    ('classes 2.5',          lambda d: (d.x_train, d.y_train, dict(classes=[2.5])),     'classes', 'integer class indices'),
    ('classes scalar',       lambda d: (d.x_train, d.y_train, dict(classes=3)),         'classes', 'list of class indices'),
    ('empty class, given',   lambda d: (d.x_train[d.y_train != 7], d.y_train[d.y_train != 7], dict(classes=[3, 7])), 'class 7', 'has 0 training inputs'),
    ('empty class, all',     lambda d: (d.x_train[d.y_train != 7], d.y_train[d.y_train != 7], {}), 'class 7', 'has 0 training inputs'),
    ('NaN input',            lambda d: (with_value(d.x_train, np.nan), d.y_train, {}),  'x', 'NaN or infinite values, the first at index 20'),
    ('inf input',            lambda d: (with_value(d.x_train, -np.inf), d.y_train, {}), 'x', 'NaN or infinite values, the first at index 20'),
    ('delta=0',              lambda d: (d.x_train, d.y_train, dict(delta=0)),           'delta', 'must be in (0, 1]'),
    ('delta=-0.5',           lambda d: (d.x_train, d.y_train, dict(delta=-0.5)),        'delta', 'must be in (0, 1]'),
    ('delta=50',             lambda d: (d.x_train, d.y_train, dict(delta=50)),          'delta', 'removes nothing'),
    ('delta=nan',            lambda d: (d.x_train, d.y_train, dict(delta=float('nan'))), 'delta', 'finite number'),
    ('delta=inf',            lambda d: (d.x_train, d.y_train, dict(delta=float('inf'))), 'delta', 'finite number'),
    ("delta='0.5'",          lambda d: (d.x_train, d.y_train, dict(delta='0.5')),       'delta', 'finite number'),
    ('unknown step',         lambda d: (d.x_train, d.y_train, dict(steps=('ci', 'ti', 'mc', 'blm'))), 'steps', "unknown ['blm']"),
    ('steps a string',       lambda d: (d.x_train, d.y_train, dict(steps='ci')),        'steps', 'tuple of step names'),
    ('steps without mc',     lambda d: (d.x_train, d.y_train, dict(steps=('ci', 'ti'))), 'steps', "must include 'mc'"),
    ('len(x) != len(y)',     lambda d: (d.x_train, d.y_train[:1000], {}),               'x', 'x and y must have the same length; got 1437 inputs but 1000 labels'),
    ('wrong input shape',    lambda d: (d.x_train[:, :4], d.y_train, {}),               'x', 'inputs have shape (4, 8, 1) but the model expects (8, 8, 1)'),
    ('missing channel axis', lambda d: (d.x_train[..., 0], d.y_train, {}),              'x', 'inputs have shape (8, 8) but the model expects (8, 8, 1)'),
    ('empty x',              lambda d: (d.x_train[:0], d.y_train[:0], {}),              'x', 'empty'),
    ('class_names short',    lambda d: (d.x_train, d.y_train, dict(class_names=['a', 'b'])), 'class_names', 'all 10 classes'),
    ('seed=-1',              lambda d: (d.x_train, d.y_train, dict(seed=-1)),           'seed', 'non-negative integer'),
    ('batch_size=0',         lambda d: (d.x_train, d.y_train, dict(batch_size=0)),      'batch_size', 'positive integer'),
]

@pytest.mark.parametrize('make,arg,expected', [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_clear_error_before_work(digits, model, make, arg, expected):
    x, y, kw = make(digits)
    with pytest.raises(DecompositionError) as e:
        decompose(model, x, y, progress=False, **kw)
    msg = str(e.value)
    assert re.search(rf'(^|\W){re.escape(arg)}\W', msg), f'message does not name {arg!r}: {msg}'
    assert expected in msg, msg

@pytest.mark.parametrize('kw', [dict(), dict(n_concerned=50, classes=[3, 5]), dict(delta=1.0), dict(delta=1e-3),
                                dict(classes=np.array([0, 9])), dict(n_concerned=np.int64(20))], ids=str)
def test_good_arguments_reach_the_work(digits, model, kw):
    "The checks refuse nothing valid: these calls get as far as sampling."
    with pytest.raises(WorkStarted): decompose(model, digits.x_train, digits.y_train, progress=False, **kw)

def test_integer_valued_labels_are_accepted(digits, model):
    "Float labels that are whole numbers, and a (n, 1) column, are labels (the notebook's decision)."
    for y in (digits.y_train.astype('float32'), digits.y_train[:, None], digits.y_train.astype('uint8')):
        with pytest.raises(WorkStarted): decompose(model, digits.x_train, y, progress=False)

def test_delta_bound_follows_large_head_weights(digits):
    "Above 1, δ is accepted up to the largest |output-layer weight| and refused beyond it."
    keras.utils.set_random_seed(0)
    m = small_cnn(10)
    k, b = m.layers[-1].get_weights()
    k = np.zeros_like(k); k[0, 0] = -2.0; m.layers[-1].set_weights([k, b])
    with pytest.raises(WorkStarted): decompose(m, digits.x_train, digits.y_train, delta=1.5, progress=False)
    with pytest.raises(WorkStarted): decompose(m, digits.x_train, digits.y_train, delta=2.0, progress=False)
    with pytest.raises(DecompositionError, match=r'delta .* must be in \(0, 2\]'):
        decompose(m, digits.x_train, digits.y_train, delta=2.01, progress=False)

def test_auto_e_takes_the_smallest_decomposed_class(digits, model, monkeypatch):
    "With n_concerned=None and a thin class, E is that class's size; the check and the sampling agree on it."
    seen = {}
    def record(y, N, E, classes, seed): seen['E'] = E; raise WorkStarted()
    monkeypatch.setattr(dec, 'sample_inputs', record)
    keep = (digits.y_train != 4) | (np.cumsum(digits.y_train == 4) <= 30)    # 30 inputs of class 4
    with pytest.raises(WorkStarted): decompose(model, digits.x_train[keep], digits.y_train[keep], progress=False)
    assert seen['E'] == 30

def readme_snippet() -> str:
    "The python blocks of the README's 'Use it on your own model' section, in order."
    text = (REPO / 'README.md').read_text()
    section = text.split('## Use it on your own model', 1)[1].split('\n## ', 1)[0]
    blocks = re.findall(r'```python\n(.*?)```', section, re.S)
    assert blocks, 'no python block in the README section'
    return '\n'.join(blocks)

def test_readme_snippet_runs_as_written(tmp_path, monkeypatch):
    "The README's own example, executed as printed, on the digits it sets up; it writes its files where it runs."
    monkeypatch.undo()   # real work this time
    monkeypatch.chdir(tmp_path)
    code = readme_snippet()
    assert 'decompose(' in code and 'load_dataset(' in code
    ns = {}
    exec(compile(code, 'README.md', 'exec'), ns)
    assert len(ns['modules']) == 10
    assert (tmp_path / 'three.keras').is_file() and (tmp_path / 'digits.cnnm').is_file()
    # the two-class subset model it saved opens with Keras and votes as the two modules composed do
    import keras
    from cnnmodules.compose import module_logits, compose_vote
    pair, x35 = ns['modules'][[3, 5]], ns['x35']
    p = keras.saving.load_model(tmp_path / 'three_five.keras').predict(x35, verbose=0)
    z = module_logits(pair, x35)
    assert p.shape == (len(x35), 2)
    assert (p.argmax(1) == compose_vote(pair, z[..., 0] - z[..., 1])).mean() >= 0.99   # float32 ties at most


# --- evaluate checks x and y as decompose does (issue 14 §6.1) -----------------------------------------

import cnnmodules.compose as comp

@pytest.fixture(scope='module')
def every_node(model):
    "Ten modules of the untrained CNN that keep every node (built by hand: no decomposition runs)."
    from cnnmodules.modules import Module, ModuleSet
    from cnnmodules.graph import graph_of
    from cnnmodules.modularize import channel_head
    g = graph_of(model); hk, hb = channel_head(*model.layers[-1].get_weights(), range(10))
    return ModuleSet([Module(c, str(c), [np.ones(s, bool) for s in g.node_shapes], hk[c], hb[c], np.ones(hk.shape[1], bool), model) for c in range(10)])

@pytest.fixture
def no_composition(monkeypatch):
    "Any scoring of inputs by the modules fails the test with WorkStarted."
    def boom(*a, **k): raise WorkStarted()
    monkeypatch.setattr(comp, 'module_logits', boom)

DATA_CASES = [c for c in CASES if c[0] in ('label -1', 'label 10', 'label 3.7', 'label nan', 'string labels', 'one-hot labels', 'NaN input',
                                            'inf input', 'len(x) != len(y)', 'wrong input shape', 'missing channel axis', 'empty x')]
NONE_CASES = [('x None', lambda d: (None, d.y_train, {}), 'x', 'x must be a numeric array'),
              ('y None', lambda d: (d.x_train, None, {}), 'y', 'y must be integer class labels of shape (n,)')]

@pytest.mark.parametrize('make,arg,expected', [c[1:] for c in DATA_CASES + NONE_CASES], ids=[c[0] for c in DATA_CASES + NONE_CASES])
def test_evaluate_refuses_what_decompose_refuses(digits, model, every_node, no_composition, make, arg, expected):
    "The same bad x or y gives decompose, ModuleSet.evaluate and calibrate the same error (the modules' shape and label range in their words), before any scoring."
    x, y, _ = make(digits)
    errors = []
    for run in (lambda: decompose(model, x, y, progress=False), lambda: every_node.evaluate(x, y), lambda: comp.calibrate(every_node, x, y)):
        with pytest.raises(DecompositionError) as e: run()
        errors.append(str(e.value))
    dec_msg, *set_msgs = errors
    common = lambda m: re.sub(r'(for this 10-class model|\(positions in the module set\)|the model expects|the modules expect|: \w+ needs \w+ inputs)', '', m)
    for msg in set_msgs:
        assert re.search(rf'(^|\W){re.escape(arg)}\W', msg), f'message does not name {arg!r}: {msg}'
        assert expected.replace('the model expects', 'the modules expect') in msg, msg
        assert common(dec_msg) == common(msg), (dec_msg, msg)

def test_evaluate_accepts_what_decompose_accepts(digits, every_node, no_composition):
    "Integer-valued float labels, a (n, 1) column and uint8 inputs get as far as the scoring."
    for y in (digits.y_test.astype('float32'), digits.y_test[:, None], digits.y_test.astype('uint8')):
        with pytest.raises(WorkStarted): every_node.evaluate(digits.x_test, y)


# --- inputs already divided by 255 (issue 14 §6.2) -----------------------------------------------------

def _range_warnings(run):
    import warnings
    with warnings.catch_warnings(record=True) as ws:
        warnings.simplefilter('always')
        try: run()
        except WorkStarted: pass
    return [w for w in ws if 'Rescaling' in str(w.message)]

def test_rescaled_inputs_draw_one_warning(digits, model, every_node, no_composition):
    "A model that begins with Rescaling(1/255) given inputs already in [0, 1]: one one-line warning from decompose and from evaluate; raw pixels (uint8 or float) none."
    x01 = digits.x_train / 255.0
    for run in (lambda: decompose(model, x01, digits.y_train, progress=False), lambda: every_node.evaluate(digits.x_test / 255.0, digits.y_test)):
        ws = _range_warnings(run)
        assert len(ws) == 1 and '\n' not in str(ws[0].message) and 'already divided by 255' in str(ws[0].message), [str(w.message) for w in ws]
    for x in (digits.x_train, digits.x_train.astype('float32')):
        assert _range_warnings(lambda: decompose(model, x, digits.y_train, progress=False)) == []
        assert _range_warnings(lambda: every_node.evaluate(x[:50], digits.y_train[:50])) == []
