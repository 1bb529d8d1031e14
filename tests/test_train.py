"""afd_nb.train: LR table, EMA, update rules (official / official_fused / joint), teacher, validation.

The exactness checks (the update rules' lock-step comparisons, the loop against the hand-built epoch) use the plain
fp32 path, TrainConfig's defaults (channels_last=False, compile=False, train_attack_dtype='fp32'), not the faster
settings the demo and study configs may use."""
import copy, json, math
import pytest
import torch
import torch.nn as nn

from afd_nb.train import (TrainConfig, fine_tune, lr_at_epoch, ema_decay, ModelEMA, LegacySGD, make_optimizers,
                          apply_update, total_loss, UPDATE_RULES, METHODS)


pytestmark = pytest.mark.usefixtures('one_thread')

W = dict(ce=1., dis=0.05, sep=0.25, align=25.)
EPS32, EPS64 = torch.finfo(torch.float32).eps, torch.finfo(torch.float64).eps   # relative spacing at 1
TINY = dict(n_train=64, batch_size=32, epochs=1, n_eval=16, eval_steps=2, eval_step_size=0.01, train_steps=2, device='cpu')


# ---------------------------------------------------------------- schedule and EMA (the authors' released script, literally)
def test_lr_table_matches_the_authors_table():
    want = {1: 0.025, 5: 0.025, 10: 0.025, 11: 0.02, 12: 0.02, 13: 0.01, 14: 0.01, 15: 0.005, 16: 0.005,
            17: 0.0025, 18: 0.0025, 19: 0.00125, 20: 0.00125}
    for e, lr in want.items(): assert lr_at_epoch(e) == pytest.approx(lr, rel=2 * EPS64, abs=0), e   # base·num/den: 2 roundings (float64)
    assert [lr_at_epoch(e, 0.05) for e in (1, 11, 20)] == pytest.approx([0.05, 0.04, 0.0025], rel=2 * EPS64, abs=0)


def test_lr_table_scales_by_fraction():
    assert [lr_at_epoch(e, epochs=40) for e in (20, 21, 24, 25, 40)] == pytest.approx([0.025, 0.02, 0.02, 0.01, 0.00125], rel=2 * EPS64, abs=0)
    assert lr_at_epoch(1, epochs=1) == 0.025
    assert [lr_at_epoch(e, epochs=10) for e in range(1, 11)] == pytest.approx([0.025] * 5 + [0.02, 0.01, 0.005, 0.0025, 0.00125], rel=2 * EPS64, abs=0)
    assert [lr_at_epoch(e, 0.1, 100, 'multistep') for e in (1, 50, 51, 75, 76, 100)] == pytest.approx([0.1, 0.1, 0.01, 0.01, 0.001, 0.001], rel=2 * EPS64, abs=0)
    assert lr_at_epoch(7, 0.3, 9, 'constant') == 0.3
    with pytest.raises(ValueError, match='valid: afd'): lr_at_epoch(1, schedule='steps')
    with pytest.raises(ValueError): lr_at_epoch(21)


def test_ema_decay_matches_the_authors_formula():
    close = lambda v: pytest.approx(v, rel=2 * EPS64, abs=0)   # one float64 division, compared with a rounded literal
    assert ema_decay(0) == close(0.1)            # (0+1)/(0+10)
    assert ema_decay(1) == close(2 / 11)
    assert ema_decay(8) == close(0.5)
    assert ema_decay(990) == close(0.991)
    assert ema_decay(8990) == close(0.999) and ema_decay(10 ** 7) == 0.999
    d = [ema_decay(t) for t in range(0, 20000, 13)]
    assert all(a <= b for a, b in zip(d, d[1:])) and max(d) == 0.999


