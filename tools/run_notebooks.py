#!/usr/bin/env python
"""`make notebooks`: re-execute the library notebooks in nbs/ in place, on CPU, and save their outputs.

    python tools/run_notebooks.py                   # every notebook in nbs/, 2 at a time
    python tools/run_notebooks.py nbs/07_baselines.ipynb nbs/index.ipynb --jobs 1
    python tools/run_notebooks.py --check           # only check the saved notebooks (what `make test` does)
    python tools/run_notebooks.py --list            # the order they run in

Order. The notebooks do not import each other: each imports the *exported library* `afd_nb`, and none reads a
file that another one writes. So the one dependency is the library itself: `nbdev_export` runs first, then the
notebooks run in their numeric (story) order, a lettered one right after its base (06_train, 06b_checkpoint,
07_baselines), `index.ipynb` last, `--jobs` at a time (default 2). A kernel gets
one thread (OMP_NUM_THREADS=1): the models are small, and on a few cores one thread per kernel with two kernels
side by side is faster than two threads fighting over them.

Each notebook runs top to bottom in a fresh kernel whose working directory is nbs/ (as in Jupyter and
`nbdev_test`). Cells marked `#| eval: false` are skipped, as nbdev does; `#| slow` / `#| notest` cells *are*
run (nbdev_test skips them; their saved outputs are what a reader sees). A notebook that raises is left as it was
on disk and the error is printed. A notebook that completes is cleaned with nbdev's cleaner (settings.ini) and
written atomically, with a record in its metadata (`afd_nb.executed`): the execution count of every code cell and a
digest of the code and outputs. `tests/test_notebooks.py` uses that record to tell an executed notebook from one
that was edited (or run out of order) afterwards. Nothing here uses the network: data come from $AFD_DATA or
data/ like everywhere else in the project.
"""
from __future__ import annotations
import argparse, ast, hashlib, json, os, re, resource, signal, subprocess, sys, tempfile, time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NBS = ROOT / 'nbs'
KEY = 'afd_nb'                  # notebook metadata key of the record (kept by nbdev_clean: settings.ini allowed_metadata_keys)
SKIP_TAG = 'afd-skip-execution'  # set in memory on `#| eval: false` cells while nbclient runs, removed before saving
FIX = 'run `make notebooks` (or `python tools/run_notebooks.py nbs/{name}`) and commit the executed notebook'


# ---------------------------------------------------------------- which notebooks, in which order
def story_key(name: str) -> tuple:
    "Sort key: by the number in front (`6_x` = `06_x`), a lettered notebook right after its base (06, 06b, 07), index last."
    m = re.match(r'(\d+)([a-z]*)_', name)
    return (name == 'index.ipynb', int(m[1]) if m else float('inf'), m[2] if m else '', name)


def library_notebooks(nbs: Path = NBS) -> list[Path]:
    """The library notebooks, found rather than listed: every nbs/*.ipynb (not recursive, like settings.ini's
    recursive = False; names starting with `_` or `.` excluded), in story order (`story_key`), index last."""
    nbs_ = [p for p in nbs.glob('*.ipynb') if not p.name.startswith(('_', '.'))]
    return sorted(nbs_, key=lambda p: story_key(p.name))


def _source(cell: dict) -> str:
    s = cell.get('source', '')
    return ''.join(s) if isinstance(s, list) else s


def directives(cell: dict) -> dict[str, str]:
    "nbdev `#| key: value` (or `#| flag`) lines at the top of a code cell."
    out = {}
    for line in _source(cell).splitlines():
        m = re.match(r'\s*#\|\s*([\w-]+)\s*:?\s*(.*)$', line)
        if m: out[m[1]] = m[2].strip()
        elif line.strip(): break
    return out


def skipped(cell: dict) -> bool:
    "True for code cells nobody executes: empty ones and `#| eval: false` ones."
    return cell['cell_type'] == 'code' and (not _source(cell).strip() or directives(cell).get('eval', '').lower() == 'false')


# ---------------------------------------------------------------- the record
def _text(v) -> str: return ''.join(v) if isinstance(v, list) else str(v)


def _output_canon(o: dict) -> dict:
    "An output with multi-line strings joined, so the digest does not depend on how the JSON splits lines."
    o = dict(o)
    if 'text' in o: o['text'] = _text(o['text'])
    if 'data' in o: o['data'] = {k: (_text(v) if isinstance(v, (str, list)) else v) for k, v in o['data'].items()}
    if 'traceback' in o: o['traceback'] = _text(o['traceback'])
    o.pop('execution_count', None)
    return o


