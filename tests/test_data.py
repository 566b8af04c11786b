"""Tests of `cnnmodules.data`: every layout written here in small archives, plus the real copies in ../shared/data."""
import gzip, os, pickle, struct, sys, tarfile, time, warnings, zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path: sys.path.insert(0, str(REPO))   # test this clone, installed or not

from cnnmodules import data
from cnnmodules.data import (CIFAR10_CLASSES, Dataset, DatasetError, load_dataset, resize,
                             sample_per_class, subset_classes, to_float)

from conftest import DATA as SHARED, needs_data, require_data   # the offline copies ($CNNMODULES_DATA, else ../shared/data)
KNOWN = 'known names are cifar10, cifar100, tiny-imagenet, mnist, digits'


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    "Every test gets its own cache folder and no data folder."
    monkeypatch.setenv('CNNMODULES_CACHE', str(tmp_path / 'cache'))
    monkeypatch.delenv('CNNMODULES_DATA', raising=False)


# ---------------------------------------------------------------- writers (independent of the module)

def cifar_rows(imgs):
    "Official CIFAR row format: 1024 red, 1024 green, 1024 blue values, each row-major."
    return imgs.transpose(0, 3, 1, 2).reshape(len(imgs), 3072)

def write_cifar10(root, n=5, seed=0, bad_label=False):
    "CIFAR-10 python folder; returns (x_train, y_train, x_test, y_test) as they must load."
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True)
    xs, ys = [], []
    for b in [f'data_batch_{i}' for i in range(1, 6)] + ['test_batch']:
        x = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
        y = [int(v) for v in rng.integers(0, 10, n)]
        if bad_label and b == 'test_batch': y[0] = 10
        (root / b).write_bytes(pickle.dumps({b'batch_label': b.encode(), b'data': cifar_rows(x), b'labels': y}))
        xs.append(x); ys.append(np.array(y))
    (root / 'batches.meta').write_bytes(pickle.dumps({b'label_names': [c.encode() for c in CIFAR10_CLASSES],
                                                      b'num_vis': 3072}))
    return np.concatenate(xs[:5]), np.concatenate(ys[:5]), xs[5], ys[5]

def write_cifar100(root, n=8, seed=0):
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True)
    fine = [f'fine{i:03d}' for i in range(100)]
    coarse = [f'coarse{i:02d}' for i in range(20)]
    out = {}
    for split in ('train', 'test'):
        x = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
        f, c = rng.integers(0, 100, n).tolist(), rng.integers(0, 20, n).tolist()
        (root / split).write_bytes(pickle.dumps({b'data': cifar_rows(x), b'fine_labels': f, b'coarse_labels': c}))
        out[split] = x, np.array(f), np.array(c)
    (root / 'meta').write_bytes(pickle.dumps({b'fine_label_names': [s.encode() for s in fine],
                                              b'coarse_label_names': [s.encode() for s in coarse]}))
    return out, fine, coarse

def tar_gz(src, dst, arcname):
    with tarfile.open(dst, 'w:gz') as t: t.add(src, arcname)
    return dst

def zip_dir(src, dst, top=None, dir_entries=False):
    "Zip the files under `src`, under folder `top` when given."
    with zipfile.ZipFile(dst, 'w') as z:
        for f in sorted(Path(src).rglob('*')):
            arc = (f"{top}/" if top else '') + f.relative_to(src).as_posix()
            if f.is_file(): z.write(f, arc)
            elif dir_entries: z.writestr(arc + '/', b'')
    return dst

def write_folder(root, classes, n_train=3, n_test=2, size=(5, 7), test='test', ext='png', gray=(), seed=0):
    "Image folder; returns {split: [(class, pixels as RGB), ...]} in writing order."
    rng, out = np.random.default_rng(seed), {}
    for split, n in (('train', n_train), (test, n_test)):
        for c in classes:
            d = Path(root) / split / c
            d.mkdir(parents=True, exist_ok=True)
            for k in range(n):
                im = Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8))
                if gray == 'all' or (split, c, k) in gray: im = im.convert('L')
                im.save(d / f'img{k}.{ext}')
                out.setdefault(split, []).append((c, np.asarray(im.convert('RGB'))))
    return out

TINY_WORDS = ('n00000000\tentity\n'
              'n01443537\tgoldfish, Carassius auratus\n'
              'n02480855\tgorilla, Gorilla gorilla\n'
              'n10148035\tgroom, bridegroom\n')

