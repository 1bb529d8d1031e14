"""Tests of afd_nb.gap: the gap equals its definition, scale behaviour, determinism, side effects, the tracker."""
import copy, json
import pytest
import torch
import torch.nn as nn
from afd_nb.attacks import pgd
from afd_nb.gap import feature_gap, GapTracker

KW = dict(eps=8 / 255, step_size=0.007, steps=2)
EPS32 = torch.finfo(torch.float32).eps   # 2^-23; u = EPS32/2 is float32's unit roundoff


@pytest.fixture(scope='module')
def batch(cifar10_test):
    x, y = cifar10_test.tensors()
    return x[:32], y[:32]


@pytest.fixture
def net(resnet20):
    return copy.deepcopy(resnet20).eval()


class _Rescaled(nn.Module):
    "Same function as `model`: features × c, classifier weight / c."
    def __init__(self, model, c):
        super().__init__(); self.m, self.c = model, c
        self.classifier = copy.deepcopy(model.classifier); self.classifier.weight.data /= c
    def features(self, x): return self.c * self.m.features(x)
    def forward(self, x): return self.classifier(self.features(x))


def test_matches_definition(net, batch):
    x, y = batch
    res = feature_gap(net, x, y, seed=3, batch_size=12, per_sample=True, **KW)
    # the definition, computed on the same batches of 12 with the same generator: the same floats, so compared exactly
    gen = torch.Generator().manual_seed(3)
    parts = {k: [] for k in ('linf', 'l2', 'cos', 'norm_linf', 'norm_l2', 'clean', 'adv')}
    for i in range(0, len(x), 12):
        xb, yb = x[i:i + 12], y[i:i + 12]
        xa = pgd(net, xb, yb, generator=gen, **KW)
        with torch.no_grad(): f, fa = net.features(xb), net.features(xa)
        d = fa - f
        for k, v in dict(linf=d.abs().amax(1), l2=d.norm(dim=1), cos=1 - torch.nn.functional.cosine_similarity(f, fa, dim=1),
                         norm_linf=f.abs().amax(1), norm_l2=f.norm(dim=1),
                         clean=net.classifier(f).argmax(1) == yb, adv=net.classifier(fa).argmax(1) == yb).items():
            parts[k].append(v)
    ref = {k: torch.cat(v) for k, v in parts.items()}
    ps = res['per_sample']
    for k in ('linf', 'l2', 'cos'): assert torch.equal(ps[k], ref[k]), k
    mean = {k: v.double().mean().item() for k, v in ref.items()}
    assert (res['linf'], res['l2'], res['cos']) == (mean['linf'], mean['l2'], mean['cos'])
    assert res['linf_rel'] == mean['linf'] / mean['norm_linf'] and res['l2_rel'] == mean['l2'] / mean['norm_l2']
    assert (res['clean_acc'], res['adv_acc']) == (mean['clean'], mean['adv'])
    assert res['n'] == len(x) and res['linf'] > 0 and res['adv_acc'] < res['clean_acc']
    assert not any(k.startswith('d1_') for k in res)


def test_keys_are_plain_floats(net, batch):
    res = feature_gap(net, *batch, **KW)
    assert {'linf', 'l2', 'cos', 'linf_rel', 'l2_rel'} <= set(res) and 'per_sample' not in res
    assert json.loads(json.dumps(res)) == res


def test_zero_radius_gives_zero_gap(net, batch):
    res = feature_gap(net, *batch, eps=0., step_size=0.01, steps=2)
    # x' = x + 0 exactly, so g(x') = g(x): 1 - cos(f, f) is rounding only (d = 64-term sums, a division: <= ~2d*u)
    assert res['linf'] == 0 and res['l2'] == 0 and abs(res['cos']) <= 2 * 64 * EPS32


def test_absolute_scales_relative_does_not(net, batch):
    a = feature_gap(net, *batch, **KW)
    b = feature_gap(_Rescaled(net, 4.), *batch, **KW)     # same function, features ×4 (exact in floats)
    assert b['linf'] == 4 * a['linf'] and b['l2'] == 4 * a['l2']
    assert b['linf_rel'] == a['linf_rel'] and b['l2_rel'] == a['l2_rel'] and b['cos'] == a['cos']


def test_disentangled_reports_both_features(net, batch):
    from afd_nb.disentangle import Disentangled
    x, y = batch
    r0 = feature_gap(Disentangled(net), x, y, **KW)
    for k in ['linf', 'l2', 'cos', 'linf_rel', 'l2_rel']:
        assert r0['d1_' + k] == r0[k]                     # D1 = I
    ref = feature_gap(net, x, y, **KW)
    assert r0['linf'] == ref['linf']                      # the wrapper at init is the model itself
    half = copy.deepcopy(net); half.classifier.weight.data /= 2
    dis = Disentangled(half); dis.D1.weight.data *= 2    # same function, D1 g = 2 g
    r = feature_gap(dis, x, y, **KW)
    assert r['linf'] == ref['linf'] and r['d1_linf'] == 2 * r['linf']
    assert r['d1_linf_rel'] == r['linf_rel']             # 2a/2b = a/b exactly: scaling by 2 is exact
    g = torch.Generator().manual_seed(0)
    with torch.no_grad(): dis.D1.weight.add_(0.2 * torch.randn(64, 64, generator=g))
    r = feature_gap(dis, x, y, per_sample=True, **KW)
    assert r['d1_linf'] != r['linf'] and 'd1_linf' in r['per_sample']


def test_seed_determinism_and_no_side_effects(net, batch):
    net.train()
    bn = net.bn1.running_mean.clone()
    torch.manual_seed(0); a = feature_gap(net, *batch, seed=1, **KW)
    torch.manual_seed(99); b = feature_gap(net, *batch, seed=1, **KW)
    c = feature_gap(net, *batch, seed=2, **KW)
    assert a == b and a['linf'] != c['linf']
    assert net.training and all(m.training for m in net.modules())   # mode restored
    assert torch.equal(net.bn1.running_mean, bn)                      # BN statistics untouched
    assert all(p.grad is None for p in net.parameters())


def test_tracker_fixed_images_and_seed(net, batch):
    x, y = batch
    xc = x.clone()
    tr = GapTracker(xc, y, seed=5, **KW)
    r1 = tr(net, epoch=1)
    torch.manual_seed(1234)
    xc.zero_()                                                        # the tracker holds its own copy
    r2 = tr(net, epoch=2)
    assert {k: v for k, v in r1.items() if k != 'epoch'} == {k: v for k, v in r2.items() if k != 'epoch'}
    assert [h['epoch'] for h in tr.history] == [1, 2] and json.loads(json.dumps(r2)) == r2
    assert r1['linf'] == feature_gap(net, x, y, seed=5, **KW)['linf']
    with torch.no_grad(): net.conv1.weight.mul_(1.1)                 # a changed model gives a changed gap
    assert tr(net)['linf'] != r1['linf']


def test_tracker_from_dataset(cifar10_test, net):
    tr = GapTracker.from_dataset(cifar10_test, n=16, steps=1, step_size=0.01)
    assert len(tr.x) == 16 and tr(net)['n'] == 16


def test_rejects_empty_or_mismatched_input(net, batch):
    x, y = batch
    with pytest.raises(ValueError, match='labels'): feature_gap(net, x[:0], y[:0])
    with pytest.raises(ValueError, match='labels'): feature_gap(net, x[:4], y[:3])