def digest(nb: dict) -> str:
    "sha256 over every code cell's source and outputs (markdown is not included: prose edits need no re-run)."
    h = hashlib.sha256()
    for c in nb['cells']:
        if c['cell_type'] != 'code': continue
        h.update(json.dumps([_source(c), [_output_canon(o) for o in c.get('outputs', [])]], sort_keys=True,
                            ensure_ascii=False).encode())
    return 'sha256:' + h.hexdigest()


def expected_counts(nb: dict) -> list[int | None]:
    "Execution counts of a top-to-bottom run in one fresh kernel: 1, 2, 3, ... over executed cells, None for skipped."
    out, k = [], 0
    for c in nb['cells']:
        if c['cell_type'] != 'code': continue
        if skipped(c): out.append(None)
        else: k += 1; out.append(k)
    return out


# ---------------------------------------------------------------- what a code cell must show
_PLT_MAKERS = {'subplots', 'figure', 'plot', 'imshow', 'bar', 'barh', 'hist', 'scatter', 'show', 'matshow', 'pcolormesh',
               'contour', 'contourf', 'errorbar', 'fill_between', 'step', 'subplot', 'subplot_mosaic', 'semilogy', 'loglog'}
_DISPLAYERS = {'display', 'show_doc', 'Markdown', 'HTML'}


def _call_name(node) -> tuple[str, str]:
    "('plt', 'subplots') for plt.subplots(...), ('', 'print') for print(...)."
    f = node.func
    if isinstance(f, ast.Name): return '', f.id
    if isinstance(f, ast.Attribute): return (f.value.id if isinstance(f.value, ast.Name) else '?'), f.attr
    return '?', '?'


def _calls(node):
    "Call nodes in `node`, not descending into definitions or lambdas (their bodies run only when called)."
    if isinstance(node, (ast.Lambda, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)): return
    if isinstance(node, ast.Call): yield node
    for child in ast.iter_child_nodes(node): yield from _calls(child)


def _always_run(stmts):
    """The expressions that certainly run: simple statements, loop iterables and `if` tests, and the bodies of
    for/with/try blocks, but not the branches of if/while/except (which may not run) nor definitions."""
    for s in stmts:
        if isinstance(s, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)): continue
        if isinstance(s, (ast.For, ast.AsyncFor)): yield s.iter; yield from _always_run(s.body)
        elif isinstance(s, (ast.With, ast.AsyncWith)): yield from s.items; yield from _always_run(s.body)
        elif isinstance(s, ast.Try): yield from _always_run(s.body)
        elif isinstance(s, (ast.If, ast.While)): yield s.test
        elif not isinstance(s, getattr(ast, 'Match', ())): yield s


def _effects(stmts, funcs: dict, seen=()) -> set[str]:
    "'stream' if the statements certainly print, 'image' if they certainly draw a matplotlib figure."
    out, closed = set(), False
    for node in _always_run(stmts):
        for call in _calls(node):
            mod, name = _call_name(call)
            if (mod, name) == ('', 'print'): out.add('stream')
            elif mod == 'plt' and name in _PLT_MAKERS: out.add('image')
            elif (mod, name) == ('plt', 'close'): closed = True
            elif mod == '' and name in funcs and name not in seen: out |= _effects(funcs[name], funcs, seen + (name,))
    if closed: out.discard('image')
    return out


def _parse(src: str):
    lines = [l for l in src.splitlines() if not l.lstrip().startswith(('%', '!'))]   # IPython magics
    try: return ast.parse('\n'.join(lines)), lines
    except SyntaxError: return None, lines


def notebook_functions(nb: dict) -> dict[str, list]:
    "Top-level functions defined anywhere in the notebook: name -> body (to follow calls like `plot_compare(...)`)."
    funcs = {}
    for c in nb['cells']:
        if c['cell_type'] != 'code': continue
        tree, _ = _parse(_source(c))
        for s in (tree.body if tree else []):
            if isinstance(s, (ast.FunctionDef, ast.AsyncFunctionDef)): funcs[s.name] = s.body
    return funcs


