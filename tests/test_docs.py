"""The documentation site and the repository's independence: nbdev/quarto configuration that publishes the committed
outputs, a sidebar that lists every notebook, and nothing that points outside the repository."""
import configparser, json, re, subprocess
from pathlib import Path
import yaml

ROOT = Path(__file__).resolve().parent.parent
NBS = ROOT / 'nbs'


def _cfg():
    c = configparser.ConfigParser(delimiters=['=']); c.read(ROOT / 'settings.ini'); return c['DEFAULT']


def _sidebar_files(contents) -> list[str]:
    out = []
    for item in contents:
        if isinstance(item, str): out.append(item)
        elif isinstance(item, dict) and 'contents' in item: out += _sidebar_files(item['contents'])
        elif isinstance(item, dict) and 'href' in item: out.append(item['href'])
    return out


def test_sidebar_lists_every_notebook_once():
    "settings.ini custom_sidebar = True keeps nbs/sidebar.yml as written, so a new notebook must be added to it by hand."
    assert _cfg()['custom_sidebar'] == 'True', 'nbdev_docs would overwrite nbs/sidebar.yml'
    listed = _sidebar_files(yaml.safe_load((NBS / 'sidebar.yml').read_text())['website']['sidebar']['contents'])
    present = sorted(p.name for p in NBS.glob('*.ipynb'))
    assert len(listed) == len(set(listed)), f'listed twice in nbs/sidebar.yml: {sorted({f for f in listed if listed.count(f) > 1})}'
    assert sorted(listed) == present, (f'nbs/sidebar.yml is out of date: add {sorted(set(present) - set(listed))}, '
                                       f'remove {sorted(set(listed) - set(present))}')
    assert listed[0] == 'index.ipynb'


MAIN_LINE_NOTEBOOKS, MAIN_LINE_CELLS, EXPORTED_CELL_LINES = 12, 40, 60   # the course a reader finishes; a cell fits a screen


def _main_line() -> list[str]:
    side = yaml.safe_load((NBS / 'sidebar.yml').read_text())['website']['sidebar']['contents']
    return next(_sidebar_files(s['contents']) for s in side if isinstance(s, dict) and s.get('section') == 'Main line')


def test_main_line_is_short_and_cells_fit_a_screen():
    "At most 12 main-line notebooks of at most 40 cells each; every exported cell of every notebook at most 60 lines."
    main = _main_line()
    assert 0 < len(main) <= MAIN_LINE_NOTEBOOKS, f'{len(main)} main-line notebooks; move machinery to the appendix'
    long = {n: k for n in main if (k := len(json.loads((NBS / n).read_text())['cells'])) > MAIN_LINE_CELLS}
    assert not long, f'main-line notebooks over {MAIN_LINE_CELLS} cells: {long}; split them or move asides to the appendix'
    big = [f'{p.name} cell {i} ({n} lines)' for p in sorted(NBS.glob('*.ipynb'))
           for i, c in enumerate(json.loads(p.read_text())['cells'])
           if c['cell_type'] == 'code' and re.match(r'#\|\s*export', ''.join(c['source']))
           and (n := len(''.join(c['source']).splitlines())) > EXPORTED_CELL_LINES]
    assert not big, f'exported cells over {EXPORTED_CELL_LINES} lines: {big}'


def test_quarto_publishes_committed_outputs():
    q = yaml.safe_load((NBS / '_quarto.yml').read_text())
    assert q['execute']['enabled'] is False, 'quarto must not execute the notebooks: the site shows the committed outputs'
    assert set(q['metadata-files']) == {'nbdev.yml', 'sidebar.yml'}
    assert (NBS / q['format']['html']['css']).is_file()
    c = _cfg()
    assert (NBS / c['readme_nb']).is_file(), f"settings.ini readme_nb = {c['readme_nb']} (the docs home page) is missing"


def test_docs_settings_are_consistent():
    "user, git_url and doc_host name the same GitHub owner (a placeholder until the repository has its home)."
    c = _cfg()
    assert c['git_url'] == f"https://github.com/{c['user']}/{c['repo']}", (c['git_url'], c['user'], c['repo'])
    assert c['doc_host'] == f"https://{c['user']}.github.io" and c['doc_baseurl'] == f"/{c['repo']}"
    ny = yaml.safe_load((NBS / 'nbdev.yml').read_text())['website']        # what nbdev_docs regenerates from settings.ini
    assert ny['repo-url'] == c['git_url'] and ny['site-url'] == c['doc_host'] + c['doc_baseurl']


def _tracked() -> list[Path]:
    try: names = subprocess.run(['git', 'ls-files'], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    except (OSError, subprocess.CalledProcessError):                      # not a git checkout (e.g. an sdist)
        skip = {'.git', '.venv', 'data', 'runs', '_docs', '_proc', '__pycache__'}
        return [p for p in ROOT.rglob('*') if p.is_file() and not skip & set(p.relative_to(ROOT).parts)]
    return [ROOT / n for n in names if (ROOT / n).is_file()]


def test_nothing_points_outside_the_repository():
    """The project stands alone: no reference to internal documents or to folders beside the repository.
    (`.ci/run` is the one exception: it locates the CI machine's data folder.)"""
    bad = re.compile('|'.join(map(re.escape, ['METHOD' + '.md', 'METHOD' + ' §', 'STYLE' + '.md', '../' + 'shared', '/work' + '/'])))
    hits = []
    for p in _tracked():
        rel = p.relative_to(ROOT).as_posix()
        if rel == '.ci/run' or p.suffix in ('.png', '.pt', '.th', '.npz'): continue
        try: text = p.read_text(encoding='utf-8')
        except (UnicodeDecodeError, OSError): continue
        hits += [f'{rel}:{text.count(chr(10), 0, m.start()) + 1}: {m[0]}' for m in bad.finditer(text)]
    assert not hits, ('these point outside the repository; cite the paper (section, equation, table, figure) or link the '
                      'notebook section instead:\n  ' + '\n  '.join(hits[:40]) + (f'\n  ... {len(hits) - 40} more' if len(hits) > 40 else ''))
