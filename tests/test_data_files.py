"""Files the user points at (root=, $AFD_DATA, data/) never run code, and a broken data file is named at load time.

* CIFAR-10/100 batch files are unpickled with a restricted unpickler: a crafted file whose unpickling would create a
  marker folder (os.makedirs) or run a shell command (os.system) is refused, the marker is never created, and the
  one-line error names the file. Official-layout files (numpy arrays, under the module name the official files use,
  numpy.core.multiarray, or numpy 2's numpy._core.multiarray) still load.
* afd_nb.pretrain.load_natural loads weights-only: a crafted checkpoint is refused, its payload never runs.
* npz files: truncated, random bytes, labels out of range, float/NaN pixels: one DataFileError line naming the file
  and what to do, at get_dataset time (not an IndexError at the first training step, not a bare assert)."""
import os, pickle, subprocess, sys
from pathlib import Path
import numpy as np
import pytest
import torch
from afd_nb.data import get_dataset
from afd_nb.download import DataFileError

ROOT = Path(__file__).resolve().parent.parent


class _Makedirs:
    "Unpickling this calls os.makedirs(marker): a stand-in for any code a crafted file could run."
    def __init__(self, marker): self.marker = str(marker)
    def __reduce__(self): return (os.makedirs, (self.marker,))


class _System:
    "Unpickling this runs a shell command that creates the marker file."
    def __init__(self, marker): self.marker = str(marker)
    def __reduce__(self): return (os.system, (f'touch {self.marker}',))


@pytest.fixture
def only(tmp_path, monkeypatch):
    "A data folder that is the only one searched (no AFD_DATA, no project data/), downloads off."
    import afd_nb.download as DL
    for k in ('AFD_DATA', 'AFD_MIRROR', 'AFD_MIRROR_CHECKSUMS'): monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv('AFD_DOWNLOAD', '0')
    monkeypatch.setattr(DL, 'project_data_dir', lambda: tmp_path/'no-data')
    d = tmp_path/'data'; d.mkdir()
    return d


def _batch(n=20, seed=0) -> dict:
    rng = np.random.default_rng(seed)
    return {'batch_label': 'b', 'labels': [int(v) for v in rng.integers(0, 10, n)],
            'data': rng.integers(0, 256, (n, 3072), dtype=np.uint8), 'filenames': [f'{i}.png' for i in range(n)]}


def _write(p: Path, obj, protocol=2) -> Path:
    p.parent.mkdir(parents=True, exist_ok=True); p.write_bytes(pickle.dumps(obj, protocol=protocol)); return p


# ---------------------------------------------------------------- CIFAR pickles
@pytest.mark.parametrize('payload', [_Makedirs, _System])
def test_cifar10_batch_payload_never_runs(only, tmp_path, payload):
    marker = tmp_path/'payload-ran'
    f = _write(only/'cifar-10-batches-py'/'test_batch', {**_batch(), 'data': payload(marker)})
    with pytest.raises(DataFileError) as e: get_dataset('cifar10', 'test', flavour='full', root=only)
    msg = str(e.value)
    assert not marker.exists()
    fn = payload(marker).__reduce__()[0]
    assert msg.startswith(f'refusing to unpickle {f}: it asks for {fn.__module__}.{fn.__name__}, ') and '\n' not in msg


def test_cifar100_files_payload_never_runs(only, tmp_path):
    marker = tmp_path/'payload-ran'
    d = only/'cifar-100-python'
    _write(d/'test', {'data': np.zeros((2, 3072), np.uint8), 'fine_labels': [0, 1], 'coarse_labels': [0, 0]})
    _write(d/'meta', {'fine_label_names': _Makedirs(marker), 'coarse_label_names': []})
    with pytest.raises(DataFileError, match=f'refusing to unpickle {d/"meta"}: it asks for os.makedirs'):
        get_dataset('cifar100', 'test', root=only)
    assert not marker.exists()


def test_official_layout_pickles_still_load(only):
    "Protocol 2 (as the official files), with numpy 2's module name and with the official files' numpy.core.multiarray."
    b = _batch(n=30)
    f = _write(only/'cifar-10-batches-py'/'test_batch', b)
    assert b'numpy._core.multiarray' in f.read_bytes() or b'numpy.core.multiarray' in f.read_bytes()
    ds = get_dataset('cifar10', 'test', flavour='full', root=only)
    assert torch.equal(ds.x, torch.from_numpy(b['data'].reshape(-1, 3, 32, 32))) and ds.y.tolist() == b['labels']
    f.write_bytes(f.read_bytes().replace(b'numpy._core.multiarray', b'numpy.core.multiarray'))   # as the official files
    assert b'numpy.core.multiarray\n_reconstruct' in f.read_bytes()
    os.utime(f, ns=(1, 1))                                                   # a new cache key
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter('error')                                       # and no numpy.core DeprecationWarning
        ds2 = get_dataset('cifar10', 'test', flavour='full', root=only)
    assert torch.equal(ds2.x, ds.x)


def test_truncated_pickle_is_named(only):
    f = _write(only/'cifar-10-batches-py'/'test_batch', _batch())
    f.write_bytes(f.read_bytes()[:1000])
    with pytest.raises(DataFileError, match=f'cannot read {f}: it is truncated or not a CIFAR batch file'):
        get_dataset('cifar10', 'test', flavour='full', root=only)


