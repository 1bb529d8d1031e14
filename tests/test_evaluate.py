"""afd_nb.evaluate on the pretrained ResNet-20 and the exact CIFAR-10 test subset (small n: AutoAttack is slow on CPU)."""
import math
import pytest
import torch
from afd_nb.evaluate import evaluate, results_table, paper_results, make_autoattack, autoattack_config, AA_STANDARD, METRICS

KEYS = {'Clean', 'PGD', 'AA', 'Avg', 'n', 'config'}


@pytest.fixture(scope='module')
def xy(cifar10_test):
    return cifar10_test.tensors()


def _clean_acc(model, x, y):
    with torch.no_grad(): return 100 * (model.eval()(x).argmax(1) == y).float().mean().item()


def test_eps0_robust_equals_clean_and_model_untouched(resnet20, xy):
    "ε = 0: PGD and every AutoAttack attack must leave accuracy at its clean value; the model comes back as it was."
    x, y = xy
    n = 3
    want = _clean_acc(resnet20, x[:n], y[:n])
    rng = torch.get_rng_state()
    resnet20.train()          # evaluate must switch to eval mode itself and restore train mode afterwards
    try:
        r = evaluate(resnet20, x, y, n=n, eps=0, aa_version='custom', aa_attacks=AA_STANDARD,
                     aa_n_target_classes=1, aa_n_queries=50, progress=False)
        assert resnet20.training and all(m.training for m in resnet20.modules())
    finally:
        resnet20.eval()
    assert KEYS <= set(r)
    assert r['n'] == n
    assert r['Clean'] == pytest.approx(want)
    assert r['PGD'] == r['Clean'] and r['AA'] == r['Clean']
    assert r['config']['autoattack']['attacks'] == AA_STANDARD
    assert r['config']['autoattack']['name'] == 'custom: apgd-ce+apgd-t+fab-t+square'
    assert all(p.requires_grad and p.grad is None for p in resnet20.parameters())   # FAB's backward left nothing
    assert torch.equal(torch.get_rng_state(), rng)                                    # AA re-seeds; we forked the RNG


def test_standard_aa_below_pgd_below_clean(resnet20, xy):
    "ε = 8/255, the reference AutoAttack: AA ≤ PGD-20 ≤ Clean, and a natural model is broken."
    x, y = xy
    r = evaluate(resnet20, x, y, n=10, progress=False)
    assert KEYS <= set(r) and r["n"] == 10
    c = r['config']['autoattack']
    assert c['version'] == 'standard' and c['attacks'] == AA_STANDARD
    assert (c['apgd_t_n_target_classes'], c['fab_t_n_target_classes'], c['square_n_queries']) == (9, 9, 5000)
    assert r['config']['pgd'] == dict(steps=20, step_size=0.003, random_start=True, loss='ce')
    assert r['AA'] <= r['PGD'] <= r['Clean']
    assert r['Clean'] >= 75 and r['PGD'] < r['Clean'] - 50      # natural model: high clean, ~no robustness
    assert r['Avg'] == pytest.approx((r['Clean'] + r['PGD'] + r['AA']) / 3)
    assert all(isinstance(r[k], float) for k in ('Clean', 'PGD', 'AA', 'Avg'))


def test_n_limits_count_and_no_autoattack(resnet20, xy):
    "n picks the first n images (batched or not); autoattack=False gives AA None and Avg = mean(Clean, PGD)."
    x, y = xy
    kw = dict(autoattack=False, pgd_steps=2, progress=False)
    r7 = evaluate(resnet20, x, y, n=7, batch_size=3, **kw)
    assert r7['n'] == 7 and r7['config']['n'] == 7
    assert r7['Clean'] == pytest.approx(_clean_acc(resnet20, x[:7], y[:7]))
    assert r7['AA'] is None and r7['config']['autoattack'] is None
    assert r7['Avg'] == pytest.approx((r7['Clean'] + r7['PGD']) / 2)
    # the uint8 images give the same numbers as their float version, with the same seed
    xu = (x[:7] * 255).round().to(torch.uint8)
    ru = evaluate(resnet20, xu, y[:7], n=7, batch_size=7, **kw)
    assert ru['Clean'] == r7['Clean']
    # n larger than the data is clipped to the data
    assert evaluate(resnet20, x[:5], y[:5], n=50, **kw)['n'] == 5


