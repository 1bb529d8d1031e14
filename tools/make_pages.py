#!/usr/bin/env python
"""`make pages`: the executed notebooks of nbs/ as static HTML pages in _pages/, readable offline.

    python tools/make_pages.py                          # every notebook, into _pages/
    python tools/make_pages.py nbs/index.ipynb nbs/00b_toy.ipynb --out /tmp/site
    python tools/make_pages.py --screenshots results/pages   # also PNG screenshots (headless Chromium)

The documentation site proper is built by quarto (`nbdev_docs`, in the docs workflow). This is the same content
without quarto: nbconvert's HTML exporter on the committed outputs (nothing is executed), after hiding what nbdev
hides from the docs:

* `#| hide` and `#| include: false` cells are dropped;
* `#| export`, `#| exporti` and `#| default_exp` cells lose their source; in place of an `#| export` cell the page
  shows the signature and docstring of each public function or class it defines (as nbdev's `show_doc` does);
* `#| echo: false` hides a cell's code and keeps its output, `#| output: false` the reverse, and `#| hide_line`
  lines and every `#|` directive line are removed from the code that is shown;
* links to `x.ipynb` point to `x.html`, and images that markdown cells load from files are embedded;
* raw HTML in markdown passes through as written, so a collapsible `<details>` aside (a `<summary>` line, a blank
  line, markdown, a blank line, `</details>`) keeps its markdown body inside it, as on GitHub and in quarto.

The maths is typeset by MathJax 2, copied into `<out>/mathjax/` from the `jupyter-server-mathjax` package (a dev
requirement), so a page needs no network; a page that would load anything from the network is an error. Each page
starts with a navigation bar built from nbs/sidebar.yml (its main line and appendix).
"""
from __future__ import annotations
import argparse, ast, copy, html, re, shutil, subprocess, sys, tempfile
from pathlib import Path
import nbformat, yaml

ROOT = Path(__file__).resolve().parent.parent
NBS = ROOT / 'nbs'
OUT = ROOT / '_pages'
MATHJAX_URL = 'mathjax/MathJax.js?config=TeX-AMS-MML_HTMLorMML-full,Safe'
# The package ships only the STIX-Web fonts (as Jupyter's own pages use them): say so before MathJax starts.
MATHJAX_FONTS = ('<script type="text/x-mathjax-config">MathJax.Hub.Config({"HTML-CSS": {availableFonts: [], '
                 'preferredFont: null, webFont: "STIX-Web", imageFont: null}});</script>')
_DIRECTIVE = re.compile(r'^\s*#\|\s*([\w-]+)\s*:?\s*(.*?)\s*$')
_NO_SOURCE = {'export', 'exporti', 'default_exp'}
CHROMIUM_FLAGS = ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
                  '--disable-background-networking', '--disable-component-update', '--disable-sync', '--hide-scrollbars']


def directives(source: str) -> dict[str, str]:
    "nbdev `#| key: value` (or `#| flag`) lines of a code cell."
    return {m[1]: m[2] for m in map(_DIRECTIVE.match, source.splitlines()) if m}


def shown_source(source: str) -> str:
    "The code a reader sees: directive lines and `#| hide_line` lines removed."
    keep = [l for l in source.splitlines() if not _DIRECTIVE.match(l) and not re.search(r'#\|\s*hide_line\s*$', l)]
    return '\n'.join(keep).strip('\n')


def _header(lines: list[str], node) -> str:
    "A definition's source from its `def`/`class` line up to its body (parameter comments included)."
    return '\n'.join(lines[node.lineno - 1:node.body[0].lineno - 1]).rstrip()


def api_doc(source: str) -> str:
    "Markdown for the public functions and classes an exported cell defines: signature and docstring."
    try: tree = ast.parse(shown_source(source))
    except SyntaxError: return ''
    lines, parts = shown_source(source).splitlines(), []
    for node in tree.body:
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) or node.name.startswith('_'): continue
        doc = ast.get_docstring(node) or ''
        parts.append(f'#### `{node.name}`\n\n```python\n{_header(lines, node)}\n```\n\n{doc}'.rstrip())
        if isinstance(node, ast.ClassDef):
            for m in node.body:
                if isinstance(m, (ast.FunctionDef, ast.AsyncFunctionDef)) and not m.name.startswith('_') and ast.get_docstring(m):
                    parts.append(f'* `{node.name}.{m.name}`: {ast.get_docstring(m).splitlines()[0]}')
    return '\n\n'.join(parts)


