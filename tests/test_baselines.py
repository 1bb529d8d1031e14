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
    extra = dict(arrest_epochs=1) if method == 'arrest' else {}    # the default, epochs // 2 = 0, never replays in 1 epoch
    r = fine_tune(TrainConfig(**TINY, **extra, method=method, out_dir=str(out)), progress=False)
    rows = [json.loads(l) for l in (out / 'metrics.jsonl').read_text().splitlines()]
    assert len(rows) == 1 and rows[0]['epoch'] == 1 and rows[0]['step'] == 2
    assert set(rows[0]['losses']) == terms and all(math.isfinite(v) for v in rows[0]['losses'].values())
    assert rows[0]['eval_model'] == 'ema'                          # every method tracks an EMA: the main model
    for ev in (rows[0], rows[0]['raw']):                           # ... and the raw weights, evaluated the same way
        assert 0 <= ev['pgd_acc'] <= ev['clean_acc'] <= 1 and 'linf' in ev['gap'] and math.isfinite(ev['gap']['linf'])
    assert 'dis' not in rows[0]                                    # the disentangler's numbers: AFD only
    if method == 'arrest': assert set(rows[0]['stats']) == {'replay', 'clean_dist'}
    assert json.loads((out / 'config.json').read_text())['method'] == method
    for name, want, label in (('model_final.pt', r['ema'].module, 'ema'), ('model_final_raw.pt', r['net'], 'raw')):
        plain = load_checkpoint(build_model('resnet20', 10), out / name)
        sd = want.state_dict()
        assert all(torch.equal(v, sd[k].cpu()) for k, v in plain.state_dict().items()), name   # EMA and raw, exported as they are
        assert torch.load(out / name, weights_only=False)['weights'] == label
    assert not all(torch.equal(v, r['net'].state_dict()[k]) for k, v in r['ema'].module.state_dict().items())   # two different models


def test_baseline_ema_follows_the_modelema_rule(tmp_path, cifar10_train):
    "vAFT's EMA after step 2 = ModelEMA.update from its state after step 1 towards the raw weights of step 2, bit for bit."
    from afd_nb.train import ModelEMA, read_checkpoint
    from afd_nb.models import load_pretrained
    out = tmp_path / 'v'
    fine_tune(TrainConfig(**TINY, method='vaft', ckpt_every_steps=1, deterministic=True, out_dir=str(out)), progress=False)
    c1, c2 = read_checkpoint(out / 'ckpt_prev.pt'), read_checkpoint(out / 'ckpt_last.pt')
    assert (c1['step'], c2['step']) == (1, 2) and c1['ema']['updates'] == 1 and c2['ema']['updates'] == 2
    raw, ema = load_pretrained('resnet20'), ModelEMA(load_pretrained('resnet20'))
    ema.load_state_dict(c1['ema']); raw.load_state_dict(c2['model'])
    ema.update(raw)
    want, got = ema.module.state_dict(), c2['ema']['module']
    assert all(torch.equal(want[k], got[k]) for k in want)
    floats = [k for k, v in got.items() if v.is_floating_point()]
    assert all(not torch.equal(got[k], c2['model'][k]) for k in floats if 'weight' in k)   # the EMA lags the raw weights


def test_arrest_window_scales_with_epochs():
    assert [TrainConfig(method='arrest', epochs=e).resolved().arrest_epochs for e in (1, 4, 5, 20, 40)] == [0, 2, 2, 10, 20]
    assert TrainConfig(method='arrest', epochs=4, arrest_epochs=7).resolved().arrest_epochs == 7   # explicit: as given
    assert TrainConfig(method='arrest', epochs=4, arrest_epochs=0).resolved().arrest_epochs == 0
    TrainConfig(method='arrest').validate()                                                      # None is valid before resolving
    with pytest.raises(ValueError, match='TrainConfig.arrest_epochs'): TrainConfig(arrest_epochs=-1).validate()


def _arrest_on_slice(model, teacher, x, y, angle):
    "One ARREST attack decision on this rank's slice of the batch (run inside a gloo process group)."
    from afd_nb.distributed import rank
    sl = slice(0, 11) if rank() == 0 else slice(11, len(x))
    run = Run(TrainConfig(method='arrest', arrest_angle=angle, train_steps=1).resolved(), model.train(), teacher,
              gen=torch.Generator().manual_seed(rank()))
    run.epoch = 1
    METHODS['arrest'].attack(run, x[sl], y[sl])
    return dict(run.stats)


def test_arrest_replay_decision_is_global_under_ddp(resnet20, cifar10_train):
    "Two ranks whose slices fall on either side of the threshold take one decision, from the global-batch distance."
    from afd_nb.distributed import launch
    x, y = (t[:21] for t in cifar10_train.tensors())
    turned = copy.deepcopy(resnet20)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in turned.layer3.parameters():
            if p.ndim == 4: p.add_(0.5 * p.std() * torch.randn(p.shape, generator=g))
    d0, d1 = (B.clean_feature_distance(turned, resnet20, x[s]).item() for s in (slice(0, 11), slice(11, 21)))
    d = (11 * d0 + 10 * d1) / 21                                              # the global-batch distance
    assert abs(d0 - d1) > 1e-3, (d0, d1)                                      # the slices differ enough to split them
    thr = d0 + 0.25 * (d1 - d0) if abs(d - d0) > abs(d - d1) else d1 + 0.25 * (d0 - d1)   # between the slices, global on one side
    angle = math.degrees(math.acos(1 - thr))
    stats = launch(_arrest_on_slice, 2, turned, resnet20, x, y, angle)
    assert stats[0]['replay'] == stats[1]['replay'] == float(d >= thr), (stats, d0, d1, thr)
    assert stats[0]['clean_dist'] == stats[1]['clean_dist']
    assert abs(stats[0]['clean_dist'] - d) <= 64 * EPS32                      # float32 per-slice means, float64 combination


def test_compare_in_07_shares_the_training_attack():
    "notebook 07's compare() gives vAFT and AFD one training step size (its one parameter), whatever their defaults."
    import ast
    from pathlib import Path
    nb = json.loads((Path(__file__).parents[1] / 'nbs' / '07_baselines.ipynb').read_text())
    code = next(''.join(c['source']) for c in nb['cells'] if c['cell_type'] == 'code' and 'def compare(' in ''.join(c['source']))
    fn = next(n for n in ast.parse(code).body if isinstance(n, ast.FunctionDef) and n.name == 'compare')
    seen = []
    ns = dict(TrainConfig=TrainConfig, TMP=Path('/nonexistent'), fine_tune=lambda cfg, **kw: seen.append(cfg.resolved()))
    exec(compile(ast.Module([fn], []), '07_baselines', 'exec'), ns)
    for step in (None, 0.007):
        seen.clear()
        ns['compare'](64, 1, 32, 16, **({} if step is None else dict(train_step_size=step)))
        assert [c.method for c in seen] == ['vaft', 'afd']
        assert seen[0].train_step_size == seen[1].train_step_size == (2 / 255 if step is None else step)


def test_defaults():
    assert (TrainConfig(method='vaft').resolved().ema, TrainConfig(method='vaft').resolved().train_step_size) == (True, 2 / 255)
    assert all(TrainConfig(method=m).resolved().ema for m in ('afd', 'vaft', 'rgkd', 'arrest', 'trades'))   # every method: an EMA
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
