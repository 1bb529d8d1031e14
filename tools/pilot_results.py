"""Collect the pilot's runs (configs/pilot.yaml) into results/pilot/: one row per run, one row per run and epoch,
and the selection criteria written in configs/pilot.yaml applied to every candidate.

    python tools/pilot_results.py runs/pilot [runs/pilot-stage1] --out results/pilot
"""
import argparse
from pathlib import Path
import pandas as pd
from afd_nb.report import collect_results, collect_metrics

BASE = dict(arch='resnet20', n_train=1000, epochs=4, lr=0.01, lr_schedule='afd', train_step_size=None)
NAMES = {(): 'C1', (('lr', 0.025),): 'C2', (('lr', 0.005),): 'C3', (('epochs', 2), ('n_train', 2000)): 'C4',
         (('train_step_size', 0.003),): 'C5', (('lr_schedule', 'constant'),): 'C6',
         (('arch', 'resnet56'), ('n_train', 384)): 'C7'}
GAP = ['linf', 'linf_rel', 'd1_linf', 'd1_linf_rel']

def _value(v):
    "A parameter as the config wrote it: NaN (a missing value in a table) -> None, 0.01 and 1000 as such."
    if isinstance(v, float) and v != v: return None
    return int(v) if isinstance(v, float) and v.is_integer() and v > 1 else v

def read_runs(root, stage1=False):
    "A pilot sweep folder -> (one row per evaluated run, one row per run and epoch), via afd_nb.report."
    res = collect_results(root)
    if res.empty: return pd.DataFrame(), pd.DataFrame()
    for i in res.index[res.Clean.isna()]: print(f'not finished, left out: {res.run_id[i]}')
    res = res[res.Clean.notna()].copy()
    diff = res.apply(lambda r: tuple(sorted((k, _value(r[k])) for k in BASE if _value(r[k]) != BASE[k])), axis=1)
    res['candidate'] = ['S' + str(1 + (m == 'afd')) for m in res.method] if stage1 else [NAMES.get(d, str(d)) for d in diff]
    res['change'] = [', '.join(f'{k}={v}' for k, v in d) or 'base' for d in diff]
    key = ['candidate', 'change', 'method', 'seed']
    met = collect_metrics(root, res).merge(res[['run_id', 'candidate', 'change']], on='run_id')
    epochs = pd.DataFrame({**{k: met[k] for k in key + ['epoch', 'step']}, 'clean': 100 * met.clean_acc,
                           'pgd20': 100 * met.pgd_acc, **{f'gap_{k}': pd.to_numeric(met.get(f'gap.{k}')) for k in GAP},
                           'loss': met.get('loss')})
    last = epochs.sort_values('step').groupby(['candidate', 'method', 'seed']).tail(1).set_index(key)
    runs = pd.DataFrame({**{k: res[k] for k in key + ['arch', 'n_train', 'epochs', 'lr', 'lr_schedule',
                                                      'train_step_size']},
                         'clean': res.Clean, 'pgd20': res.PGD, 'n_test': res.n_test}).set_index(key)
    runs['steps'] = last.step
    for k in GAP: runs[f'gap_{k}'] = last[f'gap_{k}']
    for k in ('finetune_cpu_s', 'evaluate_cpu_s', 'hardware'): runs[k] = res.set_index(key)[k]
    cols = ['arch', 'n_train', 'epochs', 'lr', 'lr_schedule', 'train_step_size', 'steps', 'clean', 'pgd20', 'n_test',
            *[f'gap_{k}' for k in GAP], 'finetune_cpu_s', 'evaluate_cpu_s', 'hardware']
    return runs[cols].reset_index(), epochs

def criteria(runs, budget_s=900, min_clean=50.):
    "Apply the pilot's three stated criteria to each candidate (two methods x seeds)."
    out = []
    for (c, change), g in runs.groupby(['candidate', 'change'], sort=True):
        by = {m: gm for m, gm in g.groupby('method')}
        if set(by) != {'vaft', 'afd'}: continue
        wall = max((gm.finetune_cpu_s + gm.evaluate_cpu_s).max() for gm in by.values())
        mean = {m: gm[['clean', 'pgd20']].mean() for m, gm in by.items()}
        nseed = min(len(gm) for gm in by.values())
        r = dict(candidate=c, change=change, seeds=nseed, est_wall_s=round(wall),
                 vaft_clean=mean['vaft'].clean, afd_clean=mean['afd'].clean,
                 vaft_pgd20=mean['vaft'].pgd20, afd_pgd20=mean['afd'].pgd20)
        sep = {}
        for k in ('clean', 'pgd20'):
            spread = max(gm[k].max() - gm[k].min() for gm in by.values())
            r[f'd_{k}'], r[f'spread_{k}'] = mean['afd'][k] - mean['vaft'][k], spread
            sep[k] = abs(r[f'd_{k}']) / spread if nseed > 1 and spread > 0 else (float('inf') if nseed > 1 else float('nan'))
        r['c1_time'] = wall <= budget_s
        r['c2_clean'] = min(mean['vaft'].clean, mean['afd'].clean) >= min_clean
        r['c3_separated'] = bool(nseed > 1 and max(sep.values()) > 1)
        r['separation'] = max(sep.values())
        out.append(r)
    return pd.DataFrame(out)

if __name__ == '__main__':
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('runs'); ap.add_argument('stage1', nargs='?'); ap.add_argument('--out', default='results/pilot')
    a = ap.parse_args(); out = Path(a.out); out.mkdir(parents=True, exist_ok=True)
    parts = [read_runs(root, s1) for root, s1 in ((a.runs, False), (a.stage1, True)) if root is not None]
    runs = pd.concat([p[0] for p in parts]).sort_values(['candidate', 'method', 'seed'])
    runs.to_csv(out/'runs.csv', index=False, float_format='%.4g')
    pd.concat([p[1] for p in parts]).to_csv(out/'epochs.csv', index=False, float_format='%.4g')
    crit = criteria(runs[~runs.candidate.str.startswith('S')])
    crit.to_csv(out/'criteria.csv', index=False, float_format='%.4g')
    print(crit.round(2).to_string(index=False))