def _link_html(text: str) -> str:
    "Markdown links to notebooks point to their pages: `(x.ipynb)` and `(x.ipynb#anchor)` become `(x.html...)`."
    return re.sub(r'\(([\w.-]+)\.ipynb(#[^)\s]*)?\)', lambda m: f'({m[1]}.html{m[2] or ""})', text)


def page_notebook(nb: nbformat.NotebookNode) -> nbformat.NotebookNode:
    "A copy of `nb` with what nbdev hides from the docs hidden (see the module docstring)."
    nb = copy.deepcopy(nb)
    cells = []
    for c in nb.cells:
        if c.cell_type == 'markdown':
            c.source = _link_html(c.source)
        elif c.cell_type == 'code':
            d = directives(c.source)
            if 'hide' in d or d.get('include') == 'false': continue
            if d.keys() & _NO_SOURCE and 'exports' not in d:
                doc = api_doc(c.source) if 'export' in d else ''
                if doc: cells.append(nbformat.v4.new_markdown_cell(doc))
                continue
            c.source = shown_source(c.source)
            tags = set(c.metadata.get('tags', []))
            if d.get('echo') == 'false': tags.add('remove_input')
            if d.get('output') == 'false': tags.add('remove_output')
            c.metadata['tags'] = sorted(tags)
            if not c.source and not c.get('outputs'): continue
        cells.append(c)
    nb.cells = cells
    title = next((m[1] for c in nb.cells if c.cell_type == 'markdown' for m in [re.match(r'#\s+(.+)', c.source)] if m), None)
    if title: nb.metadata['title'] = title.strip()
    return nb


def sidebar(path: Path = NBS / 'sidebar.yml') -> list[tuple[str, list[str]]]:
    "(section, notebooks) in the order of nbs/sidebar.yml; top-level entries form the section ''."
    out = [('', [])]
    for item in yaml.safe_load(path.read_text())['website']['sidebar']['contents']:
        if isinstance(item, str): out[0][1].append(item)
        else: out.append((item['section'], list(item['contents'])))
    return out


def nav_html(current: str, sections) -> str:
    "The navigation bar at the top of every page."
    def link(nb):
        name = Path(nb).stem
        label = 'home' if name == 'index' else name
        return f'<b>{label}</b>' if nb == current else f'<a href="{name}.html">{html.escape(label)}</a>'
    rows = [f'<div><span class="afd-sec">{html.escape(s) or "afd_nb"}</span> ' + ' · '.join(map(link, nbs)) + '</div>'
            for s, nbs in sections if nbs]
    style = ('<style>.afd-nav{font:13px/1.6 sans-serif;padding:8px 16px;border-bottom:1px solid #ddd;background:#fafafa}'
             '.afd-nav a{text-decoration:none}.afd-sec{font-weight:bold;margin-right:6px}</style>')
    return f'{style}<nav class="afd-nav">' + ''.join(rows) + '</nav>'


def mathjax_dir() -> Path:
    "MathJax 2 as the jupyter-server-mathjax package ships it."
    try: import jupyter_server_mathjax
    except ImportError:
        raise SystemExit('error: the pages need MathJax from the jupyter-server-mathjax package (a dev requirement in '
                         'settings.ini): run `make venv` or pip install -c constraints.txt jupyter-server-mathjax')
    return Path(jupyter_server_mathjax.__file__).parent / 'static'


def _exporter():
    import jinja2
    from nbconvert import HTMLExporter
    from nbconvert.filters.markdown_mistune import IPythonRenderer, MarkdownWithMath
    from nbconvert.preprocessors import TagRemovePreprocessor

    class Renderer(IPythonRenderer):
        """nbconvert's renderer, except that raw HTML without an `<img>` passes through as written. With embed_images
        nbconvert re-parses every raw HTML block to embed its images, which closes an open tag at the end of the block:
        `<details><summary>..</summary>`, a blank line, markdown, `</details>` would lose its body."""
        def block_html(self, html):
            return super().block_html(html) if '<img' in html else super(IPythonRenderer, self).block_html(html)
        def inline_html(self, html):
            return super().inline_html(html) if '<img' in html else super(IPythonRenderer, self).inline_html(html)

    class Exporter(HTMLExporter):
        @jinja2.pass_context
        def markdown2html(self, context, source):
            "nbconvert's markdown filter with `Renderer`."
            cell = context.get('cell', {})
            path = context.get('resources', {}).get('metadata', {}).get('path', '')
            renderer = Renderer(escape=False, attachments=cell.get('attachments', {}), embed_images=self.embed_images,
                                path=path, anchor_link_text=self.anchor_link_text,
                                exclude_anchor_links=self.exclude_anchor_links, **self.lexer_options)
            return MarkdownWithMath(renderer=renderer).render(source)

    ex = Exporter(template_name='lab', embed_images=True, exclude_input_prompt=True, exclude_output_prompt=True)
    ex.mathjax_url = MATHJAX_URL
    ex.register_preprocessor(TagRemovePreprocessor(remove_input_tags={'remove_input'},
                                                   remove_all_outputs_tags={'remove_output'}, enabled=True), enabled=True)
    return ex


