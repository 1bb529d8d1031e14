#!/usr/bin/env python
"""Which PyTorch wheel `make` installs, before the rest of the environment (called by the Makefile).

    python tools/torch_wheel.py [--index auto|default|cpu|URL] [--pip "CMD"] [--dry-run]

On a machine without an NVIDIA driver (no `nvidia-smi` on PATH) pip's default `torch` wheel brings several GB of
CUDA libraries that can never run there. So `auto` (the default) picks PyTorch's CPU wheel index when `nvidia-smi`
is missing, and pip's default index otherwise. `default` always leaves torch to the ordinary install step; `cpu`
always asks for the CPU index; any other value is taken as the URL of a wheel index. The Makefile passes its
variable `TORCH_INDEX` (`make demo TORCH_INDEX=default`).

With an index chosen, torch and torchvision are installed from it first, at the versions of constraints.txt and
without dependencies (those, and everything else, come from the default index in the next step; pip keeps the
installed `2.x.y+cpu` because a `==2.x.y` constraint matches it). When that index cannot be reached (or the install
from it fails), one line says so and nothing is installed here: the ordinary step then installs the default wheel.
Exit status 2 only for a value of `--index` that is neither a name above nor an http(s) URL.
"""
from __future__ import annotations
import argparse, re, shlex, shutil, subprocess, sys, urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CPU_INDEX = 'https://download.pytorch.org/whl/cpu'
PACKAGES = ('torch', 'torchvision')


def choose_index(setting: str = 'auto') -> str | None:
    "The wheel index URL to install torch from, or None for pip's default index."
    s = (setting or 'auto').strip()
    if s == 'default': return None
    if s == 'cpu': return CPU_INDEX
    if s == 'auto': return None if shutil.which('nvidia-smi') else CPU_INDEX
    if re.match(r'https?://', s): return s.rstrip('/')
    raise ValueError(f'TORCH_INDEX={s!r}: use auto, default, cpu or the http(s) URL of a wheel index')


def reachable(url: str, timeout: float = 10.0) -> bool:
    "True if the index answers for its torch project page (`URL/torch/`)."
    try:
        with urllib.request.urlopen(url.rstrip('/') + '/torch/', timeout=timeout) as r: return r.status < 400
    except (OSError, ValueError):
        return False


def pinned(constraints: Path = ROOT / 'constraints.txt') -> list[str]:
    "`torch==V`, `torchvision==V` as constraints.txt pins them (bare names where it does not)."
    pins = dict(re.findall(r'^(torch|torchvision)==(\S+)', constraints.read_text(), re.M)) if constraints.exists() else {}
    return [f'{p}=={pins[p]}' if p in pins else p for p in PACKAGES]


def install(setting: str, pip: list[str], dry_run: bool = False, timeout: float = 10.0) -> str:
    "Install torch/torchvision from the chosen index; returns what was done ('default', 'fallback' or the URL)."
    url = choose_index(setting)
    if url is None:
        print(f'torch: default index (TORCH_INDEX={setting}; nvidia-smi {"found" if shutil.which("nvidia-smi") else "missing"})')
        return 'default'
    if not reachable(url, timeout):
        print(f'torch: {url} cannot be reached; falling back to the default torch wheel from the default index')
        return 'fallback'
    cmd = [*pip, 'install', '-q', '--no-deps', '--index-url', url, *pinned()]
    print('torch:', shlex.join(cmd))
    if dry_run: return url
    if subprocess.run(cmd).returncode != 0:
        print(f'torch: installing from {url} failed; falling back to the default torch wheel from the default index')
        return 'fallback'
    return url


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('--index', default='auto', help='auto (CPU wheel without nvidia-smi), default, cpu or a URL')
    ap.add_argument('--pip', default=f'{shlex.quote(sys.executable)} -m pip', help='the pip command of the environment')
    ap.add_argument('--timeout', type=float, default=10.0, help='seconds to wait for the index to answer')
    ap.add_argument('--dry-run', action='store_true', help='print the choice and the pip command, install nothing')
    a = ap.parse_args(argv)
    try: install(a.index, shlex.split(a.pip), a.dry_run, a.timeout)
    except ValueError as e:
        print(f'error: {e}', file=sys.stderr); return 2
    return 0


if __name__ == '__main__':
    sys.exit(main())