def write_tiny(root, wnids=('n10148035', 'n01443537', 'n02480855'), n=3, val=None):
    """Tiny-ImageNet folder of flat-colour JPEGs: train image k of class j has red 40*j + 10*k.
    Image 1 of n02480855 is grayscale. Returns the val labels as wnids."""
    root.mkdir(parents=True)
    (root / 'wnids.txt').write_text('\n'.join(wnids) + '\n')
    (root / 'words.txt').write_text(TINY_WORDS)
    for j, w in enumerate(sorted(wnids)):
        d = root / 'train' / w / 'images'
        d.mkdir(parents=True)
        (root / 'train' / w / f'{w}_boxes.txt').write_text(f'{w}_0.JPEG\t0\t0\t10\t10\n')
        for k in range(n):
            im = Image.new('RGB', (16, 16), (40 * j + 10 * k, 120, 200))
            if (w, k) == ('n02480855', 1): im = im.convert('L')
            im.save(d / f'{w}_{k}.JPEG', quality=95)
    (root / 'val' / 'images').mkdir(parents=True)
    val = val or ['n02480855', 'n01443537', 'n10148035', 'n01443537']
    lines = []
    for k, w in enumerate(val):
        Image.new('RGB', (16, 16), (5, 10 * k, 50)).save(root / 'val' / 'images' / f'val_{k}.JPEG', quality=95)
        lines.append(f'val_{k}.JPEG\t{w}\t0\t0\t15\t15')
    (root / 'val' / 'val_annotations.txt').write_text('\n'.join(lines) + '\n')
    (root / 'test' / 'images').mkdir(parents=True)                     # unlabelled: ignored
    Image.new('RGB', (16, 16)).save(root / 'test' / 'images' / 'test_0.JPEG')
    return val

def idx_bytes(a, magic):
    return struct.pack('>i', magic) + struct.pack(f'>{a.ndim}i', *a.shape) + a.astype(np.uint8).tobytes()

def write_mnist(root, n_train=12, n_test=5, seed=0):
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    out = {}
    for pre, n in (('train', n_train), ('t10k', n_test)):
        x = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        y = np.arange(n) % 10
        (root / f'{pre}-images-idx3-ubyte.gz').write_bytes(gzip.compress(idx_bytes(x, 0x803)))
        (root / f'{pre}-labels-idx1-ubyte.gz').write_bytes(gzip.compress(idx_bytes(y, 0x801)))
        out[pre] = x, y
    return out


# ---------------------------------------------------------------- CIFAR python

def test_cifar10_folder_and_tar_gz(tmp_path):
    xtr, ytr, xte, yte = write_cifar10(tmp_path / 'cifar-10-batches-py')
    ds = load_dataset(tmp_path / 'cifar-10-batches-py', progress=False)
    assert isinstance(ds, Dataset) and ds.name == 'cifar10'
    assert ds.x_train.shape == (25, 32, 32, 3) and ds.x_test.shape == (5, 32, 32, 3)
    assert ds.x_train.dtype == np.uint8 and ds.y_train.dtype == np.int64
    np.testing.assert_array_equal(ds.x_train, xtr)
    np.testing.assert_array_equal(ds.y_train, ytr)
    np.testing.assert_array_equal(ds.x_test, xte)
    np.testing.assert_array_equal(ds.y_test, yte)
    assert ds.class_names == CIFAR10_CLASSES and ds.num_classes == 10 and ds.input_shape == (32, 32, 3)
    assert ds.meta['layout'] == 'cifar10'
    tgz = tar_gz(tmp_path / 'cifar-10-batches-py', tmp_path / 'cifar-10-python.tar.gz', 'cifar-10-batches-py')
    ds2 = load_dataset(tgz, progress=False)
    np.testing.assert_array_equal(ds2.x_train, xtr)
    np.testing.assert_array_equal(ds2.y_test, yte)


def test_cifar10_by_name_env_and_data_dir(tmp_path, monkeypatch):
    env, over = tmp_path / 'env', tmp_path / 'over'
    a = write_cifar10(env / 'cifar-10-batches-py', seed=1)
    b = write_cifar10(tmp_path / 'b' / 'cifar-10-batches-py', seed=2)
    over.mkdir()
    tar_gz(tmp_path / 'b' / 'cifar-10-batches-py', over / 'cifar-10-python.tar.gz', 'cifar-10-batches-py')
    monkeypatch.setenv('CNNMODULES_DATA', str(env))
    ds = load_dataset('cifar10', progress=False)
    assert ds.name == 'cifar10' and ds.meta['source'] == str(env / 'cifar-10-batches-py')
    np.testing.assert_array_equal(ds.x_train, a[0])
    ds = load_dataset('CIFAR-10', data_dir=over, progress=False)          # data_dir overrides the env var
    assert ds.meta['source'] == str(over / 'cifar-10-python.tar.gz')
    np.testing.assert_array_equal(ds.x_test, b[2])


def test_cifar10_jpeg_zip_by_name(tmp_path):
    write_folder(tmp_path / 'src', CIFAR10_CLASSES, n_train=2, n_test=1, size=(32, 32), ext='jpg')
    zip_dir(tmp_path / 'src', tmp_path / 'cifar10-jpeg.zip', top='cifar10')
    ds = load_dataset('cifar10', data_dir=tmp_path, progress=False)
    assert ds.name == 'cifar10' and ds.class_names == CIFAR10_CLASSES
    assert ds.x_train.shape == (20, 32, 32, 3) and ds.x_test.shape == (10, 32, 32, 3)
    np.testing.assert_array_equal(ds.y_train, np.repeat(np.arange(10), 2))


