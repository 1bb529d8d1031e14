"""The GPU check (afd_nb.gpucheck) on a CPU: its command line, its budget, its pricing of the paper preset, and the whole
check at toy size (`--device cpu --budget 60`), so that the first run on a GPU cannot fail on a typo. No timing is asserted."""
import json, os, shutil, signal, subprocess, sys, time
from pathlib import Path
import pytest
import torch
from afd_nb.gpucheck import Budget, BudgetExceeded, extrapolate, eval_passes, plan_natural, main, STAGES


def _cli(*args, timeout=600):
    return subprocess.run([sys.executable, '-m', 'afd_nb.gpucheck', *args], capture_output=True, text=True, timeout=timeout)


def test_entry_point_and_refusals():
    r = _cli('--help')
    assert r.returncode == 0 and r.stdout.startswith('usage: python -m afd_nb.gpucheck') and '--budget' in r.stdout
    r = _cli('--stages', 'env,gpu')
    assert r.returncode != 0 and "--stages: unknown ['gpu']" in r.stderr
    if not torch.cuda.is_available():
        r = _cli('--device', 'cuda')
        assert r.returncode != 0 and 'CUDA is not available here; use --device cpu' in r.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason='checks the CPU behaviour of the gpu marker')
def test_gpu_marker_deselected_by_default_and_skipped_with_reason():
    env = {k: v for k, v in os.environ.items() if k != 'AFD_GPU_TEST_DEVICE'}
    run = lambda *a: subprocess.run([sys.executable, '-m', 'pytest', 'tests/test_gpu.py', '-p', 'no:cacheprovider', *a],
                                    capture_output=True, text=True, timeout=600, env=env, cwd=Path(__file__).parent.parent)
    r = run('--collect-only', '-q')                        # default: the gpu set is deselected (pyproject addopts)
    assert r.returncode == 0 and 'deselected' in r.stdout and 'test_pgd_matches_cpu_float64' not in r.stdout, r.stdout[-1500:]
    r = run('-m', 'gpu', '-q')                             # selected on a CPU: every test skips, and says why
    assert r.returncode == 0 and ' passed' not in r.stdout and 'SKIPPED' in r.stdout, r.stdout[-1500:]
    assert 'needs a CUDA device: run by `make gpu-check`' in r.stdout, r.stdout[-1500:]


def test_shares_follow_the_stages_selected():
    from afd_nb.gpucheck import GpuCheck, SIZES
    mk = lambda stages: GpuCheck(torch.device('cpu'), Budget(100), Path('.'), Path('.'), Path('.'), size=SIZES['gpu'], stages=stages)
    assert mk(STAGES).share('tests') == pytest.approx(35) and mk(STAGES).share('bench') == pytest.approx(15)
    assert mk(('bench', 'run')).share('bench') == pytest.approx(100 * 0.15 / 0.65)   # run: what tests and bench leave (0.50)
    assert mk(('bench',)).share('bench') == pytest.approx(100)


class FakeClock:
    "Seconds that move only when the test says so."
    def __init__(self): self.t = 1000.0
    def __call__(self): return self.t


def test_budget_arithmetic_with_a_fake_clock():
    clock = FakeClock(); b = Budget(100, margin=1.25, clock=clock)
    assert (b.elapsed(), b.left()) == (0, 100) and b.fits(80) and not b.fits(80.1)     # 80 × 1.25 = 100
    clock.t += 70
    assert (b.elapsed(), b.left()) == (70, 30)
    assert b.fits(20) and not b.fits(20, reserve=10)                                    # 25 s predicted vs 30 / 20 s left
    with pytest.raises(BudgetExceeded, match='no time left'): b.hard_stop(reserve=30).__enter__()
    clock.t += 40
    assert b.left() == -10 and not b.fits(0.001)
    with pytest.raises(BudgetExceeded, match='no time left'): b.hard_stop().__enter__()


def test_hard_stop_interrupts_work():
    "Only 0.2 s left on the (fake) budget clock: the real alarm interrupts work that would otherwise run for minutes."
    clock = FakeClock(); b = Budget(100, clock=clock); clock.t += 99.8
    with pytest.raises(BudgetExceeded, match='budget of 100 s reached'):
        with b.hard_stop():
            for _ in range(60_000): time.sleep(0.01)          # 10 minutes if the alarm never came
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)  # no alarm left armed


def _ctx(budget, stages=STAGES, size='gpu'):
    from afd_nb.gpucheck import GpuCheck, SIZES
    return GpuCheck(torch.device('cpu'), budget, Path('.'), Path('.'), Path(__file__).resolve().parent.parent, size=SIZES[size], stages=stages)


def test_stages_give_way_when_the_budget_is_spent(tmp_path):
    "With the fake clock near the end: the tests stage skips (its cap < 10 s), and a stage stopped by the budget says so."
    from afd_nb.gpucheck import Report, run_stage, stage_tests
    clock = FakeClock(); ctx = _ctx(Budget(100, clock=clock)); ctx.out = tmp_path
    clock.t += 60                                              # 40 s left, but the later stages keep theirs
    res = {}; stage_tests(ctx, res)
    assert res['status'].startswith('skipped: only') and 'for the GPU tests' in res['status'], res
    def hits_the_budget(ctx, res): res['partial'] = 1; raise BudgetExceeded('budget of 100 s reached')
    r = run_stage('bench', hits_the_budget, ctx, Report(tmp_path, {}))
    assert r['status'] == 'stopped: budget of 100 s reached' and r['partial'] == 1
    assert json.loads((tmp_path / '3_bench.json').read_text())['status'] == r['status']


