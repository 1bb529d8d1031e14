"""`make pages` (tools/make_pages.py): the executed notebooks as offline HTML. The hiding rules and a collapsible
`<details>` aside are checked on small notebooks; then the home page and two notebook pages are opened in headless
Chromium, which must show their figures and tables, typeset maths (MathJax from the local copy, no raw `$$`) and none
of the cells nbdev hides. Without Chromium (the Debian package `chromium`; .ci/run installs it) the browser test skips
with the reason."""
import re, sys
from pathlib import Path
import nbformat
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / 'tools'))
import make_pages as P  # noqa: E402

PAGES = ['index.ipynb', '00b_toy.ipynb', '16_cpu_scale.ipynb']   # home, the toy (figures, maths), results (tables)


def _nb(*cells):
    nb = nbformat.v4.new_notebook()
    nb.cells = list(cells)
    return nb


def test_hiding_follows_nbdev():
    code, md = nbformat.v4.new_code_cell, nbformat.v4.new_markdown_cell
    out = nbformat.v4.new_output('stream', text='seen\n')
    nb = _nb(code('#| default_exp thing'), md('# Title\n\n> summary, see [04](04_disentangler.ipynb#fold)'),
             code('#| hide\nfrom fastcore.test import *'),
             code('#| export\ndef shown(a: int, # the input\n         ) -> int:\n    "Doubles `a`."\n    return 2 * a\n\n'
                  'def _private(): "no"'),
             code('#| exporti\ndef helper(): "internal"'),
             code('#| echo: false\nprint("seen")', outputs=[out]),
             code('#| output: false\nx = 1 # hide_me #| hide_line\ny = 2', outputs=[out]),
             code('#| include: false\nsecret = 1'))
    pg = P.page_notebook(nb)
    srcs = [c.source for c in pg.cells]
    text = '\n'.join(srcs)
    assert 'fastcore' not in text and 'secret' not in text and 'default_exp' not in text and '#|' not in text
    assert 'helper' not in text and '_private' not in text and 'hide_me' not in text
    assert '(04_disentangler.html#fold)' in text and pg.metadata['title'] == 'Title'
    doc = next(c for c in pg.cells if '#### `shown`' in c.source)
    assert doc.cell_type == 'markdown' and '# the input' in doc.source and 'Doubles `a`.' in doc.source
    echo = next(c for c in pg.cells if 'print("seen")' in c.source)
    assert echo.metadata['tags'] == ['remove_input'] and echo.outputs
    outp = next(c for c in pg.cells if 'y = 2' in c.source)
    assert outp.metadata['tags'] == ['remove_output'] and outp.source == 'y = 2'
    assert len(nb.cells) == 8 and '#| hide' in nb.cells[2].source       # the input notebook is not modified


def test_details_aside_keeps_its_body(tmp_path):
    "A collapsible aside (raw `<details>` around markdown) renders with its summary and its markdown body inside it."
    png = ROOT / 'results' / 'figures' / 'afd_schematic.png'
    (tmp_path / 'f.png').write_bytes(png.read_bytes())
    md = ('# T\n\nBefore.\n\n<details>\n<summary><b>Aside: rounding</b></summary>\n\nThe *body*, $u = 2^{-24}$,\n\n'
          '$$|a-b|\\le d\\,u\\,M,$$\n\nand a [link](04_disentangler.ipynb).\n\n</details>\n\nAfter.\n\n'
          '![md image](f.png) <img src="f.png" alt="html image">')
    body, _ = P._exporter().from_notebook_node(P.page_notebook(_nb(nbformat.v4.new_markdown_cell(md))),
                                               resources={'metadata': {'path': str(tmp_path), 'name': 't'}})
    m = re.search(r'<details>\s*<summary><b>Aside: rounding</b></summary>(.*?)</details>(.*)', body, re.S)
    assert m, 'the <details> block is missing or closed early'
    inside, after = m[1], m[2]
    assert '<em>body</em>' in inside and r'$$|a-b|\le d\,u\,M,$$' in inside and 'href="04_disentangler.html"' in inside
    assert 'Before.' not in inside and 'After.' not in inside and 'After.' in after
    assert len(re.findall(r'<img\b[^>]*\bsrc="data:image/png;base64,', after)) == 2   # images are still embedded


def _expected(nb_path: Path) -> dict:
    "Figures and tables the page must show: image outputs and markdown images; markdown and HTML tables."
    pg = P.page_notebook(nbformat.read(nb_path, as_version=4))
    imgs = tables = 0
    for c in pg.cells:
        if c.cell_type == 'markdown':
            tables += len(re.findall(r'^\|[-:| ]+\|\s*$', c.source, re.M))
            imgs += len(re.findall(r'!\[[^\]]*\]\(', c.source))
        elif 'remove_output' not in c.metadata.get('tags', []):
            for o in c.get('outputs', []):
                data = o.get('data', {})
                imgs += any(k.startswith('image/') for k in data)
                tables += data.get('text/html', '').count('<table')
    math = sum(c.source.count('$') for c in pg.cells if c.cell_type == 'markdown')
    return dict(imgs=imgs, tables=tables, math=math)


@pytest.fixture(scope='module')
def site(tmp_path_factory):
    pytest.importorskip('jupyter_server_mathjax', reason='MathJax comes from jupyter-server-mathjax (dev requirement)')
    out = tmp_path_factory.mktemp('pages')
    P.build([ROOT / 'nbs' / n for n in PAGES], out)
    return out


def test_pages_are_offline(site):
    for n in PAGES:
        body = (site / n.replace('.ipynb', '.html')).read_text()
        assert not re.findall(r'<(?:script|link|img)\b[^>]*\b(?:src|href)="https?://', body), n
        assert 'src="mathjax/MathJax.js' in body
    assert (site / 'mathjax' / 'MathJax.js').exists()


@pytest.mark.skipif(P.chromium() is None, reason='chromium is not installed (apt-get install chromium; .ci/run does it)')
@pytest.mark.parametrize('name', PAGES)
def test_page_in_chromium(site, name):
    exp = _expected(ROOT / 'nbs' / name)
    r = P.browse(site / name.replace('.ipynb', '.html'), '--dump-dom')
    dom = r.stdout
    assert r.returncode == 0 and '</html>' in dom, r.stderr[-2000:]
    text = re.sub(r'<(script|style)\b.*?</\1>', '', dom, flags=re.S)
    imgs = len(re.findall(r'<img\b[^>]*\bsrc="data:image/', dom))
    assert imgs >= max(exp['imgs'], 1), f'{name}: {imgs} figures shown, {exp["imgs"]} in the notebook'
    assert len(re.findall(r'<table\b', dom)) >= exp['tables'], f'{name}: tables missing'
    if exp['math']:
        assert len(re.findall(r'class="MathJax[ "]', dom)) > 0, f'{name}: no maths typeset'
        assert '$$' not in text, f'{name}: raw $$ left in the page'
        assert 'Math Processing Error' not in dom and 'class="merror"' not in dom, f'{name}: a formula failed'
    assert 'from fastcore.test import' not in text, f'{name}: a #| hide cell is shown'
    assert '#| ' not in text, f'{name}: nbdev directives are shown'
    assert 'class="afd-nav"' in dom and 'Appendix' in text
