"""Collect the pilot's runs (configs/pilot.yaml) into results/pilot/: one row per run, one row per run and epoch,
and the selection criteria written in configs/pilot.yaml applied to every candidate.

    python tools/pilot_results.py runs/pilot [runs/pilot-stage1] --out results/pilot
"""
import argparse, json
from pathlib import Path
import pandas as pd

BASE = dict(arch='resnet20', n_train=1000, epochs=4, lr=0.01, lr_schedule='afd', train_step_size=None)
NAMES = {(): 'C1', (('lr', 0.025),): 'C2', (('lr', 0.005),): 'C3', (('epochs', 2), ('n_train', 2000)): 'C4',
         (('train_step_size', 0.003),): 'C5', (('lr_schedule', 'constant'),): 'C6',
         (('arch', 'resnet56'), ('n_train', 384)): 'C7'}
GAP = ['linf', 'linf_rel', 'd1_linf', 'd1_linf_rel']

def read_run(d, stage1=False):
    "One finished run folder -> (summary row, per-epoch rows); None if its evaluation did not finish."
    if not (d/'eval.json').exists(): return None
    p = json.loads((d/'params.json').read_text())['finetune']
    st, ev = json.loads((d/'status.json').read_text()), json.loads((d/'eval.json').read_text())
    diff = tuple(sorted((k, p.get(k)) for k in BASE if p.get(k) != BASE[k]))
    cand = 'S' + str(1 + (p['method'] == 'afd')) if stage1 else NAMES.get(diff, str(diff))
    change = ', '.join(f'{k}={v}' for k, v in diff) or 'base'
    key = dict(candidate=cand, change=change, method=p['method'], seed=p['seed'])
    epochs = []
    for line in open(d/'metrics.jsonl'):
        m = json.loads(line); g = m.get('gap') or {}
        epochs.append(dict(key, epoch=m['epoch'], step=m['step'], clean=100*m['clean_acc'], pgd20=100*m['pgd_acc'],
                           **{f'gap_{k}': g.get(k) for k in GAP}, loss=m.get('loss')))
    cpu = {s: v['cpu_s'] for s, v in st['stages'].items()}
    row = dict(key, arch=p['arch'], n_train=p['n_train'], epochs=p['epochs'], lr=p['lr'], lr_schedule=p['lr_schedule'],
               train_step_size=p.get('train_step_size'), steps=epochs[-1]['step'], clean=ev['Clean'], pgd20=ev['PGD'],
               n_test=ev['n'], **{f'gap_{k}': epochs[-1][f'gap_{k}'] for k in GAP},
               finetune_cpu_s=cpu.get('finetune'), evaluate_cpu_s=cpu.get('evaluate'), hardware=st.get('hardware'))
    return row, epochs

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
    rows, eps = [], []
    for root, s1 in ((a.runs, False), (a.stage1, True)):
        if root is None: continue
        for d in sorted(Path(root).iterdir()):
            r = read_run(d, s1) if d.is_dir() else None
            if r is None:
                if d.is_dir(): print(f'not finished, left out: {d.name}')
                continue
            rows.append(r[0]); eps += r[1]
    runs = pd.DataFrame(rows).sort_values(['candidate', 'method', 'seed'])
    runs.to_csv(out/'runs.csv', index=False, float_format='%.4g')
    pd.DataFrame(eps).to_csv(out/'epochs.csv', index=False, float_format='%.4g')
    crit = criteria(runs[~runs.candidate.str.startswith('S')])
    crit.to_csv(out/'criteria.csv', index=False, float_format='%.4g')
    print(crit.round(2).to_string(index=False))