def test_model_ema_covers_parameters_and_bn_buffers(resnet20, cifar10_train):
    net = copy.deepcopy(resnet20).train()
    ema = ModelEMA(net)
    x = cifar10_train.tensors()[0][:32]
    before = {k: v.clone() for k, v in ema.module.state_dict().items()}
    net(x)                                              # moves BN running stats
    with torch.no_grad(): net.linear.bias.add_(1.0)
    ema.update(net)
    now, new = ema.module.state_dict(), net.state_dict()
    for k in ('linear.bias', 'layer2.1.bn2.running_mean', 'layer2.1.bn2.running_var', 'bn1.weight'):
        tol = 3 * EPS32 * torch.maximum(before[k].abs(), new[k].abs())   # lerp and the formula: <= 3 roundings each (u = eps/2) at |θ|
        assert ((now[k] - (0.1 * before[k] + 0.9 * new[k])).abs() <= tol).all(), k
    assert not torch.equal(now['layer2.1.bn2.running_mean'], before['layer2.1.bn2.running_mean'])
    assert torch.equal(now['bn1.num_batches_tracked'], new['bn1.num_batches_tracked'])
    assert ema.updates == 1 and not any(p.requires_grad for p in ema.module.parameters())


# ---------------------------------------------------------------- update rules
def test_legacy_sgd_semantics():
    "Weight decay is written into .grad; the update goes through .data (no version bump); momentum buf = mu*buf + d_p."
    w = nn.Parameter(torch.tensor([1.0, -2.0]))
    y = (w * w).sum()                                   # saves w for backward
    opt = LegacySGD([w], lr=0.1, momentum=0.9, weight_decay=0.5)
    w.grad = torch.tensor([1.0, 1.0])
    opt.step()
    assert torch.equal(w.grad, torch.tensor([1.5, 0.0]))          # grad + 0.5 * w, in place (exact in float32)
    torch.testing.assert_close(w.detach(), torch.tensor([0.85, -2.0]), rtol=0, atol=2 * EPS32)   # 1 - 0.1·1.5: 2 roundings at |w| <= 2
    assert w._version == 0
    y.backward()                                        # would raise with torch.optim.SGD (in-place modified)
    w.grad = torch.tensor([1.0, 1.0]); opt.step()       # grad += 0.5*w -> [1.425, 0]; buf = 0.9*[1.5,0] + that
    torch.testing.assert_close(w.detach(), torch.tensor([0.85 - 0.1 * (0.9 * 1.5 + 1.425), -2.0]), rtol=0, atol=4 * EPS32)  # 2 more steps' roundings


@pytest.fixture(scope='module')
def adv_batch(cifar10_train, resnet20):
    from afd_nb.attacks import pgd
    from afd_nb.losses import teacher_features
    x, y = cifar10_train.tensors()
    x, y = x[:32], y[:32]
    xa = pgd(resnet20, x, y, step_size=0.007, steps=3, generator=torch.Generator().manual_seed(0))
    return x, xa, y, teacher_features(resnet20, x)


def _afd_model(resnet20):
    from afd_nb.disentangle import Disentangled
    return Disentangled(copy.deepcopy(resnet20)).train()


@pytest.mark.parametrize('rule', UPDATE_RULES)
def test_each_rule_lowers_its_loss(rule, resnet20, adv_batch):
    from afd_nb.losses import afd_losses
    x, xa, y, f_t = adv_batch
    model = _afd_model(resnet20)
    opts = make_optimizers(model, rule, lr=0.01)
    eff = dict(W, dis=2 * W['dis'], sep=2 * W['sep']) if rule.startswith('official') else W   # what the rule descends
    losses = []
    for _ in range(6):
        terms = afd_losses(model(xa), y, f_t)
        losses.append(total_loss(terms, eff).item())
        apply_update(rule, model, terms, opts, W)
    with torch.no_grad(): losses.append(total_loss(afd_losses(model(xa), y, f_t), eff).item())
    assert all(math.isfinite(l) for l in losses)
    assert losses[-1] < 0.8 * losses[0], losses        # an optimisation claim (20 % in 6 steps), nowhere near rounding


