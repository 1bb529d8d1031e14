"""afd_nb.pretrain: the natural pre-training recipe, the 'natural' method in the fine-tuning loop (no attack, ever),
and a tiny real run from scratch whose model_final.pt loads strictly into a fresh model."""
import json, math, subprocess, sys
import pytest
import torch

import afd_nb.attacks
import afd_nb.train
from afd_nb.models import CheckpointMismatchError, build_model, load_checkpoint
from afd_nb.pretrain import NATURAL_RECIPE, Natural, load_natural, pretrain, pretrain_config
from afd_nb.train import METHODS, Run, TrainConfig, fine_tune, lr_at_epoch

TINY = dict(n_train=64, batch_size=32, n_eval=16, n_gap=8, eval_steps=1, progress=False)


def test_default_config_is_the_recipe():
    c = pretrain_config()
    assert (c.method, c.checkpoint, c.arch, c.dataset) == ('natural', None, 'resnet18', 'cifar10')
    assert (c.lr, c.momentum, c.weight_decay, c.epochs, c.batch_size) == (0.1, 0.9, 5e-4, 100, 128)
    assert (c.lr_schedule, c.augment, c.ema) == ('multistep', True, False)
    lrs = {e: lr_at_epoch(e, c.lr, c.epochs, c.lr_schedule) for e in (1, 50, 51, 75, 76, 100)}
    eps64 = torch.finfo(torch.float64).eps   # 0.1 * 0.1**k: a couple of float64 roundings, relative
    assert lrs == pytest.approx({1: 0.1, 50: 0.1, 51: 0.01, 75: 0.01, 76: 0.001, 100: 0.001}, rel=4 * eps64, abs=0)
    assert c.out_dir == 'runs/pretrain/cifar10-resnet18'
    for d in ('cifar10', 'cifar100', 'tiny_imagenet'):
        for a in ('resnet18', 'wrn34_10'):
            assert pretrain_config(d, a).lr == 0.1                  # every paper configuration validates
    assert pretrain_config(lr_schedule='cosine', epochs=7, out_dir='x').lr_schedule == 'cosine'
    with pytest.raises(ValueError, match='learning_rate'): pretrain_config(learning_rate=0.1)
    with pytest.raises(ValueError, match='arch'): pretrain_config(arch='resnet19')


def test_natural_method_shape():
    m = METHODS['natural']
    assert isinstance(m, Natural) and not m.disentangle and not m.needs_teacher
    assert TrainConfig(method='natural').resolved().ema is False
    assert TrainConfig(method='natural', ema=True).resolved().ema is True
    assert m.weights(TrainConfig(method='natural')) == {'ce': 1.0}


def test_natural_registered_through_train_alone():
    "fine_tune(method='natural') must work for someone who never imports afd_nb.pretrain (train._load_plugins)."
    code = ("from afd_nb.train import TrainConfig, METHODS\n"
            "TrainConfig(method='natural', checkpoint=None, arch='resnet18').validate()\n"
            "print(type(METHODS['natural']).__module__)")
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == 'afd_nb.pretrain'


def _no_attack(*a, **k): raise AssertionError('the natural method called the attack')


def test_natural_never_attacks(monkeypatch, tmp_path, cifar10_train):
    x, y = cifar10_train.tensors(); x, y = x[:16], y[:16]
    for mod in (afd_nb.train, afd_nb.attacks): monkeypatch.setattr(mod, 'pgd', _no_attack)
    # the patched attack is the one the loop's training step uses: a method that attacks trips it ...
    net = build_model('resnet20', 10)
    cfg = TrainConfig(method='vaft', arch='resnet20', checkpoint=None).resolved()
    with pytest.raises(AssertionError, match='called the attack'):
        METHODS['vaft'].step(Run(cfg, net, opts=METHODS['vaft'].optimizers(net, cfg), gen=torch.Generator()), x, y)
    # ... the natural method does not: one step, and a whole run (no per-epoch evaluation, which attacks on purpose)
    cfg = pretrain_config(arch='resnet20')
    run = Run(cfg, net, opts=METHODS['natural'].optimizers(net, cfg))
    assert METHODS['natural'].attack(run, x, y) is x
    vals = METHODS['natural'].step(run, x, y)
    assert math.isfinite(vals['ce'])
    r = pretrain('cifar10', 'resnet20', epochs=1, out_dir=tmp_path / 'nat', n_train=32, batch_size=16, n_eval=0, progress=False)
    assert r['history'][-1]['epoch'] == 1 and 'pgd_acc' not in r['history'][-1]