def expected_outputs(src: str, funcs: dict | None = None) -> set[str]:
    """What a cell certainly shows when it runs: 'stream' (it prints), 'image' (it draws a figure), 'result' (its last
    line is an expression whose value Jupyter displays). Calls whose return value is unknown expect nothing."""
    tree, lines = _parse(src)
    if tree is None or not tree.body: return set()
    funcs = funcs or {}
    out = _effects(tree.body, funcs)
    last = tree.body[-1]
    if isinstance(last, ast.Expr):
        rest = lines[last.end_lineno - 1][last.end_col_offset:] + ''.join(lines[last.end_lineno:])
        quiet = rest.split('#')[0].strip().startswith(';')
        v = last.value
        if isinstance(v, ast.Call):
            if _call_name(v)[1] in _DISPLAYERS: out.add('result')
        elif not quiet and not (isinstance(v, ast.Constant) and v.value in (None, Ellipsis)) and not isinstance(v, (ast.Await, ast.Yield)):
            out.add('result')
    return out


def _has(outputs: list, kind: str) -> bool:
    if kind == 'stream': return any(o['output_type'] == 'stream' for o in outputs)
    if kind == 'image': return any(k.startswith('image/') for o in outputs for k in o.get('data', {}))
    return any(o['output_type'] in ('execute_result', 'display_data', 'stream') for o in outputs)   # 'result' / 'any'


# ---------------------------------------------------------------- prose that points at an output
_IMAGE_WORDS = r'figures?|plots?|plotted|heat ?maps?|charts?|histograms?|curves?|images?|pictures?|panels?'
_ANY_WORDS = r'print(?:ed|s)?|outputs?|tables?|numbers|values|results?|shown|displayed|listing'
_POINTER = re.compile(rf"\b(?P<word>{_IMAGE_WORDS}|{_ANY_WORDS})(?:\s+[\w'’-]+){{0,3}}?\s+(?P<dir>above|below)\b"
                      rf'|\b(?P<dir2>above|below)\s+(?:is\s+|are\s+)?(?:the\s+)?(?P<word2>{_IMAGE_WORDS}|{_ANY_WORDS})\b', re.I)


def _strip_math_code(md: str) -> str:
    md = re.sub(r'```.*?```', ' ', md, flags=re.S)
    md = re.sub(r'\$\$.*?\$\$', ' ', md, flags=re.S)
    return re.sub(r'`[^`]*`|\$[^$]*\$', ' ', md)


_THE_FIGURE = re.compile(r"\bthe\s+(?!paper|authors)(?:[\w'’-]+\s+)?(?:figure|plot|heat ?map|chart|histogram|scatter plot)s?\b(?!\s+(?:above|below)\b)", re.I)


def prose_pointers(md: str) -> list[tuple[str, str, str, int]]:
    """(phrase, direction, 'image'|'any', position) for every place the markdown points at an output: 'above' or
    'below' ("the table above", "printed above", "the plot below"), or 'near' for a figure named without a direction
    ("row `airplane` of the heatmap"), which must be in the nearest code cells on either side."""
    md, out = _strip_math_code(md), []
    for m in _POINTER.finditer(md):
        word, d = (m['word'], m['dir']) if m['word'] else (m['word2'], m['dir2'])
        out.append((m[0], d.lower(), 'image' if re.fullmatch(_IMAGE_WORDS, word, re.I) else 'any', m.start()))
    out += [(m[0], 'near', 'image', m.start()) for m in _THE_FIGURE.finditer(md)]
    return out


_MD_SHOWS = re.compile(r'^\s*\|.*\|\s*$|!\[', re.M)   # a Markdown table row or an embedded image: prose may point at it


def _pointer_ok(cells: list, i: int, d: str, kind: str, pos: int) -> bool:
    """Is there something to see in direction `d` of the phrase at `pos` of markdown cell i? A Markdown table or image
    on that side of the phrase or in the markdown cells up to the nearest code, or an output of `kind` in the nearest
    run of visible (not `#| hide`) code cells."""
    if d == 'near': return any(_pointer_ok(cells, i, e, kind, pos) for e in ('above', 'below'))
    md = _strip_math_code(_source(cells[i]))
    if _MD_SHOWS.search(md[:pos] if d == 'above' else md[pos:]): return True
    step = -1 if d == 'above' else 1
    j = i + step
    while 0 <= j < len(cells) and cells[j]['cell_type'] != 'code':
        if _MD_SHOWS.search(_source(cells[j])): return True
        j += step
    while 0 <= j < len(cells) and cells[j]['cell_type'] == 'code':
        if 'hide' not in directives(cells[j]) and _has(cells[j].get('outputs', []), 'image' if kind == 'image' else 'any'):
            return True
        j += step
    return False


