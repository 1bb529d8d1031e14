"""afd_nb.sweep and afd_nb.report: strict config reading, expansion, run ids, checks before any work,
skip/retry/failure handling, pre-training reuse, the report, the command line.

Most tests drive the real machinery (papermill, real kernels) with tiny stand-in notebooks that have the real
notebooks' parameter names; `test_smoke_sweep_real_notebooks` runs the real experiment notebooks on smoke settings.
The report tests build run folders by hand (stated values, so that means and sds can be checked exactly)."""
import json, math, os, subprocess, sys, time
from pathlib import Path
import nbformat, pytest, yaml
from afd_nb import sweep as S
from afd_nb import report as R

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
    _nb(folder/'finetune.ipynb', dict(dataset='cifar10', arch='resnet18', checkpoint=None, method='afd', alpha=0.05,
                                      beta=0.25, gamma=25, epochs=2, seed=0, out_dir='.'),
        _COUNT.replace('STAGE', "'finetune'") +
        "if seed == 666: raise RuntimeError('simulated crash (seed 666)')\n"
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


# ---------------------------------------------------------------- config reading and expansion (no kernels)
def test_load_config_coerces_and_flattens():
    c = S.load_config(dict(defaults=dict(eps='8/255', pretrain=dict(weight_decay='5e-4', epochs=100), lr='0.025', n='64'),
                           grid=dict(seed=3)))
    d = c['defaults']
    assert d['eps'] == 8 / 255 and d['pretrain.weight_decay'] == 5e-4           # the same float division / parse: exact
    assert d['pretrain.epochs'] == 100 and d['lr'] == 0.025 and d['n'] == 64 and isinstance(d['n'], int)
    assert c['grid'] == {'seed': [3]}


@pytest.mark.parametrize('bad, msg', [(dict(gird={}), "unknown config key 'gird'; did you mean 'grid'?"),
                                      (dict(grid=dict(alpha=[])), 'empty list'),
                                      (dict(stages=['train']), 'unknown stage'), (dict(stages=['pretrain']), 'added automatically'),
                                      (dict(stages=['evalute']), "did you mean 'evaluate'?"),
                                      (dict(overrides=[dict(when={})]), 'overrides'),
                                      (dict(name='nothing'), 'no parameters')])
def test_load_config_rejects_bad_configs(bad, msg):
    with pytest.raises(ValueError, match=msg.replace('?', r'\?')): S.load_config(bad)


@pytest.mark.parametrize('content, msg', [
    (b'', 'is empty'), (b'# only a comment\n', 'is empty'),
    (b'defaults:\n  alpha: 0.05\n  seed: 0\n  alpha: 0.1\n', "line 4: duplicate key 'alpha' (first on line 2)"),
    (b'defaults: {seed: 0}\ngrid: {seed: [0]}\ndefaults: {seed: 1}\n', "line 3: duplicate key 'defaults'"),
    (b'\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00', 'not a text file (byte 0x89 at offset 0'),
    (b'defaults: {seed: 0}\x00\x01', 'not valid YAML'),
    (b'defaults: [unclosed\n', 'not valid YAML'), (b'- a\n- b\n', 'is a mapping')])
def test_config_file_problems_are_one_line_naming_the_file(tmp_path, capsys, content, msg):
    "Empty, duplicate-key, binary and malformed files: one line naming the file, exit 2, nothing planned or written."
    p = tmp_path/'c.yaml'; p.write_bytes(content)
    with pytest.raises(ValueError) as e: S.load_config(p)
    assert msg in str(e.value) and str(p) in str(e.value) and '\n' not in str(e.value)
    assert S.main([str(p), '--dry-run', '--runs-dir', str(tmp_path/'runs')]) == 2
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and msg in err and not (tmp_path/'runs').exists()


@pytest.mark.parametrize('content, msg', [
    (b'defaults:\n  eps: 8/0\n', "defaults.eps: '8/0' divides by zero"),            # was a raw ZeroDivisionError
    (b'defaults: {seed: 0}\ngrid:\n  eps: [8/255, 4/0]\n', "grid.eps: '4/0' divides by zero"),
    (b'defaults: {seed: 0}\nstages: finetune\n', "stages: 'finetune' is not a list; write stages: [finetune]"),  # was "unknown stage 'f'"
    (b'defaults: {seed: 0}\njobs: 2.7\n', 'jobs: 2.7 is not a whole number >= 1'),   # was silently 2
    (b'defaults: {seed: 0}\njobs: -1\n', 'jobs: -1 is not a whole number >= 1'),
    (b'defaults: {seed: 0}\njobs: true\n', 'jobs: True is not a whole number >= 1')])
def test_bad_settings_are_one_line_naming_the_setting(tmp_path, capsys, content, msg):
    "Settings YAML accepts but the sweep cannot use: one line naming the file and the setting, exit 2, nothing written."
    p = tmp_path/'c.yaml'; p.write_bytes(content)
    with pytest.raises(ValueError) as e: S.load_config(p)
    assert msg in str(e.value) and str(p) in str(e.value) and '\n' not in str(e.value)
    assert S.main([str(p), '--dry-run', '--runs-dir', str(tmp_path/'runs')]) == 2
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and msg in err and not (tmp_path/'runs').exists()


def test_good_settings_still_load(tmp_path):
    p = tmp_path/'c.yaml'; p.write_text('defaults: {eps: 8/255}\nstages: [finetune]\njobs: 3\n')
    c = S.load_config(p)
    assert c['defaults']['eps'] == 8 / 255 and c['stages'] == ['finetune'] and c['jobs'] == 3


def test_notebooks_folder_is_relative_to_the_config_file(tmp_path):
    (tmp_path/'sub').mkdir()
    p = tmp_path/'sub'/'c.yaml'; p.write_text('notebooks: nbs\ndefaults: {seed: 0}\n')
    assert S.load_config(p)['notebooks'] == str(tmp_path/'sub'/'nbs')


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


def test_explicit_runs_with_lists_are_their_own_grid():
    "An ablation with seeds: {alpha: 0, seed: [0, 1, 2]} is three AFD runs, not crossed with the grid's methods."
    c = S.load_config(dict(defaults=dict(method='afd', alpha=0.05, beta=0.25, gamma=25),
                           grid=dict(method=['vaft', 'afd'], seed=[0, 1, 2]),
                           runs=[dict(method='afd', alpha=0, seed=[0, 1, 2]), dict(method='afd', beta=0, gamma=[0, 10])]))
    runs = [r['params'] for r in S.expand_runs(c)]
    assert len(runs) == 6 + 3 + 2
    assert sorted(p['seed'] for p in runs if p['alpha'] == 0) == [0, 1, 2]
    assert sorted(p['gamma'] for p in runs if p['beta'] == 0) == [0, 10]


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


def test_presets_pass_the_complete_dry_run(tmp_path):
    "Every preset's runs are planned against the real notebooks and fully checked (dry run: nothing runs or is written)."
    for p in CONFIGS.glob('*.yaml'):
        lines = []
        res = S.run_sweep(p, runs_dir=tmp_path, dry_run=True, log=lines.append)
        assert res['done'] == [] and not (tmp_path/S.load_config(p)['name']).exists()
        assert any(l.startswith(f'checked {len(S.expand_runs(S.load_config(p)))} runs') for l in lines), lines


def test_paper_numbers_match_evaluate_module():
    ev = pytest.importorskip('afd_nb.evaluate')
    names = {'vAFT': 'vaft', 'ARREST': 'arrest', 'AFD': 'afd', 'TRADES (scratch)': 'trades_scratch'}
    for arch, by_m in ev._PAPER.items():
        for m, vals in by_m.items():
            for ds, v in zip(ev.PAPER_DATASETS, vals): assert R.PAPER[arch][names[m]][ds] == tuple(v)


# ---------------------------------------------------------------- every run checked before any work
def _smoke(tmp_path, **changes) -> Path:
    "configs/smoke.yaml with changes to its defaults, written to tmp_path (real notebooks)."
    c = yaml.safe_load((CONFIGS/'smoke.yaml').read_text())
    for k, v in changes.items():
        if k in ('grid', 'runs', 'stages'): c[k] = v
        else: c['defaults'][k] = v
    p = tmp_path/'smoke.yaml'; p.write_text(yaml.safe_dump(c)); return p


@pytest.mark.parametrize('changes, msg', [
    (dict(grid=dict(method=['vaft', 'bogus'])), "run cifar10-resnet20-bogus-s0: finetune: TrainConfig.method='bogus': unknown; valid:"),
    (dict(update_rule='official', amp=True), 'TrainConfig.amp=True'),
    (dict(n_test=0), "evaluate: evaluate.n_test=0: must be null or an integer >= 1"),
    (dict(aa_version='standrad', autoattack=True), "evaluate.aa_version='standrad': unknown; did you mean 'standard'?"),
    (dict(stages=['evaluate']), "evaluate.weights='final'"),                     # nothing writes model_final.pt
    (dict(stages=['finetune', 'feature_gap'], **{'feature_gap.eval_steps': -1}), 'feature_gap.eval_steps=-1: must be an integer >= 0'),
    (dict(pretrain=dict(epochs=0), checkpoint='natural', arch='resnet18'), "pretrain: TrainConfig.epochs=0"),
    (dict(device='gpu'), "device='gpu': unknown"),
    (dict(n_trian=64), "unknown parameter 'n_trian'; did you mean 'n_train'?"),
    (dict(**{'evaluate.pgd_stesp': 3}), "unknown parameter 'evaluate.pgd_stesp'; did you mean 'pgd_steps'"),
    (dict(**{'evalaute.pgd_steps': 3}), "unknown stage prefix in 'evalaute.pgd_steps'; did you mean 'evaluate'?"),
])
def test_dry_run_checks_every_run_completely(tmp_path, capsys, changes, msg):
    "A value that would fail only once a kernel runs (or an hour later) is one line before any work, for --dry-run too."
    p = _smoke(tmp_path, **changes)
    for argv in ([str(p), '--dry-run'], [str(p)]):
        assert S.main(argv + ['--runs-dir', str(tmp_path/'runs')]) == 2
        err = capsys.readouterr().err
        assert msg in err and err.count('\n') == 1, err
    assert not (tmp_path/'runs').exists()


def test_absent_device_is_a_note_for_dry_run_and_an_error_for_a_run(tmp_path, capsys):
    torch = pytest.importorskip('torch')
    if torch.cuda.is_available(): pytest.skip('this machine has CUDA')
    p = _smoke(tmp_path, device='cuda')
    assert S.main([str(p), '--dry-run', '--runs-dir', str(tmp_path/'runs')]) == 0
    assert "note: device='cuda': CUDA is not available on this machine (checked with device=cpu)" in capsys.readouterr().out
    assert S.main([str(p), '--runs-dir', str(tmp_path/'runs')]) == 2
    assert 'CUDA is not available' in capsys.readouterr().err and not (tmp_path/'runs').exists()


def test_check_params_accepts_planned_outputs(tmp_path):
    p = dict(dataset='cifar10', arch='resnet20', weights='final', out_dir=str(tmp_path))
    with pytest.raises(ValueError, match='no earlier stage writes it'): S.check_params('evaluate', p)
    assert S.check_params('evaluate', p, planned=[tmp_path/'model_final.pt']) == []
    assert S.check_params('feature_gap', {**p, 'weights': 'pretrained', 'checkpoint': None}) == []


def test_defaults_of_the_notebooks_are_read_as_literals_never_run(tmp_path):
    nbdir = standins(tmp_path/'nbs')
    _nb(nbdir/'evaluate.ipynb', dict(n_test=100, seed=0, out_dir='.'), 'pass')
    nb = nbformat.read(nbdir/'evaluate.ipynb', as_version=4)
    nb.cells[0].source += "\nmarker = __import__('pathlib').Path(%r).touch()" % str(tmp_path/'ran')
    nbformat.write(nb, nbdir/'evaluate.ipynb')
    assert S._notebook_defaults(nbdir/'evaluate.ipynb') == dict(n_test=100, seed=0, out_dir='.')
    assert not (tmp_path/'ran').exists()


# ---------------------------------------------------------------- execution with stand-in notebooks
def _write(path, c):
    c = {k: v for k, v in c.items() if k in S.CONFIG_KEYS and v is not None}
    path.write_text(yaml.safe_dump(c)); return path


def test_unknown_parameter_stops_before_any_work(tmp_path):
    c = cfg(tmp_path, grid=dict(alpah=[0.1]))
    with pytest.raises(ValueError, match="unknown parameter 'alpah'; did you mean 'alpha'"): S.run_sweep(c, **quiet)
    assert not (tmp_path/'runs').exists()
    assert S.main([str(_write(tmp_path/'c.yaml', c)), '--dry-run']) == 2


def test_failure_keeps_going_then_retry_only_failed(tmp_path, capsys):
    c = cfg(tmp_path, grid=dict(method=['vaft', 'afd']), runs=[dict(seed=666)])
    path = _write(tmp_path/'t.yaml', c)
    assert S.main([str(path)]) == 1
    out = capsys.readouterr().out
    sd = tmp_path/'runs'/'t'
    bad, good = 'cifar10-resnet18-afd-a0.05-b0.25-g25-s666', ['cifar10-resnet18-vaft-s0', 'cifar10-resnet18-afd-a0.05-b0.25-g25-s0']
    assert f'FAILED {bad}' in out and 'simulated crash (seed 666)' in out
    for g in good:
        assert json.loads((sd/g/'status.json').read_text())['state'] == 'done'
        assert executions(sd/g) == ['finetune', 'evaluate']
        assert (sd/g/'finetune.ipynb').exists() and (sd/g/'evaluate.ipynb').exists()   # executed copies kept
    st = json.loads((sd/bad/'status.json').read_text())
    assert st['state'] == 'failed' and st['failed_stage'] == 'finetune' and 'RuntimeError: simulated crash' in st['error']
    assert executions(sd/bad) == ['finetune']                                           # evaluate never ran
    report = (sd/'report.md').read_text()
    assert 'Failures' in report and bad in report and '| AFD |' in report
    res = R.collect_results(sd).set_index('run_id')                                      # CPU seconds per stage
    for g in good:
        st = json.loads((sd/g/'status.json').read_text())['stages']
        assert [res.at[g, f'{s}_cpu_s'] for s in ('finetune', 'evaluate')] == [st[s]['cpu_s'] for s in ('finetune', 'evaluate')]
    assert res.at[bad, 'evaluate_cpu_s'] != res.at[bad, 'evaluate_cpu_s']                 # never ran: NaN
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
    assert S.main([str(path), '--only', '*-vaft-*', '--only', 's0']) == 0
    assert '0 to run' in capsys.readouterr().out


def test_parallel_jobs(tmp_path, capsys):
    "jobs=2: shared pre-training once, runs in two worker processes, failures kept apart, same files as sequential."
    c = cfg(tmp_path, jobs=2, defaults=dict(dataset='cifar10', arch='resnet18', method='afd', alpha=0.05, beta=0.25,
                                            gamma=25, seed=0, checkpoint='natural'),
            grid=dict(method=['vaft', 'afd']), runs=[dict(seed=666)])
    assert S.main([str(_write(tmp_path/'p.yaml', c))]) == 1
    out = capsys.readouterr().out
    sd = tmp_path/'runs'/'t'
    good = ['cifar10-resnet18-vaft-s0', 'cifar10-resnet18-afd-a0.05-b0.25-g25-s0']
    bad = 'cifar10-resnet18-afd-a0.05-b0.25-g25-s666'
    assert '3 runs, 2 at a time' in out and f'{good[0]} | ' in out and f'FAILED {bad}' in out
    (pre,) = (tmp_path/'runs'/'_pretrain').iterdir()
    assert executions(pre) == ['pretrain']
    for g in good:
        assert executions(sd/g) == ['finetune', 'evaluate'] and json.loads((sd/g/'status.json').read_text())['state'] == 'done'
    assert 'simulated crash' in json.loads((sd/bad/'status.json').read_text())['error']
    assert (sd/'report.md').exists()
    assert S.main([str(tmp_path/'p.yaml'), '--only', 's0']) == 0   # complete: nothing to run
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
            runs=[dict(checkpoint=None, method='vaft')])
    _nb(tmp_path/'nbs'/'pretrain.ipynb', dict(dataset='cifar10', arch='resnet18', epochs=100, out_dir='.'), "raise MemoryError('boom')")
    res = S.run_sweep(c, report=False, **quiet)
    assert res['done'] == ['cifar10-resnet18-vaft-checkpointnone-s0']
    (rid, err), = res['failed'].items()
    assert rid == 'cifar10-resnet18-afd-a0.05-b0.25-g25-natural-s0'
    assert 'pretrain' in err and 'MemoryError: boom' in err
    assert json.loads((tmp_path/'runs'/'t'/rid/'status.json').read_text())['state'] == 'failed'


