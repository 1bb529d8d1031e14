"""Project-level guards: nbdev configuration and papermill's `parameters` tag."""
import configparser, shutil, subprocess, sys
from pathlib import Path
import nbformat

ROOT = Path(__file__).resolve().parent.parent


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
