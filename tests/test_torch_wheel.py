"""tools/torch_wheel.py, the Makefile's choice of PyTorch wheel: the CPU index without nvidia-smi, the default index
with it, the TORCH_INDEX override, and the one-line fallback when the chosen index cannot be reached. A fake
`nvidia-smi` and a fake `pip` on PATH stand in for the real ones; the only network is a 127.0.0.1 server the test
starts (or a closed port on 127.0.0.1 for an unreachable index)."""
import http.server, os, socket, subprocess, sys, threading
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parent.parent
TOOL = ROOT / 'tools' / 'torch_wheel.py'
sys.path.insert(0, str(ROOT / 'tools'))
import torch_wheel as T  # noqa: E402


def _bin(tmp_path, nvidia: bool) -> Path:
    "A PATH folder with a fake pip (records its arguments) and, if `nvidia`, a fake nvidia-smi."
    b = tmp_path / 'bin'; b.mkdir(exist_ok=True)
    pip = b / 'fakepip'
    if not pip.exists(): pip.write_text(f'#!/bin/sh\necho "$@" >> {tmp_path / "pip.log"}\n'); pip.chmod(0o755)
    if nvidia:
        n = b / 'nvidia-smi'; n.write_text('#!/bin/sh\nexit 0\n'); n.chmod(0o755)
    return b


def _run(tmp_path, index: str | None, nvidia: bool, extra=()):
    b = _bin(tmp_path, nvidia)
    env = dict(os.environ, PATH=f'{b}:/usr/bin:/bin')   # no other nvidia-smi: /usr/bin and /bin only
    args = [sys.executable, str(TOOL), '--pip', str(b / 'fakepip'), '--timeout', '3', *extra]
    if index is not None: args += ['--index', index]
    r = subprocess.run(args, env=env, capture_output=True, text=True, timeout=60)
    log = tmp_path / 'pip.log'
    return r, (log.read_text().split() if log.exists() else None)


def _closed_port() -> int:
    with socket.socket() as s: s.bind(('127.0.0.1', 0)); return s.getsockname()[1]   # closed once the block ends


@pytest.fixture
def index_server(tmp_path):
    "A 127.0.0.1 HTTP server with a `torch/` project page: a reachable wheel index."
    root = tmp_path / 'index'; (root / 'torch').mkdir(parents=True)
    (root / 'torch' / 'index.html').write_text('<html><body></body></html>')
    handler = lambda *a, **k: http.server.SimpleHTTPRequestHandler(*a, directory=str(root), **k)
    srv = http.server.ThreadingHTTPServer(('127.0.0.1', 0), handler)
    srv.RequestHandlerClass.log_message = lambda *a: None
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f'http://127.0.0.1:{srv.server_address[1]}/'
    srv.shutdown(); srv.server_close()


def test_choice_without_and_with_nvidia_smi(tmp_path, monkeypatch):
    monkeypatch.setenv('PATH', '/nonexistent')
    assert T.choose_index('auto') == T.CPU_INDEX and T.choose_index('') == T.CPU_INDEX
    monkeypatch.setenv('PATH', str(_bin(tmp_path, nvidia=True)))
    assert T.choose_index('auto') is None
    assert T.choose_index('cpu') == T.CPU_INDEX                 # the override wins over the driver check
    assert T.choose_index('default') is None
    assert T.choose_index('http://127.0.0.1:9/simple/') == 'http://127.0.0.1:9/simple'
    with pytest.raises(ValueError, match='TORCH_INDEX'): T.choose_index('cuda')


def test_pins_come_from_constraints(tmp_path):
    c = tmp_path / 'c.txt'; c.write_text('numpy==2.0\ntorch==2.9.1\ntorchattacks==3.5.1\ntorchvision==0.24.1\n')
    assert T.pinned(c) == ['torch==2.9.1', 'torchvision==0.24.1']
    assert T.pinned(tmp_path / 'missing.txt') == ['torch', 'torchvision']
    pins = T.pinned()
    assert all('==' in p for p in pins), pins                   # the repository's constraints pin both


def test_driver_present_installs_nothing_here(tmp_path):
    r, pip = _run(tmp_path, None, nvidia=True)
    assert r.returncode == 0 and pip is None, (r.stdout, r.stderr)
    assert 'default index' in r.stdout and 'nvidia-smi found' in r.stdout


def test_no_driver_unreachable_index_falls_back_in_one_line(tmp_path):
    url = f'http://127.0.0.1:{_closed_port()}/whl/cpu'
    r, pip = _run(tmp_path, url, nvidia=False)
    assert r.returncode == 0 and pip is None, (r.stdout, r.stderr)
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 1 and 'cannot be reached' in lines[0] and 'default' in lines[0] and url in lines[0], lines


def test_reachable_index_installs_torch_from_it(tmp_path, index_server):
    r, pip = _run(tmp_path, index_server, nvidia=False)
    assert r.returncode == 0, r.stderr
    assert pip[:4] == ['install', '-q', '--no-deps', '--index-url'] and pip[4] == index_server.rstrip('/'), pip
    assert [p.split('==')[0] for p in pip[5:]] == ['torch', 'torchvision'], pip


def test_default_override_with_no_driver(tmp_path, index_server):
    r, pip = _run(tmp_path, 'default', nvidia=False)
    assert r.returncode == 0 and pip is None and 'TORCH_INDEX=default' in r.stdout


def test_failed_install_falls_back(tmp_path, index_server):
    b = _bin(tmp_path, nvidia=False)
    (b / 'fakepip').write_text('#!/bin/sh\nexit 1\n')
    r, _ = _run(tmp_path, index_server, nvidia=False)
    assert r.returncode == 0 and 'failed; falling back' in r.stdout, r.stdout


def test_bad_setting_is_one_clear_error(tmp_path):
    r, pip = _run(tmp_path, 'gpu', nvidia=False)
    assert r.returncode == 2 and pip is None
    assert r.stderr.strip().count('\n') == 0 and 'TORCH_INDEX' in r.stderr


def test_makefile_calls_it_before_the_install():
    mk = (ROOT / 'Makefile').read_text()
    assert 'TORCH_INDEX ?= auto' in mk
    i, j = mk.index('tools/torch_wheel.py --index "$(TORCH_INDEX)"'), mk.index('-c constraints.txt -e ".[dev]"')
    assert i < j