def test_cifar100_fine_and_coarse(tmp_path):
    out, fine, coarse = write_cifar100(tmp_path / 'cifar-100-python')
    ds = load_dataset(tmp_path / 'cifar-100-python', progress=False)
    assert ds.name == 'cifar100' and ds.class_names == fine and ds.meta['label_mode'] == 'fine'
    np.testing.assert_array_equal(ds.x_train, out['train'][0])
    np.testing.assert_array_equal(ds.y_train, out['train'][1])
    np.testing.assert_array_equal(ds.y_test, out['test'][1])
    tgz = tar_gz(tmp_path / 'cifar-100-python', tmp_path / 'cifar-100-python.tar.gz', 'cifar-100-python')
    dc = load_dataset(tgz, label_mode='coarse', progress=False)
    assert dc.class_names == coarse and dc.num_classes == 20
    np.testing.assert_array_equal(dc.y_train, out['train'][2])
    np.testing.assert_array_equal(dc.x_test, out['test'][0])
    dn = load_dataset('cifar100', data_dir=tmp_path, label_mode='coarse', progress=False)
    np.testing.assert_array_equal(dn.y_test, out['test'][2])
    with pytest.raises(DatasetError, match="label_mode must be 'fine' or 'coarse'"):
        load_dataset(tgz, label_mode='medium')


# ---------------------------------------------------------------- image folders

def test_image_folder_zip_and_folder(tmp_path):
    pix = write_folder(tmp_path / 'pets', ['zebra', 'ant', 'bee'])
    ds = load_dataset(tmp_path / 'pets', progress=False)
    assert ds.class_names == ['ant', 'bee', 'zebra']                    # sorted
    assert ds.name == 'pets' and ds.x_train.shape == (9, 5, 7, 3) and ds.x_test.shape == (6, 5, 7, 3)
    np.testing.assert_array_equal(ds.y_train, [0, 0, 0, 1, 1, 1, 2, 2, 2])
    want = {c: [] for c in ds.class_names}
    for c, a in pix['train']: want[c].append(a)
    np.testing.assert_array_equal(ds.x_train, np.stack(sum((want[c] for c in ds.class_names), [])))
    z = load_dataset(zip_dir(tmp_path / 'pets', tmp_path / 'pets.zip', top='pets'), progress=False)
    np.testing.assert_array_equal(z.x_train, ds.x_train)
    np.testing.assert_array_equal(z.x_test, ds.x_test)
    np.testing.assert_array_equal(z.y_test, ds.y_test)
    flat = load_dataset(zip_dir(tmp_path / 'pets', tmp_path / 'flat.zip'), progress=False)   # no top folder
    assert flat.name == 'flat'
    np.testing.assert_array_equal(flat.x_test, ds.x_test)


@pytest.mark.parametrize('test_name', ['val', 'valid', 'validation', 'Test'])
def test_image_folder_test_split_names(tmp_path, test_name):
    write_folder(tmp_path / 'f', ['a', 'b'], n_train=1, n_test=1, test=test_name, ext='jpg')
    ds = load_dataset(tmp_path / 'f', progress=False)
    assert ds.x_test.shape == (2, 5, 7, 3) and ds.meta['splits'] == ['train', test_name]


def test_image_folder_custom_split_names(tmp_path):
    write_folder(tmp_path / 'f', ['a', 'b'], n_train=2, n_test=1, test='holdout')
    with pytest.raises(DatasetError, match='no test split'):
        load_dataset(tmp_path / 'f')
    ds = load_dataset(tmp_path / 'f', split_names=('train', 'holdout'), progress=False)
    assert len(ds.y_train) == 4 and len(ds.y_test) == 2


def test_image_folder_cifar10_order_and_gray(tmp_path):
    write_folder(tmp_path / 'c', CIFAR10_CLASSES[::-1], n_train=1, n_test=1, size=(4, 4),
                 gray={('train', 'truck', 0)})
    ds = load_dataset(tmp_path / 'c', progress=False)
    assert ds.class_names == CIFAR10_CLASSES                            # official order, not sorted
    assert ds.x_train.shape == (10, 4, 4, 3)
    assert (ds.x_train[9, ..., 0] == ds.x_train[9, ..., 2]).all()       # the grayscale truck, as RGB
    write_folder(tmp_path / 'g', ['a', 'b'], n_train=2, n_test=1, gray='all')
    g = load_dataset(tmp_path / 'g', progress=False)
    assert g.input_shape == (5, 7, 1)                                   # all gray: one channel
    assert load_dataset(tmp_path / 'g', color_mode='rgb', progress=False).input_shape == (5, 7, 3)
    assert load_dataset(tmp_path / 'c', color_mode='grayscale', progress=False).input_shape == (4, 4, 1)


