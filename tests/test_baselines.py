"""afd_nb.baselines: vAFT, RGKD, ARREST, TRADES as plug-ins of afd_nb.train's loop."""
import copy, json, math
from types import SimpleNamespace
import pytest
import torch
import torch.nn.functional as F

import afd_nb.baselines as B
from afd_nb.train import TrainConfig, fine_tune, METHODS, Method, Run, register_method


pytestmark = pytest.mark.usefixtures('one_thread')

EPS32 = torch.finfo(torch.float32).eps   # 2^-23; u = EPS32/2 is float32's unit roundoff
BALL_TOL = EPS32   # |x' - x| <= eps up to roundings of eps to float32, of x + delta (values <= 1) and of the difference

TINY = dict(n_train=64, batch_size=32, epochs=1, n_eval=16, eval_steps=2, eval_step_size=0.01, train_steps=2,
            eval_at_start=False, device='cpu')


@pytest.mark.parametrize('method, terms', [('vaft', {'ce'}), ('rgkd', {'ce', 'kd'}), ('arrest', {'ce', 'kd'}), ('trades', {'ce', 'kl'})])
def test_baseline_runs_and_writes_metrics(method, terms, tmp_path, cifar10_train, cifar10_test):
    from afd_nb.models import build_model, load_checkpoint
    out = tmp_path / method
    r = fine_tune(TrainConfig(**TINY, method=method, out_dir=str(out)), progress=False)
    rows = [json.loads(l) for l in (out / 'metrics.jsonl').read_text().splitlines()]
    assert len(rows) == 1 and rows[0]['epoch'] == 1 and rows[0]['step'] == 2
    assert set(rows[0]['losses']) == terms and all(math.isfinite(v) for v in rows[0]['losses'].values())
    assert rows[0]['eval_model'] == 'raw'                          # baselines: no EMA by default
    assert 0 <= rows[0]['pgd_acc'] <= rows[0]['clean_acc'] <= 1 and 'linf' in rows[0]['gap']
    if method == 'arrest': assert set(rows[0]['stats']) == {'replay', 'clean_dist'}
    assert json.loads((out / 'config.json').read_text())['method'] == method
    plain = load_checkpoint(build_model('resnet20', 10), out / 'model_final.pt')
    sd = r['net'].state_dict()
    assert all(torch.equal(v, sd[k].cpu()) for k, v in plain.state_dict().items())   # exported = the raw model


def test_defaults():
    assert (TrainConfig(method='vaft').resolved().ema, TrainConfig(method='vaft').resolved().train_step_size) == (False, 2 / 255)
    assert TrainConfig(method='vaft', train_step_size=0.007, ema=True).resolved().train_step_size == 0.007
    assert TrainConfig(method='trades').resolved().train_step_size == 0.007
    assert METHODS['rgkd'].weights(TrainConfig()) == dict(ce=1.0, kd=50.0)
    assert METHODS['trades'].weights(TrainConfig()) == dict(ce=1.0, kl=6.0)
    assert METHODS['arrest'].needs_teacher and not METHODS['vaft'].needs_teacher
    assert not any(METHODS[m].disentangle for m in ('vaft', 'rgkd', 'arrest', 'trades'))


def test_rgkd_term(resnet20, cifar10_train):
    x = cifar10_train.tensors()[0][:16]
    with torch.no_grad():
        f = resnet20.features(x)
        tol = (f.shape[1] + len(f)) * EPS32   # 1 - mean cos: d-term sums (~d*u relative each), then a mean of B values
        assert B.rgkd_loss(f, f).abs().item() <= tol
        assert abs(B.rgkd_loss(-f, f).item() - 2.0) <= 2 * tol
        assert 0 < B.rgkd_loss(f + 0.5 * torch.randn_like(f), f).item() < 1


