"""Tests of afd_nb.disentangle: identity at init, shared classifier, branches, detached D2 input, confusing label, fold."""
import copy
import pytest
import torch
import torch.nn as nn
from afd_nb.disentangle import Disentangled, DisOut, confusing_label, fold

EPS32 = torch.finfo(torch.float32).eps   # 2^-23; u = EPS32/2 is float32's unit roundoff


def _dot_tol(a, b):
    "Bound on the rounding of a @ b.T in float32, elementwise: a d-term dot product is off by <= d*u*sum|a_k b_k|."
    return a.shape[-1] * EPS32 * (a.abs() @ b.abs().T)


@pytest.fixture(scope='module')
def batch(cifar10_test):
    x, y = cifar10_test.tensors()
    return x[:256], y[:256]


@pytest.fixture
def net(resnet20):
    return copy.deepcopy(resnet20).eval()


def test_init_is_exactly_the_pretrained_model(net, batch):
    x, _ = batch
    dis = Disentangled(net).eval()
    with torch.no_grad(): z_net, z_dis = net(x), dis(x)
    assert torch.equal(z_dis, z_net)          # D1 = I: x·I is exact in float32
    assert torch.equal(dis.D1.weight, torch.eye(64)) and torch.equal(dis.D2.weight, torch.eye(64))
    assert dis.D1.bias is None and dis.D2.bias is None


def test_shared_classifier_and_parameter_groups(net):
    dis = Disentangled(net)
    assert dis.classifier is net.classifier                 # one classifier, not a copy
    keys = list(dis.state_dict())
    assert sum(k.endswith('linear.weight') for k in keys) == 1
    assert {'D1.weight', 'D2.weight'} <= set(keys)
    d2, shared = dis.d2_parameters(), dis.shared_parameters()
    assert [id(p) for p in d2] == [id(dis.D2.weight)]
    assert {id(p) for p in shared} == {id(p) for p in dis.parameters()} - {id(dis.D2.weight)}
    assert len(d2) + len(shared) == len(list(dis.parameters()))
    assert dis.feature_dim == 64 and dis.num_classes == 10


def test_features_and_modes(net, batch):
    x, y = batch[0][:32], batch[1][:32]
    dis = Disentangled(net)
    with torch.no_grad(): dis.D1.weight.mul_(3)
    dis.eval()
    with torch.no_grad():
        g = dis.backbone_features(x)
        assert torch.equal(g, net.features(x))
        assert torch.equal(dis.features(x), 3 * g)     # (3I)·g = 3g exactly: the other terms add exact zeros
        z = dis(x)
    assert isinstance(z, torch.Tensor) and z.shape == (32, 10)
    dis.train()
    out = dis(x)
    assert isinstance(out, DisOut) and out._fields == ('z1', 'z2', 'f1', 'f2', 'f')
    assert [tuple(t.shape) for t in out] == [(32, 10), (32, 10), (32, 64), (32, 64), (32, 64)]
    with torch.no_grad():   # the same products, possibly through another kernel: within the dot-product bound
        for got, W in ((out.f1, dis.D1.weight), (out.f2, dis.D2.weight)):
            assert ((got - out.f @ W.T).abs() <= _dot_tol(out.f, W)).all()
    assert torch.equal(out.z2, dis.classifier(out.f2))     # the very same module on the very same tensor
    assert not torch.allclose(out.z1, out.z2)               # D1 ≠ D2 now: the branches differ


def test_d2_sees_a_detached_feature(net, batch):
    x = batch[0][:16]
    dis = Disentangled(net).train()
    out = dis(x)
    (out.z2.square().sum() + out.f2.square().sum()).backward()
    for n, p in dis.named_parameters():
        if n == 'D2.weight' or n.startswith('backbone.linear.'):
            assert p.grad is not None and p.grad.abs().sum() > 0, n
        else:
            assert p.grad is None, f'{n} got gradient from the confused branch'


def test_intrinsic_branch_reaches_backbone(net, batch):
    dis = Disentangled(net).train()
    dis(batch[0][:16]).z1.logsumexp(1).sum().backward()
    assert dis.backbone.conv1.weight.grad.abs().sum() > 0 and dis.D1.weight.grad.abs().sum() > 0
    assert dis.D2.weight.grad is None


def _brute_confusing(z, y):
    out = []
    for zi, yi in zip(z.tolist(), y.tolist()):
        best = None
        for c in range(len(zi)):
            if c != yi and (best is None or zi[c] > zi[best]): best = c
        out.append(best)
    return torch.tensor(out)


def test_confusing_label_random_and_ties():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(500, 10, generator=g)
    zt = torch.randint(0, 3, (500, 10), generator=g).float()     # many ties
    y = torch.randint(0, 10, (500,), generator=g)
    for logits in (z, zt):
        yc = confusing_label(logits, y)
        assert (yc != y).all()
        assert torch.equal(yc, _brute_confusing(logits, y))
    # the true class is the top one -> ỹ is the runner-up; the model is wrong -> ỹ is its prediction
    logits = torch.tensor([[5., 3., 1.], [1., 3., 5.]])
    assert confusing_label(logits, torch.tensor([0, 0])).tolist() == [1, 2]


def test_confusing_label_no_grad(net, batch):
    x, y = batch
    dis = Disentangled(net).train()
    out = dis(x[:64])
    yc = confusing_label(out.z1, y[:64])
    assert not yc.requires_grad and yc.dtype == torch.long
    assert torch.equal(yc, _brute_confusing(out.z1.detach(), y[:64]))
    assert (yc != y[:64]).all()


def test_fold_matches_eval_logits(net, batch):
    from afd_nb.models import build_model
    x, _ = batch
    dis = Disentangled(net).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad(): dis.D1.weight.copy_(1.5 * torch.eye(64) + 0.1 * torch.randn(64, 64, generator=g))
    w_before = dis.classifier.weight.clone()
    folded = fold(dis).eval()
    with torch.no_grad():
        f, W, b = dis.backbone_features(x), dis.classifier.weight, dis.classifier.bias
        M = ((f.abs() @ dis.D1.weight.abs().T) @ W.abs().T + b.abs()).max().item()
        diff = (folded(x) - dis(x)).abs().max().item()
    # two d-term float32 dot products per logit (wrapped) against one plus the rounding of ω·D1 (folded): (3d+2)·u·M < 4·d·EPS32·M
    tol = 4 * 64 * EPS32 * M
    assert diff <= tol, (diff, tol)
    assert torch.equal(dis.classifier.weight, w_before)          # the wrapped model is untouched
    assert torch.equal(folded.classifier.bias, dis.classifier.bias)
    assert type(folded) is type(net) and not hasattr(folded, 'D1')
    assert sum(p.numel() for p in folded.parameters()) == sum(p.numel() for p in net.parameters())
    fresh = build_model('resnet20')
    fresh.load_state_dict(folded.state_dict(), strict=True)
    with torch.no_grad(): assert torch.equal(fresh.eval()(x[:8]), folded(x[:8]))
    assert folded.classifier is not dis.classifier               # a copy, not shared


def test_fold_at_identity_is_exact(net):
    assert torch.equal(fold(Disentangled(net)).classifier.weight, net.classifier.weight)


def test_rejects_models_without_the_interface(net):
    with pytest.raises(TypeError, match='features'):
        Disentangled(nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10)))
    with pytest.raises(TypeError, match='already'):
        Disentangled(Disentangled(net))
