"""Apply pilot 2's committed criteria (results/pilot-2/README.md) to its runs: one row per candidate with criterion 1
(past the collapse), criterion 2 (the paired AFD − vAFT difference, EMA and raw, with the statistic of afd_nb.report)
and criterion 3 (CPU cost), plus one row per run and per run and epoch, and a per-epoch figure of every candidate.

    python tools/pilot2_results.py runs/pilot-2 --out results/pilot-2
"""
import argparse, math
from pathlib import Path
import pandas as pd
import matplotlib; matplotlib.use('Agg')
import matplotlib.pyplot as plt
from afd_nb.report import collect_results, collect_metrics, collect_correct, paired_diff, t_quantile
from afd_nb.plots import method_style

THRESHOLD = 8.0   # criterion 1: mean final EMA PGD-20 (%) of both methods
# candidate -> (what identifies its vAFT runs, what identifies its AFD runs); P5's vAFT partner is P2's vAFT
BASE = dict(n_train=4000, epochs=4, lr_schedule='constant', train_step_size=round(2 / 255, 8))
CANDIDATES = {
    'P1': (dict(BASE, n_train=2000), dict(BASE, n_train=2000)),
    'P2': (BASE, BASE),
    'P3': (dict(BASE, lr_schedule='afd'), dict(BASE, lr_schedule='afd')),
    'P4': (dict(BASE, epochs=6), dict(BASE, epochs=6)),
    'P5': (BASE, dict(BASE, train_step_size=0.007)),
}
STEPS = {'P1': 64, 'P2': 128, 'P3': 128, 'P4': 192, 'P5': 128}


def _select(res, method, keys):
    "The runs of `method` whose parameters equal `keys`."
    m = res['method'] == method
    for k, v in keys.items():
        col = res[k].round(8) if k == 'train_step_size' else res[k]
        m &= col == v
    return res[m]


def _ci(c):
    "(d, lo, hi, se, df) of a paired_diff result; NaN bounds when it has fewer than 2 seeds."
    if c['n'] < 2 or not c['se'] > 0: return c['d'], math.nan, math.nan, c['se'], c['df']
    h = t_quantile(0.975, c['df']) * c['se']
    return c['d'], c['d'] - h, c['d'] + h, c['se'], c['df']


def candidate_table(res, cor):
    rows = []
    for cand, (kv, ka) in CANDIDATES.items():
        v, a = _select(res, 'vaft', kv), _select(res, 'afd', ka)
        row = dict(candidate=cand, steps=STEPS[cand], vaft_seeds=len(v), afd_seeds=len(a))
        for w, pre in (('ema', ''), ('raw', 'raw_')):
            for m in ('Clean', 'PGD'):
                row[f'{w}_vaft_{m}'], row[f'{w}_afd_{m}'] = v[pre + m].mean(), a[pre + m].mean()
                ser = lambda r: r.set_index('seed')[pre + m]
                c = lambda r: {s.seed: cor[s.run_id][pre + m] for s in r.itertuples() if pre + m in cor.get(s.run_id, {})}
                d, lo, hi, se, df = _ci(paired_diff(ser(a), ser(v), c(a), c(v)))
                row.update({f'{w}_d_{m}': d, f'{w}_lo_{m}': lo, f'{w}_hi_{m}': hi, f'{w}_se_{m}': se, f'{w}_df_{m}': df})
        row['past_collapse'] = bool(row['ema_vaft_PGD'] >= THRESHOLD and row['ema_afd_PGD'] >= THRESHOLD)
        for meth, r in (('vaft', v), ('afd', a)):
            row[f'{meth}_finetune_cpu_min'] = r['finetune_cpu_s'].mean() / 60
            row[f'{meth}_evaluate_cpu_min'] = r['evaluate_cpu_s'].mean() / 60
        rows.append(row)
    return pd.DataFrame(rows)


def plot_candidates(met, res, path):
    "Clean and PGD-20 (EMA, test[0:100]) per epoch, one column per candidate: where the collapse ends."
    fig, axs = plt.subplots(2, len(CANDIDATES), figsize=(3.1 * len(CANDIDATES), 5.2), sharey='row')
    for j, (cand, (kv, ka)) in enumerate(CANDIDATES.items()):
        for meth, keys in (('vaft', kv), ('afd', ka)):
            ids = set(_select(res, meth, keys)['run_id'])
            g = met[met['run_id'].isin(ids)]
            for i, (col, name) in enumerate((('clean_acc', 'clean'), ('pgd_acc', 'PGD-20'))):
                ax = axs[i, j]
                for _, r in g.groupby('run_id'):
                    r = r.sort_values('epoch')
                    ax.plot(r['epoch'], 100 * r[col], lw=1.2, alpha=.8, **dict(method_style(meth), label=None))
                if i == 1: ax.axhline(THRESHOLD, color='k', lw=.7, ls=':')
                ax.set_ylabel(f'{name} accuracy (%)' if j == 0 else ''); ax.grid(alpha=.3)
                if i == 1: ax.set_xlabel('epoch')
        axs[0, j].set_title(f'{cand}: {STEPS[cand]} steps', fontsize=9)
    for meth in ('vaft', 'afd'): axs[0, 0].plot([], [], **method_style(meth))
    axs[0, 0].legend(fontsize=8)
    fig.suptitle('Pilot 2 per epoch (EMA weights, test[0:100], each line one seed); dotted: the 8% of criterion 1',
                 fontsize=9)
    fig.tight_layout(); fig.savefig(path, dpi=110); plt.close(fig)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('runs'); ap.add_argument('--out', required=True)
    a = ap.parse_args()
    out = Path(a.out); out.mkdir(parents=True, exist_ok=True)
    res = collect_results(a.runs)
    res = res[res['Clean'].notna()].copy()
    met, cor = collect_metrics(a.runs, res), collect_correct(a.runs)
    tab = candidate_table(res, cor)
    tab.round(4).to_csv(out / 'candidates.csv', index=False)
    plot_candidates(met, res, out / 'candidates.png')
    with pd.option_context('display.width', 250, 'display.max_columns', 60):
        print(tab.round(2).T)


if __name__ == '__main__':
    main()