def test_official_changes_d2_only_through_l_dis(resnet20, adv_batch):
    "Under `official`, D2 follows momentum SGD on grad(alpha*L_dis) + wd*D2 exactly (its L_sep gradient is never applied)."
    from afd_nb.losses import afd_losses
    x, xa, y, f_t = adv_batch
    model = _afd_model(resnet20)
    opts = make_optimizers(model, 'official', lr=0.025, momentum=0.9, weight_decay=5e-4)
    d2, buf = model.D2.weight.detach().clone(), None
    for step in range(3):
        probe = copy.deepcopy(model)                     # same state; forward is deterministic
        t = afd_losses(probe(xa), y, f_t)
        g_dis, = torch.autograd.grad(W['dis'] * t['dis'], probe.D2.weight, retain_graph=True)
        g_sep, = torch.autograd.grad(W['sep'] * t['sep'], probe.D2.weight, allow_unused=True)
        d_p = g_dis + 5e-4 * d2
        buf = d_p if buf is None else 0.9 * buf + d_p
        d2 = d2 - 0.025 * buf
        apply_update('official', model, afd_losses(model(xa), y, f_t), opts, W)
        tol = (step + 1) * 4 * (EPS32 / 2) * d2.abs().max()  # per step <= 4 roundings at |D2| ~ 1 (decay, momentum, update), in either order
        torch.testing.assert_close(model.D2.weight.detach(), d2, rtol=0, atol=tol.item())
        if step > 0:                                     # L_sep does reach D2 once D1 != D2: it is really left out
            assert g_sep is not None and g_sep.abs().max() > 100 * EPS32 * g_dis.abs().max()   # far above float residue
    assert (model.D2.weight - torch.eye(64)).abs().max() > 100 * EPS32   # D2 moved: η|∇| ≫ one rounding at |D2| = 1


def test_official_fused_matches_official_to_first_order():
    "One step on a float64 toy: |official - fused| shrinks like lr^2, |official - joint| like lr."
    from afd_nb.disentangle import Disentangled
    from afd_nb.losses import afd_losses, teacher_features

    class Toy(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Linear(8, 12), nn.BatchNorm1d(12), nn.ReLU(), nn.Linear(12, 6), nn.ReLU())
            self.linear = nn.Linear(6, 4)
        @property
        def classifier(self): return self.linear
        def features(self, x): return self.body(x)
        def forward(self, x): return self.linear(self.features(x))

    def one_step(rule, lr):
        torch.manual_seed(1)
        g = torch.Generator().manual_seed(1)
        toy = Toy().double(); teacher = copy.deepcopy(toy).eval(); dis = Disentangled(toy)
        with torch.no_grad():
            for D in (dis.D1, dis.D2): D.weight.add_(0.3 * torch.randn(6, 6, generator=g, dtype=torch.float64))
        x = torch.randn(32, 8, generator=g, dtype=torch.float64); y = torch.randint(0, 4, (32,), generator=g)
        apply_update(rule, dis, afd_losses(dis(x + 0.3 * torch.randn(x.shape, generator=g, dtype=torch.float64)), y,
                                           teacher_features(teacher, x)), make_optimizers(dis, rule, lr=lr), W)
        return torch.cat([p.detach().reshape(-1) for p in dis.parameters()])

    d = {}
    for lr in (0.02, 0.01):
        off, fus, jnt = (one_step(r, lr) for r in ('official', 'official_fused', 'joint'))
        d[lr] = ((off - fus).norm().item(), (off - jnt).norm().item())
    # Orders of a Taylor expansion, not rounding bounds: halving η divides an O(η^2) difference by 4 and an O(η) one by 2,
    # up to the next order's relative share O(η) (measured: ratios 4.000 and 2.017); float64 rounding (~1e-16) is irrelevant.
    assert 3.5 < d[0.02][0] / d[0.01][0] < 4.5        # second order
    assert 1.5 < d[0.02][1] / d[0.01][1] < 2.6        # first order
    assert d[0.01][0] < 0.2 * d[0.01][1]


def test_unknown_rule():
    with pytest.raises(ValueError, match='valid: official, official_fused, joint'):
        make_optimizers(nn.Linear(2, 2), 'fast')