# ---------------------------------------------------------------- cells the docs build would run again
def reexecuted_by_docs(cell: dict) -> bool:
    """True for a code cell that `nbdev_docs` would execute again in CI and that does more than import or define:
    to render the API docs, nbdev 2 (processor `exec_show_docs`) runs every exported cell and every cell containing an
    import statement, and replaces that cell's saved output with what it prints there. A cell of imports (and
    definitions) is harmless; a cell that imports and also computes would recompute (or fail) at docs build time."""
    if cell['cell_type'] != 'code' or skipped(cell): return False
    if set(directives(cell)) & {'export', 'exports', 'exporti', 'exec_doc'}: return False
    tree, _ = _parse(_source(cell))
    if tree is None or not any(isinstance(n, (ast.Import, ast.ImportFrom)) for n in ast.walk(tree)): return False
    harmless = (ast.Import, ast.ImportFrom, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)
    return any(not isinstance(s, harmless) for s in tree.body)


# ---------------------------------------------------------------- the check
def _where(nb: dict, i: int) -> str:
    c = nb['cells'][i]
    first = next((l for l in _source(c).splitlines() if l.strip() and not l.startswith('#|')), '').strip()
    return f'cell {i + 1} ({c["cell_type"]}: `{first[:60]}`)'


def check_notebook(path: Path) -> list[str]:
    "Every reason why the saved notebook at `path` is not fully executed; empty if it is."
    nb = json.loads(Path(path).read_text(encoding='utf-8'))
    name, cells, probs = Path(path).name, nb['cells'], []
    rec = nb.get('metadata', {}).get(KEY, {}).get('executed')
    if not rec:
        probs.append('it carries no execution record: it was never executed by `make notebooks` (or the record was removed)')
    else:
        if rec.get('digest') != digest(nb):
            probs.append('its code or outputs changed after `make notebooks` executed it (the recorded digest does not match): '
                         'the saved outputs may not be what this code prints')
        exp = expected_counts(nb)
        if rec.get('execution_counts') != exp:
            probs.append(f'it was not executed top to bottom in one fresh kernel: recorded execution counts '
                         f'{rec.get("execution_counts")}, a clean run gives {exp}')
    funcs = notebook_functions(nb)
    for i, c in enumerate(cells):
        if reexecuted_by_docs(c):
            probs.append(f'{_where(nb, i)} imports and also computes: the docs build (nbdev_docs) executes every cell that '
                         'imports and would replace its saved output; move the imports into a cell of their own')
        if c['cell_type'] != 'code' or skipped(c): continue
        outs = c.get('outputs', [])
        for o in outs:
            if o['output_type'] == 'error':
                probs.append(f'{_where(nb, i)} has an error output: {o.get("ename")}: {_text(o.get("evalue", ""))[:200]}')
        for kind in sorted(expected_outputs(_source(c), funcs)):
            if not _has(outs, kind):
                what = dict(stream='prints, but no printed output is saved', image='draws a figure, but no image is saved',
                            result="ends with an expression Jupyter displays, but no result is saved")[kind]
                probs.append(f'{_where(nb, i)} {what}')
    for i, c in enumerate(cells):
        if c['cell_type'] != 'markdown': continue
        for phrase, d, kind, pos in prose_pointers(_source(c)):
            if not _pointer_ok(cells, i, d, kind, pos):
                what = 'figure' if kind == 'image' else 'output'
                where = 'above or below' if d == 'near' else d
                probs.append(f'{_where(nb, i)} says "{" ".join(phrase.split())}", but the nearest visible code cells {where} it have no {what} saved '
                             '(execute the notebook, or reword the sentence if it does not point at an output)')
    return [f'{name}: {p}' for p in probs]


def check_message(path: Path, probs: list[str], limit: int = 12) -> str:
    more = f'\n  ... and {len(probs) - limit} more' if len(probs) > limit else ''
    return ('\n  ' + '\n  '.join(probs[:limit]) + more + f'\n  Fix: {FIX.format(name=Path(path).name)}.')


