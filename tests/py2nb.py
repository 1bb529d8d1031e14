"""Build a notebook from a percent-format script (authoring aid; the notebook is the source of truth).

    python tests/py2nb.py src.py nbs/03_feature_gap.ipynb

Cells start with `# %%`. `# %% [markdown]` cells have their leading `# ` stripped.
`# %% tags=["parameters"]` sets cell tags (papermill).
"""
import json, re, sys
import nbformat

def convert(src: str) -> nbformat.NotebookNode:
    nb = nbformat.v4.new_notebook()
    nb.metadata = {"kernelspec": {"display_name": "python3", "language": "python", "name": "python3"}}
    cells, cur = [], None
    for line in src.splitlines():
        if line.startswith('# %%'):
            if cur: cells.append(cur)
            hdr = line[4:].strip()
            m = re.search(r'tags=(\[.*?\])', hdr)
            cur = dict(md='[markdown]' in hdr or '[md]' in hdr, tags=json.loads(m.group(1)) if m else [], lines=[])
            continue
        if cur is None: cur = dict(md=False, tags=[], lines=[])
        cur['lines'].append(line)
    if cur: cells.append(cur)
    for c in cells:
        lines = c['lines']
        while lines and not lines[-1].strip(): lines.pop()
        while lines and not lines[0].strip(): lines.pop(0)
        if not lines: continue
        if c['md']:
            text = '\n'.join(re.sub(r'^# ?', '', l) for l in lines)
            cell = nbformat.v4.new_markdown_cell(text)
        else:
            cell = nbformat.v4.new_code_cell('\n'.join(lines))
        if c['tags']: cell.metadata['tags'] = c['tags']
        nb.cells.append(cell)
    return nb

if __name__ == '__main__':
    src, dst = sys.argv[1], sys.argv[2]
    nbformat.write(convert(open(src).read()), dst)
    print(f'wrote {dst}')