# ---------------------------------------------------------------- the loop
def test_teacher_never_changes_and_export_loads(tmp_path, resnet20, cifar10_train, cifar10_test):
    from afd_nb.models import build_model, load_checkpoint
    teacher = copy.deepcopy(resnet20)                    # the fixture obtained the weights (or skipped with the reason)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    r = fine_tune(TrainConfig(**TINY, out_dir=str(tmp_path / 'run')), teacher=teacher, progress=False)
    assert r['teacher'] is teacher
    assert all(torch.equal(v, before[k]) for k, v in teacher.state_dict().items())
    assert not any(p.requires_grad for p in teacher.parameters())
    moved = sum((v.float() - before[k].float()).abs().sum() for k, v in r['net'].backbone.state_dict().items())
    assert moved > 0                                     # while the student did move
    assert all(torch.equal(v, resnet20.state_dict()[k]) for k, v in resnet20.state_dict().items())  # caller's model untouched
    lines = (tmp_path / 'run' / 'metrics.jsonl').read_text().splitlines()
    rows = [json.loads(l) for l in lines]
    assert [r_['epoch'] for r_ in rows] == [0, 1]
    assert set(rows[1]['losses']) == {'ce', 'dis', 'sep', 'align'} and rows[1]['eval_model'] == 'ema'
    assert {'linf', 'l2', 'cos', 'linf_rel', 'd1_linf'} <= set(rows[1]['gap'])
    assert 0 <= rows[1]['pgd_acc'] <= rows[1]['clean_acc'] <= 1
    plain = load_checkpoint(build_model('resnet20', 10), tmp_path / 'run' / 'model_final.pt').eval()
    x = cifar10_train.tensors()[0][:8]
    em = r['ema'].module.eval()
    with torch.no_grad():
        z_plain, z_ema, f = plain(x), em(x), em.backbone_features(x)           # same backbone weights: the same features
        d = f.shape[1]                                                        # (ω·D1)·f vs ω·(D1·f): two d-term products each,
        bound = 2 * d * EPS32 * (em.classifier.weight.abs() @ em.D1.weight.abs() @ f.abs().T).T + EPS32 * (z_ema.abs() + em.classifier.bias.abs())
    assert ((z_plain - z_ema).abs() <= bound).all()                           # <= d·u·|ω||D1||f| per product, plus the bias add


@pytest.mark.parametrize('kw, field', [
    (dict(dataset='cifar11'), 'dataset'), (dict(flavour='png'), 'flavour'), (dict(arch='resnet19'), 'arch'),
    (dict(method='afdd'), 'method'), (dict(update_rule='fused'), 'update_rule'), (dict(lr_schedule='step'), 'lr_schedule'),
    (dict(eps=-0.01), 'eps'), (dict(epochs=0), 'epochs'), (dict(batch_size=0), 'batch_size'), (dict(alpha=-1.), 'alpha'),
    (dict(beta=-0.1), 'beta'), (dict(gamma=float('nan')), 'gamma'), (dict(lr=0.), 'lr'), (dict(momentum=1.0), 'momentum'),
    (dict(weight_decay=-1e-4), 'weight_decay'), (dict(train_steps=-1), 'train_steps'), (dict(n_train=0), 'n_train'),
    (dict(epochs=2.5), 'epochs'), (dict(n_gap=-1), 'n_gap'), (dict(arch='resnet18'), 'checkpoint'), (dict(checkpoint='/nonexistent.pt'), 'checkpoint'),
    (dict(device='cuda:3' if not torch.cuda.is_available() else 'tpu'), 'device'),
    (dict(compile=True), 'compile'), (dict(train_attack_dtype='fp16'), 'train_attack_dtype'),
])
def test_validate_names_the_bad_field(kw, field):
    with pytest.raises(ValueError) as e: TrainConfig(**kw).validate()
    msg = str(e.value)
    assert '\n' not in msg and f'TrainConfig.{field}' in msg, msg
    assert any(w in msg for w in ('valid', 'must', 'give the path', 'not supported')), msg


def test_validate_accepts_defaults_and_fills_method_defaults():
    cfg = TrainConfig().resolved().validate()
    assert (cfg.ema, cfg.train_step_size) == (True, 0.007)
    import afd_nb.baselines  # noqa: F401  registers the baselines
    assert {'afd', 'vaft', 'rgkd', 'arrest', 'trades'} <= set(METHODS)


