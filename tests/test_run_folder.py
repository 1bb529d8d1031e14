"""afd_nb.run_folder: the run-folder vocabulary that the checkpoint layer, the sweep and the report share (issue 20:
one home, no import circle), and its atomic writes on a full disk."""
import ast, errno, subprocess, sys
from pathlib import Path
import pytest
from afd_nb.run_folder import DiskFullError, RUNTIME_KEYS, _atomic_write, atomic_write_text, read_json, run_id

ROOT = Path(__file__).resolve().parent.parent


def _module_imports(name: str) -> set[str]:
    "The afd_nb modules that afd_nb/<name>.py imports at module level (not inside functions)."
    tree = ast.parse((ROOT / 'afd_nb' / f'{name}.py').read_text())
    found = set()
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and node.level == 1: found.add(node.module)
        elif isinstance(node, ast.ImportFrom) and (node.module or '').startswith('afd_nb.'): found.add(node.module.split('.', 1)[1])
        elif isinstance(node, ast.Import): found |= {a.name.split('.', 1)[1] for a in node.names if a.name.startswith('afd_nb.')}
    return found


def test_no_circle_between_sweep_and_report():
    assert 'report' not in _module_imports('sweep') and 'sweep' not in _module_imports('report')
    assert 'run_folder' in _module_imports('sweep') and 'run_folder' in _module_imports('report')
    code = "import sys, afd_nb.report; assert 'afd_nb.sweep' not in sys.modules, 'report imported sweep'"
    r = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    r = subprocess.run([sys.executable, '-c', "import sys, afd_nb.run_folder; print([m for m in ('torch', 'pandas', 'matplotlib') if m in sys.modules])"],
                       capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.stdout.strip() == '[]', r.stdout + r.stderr[-2000:]


def test_old_names_still_importable_from_sweep():
    import afd_nb.sweep as S, afd_nb.checkpoint as C
    assert S.run_id is run_id and S.RUNTIME_KEYS is RUNTIME_KEYS and S._read_json is read_json and S._atomic_write_text is atomic_write_text
    assert C.atomic_write_text is atomic_write_text and C.DiskFullError is DiskFullError
    assert {'run_id', 'RUNTIME_KEYS'} <= set(S.__all__) and {'atomic_write_text', 'DiskFullError'} <= set(C.__all__)


@pytest.mark.parametrize('error', [OSError(errno.ENOSPC, 'No space left on device'), OSError(errno.EDQUOT, 'Disk quota exceeded'),
                                   RuntimeError('[enforce fail at inline_container.cc:672] . unexpected pos 3111808 vs 3111696')])
def test_full_disk_is_one_line_and_leaves_the_old_file(tmp_path, error):
    atomic_write_text(tmp_path / 'status.json', '{"state": "done"}')
    def write(f): f.write(b'x' * 1000); raise error
    with pytest.raises(DiskFullError) as e: _atomic_write(tmp_path / 'status.json', write)
    msg = str(e.value)
    assert '\n' not in msg and str(tmp_path / 'status.json') in msg and f'Free space in {tmp_path}' in msg and 'MiB free' in msg
    assert e.value.errno == errno.ENOSPC
    assert read_json(tmp_path / 'status.json') == {'state': 'done'} and [p.name for p in tmp_path.iterdir()] == ['status.json']


def test_other_write_errors_are_not_called_a_full_disk(tmp_path):
    def write(f): raise OSError(errno.EACCES, 'Permission denied')
    with pytest.raises(PermissionError): _atomic_write(tmp_path / 'x.json', write)
    def write(f): raise RuntimeError('something else')
    with pytest.raises(RuntimeError, match='something else'): _atomic_write(tmp_path / 'x.json', write)
    assert list(tmp_path.iterdir()) == []


def test_read_json_defaults(tmp_path):
    (tmp_path / 'bad.json').write_text('{"state": ')
    assert read_json(tmp_path / 'bad.json', 'dflt') == 'dflt' and read_json(tmp_path / 'none.json') is None
