"""afd_nb.sweep: config expansion, run ids, skip/retry/failure handling, pre-training reuse, the report.

Most tests drive the real machinery (papermill, real kernels) with tiny stand-in notebooks that have the real
notebooks' parameter names; `test_smoke_sweep_real_notebooks` runs the real experiment notebooks on smoke settings."""
import json, os, subprocess, sys, time
from pathlib import Path
import nbformat, pytest, yaml
from afd_nb import sweep as S

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT/'configs'


# ---------------------------------------------------------------- stand-in notebooks
def _nb(path: Path, params: dict, body: str):
    nb = nbformat.v4.new_notebook(metadata={'kernelspec': {'name': 'python3', 'display_name': 'python3', 'language': 'python'}})
    nb.cells = [nbformat.v4.new_code_cell('\n'.join(f'{k} = {v!r}' for k, v in params.items())), nbformat.v4.new_code_cell(body)]
    nb.cells[0].metadata['tags'] = ['parameters']
    nbformat.write(nb, path)

_COUNT = "import pathlib, json\nout = pathlib.Path(out_dir); out.mkdir(parents=True, exist_ok=True)\n" \
         "with open(out/'executions.log', 'a') as f: f.write(STAGE + '\\n')\n"

def standins(folder: Path) -> Path:
    "Stand-in pretrain/finetune/evaluate notebooks: they log every execution and write the real output files."
    folder.mkdir(parents=True, exist_ok=True)
    _nb(folder/'pretrain.ipynb', dict(dataset='cifar10', arch='resnet18', epochs=100, out_dir='.'),
        _COUNT.replace('STAGE', "'pretrain'") + "(out/'model_final.pt').write_text(f'{dataset} {arch} {epochs}')")
    _nb(folder/'finetune.ipynb', dict(dataset='cifar10', arch='resnet18', checkpoint='pretrained', method='afd', alpha=0.05,
                                      beta=0.25, gamma=25, epochs=2, seed=0, out_dir='.'),
        _COUNT.replace('STAGE', "'finetune'") +
        "if method not in ('afd', 'vaft'): raise ValueError(f'unknown method {method!r}; valid: afd, vaft')\n"
        "(out/'checkpoint_used.txt').write_text(str(checkpoint))\n"
        "with open(out/'metrics.jsonl', 'w') as f:\n"
        "    for e in range(1, epochs + 1): f.write(json.dumps(dict(epoch=e, gap=dict(linf=0.1 * e + alpha, linf_rel=0.05 * e))) + '\\n')\n"
        "(out/'model_final.pt').write_text('x')")
    _nb(folder/'evaluate.ipynb', dict(n_test=100, seed=0, out_dir='.'),
        _COUNT.replace('STAGE', "'evaluate'") +
        "(out/'eval.json').write_text(json.dumps(dict(Clean=80.0 + seed, PGD=50.0, AA=None, Avg=(130.0 + seed) / 2, n=n_test)))")
    return folder

def executions(run_dir: Path) -> list:
    p = run_dir/'executions.log'
    return p.read_text().split() if p.exists() else []

def cfg(tmp_path, **kw) -> dict:
    c = dict(name='t', notebooks=str(standins(tmp_path/'nbs')), runs_dir=str(tmp_path/'runs'), stages=['finetune', 'evaluate'],
             defaults=dict(dataset='cifar10', arch='resnet18', method='afd', alpha=0.05, beta=0.25, gamma=25, seed=0))
    c.update(kw)
    return S.load_config(c)

quiet = dict(log=lambda s: None)


# ---------------------------------------------------------------- config and expansion (no kernels)
def test_load_config_coerces_and_flattens():
    c = S.load_config(dict(defaults=dict(eps='8/255', pretrain=dict(weight_decay='5e-4', epochs=100), lr='0.025', n='64'),
                           grid=dict(seed=3)))
    d = c['defaults']
    assert d['eps'] == pytest.approx(8 / 255) and d['pretrain.weight_decay'] == pytest.approx(5e-4)
    assert d['pretrain.epochs'] == 100 and d['lr'] == 0.025 and d['n'] == 64 and isinstance(d['n'], int)
    assert c['grid'] == {'seed': [3]}


