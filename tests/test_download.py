"""afd_nb.download end to end, offline: small archives in the official layouts (CIFAR-10, CIFAR-100, Tiny-ImageNet),
built from real images, served by an HTTP server on 127.0.0.1 inside the test, fetched into an empty data folder,
unpacked and loaded; checksum mismatches, dropped connections, weights, the offline message, and CIFAR-100's first
end-to-end run (a 2-step fine-tune through its official layout).

Also a tool: `python tests/test_download.py mirror DIR` writes a mirror folder for `make demo` (an official-layout
cifar-10-python.tar.gz holding the exact subset, the four weight files, and DIR/CHECKSUMS for the archive).
"""
import io, os, pickle, shutil, subprocess, sys, tarfile, zipfile
from pathlib import Path
import numpy as np
import pytest
import torch
from PIL import Image
from conftest import obtain
import afd_nb.download as DL
from afd_nb.data import DataNotFoundError, get_dataset
from afd_nb.download import REMOTES, DownloadError, download_allowed, file_checksum
from afd_nb.models import PRETRAINED, load_pretrained, pretrained_path, safe_load

ROOT = Path(__file__).resolve().parent.parent
C10, C100, TINY = 'cifar-10-python.tar.gz', 'cifar-100-python.tar.gz', 'tiny-imagenet-200.zip'


# ---------------------------------------------------------------- archives in the official layouts, from real images
def _add(t: tarfile.TarFile, name: str, obj):
    "Add one Python-2-protocol pickle (as in the official archives) to a tar file."
    b = pickle.dumps(obj, protocol=2)
    info = tarfile.TarInfo(name); info.size, info.mode, info.mtime = len(b), 0o644, 1_600_000_000
    t.addfile(info, io.BytesIO(b))


def _rows(x: np.ndarray) -> np.ndarray: return np.ascontiguousarray(x.reshape(len(x), 3072))


def cifar10_archive(path, xtr, ytr, xte, yte, classes) -> Path:
    """cifar-10-python.tar.gz with cifar-10-batches-py/: data_batch_1 = (xtr, ytr) (so its first rows are the `exact`
    flavour), data_batch_2..5 empty (this archive holds no more), test_batch = (xte, yte), batches.meta."""
    def batch(x, y, label):
        return {'batch_label': label, 'labels': [int(v) for v in y], 'data': _rows(x), 'filenames': [f'{i:05d}.png' for i in range(len(x))]}
    with tarfile.open(path, 'w:gz', compresslevel=1) as t:
        _add(t, 'cifar-10-batches-py/data_batch_1', batch(xtr, ytr, 'training batch 1 of 5'))
        for i in range(2, 6): _add(t, f'cifar-10-batches-py/data_batch_{i}', batch(xtr[:0], ytr[:0], f'training batch {i} of 5'))
        _add(t, 'cifar-10-batches-py/test_batch', batch(xte, yte, 'testing batch 1 of 1'))
        _add(t, 'cifar-10-batches-py/batches.meta', {'label_names': list(classes), 'num_cases_per_batch': len(xtr), 'num_vis': 3072})
    return Path(path)


def cifar100_archive(path, x, y, classes, n_test=20) -> Path:
    """cifar-100-python.tar.gz with cifar-100-python/{train,test,meta}: train = all of (x, y); test = its last `n_test`
    images (a stand-in: no real CIFAR-100 test images are needed for a layout test). Coarse labels are placeholders (0)."""
    def part(xs, ys):
        return {'filenames': [f'{i:05d}.png' for i in range(len(xs))], 'batch_label': 'b', 'fine_labels': [int(v) for v in ys],
                'coarse_labels': [0] * len(xs), 'data': _rows(xs)}
    with tarfile.open(path, 'w:gz', compresslevel=1) as t:
        _add(t, 'cifar-100-python/train', part(x, y))
        _add(t, 'cifar-100-python/test', part(x[-n_test:], y[-n_test:]))
        _add(t, 'cifar-100-python/meta', {'fine_label_names': list(classes), 'coarse_label_names': [f'c{i}' for i in range(20)]})
    return Path(path)