def test_arrest_replay_rule(resnet20, cifar10_train):
    x, y = (t[:32] for t in cifar10_train.tensors())
    turned = copy.deepcopy(resnet20)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in turned.layer3.parameters():
            if p.ndim == 4: p.add_(0.8 * p.std() * torch.randn(p.shape, generator=g))
    dist = B.clean_feature_distance(turned, resnet20, x).item()
    assert B.clean_feature_distance(resnet20, resnet20, x).item() <= (64 + len(x)) * EPS32   # 1 - cos(f, f): rounding only
    arrest = METHODS['arrest']
    for angle, epoch, want in [(30., 1, dist >= 1 - math.cos(math.radians(30))), (1., 1, True), (90., 1, False), (1., 11, False)]:
        cfg = TrainConfig(method='arrest', arrest_angle=angle, train_steps=2).resolved()
        run = Run(cfg, turned.train(), resnet20, gen=torch.Generator().manual_seed(1)); run.epoch = epoch
        x_in = arrest.attack(run, x, y)
        assert run.stats['replay'] == float(want), (angle, epoch, dist)
        assert (x_in - x).abs().max() <= 8 / 255 + BALL_TOL and 0 <= x_in.min() and x_in.max() <= 1
        if want:   # noisy replay: uniform noise, not an attack -> predictions barely change
            u = x_in - x
            assert u.abs().mean() > 2 / 255 and turned.training
    cfg = TrainConfig(method='arrest', arrest_epochs=3).resolved()
    run = Run(cfg, turned, resnet20, gen=torch.Generator().manual_seed(1)); run.epoch = 4
    arrest.attack(run, x, y)
    assert run.stats == {'replay': 0.0}


def test_trades_attack(resnet20, cifar10_train):
    x = cifar10_train.tensors()[0][:16]
    net = copy.deepcopy(resnet20).train()
    xa = B.trades_attack(net, x, steps=5, generator=torch.Generator().manual_seed(0))
    assert net.training and all(p.grad is None for p in net.parameters())
    assert (xa - x).abs().max() <= 8 / 255 + BALL_TOL and xa.min() >= 0 and xa.max() <= 1
    net.eval()
    with torch.no_grad():
        p = F.softmax(net(x), 1)
        kl = lambda z: F.kl_div(F.log_softmax(net(z), 1), p, reduction='batchmean').item()
        assert kl(xa) > 10 * kl(B.noisy_input(x, generator=torch.Generator().manual_seed(0)))


def test_a_new_method_plugs_in(tmp_path, cifar10_train):
    "How notebook 09 registers 'natural': clean CE, no attack."
    @register_method
    class CleanCE(Method):
        name = 'clean_ce_test'
        defaults = dict(ema=False, train_step_size=0.0)
        def attack(self, run, x, y): return x
    try:
        r = fine_tune(TrainConfig(**{**TINY, 'n_eval': 0}, method='clean_ce_test', out_dir=str(tmp_path / 'n')), progress=False)
        assert r['history'][-1]['losses'].keys() == {'ce'} and 'clean_acc' not in r['history'][-1]
    finally:
        METHODS.pop('clean_ce_test')


def test_trades_kl_gradient_stays_finite_when_clean_probabilities_underflow():
    "A confident clean prediction (p(x)_k = 0 exactly in float32) gives NaN gradients with the probability-form KL."
    z_nat = torch.tensor([[120., 0., -10.], [1., 2., 3.]], requires_grad=True)     # logit gap 130 > ~104: p underflows
    z_adv = torch.tensor([[0., 3., 1.], [3., 2., 1.]], requires_grad=True)
    assert (F.softmax(z_nat, 1) == 0).any()
    naive = F.kl_div(F.log_softmax(z_adv, 1), F.softmax(z_nat, 1), reduction='batchmean')   # the trap, for contrast
    assert torch.isnan(torch.autograd.grad(naive, z_nat)[0]).any()
    run = SimpleNamespace(model=lambda t: t)                                       # "model" = identity on logits
    terms = METHODS['trades'].losses(run, z_adv, z_nat, torch.tensor([0, 2]))
    total = sum(w * terms[k] for k, w in METHODS['trades'].weights(TrainConfig()).items())
    g_nat, g_adv = torch.autograd.grad(total, (z_nat, z_adv))
    assert torch.isfinite(g_nat).all() and torch.isfinite(g_adv).all()
    # the value is the KL itself: float64 reference; float32 log-softmax errors are ~eps32 x |logit| = 1.2e-7 x 130
    p, lq = F.softmax(z_nat.double(), 1), F.log_softmax(z_adv.double(), 1)
    ref = (p * (torch.log(p) - lq)).sum() / 2
    assert abs(terms['kl'].item() - ref.item()) <= 4 * 1.2e-7 * 130 * 3