def test_bad_arguments(resnet20, xy):
    x, y = xy
    with pytest.raises(ValueError, match='custom'):
        evaluate(resnet20, x, y, n=2, aa_attacks=['apgd-ce'], progress=False)
    with pytest.raises(ValueError, match="'standard' or 'custom'"):
        evaluate(resnet20, x, y, n=2, aa_version='plus', progress=False)
    with pytest.raises(ValueError, match=r'\[0,1\]'):
        evaluate(resnet20, x[:2] * 2 - 1, y[:2], progress=False)
    with pytest.raises(ValueError, match='positive'):
        evaluate(resnet20, x, y, n=0, progress=False)
    with pytest.raises(ValueError, match='unknown'):
        make_autoattack(resnet20, version='custom', attacks=['apgd-ce', 'pgd'])


def test_custom_keeps_standard_settings(resnet20):
    "A custom adversary differs from the standard one only where asked (pyautoattack's own custom defaults differ)."
    c = autoattack_config(make_autoattack(resnet20, version='custom', attacks=['apgd-ce', 'square'], n_queries=300))
    assert c['version'] == 'custom' and c['attacks'] == ['apgd-ce', 'square']
    assert c['apgd_ce_n_restarts'] == 1 and c['apgd_ce_n_iter'] == 100 and c['square_n_queries'] == 300
    assert 'apgd_t_n_target_classes' not in c


def test_results_table_layout():
    rows = [dict(Clean=90., PGD=50., AA=45., Avg=61.67, n=10, dataset='cifar10', method='AFD'),
            dict(Clean=80., PGD=40., AA=None, Avg=60., n=10, dataset='cifar10', method='vAFT'),
            dict(Clean=60., PGD=25., AA=20., Avg=35., n=10, dataset='cifar100', method='AFD',
                 config=dict(autoattack=dict(version='custom', name='custom: apgd-ce')))]
    t = results_table(rows)
    assert list(t.columns.get_level_values('dataset')) == ['cifar10'] * 4 + ['cifar100'] * 4
    assert list(t.columns.get_level_values('metric')) == METRICS * 2
    assert list(t.index) == ['AFD', 'vAFT', 'AFD [AA custom: apgd-ce]']
    assert t.loc['AFD', ('cifar10', 'PGD')] == 50 and t.loc['vAFT', ('cifar10', 'Clean')] == 80
    assert math.isnan(t.loc['vAFT', ('cifar10', 'AA')]) and math.isnan(t.loc['AFD', ('cifar100', 'Clean')])
    assert t.loc['AFD [AA custom: apgd-ce]', ('cifar100', 'AA')] == 20
    with pytest.raises(ValueError, match='dataset'): results_table([dict(Clean=1.)])
    with pytest.raises(ValueError, match='two rows'): results_table(rows[:1] * 2)


def test_paper_results_roundtrip():
    t = results_table(paper_results('resnet18'))
    assert t.shape == (4, 12)
    assert t.loc[('resnet18', 'AFD'), ('cifar10', 'AA')] == 47.40
    assert t.loc[('resnet18', 'vAFT'), ('tiny_imagenet', 'Avg')] == 30.27
    for r in paper_results('wrn34_10'):   # the paper's Avg is the mean of its three numbers
        assert r['Avg'] == pytest.approx((r['Clean'] + r['PGD'] + r['AA']) / 3, abs=0.011)
    with pytest.raises(ValueError, match='resnet18'): paper_results('resnet20')


def test_disentangled_and_folded_models(resnet20, xy):
    "A Disentangled model handed over in train mode is evaluated in eval mode (z1 logits), like its folded copy."
    import copy
    from afd_nb.disentangle import Disentangled, fold
    x, y = xy
    dis = Disentangled(copy.deepcopy(resnet20))
    with torch.no_grad(): dis.D1.weight.mul_(1.5)          # D1 ≠ I, so fold has something to fold
    dis.train()
    kw = dict(n=4, pgd_steps=3, aa_version='custom', aa_attacks=['apgd-ce'], progress=False)
    rd = evaluate(dis, x, y, **kw)
    assert dis.training
    rf = evaluate(fold(dis.eval()), x, y, **kw)
    assert {k: rd[k] for k in ('Clean', 'PGD', 'AA')} == {k: rf[k] for k in ('Clean', 'PGD', 'AA')}
    assert rd['Clean'] == pytest.approx(_clean_acc(dis, x[:4], y[:4]))


