"""Packaging for afd_nb: everything is read from settings.ini (nbdev 2 layout).

The experiment notebooks (experiments/*.ipynb) that `afd-sweep` executes are shipped inside the package, as
afd_nb/experiments/, so that a non-editable `pip install .` has them; a checkout finds them beside afd_nb/."""
from configparser import ConfigParser
from pathlib import Path
from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

cfg = ConfigParser(delimiters=['='])
cfg.read(Path(__file__).parent/'settings.ini', encoding='utf-8')
c = cfg['DEFAULT']


class BuildWithExperiments(build_py):
    "build_py that also copies experiments/*.ipynb into <lib>/afd_nb/experiments/ (not for editable installs)."
    def run(self):
        super().run()
        if getattr(self, 'editable_mode', False): return      # a checkout uses experiments/ in place
        dst = Path(self.build_lib)/c['lib_path']/'experiments'
        self.mkpath(str(dst))
        for nb in sorted(Path('experiments').glob('*.ipynb')): self.copy_file(str(nb), str(dst/nb.name))


setup(
    name=c['lib_name'], version=c['version'], description=c['description'],
    author=c['author'], author_email=c['author_email'], license=c['license'],
    url=c['git_url'], python_requires=f">={c['min_python']}",
    packages=find_packages(include=[c['lib_path'], c['lib_path'] + '.*']),
    include_package_data=True,
    install_requires=c['requirements'].split(),
    extras_require={'dev': c['dev_requirements'].split()},
    entry_points={'console_scripts': c['console_scripts'].split(),
                  'nbdev': [f"{c['lib_path']}={c['lib_path']}._modidx:d"]},
    cmdclass={'build_py': BuildWithExperiments},
    zip_safe=False,
)