def test_tiny_pretraining_run(tmp_path, cifar10_train):
    """ResNet-20 from scratch, 64 exact CIFAR-10 images, 3 epochs of batch 32 (constant lr 0.02, no augmentation: 6 steps
    are too few for lr 0.1 from scratch to lower the loss reliably)."""
    out = tmp_path / 'pre'
    r = pretrain('cifar10', 'resnet20', epochs=3, out_dir=out, seed=1, lr=0.02, lr_schedule='constant', augment=False, **TINY)
    for f in ('metrics.jsonl', 'model_final.pt', 'ckpt_last.pt', 'config.json'): assert (out / f).is_file(), f
    h = [json.loads(l) for l in (out / 'metrics.jsonl').read_text().splitlines()]
    assert [row['epoch'] for row in h] == [0, 1, 2, 3]
    assert [row['lr'] for row in h[1:]] == pytest.approx([0.02, 0.02, 0.02])
    assert all(math.isfinite(row['loss']) and 0 <= row['stats']['train_acc'] <= 1 for row in h[1:])
    # training lowers the clean CE by more than five standard errors of an epoch mean over the 64 images (the spread of
    # the final model's per-image CE / sqrt(64), in training mode, i.e. with batch statistics as the logged loss had them):
    # not noise, on any CPU (the trajectory itself differs between CPUs)
    import copy
    xt, yt = cifar10_train.tensors(); xt, yt = xt[:64], yt[:64]
    with torch.no_grad(): ce = torch.nn.functional.cross_entropy(copy.deepcopy(r['model']).train()(xt), yt, reduction='none')
    se = ce.std().item() / math.sqrt(len(ce))
    assert h[1]['loss'] - h[3]['loss'] > 5 * se, (h[1]['loss'], h[3]['loss'], se)
    assert all(row['eval_model'] == 'raw' for row in h)                 # no EMA by default
    cfg = json.loads((out / 'config.json').read_text())
    assert (cfg['method'], cfg['checkpoint'], cfg['lr'], cfg['weight_decay'], cfg['n_train'], cfg['seed']) == \
           ('natural', None, 0.02, 5e-4, 64, 1)
    # model_final.pt loads strictly into a fresh model and is the trained model
    fresh = load_checkpoint(build_model('resnet20', 10), out / 'model_final.pt').eval()
    x, y = cifar10_train.tensors(); x = x[:32]
    with torch.no_grad():
        assert torch.equal(fresh(x), r['model'].eval()(x))                  # the same weights and kernels: bit for bit
        assert torch.equal(load_natural(r['path'])(x), fresh(x))
        assert not torch.allclose(build_model('resnet20', 10).eval()(x), fresh(x), atol=1e-3)
    with pytest.raises(CheckpointMismatchError): load_checkpoint(build_model('resnet20', 100), out / 'model_final.pt')
    # the same call again resumes the finished run: nothing is retrained
    again = pretrain('cifar10', 'resnet20', epochs=3, out_dir=out, seed=1, lr=0.02, lr_schedule='constant', augment=False, **TINY)
    assert again['history'] == r['history']
    with torch.no_grad(): assert torch.equal(again['model'].eval()(x), fresh(x))


def test_load_natural_needs_the_model_for_a_bare_state_dict(tmp_path):
    net = build_model('resnet20', 10)
    torch.save(net.state_dict(), tmp_path / 'bare.pt')
    with pytest.raises(ValueError, match='arch='): load_natural(tmp_path / 'bare.pt')
    assert load_natural(tmp_path / 'bare.pt', 'resnet20', 10).num_classes == 10
    with pytest.raises(CheckpointMismatchError): load_natural(tmp_path / 'bare.pt', 'resnet20', 100)