@pytest.mark.parametrize('bad, msg', [(dict(gird={}), 'unknown config key'), (dict(grid=dict(alpha=[])), 'empty list'),
                                      (dict(stages=['train']), 'unknown stage'), (dict(stages=['pretrain']), 'added automatically'),
                                      (dict(overrides=[dict(when={})]), 'overrides')])
def test_load_config_rejects_bad_configs(bad, msg):
    with pytest.raises(ValueError, match=msg): S.load_config(bad)


def test_run_id_readable_and_stable():
    p = dict(dataset='cifar10', arch='resnet18', method='afd', update_rule='official', alpha=0.05, beta=0.25, gamma=25, seed=0)
    assert S.run_id(p) == 'cifar10-resnet18-afd-a0.05-b0.25-g25-s0'
    assert S.run_id({**p, 'update_rule': 'joint', 'seed': 3}) == 'cifar10-resnet18-afd-joint-a0.05-b0.25-g25-s3'
    assert S.run_id({**p, 'method': 'vaft'}) == 'cifar10-resnet18-vaft-s0'        # AFD weights do not name other methods
    assert S.run_id({**p, 'epochs': 5, 'flavour': 'jpeg'}, varied=['epochs', 'flavour']).endswith('-e5-jpeg-s0')


def test_expand_grid_sweeps_runs_overrides():
    c = S.load_config(dict(defaults=dict(dataset='cifar10', arch='resnet18', method='afd', alpha=0.05, beta=0.25, gamma=25, seed=0),
                           grid=dict(dataset=['cifar10', 'cifar100'], seed=[0, 1]), sweeps=dict(alpha=[0.01, 0.05]),
                           runs=[dict(method='vaft')],
                           overrides=[dict(when=dict(dataset='cifar100'), set=dict(beta=1.0, alpha=0.1))]))
    runs = S.expand_runs(c)
    ids = [r['id'] for r in runs]
    # CIFAR-10: {default α=0.05, α=0.01} (the sweep's α=0.05 is the default: merged); CIFAR-100: the override's α=0.1
    # plus the sweep's explicit 0.01 and 0.05 (explicit values win over overrides); × 2 seeds; + the vAFT run
    assert len(ids) == len(set(ids)) == 2 * 2 + 3 * 2 + 1
    c100 = [r['params'] for r in runs if r['params']['dataset'] == 'cifar100']
    assert {p['beta'] for p in c100} == {1.0} and sorted({p['alpha'] for p in c100}) == [0.01, 0.05, 0.1]
    assert S.expand_runs(c) == runs                       # deterministic


def test_expand_refuses_ambiguous_ids():
    "Two different runs that would share a folder (values that print alike) are refused, not merged."
    c = S.load_config(dict(defaults=dict(method='afd', beta=0.25, gamma=25), runs=[dict(alpha=0.05), dict(alpha=0.050000001)]))
    with pytest.raises(ValueError, match='differ'): S.expand_runs(c)


def test_presets_expand():
    n = {p.stem: len(S.expand_runs(S.load_config(p))) for p in CONFIGS.glob('*.yaml')}
    assert n['paper-resnet18'] == n['paper-wrn34'] == 9 and n['sensitivity'] == 10 and n['demo'] == 2 and n['smoke'] == 2
    for name in ('paper-resnet18', 'paper-wrn34'):
        runs = S.expand_runs(S.load_config(CONFIGS/f'{name}.yaml'))
        assert {(r['params']['dataset'], r['params']['method']) for r in runs} == \
            {(d, m) for d in ('cifar10', 'cifar100', 'tiny_imagenet') for m in ('vaft', 'arrest', 'afd')}
        afd100 = [r['params'] for r in runs if r['params']['dataset'] == 'cifar100' and r['params']['method'] == 'afd'][0]
        assert (afd100['alpha'], afd100['beta'], afd100['gamma']) == (0.1, 1.0, 50)
        assert all(r['params']['checkpoint'] == 'natural' and r['params']['autoattack'] for r in runs)
    sens = [r['params'] for r in S.expand_runs(S.load_config(CONFIGS/'sensitivity.yaml'))]
    assert sorted({p['alpha'] for p in sens}) == [0.01, 0.05, 0.1, 0.2]
    assert sorted({p['gamma'] for p in sens}) == [2, 10, 25, 30]
    assert sum(p['beta'] != 0.25 for p in sens) == 3 and sum(p['alpha'] != 0.05 for p in sens) == 3