def test_image_folder_gray_train_colour_test(tmp_path):
    write_folder(tmp_path / 'g', ['a', 'b'], n_train=2, n_test=1,
                 gray={('train', c, k) for c in 'ab' for k in range(2)})
    ds = load_dataset(tmp_path / 'g', progress=False)
    assert ds.input_shape == (5, 7, 3)


# ---------------------------------------------------------------- Tiny-ImageNet

@pytest.mark.parametrize('as_zip', [False, True])
def test_tiny_imagenet(tmp_path, as_zip):
    val = write_tiny(tmp_path / 'src' / 'tiny-imagenet-200')
    src = zip_dir(tmp_path / 'src', tmp_path / 'tiny-imagenet-200.zip') if as_zip else tmp_path / 'src' / 'tiny-imagenet-200'
    ds = load_dataset(src, progress=False)
    wnids = ['n01443537', 'n02480855', 'n10148035']
    assert ds.meta['wnids'] == wnids
    assert ds.class_names == ['goldfish', 'gorilla', 'groom']
    assert ds.x_train.shape == (9, 16, 16, 3) and ds.x_test.shape == (4, 16, 16, 3)
    np.testing.assert_array_equal(ds.y_train, [0, 0, 0, 1, 1, 1, 2, 2, 2])
    np.testing.assert_array_equal(ds.y_test, [wnids.index(w) for w in val])
    reds = ds.x_train[..., 0].mean(axis=(1, 2))
    expect = [40 * j + 10 * k for j in range(3) for k in range(3)]
    expect[4] = None
    for r, e in zip(reds, expect):
        if e is not None: assert abs(r - e) < 4
    gray = ds.x_train[4]                                                 # gorilla image 1: grayscale JPEG
    assert (gray[..., 0] == gray[..., 1]).all() and (gray[..., 1] == gray[..., 2]).all()
    np.testing.assert_allclose(ds.x_test[:, 0, 0, 1], [0, 10, 20, 30], atol=4)   # val order kept
    assert ds.subset(['n10148035', 'goldfish']).class_names == ['groom', 'goldfish']


def test_tiny_imagenet_by_name(tmp_path):
    write_tiny(tmp_path / 'src' / 'tiny-imagenet-200')
    zip_dir(tmp_path / 'src', tmp_path / 'tiny-imagenet-202.zip')
    ds = load_dataset('tiny-imagenet', data_dir=tmp_path, progress=False)
    assert ds.num_classes == 3 and ds.name == 'tiny-imagenet'
    with pytest.raises(DatasetError, match='tiny-imagenet not found in'):
        load_dataset('tiny-imagenet', data_dir=tmp_path / 'src' / 'tiny-imagenet-200' / 'val')


# ---------------------------------------------------------------- MNIST and digits

def test_mnist(tmp_path):
    out = write_mnist(tmp_path / 'mnist')
    ds = load_dataset(tmp_path / 'mnist', progress=False)
    assert ds.name == 'mnist' and ds.x_train.shape == (12, 28, 28, 1) and ds.x_test.shape == (5, 28, 28, 1)
    assert ds.class_names == [str(i) for i in range(10)]
    np.testing.assert_array_equal(ds.x_train[..., 0], out['train'][0])
    np.testing.assert_array_equal(ds.y_test, out['t10k'][1])
    np.testing.assert_array_equal(load_dataset('mnist', data_dir=tmp_path).x_test[..., 0], out['t10k'][0])
    write_mnist(tmp_path / 'flat')                                       # idx files straight in the data folder
    assert load_dataset('mnist', data_dir=tmp_path / 'flat').x_train.shape == (12, 28, 28, 1)


def test_digits():
    ds = load_dataset('digits')
    assert ds.name == 'digits' and ds.input_shape == (8, 8, 1) and ds.num_classes == 10
    assert len(ds.y_train) + len(ds.y_test) == 1797 and len(ds.y_test) == 360
    assert ds.x_train.dtype == np.uint8 and ds.x_train.max() == 255 and ds.x_train.min() == 0
    total = ds.class_counts('train') + ds.class_counts('test')
    assert np.abs(ds.class_counts('test') - 0.2 * total).max() < 1      # stratified
    again = load_dataset('digits')
    np.testing.assert_array_equal(again.y_train, ds.y_train)            # seeded
    other = load_dataset('digits', seed=1)
    assert not np.array_equal(other.y_train, ds.y_train)


