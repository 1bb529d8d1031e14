"""afd_nb.attacks: PGD constraints, agreement with torchattacks.PGD, model state left untouched, reproducibility,
and its effect on the naturally trained ResNet-20 (exact CIFAR-10 test subset)."""
import copy
import pytest
import torch
import torch.nn.functional as F
from afd_nb.attacks import EPS, EVAL_PGD20, TRAIN_PGD, accuracy, pgd, robust_accuracy

EPS32 = torch.finfo(torch.float32).eps   # 2^-23; u = EPS32/2 is float32's unit roundoff
# |x' - x| <= eps up to three roundings: eps to float32 (<= u*eps), x + delta (<= u, pixel values <= 1), the difference (<= u*eps)
BALL_TOL = EPS32


@pytest.fixture(scope='module')
def data(cifar10_test):
    x, y = cifar10_test.tensors()
    return x[:200], y[:200]


def _linf(a, b): return (a - b).abs().amax().item()


def test_constants_follow_method():
    assert EPS == 8 / 255
    assert TRAIN_PGD == dict(eps=8 / 255, step_size=0.007, steps=10)     # training attack, authors' released training script
    assert EVAL_PGD20 == dict(eps=8 / 255, step_size=0.003, steps=20)    # PGD-20 of paper Tables 1-2


@pytest.mark.parametrize('eps,step_size,steps,random_start', [
    (8 / 255, 2 / 255, 5, True), (8 / 255, 0.1, 3, True), (2 / 255, 0.007, 4, False), (8 / 255, 0.0, 0, True)])
def test_perturbation_inside_ball_and_box(resnet20, data, eps, step_size, steps, random_start):
    x, y = data[0][:32], data[1][:32]
    assert (x == 0).any() and (x == 1).any()                  # real images touch the box: clipping is exercised
    xa = pgd(resnet20, x, y, eps=eps, step_size=step_size, steps=steps, random_start=random_start,
             generator=torch.Generator().manual_seed(0))
    assert xa.shape == x.shape and xa.dtype == x.dtype and not xa.requires_grad
    assert _linf(xa, x) <= eps + BALL_TOL
    assert xa.min() >= 0 and xa.max() <= 1
    if random_start or steps: assert _linf(xa, x) > eps / 2  # it really moved


def test_one_step_is_a_signed_ascent_step(resnet20, data):
    "Without random start and without active constraints, one step is exactly x + alpha*sign(grad CE)."
    x, y = data[0][:16], data[1][:16]
    alpha = 1 / 255
    xr = x.clone().requires_grad_()
    g, = torch.autograd.grad(F.cross_entropy(resnet20(xr), y), xr)
    xa = pgd(resnet20, x, y, eps=1.0, step_size=alpha, steps=1, random_start=False)
    free = ((x + alpha * g.sign()) > 0) & ((x + alpha * g.sign()) < 1)
    assert free.float().mean() > 0.9
    # same batch (16 = 2^4: the mean's factor 1/16 is exact, so the signs are those of pgd's summed loss); pgd rounds
    # x + α·s, then (x + α·s) - x, then x + δ: at most three roundings of values < 2, each <= u = EPS32/2
    tol = 4 * EPS32
    torch.testing.assert_close(xa[free], (x + alpha * g.sign())[free], rtol=0, atol=tol)
    with torch.no_grad(): assert F.cross_entropy(resnet20(xa), y) > F.cross_entropy(resnet20(x), y)


@pytest.mark.parametrize('eps,alpha,steps', [(8 / 255, 2 / 255, 10), (4 / 255, 0.003, 7)])
def test_matches_torchattacks(resnet20, data, eps, alpha, steps):
    torchattacks = pytest.importorskip('torchattacks')
    x, y = data[0][:32], data[1][:32]
    ref = torchattacks.PGD(resnet20, eps=eps, alpha=alpha, steps=steps, random_start=False)(x, y)
    ours = pgd(resnet20, x, y, eps=eps, step_size=alpha, steps=steps, random_start=False)
    # bit for bit: same process, kernels and update arithmetic; torchattacks' mean over 32 = 2^5 images is an exact
    # rescaling of our summed loss, so every gradient has the same signs
    assert torch.equal(ours, ref)
    assert _linf(ours, x) > eps / 2