def test_presets_only_use_declared_parameters(tmp_path):
    "Every preset's parameters exist in the real experiment notebooks (dry run plans each run, runs nothing)."
    for p in CONFIGS.glob('*.yaml'):
        res = S.run_sweep(p, runs_dir=tmp_path, dry_run=True, **quiet)
        assert res['done'] == [] and not (tmp_path/S.load_config(p)['name']).exists()


def test_paper_numbers_match_evaluate_module():
    ev = pytest.importorskip('afd_nb.evaluate')
    names = {'vAFT': 'vaft', 'ARREST': 'arrest', 'AFD': 'afd', 'TRADES (scratch)': 'trades_scratch'}
    for arch, by_m in ev._PAPER.items():
        for m, vals in by_m.items():
            for ds, v in zip(ev.PAPER_DATASETS, vals): assert S.PAPER[arch][names[m]][ds] == tuple(v)


# ---------------------------------------------------------------- execution with stand-in notebooks
def test_unknown_parameter_stops_before_any_work(tmp_path):
    c = cfg(tmp_path, grid=dict(alpah=[0.1]))
    with pytest.raises(ValueError, match="unknown parameter 'alpah'"): S.run_sweep(c, **quiet)
    assert not (tmp_path/'runs').exists()
    assert S.main([str(_write(tmp_path/'c.yaml', c)), '--dry-run']) == 2


def _write(path, c):
    c = {k: v for k, v in c.items() if k in S.CONFIG_KEYS and v is not None}
    path.write_text(yaml.safe_dump(c)); return path


def test_failure_keeps_going_then_retry_only_failed(tmp_path, capsys):
    c = cfg(tmp_path, grid=dict(method=['vaft', 'afd']), runs=[dict(method='bogus')])
    path = _write(tmp_path/'t.yaml', c)
    assert S.main([str(path)]) == 1
    out = capsys.readouterr().out
    sd = tmp_path/'runs'/'t'
    bad, good = 'cifar10-resnet18-bogus-s0', ['cifar10-resnet18-vaft-s0', 'cifar10-resnet18-afd-a0.05-b0.25-g25-s0']
    assert f'FAILED {bad}' in out and "unknown method 'bogus'" in out
    for g in good:
        assert json.loads((sd/g/'status.json').read_text())['state'] == 'done'
        assert executions(sd/g) == ['finetune', 'evaluate']
        assert (sd/g/'finetune.ipynb').exists() and (sd/g/'evaluate.ipynb').exists()   # executed copies kept
    st = json.loads((sd/bad/'status.json').read_text())
    assert st['state'] == 'failed' and st['failed_stage'] == 'finetune' and "unknown method 'bogus'" in st['error']
    assert executions(sd/bad) == ['finetune']                                           # evaluate never ran
    report = (sd/'report.md').read_text()
    assert 'Failures' in report and bad in report and '| AFD |' in report
    mtimes = {g: (sd/g/'finetune.ipynb').stat().st_mtime_ns for g in good}
    # second invocation: the complete runs are skipped, the failed one is retried (and fails again)
    assert S.main([str(path)]) == 1
    out = capsys.readouterr().out
    assert '2 complete, 1 to run' in out
    for g in good:
        assert executions(sd/g) == ['finetune', 'evaluate'] and (sd/g/'finetune.ipynb').stat().st_mtime_ns == mtimes[g]
        assert json.loads((sd/g/'status.json').read_text())['attempts'] == 1
    assert executions(sd/bad) == ['finetune', 'finetune']
    assert json.loads((sd/bad/'status.json').read_text())['attempts'] == 2
    # only the good ones selected: nothing runs, exit 0
    assert S.main([str(path), '--only', '*-vaft-*', '--only', 'afd']) == 0
    assert '0 to run' in capsys.readouterr().out