# ---------------------------------------------------------------- executing one notebook (worker process)
def _nbdev_cfg():
    from nbdev.config import get_config
    return get_config(path=ROOT)


def clean(nb: dict) -> dict:
    "nbdev's own cleaner with the project's settings (what `nbdev_clean` does to the file)."
    from execnb.nbio import dict2nb
    from nbdev.clean import clean_nb
    cfg = _nbdev_cfg()
    d = dict2nb(nb)
    clean_nb(d, cfg.clear_all, cfg.get('allowed_metadata_keys').split(), cfg.get('allowed_cell_metadata_keys').split(),
             cfg.clean_ids)
    return d


def _write_atomic(path: Path, text: str):
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f'.{path.name}.', suffix='.tmp')
    try:
        with os.fdopen(fd, 'w', encoding='utf-8') as f: f.write(text)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp): os.unlink(tmp)


def execute_one(path: Path, timeout: int) -> int:
    "Run one notebook top to bottom in a fresh kernel; on success clean it, record it and write it in place."
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError
    from execnb.nbio import nb2str
    nb = nbformat.read(path, as_version=4)
    for c in nb.cells:
        if c.cell_type != 'code': continue
        c.outputs, c.execution_count = [], None          # nothing survives from an earlier run, not even in skipped cells
        if skipped(c) and _source(c).strip(): c.metadata.setdefault('tags', []).append(SKIP_TAG)   # nbdev's `#| eval: false`
    client = NotebookClient(nb, timeout=timeout, startup_timeout=600, kernel_name='python3', skip_cells_with_tag=SKIP_TAG, allow_errors=False,
                            record_timing=False, resources={'metadata': {'path': str(path.parent)}})
    def stop(signum, frame):                             # Ctrl-C or the driver's terminate: take the kernel down too
        prov = getattr(getattr(client, 'km', None), 'provisioner', None)   # (it runs in its own session: no signal reaches it)
        for pg in {getattr(prov, 'pgid', None), getattr(prov, 'pid', None)} - {None}:
            try: os.killpg(pg, signal.SIGKILL)
            except OSError: pass
        print(f'{path.name}: interrupted; the notebook on disk is left unchanged.', file=sys.stderr)
        os._exit(130)
    signal.signal(signal.SIGTERM, stop); signal.signal(signal.SIGINT, stop)
    try: client.execute()
    except CellExecutionError as e:
        print(f'{path.name}: a cell raised; the notebook on disk is left unchanged.\n{e}', file=sys.stderr)
        return 1
    for c in nb.cells:
        tags = c.metadata.get('tags')
        if tags and SKIP_TAG in tags:
            tags.remove(SKIP_TAG)
            if not tags: del c.metadata['tags']
    counts = [c.get('execution_count') for c in nb.cells if c.cell_type == 'code']
    d = clean(json.loads(nbformat.writes(nb)))
    d['metadata'][KEY] = {'executed': {'by': 'tools/run_notebooks.py', 'execution_counts': counts, 'digest': digest(json.loads(nb2str(d)))}}
    _write_atomic(path, nb2str(d))
    return 0


# ---------------------------------------------------------------- the driver
def _export() -> None:
    exe = Path(sys.executable).parent / 'nbdev_export'
    subprocess.run([str(exe) if exe.exists() else 'nbdev_export'], cwd=ROOT, check=True)


def _kernel_env(threads: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), MPLBACKEND='module://matplotlib_inline.backend_inline')
    # tqdm.auto's notice that ipywidgets is missing (progress bars fall back to text) says nothing about the results
    env['PYTHONWARNINGS'] = ','.join(w for w in (env.get('PYTHONWARNINGS'), 'ignore:IProgress not found') if w)
    env['PYTHONPATH'] = os.pathsep.join([str(ROOT)] + [p for p in env.get('PYTHONPATH', '').split(os.pathsep) if p])
    env.pop('IN_TEST', None)
    return env


def _files(nbs: Path) -> set[str]:
    return {str(p.relative_to(ROOT)) for p in nbs.rglob('*') if '.ipynb_checkpoints' not in p.parts}


