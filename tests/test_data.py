"""afd_nb.data: datasets, flavours, subsets, augmentation, loader, errors (CPU, < 60 s)."""
import os, pickle
from PIL import Image
from pathlib import Path
import numpy as np
import pytest
import torch
import afd_nb.data as D
import afd_nb.download as DL
from afd_nb.data import (DataNotFoundError, ImageDataset, BatchLoader, augment_batch, data_roots, get_dataset)
from conftest import local_file, obtain

C10_TEST_COUNTS = [103, 89, 100, 103, 90, 86, 112, 102, 106, 109]    # data README
C10_TRAIN_COUNTS = [396, 366, 420, 384, 422, 393, 414, 385, 407, 413]


@pytest.fixture(scope='module')
def c10_jpeg_test():
    return obtain('CIFAR-10 JPEG copy', lambda dl: get_dataset('cifar10', 'test', flavour='jpeg'))


@pytest.fixture(scope='module')
def tiny_val():
    return obtain('Tiny-ImageNet val', lambda dl: get_dataset('tiny_imagenet', 'test', download=dl))


@pytest.fixture
def nowhere(tmp_path, monkeypatch):
    "Three empty places: an explicit root, $AFD_DATA, and the project's data folder; downloads off."
    root, env, repo = tmp_path/'root', tmp_path/'env', tmp_path/'repo_data'
    root.mkdir(); env.mkdir()
    monkeypatch.setenv('AFD_DATA', str(env))
    monkeypatch.setenv('AFD_DOWNLOAD', '0')
    monkeypatch.delenv('AFD_MIRROR', raising=False); monkeypatch.delenv('AFD_MIRROR_CHECKSUMS', raising=False)
    monkeypatch.setattr(DL, 'project_data_dir', lambda: repo)
    return root, env, repo


def _dump(obj, path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, 'wb') as f: pickle.dump(obj, f, protocol=2)


# ------------------------------------------------------------------ CIFAR-10
def test_exact_test_subset(cifar10_test):
    ds = cifar10_test
    assert isinstance(ds, ImageDataset) and ds.flavour == 'exact' and ds.split == 'test'
    assert ds.x.dtype == torch.uint8 and ds.x.shape == (1000, 3, 32, 32) and ds.y.dtype == torch.int64
    assert torch.bincount(ds.y).tolist() == C10_TEST_COUNTS
    assert ds.y[:10].tolist() == [3, 8, 8, 0, 6, 6, 1, 6, 3, 1]       # official test_batch
    assert ds.describe() == 'cifar10/exact test (1000 images)'
    assert ds.classes[:3] == ['airplane', 'automobile', 'bird']
    x, y = ds.tensors()
    assert x.dtype == torch.float32 and 0 <= x.min() < 0.05 and 0.95 < x.max() <= 1 and torch.equal(y, ds.y)
    xi, yi = ds[5]
    assert xi.shape == (3, 32, 32) and yi == 6 and torch.equal(xi, x[5])


def test_exact_train_subset(cifar10_train):
    assert cifar10_train.x.shape == (4000, 3, 32, 32)
    assert torch.bincount(cifar10_train.y).tolist() == C10_TRAIN_COUNTS
    assert cifar10_train.y[:10].tolist() == [6, 9, 9, 4, 1, 1, 2, 7, 8, 3]  # official data_batch_1


def test_exact_rows_match_jpeg_copy(cifar10_test, c10_jpeg_test):
    j = torch.from_numpy(np.load(local_file('cifar10_subset.npz'))['test_index_in_jpeg'].astype(np.int64))
    dj = c10_jpeg_test
    assert dj.x.shape == (10000, 3, 32, 32) and torch.bincount(dj.y).tolist() == [1000] * 10
    assert dj.flavour == 'jpeg' and 'cifar10/jpeg test (10000 images' in dj.describe()
    assert torch.equal(dj.y[j], cifar10_test.y)
    a, b = cifar10_test.x.float(), dj.x[j].float()
    err = (a - b).abs().mean((1, 2, 3))
    err_shuffled = (a - b.roll(1, 0)).abs().mean((1, 2, 3))
    # mean |error| <= mean RMSE = 255 * 10^(-PSNR/20) ~ 7.9 grey levels at the copy's PSNR of ~30.5 dB; wrong pairs give ~70
    assert err.mean() < 8 and err_shuffled.mean() > 4 * err.mean()   # same images, JPEG noise only
    assert not torch.equal(a, b)                                      # ... but not identical