class _FakeAdversary:
    "Stands in for AutoAttack: returns the clean images and claims that the images in `flip` were broken."
    def __init__(self, model, flip): self.model, self.flip = model, set(flip)
    def run_standard_evaluation(self, x, y, batch_size):
        with torch.no_grad(): pred = self.model(x).argmax(1)
        claimed = pred.clone()
        for i in self.flip:
            if i < len(y): claimed[i] = (y[i] + 1) % 10      # 'broken' by AutoAttack, right when re-scored (if pred == y)
        return x.clone(), claimed


def _with_fake_aa(monkeypatch, flip):
    import afd_nb.evaluate as ev
    monkeypatch.setattr(ev, 'make_autoattack', lambda model, *a, **k: _FakeAdversary(model, flip))
    monkeypatch.setattr(ev, 'autoattack_config', lambda adv: dict(version='fake', name='fake'))


def test_aa_rescore_disagreements_are_counted_then_refused(resnet20, xy, monkeypatch):
    "One contradicted verdict in 64 images: a warning and a count (AA keeps AutoAttack's verdict); more than allowed: an error."
    x, y = xy
    with torch.no_grad(): right = (resnet20(x[:64]).argmax(1) == y[:64]).nonzero().flatten().tolist()
    _with_fake_aa(monkeypatch, right[:1])
    kw = dict(n=64, batch_size=64, pgd_steps=1, progress=False)
    with pytest.warns(UserWarning, match='disagree on 1 of 64 images'):
        r = evaluate(resnet20, x, y, **kw)
    rs = r['aa_rescore']
    assert (rs['disagreements'], rs['allowed'], rs['images']) == (1, 1, right[:1])
    assert rs['rel_margins'][0] > 0                                   # the re-score says: correct, with this margin
    assert r['AA'] == pytest.approx(r['Clean'] - 100 / 64) and rs['AA_rescored'] == pytest.approx(r['Clean'])
    _with_fake_aa(monkeypatch, right[:2])
    with pytest.raises(RuntimeError, match=r'disagree on 2 of the first 64 images \(allowed: 1'):
        evaluate(resnet20, x, y, **kw)
    with pytest.warns(UserWarning, match='allowed 3'):
        r = evaluate(resnet20, x, y, aa_max_disagree=0.05, **kw)      # 5% of 64 -> 3 allowed
    assert r['aa_rescore']['disagreements'] == 2 and r['aa_rescore']['allowed'] == 3


def test_tf32_is_off_during_evaluation_and_restored(resnet20, xy):
    "The evaluator runs in full fp32 by default, records the switches it ran with, and leaves the process as it was."
    from afd_nb.evaluate import tf32_flags, use_tf32
    x, y = xy
    with use_tf32(True):
        r = evaluate(resnet20, x, y, n=2, autoattack=False, pgd_steps=1, progress=False)
        assert tf32_flags() == dict(matmul=True, cudnn=True)
        r_on = evaluate(resnet20, x, y, n=2, autoattack=False, pgd_steps=1, progress=False, tf32=None)
    assert r['config']['tf32'] == dict(matmul=False, cudnn=False) and r['config']['tf32_requested'] is False
    assert r_on['config']['tf32'] == dict(matmul=True, cudnn=True) and r['aa_rescore'] is None


def test_per_image_correctness_matches_the_percentages(resnet20, xy):
    "per_image=True: one boolean per image and metric, in image order across batches; the numbers are unchanged by it."
    x, y = xy
    kw = dict(n=12, eps=1 / 255, batch_size=5, aa_version='custom', aa_attacks=['apgd-ce'], progress=False)   # small eps: some survive
    r, rp = evaluate(resnet20, x, y, **kw), evaluate(resnet20, x, y, per_image=True, **kw)
    assert 'correct' not in r and all(r[k] == rp[k] for k in ('Clean', 'PGD', 'AA', 'Avg'))
    c = rp['correct']
    assert [(v.dtype, v.shape) for v in c.values()] == [(torch.bool, (12,))] * 3
    for k in ('Clean', 'PGD', 'AA'): assert 100 * c[k].sum().item() / 12 == rp[k], k   # the same count, the same formula
    with torch.no_grad(): assert torch.equal(c['Clean'], resnet20.eval()(x[:12]).argmax(1) == y[:12])
    assert not (c['AA'] & ~c['Clean']).any()                     # AutoAttack keeps a wrong clean prediction wrong
    assert 0 < c['PGD'].sum() < c['Clean'].sum() or 0 < c['AA'].sum() < c['Clean'].sum(), c   # both values occur
    assert evaluate(resnet20, x, y, n=4, autoattack=False, per_image=True, progress=False)['correct']['AA'] is None