def test_checkpoint_of_other_arch_is_refused(tmp_path, cifar10_train, cifar10_test):
    from afd_nb.models import CheckpointMismatchError, pretrained_path
    from conftest import obtain
    path = obtain('ResNet-20 weights', lambda dl: pretrained_path('resnet20', download=dl))
    cfg = TrainConfig(**TINY, arch='resnet32', checkpoint=str(path), out_dir=str(tmp_path / 'x'))
    with pytest.raises(CheckpointMismatchError) as e: fine_tune(cfg, progress=False)
    assert 'resnet' in str(e.value)


def test_teacher_of_other_arch_is_refused(tmp_path, resnet20, cifar10_train, cifar10_test):
    from afd_nb.models import load_pretrained
    from conftest import obtain
    resnet32 = obtain('ResNet-32 weights', lambda dl: load_pretrained('resnet32', download=dl))
    with pytest.raises(ValueError, match="differs from the student's backbone"):
        fine_tune(TrainConfig(**TINY, out_dir=str(tmp_path / 'x')), teacher=resnet32, progress=False)


# ---------------------------------------------------------------- raw and EMA, and the disentangler's log
@pytest.mark.parametrize('alpha', [0.05, 0.0])     # AFD and its ablation alpha = 0 both log `dis`
def test_afd_logs_raw_and_the_disentangler(tmp_path, alpha, resnet20, cifar10_train, cifar10_test):  # fixtures: skip offline
    out = tmp_path / 'run'
    r = fine_tune(TrainConfig(**{**TINY, 'epochs': 2}, alpha=alpha, out_dir=str(out)), progress=False)
    rows = [json.loads(l) for l in (out / 'metrics.jsonl').read_text().splitlines()]
    assert [x['epoch'] for x in rows] == [0, 1, 2] and all(x['eval_model'] == 'ema' for x in rows)
    assert {k: v for k, v in rows[0]['raw'].items()} == {k: rows[0][k] for k in rows[0]['raw']}   # epoch 0: EMA = raw model
    for x in rows[1:]:
        assert {'clean_acc', 'pgd_acc', 'gap'} <= set(x['raw']) and 'd1_linf' in x['raw']['gap']
        d = x['dis']
        assert set(d) == {'L_dis', 'L_sep', 'L_align', 'd1_dev', 'd2_dev', 'd2_acc', 'z1_acc'} and all(math.isfinite(v) for v in d.values())
        assert (d['L_dis'], d['L_sep'], d['L_align']) == (x['losses']['dis'], x['losses']['sep'], x['losses']['align'])
        assert -1 <= d['L_sep'] <= 1 and 0 <= min(d['d2_acc'], d['z1_acc']) <= max(d['d2_acc'], d['z1_acc']) <= 1
        assert d['d1_dev'] > 0 and d['d2_dev'] >= 0
        assert not any(k.startswith('_') for k in x['stats'])
    eye = torch.eye(64, dtype=torch.float64)
    assert rows[2]['dis']['d1_dev'] == (r['net'].D1.weight.detach().double() - eye).norm().item()   # raw weights, end of epoch
    assert rows[2]['dis']['d2_dev'] == (r['net'].D2.weight.detach().double() - eye).norm().item()
    assert rows[2]['clean_acc'] != rows[2]['raw']['clean_acc'] or rows[2]['gap']['linf'] != rows[2]['raw']['gap']['linf']