def test_default_flavours_and_errors():
    with pytest.raises(ValueError, match='valid: cifar10, cifar100, tiny_imagenet'): get_dataset('mnist')
    with pytest.raises(ValueError, match='valid: exact, jpeg, full'): get_dataset('cifar10', flavour='png')
    with pytest.raises(ValueError, match='valid: full, sample'): get_dataset('cifar100', flavour='exact')
    with pytest.raises(ValueError, match="valid: 'train', 'test'"): get_dataset('cifar10', split='dev')
    with pytest.raises(DataNotFoundError, match='no test images'): get_dataset('cifar100', 'test', flavour='sample')


# ------------------------------------------------------------------ subsets
def test_balanced_subsets(cifar10_train):
    a = get_dataset('cifar10', 'train', n_per_class=30, seed=0)
    b = get_dataset('cifar10', 'train', n_per_class=30, seed=0)
    c = get_dataset('cifar10', 'train', n_per_class=30, seed=1)
    assert torch.bincount(a.y).tolist() == [30] * 10 and len(a) == 300
    assert torch.equal(a.index, b.index) and torch.equal(a.x, b.x)
    assert not torch.equal(a.index, c.index)
    assert torch.equal(a.index, a.index.sort().values)              # kept in source order
    assert torch.equal(a.x, cifar10_train.x[a.index]) and torch.equal(a.y, cifar10_train.y[a.index])
    assert '30 per class, seed 0' in a.describe()
    d = get_dataset('cifar10', 'train', n_per_class=30, n=50)
    assert torch.equal(d.index, a.index[:50]) and len(d) == 50
    assert torch.equal(get_dataset('cifar10', 'test', n=7).x, get_dataset('cifar10', 'test').x[:7])
    with pytest.raises(ValueError, match='has only'): get_dataset('cifar10', 'train', n_per_class=400)
    with pytest.raises(ValueError, match='only 1000'): get_dataset('cifar10', 'test', n=1001)


# ------------------------------------------------------------------ augmentation
def _candidates(img, pad):
    "All crops of the zero-padded image, unflipped and flipped: (2(2p+1)^2, C, H, W)."
    C, H, W = img.shape
    p = torch.nn.functional.pad(img, (pad,) * 4)
    crops = torch.stack([p[:, i:i + H, j:j + W] for i in range(2 * pad + 1) for j in range(2 * pad + 1)])
    return torch.cat([crops, crops.flip(3)])


def test_augment_batch_real_images(cifar10_test):
    x = cifar10_test.x[:64]
    g = torch.Generator().manual_seed(0)
    xa = augment_batch(x, 4, generator=g)
    assert xa.shape == x.shape and xa.dtype == torch.uint8
    assert (xa != x).flatten(1).any(1).float().mean() > 0.8             # most images change
    hits = []
    for i in range(len(x)):                                              # each output is a crop (+ flip) of its input
        m = (_candidates(x[i], 4) == xa[i]).flatten(1).all(1).nonzero()
        assert len(m) > 0, f'image {i} is not a padded crop/flip of its input'
        hits.append(int(m[0]))
    assert len(set(hits)) > 20 and any(h >= 81 for h in hits) and any(h < 81 for h in hits)
    xf = augment_batch(x.float() / 255, 4, generator=torch.Generator().manual_seed(0))
    assert xf.dtype == torch.float32 and 0 <= xf.min() and xf.max() <= 1
    assert torch.equal(xf, xa.float() / 255)                             # same generator, same transform
    xb = augment_batch(x, 4, generator=torch.Generator().manual_seed(1))
    assert not torch.equal(xa, xb)


def test_augment_batch_hand_made():
    "A 6x6 image with distinct values: the output window shows offset and flip; padding is zero."
    img = (torch.arange(36, dtype=torch.float32).reshape(1, 1, 6, 6) + 1).expand(256, 3, 6, 6)
    out = augment_batch(img, pad=2, generator=torch.Generator().manual_seed(0))
    assert out.shape == img.shape
    assert torch.equal(out[:, 0], out[:, 1]) and torch.equal(out[:, 1], out[:, 2])   # same transform on all channels
    padded = torch.nn.functional.pad(img[0, 0], (2, 2, 2, 2))
    seen = set()
    for o in out[:, 0]:
        found = [(dy, dx, f) for dy in range(5) for dx in range(5) for f in (0, 1)
                 if torch.equal((padded[dy:dy + 6, dx:dx + 6].flip(1) if f else padded[dy:dy + 6, dx:dx + 6]), o)]
        assert len(found) == 1
        seen.add(found[0])
    assert len(seen) > 30                                         # offsets 0..4 in both axes, both flips occur
    assert {dy for dy, _, _ in seen} == set(range(5)) and {f for *_, f in seen} == {0, 1}
    # a window shifted by the full padding has exactly `pad` zero rows/columns
    z = out[:, 0]
    assert ((z == 0).all(1).sum(1) <= 2).all() and ((z == 0).all(2).sum(1) <= 2).all()