def test_keras_fallback_is_wired(tmp_path, monkeypatch):
    "Without a local copy, CIFAR-10/100 and MNIST come from keras.datasets; stubbed here because tests never download."
    keras = pytest.importorskip('keras')
    rng = np.random.default_rng(0)
    calls = []
    def stub(shape, k, col=True):
        def load_data(**kw):
            calls.append(kw)
            y = lambda n: rng.integers(0, k, (n, 1) if col else n)
            return ((rng.integers(0, 256, (6, *shape), dtype=np.uint8), y(6)),
                    (rng.integers(0, 256, (2, *shape), dtype=np.uint8), y(2)))
        return load_data
    monkeypatch.setattr(keras.datasets.cifar10, 'load_data', stub((32, 32, 3), 10))
    monkeypatch.setattr(keras.datasets.cifar100, 'load_data', stub((32, 32, 3), 20))
    monkeypatch.setattr(keras.datasets.mnist, 'load_data', stub((28, 28), 10, col=False))
    ds = load_dataset('cifar10', data_dir=tmp_path)                       # empty data folder: falls back
    assert ds.class_names == CIFAR10_CLASSES and ds.y_train.shape == (6,) and ds.meta['source'] == 'keras.datasets.cifar10'
    ds = load_dataset('cifar100', data_dir=tmp_path, label_mode='coarse')
    assert calls[-1] == {'label_mode': 'coarse'} and ds.num_classes == 20 and ds.class_names[0] == 'aquatic_mammals'
    ds = load_dataset('mnist', data_dir=tmp_path)     # an empty folder: the default one (shared/data) may hold a real copy
    assert ds.x_train.shape == (6, 28, 28, 1) and ds.class_names[9] == '9'


# ---------------------------------------------------------------- cache

def test_cache_hit_does_not_decode(tmp_path, monkeypatch):
    write_folder(tmp_path / 'f', ['a', 'b'], ext='jpg')
    first = load_dataset(tmp_path / 'f', progress=False)
    fn = Path(first.meta['cache'])
    assert fn.exists() and fn.parent == tmp_path / 'cache' and fn.suffix == '.npz'
    assert not list(fn.parent.glob('*.tmp'))                             # written atomically, nothing left over
    def boom(*a, **k): raise AssertionError('decoded although cached')
    monkeypatch.setattr(data, '_decode_image', boom)
    second = load_dataset(tmp_path / 'f', progress=False)
    for k in ('x_train', 'y_train', 'x_test', 'y_test'):
        np.testing.assert_array_equal(getattr(second, k), getattr(first, k))
    assert second.class_names == first.class_names and second.meta['cache'] == str(fn)
    with pytest.raises(AssertionError, match='decoded although cached'):   # other options: another cache entry
        load_dataset(tmp_path / 'f', color_mode='grayscale', progress=False)


def test_cache_key_follows_content(tmp_path):
    write_folder(tmp_path / 'f', ['a', 'b'], ext='png')
    first = load_dataset(tmp_path / 'f', progress=False)
    img = tmp_path / 'f' / 'train' / 'a' / 'img0.png'
    Image.new('RGB', (7, 5), (1, 2, 3)).save(img)
    os.utime(img, (1_600_000_000, 1_600_000_000))
    second = load_dataset(tmp_path / 'f', progress=False)
    assert second.meta['cache'] != first.meta['cache']
    assert (second.x_train[0] == [1, 2, 3]).all()
    z1 = zip_dir(tmp_path / 'f', tmp_path / 'one.zip')
    z2 = tmp_path / 'two.zip'
    z2.write_bytes(z1.read_bytes())
    assert load_dataset(z1, progress=False).meta['cache'] != load_dataset(z2, progress=False).meta['cache']  # name in file name
    assert len(list((tmp_path / 'cache').glob('*.npz'))) == 4


def test_cache_corrupt_is_rebuilt(tmp_path):
    write_folder(tmp_path / 'f', ['a', 'b'])
    first = load_dataset(tmp_path / 'f', progress=False)
    fn = Path(first.meta['cache'])
    fn.write_bytes(fn.read_bytes()[:1000])                                # truncated
    with pytest.warns(UserWarning, match='unreadable dataset cache'):
        again = load_dataset(tmp_path / 'f', progress=False)
    np.testing.assert_array_equal(again.x_train, first.x_train)
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        load_dataset(tmp_path / 'f', progress=False)                      # rebuilt: no warning now


def test_cache_off_and_explicit_folder(tmp_path):
    write_folder(tmp_path / 'f', ['a', 'b'])
    ds = load_dataset(tmp_path / 'f', cache=False, progress=False)
    assert ds.meta['cache'] is None and not (tmp_path / 'cache').exists()
    ds = load_dataset(tmp_path / 'f', cache=tmp_path / 'mine', progress=False)
    assert Path(ds.meta['cache']).parent == tmp_path / 'mine'


# ---------------------------------------------------------------- bad input

def test_error_missing_path_and_unknown_name(tmp_path):
    with pytest.raises(DatasetError, match='no such file or folder'):
        load_dataset(tmp_path / 'nope.zip')
    with pytest.raises(DatasetError, match=KNOWN):
        load_dataset('imagenet')
    with pytest.raises(DatasetError, match='data folder .* does not exist'):
        load_dataset('cifar10', data_dir=tmp_path / 'absent')
    with pytest.raises(DatasetError, match='cifar10 not found in .*download=True'):
        load_dataset('cifar10', data_dir=tmp_path, download=False)
    with pytest.raises(TypeError, match='unexpected option'):
        load_dataset('digits', colour='red')
    write_mnist(tmp_path / 'm')
    with pytest.raises(TypeError, match='do not apply to mnist'):
        load_dataset(tmp_path / 'm', label_mode='fine')