def test_d2_accuracy_counts_images_where_d2_picks_the_confusing_label():
    "AFD.losses counts argmax z2 == ỹ (and argmax z1 == ỹ) over the batch; epoch_log divides by the images of the epoch."
    from types import SimpleNamespace
    from afd_nb.disentangle import DisOut
    z1 = torch.tensor([[5., 1., 0.], [0., 2., 3.], [1., 0., 4.]])          # labels 0, 2, 0: ỹ = 1, 1, 2; argmax z1 = ỹ on image 2 only
    z2 = torch.tensor([[0., 9., 0.], [0., 9., 0.], [9., 0., 0.]])          # argmax 1, 1, 0: = ỹ on images 0 and 1
    f = torch.randn(3, 4)
    class Net(nn.Module):
        def forward(self, x): return DisOut(z1, z2, f, f + 1, f)
    class Teacher(nn.Module):
        def features(self, x): return f
    run = SimpleNamespace(model=Net(), teacher=Teacher(), stats={})
    terms = METHODS['afd'].losses(run, torch.zeros(3), torch.zeros(3), torch.tensor([0, 2, 0]))
    assert (run.stats['_d2_hits'].item(), run.stats['_z1_hits'].item()) == (2, 1) and set(terms) == {'ce', 'dis', 'sep', 'align'}
    run.model = SimpleNamespace(D1=nn.Linear(4, 4, bias=False), D2=nn.Linear(4, 4, bias=False))
    d = METHODS['afd'].epoch_log(run, dict(dis=3.0, sep=1.5, align=0.3, _d2_hits=5.0, _z1_hits=2.0), 3, 8)['dis']
    assert d['z1_acc'] == 2 / 8
    assert (d['L_dis'], d['L_sep'], d['L_align'], d['d2_acc']) == (3.0 / 3, 1.5 / 3, 0.3 / 3, 5 / 8)   # sums / steps, hits / images


def test_one_pass_evaluation_of_two_models_equals_evaluating_each_alone(resnet20, cifar10_test):
    "evaluate_epoch(ema, raw=raw): one pass over the images, yet each model's numbers are those it gets alone, bit for bit."
    from afd_nb.train import evaluate_epoch
    from afd_nb.gap import GapTracker
    x, y = (t[:40] for t in cifar10_test.tensors())
    other = copy.deepcopy(resnet20)
    with torch.no_grad():
        for p in other.layer3.parameters(): p.mul_(1.1)
    other.train()                                                        # the raw model is in train mode in the loop
    cfg = TrainConfig(eval_steps=3, eval_step_size=0.003, seed=7)
    gap = lambda: GapTracker(x[:8], y[:8], steps=3, seed=7)
    both = evaluate_epoch(resnet20, x, y, cfg, gap(), raw=other)
    assert both['raw'] == evaluate_epoch(other, x, y, cfg, gap()) and other.training   # mode restored
    assert {k: v for k, v in both.items() if k != 'raw'} == evaluate_epoch(resnet20, x, y, cfg, gap())
    assert both['raw'] != {k: v for k, v in both.items() if k != 'raw'}             # two different models were evaluated
    from afd_nb.attacks import accuracy, robust_accuracy                                 # the numbers of the earlier per-model code
    g = torch.Generator().manual_seed(cfg.seed + 2024)
    assert (both['clean_acc'], both['pgd_acc']) == (accuracy(resnet20, x, y),
                                                    robust_accuracy(resnet20, x, y, eps=cfg.eps, step_size=0.003, steps=3, generator=g))


def test_bf16_training_attack_is_the_bf16_pgd_and_only_the_attack(cifar10_train, resnet20):
    "train_attack_dtype='bf16' routes the training attack through bf16 autocast (also with the official rule); the step's losses stay fp32."
    from afd_nb.attacks import pgd
    from afd_nb.train import Run, attack_dtype
    x, y = (t[:16] for t in cifar10_train.tensors())
    for method, rule in (('vaft', 'official'), ('afd', 'official')):
        cfg = TrainConfig(method=method, update_rule=rule, train_attack_dtype='bf16', device='cpu').resolved().validate()
        net = copy.deepcopy(resnet20)
        run = Run(cfg, net, gen=torch.Generator().manual_seed(3))
        assert attack_dtype(run) is torch.bfloat16 and run.amp_dtype is None
        got = METHODS[method].attack(run, x, y)
        kw = dict(eps=cfg.eps, step_size=cfg.train_step_size, steps=cfg.train_steps)
        want16 = pgd(net, x, y, generator=torch.Generator().manual_seed(3), amp_dtype=torch.bfloat16, **kw)
        want32 = pgd(net, x, y, generator=torch.Generator().manual_seed(3), **kw)
        assert torch.equal(got, want16) and not torch.equal(got, want32)            # the bf16 attack, not the fp32 one
        assert got.dtype == torch.float32 and (got - x).abs().max() <= cfg.eps + 1e-6
    assert attack_dtype(Run(TrainConfig(), net)) is None                              # the default: fp32