def _jpeg(img: torch.Tensor) -> bytes:
    "A real image (uint8 3xHxW) as JPEG bytes."
    buf = io.BytesIO(); Image.fromarray(img.permute(1, 2, 0).numpy()).save(buf, 'JPEG', quality=90); return buf.getvalue()


def tiny_zip(path, train, val) -> tuple[Path, dict]:
    """tiny-imagenet-200.zip in the official tree: wnids.txt, words.txt, train/<wnid>/images/<wnid>_<i>.JPEG (+ boxes),
    val/images/val_<i>.JPEG + val_annotations.txt, test/images/. `train` holds images _0, _1, ... of every class in the
    interleaved order (all _0, then all _1). Returns the path and the JPEG bytes written, by member name."""
    wnids = train.meta['wnids']; k = len(wnids)
    written = {}
    with zipfile.ZipFile(path, 'w', zipfile.ZIP_DEFLATED) as z:
        def put(name, data):
            z.writestr('tiny-imagenet-200/' + name, data)
            if name.endswith('.JPEG'): written[name] = data
        put('wnids.txt', ''.join(w + '\n' for w in wnids))
        put('words.txt', ''.join(f'{w}\t{c}\n' for w, c in zip(wnids, train.classes)))
        boxes = {w: [] for w in wnids}
        for r, (img, y) in enumerate(zip(train.x, train.y)):
            w = wnids[int(y)]; assert int(y) == r % k                   # interleaved: row r is image r // k of class r % k
            put(f'train/{w}/images/{w}_{r // k}.JPEG', _jpeg(img)); boxes[w].append(f'{w}_{r // k}.JPEG\t0\t0\t63\t63\n')
        for w in wnids: put(f'train/{w}/{w}_boxes.txt', ''.join(boxes[w]))
        ann = []
        for i, (img, y) in enumerate(zip(val.x, val.y)):
            put(f'val/images/val_{i}.JPEG', _jpeg(img)); ann.append(f'val_{i}.JPEG\t{wnids[int(y)]}\t0\t0\t63\t63\n')
        put('val/val_annotations.txt', ''.join(ann))
        put('test/images/test_0.JPEG', _jpeg(val.x[0]))
    return Path(path), written


def _decode(b: bytes) -> torch.Tensor:
    return torch.from_numpy(np.array(Image.open(io.BytesIO(b)).convert('RGB'))).permute(2, 0, 1)


def _manifest(path, *files) -> Path:
    "A checksum manifest in md5sum format for `files` (our own, written locally)."
    Path(path).write_text(''.join(f'{file_checksum(f, "md5")[4:]}  {Path(f).name}\n' for f in files))
    return Path(path)


# ---------------------------------------------------------------- real images to build them from
@pytest.fixture(scope='module')
def c100_source():
    "100 real CIFAR-100 training images: the sample file where present, else the first 100 of the official archive."
    def get(dl):
        try: return get_dataset('cifar100', 'train', flavour='sample')
        except DataNotFoundError: return get_dataset('cifar100', 'train', flavour='full', n=100, download=dl)
    return obtain('CIFAR-100 images', get)


@pytest.fixture(scope='module')
def tiny_source():
    "Real Tiny-ImageNet images: _0 and _1 of every class (400), and val_0..val_99."
    return (obtain('Tiny-ImageNet train', lambda dl: get_dataset('tiny_imagenet', 'train', n=400, download=dl)),
            obtain('Tiny-ImageNet val', lambda dl: get_dataset('tiny_imagenet', 'test', n=100, download=dl)))


@pytest.fixture(scope='module')
def weights_dir():
    "A folder holding the four official akamaster weight files."
    return obtain('ResNet weights', lambda dl: pretrained_path('resnet20', download=dl)).parent