# ------------------------------------------------------------------ BatchLoader
def test_batchloader_covers_each_sample_once():
    x = torch.randint(0, 256, (103, 3, 8, 8), dtype=torch.uint8)
    ids = torch.arange(103)
    for shuffle in (True, False):
        bl = BatchLoader((x, ids), 16, shuffle=shuffle, augment=True, seed=3)
        assert len(bl) == 7
        bs = list(bl)
        assert [len(b[1]) for b in bs] == [16] * 6 + [7]
        got = torch.cat([b[1] for b in bs])
        assert torch.equal(got.sort().values, ids)
        assert (got != ids).any() == shuffle
        assert all(b[0].dtype == torch.float32 and b[0].shape[1:] == (3, 8, 8) for b in bs)
    bl = BatchLoader((x, ids), 16, drop_last=True)
    assert len(bl) == 6 and len(torch.cat([b[1] for b in bl])) == 96
    # the unaugmented batch is exactly the stored images in [0, 1]
    xb, yb = next(iter(BatchLoader((x, ids), 16)))
    assert torch.equal(xb, x[yb].float() / 255)


def test_batchloader_deterministic_and_epochs(cifar10_train):
    a = BatchLoader(cifar10_train, 256, augment=True, seed=0)
    b = BatchLoader(cifar10_train, 256, augment=True, seed=0)
    xa, ya = next(iter(a)); xb, yb = next(iter(b))
    assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert torch.equal(next(iter(a))[0], xa)                     # re-iterating the same epoch repeats it
    a.set_epoch(1)
    xa1, ya1 = next(iter(a))
    assert not torch.equal(ya1, ya)
    assert a.pad == 4
    c = BatchLoader(cifar10_train, 256, augment=True, seed=1)
    assert not torch.equal(next(iter(c))[1], ya)


@pytest.mark.parametrize('world_size', [2, 3])
def test_rank_slices_concatenate_to_global_batch(cifar10_test, world_size):
    ds = cifar10_test
    one = BatchLoader(ds, 100, augment=True, seed=5, drop_last=False)
    one.set_epoch(2)
    ranks = [BatchLoader(ds, 100, augment=True, seed=5, rank=r, world_size=world_size) for r in range(world_size)]
    for r in ranks: r.set_epoch(2)
    assert all(len(r) == len(one) == 10 for r in ranks)
    for (xg, yg), *parts in zip(one, *ranks):
        assert torch.equal(torch.cat([p[0] for p in parts]), xg)
        assert torch.equal(torch.cat([p[1] for p in parts]), yg)
        assert max(len(p[1]) for p in parts) - min(len(p[1]) for p in parts) <= 1


def test_batchloader_tiny_pad(tiny_val):
    bl = BatchLoader(tiny_val, 32, augment=True)
    assert bl.pad == 8
    xb, yb = next(iter(bl))
    assert xb.shape == (32, 3, 64, 64) and 0 <= xb.min() and xb.max() <= 1


# ------------------------------------------------------------------ missing data (downloads: test_download.py)
def test_not_found_lists_paths(nowhere):
    root, env, repo = nowhere
    with pytest.raises(DataNotFoundError) as e: get_dataset('cifar10', 'test', root=root)
    msg = str(e.value)
    first = msg.splitlines()[0]
    assert first.startswith('cifar10/exact test: not found, and downloads are off (AFD_DOWNLOAD=0 or download=False)')
    assert 'https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz' in first and f'put it in {root}{os.sep} ' in first
    for s in [str(root), str(env), str(repo), str(root/'cifar10_subset.npz'), str(env/'cifar-10-batches-py'/'test_batch'), 'AFD_DATA']:
        assert s in msg, s
    assert msg.index(str(env)) < msg.index(str(repo)) and isinstance(e.value, FileNotFoundError)
    with pytest.raises(DataNotFoundError) as e: get_dataset('cifar10', 'test', flavour='jpeg', root=root, download=True)
    assert 'cifar10_jpeg.npz' in str(e.value) and 'no official archive provides' in str(e.value)
    with pytest.raises(DataNotFoundError, match='tiny_imagenet_val.npz'): get_dataset('tiny_imagenet', 'test', root=root)
    assert data_roots(root) == [root, env, repo]
    assert not any(p.name.startswith('.') for p in root.iterdir())       # nothing fetched, nothing half-written


