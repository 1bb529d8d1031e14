"""Project-level guards: nbdev configuration, papermill's `parameters` tag, packaging and installing."""
import configparser, os, shutil, subprocess, sys
from pathlib import Path
import nbformat

ROOT = Path(__file__).resolve().parent.parent
HEADER = """# The exact versions behind the project's results (Python 3.11, Linux x86-64): every package in the
# dependency closure of afd_nb[dev], frozen from the environment that produced them. The Makefile installs
# with it (pip install -c constraints.txt -e ".[dev]"); settings.ini holds the compatible ranges.
# Regenerate after an upgrade: python tests/test_project.py --freeze > constraints.txt
"""


def _cfg():
    c = configparser.ConfigParser(delimiters=['=']); c.read(ROOT/'settings.ini'); return c['DEFAULT']


def test_settings_keep_tags():
    c = _cfg()
    assert c['lib_name'] == 'afd_nb' and c['nbs_path'] == 'nbs'
    assert 'tags' in c['allowed_cell_metadata_keys'].split(), 'nbdev_clean would strip papermill tags'
    assert set(c['tst_flags'].split()) == {'notest', 'slow'}


def test_nbdev_clean_keeps_parameters_tag(tmp_path):
    "Run the real nbdev_clean on a copy of the project and check the `parameters` tag survives."
    for f in ['settings.ini']: shutil.copy(ROOT/f, tmp_path/f)
    (tmp_path/'nbs').mkdir()
    nb = nbformat.v4.new_notebook()
    cell = nbformat.v4.new_code_cell('epochs = 1')
    cell.metadata['tags'] = ['parameters']; cell.metadata['scrolled'] = True
    nb.cells = [cell, nbformat.v4.new_code_cell('print(epochs)')]
    p = tmp_path/'nbs'/'x.ipynb'; nbformat.write(nb, p)
    exe = Path(sys.executable).parent/'nbdev_clean'
    subprocess.run([str(exe), '--fname', str(p)], cwd=tmp_path, check=True)
    out = nbformat.read(p, as_version=4)
    assert out.cells[0].metadata.get('tags') == ['parameters']
    assert 'scrolled' not in out.cells[0].metadata   # nbdev_clean really ran


def test_experiment_notebooks_have_parameters_cell():
    nbs = sorted((ROOT/'experiments').glob('*.ipynb'))
    for p in nbs:
        nb = nbformat.read(p, as_version=4)
        tagged = [c for c in nb.cells if 'parameters' in c.metadata.get('tags', [])]
        assert len(tagged) == 1, f'{p.name} needs exactly one cell tagged parameters'


def test_no_executed_notebooks_in_nbs():
    assert not list((ROOT/'nbs').rglob('*.ipynb_checkpoints')), 'stray checkpoints in nbs/'
    assert not (ROOT/'nbs'/'runs').exists()


# ---------------------------------------------------------------- packaging (issue 9 §3)
def _reqs(key: str) -> list[str]:
    return _cfg()[key].split()


def _constraints() -> dict:
    out = {}
    for l in (ROOT/'constraints.txt').read_text().splitlines():
        if l.strip() and not l.startswith('#'):
            name, ver = l.split('==')
            out[_norm(name)] = ver.strip()
    return out


def _norm(name: str) -> str:
    import re
    return re.sub(r'[-_.]+', '-', name).lower()


def test_requirements_are_ranges_and_the_constraints_fit_them():
    "Users get compatible ranges (no exact pins); constraints.txt pins a version inside every range."
    from packaging.requirements import Requirement
    pins = _constraints()
    for r in map(Requirement, _reqs('requirements') + _reqs('dev_requirements')):
        ops = {s.operator for s in r.specifier}
        assert '==' not in ops and ops & {'>=', '~=', '>'}, f'{r}: give a compatible range with a lower bound'
        assert _norm(r.name) in pins, f'{r.name} is not pinned in constraints.txt'
        assert r.specifier.contains(pins[_norm(r.name)], prereleases=True), f'constraints.txt {r.name}=={pins[_norm(r.name)]} is outside {r}'
    assert any(_norm(Requirement(r).name) == 'nbdev' and str(Requirement(r).specifier) in ('<3,>=2.4', '>=2.4,<3')
               for r in _reqs('requirements'))