def test_parallel_jobs(tmp_path, capsys):
    "jobs=2: shared pre-training once, runs in two worker processes, failures kept apart, same files as sequential."
    c = cfg(tmp_path, jobs=2, defaults=dict(dataset='cifar10', arch='resnet18', method='afd', alpha=0.05, beta=0.25,
                                            gamma=25, seed=0, checkpoint='natural'),
            grid=dict(method=['vaft', 'afd']), runs=[dict(method='bogus')])
    assert S.main([str(_write(tmp_path/'p.yaml', c))]) == 1
    out = capsys.readouterr().out
    sd = tmp_path/'runs'/'t'
    good = ['cifar10-resnet18-vaft-s0', 'cifar10-resnet18-afd-a0.05-b0.25-g25-s0']
    assert '3 runs, 2 at a time' in out and f'{good[0]} | ' in out and 'FAILED cifar10-resnet18-bogus-s0' in out
    (pre,) = (tmp_path/'runs'/'_pretrain').iterdir()
    assert executions(pre) == ['pretrain']
    for g in good:
        assert executions(sd/g) == ['finetune', 'evaluate'] and json.loads((sd/g/'status.json').read_text())['state'] == 'done'
    assert "unknown method 'bogus'" in json.loads((sd/'cifar10-resnet18-bogus-s0'/'status.json').read_text())['error']
    assert (sd/'report.md').exists()
    assert S.main([str(tmp_path/'p.yaml'), '--only', 'vaft', '--only', 'afd']) == 0   # complete: nothing to run
    assert executions(sd/good[0]) == ['finetune', 'evaluate']


def test_changed_parameter_reruns_from_that_stage(tmp_path):
    c = cfg(tmp_path, defaults=dict(dataset='cifar10', arch='resnet18', method='afd', alpha=0.05, beta=0.25, gamma=25,
                                    seed=0, n_test=100))
    S.run_sweep(c, report=False, **quiet)
    rd = tmp_path/'runs'/'t'/'cifar10-resnet18-afd-a0.05-b0.25-g25-s0'
    assert executions(rd) == ['finetune', 'evaluate']
    c['defaults']['n_test'] = 50                      # an evaluate-only parameter: fine-tuning stays
    res = S.run_sweep(c, report=False, **quiet)
    assert res['done'] == [rd.name] and executions(rd) == ['finetune', 'evaluate', 'evaluate']
    assert json.loads((rd/'eval.json').read_text())['n'] == 50
    S.run_sweep(c, report=False, **quiet)
    assert executions(rd) == ['finetune', 'evaluate', 'evaluate']


def test_interrupted_run_is_retried(tmp_path):
    c = cfg(tmp_path)
    S.run_sweep(c, report=False, **quiet)
    rd = tmp_path/'runs'/'t'/'cifar10-resnet18-afd-a0.05-b0.25-g25-s0'
    st = json.loads((rd/'status.json').read_text())
    st['state'] = 'running'; st['stages']['evaluate']['state'] = 'running'   # as left by a killed sweep
    (rd/'status.json').write_text(json.dumps(st))
    S.run_sweep(c, report=False, **quiet)
    assert executions(rd) == ['finetune', 'evaluate', 'evaluate']
    assert json.loads((rd/'status.json').read_text())['state'] == 'done'
    assert not list(rd.glob('.*tmp*'))                 # atomic writes leave no temporary files


