"""Several processes using one empty data folder at once, as `make demo` (a 2-job sweep) does on a fresh machine:
a cross-process lock per file, so that the archive is fetched once and unpacked once and every process gets it;
leftovers of killed processes; downloads larger than the file they should be; the line that says a mirror's checksum
replaces the pinned one; a raw OSError never reaching the user.

Every server here is started by the test on 127.0.0.1. The archives of the lock tests are small official-layout
CIFAR-10 archives of synthetic images (their checksum is pinned through AFD_MIRROR_CHECKSUMS); the 2-job sweep uses
real images and the real ResNet-20 weights, and skips with the reason where they are absent."""
import hashlib, json, os, shutil, subprocess, sys, tarfile, threading, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
import numpy as np
import pytest
from conftest import obtain as obtain_or_skip
import afd_nb.download as DL
from afd_nb.download import REMOTES, DownloadError, obtain
from test_download import C10, _manifest, cifar10_archive

ROOT = Path(__file__).resolve().parent.parent
R20 = 'resnet20-12fca82f.th'


# ---------------------------------------------------------------- a server that counts, and can be slow or oversized
class _Handler(BaseHTTPRequestHandler):
    "Serves the server's folder. `slow`: the body in 20 pieces, 0.05 s apart. `no_length`: no Content-Length header."
    def log_message(self, *a): pass

    def do_GET(self):
        srv = self.server
        with srv.lock: srv.requests.append(self.path)
        p = srv.folder/self.path.lstrip('/')
        if not p.is_file(): return self.send_error(404)
        body = p.read_bytes()
        self.send_response(200)
        if not srv.no_length: self.send_header('Content-Length', str(len(body)))
        else: self.send_header('Connection', 'close')
        self.end_headers()
        k = max(1, len(body) // 20) if srv.slow else len(body)
        try:
            for i in range(0, len(body), k):
                self.wfile.write(body[i:i + k])
                if srv.slow: time.sleep(0.05)
        except (BrokenPipeError, ConnectionResetError): pass     # the client cut the download off


@pytest.fixture
def server():
    made = []
    def serve(folder, slow=False, no_length=False):
        srv = ThreadingHTTPServer(('127.0.0.1', 0), _Handler)
        srv.folder, srv.slow, srv.no_length, srv.requests, srv.lock = Path(folder), slow, no_length, [], threading.Lock()
        srv.url = f'http://127.0.0.1:{srv.server_address[1]}'
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        made.append(srv)
        return srv
    yield serve
    for s in made: s.shutdown(); s.server_close()


def _synthetic_mirror(folder: Path, n_train=64, n_test=32) -> tuple[Path, Path, np.ndarray]:
    "An official-layout cifar-10-python.tar.gz of random images in folder/mirror, and a manifest pinning its md5."
    (folder/'mirror').mkdir(parents=True)
    rng = np.random.default_rng(0)
    xtr, xte = (rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8) for n in (n_train, n_test))
    ytr, yte = np.arange(n_train) % 10, np.arange(n_test) % 10
    cifar10_archive(folder/'mirror'/C10, xtr, ytr, xte, yte, [f'class{i}' for i in range(10)])
    return folder/'mirror', _manifest(folder/'CHECKSUMS', folder/'mirror'/C10), xte


def _env(srv, manifest: Path) -> dict:
    "A child's environment: this checkout's package, no AFD_DATA, the mirror and its manifest."
    env = {k: v for k, v in os.environ.items() if not k.startswith('AFD_')}
    return {**env, 'PYTHONPATH': str(ROOT), 'AFD_MIRROR': srv.url, 'AFD_MIRROR_CHECKSUMS': str(manifest), 'OMP_NUM_THREADS': '1'}


_CHILD = """
import sys, hashlib
from pathlib import Path
import afd_nb.download as D
from afd_nb.data import get_dataset
D.project_data_dir = lambda: Path(sys.argv[1])      # only the empty folder: not this checkout's data/
sys.stdin.read(1)                                   # every child starts when the test says go
ds = get_dataset('cifar10', 'test')
print(len(ds), hashlib.md5(ds.x.numpy().tobytes()).hexdigest(), ds.source)
"""


