"""The comparison statistic of afd_nb.report (10b_report): t quantiles, paired differences with test-set noise,
one verdict rule for every claim, claims per (dataset, architecture), the collapse precondition, EMA and raw
weights, and the figures of the disentangler and of raw against EMA weights. Hand-made tables with known answers."""
import json, math
from pathlib import Path
import numpy as np, pandas as pd, pytest
import matplotlib; matplotlib.use('Agg')
from afd_nb import report as R


@pytest.mark.parametrize('p, df, want', [(0.975, 1, 12.706), (0.975, 2, 4.303), (0.975, 4, 2.776), (0.975, 10, 2.228),
                                         (0.975, 30, 2.042), (0.95, 5, 2.015), (0.995, 3, 5.841), (0.975, 1e9, 1.960)])
def test_t_quantile_matches_printed_tables(p, df, want):
    assert R.t_quantile(p, df) == pytest.approx(want, abs=5e-4)     # the tables print 3 decimals


def test_clear_difference_holds_and_its_opposite_does_not():
    c = R.paired_diff({0: 15.0, 1: 17.0, 2: 16.0}, {0: 10.0, 1: 11.0, 2: 9.0})   # d = 5, 6, 7
    assert (c['d'], c['n'], c['df'], c['N']) == (6.0, 3, 2.0, 0) and c['se'] == pytest.approx(1 / math.sqrt(3), rel=1e-12)
    assert R.comparison_verdict(c) == 'holds'                      # 6 − 4.303 · 0.577 = 3.52 > 0
    assert R.comparison_verdict(c, sign=-1) == 'does not hold'     # claimed below, clearly above
    swapped = R.paired_diff({0: 10.0, 1: 11.0, 2: 9.0}, {0: 15.0, 1: 17.0, 2: 16.0})
    assert R.comparison_verdict(swapped) == 'does not hold'


def test_the_t_quantile_not_2_decides():
    "d = 2, 3, 4: mean 3, SE 0.577. A 2-SE screen would call it; t(0.975, 2) = 4.30 does not (3 − 2.48 > 0, so it holds),"
    c = R.paired_diff({0: 2.0, 1: 3.0, 2: 4.0}, {0: 0.0, 1: 0.0, 2: 0.0})
    assert R.comparison_verdict(c) == 'holds'
    c = R.paired_diff({0: 0.5, 1: 2.0, 2: 3.5}, {0: 0.0, 1: 0.0, 2: 0.0})   # mean 2, SE 0.866: 2 > 2·0.866 but < 4.30·0.866
    assert 2 > 2 * c['se'] and R.comparison_verdict(c) == 'inconclusive'


def test_noise_is_inconclusive_zero_spread_and_one_seed_decide_nothing():
    assert R.comparison_verdict(R.paired_diff({0: 1.0, 1: 2.0, 2: 3.0}, {0: 0.0, 1: 2.0, 2: 4.0})) == 'inconclusive'
    flat = R.paired_diff({0: 15.0, 1: 16.0, 2: 17.0}, {0: 10.0, 1: 11.0, 2: 12.0})   # 5, 5, 5: SE 0
    assert flat['se'] == 0 and R.comparison_verdict(flat) == 'inconclusive (no spread)'
    assert 'no spread' in R._evidence('Clean A − B', flat) and 'CI' not in R._evidence('Clean A − B', flat)
    almost = R.paired_diff({0: 0.1 + 0.2, 1: 0.3}, {0: 0.0, 1: 0.0})                # rounding, not spread
    assert 0 < almost['se'] < 1e-15 and R.comparison_verdict(almost) == 'inconclusive (no spread)'
    one = R.paired_diff({0: 50.0}, {0: 10.0})
    assert R.comparison_verdict(one) == 'not testable at this scale (one seed)'
    assert R.comparison_verdict(R.paired_diff({0: 1.0}, {1: 2.0})) == 'not testable at this scale (no seed in common)'