# ---------------------------------------------------------------- load_natural
def test_load_natural_payload_never_runs(tmp_path):
    from afd_nb.models import UnsafeCheckpointError, build_model
    from afd_nb.pretrain import load_natural
    marker = tmp_path/'payload-ran'
    evil = tmp_path/'evil.pt'
    torch.save({'state_dict': build_model('resnet20').state_dict(), 'arch': 'resnet20', 'num_classes': 10,
                'extra': _Makedirs(marker)}, evil)
    with pytest.raises(UnsafeCheckpointError) as e: load_natural(evil)
    assert not marker.exists()
    assert str(e.value).startswith(f'refusing to load {evil}: it needs ')


# ---------------------------------------------------------------- npz files
def _subset_npz(p: Path, drop=(), **change) -> Path:
    "A small cifar10_subset.npz with the real file's arrays (random images), `change` replacing some."
    rng = np.random.default_rng(0)
    a = dict(x_train=rng.integers(0, 256, (40, 32, 32, 3), dtype=np.uint8), y_train=(np.arange(40) % 10).astype(np.uint8),
             x_test=rng.integers(0, 256, (20, 32, 32, 3), dtype=np.uint8), y_test=(np.arange(20) % 10).astype(np.uint8),
             class_names=np.array([f'c{i}' for i in range(10)]))
    np.savez(p, **{k: v for k, v in {**a, **change}.items() if k not in drop})
    return p


def test_good_npz_loads(only):
    _subset_npz(only/'cifar10_subset.npz')
    ds = get_dataset('cifar10', 'test', root=only)
    assert ds.x.shape == (20, 3, 32, 32) and ds.y.tolist() == [i % 10 for i in range(20)]


def test_truncated_npz(only):
    p = _subset_npz(only/'cifar10_subset.npz')
    p.write_bytes(p.read_bytes()[:p.stat().st_size // 2])
    with pytest.raises(DataFileError) as e: get_dataset('cifar10', 'test', root=only)
    msg = str(e.value)
    assert msg.startswith(f'cannot read {p}: it is truncated or not an npz file (') and '\n' not in msg
    assert msg.endswith(f'replace it with a complete copy, or move it out of {only}{os.sep}')


def test_npz_of_random_bytes(only):
    p = only/'cifar10_subset.npz'; p.write_bytes(np.random.default_rng(0).bytes(5000))
    with pytest.raises(DataFileError, match=f'cannot read {p}: it is truncated or not an npz file') as e:
        get_dataset('cifar10', 'train', root=only, n=8)
    assert not isinstance(e.value, ValueError)            # the training loop does not re-label it as a TrainConfig error


def test_npz_without_the_array(only):
    p = _subset_npz(only/'cifar10_subset.npz', drop=('y_test',))
    with pytest.raises(DataFileError, match=f"{p} has no array 'y_test' \\(it holds "): get_dataset('cifar10', 'test', root=only)


def test_labels_out_of_range_are_caught_at_load_time(only):
    y = (np.arange(40) % 10).astype(np.int64); y[7] = 37
    p = _subset_npz(only/'cifar10_subset.npz', y_train=y)
    with pytest.raises(DataFileError) as e: get_dataset('cifar10', 'train', root=only, n=4)   # even when row 7 is not used
    msg = str(e.value)
    assert msg.startswith(f'{p}: label 37 at row 7 of cifar10/exact train (1 bad row in all) is not a class index 0..9 of its 10 classes')
    assert '\n' not in msg
    assert len(get_dataset('cifar10', 'test', root=only)) == 20                             # the other split is fine


@pytest.mark.parametrize('bad', ['float', 'nan'])
def test_float_or_nan_pixels(only, bad):
    x = np.random.default_rng(0).random((20, 32, 32, 3)).astype(np.float32)
    if bad == 'nan': x[3, 0, 0, 0] = np.nan
    p = _subset_npz(only/'cifar10_subset.npz', x_test=x)
    with pytest.raises(DataFileError) as e: get_dataset('cifar10', 'test', root=only)
    assert str(e.value).startswith(f'{p}: x_test holds float32 (20, 32, 32, 3), not uint8 images (N, ?, ?, 3); ')


def test_float_pixels_refused_under_python_O(only):
    "The check is an exception, not an assert: it holds under python -O too."
    _subset_npz(only/'cifar10_subset.npz', x_test=np.zeros((20, 32, 32, 3), np.float64))
    code = ('import sys; from afd_nb.data import get_dataset; from afd_nb.download import DataFileError\n'
            'try: get_dataset("cifar10", "test", root=sys.argv[1], download=False)\n'
            'except DataFileError as e: print("refused:", e)')
    env = {k: v for k, v in os.environ.items() if k != 'AFD_DATA'}
    out = subprocess.run([sys.executable, '-O', '-c', code, str(only)], capture_output=True, text=True, timeout=300,
                         env={**env, 'PYTHONPATH': str(ROOT)})
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(f'refused: {only/"cifar10_subset.npz"}: x_test holds float64'), out.stdout


def test_image_dataset_checks_are_exceptions():
    from afd_nb.data import ImageDataset
    with pytest.raises(TypeError, match=r'x must be uint8 images \(N,3,H,W\), got torch.float32 \(2, 3, 4, 4\) \(from f.npz\)'):
        ImageDataset(torch.zeros(2, 3, 4, 4), torch.zeros(2), ['a'], source='f.npz')
    with pytest.raises(ValueError, match='2 images but 3 labels'): ImageDataset(torch.zeros(2, 3, 4, 4, dtype=torch.uint8), torch.zeros(3), ['a'])