def test_error_wrong_layout(tmp_path):
    (tmp_path / 'junk' / 'deep').mkdir(parents=True)
    (tmp_path / 'junk' / 'deep' / 'notes.txt').write_text('hello')
    with pytest.raises(DatasetError, match=r'unrecognised dataset layout.*Recognised layouts: Tiny-ImageNet.*CIFAR-10 python.*MNIST idx.*image folder'):
        load_dataset(tmp_path / 'junk')
    (tmp_path / 'file.txt').write_text('x')
    with pytest.raises(DatasetError, match='expected a folder, a .zip or a .tar.gz'):
        load_dataset(tmp_path / 'file.txt')
    write_mnist(tmp_path / 'mn')
    (tmp_path / 'd').mkdir()
    zip_dir(tmp_path / 'mn', tmp_path / 'd' / 'cifar10.zip')              # a cifar10 name holding MNIST
    with pytest.raises(DatasetError, match='not cifar10'):
        load_dataset('cifar10', data_dir=tmp_path / 'd')


def test_error_empty_class_folder(tmp_path):
    write_folder(tmp_path / 'f', ['a', 'b'])
    (tmp_path / 'f' / 'train' / 'empty').mkdir()
    (tmp_path / 'f' / 'train' / 'b' / 'notes.txt').write_text('x')       # non-images are ignored
    with pytest.raises(DatasetError, match=r'class folder .*train/empty has no images'):
        load_dataset(tmp_path / 'f')
    z = zip_dir(tmp_path / 'f', tmp_path / 'f.zip', top='f', dir_entries=True)
    with pytest.raises(DatasetError, match=r'class folder .*f/train/empty has no images'):
        load_dataset(z)
    (tmp_path / 'f' / 'train' / 'empty').rmdir()
    (tmp_path / 'f' / 'test' / 'c').mkdir()
    Image.new('RGB', (7, 5)).save(tmp_path / 'f' / 'test' / 'c' / 'x.png')
    with pytest.raises(DatasetError, match=r"labels out of range: test classes \['c'\] have no train folder"):
        load_dataset(tmp_path / 'f')


def test_error_labels_out_of_range(tmp_path):
    write_cifar10(tmp_path / 'c', bad_label=True)
    with pytest.raises(DatasetError, match=r'labels out of range: y_test holds \d+\.\.10, expected 0\.\.9'):
        load_dataset(tmp_path / 'c')
    write_tiny(tmp_path / 't', val=['n01443537', 'n99999999'])
    with pytest.raises(DatasetError, match='labels out of range: val_annotations.txt .* n99999999'):
        load_dataset(tmp_path / 't')
    write_mnist(tmp_path / 'm')
    (tmp_path / 'm' / 't10k-labels-idx1-ubyte.gz').write_bytes(gzip.compress(idx_bytes(np.full(5, 11), 0x801)))
    with pytest.raises(DatasetError, match='labels out of range'):
        load_dataset(tmp_path / 'm')