# ---------------------------------------------------------------- the lock
def test_four_processes_fetch_the_archive_once(tmp_path, server):
    "4 processes ask for the same missing archive at once: all get it, the server sends it once, nothing is left over."
    mirror, manifest, xte = _synthetic_mirror(tmp_path)
    srv = server(mirror, slow=True)                     # ~1 s per download: the four requests overlap
    data = tmp_path/'data'; data.mkdir()
    env = _env(srv, manifest)
    ps = [subprocess.Popen([sys.executable, '-c', _CHILD, str(data)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path) for _ in range(4)]
    for p in ps: p.stdin.write('g'); p.stdin.close()
    outs = [(p.wait(timeout=300), p.stdout.read(), p.stderr.read()) for p in ps]
    for rc, out, err in outs: assert rc == 0, err
    want = f'{len(xte)} {hashlib.md5(xte.tobytes()).hexdigest()} {data/"cifar-10-batches-py"}'
    assert [o.strip() for _, o, _ in outs] == [want] * 4
    assert srv.requests == ['/' + C10]                  # fetched once, by one process
    assert sum('fetching cifar-10-python.tar.gz' in e for _, _, e in outs) == 1
    assert sorted(os.listdir(data)) == ['cifar-10-batches-py', C10]   # no lock file, no .part, no .unpack folder left


def test_a_process_that_waited_uses_the_file(fresh_data, monkeypatch, server, tmp_path, capfd):
    "While another process holds the lock, obtain waits; then it finds the archive unpacked and fetches nothing."
    mirror, manifest, _ = _synthetic_mirror(tmp_path)
    srv = server(mirror)
    monkeypatch.setenv('AFD_MIRROR', srv.url); monkeypatch.setenv('AFD_MIRROR_CHECKSUMS', str(manifest))
    fresh_data.mkdir()
    holder = subprocess.Popen([sys.executable, '-c', 'import sys, afd_nb.download as D; from pathlib import Path\n'
                               'with D._locked(Path(sys.argv[1]), sys.argv[2]): print("held", flush=True); sys.stdin.read(1)',
                               str(fresh_data), C10], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                              env={**os.environ, 'PYTHONPATH': str(ROOT)})
    assert holder.stdout.readline().strip() == 'held'
    got, err = {}, ''
    t = threading.Thread(target=lambda: got.setdefault('path', obtain(C10))); t.start()
    while 'waiting for another process' not in err and t.is_alive(): time.sleep(0.05); err += capfd.readouterr().err
    assert f'afd_nb: waiting for another process that is fetching or unpacking {C10} in {fresh_data}{os.sep}' in err
    assert t.is_alive() and srv.requests == []          # waiting for the lock, not fetching
    DL.unpack(DL.fetch(REMOTES[C10], fresh_data, progress=False), REMOTES[C10], fresh_data, progress=False)  # the holder's work
    holder.stdin.write('x'); holder.stdin.close(); holder.wait(timeout=60)
    t.join(timeout=60)
    assert got['path'] == fresh_data/'cifar-10-batches-py' and srv.requests == ['/' + C10]   # the one fetch above


def test_complete_folder_already_there_is_success(tmp_path):
    "unpack finding a complete folder (unpacked by another process) returns it; an incomplete one is named."
    mirror, _, _ = _synthetic_mirror(tmp_path)
    r = REMOTES[C10]
    d = tmp_path/'d'; d.mkdir()
    first = DL.unpack(mirror/C10, r, d, progress=False)
    assert DL.unpack(mirror/C10, r, d, progress=False) == first == d/'cifar-10-batches-py'
    (first/'test_batch').unlink()
    with pytest.raises(DownloadError, match=f'{first} exists but is incomplete; move it away or delete it'):
        DL.unpack(mirror/C10, r, d, progress=False)


def test_no_raw_oserror(tmp_path, monkeypatch):
    "A file system error while unpacking is a DownloadError with one line naming the folder and what to do."
    mirror, _, _ = _synthetic_mirror(tmp_path)
    d = tmp_path/'d'; d.mkdir()
    (d/f'.cifar-10-batches-py.unpack{os.getpid()}').write_text('a file where the temporary folder goes')
    with pytest.raises(DownloadError) as e: DL.unpack(mirror/C10, REMOTES[C10], d, progress=False)
    msg = str(e.value)
    assert msg.startswith(f'cannot unpack {C10} into {d}{os.sep}: ') and 'set AFD_DATA to a folder you can write to' in msg
    assert '\n' not in msg
    monkeypatch.setattr(DL, 'project_data_dir', lambda: tmp_path/'data')
    monkeypatch.delenv('AFD_DATA', raising=False)
    blocker = tmp_path/'a-file'; blocker.write_text('')  # a data folder that is a file: nothing can be written there
    with pytest.raises(DownloadError) as e: obtain(R20, root=blocker, what='resnet20 weights', download=True)
    msg = str(e.value)
    assert msg.startswith(f'resnet20 weights: cannot use {blocker}/weights/ (') and msg.endswith('set AFD_DATA to a folder you can write to')
    with pytest.raises(DownloadError, match=f'cannot fetch {R20}: cannot create {blocker}/weights/'):
        DL.fetch(REMOTES[R20], blocker/'weights')


# ---------------------------------------------------------------- leftovers, oversize downloads, the mirror's checksum
def test_stale_leftovers_of_dead_processes_are_removed(fresh_data, monkeypatch, server, tmp_path):
    mirror, manifest, _ = _synthetic_mirror(tmp_path)
    srv = server(mirror)
    monkeypatch.setenv('AFD_MIRROR', srv.url); monkeypatch.setenv('AFD_MIRROR_CHECKSUMS', str(manifest))
    dead = subprocess.Popen([sys.executable, '-c', '']); dead.wait()           # a process id that no process has now
    alive = subprocess.Popen([sys.executable, '-c', 'import sys; sys.stdin.read()'], stdin=subprocess.PIPE)
    try:
        fresh_data.mkdir()
        for pid in (dead.pid, alive.pid):
            (fresh_data/f'.{C10}.part{pid}').write_bytes(b'half a download')
            (fresh_data/f'.cifar-10-batches-py.unpack{pid}'/'cifar-10-batches-py').mkdir(parents=True)
        assert obtain(C10) == fresh_data/'cifar-10-batches-py'
        assert sorted(os.listdir(fresh_data)) == sorted(['cifar-10-batches-py', C10, f'.{C10}.part{alive.pid}',
                                                         f'.cifar-10-batches-py.unpack{alive.pid}'])   # the live one's: kept
    finally: alive.stdin.close(); alive.wait()


@pytest.mark.parametrize('no_length', [False, True])
def test_download_larger_than_the_pinned_size_is_cut_off(fresh_data, monkeypatch, server, tmp_path, no_length):
    "A server sending more bytes than the pinned size: refused from its Content-Length, or cut off while reading."
    mirror = tmp_path/'m'; mirror.mkdir()
    limit = REMOTES[R20].size
    (mirror/R20).write_bytes(b'\0' * (limit + (3 << 20)))
    srv = server(mirror, no_length=no_length)
    monkeypatch.setenv('AFD_MIRROR', srv.url)
    with pytest.raises(DownloadError) as e: obtain(R20)
    msg = str(e.value)
    assert f'{R20} from {srv.url}/{R20} is larger than the {limit:,} bytes it should be (the server ' in msg
    assert 'cut off, nothing was kept' in msg and len(srv.requests) == 1        # not retried
    assert os.listdir(fresh_data/'weights') == []
    n = int(msg.split('(the server ')[1].split()[1 if no_length else 1].replace(',', ''))
    if no_length: assert 'sent' in msg and limit < n <= limit + (1 << 20)      # it stopped within a chunk of the limit
    else: assert f'announces {limit + (3 << 20):,} bytes' in msg


def test_mirror_checksum_replacing_the_pinned_one_is_said(fresh_data, monkeypatch, server, tmp_path, capfd):
    mirror, manifest, _ = _synthetic_mirror(tmp_path)
    srv = server(mirror)
    monkeypatch.setenv('AFD_MIRROR', srv.url); monkeypatch.setenv('AFD_MIRROR_CHECKSUMS', str(manifest))
    obtain(C10)
    err = capfd.readouterr().err.splitlines()
    md5 = manifest.read_text().split()[0]
    said = [l for l in err if 'replaces the pinned' in l]
    assert said == [f'afd_nb: {C10}: the checksum md5:{md5} from AFD_MIRROR_CHECKSUMS={manifest} replaces the pinned '
                    f'{REMOTES[C10].checksum}']


# ---------------------------------------------------------------- make demo's own path: a 2-job sweep on an empty data folder
def test_two_job_sweep_on_an_empty_data_folder(tmp_path, server, cifar10_train, cifar10_test):
    """Two tiny fine-tunes (vaft, afd) started together by run_sweep(jobs=2), from a package copy without a data folder,
    through a mirror serving a small real CIFAR-10 archive and the ResNet-20 weights: both finish, each file fetched once."""
    from afd_nb.models import pretrained_path
    w = obtain_or_skip('ResNet-20 weights', lambda dl: pretrained_path('resnet20', download=dl))
    mirror = tmp_path/'mirror'; mirror.mkdir()
    cifar10_archive(mirror/C10, cifar10_train.x[:64].numpy(), cifar10_train.y[:64].numpy(), cifar10_test.x[:16].numpy(),
                    cifar10_test.y[:16].numpy(), cifar10_train.classes)
    shutil.copy(w, mirror/R20)
    manifest = _manifest(tmp_path/'CHECKSUMS', mirror/C10)
    site = tmp_path/'site'; shutil.copytree(ROOT/'afd_nb', site/'afd_nb', ignore=shutil.ignore_patterns('__pycache__'))
    srv = server(mirror, slow=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith('AFD_')}
    env.update(PYTHONPATH=str(site), XDG_CACHE_HOME=str(tmp_path/'cache'), AFD_MIRROR=srv.url,
               AFD_MIRROR_CHECKSUMS=str(manifest), OMP_NUM_THREADS='1')   # an installed copy: data in $XDG_CACHE_HOME/afd_nb
    cfg = dict(name='demo-tiny', notebooks=str(ROOT/'experiments'), runs_dir=str(tmp_path/'runs'), stages=['finetune'], jobs=2,
               defaults=dict(dataset='cifar10', flavour='exact', arch='resnet20', checkpoint='pretrained', n_train=32,
                             batch_size=16, epochs=1, n_eval=8, train_steps=1, eval_steps=1, eval_at_start=False,
                             device='cpu', seed=0),
               grid=dict(method=['vaft', 'afd']))
    code = ('import json, sys; from afd_nb.sweep import run_sweep\n'
            'r = run_sweep(json.loads(sys.argv[1]), report=False, log=lambda s: print(s, flush=True))\n'
            'print("RESULT", json.dumps(dict(done=r["done"], failed=r["failed"])))')
    p = subprocess.run([sys.executable, '-c', code, json.dumps(cfg)], env=env, cwd=tmp_path, capture_output=True, text=True,
                       timeout=900)
    assert p.returncode == 0, p.stdout + p.stderr
    res = json.loads(p.stdout.split('RESULT ', 1)[1])
    assert res['failed'] == {} and len(res['done']) == 2, p.stdout
    assert sorted(srv.requests) == sorted(['/' + C10, '/' + R20])         # each file fetched once, for both runs
    data = tmp_path/'cache'/'afd_nb'
    assert sorted(os.listdir(data)) == ['cifar-10-batches-py', C10, 'weights'] and os.listdir(data/'weights') == [R20]
    for rid in res['done']:
        assert json.loads((tmp_path/'runs'/'demo-tiny'/rid/'status.json').read_text())['state'] == 'done'