# ---------------------------------------------------------------- the command line
def test_cli_console_script(tmp_path):
    exe = Path(sys.executable).parent/'afd-sweep'
    r = subprocess.run([str(exe), str(CONFIGS/'demo.yaml'), '--dry-run', '--runs-dir', str(tmp_path)],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert 'cifar10-resnet20-vaft-s0' in r.stdout and 'finetune → evaluate' in r.stdout and 'checked 2 runs' in r.stdout


def test_python_dash_m_runs_the_command_line(tmp_path):
    "`python -m afd_nb.sweep CONFIG` is the command line (it used to exit 0 doing nothing)."
    r = subprocess.run([sys.executable, '-m', 'afd_nb.sweep', str(CONFIGS/'smoke.yaml'), '--dry-run', '--runs-dir', str(tmp_path)],
                       capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert 'checked 2 runs' in r.stdout and 'cifar10-resnet20-vaft-s0' in r.stdout
    r = subprocess.run([sys.executable, '-m', 'afd_nb.sweep', str(tmp_path/'missing.yaml')], capture_output=True, text=True)
    assert r.returncode == 2 and 'sweep config not found' in r.stderr


def test_help_imports_nothing_heavy():
    "`afd-sweep --help` and `import afd_nb.sweep` load no torch, pandas, matplotlib, papermill or AutoAttack."
    code = ("import sys, afd_nb.sweep as S\n"
            "try: S.main(['--help'])\nexcept SystemExit as e: assert e.code == 0\n"
            "heavy = [m for m in ('torch', 'pandas', 'matplotlib', 'papermill', 'autoattack', 'seaborn') if m in sys.modules]\n"
            "print('heavy:', heavy)")
    r = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert 'heavy: []' in r.stdout and 'usage: afd-sweep' in r.stdout


def test_report_names_still_importable_from_sweep():
    from afd_nb.sweep import write_report, collect_results, PAPER
    assert write_report is R.write_report and collect_results is R.collect_results and PAPER is R.PAPER
    with pytest.raises(AttributeError): S.no_such_name


# ---------------------------------------------------------------- the report, from hand-made run folders
def _fake_run(sd: Path, rid: str, params: dict, ev: dict = None, epochs: list = None, state='done'):
    d = sd/rid; d.mkdir(parents=True)
    (d/'status.json').write_text(json.dumps(dict(state=state, hardware='test machine')))
    (d/'params.json').write_text(json.dumps(dict(finetune=params)))
    if ev: (d/'eval.json').write_text(json.dumps(ev))
    if epochs: (d/'metrics.jsonl').write_text(''.join(json.dumps(e) + '\n' for e in epochs) + '{"epoch": 9, "ga')  # torn line
    return d


def test_report_mean_sd_over_seeds_and_ablation_labels(tmp_path):
    sd = tmp_path/'sw'
    base = dict(dataset='cifar10', flavour='full', arch='resnet18', epochs=2, n_train=None)
    runs = [('vaft', 0.05, 0, 80.0), ('vaft', 0.05, 1, 82.0), ('vaft', 0.05, 2, 84.0),
            ('afd', 0.05, 0, 85.0), ('afd', 0.05, 1, 86.0), ('afd', 0.0, 0, 83.0), ('afd', 0.0, 1, 81.0)]
    for m, a, seed, clean in runs:
        ep = [dict(epoch=e, clean_acc=clean / 100 - 0.01 * (2 - e), pgd_acc=0.5, gap=dict(linf=0.1 * e + seed, linf_rel=0.01 * e,
              **(dict(d1_linf=0.2 * e, d1_linf_rel=0.02 * e) if m == 'afd' else {}))) for e in (0, 1, 2)]
        _fake_run(sd, f'{m}-a{a}-s{seed}', dict(base, method=m, alpha=a, beta=0.25, gamma=25, seed=seed),
                  dict(Clean=clean, PGD=50.0, AA=45.0, Avg=(clean + 95) / 3, n=10000, config=dict(autoattack=dict(name='standard'))), ep)
    (sd/'sweep.json').write_text(json.dumps(dict(name='sw', defaults=dict(alpha=0.05, beta=0.25, gamma=25))))
    res = R.collect_results(sd)
    assert sorted(res['label'].unique()) == ['AFD', 'AFD (α=0)', 'vAFT']
    s = R.summary_table(res).set_index('label')
    assert list(s.index) == ['vAFT', 'AFD', 'AFD (α=0)'] and list(s['n']) == [3, 2, 2]
    assert s.loc['vAFT', 'Clean_mean'] == 82.0 and s.loc['vAFT', 'Clean_sd'] == pytest.approx(2.0, rel=1e-15)  # (80, 82, 84): sd 2
    assert s.loc['AFD (α=0)', 'Clean_sd'] == pytest.approx(math.sqrt(2), rel=1e-15)                           # (83, 81)
    text = R.write_report(sd).read_text()
    assert '| vAFT | 3 | 0 1 2 | 82.00 ± 2.00 | 50.00 ± 0.00 | 45.00 ± 0.00 |' in text
    assert '| AFD (α=0) | 2 | 0 1 | 82.00 ± 1.41 |' in text
    assert '| vAFT | 82.00 / 50.00 / 45.00 / 59.00 (mean of 3) | 83.93 / 51.40 / 45.48 / 60.27 |' in text
    assert 'flavour **full**' in text and 'test machine' in text and '![feature gap per epoch](gap.png)' in text
    for f in ('gap.png', 'curves.png', 'sensitivity.png', 'results.csv', 'summary.csv', 'epochs.csv', 'table_resnet18.csv'):
        assert (sd/f).stat().st_size > 100, f
    ep = R.epoch_table(R.collect_metrics(sd, res))
    assert ep.loc[('vAFT', 'end (epoch 2)'), 'gap.linf'] == '1.2000 ± 1.0000'       # seeds 0, 1, 2 add 0, 1, 2
    assert ep.loc[('AFD', 'end (epoch 2)'), 'gap.d1_linf'] == '0.4000 ± 0.0000'


def test_report_figures_use_method_colours_and_seed_bands(tmp_path):
    import matplotlib; matplotlib.use('Agg')
    from matplotlib.colors import to_rgb
    from afd_nb.plots import METHOD_COLORS
    sd = tmp_path/'sw'
    for m, seed in [('vaft', 0), ('vaft', 1), ('afd', 0), ('arrest', 0)]:
        _fake_run(sd, f'{m}-s{seed}', dict(dataset='cifar10', arch='resnet20', method=m, seed=seed),
                  dict(Clean=80.0, PGD=40.0, AA=None, Avg=60.0, n=100),
                  [dict(epoch=e, clean_acc=0.8, pgd_acc=0.4 + 0.01 * seed, gap=dict(linf=1.0 + seed, linf_rel=0.1)) for e in (0, 1)])
    res = R.collect_results(sd); met = R.collect_metrics(sd, res)
    fig = R.plot_curves(met, res)
    ax = fig.axes[1]
    assert [l.get_label() for l in ax.lines] == ['vAFT', 'ARREST', 'AFD']
    assert [to_rgb(l.get_color()) for l in ax.lines] == [to_rgb(METHOD_COLORS[k]) for k in ('vaft', 'arrest', 'afd')]
    assert len(ax.collections) == 1                              # a band only for vAFT, the setting with 2 seeds
    assert 'mean ± sd over 1–2 seeds, by setting' in fig._suptitle.get_text() and 'ResNet-20' in fig._suptitle.get_text()
    gap = R.plot_gap(met, res)
    assert all(l.get_linestyle() == '-' for l in gap.axes[0].lines)   # no D1 here: backbone g(x) only, solid


def test_sensitivity_figure_and_report_only(tmp_path):
    sd = tmp_path/'runs'/'sens'
    pts = [(0.05, 0.25, 25), (0.01, 0.25, 25), (0.2, 0.25, 25), (0.05, 1.0, 25), (0.05, 0.25, 2), (0.05, 0.25, 30)]
    for a, b, g in pts:
        rid = S.run_id(dict(dataset='cifar10', arch='resnet18', method='afd', alpha=a, beta=b, gamma=g))
        _fake_run(sd, rid, dict(dataset='cifar10', arch='resnet18', method='afd', alpha=a, beta=b, gamma=g, seed=0),
                  dict(Clean=84 - 10 * a, PGD=52 + b, AA=None, Avg=0.0, n=100))
    res = R.collect_results(sd)
    fig = R.plot_sensitivity(res, dict(alpha=0.05, beta=0.25, gamma=25))
    assert [ax.get_xlabel() for ax in fig.axes] == ['α', 'β', 'γ']
    assert list(fig.axes[0].lines[0].get_ydata()) == [84 - 10 * a for a in (0.01, 0.05, 0.2)]   # the same float ops: exact
    assert sorted(res['label']) == sorted({'AFD', 'AFD (α=0.01)', 'AFD (α=0.2)', 'AFD (β=1)', 'AFD (γ=2)', 'AFD (γ=30)'})
    c = dict(name='sens', runs_dir=str(tmp_path/'runs'), defaults=dict(dataset='cifar10', arch='resnet18', method='afd',
                                                                       alpha=0.05, beta=0.25, gamma=25, seed=0),
             sweeps=dict(alpha=[0.01, 0.2], beta=[1.0], gamma=[2, 30]))
    assert S.main([str(_write(tmp_path/'sens.yaml', c)), '--report-only']) == 0    # no notebook involved
    assert (sd/'sensitivity.png').exists() and '![sensitivity](sensitivity.png)' in (sd/'report.md').read_text()


def test_claims_verdicts_and_a_study_in_progress(tmp_path):
    "Stated values: each claim's verdict follows the paired-t rule of 10b_report; a partial study names its unfinished runs."
    sd = tmp_path/'study'
    def run(rid, m, seed, acc, g0, g1, d1=None, state='done', **p):
        ep = [dict(epoch=e, clean_acc=0.5, pgd_acc=0.2, gap=dict(linf=g, linf_rel=g / 10, **({} if d1 is None else dict(d1_linf=d1, d1_linf_rel=d1 / 10))))
              for e, g in ((0, 7.0), (1, g0), (2, g1))]   # epoch 0 (the natural model) is left out
        ev = dict(Clean=acc[0], PGD=acc[1], AA=acc[2], Avg=sum(acc) / 3, n=100) if state == 'done' else None
        _fake_run(sd, rid, {**dict(dataset='cifar10', arch='resnet20', method=m, alpha=0.05, beta=0.25, gamma=25, seed=seed), **p}, ev, ep, state)
    for s in (0, 1, 2):
        run(f'vaft-s{s}', 'vaft', s, (80 + .9 * s, 40 + .9 * s, 30 + .9 * s), 1.0, 2.0 + 0.1 * s)  # gap widens by 1.1 ± 0.06
        run(f'rgkd-s{s}', 'rgkd', s, (80 + s, 40 + s, 30 + s), 1.0, 1.0 + 0.1 * (s - 1))    # gap unchanged on average: a tie
        run(f'afd-s{s}', 'afd', s, (85 + s, 45 + s, 35 + s), 1.0, 1.5 + 0.05 * s, d1=0.5)   # +5.1 ± 0.06 (paired) on each metric
        run(f'afd-b0-s{s}', 'afd', s, (90 + 1.1 * s, 45 + s, 35 + s), 1.0, 1.5, d1=0.5, **{'beta': 0})  # better clean without L_sep
    run('afd-s3', 'afd', 3, None, 1.0, 1.2, d1=0.5, state='running')
    (sd/'sweep.json').write_text(json.dumps(dict(name='study', defaults=dict(alpha=0.05, beta=0.25, gamma=25))))
    res = R.collect_results(sd); met = R.collect_metrics(sd, res)
    cl = R.claims_table(res, met).set_index('claim')['verdict']
    assert cl['1. AFD beats vAFT in clean and robust accuracy (%)'] == 'holds'                     # 5.1 ± 4.3 · 0.058
    assert cl['2. the absolute L∞ gap of the baselines widens during fine-tuning'] == 'inconclusive'   # vAFT widens, AFT+RGKD ties
    assert cl["3. AFD's absolute L∞ gap stays below vAFT's"] == 'holds' == cl["3. AFD's relative L∞ gap stays below vAFT's"]
    assert cl['4. L_sep contributes: AFD beats AFD without it (β = 0) (%)'] == 'does not hold'  # clean −5.1, reversed at 0.05/3
    assert not any(c.startswith('4. L_dis') for c in cl.index)                 # no α = 0 runs: that claim is not tested
    runs = [dict(id=p.name) for p in sorted(sd.glob('*-s*'))] + [dict(id='afd-g0-s0')]
    pr = R.progress(sd, runs).set_index('run_id')['state']
    assert pr['afd-s3'] == 'running' and pr['afd-g0-s0'] == 'not started' and (pr == 'done').sum() == 12
    text = R.write_report(sd, None, runs).read_text()
    assert "## The paper's claims at this scale" in text and '12 done, 1 running, 1 not started.' in text
    assert '## Not finished yet' in text and '* `afd-s3`: running' in text and '* `afd-g0-s0`: not started' in text
    assert '| AFD | 3 | 0 1 2 | 86.00 ± 1.00 |' in text                      # the running seed 3 is left out
    assert (sd/'claims.csv').exists() and (sd/'curves_afd.png').exists()    # AFD beside its 3-seed ablation


# ---------------------------------------------------------------- the real notebooks, smoke settings
def test_smoke_sweep_real_notebooks(tmp_path, cifar10_test, resnet20):
    "Two real runs + one that crashes at run time: report with table and gap figure; the second invocation re-runs no complete run."
    c = S.load_config(CONFIGS/'smoke.yaml')
    c['runs'] = [dict(method='afd', checkpoint=str(tmp_path/'damaged.th'))]
    (tmp_path/'damaged.th').write_bytes(b'PK\x03\x04 this is not a whole checkpoint')   # exists (passes the check), fails to load
    t = time.time()
    res = S.run_sweep(c, runs_dir=tmp_path, **quiet)
    sd = tmp_path/'smoke'
    good = ['cifar10-resnet20-vaft-pretrained-s0', 'cifar10-resnet20-afd-a0.05-b0.25-g25-pretrained-s0']
    assert sorted(res['done']) == sorted(good), res['failed']
    (bad, err), = res['failed'].items()
    assert bad == 'cifar10-resnet20-afd-a0.05-b0.25-g25-damaged-s0' and 'finetune' in err
    text = (sd/'report.md').read_text()
    assert '| vAFT |' in text and '| AFD |' in text and 'gap.png' in text and (sd/'gap.png').exists()
    for g in good:
        ev = json.loads((sd/g/'eval.json').read_text())
        assert ev['n'] == 32 and 0 <= ev['PGD'] <= 100 and 0 <= ev['Clean'] <= 100
        epochs = [json.loads(l)['epoch'] for l in (sd/g/'metrics.jsonl').read_text().splitlines()]
        assert epochs == [0, 1] and (sd/g/'model_final.pt').exists()
    mt = {g: (sd/g/'finetune.ipynb').stat().st_mtime_ns for g in good}
    res2 = S.run_sweep(c, runs_dir=tmp_path, **quiet)
    assert res2['done'] == [] and sorted(res2['skipped']) == sorted(good) and list(res2['failed']) == [bad]
    assert all((sd/g/'finetune.ipynb').stat().st_mtime_ns == mt[g] for g in good)
    assert json.loads((sd/bad/'status.json').read_text())['attempts'] == 2
    print(f'smoke sweep: {time.time() - t:.0f} s')


def test_sensitivity_panel_uses_the_seeds_every_value_has_and_labels_show_no_eval_keys(tmp_path):
    "Defaults with 3 seeds beside a one-seed α: the panel draws seed 0 for both; autoattack/n_aa never enter a label."
    sd = tmp_path/'runs'/'sens'
    for a, seed, clean in [(0.05, 0, 50.0), (0.05, 1, 60.0), (0.05, 2, 70.0), (0.01, 0, 40.0)]:
        p = dict(dataset='cifar10', arch='resnet18', method='afd', alpha=a, beta=0.25, gamma=25, seed=seed,
                 autoattack=a == 0.05, n_aa=100 if a == 0.05 else 0)
        _fake_run(sd, S.run_id(p), p, dict(Clean=clean, PGD=10.0, AA=None, Avg=0.0, n=100))
    res = R.collect_results(sd)
    fig = R.plot_sensitivity(res, dict(alpha=0.05, beta=0.25, gamma=25))
    ax = fig.axes[0]
    assert list(ax.lines[0].get_ydata()) == [40.0, 50.0]      # seed 0 only: not the 3-seed mean 60 beside it
    assert ax.get_title() == 'seed 0'
    assert sorted(set(res['label'])) == ['AFD', 'AFD (α=0.01)']
