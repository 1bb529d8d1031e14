"""The benchmark is a tool, not a test: here we only check that `python -m afd_nb.bench` is wired up
(the exported __main__ guard calls main(), arguments are validated). No timings are asserted."""
import subprocess, sys


def _run(*args):
    return subprocess.run([sys.executable, '-m', 'afd_nb.bench', *args], capture_output=True, text=True, timeout=120)


def test_module_entry_point_runs_main():
    r = _run('--help')
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith('usage: python -m afd_nb.bench') and '--repeats' in r.stdout and '--out' in r.stdout


def test_bad_arguments_are_refused_with_the_valid_choices():
    r = _run('--arch', 'resnet99')
    assert r.returncode == 2 and 'invalid choice' in r.stderr and 'resnet20' in r.stderr