def test_pretraining_is_shared_and_reused(tmp_path):
    c = cfg(tmp_path, stages=['finetune'],
            defaults=dict(dataset='cifar10', arch='resnet18', method='afd', alpha=0.05, beta=0.25, gamma=25,
                          seed=0, checkpoint='natural', pretrain=dict(epochs=7)),
            grid=dict(method=['vaft', 'afd']), runs=[dict(dataset='cifar100')])
    res = S.run_sweep(c, report=False, **quiet)
    assert len(res['done']) == 3 and not res['failed']
    pre = sorted((tmp_path/'runs'/'_pretrain').iterdir())    # one per dataset, not one per run
    assert [p.name.rsplit('-', 1)[0] for p in pre] == ['cifar10-none-resnet18', 'cifar100-none-resnet18']
    for p in pre:
        assert executions(p) == ['pretrain'] and (p/'model_final.pt').read_text().endswith(' 7')   # pretrain.epochs reached it
    used = (tmp_path/'runs'/'t'/'cifar100-resnet18-afd-a0.05-b0.25-g25-s0'/'checkpoint_used.txt').read_text()
    assert used == str(pre[1]/'model_final.pt')
    c2 = cfg(tmp_path, name='t2', stages=['finetune'], defaults=c['defaults'])   # another sweep reuses it
    assert S.run_sweep(c2, report=False, **quiet)['done'] == ['cifar10-resnet18-afd-a0.05-b0.25-g25-s0']
    assert executions(pre[0]) == ['pretrain']


def test_failed_pretraining_fails_its_runs_only(tmp_path):
    c = cfg(tmp_path, defaults=dict(dataset='cifar10', arch='resnet18', method='afd', alpha=0.05, beta=0.25, gamma=25,
                                    seed=0, checkpoint='natural'),
            runs=[dict(checkpoint='pretrained', method='vaft')])
    _nb(tmp_path/'nbs'/'pretrain.ipynb', dict(dataset='cifar10', arch='resnet18', epochs=100, out_dir='.'), "raise MemoryError('boom')")
    res = S.run_sweep(c, report=False, **quiet)
    assert res['done'] == ['cifar10-resnet18-vaft-pretrained-s0']
    (rid, err), = res['failed'].items()
    assert rid == 'cifar10-resnet18-afd-a0.05-b0.25-g25-natural-s0'
    assert 'pretrain' in err and 'MemoryError: boom' in err
    assert json.loads((tmp_path/'runs'/'t'/rid/'status.json').read_text())['state'] == 'failed'


