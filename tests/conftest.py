"""Shared fixtures. Data and weights are looked for where the package looks (an explicit root, $AFD_DATA, the project's
data folder) and fetched from the official archives where downloads are allowed (the default; AFD_DOWNLOAD=0 turns
them off). A file that is missing and cannot be fetched -- always the case for the files no official archive provides
(the JPEG copy of CIFAR-10, the CIFAR-100 sample, the Tiny-ImageNet npz parts) -- skips its test with the reason
printed, except under AFD_REQUIRE_DATA=1 (our CI), where it is a failure."""
import os
from pathlib import Path
import pytest
import torch

REQUIRE = os.environ.get('AFD_REQUIRE_DATA') == '1'


def _skip_or_fail(msg: str):
    if REQUIRE: pytest.fail(msg + '\n(AFD_REQUIRE_DATA=1: data tests may not skip)')
    print(msg); pytest.skip(msg)


def obtain(what: str, fn):
    "Return fn(None) -- None lets the package fetch what is missing where allowed -- or skip (fail under AFD_REQUIRE_DATA=1)."
    from afd_nb.download import DataNotFoundError
    try:
        return fn(None)
    except (DataNotFoundError, OSError) as e:  # OSError: any other failure to read or fetch
        _skip_or_fail(f'{what} not available: {e}')


def local_file(fname: str) -> Path:
    "Path of a file that no official archive provides (e.g. cifar10_jpeg.npz), from the data folders -- or skip (fail under AFD_REQUIRE_DATA=1)."
    from afd_nb.download import data_roots
    for r in data_roots():
        if (r/fname).is_file(): return r/fname
    _skip_or_fail(f'{fname} not found in {", ".join(map(str, data_roots()))}: no official archive provides it '
                  '(set AFD_DATA to a folder holding it to run this test)')


@pytest.fixture(scope='session')
def cifar10_test():
    "The exact CIFAR-10 test subset: official test[0:1000]."
    from afd_nb.data import get_dataset
    return obtain('CIFAR-10 exact test subset', lambda dl: get_dataset('cifar10', 'test', flavour='exact', download=dl))


@pytest.fixture(scope='session')
def cifar10_train():
    "The exact CIFAR-10 train subset: official train[0:4000]."
    from afd_nb.data import get_dataset
    return obtain('CIFAR-10 exact train subset', lambda dl: get_dataset('cifar10', 'train', flavour='exact', download=dl))


@pytest.fixture(scope='session')
def resnet20():
    "The naturally trained CIFAR-10 ResNet-20 (akamaster weights), in eval mode."
    from afd_nb.models import load_pretrained
    return obtain('ResNet-20 weights', lambda dl: load_pretrained('resnet20', download=dl)).eval()


@pytest.fixture(scope='module')
def one_thread():
    "Small convolutions: one thread is fastest and avoids oversubscribing a shared 2-core machine (restored after)."
    n = torch.get_num_threads(); torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ---------------------------------------------------------------- a local HTTP server for the download tests
def _make_handler():
    from http.server import SimpleHTTPRequestHandler

    class Handler(SimpleHTTPRequestHandler):
        """Serves files from the server's folder. Modes: 'ok'; 'corrupt' (one byte flipped); 'drop' (announce the full
        length, send half, close). With `server.bad` = k, only the first k requests get the mode."""
        def log_message(self, *a): pass

        def do_GET(self):
            srv = self.server
            p = Path(srv.folder)/self.path.lstrip('/')
            srv.requests.append(self.path)
            if not p.is_file(): return self.send_error(404)
            body = p.read_bytes()
            mode = srv.mode if srv.bad is None or len(srv.requests) <= srv.bad else 'ok'
            if mode == 'corrupt': body = body[:100] + bytes([body[100] ^ 1]) + body[101:]
            self.send_response(200); self.send_header('Content-Length', str(len(body))); self.end_headers()
            self.wfile.write(body[:len(body) // 2] if mode == 'drop' else body)
    return Handler


@pytest.fixture
def http_server():
    "A factory: serve(folder, mode='ok', bad=None) starts a server on 127.0.0.1 (a free port) with `.url` and `.requests`."
    import threading
    from http.server import ThreadingHTTPServer
    servers = []

    def serve(folder, mode='ok', bad=None):
        srv = ThreadingHTTPServer(('127.0.0.1', 0), _make_handler())
        srv.folder, srv.mode, srv.bad, srv.requests = Path(folder), mode, bad, []
        srv.url = f'http://127.0.0.1:{srv.server_address[1]}'
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        servers.append(srv)
        return srv
    yield serve
    for s in servers: s.shutdown(); s.server_close()


@pytest.fixture
def fresh_data(tmp_path, monkeypatch):
    "A machine with no data: AFD_DATA unset, an empty project data folder (tmp/data), no mirror, downloads on, no retry wait."
    import afd_nb.download as DL
    for k in ('AFD_DATA', 'AFD_DOWNLOAD', 'AFD_MIRROR', 'AFD_MIRROR_CHECKSUMS'): monkeypatch.delenv(k, raising=False)
    monkeypatch.setattr(DL, 'project_data_dir', lambda: tmp_path/'data')
    monkeypatch.setattr(DL, '_RETRY_WAIT', 0.0)
    return tmp_path/'data'