def test_model_state_left_untouched(resnet20, data):
    "Mode restored module by module, BN statistics unchanged, no parameter .grad created or changed."
    x, y = data[0][:16], data[1][:16]
    m = copy.deepcopy(resnet20).train()
    m.layer2.eval()                                           # a mixed-mode model must come back exactly as it was
    modes = [mod.training for mod in m.modules()]
    buffers = {k: v.clone() for k, v in m.named_buffers()}
    assert all(p.grad is None for p in m.parameters())
    pgd(m, x, y, steps=2)
    assert [mod.training for mod in m.modules()] == modes
    assert all(p.grad is None for p in m.parameters())
    assert all(torch.equal(v, buffers[k]) for k, v in m.named_buffers())

    for p in m.parameters(): p.grad = torch.full_like(p, 0.5)  # existing gradients (mid training step) are kept
    pgd(m, x, y, steps=2)
    assert all(torch.equal(p.grad, torch.full_like(p, 0.5)) for p in m.parameters())
    acc_before = [mod.training for mod in m.modules()]
    accuracy(m, x, y); robust_accuracy(m, x, y, steps=1)
    assert [mod.training for mod in m.modules()] == acc_before


def test_works_under_no_grad_and_is_reproducible(resnet20, data):
    x, y = data[0][:16], data[1][:16]
    a = pgd(resnet20, x, y, steps=2, generator=torch.Generator().manual_seed(3))
    with torch.no_grad(): b = pgd(resnet20, x, y, steps=2, generator=torch.Generator().manual_seed(3))
    c = pgd(resnet20, x, y, steps=2, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_amp_bf16(resnet20, data):
    x, y = data[0][:8], data[1][:8]
    xa = pgd(resnet20, x, y, steps=2, amp_dtype=torch.bfloat16, generator=torch.Generator().manual_seed(0))
    assert xa.dtype == torch.float32 and _linf(xa, x) <= EPS + BALL_TOL and 0 <= xa.min() and xa.max() <= 1


def test_accuracy_helpers(resnet20, data):
    x, y = data
    with torch.no_grad(): z = resnet20(x)
    assert accuracy(resnet20, x, y) == (z.argmax(1) == y).sum().item() / len(y)   # one batch of 200: the same computation
    # batches of 7 compute the logits with other blockings; a prediction can only change where the top two logits are
    # within rounding of each other: ResNet-20's longest chain of dot products has sum(fan-in) terms, each off by <= u
    fan_in = sum(m.weight[0].numel() for m in resnet20.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)))
    tol = 2 * EPS32 * fan_in * z.abs().max().item()
    top2 = z.topk(2, dim=1).values
    near_ties = ((top2[:, 0] - top2[:, 1]) <= tol).sum().item()
    assert abs(accuracy(resnet20, x, y, batch_size=7) - accuracy(resnet20, x, y)) * len(y) <= near_ties
    # eps = 0: x' = clamp(x + 0, 0, 1) is x itself, the same batch, the same logits
    assert robust_accuracy(resnet20, x[:50], y[:50], eps=0.0, steps=1) == accuracy(resnet20, x[:50], y[:50])


def test_pgd_on_pretrained_resnet20(resnet20, data):
    """Accuracy falls as PGD steps grow (same random start), and PGD-20 at 8/255 is far below clean accuracy.
    Not a floating-point identity: on another CPU an image can change sides; the thresholds leave several images' margin."""
    x, y = data
    clean, clean100 = accuracy(resnet20, x, y), accuracy(resnet20, x[:100], y[:100])
    accs = {s: robust_accuracy(resnet20, x[:100], y[:100], eps=EPS, step_size=0.003, steps=s,
                               generator=torch.Generator().manual_seed(0)) for s in (1, 2, 5, 10)}
    pgd20 = robust_accuracy(resnet20, x, y, **EVAL_PGD20, generator=torch.Generator().manual_seed(0))
    print(f'first 100: clean {clean100:.3f}, PGD steps {accs}; first 200: clean {clean:.3f}, PGD-20 {pgd20:.3f}')
    assert clean100 > accs[1] > accs[10], (clean100, accs)
    assert clean > 0.85 and pgd20 < 0.10