def test_cli_console_script(tmp_path):
    exe = Path(sys.executable).parent/'afd-sweep'
    r = subprocess.run([str(exe), str(CONFIGS/'demo.yaml'), '--dry-run', '--runs-dir', str(tmp_path)],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert 'cifar10-resnet20-vaft-s0' in r.stdout and 'finetune → evaluate' in r.stdout


# ---------------------------------------------------------------- report from fake results
def test_report_from_fake_results(tmp_path):
    sd = tmp_path/'sw'
    for m, seed, clean in [('vaft', 0, 80.0), ('vaft', 1, 82.0), ('afd', 0, 85.0)]:
        d = sd/f'cifar10-resnet18-{m}-s{seed}'; d.mkdir(parents=True)
        (d/'status.json').write_text(json.dumps(dict(state='done', hardware='test machine')))
        (d/'params.json').write_text(json.dumps(dict(finetune=dict(dataset='cifar10', flavour='full', arch='resnet18', method=m,
                                                                   seed=seed, epochs=3, n_train=None))))
        (d/'eval.json').write_text(json.dumps(dict(Clean=clean, PGD=50.0, AA=45.0, Avg=(clean + 95) / 3, n=10000,
                                                   config=dict(autoattack=dict(name='standard')))))
        (d/'metrics.jsonl').write_text(''.join(json.dumps(dict(epoch=e, gap=dict(linf=0.1 * e, linf_rel=0.01 * e))) + '\n'
                                               for e in (1, 2, 3)) + '{"epoch": 4, "ga')   # torn last line is ignored
    rep = S.write_report(sd)
    text = rep.read_text()
    assert '| vAFT | 81.00 / 50.00 / 45.00 / 58.67 (mean of 2) | 83.93 / 51.40 / 45.48 / 60.27 |' in text
    assert 'flavour **full**' in text and 'test machine' in text and '![feature gap per epoch](gap.png)' in text
    assert (sd/'gap.png').stat().st_size > 1000 and (sd/'results.csv').exists() and (sd/'table_resnet18.csv').exists()
    assert not (sd/'sensitivity.png').exists()        # nothing varied α, β, γ


def test_sensitivity_figure_and_report_only(tmp_path):
    sd = tmp_path/'runs'/'sens'
    pts = [(0.05, 0.25, 25), (0.01, 0.25, 25), (0.2, 0.25, 25), (0.05, 1.0, 25), (0.05, 0.25, 2), (0.05, 0.25, 30)]
    for a, b, g in pts:
        d = sd/S.run_id(dict(dataset='cifar10', arch='resnet18', method='afd', alpha=a, beta=b, gamma=g)); d.mkdir(parents=True)
        (d/'status.json').write_text(json.dumps(dict(state='done')))
        (d/'params.json').write_text(json.dumps(dict(finetune=dict(dataset='cifar10', arch='resnet18', method='afd', alpha=a,
                                                                   beta=b, gamma=g, seed=0))))
        (d/'eval.json').write_text(json.dumps(dict(Clean=84 - 10 * a, PGD=52 + b, AA=None, Avg=0.0, n=100)))
    res = S.collect_results(sd)
    fig = S.plot_sensitivity(res, dict(alpha=0.05, beta=0.25, gamma=25))
    assert [ax.get_xlabel() for ax in fig.axes] == ['α', 'β', 'γ']
    assert sorted(res['label']) == sorted({'AFD α=0.05 β=0.25 γ=25', 'AFD α=0.01 β=0.25 γ=25', 'AFD α=0.2 β=0.25 γ=25',
                                           'AFD α=0.05 β=1 γ=25', 'AFD α=0.05 β=0.25 γ=2', 'AFD α=0.05 β=0.25 γ=30'})
    c = dict(name='sens', runs_dir=str(tmp_path/'runs'), defaults=dict(dataset='cifar10', arch='resnet18', method='afd',
                                                                       alpha=0.05, beta=0.25, gamma=25, seed=0),
             sweeps=dict(alpha=[0.01, 0.2], beta=[1.0], gamma=[2, 30]))
    assert S.main([str(_write(tmp_path/'sens.yaml', c)), '--report-only']) == 0    # no notebook involved
    assert (sd/'sensitivity.png').exists() and '![sensitivity](sensitivity.png)' in (sd/'report.md').read_text()


# ---------------------------------------------------------------- the real notebooks, smoke settings
def test_smoke_sweep_real_notebooks(tmp_path, cifar10_test, resnet20):
    "Two real runs + one broken one: report with table and gap figure; the second invocation re-runs no complete run."
    c = S.load_config(CONFIGS/'smoke.yaml')
    c['runs'] = [dict(method='bogus')]
    t = time.time()
    res = S.run_sweep(c, runs_dir=tmp_path, **quiet)
    sd = tmp_path/'smoke'
    good = ['cifar10-resnet20-vaft-s0', 'cifar10-resnet20-afd-a0.05-b0.25-g25-s0']
    assert sorted(res['done']) == sorted(good), res['failed']
    (bad, err), = res['failed'].items()
    assert bad == 'cifar10-resnet20-bogus-s0' and 'bogus' in err
    text = (sd/'report.md').read_text()
    assert '| vAFT |' in text and '| AFD |' in text and 'gap.png' in text and (sd/'gap.png').exists()
    for g in good:
        ev = json.loads((sd/g/'eval.json').read_text())
        assert ev['n'] == 32 and 0 <= ev['PGD'] <= ev['Clean'] <= 100
        epochs = [json.loads(l)['epoch'] for l in (sd/g/'metrics.jsonl').read_text().splitlines()]
        assert epochs == [0, 1] and (sd/g/'model_final.pt').exists()
    mt = {g: (sd/g/'finetune.ipynb').stat().st_mtime_ns for g in good}
    res2 = S.run_sweep(c, runs_dir=tmp_path, **quiet)
    assert res2['done'] == [] and sorted(res2['skipped']) == sorted(good) and list(res2['failed']) == [bad]
    assert all((sd/g/'finetune.ipynb').stat().st_mtime_ns == mt[g] for g in good)
    assert json.loads((sd/bad/'status.json').read_text())['attempts'] == 2
    print(f'smoke sweep: {time.time() - t:.0f} s')