def test_image_level_noise_widens_the_interval():
    "Seeds agree (d = 10, 11) but the models are right on different images: holds at seed level, inconclusive with images."
    idx = np.arange(100)
    ca, cb = {0: idx < 60, 1: idx < 61}, {0: idx >= 50, 1: idx >= 50}
    a, b = {s: 100 * v.mean() for s, v in ca.items()}, {s: 100 * v.mean() for s, v in cb.items()}
    seed_only, both = R.paired_diff(a, b), R.paired_diff(a, b, ca, cb)
    D = np.r_[np.full(50, 100.0), np.zeros(10), [-50.0], np.full(39, -100.0)]       # per-image differences, written out
    assert both['d'] == pytest.approx(D.mean(), rel=1e-12) == pytest.approx(10.5, rel=1e-12)
    assert both['se_image'] == pytest.approx(D.std(ddof=1) / 10, rel=1e-12) and seed_only['se'] == pytest.approx(0.5, rel=1e-12)
    assert both['se'] == pytest.approx(math.sqrt(0.25 + both['se_image'] ** 2), rel=1e-12)
    ws = both['se'] ** 4 / (0.5 ** 4 / 1 + both['se_image'] ** 4 / 99)
    assert both['df'] == pytest.approx(ws, rel=1e-12) and both['level'] == 'seeds and images'
    assert R.comparison_verdict(seed_only) == 'holds' and R.comparison_verdict(both) == 'inconclusive'
    flat = R.paired_diff({0: 60.0, 1: 60.0}, {0: 50.0, 1: 50.0}, {0: idx < 60, 1: idx < 60}, {0: idx >= 50, 1: idx >= 50})
    assert flat['se_seed'] == 0 and flat['se'] > 9 and flat['df'] == pytest.approx(99, rel=1e-12)   # SE_seed = 0: N − 1
    part = R.paired_diff(a, b, ca, {0: cb[0]})                  # one pair lacks per-image data: seed level only
    assert part['level'] == 'seed-level only' and part['se'] == seed_only['se']


def test_several_comparisons_intersection_union_and_bonferroni():
    ok, rev = dict(d=6.0, se=1.0, df=2.0, n=3, sign=1), dict(d=-5.0, se=1.0, df=2.0, n=3, sign=1)
    assert R.claim_verdict([ok, ok, ok]) == 'holds'
    assert R.claim_verdict([ok, dict(ok, d=1.0)]) == 'inconclusive'            # every comparison must hold
    assert R.claim_verdict([rev]) == 'does not hold'                            # 5 > t(0.975, 2) = 4.30
    assert R.claim_verdict([ok, rev]) == 'inconclusive'                         # 5 < t(1 − 0.025/2, 2) = 6.21
    assert R.claim_verdict([ok, dict(rev, d=-7.0)]) == 'does not hold'          # 7 > 6.21
    assert R.claim_verdict([ok, dict(rev, d=-7.0), ok]) == 'inconclusive'       # 7 < t(1 − 0.05/6, 2) = 7.65
    assert R.claim_verdict([ok, dict(ok, sign=-1, d=-6.0)]) == 'holds'          # a claimed decrease
    assert R.claim_verdict([ok, dict(ok, se=0.0)]) == 'inconclusive (no spread)'
    assert R.claim_verdict([ok, dict(ok, n=1)]) == 'not testable at this scale (one seed)'
    assert R.claim_verdict([]).startswith('not testable')


# ---------------------------------------------------------------- run folders and claims_table
def _run(sd: Path, rid, params, ev=None, epochs=None, correct=None):
    d = sd/rid; d.mkdir(parents=True)
    (d/'status.json').write_text(json.dumps(dict(state='done')))
    (d/'params.json').write_text(json.dumps(dict(finetune=params)))
    if ev: (d/'eval.json').write_text(json.dumps(ev))
    if epochs: (d/'metrics.jsonl').write_text(''.join(json.dumps(e) + '\n' for e in epochs))
    if correct: np.savez(d/'correct.npz', **correct)


def _acc(clean, pgd, aa, raw=None):
    ev = dict(Clean=clean, PGD=pgd, AA=aa, Avg=(clean + pgd + aa) / 3, n=100, n_aa=100, weights='ema')
    if raw: ev['raw'] = dict(Clean=raw[0], PGD=raw[1], AA=raw[2], Avg=sum(raw) / 3, n=100, n_aa=100)
    return ev


def _claims(sd, **kw):
    res = R.collect_results(sd)
    return R.claims_table(res, R.collect_metrics(sd, res), R.collect_correct(sd), **kw)