def freeze() -> str:
    "constraints.txt for this environment: every installed package in the dependency closure of afd_nb[dev]."
    import re
    from importlib import metadata
    name_of = lambda req: _norm(re.split(r'[ ;<>=!~\[(]', req.strip(), maxsplit=1)[0])
    dists = {_norm(d.metadata['Name']): d for d in metadata.distributions()}
    todo, seen = [name_of(r) for r in _reqs('requirements') + _reqs('dev_requirements')], set()
    while todo:
        n = todo.pop()
        if n in seen or n not in dists: continue
        seen.add(n); todo += [name_of(r) for r in (dists[n].requires or []) if 'extra ==' not in r]
    return '\n'.join(f"{dists[n].metadata['Name']}=={dists[n].version}" for n in sorted(seen))


def test_the_project_environment_is_what_constraints_says():
    "In the environment `make` builds from constraints.txt, every package of the closure has the pinned version."
    if not (Path(sys.prefix).resolve() == (ROOT/'.venv').resolve()):
        import pytest; pytest.skip(f'not the project .venv ({sys.prefix})')
    pins = _constraints()
    for l in freeze().splitlines():
        name, ver = l.split('==')
        assert pins.get(_norm(name)) == ver, f'{name} {ver} installed, constraints.txt says {pins.get(_norm(name))}'


def test_import_is_light_and_documented():
    "`import afd_nb` loads no torch (modules load on first use); help(afd_nb) starts with the package's description."
    code = ("import sys, afd_nb; assert 'torch' not in sys.modules, 'torch imported'; "
            "assert afd_nb.__doc__.startswith('afd_nb: a notebook-first reproduction of AFD'); "
            "from afd_nb.train import TrainConfig; assert afd_nb.train.TrainConfig is TrainConfig; print(afd_nb.__version__)")
    r = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == _cfg()['version']


def test_init_docstring_survives_nbdev_export(tmp_path):
    "nbdev_export rewrites __version__ in afd_nb/__init__.py (put_version_in_init); the docstring must stay first."
    import ast
    (tmp_path/'afd_nb').mkdir()
    shutil.copy(ROOT/'afd_nb'/'__init__.py', tmp_path/'afd_nb'/'__init__.py')
    r = subprocess.run([sys.executable, '-c', f"from nbdev.config import update_version; update_version({str(tmp_path/'afd_nb')!r})"],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    src = (tmp_path/'afd_nb'/'__init__.py').read_text()
    assert ast.get_docstring(ast.parse(src)).startswith('afd_nb: a notebook-first reproduction of AFD')
    assert src.count('__version__ = ') == 1 and f'__version__ = "{_cfg()["version"]}"' in src


def test_non_editable_install_runs_afd_sweep_from_anywhere(tmp_path):
    "sdist -> `pip install --target` (no editable link to this checkout): the installed afd-sweep finds the shipped notebooks."
    src = tmp_path/'src'
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns('.git', '.venv', 'runs', 'tmp', '_docs', '_proc', 'data', 'build',
                                                             '*.egg-info', '__pycache__', '.pytest_cache'))
    r = subprocess.run([sys.executable, '-m', 'build', '--sdist', '--no-isolation', '--outdir', str(tmp_path/'dist'), str(src)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    sdist, = (tmp_path/'dist').glob('afd_nb-*.tar.gz')
    site = tmp_path/'site'
    r = subprocess.run([sys.executable, '-m', 'pip', 'install', '-q', '--no-deps', '--no-build-isolation', '--no-index',
                        '--target', str(site), str(sdist)], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert sorted(p.name for p in (site/'afd_nb'/'experiments').glob('*.ipynb')) == \
        sorted(p.name for p in (ROOT/'experiments').glob('*.ipynb'))
    work = tmp_path/'elsewhere'; work.mkdir()
    shutil.copy(ROOT/'configs'/'smoke.yaml', work/'smoke.yaml')
    env = {**os.environ, 'PYTHONPATH': str(site)}          # only the installed copy (dependencies from this interpreter)
    r = subprocess.run([str(site/'bin'/'afd-sweep'), 'smoke.yaml', '--dry-run'], capture_output=True, text=True, cwd=work, env=env)
    assert r.returncode == 0, r.stderr
    assert f"against the notebooks in {site/'afd_nb'/'experiments'}" in r.stdout and 'cifar10-resnet20-afd-a0.05-b0.25-g25-s0' in r.stdout
    r = subprocess.run([sys.executable, '-m', 'afd_nb.sweep', 'smoke.yaml', '--dry-run'], capture_output=True, text=True, cwd=work, env=env)
    assert r.returncode == 0 and str(site/'afd_nb'/'experiments') in r.stdout, r.stderr


if __name__ == '__main__' and sys.argv[1:] == ['--freeze']:   # python tests/test_project.py --freeze > constraints.txt
    print(HEADER + freeze())
