"""Tests of afd_nb.losses: formulas, the frozen teacher, and which parameters each loss reaches."""
import copy
import pytest
import torch
import torch.nn.functional as F
from afd_nb.disentangle import Disentangled, confusing_label
from afd_nb.losses import l_ce, l_dis, l_sep, l_align, teacher_features, make_teacher, afd_losses, grad_routes

EPS32 = torch.finfo(torch.float32).eps   # 2^-23; u = EPS32/2 is float32's unit roundoff
SMALL_TOL = 8 * EPS32                    # hand-made 2-vectors: 2-term sums, a square root, a division, a mean of 4


@pytest.fixture(scope='module')
def setup(cifar10_test, resnet20):
    "Student (D1, D2 moved off the identity so that L_sep has a gradient), frozen teacher, a real batch."
    x, y = cifar10_test.tensors()
    x, y = x[:32], y[:32]
    teacher = make_teacher(resnet20)
    student = Disentangled(copy.deepcopy(resnet20)).train()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        student.D1.weight.add_(0.05 * torch.randn(64, 64, generator=g))
        student.D2.weight.add_(0.05 * torch.randn(64, 64, generator=g))
    x_adv = (x + (8 / 255) * torch.randn(x.shape, generator=g).sign()).clamp(0, 1)   # a perturbed batch
    return student, teacher, x, x_adv, y


def _groups(student, teacher):
    return {'backbone': [p for n, p in student.backbone.named_parameters() if not n.startswith('linear.')],
            'D1': [student.D1.weight], 'D2': [student.D2.weight],
            'classifier': list(student.classifier.parameters()), 'teacher': list(teacher.parameters())}


def _reached(student, teacher, loss) -> set:
    "Back-propagate `loss` with .backward() from zero grads; the groups holding a non-zero gradient."
    student.zero_grad(set_to_none=True)
    loss.backward()
    got = {name for name, ps in _groups(student, teacher).items()
           if any(p.grad is not None and p.grad.abs().sum() > 0 for p in ps)}
    student.zero_grad(set_to_none=True)
    return got


def _losses(setup):
    student, teacher, x, x_adv, y = setup
    out = student(x_adv)
    return afd_losses(out, y, teacher_features(teacher, x))


def test_l_dis_reaches_only_d2_and_classifier(setup):
    student, teacher = setup[:2]
    assert _reached(student, teacher, _losses(setup)['dis']) == {'D2', 'classifier'}


def test_l_sep_reaches_backbone_d1_d2(setup):
    student, teacher = setup[:2]
    assert _reached(student, teacher, _losses(setup)['sep']) == {'backbone', 'D1', 'D2'}


def test_l_align_reaches_backbone_and_d1_never_the_teacher(setup):
    student, teacher = setup[:2]
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    assert _reached(student, teacher, _losses(setup)['align']) == {'backbone', 'D1'}
    assert all(p.grad is None for p in teacher.parameters())
    assert not teacher.training
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in before.items())


def test_l_ce_reaches_backbone_d1_classifier(setup):
    student, teacher = setup[:2]
    assert _reached(student, teacher, _losses(setup)['ce']) == {'backbone', 'D1', 'classifier'}


def test_grad_routes_structural(setup):
    student, teacher = setup[:2]
    routes = grad_routes(_losses(setup), _groups(student, teacher))
    reached = {ln: {g for g, v in r.items() if v is not None} for ln, r in routes.items()}
    assert reached == {'ce': {'backbone', 'D1', 'classifier'}, 'dis': {'D2', 'classifier'},
                       'sep': {'backbone', 'D1', 'D2'}, 'align': {'backbone', 'D1'}}
    assert all(p.grad is None for p in student.parameters())   # autograd.grad writes no .grad


def test_training_step_never_updates_the_teacher(setup, resnet20):
    student, teacher, x, x_adv, y = setup
    student, before = copy.deepcopy(student), {k: v.clone() for k, v in teacher.state_dict().items()}
    opt = torch.optim.SGD(student.parameters(), lr=0.1)
    for _ in range(2):
        ls = afd_losses(student(x_adv), y, teacher_features(teacher, x))
        opt.zero_grad(); (ls['ce'] + 0.05 * ls['dis'] + 0.25 * ls['sep'] + 25 * ls['align']).backward(); opt.step()
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in before.items())   # incl. BN buffers
    assert not torch.equal(student.backbone.conv1.weight, resnet20.conv1.weight)     # the student did move
    assert all(p.grad is None for p in teacher.parameters()) and not teacher.training