def test_pooled_datasets_are_not_seeds(tmp_path):
    "The paper presets: 3 datasets × 1 seed each are three one-seed comparisons, not one with n = 3."
    sd = tmp_path/'presets'
    for ds, shift in (('cifar10', 0), ('cifar100', 1), ('tiny_imagenet', 2)):
        for m, up in (('vaft', 0), ('afd', 5)):
            _run(sd, f'{ds}-{m}', dict(dataset=ds, arch='resnet18', method=m, seed=0), _acc(80 + up + shift, 40 + up, 30 + up))
    cl = _claims(sd)
    assert list(cl['setup']) == ['ResNet-18 / CIFAR-10', 'ResNet-18 / CIFAR-100', 'ResNet-18 / Tiny-ImageNet']
    assert (cl['verdict'] == 'not testable at this scale (one seed)').all()
    assert cl['evidence'].str.contains(r'\(1 seed\)').all() and not cl['evidence'].str.contains('3 seeds').any()


def _study(sd, pgd, with_correct=False, raw=False):
    "vAFT and AFD, 3 seeds; AFD's gap ends below vAFT's and vAFT's widens; AFD +5.x points on each metric."
    idx = np.arange(100)
    for s in (0, 1, 2):
        for m, up in (('vaft', 0.0), ('afd', 5 + 0.1 * s)):
            ep = [dict(epoch=e, clean_acc=.5, pgd_acc=.1, gap=dict(linf=g, linf_rel=g / 10),
                       **(dict(raw=dict(clean_acc=.4, pgd_acc=.1, gap=dict(linf=g, linf_rel=g / 10))) if raw else {}))
                  for e, g in ((0, 7.0), (1, 1.0), (2, (2.0 if m == 'vaft' else 1.0) + 0.1 * s))]
            cor = None
            if with_correct:   # clean correctness on images with the same accuracy, different images per method
                k = int(round(60 + up))
                cor = dict(Clean=(idx < k) if m == 'afd' else (idx >= 100 - k))
            _run(sd, f'{m}-s{s}', dict(dataset='cifar10', arch='resnet20', method=m, seed=s),
                 _acc(60 + up if not with_correct else float(int(round(60 + up))), pgd + up, 10 + up,
                      raw=(55 + up, pgd + up, 9 + up) if raw else None), ep, cor)


def test_gap_claims_need_the_collapse_to_be_over(tmp_path):
    _study(tmp_path/'early', pgd=3.0)
    cl = _claims(tmp_path/'early').set_index('claim')['verdict']
    assert cl['1. AFD beats vAFT in clean and robust accuracy (%)'] == 'holds'     # accuracy claims need no precondition
    v = cl['2. the absolute L∞ gap of the baselines widens during fine-tuning']
    assert v.startswith('not testable at this scale (not past the collapse') and 'vAFT 3.0%' in v and 'below 8%' in v
    v = cl["3. AFD's absolute L∞ gap stays below vAFT's"]
    assert v.startswith('not testable at this scale') and 'vAFT 3.0%' in v and 'AFD 8.1%' in v
    _study(tmp_path/'late', pgd=10.0)
    cl = _claims(tmp_path/'late').set_index('claim')['verdict']
    assert cl['2. the absolute L∞ gap of the baselines widens during fine-tuning'] == 'holds'   # +1.1 ± 0.058
    assert cl["3. AFD's absolute L∞ gap stays below vAFT's"] == 'inconclusive (no spread)'   # −1, −1, −1: g(x) only
    cl = _claims(tmp_path/'late', threshold=12.0).set_index('claim')['verdict']
    assert cl['2. the absolute L∞ gap of the baselines widens during fine-tuning'].startswith('not testable')


def test_seed_level_only_without_correct_npz_and_images_with_it(tmp_path):
    _study(tmp_path/'a', pgd=10.0)
    ev = _claims(tmp_path/'a')['evidence'][0]
    assert 'Clean AFD − vAFT: +5.1, 95% CI' in ev and '3 seeds, seed-level only' in ev
    _study(tmp_path/'b', pgd=10.0, with_correct=True)
    assert set(R.collect_correct(tmp_path/'b')) == {f'{m}-s{s}' for m in ('vaft', 'afd') for s in (0, 1, 2)}
    cl = _claims(tmp_path/'b')
    ev = cl['evidence'][0]
    assert 'Clean AFD − vAFT: +5' in ev and '3 seeds × 100 images' in ev and 'PGD AFD − vAFT' in ev   # PGD: no array
    assert 'seed-level only' in ev.split('; ')[1]
    assert cl['verdict'][0] == 'inconclusive'          # AFD and vAFT right on mostly different images: image noise