def render(path: Path, out: Path, sections, exporter=None) -> Path:
    "Write `out/<name>.html` for the notebook at `path`; returns the page's path."
    exporter = exporter or _exporter()
    nb = page_notebook(nbformat.read(path, as_version=4))
    body, _ = exporter.from_notebook_node(nb, resources={'metadata': {'path': str(path.parent), 'name': path.stem}})
    body = re.sub(r'<script src="https?://[^"]*require[^"]*"></script>', '', body)   # require.js: only for widgets
    remote = re.findall(r'<(?:script|link|img)\b[^>]*\b(?:src|href)="(https?://[^"]+)"', body)
    if remote: raise RuntimeError(f'{path.name}: the page would load {remote[0]} from the network')
    body = body.replace(f'<script src="{MATHJAX_URL}">', MATHJAX_FONTS + f'<script src="{MATHJAX_URL}">', 1)
    body = re.sub(r'(<body[^>]*>)', lambda m: m[1] + nav_html(path.name, sections), body, count=1)
    page = out / f'{path.stem}.html'
    page.write_text(body, encoding='utf-8')
    return page


def build(paths: list[Path], out: Path = OUT) -> list[Path]:
    "Render `paths` into `out` with MathJax beside them."
    out.mkdir(parents=True, exist_ok=True)
    mj = out / 'mathjax'
    if not (mj / 'MathJax.js').exists():
        shutil.copytree(mathjax_dir(), mj, dirs_exist_ok=True)
    sections, ex = sidebar(), _exporter()
    return [render(p, out, sections, ex) for p in paths]


def chromium() -> str | None:
    "The Chromium binary, if installed."
    return shutil.which('chromium') or shutil.which('chromium-browser') or (
        '/usr/bin/chromium' if Path('/usr/bin/chromium').exists() else None)


def browse(page: Path, *args: str, budget_ms: int = 20000, timeout: float = 180) -> subprocess.CompletedProcess:
    "Open `page` in headless Chromium (a fresh profile) with `args` (e.g. --dump-dom); MathJax gets `budget_ms` to run."
    exe = chromium()
    if exe is None: raise FileNotFoundError('chromium is not installed (apt-get install chromium)')
    with tempfile.TemporaryDirectory() as prof:
        return subprocess.run([exe, *CHROMIUM_FLAGS, f'--user-data-dir={prof}', f'--virtual-time-budget={budget_ms}', *args,
                               page.resolve().as_uri()], capture_output=True, text=True, timeout=timeout)


def screenshot(page: Path, png: Path, width: int = 1200, height: int = 1500):
    "A PNG of the top of `page`, shrunk to half size."
    png.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as d:
        raw = Path(d) / 'shot.png'
        browse(page, f'--screenshot={raw}', f'--window-size={width},{height}')
        from PIL import Image
        im = Image.open(raw).convert('RGB')
        im.resize((width // 2, height // 2), Image.LANCZOS).quantize(colors=128).save(png, optimize=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('notebooks', nargs='*', help='notebooks to render (default: every library notebook)')
    ap.add_argument('--out', type=Path, default=OUT, help='output folder (default _pages/)')
    ap.add_argument('--screenshots', type=Path, help='also save home.png and notebook.png (00b_toy) here')
    a = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT / 'tools'))
    from run_notebooks import library_notebooks
    paths = [Path(p).resolve() for p in a.notebooks] or library_notebooks()
    pages = build(paths, a.out)
    print(f'{len(pages)} pages in {a.out}/ (open {a.out}/index.html)')
    if a.screenshots:
        for name, png in (('index', 'home.png'), ('00b_toy', 'notebook.png')):
            screenshot(a.out / f'{name}.html', a.screenshots / png)
        print(f'screenshots in {a.screenshots}/')
    return 0


if __name__ == '__main__':
    sys.exit(main())