def test_never_the_working_directory(nowhere, monkeypatch, tmp_path, cifar10_test):
    "A data/ folder under the working directory (e.g. a papermill run folder) is neither searched nor downloaded into."
    root, env, repo = nowhere
    cwd = tmp_path/'runs'/'demo'/'run0'; (cwd/'data').mkdir(parents=True)
    np.savez(cwd/'data'/'cifar10_subset.npz', x_test=cifar10_test.x.numpy().transpose(0, 2, 3, 1), y_test=cifar10_test.y.numpy(),
             class_names=np.array(cifar10_test.classes))
    monkeypatch.chdir(cwd)
    assert cwd/'data' not in data_roots() and DL.download_dir() == env
    with pytest.raises(DataNotFoundError) as e: get_dataset('cifar10', 'test')
    assert str(cwd) not in str(e.value)


def _write_cifar10_pickles(d: Path, xtr, ytr, xte, yte, names):
    "An official-layout cifar-10-batches-py/ folder (python-3 pickles with the official keys)."
    rows = lambda x: x.reshape(len(x), 3072)
    parts = np.array_split(np.arange(len(xtr)), 5)
    for b, p in enumerate(parts):
        _dump({'data': rows(xtr[p]), 'labels': [int(v) for v in ytr[p]]}, d/f'data_batch_{b + 1}')
    _dump({'data': rows(xte), 'labels': [int(v) for v in yte]}, d/'test_batch')
    _dump({'label_names': names}, d/'batches.meta')


def test_pickle_layout(cifar10_train, cifar10_test, nowhere):
    "An official-layout cifar-10-batches-py/ folder: exact = its first rows, full = all of them."
    root, _, _ = nowhere
    xtr, ytr = cifar10_train.x.numpy(), cifar10_train.y.numpy()
    xtr5 = np.concatenate([xtr] * 5)                                  # 20000 train rows, first 4000 = exact subset
    _write_cifar10_pickles(root/'cifar-10-batches-py', xtr5, np.concatenate([ytr] * 5),
                           cifar10_test.x.numpy(), cifar10_test.y.numpy(), cifar10_train.classes)
    full = get_dataset('cifar10', 'train', flavour='full', root=root)
    assert full.x.shape == (20000, 3, 32, 32) and full.source == root/'cifar-10-batches-py'
    assert torch.equal(full.x[:4000], cifar10_train.x) and full.describe() == 'cifar10/full train (20000 images)'
    # data_batch_1 holds only 4000 rows here, so 'exact' needs them all; it equals the npz subset
    ex = get_dataset('cifar10', 'train', root=root)
    assert ex.source == root/'cifar-10-batches-py' and torch.equal(ex.x, cifar10_train.x) and torch.equal(ex.y, cifar10_train.y)
    te = get_dataset('cifar10', 'test', root=root)
    assert torch.equal(te.x, cifar10_test.x) and ex.classes == cifar10_train.classes
    # pickles rebuilt from the JPEG copy (the data tools write a readme.txt saying so) are not 'exact'
    (root/'cifar-10-batches-py'/'readme.txt').write_text('Rebuilt from cifar10_jpeg.npz ...')
    with pytest.raises(DataNotFoundError, match='rebuilt from the JPEG copy'): get_dataset('cifar10', 'test', root=root)
    assert 'rebuilt' in get_dataset('cifar10', 'test', flavour='full', root=root).describe()