def test_raw_columns_and_the_raw_table(tmp_path):
    _study(tmp_path/'r', pgd=10.0, raw=True)
    res = R.collect_results(tmp_path/'r')
    assert {'raw_Clean', 'raw_PGD', 'raw_AA', 'raw_Avg'} <= set(res) and (res['eval_weights'] == 'ema').all()
    afd0 = res.set_index('run_id').loc['afd-s0']
    assert (afd0['Clean'], afd0['raw_Clean']) == (65.0, 60.0)
    raw = _claims(tmp_path/'r', weights='raw').set_index('claim')
    assert raw.loc['1. AFD beats vAFT in clean and robust accuracy (%)', 'verdict'] == 'holds'
    assert raw.loc['2. the absolute L∞ gap of the baselines widens during fine-tuning', 'verdict'] == 'holds'   # from raw.gap.*
    text = R.write_report(tmp_path/'r').read_text()
    assert '### EMA weights (main comparison)' in text and '### Raw weights, beside the main comparison' in text
    assert 'intersection–union' in text and 'Bonferroni' in text and 'seed-level only' in text
    assert (tmp_path/'r'/'claims_raw.csv').exists() and (tmp_path/'r'/'raw_ema.png').exists()
    assert '(5.1 ± 0.' not in text
    _study(tmp_path/'old', pgd=10.0)                    # runs without raw columns or correct.npz still load
    assert R.claims_table(R.collect_results(tmp_path/'old'), pd.DataFrame(), weights='raw').empty
    text = R.write_report(tmp_path/'old').read_text()
    assert 'predate tracking both weights' in text and 'every interval is seed-level only' in text
    assert '### Raw weights' not in text and not (tmp_path/'old'/'raw_ema.png').exists()


def test_committed_csvs_still_give_claims():
    "results/cpu-study/40-step's CSVs (no raw columns, no per-image data): seed-level verdicts, the gap claims not testable."
    root = Path(__file__).resolve().parents[1]/'results'/'cpu-study'/'40-step'
    res, met = pd.read_csv(root/'results.csv'), pd.read_csv(root/'epochs.csv')
    cl = R.claims_table(res, met)
    assert len(cl) == 8 and (cl['setup'] == 'ResNet-20 / CIFAR-10').all()
    assert cl['evidence'].str.contains('seed-level only').all()
    gap = cl[cl['claim'].str.startswith(('2.', '3.'))]
    assert gap['verdict'].str.startswith('not testable at this scale (not past the collapse').all()


def test_figure_titles_and_the_gap_labels(tmp_path):
    sd = tmp_path/'f'
    for m, s in (('vaft', 0), ('afd', 0), ('afd', 1)):
        _run(sd, f'{m}-s{s}', dict(dataset='cifar10', arch='resnet20', method=m, seed=s, eval_steps=20.0, n_eval=100.0,
                                   n_train=1000.0, eps=8 / 255), _acc(60, 10, 5),
             [dict(epoch=e, clean_acc=.5, pgd_acc=.1, gap=dict(linf=1 + e, linf_rel=.1 * (1 + e), d1_linf=.5, d1_linf_rel=.05),
                   **({} if m == 'vaft' or e == 0 else dict(dis=dict(L_dis=1 / e, L_sep=.5, L_align=.1, d1_dev=.2 * e, d2_dev=.3 * e, d2_acc=.4))))
              for e in range(3)])
    res = R.collect_results(sd); met = R.collect_metrics(sd, res)
    fig = R.plot_gap(met, res)
    title = fig._suptitle.get_text()
    assert 'PGD-20 ' in title and '20.0' not in title and '1000 training images' in title and '1000.0' not in title
    fig.canvas.draw(); rr = fig.canvas.get_renderer()
    for ax in fig.axes:                                  # no y-label reaches into the title
        assert not ax.yaxis.label.get_window_extent(rr).overlaps(fig._suptitle.get_window_extent(rr))
    dis = R.plot_dis(met, res)
    assert len([a for a in dis.axes if a.get_visible()]) == 6 and [l.get_label() for l in dis.axes[0].lines] == ['AFD']
    assert list(dis.axes[0].lines[0].get_ydata()) == [1.0, 0.5]          # epochs 1, 2 (epoch 0 has no training step)
    assert title.endswith('mean ± sd over 1–2 seeds, by setting')        # vAFT with one seed, AFD with two
    assert dis._suptitle.get_text().endswith('mean ± sd over 2 seeds')   # the seeds of the curves drawn: AFD's only
    assert R.plot_raw_ema(met, res) is None                               # no raw.* columns
    text = R.write_report(sd).read_text()
    assert '![the disentangler per epoch](disentangler.png)' in text and 'raw_ema.png' not in text