def test_plan_keeps_room_for_the_fine_tunes():
    n, why = plan_natural(1000, e_nat=10, e_aft=200, min_nat=10, max_nat=100, share=0.4, margin=1.0)
    assert n == 40 and '40%' in why                       # 40% of 1000 s at 10 s per epoch
    assert plan_natural(1000, 10, 950, 10, 100, 0.4, margin=1.0)[0] == 10   # the minimum, whatever the fine-tunes then get


def test_extrapolate_prices_every_run_of_the_paper_preset():
    "From per-epoch seconds of natural (1 s), vAFT (8 s) and AFD (9 s) on 50k images, every run of the preset is priced."
    ep = lambda tr, ev: dict(epochs=2, train_s=tr, eval_s=ev, other_s=0.0)
    res = dict(data=dict(n_train=50_000, n_eval=1000),
               runs=dict(natural=dict(per_epoch=ep(1.0, 0.5)), vaft=dict(per_epoch=ep(8.0, 1.0)), afd=dict(per_epoch=ep(9.0, 1.0))))
    x = extrapolate(res, Path(__file__).resolve().parent.parent / 'configs' / 'paper-resnet18.yaml')
    assert len(x['rows']) == 3 + 9 and not x['units']['aa_measured']
    c10_afd = next(r for r in x['rows'] if r['run'].startswith('cifar10-resnet18-afd'))
    t_pass = 1.0 / eval_passes(1000, 20)
    assert c10_afd['s'] > 20 * 9.0 + 10_000 * 42 * t_pass          # training + final clean/PGD-20, plus AutoAttack
    tiny = [r for r in x['rows'] if r['run'].startswith('tiny_imagenet') and 'afd' in r['run']][0]
    assert tiny['s'] > 7 * c10_afd['s'] / 2                          # 2x images and 4x pixels for training
    assert x['total_h'] == pytest.approx(sum(r['s'] for r in x['rows']) / 3600)


def test_cpu_toy_run(cifar10_train, tmp_path):
    "The whole check at toy size on the CPU (in this process: the CLI is tested above): every stage ends, every file is written."
    out = tmp_path / 'gpu'
    # the toy's sizes bound its work; a budget it cannot reach (10 h) keeps a slow or loaded machine from changing the
    # outcome (the budget logic itself: the fake-clock tests above)
    res = main(['--device', 'cpu', '--budget', '36000', '--flavour', 'exact', '--out', str(out)])
    print({s: (r['status'], r['seconds']) for s, r in res.items()})
    assert {s: r['status'] for s, r in res.items()} == {s: 'done' for s in STAGES}
    assert {p.name for p in out.iterdir()} >= {f'{i + 1}_{s}.json' for i, s in enumerate(STAGES)} | {'summary.md', 'log.txt'}
    disk = {s: json.loads((out / f'{i + 1}_{s}.json').read_text()) for i, s in enumerate(STAGES)}
    assert {s: r['status'] for s, r in disk.items()} == {s: r['status'] for s, r in res.items()}
    assert not any(r['status'].startswith('failed') for r in disk.values()), {s: r['status'] for s, r in disk.items()}
    assert disk['env']['tf32_default'] is not None and disk['env']['device'] == 'cpu'
    assert disk['tests']['counts']['FAILED'] == 0 and disk['tests']['counts']['ERROR'] == 0
    assert disk['tests']['counts']['PASSED'] >= 1, disk['tests']['status']
    assert 'fp32' in disk['bench']['modes'], disk['bench']['status']
    assert disk['bench']['modes']['fp32']['tf32_in_effect'] == dict(matmul=False, cudnn=False)
    assert disk['run']['runs']['natural']['epochs'], (disk['run']['status'], disk['run'].get('plan'))
    summary = (out / 'summary.md').read_text()
    assert summary.startswith('# GPU check') and 'CPU toy run' in summary and '## 4. A short real run' in summary


def test_installed_copy_writes_nothing_beside_itself(tmp_path):
    "A non-editable install (the package alone in site-packages): no results/ there; outside a checkout --out is required."
    site = tmp_path / 'site'; shutil.copytree(Path(__file__).resolve().parent.parent / 'afd_nb', site / 'afd_nb')
    work = tmp_path / 'elsewhere'; work.mkdir()
    env = {**os.environ, 'PYTHONPATH': str(site), 'OMP_NUM_THREADS': '1'}
    run = lambda *a: subprocess.run([sys.executable, '-m', 'afd_nb.gpucheck', '--device', 'cpu', '--stages', 'env', *a],
                                    capture_output=True, text=True, timeout=600, cwd=work, env=env)
    r = run()
    assert r.returncode != 0 and r.stderr.count('\n') == 1 and 'is not a checkout' in r.stderr and 'give --out DIR' in r.stderr, r.stderr
    r = run('--out', str(tmp_path / 'res'))
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / 'res' / '1_env.json').is_file()
    assert sorted(p.name for p in site.iterdir()) == ['afd_nb'] and not (site / 'results').exists()
    assert list(work.iterdir()) == []
    from afd_nb.gpucheck import _repo_root
    root = Path(__file__).resolve().parent.parent
    assert _repo_root(root) == root                           # this checkout (editable: the module's own folder)
