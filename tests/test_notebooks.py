"""Every library notebook in nbs/ is committed executed: run top to bottom by `make notebooks`
(tools/run_notebooks.py), unchanged since, with every output its code produces saved, no error, and no prose
pointing at an output that is not there. The checker itself is tested first, on small notebooks with each defect."""
import copy, json, os, subprocess, sys
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / 'tools'))
import run_notebooks as R  # noqa: E402


@pytest.mark.parametrize('path', R.library_notebooks(), ids=lambda p: p.name)
def test_library_notebook_is_executed(path):
    probs = R.check_notebook(path)
    assert not probs, f'{path.name} is not fully executed:' + R.check_message(path, probs)


def test_every_library_notebook_is_checked():
    names = [p.name for p in R.library_notebooks()]
    assert 'index.ipynb' in names and names[-1] == 'index.ipynb', 'index.ipynb (the docs home page) must exist and run last'
    assert len(names) == len(set(names)) and all(n.endswith('.ipynb') for n in names)


def test_new_notebooks_are_found_and_ordered(tmp_path):
    "A notebook added to nbs/ runs without editing any list: numeric order, a lettered one after its base, index last."
    names = ['index.ipynb', '16_cpu_scale.ipynb', '10b_report.ipynb', '10_sweep.ipynb', '06b_checkpoint.ipynb', '07_baselines.ipynb',
             '06_train.ipynb', '00a_download.ipynb', '00_data.ipynb', '9_extra.ipynb', '_private.ipynb', '.hidden.ipynb']
    for n in names: (tmp_path / n).write_text('{}')
    (tmp_path / 'sub').mkdir(); (tmp_path / 'sub' / '01_nested.ipynb').write_text('{}')
    test = [p.name for p in R.library_notebooks(tmp_path)]
    assert test == ['00_data.ipynb', '00a_download.ipynb', '06_train.ipynb', '06b_checkpoint.ipynb', '07_baselines.ipynb',
                    '9_extra.ipynb', '10_sweep.ipynb', '10b_report.ipynb', '16_cpu_scale.ipynb', 'index.ipynb'], test


# ------------------------------------------------------------------ the checker on small notebooks
def _cell(src, outputs=None, kind='code'):
    if kind == 'markdown': return dict(cell_type='markdown', id='x', metadata={}, source=src)
    return dict(cell_type='code', id='x', metadata={}, source=src, outputs=outputs or [], execution_count=None)

STREAM = [dict(output_type='stream', name='stdout', text='7\n')]
RESULT = [dict(output_type='execute_result', data={'text/plain': '7'}, metadata={}, execution_count=None)]
IMAGE = [dict(output_type='display_data', data={'image/png': 'iVBORw0KGgo=', 'text/plain': '<Figure>'}, metadata={})]
ERROR = [dict(output_type='error', ename='ValueError', evalue='boom', traceback=['ValueError: boom'])]


def _nb(cells, record=True):
    nb = dict(cells=cells, metadata={}, nbformat=4, nbformat_minor=5)
    if record: nb['metadata'][R.KEY] = {'executed': dict(execution_counts=R.expected_counts(nb), digest=R.digest(nb))}
    return nb


def _probs(tmp_path, nb):
    p = tmp_path / 'nb.ipynb'; p.write_text(json.dumps(nb)); return R.check_notebook(p)


GOOD = [_cell('#| hide\nfrom fastcore.test import *\nimport matplotlib.pyplot as plt'), _cell('print(7)', STREAM), _cell('x = 7\nx', RESULT),
        _cell('fig, ax = plt.subplots()\nax.plot([1, 2]);', IMAGE),
        _cell('The figure above and the number printed above.', kind='markdown'),
        _cell('test_eq(x, 7)'), _cell('#| eval: false\nmain()'), _cell('')]


def test_checker_accepts_an_executed_notebook(tmp_path):
    assert _probs(tmp_path, _nb(copy.deepcopy(GOOD))) == []


def test_checker_finds_each_defect(tmp_path):
    def probs(edit, record_after=True):
        cells = copy.deepcopy(GOOD); edit(cells)
        return ' | '.join(_probs(tmp_path, _nb(cells, record=record_after)))
    assert 'no execution record' in probs(lambda c: None, record_after=False)
    assert 'prints, but no printed output' in probs(lambda c: c[1].update(outputs=[]))
    assert 'no result is saved' in probs(lambda c: c[2].update(outputs=[]))
    assert 'draws a figure, but no image' in probs(lambda c: c[3].update(outputs=STREAM))
    assert 'error output: ValueError: boom' in probs(lambda c: c[5].update(outputs=ERROR))
    # the prose: "the figure above" needs an image, "printed above" any output, in the nearest visible code cells
    assert 'says "figure above"' in probs(lambda c: c[3].update(outputs=[dict(output_type='stream', name='stdout', text='')]))
    assert 'says "printed above"' in probs(lambda c: [c[i].update(outputs=[]) for i in (1, 2, 3)])
    assert 'says "table below"' in probs(lambda c: c.insert(5, _cell('The table below.', kind='markdown')))
    assert 'says "the heatmap"' in probs(lambda c: c.append(_cell('Row 3 of the heatmap.', kind='markdown')))
    assert 'imports and also computes' in probs(lambda c: c[1].update(source='import math\nprint(7)'))
    hidden = [_cell('#| hide\nprint(1)', STREAM), _cell('The number printed above.', kind='markdown')]   # a docs reader cannot see it
    assert any('says "printed above"' in p for p in _probs(tmp_path, _nb(hidden)))