@pytest.fixture(scope='module')
def c10_mirror(tmp_path_factory, cifar10_train, cifar10_test, weights_dir):
    "A mirror folder: the exact subset as an official-layout CIFAR-10 archive, and the weights; plus its manifest."
    d = tmp_path_factory.mktemp('mirror')
    cifar10_archive(d/C10, cifar10_train.x.numpy(), cifar10_train.y.numpy(), cifar10_test.x.numpy(), cifar10_test.y.numpy(),
                    cifar10_train.classes)
    for f in PRETRAINED.values():
        if (weights_dir/f).is_file(): shutil.copy(weights_dir/f, d/f)
    return d, _manifest(tmp_path_factory.mktemp('local')/'CHECKSUMS', d/C10)


def _mirror(monkeypatch, srv, manifest=None):
    monkeypatch.setenv('AFD_MIRROR', srv.url)
    if manifest: monkeypatch.setenv('AFD_MIRROR_CHECKSUMS', str(manifest))


def _nothing_half_written(folder: Path):
    "No temporary file or folder, and nothing under the final names that is incomplete."
    assert not [p.name for p in folder.rglob('.*')], sorted(folder.rglob('.*'))


# ---------------------------------------------------------------- the policy and the folders
def test_policy(monkeypatch):
    monkeypatch.delenv('AFD_DOWNLOAD', raising=False)
    assert [download_allowed(None), download_allowed(False), download_allowed(True)] == [True, False, True]
    for v, want in [('0', False), ('false', False), ('off', False), ('1', True), ('yes', True), ('', True)]:
        monkeypatch.setenv('AFD_DOWNLOAD', v)
        assert download_allowed(None) is want and download_allowed(True) and not download_allowed(False)
    monkeypatch.setenv('AFD_DOWNLOAD', 'sometimes')
    with pytest.raises(ValueError, match="AFD_DOWNLOAD='sometimes' is not understood"): download_allowed(None)


def test_folders_of_a_checkout_and_of_an_installed_copy(tmp_path, monkeypatch):
    "In a source checkout the project's data folder is its data/; an installed copy (no checkout) uses the per-user folder."
    monkeypatch.delenv('AFD_DATA', raising=False)
    assert DL.project_data_dir() == ROOT/'data' and DL.data_roots() == [ROOT/'data']
    site = tmp_path/'site'/'afd_nb'; site.mkdir(parents=True)
    (site/'__init__.py').write_text(''); shutil.copy(ROOT/'afd_nb'/'download.py', site/'download.py')
    env = {**os.environ, 'PYTHONPATH': str(site.parent), 'XDG_CACHE_HOME': str(tmp_path/'cache')}
    env.pop('AFD_DATA', None)
    out = subprocess.run([sys.executable, '-c', 'import afd_nb.download as D; print(D.project_data_dir()); print(D.data_roots()); '
                          'print(D.download_dir())'], env=env, cwd=tmp_path, capture_output=True, text=True, check=True).stdout.split('\n')
    assert out[0] == str(tmp_path/'cache'/'afd_nb') and out[1] == repr([tmp_path/'cache'/'afd_nb']) and out[2] == out[0]


