"""The experiment notebooks (experiments/*.ipynb) run through papermill with smoke parameters on CPU, and the
parameters they are given really take effect (unusual values are found in what they write)."""
import ast, json, math, os
from dataclasses import fields
from pathlib import Path
import nbformat, pytest

pm = pytest.importorskip('papermill')
ROOT = Path(__file__).resolve().parent.parent
EXP = ROOT/'experiments'
SMOKE = dict(dataset='cifar10', flavour='exact', arch='resnet20', device='cpu')


@pytest.fixture(scope='module', autouse=True)
def one_thread():
    "One thread per kernel: on a shared 2-core machine, two threads are several times slower."
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv('OMP_NUM_THREADS', '1'); yield


def run(name: str, out: Path, **params) -> nbformat.NotebookNode:
    "Execute experiments/<name>.ipynb into out/<name>.ipynb with the given parameters; returns the executed notebook."
    out.mkdir(parents=True, exist_ok=True)
    dst = out/f'{name}.ipynb'
    pm.execute_notebook(str(EXP/f'{name}.ipynb'), str(dst), parameters=dict(params, out_dir=str(out)), kernel_name='python3',
                        progress_bar=False, cwd=str(out), start_timeout=300,   # a busy machine can take minutes to start a kernel
                        extra_arguments=['--IPKernelApp.log_level=CRITICAL'])
    return nbformat.read(dst, as_version=4)


def declared(name: str) -> dict:
    return {k: v['default'] for k, v in pm.inspect_notebook(str(EXP/f'{name}.ipynb')).items()}


def test_notebooks_present_and_parameterised():
    for name in ('pretrain', 'finetune', 'evaluate', 'feature_gap'):
        nb = nbformat.read(EXP/f'{name}.ipynb', as_version=4)
        tagged = [c for c in nb.cells if 'parameters' in c.metadata.get('tags', [])]
        assert len(tagged) == 1 and 'out_dir' in declared(name), name
        assert all(not c.get('outputs') for c in nb.cells if c.cell_type == 'code'), f'{name} is not clean'


def test_finetune_parameters_are_trainconfig_defaults():
    "Every TrainConfig field is a parameter of the fine-tuning notebook, with the same default (the sweep relies on it)."
    from afd_nb.train import TrainConfig
    d, cfg = declared('finetune'), TrainConfig()
    for f in fields(TrainConfig):
        if f.name == 'out_dir': continue
        assert f.name in d, f'finetune.ipynb lacks parameter {f.name}'
        val = eval(d[f.name], {})          # the literal in the parameters cell, e.g. '8 / 255'
        assert val == getattr(cfg, f.name), f'{f.name}: notebook {val!r} != TrainConfig {getattr(cfg, f.name)!r}'


def test_pretrain_parameters_are_the_recipe():
    "The pre-training notebook's defaults are afd_nb.pretrain's recipe."
    from afd_nb.pretrain import pretrain_config
    d, cfg = declared('pretrain'), pretrain_config()
    for k, v in d.items():
        if k in ('out_dir', 'fresh'): continue
        assert eval(v, {}) == getattr(cfg, k), f'{k}: notebook {v} != pretrain_config() {getattr(cfg, k)!r}'


@pytest.fixture(scope='module')
def finetuned(tmp_path_factory, cifar10_test, resnet20):
    "AFD from the pretrained ResNet-20 on 64 exact CIFAR-10 images, 1 epoch, with unusual seed and alpha."
    out = tmp_path_factory.mktemp('ft')/'cifar10-resnet20-afd'
    nb = run('finetune', out, **SMOKE, checkpoint='pretrained', method='afd', n_train=64, n_eval=16, epochs=1, batch_size=32,
             train_steps=1, eval_steps=2, seed=1234, alpha=0.0123)
    return out, nb