def test_cifar100(tmp_path):
    s = obtain('CIFAR-100 sample', lambda dl: get_dataset('cifar100', 'train', flavour='sample'))
    assert s.x.shape == (100, 3, 32, 32) and len(s.classes) == 100 and s.flavour == 'sample'
    assert s.y[:6].tolist() == [19, 29, 0, 11, 1, 86] and len(s.y.unique()) == 67
    assert 'cifar100/sample train (100 images' in s.describe()
    # official cifar-100-python/ layout (fine labels), from the sample's own images
    d = tmp_path/'cifar-100-python'
    _dump({'data': s.x.numpy().reshape(100, 3072), 'fine_labels': s.y.tolist(), 'coarse_labels': [0] * 100}, d/'train')
    _dump({'data': s.x.numpy()[:10].reshape(10, 3072), 'fine_labels': s.y[:10].tolist()}, d/'test')
    _dump({'fine_label_names': s.classes, 'coarse_label_names': ['x'] * 20}, d/'meta')
    f = get_dataset('cifar100', 'train', root=tmp_path)
    assert f.flavour == 'full' and torch.equal(f.x, s.x) and torch.equal(f.y, s.y) and f.classes == s.classes
    assert len(get_dataset('cifar100', 'test', root=tmp_path)) == 10


# ------------------------------------------------------------------ Tiny-ImageNet
def test_tiny_imagenet_val(tiny_val):
    ds = tiny_val
    assert ds.x.shape == (10000, 3, 64, 64) and ds.x.dtype == torch.uint8
    assert torch.bincount(ds.y, minlength=200).tolist() == [50] * 200 and len(ds.classes) == 200
    assert ds.meta['wnids'][:3] == ['n02124075', 'n04067472', 'n04540053']
    assert ds.classes[int(ds.y[0])] == 'go-kart' and ds.describe() == 'tiny_imagenet/full test (10000 images)'
    grey = (ds.x[:, 0] == ds.x[:, 1]).flatten(1).all(1) & (ds.x[:, 1] == ds.x[:, 2]).flatten(1).all(1)
    assert 50 < grey.sum() < 400                                  # ~1.7% greyscale JPEGs, converted to RGB


def test_tiny_imagenet_train_subset():
    ds = obtain('Tiny-ImageNet train', lambda dl: get_dataset('tiny_imagenet', 'train', n_per_class=2, download=dl))
    assert ds.x.shape == (400, 3, 64, 64) and torch.bincount(ds.y, minlength=200).tolist() == [2] * 200
    first = get_dataset('tiny_imagenet', 'train', n=400)
    assert torch.bincount(first.y, minlength=200).tolist() == [2] * 200   # interleaved order: first n is balanced
    assert torch.equal(first.y[:200], torch.arange(200))


def test_tiny_imagenet_tree_matches_npz(tmp_path, tiny_val):
    "The official tree layout (written from the npz JPEG bytes) gives the same images, labels and order."
    val_npz = local_file('tiny_imagenet_val.npz')
    z = np.load(val_npz)
    buf, off, files, wnids = z['val_jpeg'], z['val_offsets'], D._strs(z['val_file']), D._strs(z['wnids'])
    t = tmp_path/'tiny-imagenet-200'
    (t/'val'/'images').mkdir(parents=True)
    (t/'wnids.txt').write_text(''.join(w + '\n' for w in wnids))
    lines = []
    for i in range(150):
        (t/'val'/'images'/files[i]).write_bytes(buf[off[i]:off[i + 1]].tobytes())
        lines.append(f'{files[i]}\t{wnids[int(z["y_val"][i])]}\t0\t0\t63\t63\n')
    (t/'val'/'val_annotations.txt').write_text(''.join(lines[::-1]))        # order in the file does not matter
    v = get_dataset('tiny_imagenet', 'test', root=tmp_path)
    assert v.source == t and torch.equal(v.x, tiny_val.x[:150]) and torch.equal(v.y, tiny_val.y[:150])
    # train tree for the first 3 classes, images _0.._3 of each, from the npz parts
    ref = get_dataset('tiny_imagenet', 'train', n=800)                     # _0.._3 of all 200 classes
    (t/'wnids.txt').write_text(''.join(w + '\n' for w in wnids[:3]))
    keep = ref.y < 3
    for k, (img, y) in enumerate(zip(ref.x[keep], ref.y[keep])):
        num = k // 3
        d = t/'train'/wnids[int(y)]/'images'; d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img.permute(1, 2, 0).numpy()).save(d/f'{wnids[int(y)]}_{num}.png')
        (d/f'{wnids[int(y)]}_{num}.png').rename(d/f'{wnids[int(y)]}_{num}.JPEG')   # lossless bytes, JPEG name
    tr = get_dataset('tiny_imagenet', 'train', root=tmp_path)
    assert len(tr) == 12 and torch.equal(tr.y, ref.y[keep]) and torch.equal(tr.x, ref.x[keep])