# ---------------------------------------------------------------- CIFAR-10: the demo's data path
def test_demo_data_path_from_a_mirror(fresh_data, monkeypatch, http_server, c10_mirror, cifar10_train, cifar10_test):
    "What `make demo` needs on a fresh machine, with no AFD_DATA: the exact CIFAR-10 subset and the ResNet-20 weights."
    mirror, manifest = c10_mirror
    srv = http_server(mirror); _mirror(monkeypatch, srv, manifest)
    tr = get_dataset('cifar10', 'train', flavour='exact')
    assert tr.source == fresh_data/'cifar-10-batches-py' and torch.equal(tr.x, cifar10_train.x) and torch.equal(tr.y, cifar10_train.y)
    te = get_dataset('cifar10', 'test', n=200)
    assert torch.equal(te.x, cifar10_test.x[:200]) and te.classes == cifar10_test.classes
    assert get_dataset('cifar10', 'train', flavour='full').describe() == 'cifar10/full train (4000 images)'   # this archive holds no more
    net = load_pretrained('resnet20')
    assert pretrained_path('resnet20') == fresh_data/'weights'/'resnet20-12fca82f.th'
    assert srv.requests == ['/' + C10, '/resnet20-12fca82f.th']           # each file fetched once
    assert sorted(os.listdir(fresh_data)) == ['cifar-10-batches-py', C10, 'weights']
    _nothing_half_written(fresh_data)
    with torch.no_grad(): acc = net(te.tensors()[0]).argmax(1).eq(te.y).float().mean()
    assert acc > 0.85                                                   # the real weights on real images (91.5% on all 1000)


def test_checksum_mismatch(fresh_data, monkeypatch, http_server, c10_mirror, tmp_path):
    mirror, manifest = c10_mirror
    srv = http_server(mirror, mode='corrupt'); _mirror(monkeypatch, srv, manifest)
    with pytest.raises(DownloadError) as e: get_dataset('cifar10', 'test')
    msg = str(e.value)
    assert msg.startswith('cifar10/exact test: not found, and the download failed: ') and 'expected md5:' in msg
    assert 'nothing was kept' in msg and f'put it in {fresh_data}{os.sep} ' in msg
    assert len(srv.requests) == 1                                       # a wrong checksum is not retried
    assert os.listdir(fresh_data) == []                                 # no archive, no .part file, no folder
    # the pinned checksum guards the weights the same way
    with pytest.raises(DownloadError, match='has sha256:.*, expected sha256:12fca82f'): pretrained_path('resnet20')
    assert os.listdir(fresh_data/'weights') == []
    # a manifest on the server is never read: without a local one, the pinned (official) md5 applies
    monkeypatch.delenv('AFD_MIRROR_CHECKSUMS')
    shutil.copy(manifest, mirror/'CHECKSUMS')
    try:
        srv.mode = 'ok'
        with pytest.raises(DownloadError, match='expected md5:c58f30108f718f92721af3b95e74349a'): get_dataset('cifar10', 'test')
    finally: (mirror/'CHECKSUMS').unlink()
    assert os.listdir(fresh_data) == ['weights']
    monkeypatch.setenv('AFD_MIRROR_CHECKSUMS', str(manifest))          # with the right local manifest it works
    assert len(get_dataset('cifar10', 'test')) == 1000


def test_dropped_connection(fresh_data, monkeypatch, http_server, c10_mirror):
    mirror, manifest = c10_mirror
    srv = http_server(mirror, mode='drop'); _mirror(monkeypatch, srv, manifest)
    with pytest.raises(DownloadError) as e: get_dataset('cifar10', 'test')
    msg = str(e.value)
    assert 'the connection closed after' in msg and '(3 attempts); nothing was kept' in msg
    assert len(srv.requests) == 3 and os.listdir(fresh_data) == []
    srv.mode = 'ok'                                                     # the network is back: a retry succeeds
    assert len(get_dataset('cifar10', 'test')) == 1000 and len(srv.requests) == 4
    shutil.rmtree(fresh_data); srv.requests.clear()
    srv.mode, srv.bad = 'drop', 1                                       # one drop inside a call: retried automatically
    assert len(get_dataset('cifar10', 'test')) == 1000 and len(srv.requests) == 2
    _nothing_half_written(fresh_data)