def test_error_corrupt_files(tmp_path):
    (tmp_path / 'bad.zip').write_bytes(b'PK\x03\x04' + b'\0' * 50)
    with pytest.raises(DatasetError, match='corrupt zip file'):
        load_dataset(tmp_path / 'bad.zip')
    write_folder(tmp_path / 'f', ['a', 'b'])
    whole = zip_dir(tmp_path / 'f', tmp_path / 'whole.zip').read_bytes()
    (tmp_path / 'cut.zip').write_bytes(whole[:len(whole) // 2])
    with pytest.raises(DatasetError, match='corrupt zip file'):
        load_dataset(tmp_path / 'cut.zip')
    write_cifar10(tmp_path / 'c')
    tgz = tar_gz(tmp_path / 'c', tmp_path / 'c.tar.gz', 'cifar-10-batches-py').read_bytes()
    (tmp_path / 'cut.tar.gz').write_bytes(tgz[:len(tgz) // 2])
    with pytest.raises(DatasetError, match='corrupt'):
        load_dataset(tmp_path / 'cut.tar.gz')
    (tmp_path / 'c' / 'data_batch_3').write_bytes(b'not a pickle')
    with pytest.raises(DatasetError, match='corrupt CIFAR file .*data_batch_3'):
        load_dataset(tmp_path / 'c')
    (tmp_path / 'f' / 'train' / 'a' / 'broken.png').write_bytes(b'\x89PNG nonsense')
    with pytest.raises(DatasetError, match='cannot decode image .*broken.png'):
        load_dataset(tmp_path / 'f')


@pytest.mark.parametrize('damage, message', [
    ('magic', r'magic number 0x00000801, expected 0x00000803 \(images\)'),
    ('short', r'header promises \(12, 28, 28\)'),
    ('count', r'MNIST train: 12 images but 11 labels'),
    ('gzip', r'corrupt idx file'),
])
def test_error_idx(tmp_path, damage, message):
    out = write_mnist(tmp_path / 'm')
    imgs, labels = tmp_path / 'm' / 'train-images-idx3-ubyte.gz', tmp_path / 'm' / 'train-labels-idx1-ubyte.gz'
    if damage == 'magic': imgs.write_bytes(gzip.compress(idx_bytes(out['train'][0], 0x801)))
    if damage == 'short': imgs.write_bytes(gzip.compress(idx_bytes(out['train'][0], 0x803)[:-100]))
    if damage == 'count': labels.write_bytes(gzip.compress(idx_bytes(out['train'][1][:11], 0x801)))
    if damage == 'gzip': imgs.write_bytes(imgs.read_bytes()[:200])
    with pytest.raises(DatasetError, match=message):
        load_dataset(tmp_path / 'm')


def test_error_mixed_sizes(tmp_path):
    write_folder(tmp_path / 'f', ['a', 'b'])
    Image.new('RGB', (9, 9)).save(tmp_path / 'f' / 'train' / 'b' / 'img9.png')
    with pytest.raises(DatasetError, match=r'images differ in size: .*img9.png is 9x9 but .* is 5x7'):
        load_dataset(tmp_path / 'f')
    write_folder(tmp_path / 'g', ['a', 'b'], size=(5, 7))
    for f in (tmp_path / 'g' / 'test').rglob('*.png'): Image.new('RGB', (4, 4)).save(f)
    with pytest.raises(DatasetError, match='images differ in size'):
        load_dataset(tmp_path / 'g')


def test_error_dataset_checks():
    x = np.zeros((4, 2, 2, 3), np.uint8)
    with pytest.raises(DatasetError, match='uint8'):
        Dataset(x.astype(np.float32), np.zeros(4, int), x, np.zeros(4, int), ['a'])
    with pytest.raises(DatasetError, match=r'labels out of range: y_train holds -1\.\.0'):
        Dataset(x, np.array([0, -1, 0, 0]), x, np.zeros(4, int), ['a'])
    ds = Dataset(x, np.zeros((4, 1), np.int32), x, np.zeros(4, np.uint8), ['a'], 'z')
    assert ds.y_train.shape == (4,) and ds.y_train.dtype == np.int64 and ds.y_test.dtype == np.int64
    assert repr(ds) == "Dataset('z': 4 train / 4 test, 2x2x3 uint8, 1 class: a)"


# ---------------------------------------------------------------- subsets, sampling, normalisation, resizing

def toy(n=6, k=4, seed=0):
    rng = np.random.default_rng(seed)
    y = np.arange(n * k) % k
    x = rng.integers(0, 256, (n * k, 3, 3, 3), dtype=np.uint8)
    return Dataset(x, y, x[:2 * k], y[:2 * k], ['w', 'x', 'y', 'z'][:k], 'toy', {'wnids': ['n0', 'n1', 'n2', 'n3'][:k]})


def test_subset_classes():
    ds = toy()
    sub = subset_classes(ds, [3, 'x'])
    assert sub.class_names == ['z', 'x'] and sub.num_classes == 2 and sub.name == 'toy'
    assert sub.meta['source_classes'] == [3, 1] and sub.meta['wnids'] == ['n3', 'n1']
    keep = np.isin(ds.y_train, [1, 3])
    np.testing.assert_array_equal(sub.x_train, ds.x_train[keep])
    np.testing.assert_array_equal(sub.y_train, np.where(ds.y_train[keep] == 3, 0, 1))
    np.testing.assert_array_equal(sub.y_test, [1, 0, 1, 0])
    assert subset_classes(sub, ['x']).meta['source_classes'] == [1]
    assert ds.subset('n2').class_names == ['y']
    with pytest.raises(DatasetError, match="unknown class 'q'"):
        subset_classes(ds, ['q'])
    with pytest.raises(DatasetError, match='class index 4 out of range'):
        subset_classes(ds, [4])
    with pytest.raises(DatasetError, match='given twice'):
        subset_classes(ds, [1, 'x'])


def test_sample_per_class():
    ds = toy(n=10)
    idx = sample_per_class(None, ds.y_train, 3, seed=5)
    np.testing.assert_array_equal(idx, sample_per_class(None, ds.y_train, 3, seed=5))
    assert len(idx) == 12 and len(set(idx.tolist())) == 12
    np.testing.assert_array_equal(ds.y_train[idx], np.repeat(np.arange(4), 3))
    assert any(not np.array_equal(idx, sample_per_class(None, ds.y_train, 3, seed=s)) for s in range(6, 10))
    x, y = sample_per_class(ds.x_train, ds.y_train, 3, seed=5, classes=[2, 0])
    np.testing.assert_array_equal(y, [2, 2, 2, 0, 0, 0])
    np.testing.assert_array_equal(x, ds.x_train[np.r_[idx[6:9], idx[:3]]])   # a class's draw ignores the others
    xs, ys = ds.sample_per_class(2, classes=['z'], seed=1)
    assert (ys == 3).all() and xs.shape == (2, 3, 3, 3)
    with pytest.raises(DatasetError, match=r'class 0 has 10 examples, but 11 per class were asked for'):
        sample_per_class(ds.x_train, ds.y_train, 11)
    with pytest.raises(DatasetError, match=r"class 2 \('y'\) has 10 examples, but 11"):
        ds.sample_per_class(11, classes=['y'])
    with pytest.raises(DatasetError, match=r"class 7 has 0 examples"):
        sample_per_class(None, ds.y_train, 1, classes=[7])


def test_to_float():
    x = np.array([[0, 128, 255]], np.uint8)
    f = to_float(x)
    assert f.dtype == np.float32
    np.testing.assert_allclose(f, [[0, 128 / 255, 1]], rtol=1e-7)
    assert to_float(f) is f
    with pytest.raises(DatasetError, match=r'\[0, 1\]'):
        to_float(np.array([0., 3.]))
    with pytest.raises(DatasetError, match='uint8'):
        to_float(np.array([1, 2], np.int32))


def test_resize(tmp_path):
    write_tiny(tmp_path / 't')
    ds = load_dataset(tmp_path / 't', progress=False)
    small = resize(ds, 8)
    assert small.x_train.shape == (9, 8, 8, 3) and small.x_test.shape == (4, 8, 8, 3)
    assert small.x_train.dtype == np.uint8 and small.meta['resized_from'] == [16, 16]
    np.testing.assert_array_equal(small.y_train, ds.y_train)
    np.testing.assert_allclose(small.x_train.mean(axis=(1, 2)), ds.x_train.mean(axis=(1, 2)), atol=1)
    assert resize(ds.x_test, (4, 6)).shape == (4, 4, 6, 3)
    assert resize(np.zeros((2, 6, 6, 1), np.uint8), 3).shape == (2, 3, 3, 1)
    assert ds.resize(16).x_train is ds.x_train


# ---------------------------------------------------------------- the real copies in ../shared/data

needs_shared = needs_data()

@pytest.fixture(scope='session')
def shared_cache(tmp_path_factory): return tmp_path_factory.mktemp('shared-cache')


@needs_shared
def test_shared_cifar10_jpeg(shared_cache, capsys):
    require_data('cifar10-jpeg.zip')
    src = SHARED / 'cifar10-jpeg.zip'
    t0 = time.perf_counter()
    ds = load_dataset(src, cache=shared_cache, progress=False)
    t1 = time.perf_counter()
    again = load_dataset('cifar10', data_dir=SHARED, cache=shared_cache, progress=False)
    t2 = time.perf_counter()
    with capsys.disabled():
        print(f"\ncifar10-jpeg.zip: decode {t1 - t0:.1f} s, cached load {t2 - t1:.1f} s")
    assert ds.x_train.shape == (50000, 32, 32, 3) and ds.x_test.shape == (10000, 32, 32, 3)
    assert ds.class_names == CIFAR10_CLASSES
    assert ds.class_counts('train').tolist() == [5000] * 10 and ds.class_counts('test').tolist() == [1000] * 10
    assert again.name == 'cifar10' and again.meta['cache'] == ds.meta['cache']
    np.testing.assert_array_equal(again.x_test[::97], ds.x_test[::97])
    assert t1 - t0 < 60


@needs_shared
def test_shared_tiny_imagenet(shared_cache, capsys):
    require_data('tiny-imagenet-202.zip')
    src = SHARED / 'tiny-imagenet-202.zip'
    t0 = time.perf_counter()
    ds = load_dataset(src, cache=shared_cache, progress=False)
    t1 = time.perf_counter()
    with capsys.disabled():
        print(f"\ntiny-imagenet-202.zip: decode {t1 - t0:.1f} s")
    assert ds.num_classes == 202 and ds.input_shape == (64, 64, 3)
    assert len(ds.y_train) == 40400 and len(ds.y_test) == 10100
    assert ds.meta['wnids'] == sorted(ds.meta['wnids'])
    assert ds.class_counts('test').tolist() == [50] * 202
    pair = ds.subset(['n02480855', 'n10148035'])
    assert pair.class_names == ['gorilla', 'groom'] and pair.class_counts('train').tolist() == [200, 200]
    assert resize(pair, 32).input_shape == (32, 32, 3)


@needs_shared
def test_shared_mnist(shared_cache):
    require_data('mnist')
    ds = load_dataset('mnist', data_dir=SHARED, cache=shared_cache, progress=False)
    assert ds.x_train.shape == (60000, 28, 28, 1) and ds.x_test.shape == (10000, 28, 28, 1)
    assert ds.class_counts('train').sum() == 60000 and ds.num_classes == 10
