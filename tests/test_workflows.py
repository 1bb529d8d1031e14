"""The CI workflows install what the tests ran with: every `pip install` of the package, in a workflow or in the
Makefile they call, is pinned by constraints.txt (issue 19)."""
import re
from pathlib import Path
import yaml

ROOT = Path(__file__).resolve().parent.parent


def _installs(text: str) -> list[str]:
    "Every command line that pip-installs the package (`-e .`, `.[dev]`, ...)."
    return [l.strip() for l in text.splitlines() if re.search(r'pip install\b', l) and re.search(r'(^|\s)(-e\s+)?"?\.(\[[^\]]*\])?"?(\s|$)', l)]


def test_every_install_of_the_package_is_pinned():
    found = {}
    for wf in sorted((ROOT / '.github' / 'workflows').glob('*.y*ml')):
        yaml.safe_load(wf.read_text())                                   # still valid YAML
        found[wf.name] = _installs(wf.read_text())
    found['Makefile'] = _installs((ROOT / 'Makefile').read_text())
    assert found['docs.yaml'] and found['Makefile'], found              # the docs build and the Makefile install it
    unpinned = {k: [l for l in v if '-c constraints.txt' not in l] for k, v in found.items()}
    assert not any(unpinned.values()), f'install without -c constraints.txt: {unpinned}'


def test_the_pattern_sees_an_unpinned_install():
    assert _installs('        run: pip install -e ".[dev]" --extra-index-url https://x') == ['run: pip install -e ".[dev]" --extra-index-url https://x']
    assert _installs('pip install pytest') == []