def test_offline_message_and_downloads_off(fresh_data, monkeypatch, http_server, c10_mirror):
    mirror, manifest = c10_mirror
    monkeypatch.setenv('AFD_MIRROR', 'http://127.0.0.1:9')             # nothing listens there: as without a network
    with pytest.raises(DownloadError) as e: get_dataset('cifar10', 'train')
    first = str(e.value).splitlines()[0]
    assert 'https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz (162.6 MiB) and put it in ' + str(fresh_data) in first
    assert 'Connection refused' in first
    srv = http_server(mirror); _mirror(monkeypatch, srv, manifest)
    monkeypatch.setenv('AFD_DOWNLOAD', '0')
    with pytest.raises(DataNotFoundError, match='downloads are off'): get_dataset('cifar10', 'train')
    with pytest.raises(DataNotFoundError, match='downloads are off'): load_pretrained('resnet20')
    assert srv.requests == []
    assert len(get_dataset('cifar10', 'test', download=True)) == 1000   # the argument wins over the environment
    assert srv.requests == ['/' + C10]


def test_archive_put_there_by_hand(fresh_data, monkeypatch, c10_mirror):
    "Offline: an archive copied into the folder the message names is checked and unpacked, with downloads off."
    mirror, manifest = c10_mirror
    monkeypatch.setenv('AFD_MIRROR', 'http://127.0.0.1:9'); monkeypatch.setenv('AFD_MIRROR_CHECKSUMS', str(manifest))
    monkeypatch.setenv('AFD_DOWNLOAD', '0')
    fresh_data.mkdir(); shutil.copy(mirror/C10, fresh_data/C10)
    assert len(get_dataset('cifar10', 'test')) == 1000
    (fresh_data/C10).write_bytes(b'truncated'); shutil.rmtree(fresh_data/'cifar-10-batches-py')
    with pytest.raises(DataNotFoundError, match='fails its checksum'): get_dataset('cifar10', 'test')


def test_unsafe_or_incomplete_archive(fresh_data, monkeypatch, http_server, tmp_path):
    "An archive member outside its folder is refused; an archive without the expected files leaves nothing behind."
    mirror = tmp_path/'m'; mirror.mkdir()
    with tarfile.open(mirror/C10, 'w:gz') as t: _add(t, '../escaped', {'x': 1})
    srv = http_server(mirror); _mirror(monkeypatch, srv, _manifest(tmp_path/'CHECKSUMS', mirror/C10))
    with pytest.raises(DownloadError, match="refusing unsafe member '../escaped'"): get_dataset('cifar10', 'test')
    assert not (fresh_data.parent/'escaped').exists() and sorted(os.listdir(fresh_data)) == [C10]
    with tarfile.open(mirror/C10, 'w:gz') as t: _add(t, 'cifar-10-batches-py/test_batch', {'x': 1})
    (fresh_data/C10).unlink()
    _mirror(monkeypatch, srv, _manifest(tmp_path/'CHECKSUMS', mirror/C10))
    with pytest.raises(DownloadError, match=r'does not unpack to a complete cifar-10-batches-py/ \(data_batch_1'):
        get_dataset('cifar10', 'test')
    assert sorted(os.listdir(fresh_data)) == [C10]


