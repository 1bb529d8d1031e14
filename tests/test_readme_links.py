"The README and the user's guide: every relative link and every repository path they name in backticks exists."
import re
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ['README.md', 'GUIDE.md']


def _links(text: str) -> list[str]:
    "Targets of markdown links and images that point inside the repository (no URL, no pure #anchor)."
    out = re.findall(r'\]\(([^)\s]+)\)', text)
    return [t.split('#')[0] for t in out if not re.match(r'[a-z]+://|mailto:|#', t)]


def _paths(text: str) -> list[str]:
    "Repository paths named in backticks: `results/...`, `configs/...`, `nbs/...`, `tools/...`, `.github/...`."
    return [p.rstrip('/') for p in re.findall(r'`((?:results|configs|nbs|tools|tests|\.github|experiments)/[^`\s*<>]+)`', text)]


@pytest.mark.parametrize('doc', DOCS)
def test_links_and_paths_exist(doc):
    text = (ROOT / doc).read_text()
    missing = sorted({t for t in _links(text) + _paths(text) if t and not (ROOT / t).exists()})
    assert not missing, f'{doc} points at files that do not exist: {missing}'


def test_the_helpers_find_what_they_should():
    text = "see [a](nbs/index.ipynb#x), ![f](results/x.png), [web](https://a.b/c), [top](#two), `configs/demo.yaml`"
    assert _links(text) == ['nbs/index.ipynb', 'results/x.png']
    assert _paths(text) == ['configs/demo.yaml']