def test_teacher_features_eval_no_grad_mode_restored(setup, resnet20):
    _, _, x, _, _ = setup
    t = copy.deepcopy(resnet20).train()                     # even a teacher left in train mode
    bn = t.bn1.running_mean.clone()
    f = teacher_features(t, x)
    assert not f.requires_grad and f.grad_fn is None
    assert t.training                                       # its mode is restored
    assert torch.equal(t.bn1.running_mean, bn)              # BN statistics untouched (eval inside)
    with torch.no_grad(): ref = copy.deepcopy(resnet20).eval().features(x)
    assert torch.equal(f, ref)


def test_make_teacher_is_frozen_copy(resnet20):
    m = copy.deepcopy(resnet20).train().requires_grad_(True)
    t = make_teacher(m)
    assert t is not m and not t.training and m.training
    assert all(not p.requires_grad for p in t.parameters())
    assert all(p.requires_grad for p in m.parameters())          # the original is not frozen
    assert all(a.data_ptr() != b.data_ptr() for a, b in zip(t.parameters(), m.parameters()))


def test_formulas():
    f1 = torch.tensor([[1., 0.], [1., 1.], [2., 0.], [0., 3.]])
    f2 = torch.tensor([[-3., 0.], [1., 1.], [0., 5.], [0., 1.]])
    close = lambda a, b, tol=SMALL_TOL: abs(float(a) - float(b)) <= tol
    assert close(l_sep(f1, f2), (-1 + 1 + 0 + 1) / 4)     # signed, not |cos|
    assert close(l_align(f1, f2), 1 - (-1 + 1 + 0 + 1) / 4)
    assert close(l_align(f1, 7 * f1), 0.)
    z = torch.tensor([[2., 0., -1.], [0., 1., 3.]]); y = torch.tensor([0, 2]); yc = confusing_label(z, y)
    ref = lambda z, t: (z.double().logsumexp(1) - z.double().gather(1, t[:, None])[:, 0]).mean()
    tol = (3 + 2) * EPS32 * (z.abs().max().item() + 1)    # float32 log-sum-exp of C = 3 terms, then a mean of B = 2
    assert close(l_ce(z, y), ref(z, y), tol) and close(l_dis(z, yc), ref(z, yc), tol)
    assert yc.tolist() == [1, 1]


def test_afd_losses_matches_parts(setup):
    student, teacher, x, x_adv, y = setup
    out = student(x_adv); ft = teacher_features(teacher, x)
    ls = afd_losses(out, y, ft)
    assert list(ls) == ['ce', 'dis', 'sep', 'align']
    yc = confusing_label(out.z1, y)
    for k, v in dict(ce=l_ce(out.z1, y), dis=l_dis(out.z2, yc), sep=l_sep(out.f1, out.f2), align=l_align(out.f1, ft)).items():
        assert torch.equal(ls[k], v), k
    assert -1 <= ls['sep'].item() <= 1 and 0 <= ls['align'].item() <= 2


def test_l_sep_gradient_vanishes_at_identity(setup, resnet20):
    "At D1 = D2 = I, f1 = f2 and cos is at its maximum: no separating gradient yet."
    _, _, x, _, _ = setup
    s = Disentangled(copy.deepcopy(resnet20)).train()
    out = s(x)
    loss = l_sep(out.f1, out.f2)
    d, B = out.f1.shape[1], len(out.f1)
    assert abs(loss.item() - 1) <= (d + B) * EPS32             # cos of d-term sums (~d*u each), then a mean of B values <= 1
    g, = torch.autograd.grad(loss, s.D1.weight, retain_graph=True)
    # the gradient is the difference of two terms that cancel exactly at f1 = f2; the first one alone sets the scale
    f1n, f2n = out.f1 / out.f1.norm(dim=1, keepdim=True).detach(), (out.f2 / out.f2.norm(dim=1, keepdim=True)).detach()
    half, = torch.autograd.grad((f1n * f2n).sum(1).mean(), s.D1.weight)
    assert g.norm() <= 4 * d * EPS32 * half.norm()             # zero up to the rounding of d-term sums