def test_finetune_writes_metrics_and_checkpoints(finetuned):
    out, nb = finetuned
    assert any('injected-parameters' in c.metadata.get('tags', []) for c in nb.cells)
    for f in ('metrics.jsonl', 'config.json', 'ckpt_last.pt', 'model_final.pt', 'model_final_raw.pt', 'finetune.json'): assert (out/f).exists(), f
    cfg = json.loads((out/'config.json').read_text())
    assert (cfg['seed'], cfg['alpha'], cfg['n_train'], cfg['method']) == (1234, 0.0123, 64, 'afd')   # injected values took effect
    rows = [json.loads(l) for l in (out/'metrics.jsonl').read_text().splitlines()]
    assert [r['epoch'] for r in rows] == [0, 1] and rows[1]['step'] == 2              # 64 images / batch 32
    assert rows[1]['gap']['linf'] > 0 and 'd1_linf' in rows[1]['gap']
    assert 0 <= rows[1]['pgd_acc'] <= 1 and 0 <= rows[1]['clean_acc'] <= 1   # fractions (PGD <= clean is likely, not guaranteed)
    assert rows[1]['eval_model'] == 'ema' and 0 <= rows[1]['raw']['pgd_acc'] <= 1 and 0 <= rows[1]['raw']['clean_acc'] <= 1
    assert set(rows[1]['dis']) == {'L_dis', 'L_sep', 'L_align', 'd1_dev', 'd2_dev', 'd2_acc', 'z1_acc'}
    assert all(math.isfinite(v) for v in rows[1]['dis'].values()) and 0 <= rows[1]['dis']['d2_acc'] <= 1
    summ = json.loads((out/'finetune.json').read_text())
    assert summ['config']['seed'] == 1234 and summ['device_name'].startswith('CPU')
    from afd_nb.models import build_model, load_checkpoint
    load_checkpoint(build_model('resnet20', 10), out/'model_final.pt')                  # a plain ResNet-20 state dict


def test_evaluate_notebook(finetuned):
    out, _ = finetuned
    run('evaluate', out, **SMOKE, n_test=24, n_aa=6, pgd_steps=2, autoattack=True, seed=77)
    ev = json.loads((out/'eval.json').read_text())
    assert ev['n'] == 24 and ev['n_aa'] == 6 and ev['config']['seed'] == 77 and ev['config']['pgd']['steps'] == 2
    assert ev['config']['autoattack']['version'] == 'standard'
    assert 0 <= ev['PGD'] <= 100 and 0 <= ev['Clean'] <= 100
    assert ev['AA'] <= ev['aa_subset']['Clean']     # AutoAttack attacks only the correctly classified images: by construction
    assert ev['Avg'] == (ev['Clean'] + ev['PGD'] + ev['AA']) / 3   # the notebook's own float64 expression, same order: exact
    assert ev['weights'] == 'ema' and ev['raw']['weights'] == 'raw' and (ev['raw']['n'], ev['raw']['n_aa']) == (24, 6)
    assert ev['raw']['Avg'] == (ev['raw']['Clean'] + ev['raw']['PGD'] + ev['raw']['AA']) / 3
    import numpy as np
    with np.load(out/'correct.npz') as z: c = {k: z[k] for k in z.files}
    assert set(c) == {'Clean', 'PGD', 'AA', 'raw_Clean', 'raw_PGD', 'raw_AA'} and all(v.dtype == bool for v in c.values())
    assert [len(c[k]) for k in ('Clean', 'PGD', 'AA', 'raw_Clean', 'raw_PGD', 'raw_AA')] == [24, 24, 6, 24, 24, 6]
    for k in ('Clean', 'PGD', 'AA'):                               # the percentages are these counts: equal exactly
        assert ev[k] == 100 * int(c[k].sum()) / len(c[k]) and ev['raw'][k] == 100 * int(c['raw_' + k].sum()) / len(c['raw_' + k]), k
    assert not list(out.glob('.correct.npz.tmp*'))


def test_feature_gap_notebook(finetuned):
    out, _ = finetuned
    run('feature_gap', out, **SMOKE, checkpoint='pretrained', n_eval=12, eval_steps=2, seed=5)
    g = json.loads((out/'gap.json').read_text())
    assert g['n'] == 12 and g['start']['n'] == 12 and g['attack'] == dict(eps=8 / 255, steps=2, step_size=0.003, seed=5)
    assert g['linf'] > 0 and g['start']['linf'] > 0 and g['linf'] != g['start']['linf']


def test_pretrain_notebook(tmp_path, cifar10_train):
    "Natural training from scratch (ResNet-20, 64 images, 1 epoch); the model it writes is what fine-tuning loads."
    out = tmp_path/'pre'
    run('pretrain', out, **SMOKE, n_train=64, epochs=1, batch_size=32, n_eval=16, n_gap=8, eval_steps=1, seed=4321, lr=0.0321)
    cfg = json.loads((out/'config.json').read_text())
    assert (cfg['method'], cfg['seed'], cfg['lr'], cfg['checkpoint']) == ('natural', 4321, 0.0321, None)
    assert (out/'model_final.pt').exists() and json.loads((out/'pretrain.json').read_text())['epochs_done'] == 1
    from afd_nb.models import build_model, load_checkpoint
    load_checkpoint(build_model('resnet20', 10), out/'model_final.pt')