def run(paths: list[Path], jobs: int, timeout: int, threads: int) -> int:
    "Execute `paths`, `jobs` at a time; print each notebook's time and the total."
    print(f'nbdev_export, then {len(paths)} notebook(s), {jobs} at a time, {threads} thread(s) per kernel:', flush=True)
    _export()
    before, env = _files(NBS), _kernel_env(threads)
    todo, running, times, cpu, failed, t0 = list(paths), {}, {}, {}, [], time.time()
    used = lambda: (lambda r: r.ru_utime + r.ru_stime)(resource.getrusage(resource.RUSAGE_CHILDREN))
    cpu0 = used()
    def interrupt(signum, frame): raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, interrupt); signal.signal(signal.SIGINT, interrupt)
    try:
        while todo or running:
            while todo and len(running) < jobs:
                p = todo.pop(0)
                log = tempfile.TemporaryFile(mode='w+')
                cmd = [sys.executable, str(Path(__file__).resolve()), '--worker', str(p), '--timeout', str(timeout)]
                running[p] = (subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT), log, time.time())
                print(f'  start  {p.name}', flush=True)
            time.sleep(0.5)
            for p, (proc, log, start) in list(running.items()):
                if proc.poll() is None: continue                  # poll() reaps the worker: its CPU time (and its
                del running[p]                                     # kernel's) now counts in RUSAGE_CHILDREN
                times[p], cpu[p], cpu0 = time.time() - start, used() - cpu0, used()
                log.seek(0); text = log.read(); log.close()
                if proc.returncode:
                    failed.append(p)
                    print(f'  FAILED {p.name} after {times[p]:.0f} s:\n' + '\n'.join('    ' + l for l in text.strip().splitlines()[-40:]), flush=True)
                    continue
                probs = check_notebook(p)
                print(f'  done   {p.name:28s} {times[p]:7.0f} s wall {cpu[p]:7.0f} s CPU' + ('' if not probs else '  -- saved, but the check finds:' + check_message(p, probs)), flush=True)
                if probs: failed.append(p)
    except KeyboardInterrupt:
        for p, (proc, log, _) in running.items(): proc.terminate(); proc.wait()      # each worker stops its kernel
        print('\ninterrupted: the notebooks reported done above are saved; the others are unchanged on disk.')
        return 130
    total = time.time() - t0
    print('\ntime per notebook (s): wall, CPU (kernel and everything it started)')
    for p in sorted(times, key=times.get, reverse=True):
        print(f'  {times[p]:7.0f} {cpu[p]:7.0f}  {p.name}' + ('   FAILED' if p in failed else ''))
    print(f'total: {total:.0f} s wall ({total / 60:.1f} min), {sum(cpu.values()):.0f} s CPU, for {len(paths)} notebook(s), '
          f'{jobs} at a time, {threads} thread(s) each, on {os.cpu_count()} CPUs (load average at the end: '
          f"{', '.join(f'{v:.1f}' for v in os.getloadavg())})")
    new = sorted(_files(NBS) - before)
    if new: print('note: the run left new files under nbs/ (a notebook should write to a temporary folder):\n  ' + '\n  '.join(new))
    if failed: print(f'{len(failed)} notebook(s) failed: ' + ', '.join(p.name for p in failed)); return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('notebooks', nargs='*', help='notebooks to run (default: every library notebook in nbs/)')
    ap.add_argument('--jobs', type=int, default=min(2, os.cpu_count() or 1), help='notebooks run at the same time (default 2)')
    ap.add_argument('--threads', type=int, default=1, help='torch/OpenMP threads per kernel (default 1)')
    ap.add_argument('--timeout', type=int, default=3600, help='seconds a single cell may take (default 3600)')
    ap.add_argument('--check', action='store_true', help='do not execute; check the saved notebooks and report')
    ap.add_argument('--list', action='store_true', help='print the notebooks in run order and exit')
    ap.add_argument('--worker', help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker: return execute_one(Path(a.worker).resolve(), a.timeout)
    paths = [Path(p).resolve() for p in a.notebooks] or library_notebooks()
    missing = [str(p) for p in paths if not p.is_file()]
    if missing: ap.error('no such notebook: ' + ', '.join(missing))
    if a.list: print('\n'.join(str(p.relative_to(ROOT)) for p in paths)); return 0
    if a.check:
        bad = {p: check_notebook(p) for p in paths}
        for p, probs in bad.items(): print(f'{p.name}: ' + ('ok' if not probs else 'NOT fully executed' + check_message(p, probs)))
        return int(any(bad.values()))
    return run(paths, max(1, a.jobs), a.timeout, max(1, a.threads))


if __name__ == '__main__': sys.exit(main())
