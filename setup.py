"""Packaging for afd_nb: everything is read from settings.ini (nbdev 2 layout)."""
from configparser import ConfigParser
from setuptools import find_packages, setup

cfg = ConfigParser(delimiters=['='])
cfg.read('settings.ini', encoding='utf-8')
c = cfg['DEFAULT']

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
    zip_safe=False,
)