def test_checker_catches_edits_after_execution(tmp_path):
    nb = _nb(copy.deepcopy(GOOD))
    edited = copy.deepcopy(nb); edited['cells'][2]['source'] = 'x = 8\nx'            # code changed, old output kept
    assert any('changed after `make notebooks`' in p for p in _probs(tmp_path, edited))
    edited = copy.deepcopy(nb); edited['cells'][1]['outputs'] = [dict(STREAM[0], text='8\n')]   # output edited by hand
    assert any('changed after `make notebooks`' in p for p in _probs(tmp_path, edited))
    edited = copy.deepcopy(nb); edited['cells'][4]['source'] = 'Reworded prose.'       # prose edits need no re-run
    assert _probs(tmp_path, edited) == []
    rec = nb['metadata'][R.KEY]['executed']; rec['execution_counts'] = [None, 1, 3, 2, 4, None, None]   # out of order
    assert any('not executed top to bottom' in p for p in _probs(tmp_path, nb))


def test_cells_the_docs_build_would_rerun():
    rerun = lambda src, **kw: R.reexecuted_by_docs(_cell(src, **kw))
    assert rerun('import torch\nx = torch.zeros(3)')
    assert rerun('#| hide\nfrom afd_nb.data import get_dataset\nds = get_dataset("cifar10")')   # hidden cells run too
    assert not rerun('import torch\nfrom pathlib import Path')
    assert not rerun('import torch\ndef f(): return torch.zeros(1)')
    assert not rerun('#| export\nimport torch\nEPS = 8 / 255')                  # exported cells are library code
    assert not rerun('x = 1\nprint(x)')


def test_what_a_cell_must_show():
    assert R.expected_outputs('x = 1') == set()
    assert R.expected_outputs('x = 1\nx') == {'result'}
    assert R.expected_outputs('x = 1\nx;') == set()                       # a trailing semicolon hides the value
    assert R.expected_outputs('f(1)') == set()                            # a call's return value is unknown: no demand
    assert R.expected_outputs('test_eq(1, 1)') == set()
    assert R.expected_outputs('for i in range(3): print(i)') == {'stream'}
    assert R.expected_outputs('if flag: print(1)') == set()               # a branch may not run
    assert R.expected_outputs('def f():\n    print(1)') == set()           # defining is not calling
    assert R.expected_outputs('f()', {'f': [__import__('ast').parse('print(1)').body[0]]}) == {'stream'}
    assert R.expected_outputs('fig, ax = plt.subplots()\nax.plot([1])') == {'image'}
    assert R.expected_outputs('fig, ax = plt.subplots()\nplt.close(fig)') == set()
    assert R.expected_outputs('display(Markdown("x"))') == {'result'}
    assert R.expected_outputs('%time x = 1\nx') == {'result'}              # IPython magics are ignored, not a syntax error


def test_prose_pointers():
    kinds = lambda md: [(d, k) for _, d, k, _ in R.prose_pointers(md)]
    assert kinds('read from the output above') == [('above', 'any')]
    assert kinds('the PSNR printed above is 30 dB') == [('above', 'any')]
    assert kinds('The plot below shows') == [('below', 'image')]
    assert kinds('Below is the table of results') == [('below', 'any')]
    assert kinds('the paper plots the gap; the $x$ above; the definition above; `print` above') == []
    assert kinds('row 3 of the heatmap') == [('near', 'image')]


# ------------------------------------------------------------------ the runner itself, on a real kernel
def test_runner_executes_records_and_refuses_errors(tmp_path):
    "Run a small notebook with the real runner: it passes the check, nbdev_clean leaves it alone; a failing one is left as it was."
    import nbformat
    good = nbformat.v4.new_notebook(metadata={'kernelspec': {'name': 'python3', 'display_name': 'python3', 'language': 'python'}})
    good.cells = [nbformat.v4.new_code_cell('import os'), nbformat.v4.new_code_cell('print(os.environ["OMP_NUM_THREADS"])'),
                  nbformat.v4.new_markdown_cell('The number printed above is 1.'),
                  nbformat.v4.new_code_cell('#| eval: false\nraise SystemExit("nbdev eval: false cells must not run")'),
                  nbformat.v4.new_code_cell('import matplotlib.pyplot as plt'),
                  nbformat.v4.new_code_cell('fig, ax = plt.subplots()\nax.plot([1, 2]);')]
    bad = copy.deepcopy(good); bad.cells.insert(1, nbformat.v4.new_code_cell('1 / 0'))
    for name, nb in (('good', good), ('bad', bad)): nbformat.write(nb, tmp_path / f'{name}.ipynb')
    before = (tmp_path / 'bad.ipynb').read_text()
    env = R._kernel_env(1)
    run = lambda name: subprocess.run([sys.executable, str(ROOT / 'tools' / 'run_notebooks.py'), '--worker', str(tmp_path / f'{name}.ipynb')],
                                      cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    r = run('good')
    assert r.returncode == 0, r.stderr[-3000:]
    assert R.check_notebook(tmp_path / 'good.ipynb') == []
    saved = json.loads((tmp_path / 'good.ipynb').read_text())
    assert saved['cells'][1]['outputs'][0]['text'] == ['1\n']                  # one thread per kernel
    assert saved['cells'][3]['outputs'] == []                                  # the eval: false cell did not run
    text = (tmp_path / 'good.ipynb').read_text()
    subprocess.run([str(Path(sys.executable).parent / 'nbdev_clean'), '--fname', str(tmp_path / 'good.ipynb')], cwd=ROOT, check=True)
    assert (tmp_path / 'good.ipynb').read_text() == text, 'nbdev_clean changed an executed notebook: the record would not survive'
    r = run('bad')
    assert r.returncode == 1 and 'ZeroDivisionError' in r.stderr
    assert (tmp_path / 'bad.ipynb').read_text() == before                     # left unchanged on disk