# ---------------------------------------------------------------- CIFAR-100: official layout, and a 2-step fine-tune
def test_cifar100_download_load_and_fine_tune(fresh_data, monkeypatch, http_server, c100_source, tmp_path, one_thread):
    from afd_nb.train import TrainConfig, fine_tune
    mirror = tmp_path/'m'; mirror.mkdir()
    src = c100_source
    cifar100_archive(mirror/C100, src.x.numpy(), src.y.numpy(), src.classes, n_test=20)
    srv = http_server(mirror); _mirror(monkeypatch, srv, _manifest(tmp_path/'CHECKSUMS', mirror/C100))
    tr = get_dataset('cifar100', 'train')
    assert tr.flavour == 'full' and tr.source == fresh_data/'cifar-100-python' and len(tr.classes) == 100
    assert torch.equal(tr.x, src.x) and torch.equal(tr.y, src.y) and tr.classes == src.classes
    te = get_dataset('cifar100', 'test')
    assert torch.equal(te.x, src.x[-20:]) and srv.requests == ['/' + C100]
    cfg = TrainConfig(dataset='cifar100', arch='resnet20', checkpoint=None, n_train=32, batch_size=16, epochs=1, n_eval=8,
                      train_steps=2, eval_steps=2, eval_step_size=0.01, device='cpu', out_dir=str(tmp_path/'run'))
    r = fine_tune(cfg, progress=False)
    assert srv.requests == ['/' + C100]                                 # the loop found the unpacked folder
    hist = [h for h in r['history'] if h.get('epoch') == 1]
    assert hist and all(np.isfinite(v) for k, v in hist[-1].items() if isinstance(v, float))
    final = safe_load(tmp_path/'run'/'model_final.pt')                 # our own files load weights-only
    assert final['num_classes'] == 100 and final['state_dict']['linear.weight'].shape == (100, 64)
    ck = safe_load(tmp_path/'run'/'ckpt_last.pt')
    assert ck['step'] == 2                                              # 32 images / batch 16 = 2 steps


# ---------------------------------------------------------------- Tiny-ImageNet: the official zip
def test_tiny_imagenet_zip(fresh_data, monkeypatch, http_server, tiny_source, tmp_path):
    train, val = tiny_source
    mirror = tmp_path/'m'; mirror.mkdir()
    _, written = tiny_zip(mirror/TINY, train, val)
    srv = http_server(mirror); _mirror(monkeypatch, srv, _manifest(tmp_path/'CHECKSUMS', mirror/TINY))
    v = get_dataset('tiny_imagenet', 'test')
    assert v.source == fresh_data/'tiny-imagenet-200' and len(v) == 100 and torch.equal(v.y, val.y)
    assert torch.equal(v.x, torch.stack([_decode(written[f'val/images/val_{i}.JPEG']) for i in range(100)]))
    t = get_dataset('tiny_imagenet', 'train')
    assert len(t) == 400 and torch.equal(t.y, train.y) and t.classes == train.classes and t.meta['wnids'] == train.meta['wnids']
    w = train.meta['wnids']
    want = torch.stack([_decode(written[f'train/{w[r % 200]}/images/{w[r % 200]}_{r // 200}.JPEG']) for r in range(400)])
    assert torch.equal(t.x, want) and srv.requests == ['/' + TINY]
    _nothing_half_written(fresh_data)


# ---------------------------------------------------------------- a mirror folder for `make demo` (not a test)
def build_demo_mirror(out: Path):
    "Write OUT/mirror/ (cifar-10-python.tar.gz with the exact subset, the weights) and OUT/CHECKSUMS (for the archive)."
    out = Path(out); (out/'mirror').mkdir(parents=True, exist_ok=True)
    tr, te = get_dataset('cifar10', 'train', flavour='exact'), get_dataset('cifar10', 'test', flavour='exact')
    cifar10_archive(out/'mirror'/C10, tr.x.numpy(), tr.y.numpy(), te.x.numpy(), te.y.numpy(), tr.classes)
    for arch in PRETRAINED: shutil.copy(pretrained_path(arch), out/'mirror'/PRETRAINED[arch])
    _manifest(out/'CHECKSUMS', out/'mirror'/C10)
    print(f'wrote {out}/mirror ({", ".join(sorted(os.listdir(out/"mirror")))}) and {out}/CHECKSUMS\n'
          f'serve it:  python -m http.server 8765 --bind 127.0.0.1 --directory {out}/mirror\n'
          f'then:      AFD_MIRROR=http://127.0.0.1:8765 AFD_MIRROR_CHECKSUMS={out}/CHECKSUMS make demo')


if __name__ == '__main__':
    if len(sys.argv) != 3 or sys.argv[1] != 'mirror': sys.exit('usage: python tests/test_download.py mirror OUT_DIR')
    build_demo_mirror(Path(sys.argv[2]))
