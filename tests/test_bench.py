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


def test_lever_rows_compile_time_and_break_even():
    "Compile time = first call − median; break-even = compile time / seconds saved per step against the same levers uncompiled."
    from afd_nb.bench import _lever_rows, format_levers
    k32, kc, kb, kall = ('vAFT step', 'fp32'), ('vAFT step', 'compile'), ('vAFT step', 'channels_last + bf16 attack'), ('vAFT step', 'all three')
    cases = dict.fromkeys([k32, kc, kb, kall])
    cpu = {k32: [2.0, 2.2, 1.8], kc: [1.5, 1.5, 1.6], kb: [1.0, 1.0, 1.0], kall: [1.2, 1.2, 1.2]}
    first = {k32: 2.0, kc: 31.5, kb: 1.0, kall: 41.2}
    rows = {r['lever']: r for r in _lever_rows(cases, {}, first, cpu, cpu, 128, 128)}
    assert rows['fp32']['speedup'] == 1.0 and abs(rows['channels_last + bf16 attack']['speedup'] - 2.0) < 1e-12
    c = rows['compile']
    assert c['compile_vs'] == 'fp32' and abs(c['compile_s'] - 30.0) < 1e-9 and abs(c['gain_per_step_s'] - 0.5) < 1e-9
    assert abs(c['break_even_steps'] - 60.0) < 1e-9 and abs(c['run_saving_s'] - (128 * 0.5 - 30)) < 1e-9
    a = rows['all three']                          # slower than its uncompiled twin: compiling never pays
    assert a['compile_vs'] == 'channels_last + bf16 attack' and a['gain_per_step_s'] < 0 and a['break_even_steps'] is None
    res = dict(settings=dict(arch='resnet20', batch=128, threads=1, repeats=3, run_steps=128), rows=list(rows.values()),
               hardware=dict(cpu='x', torch='t', cpu_capability='AVX512', cpu_flags=['avx512_bf16']),
               refused=[dict(case='AFD official step', lever='compile', why='refused by TrainConfig')])
    md = format_levers(res)
    assert '| compile | 1.50 · 85.3 · 1.33× | refused by TrainConfig |' in md and '| vAFT step, all three | 40 |' in md and '| never |' in md


def test_compile_with_official_rule_is_refused_in_the_lever_bench():
    import torch
    from afd_nb.bench import _lever_step
    from afd_nb.models import build_model
    m, x, y = build_model('resnet20', 10), torch.rand(2, 3, 32, 32), torch.tensor([0, 1])
    assert _lever_step('afd', 'official', m, m, x, y, compile=True) is None
    assert callable(_lever_step('afd', 'official', m, m, x, y, channels_last=True, attack='bf16'))
