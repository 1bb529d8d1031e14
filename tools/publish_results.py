"""Copy a finished (or partly finished) sweep's results into results/<name>/ for committing: one row per run
(runs.csv), one row per run and epoch (epochs.csv), and a README.md with the command, hardware, CPU and wall time,
git commit, and the planned runs that had not finished yet.

    python tools/publish_results.py configs/cpu-study.yaml --runs runs/cpu-study --out results/cpu-study \\
        --commit $(git rev-parse --short HEAD)
"""
import argparse, json, shutil, subprocess
from datetime import datetime
from pathlib import Path
from afd_nb.sweep import load_config, expand_runs
from afd_nb.scale import collect, mean_sd

def md_table(df):
    "A DataFrame as a Markdown table (index first)."
    head = [df.index.name or ''] + list(df.columns)
    rows = [[str(i)] + [str(v) for v in r] for i, r in zip(df.index, df.values)]
    return '\n'.join('| ' + ' | '.join(r) + ' |' for r in [head, ['---'] * len(head)] + rows)

def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('config'); ap.add_argument('--runs', required=True); ap.add_argument('--out', required=True)
    ap.add_argument('--commit', default=None, help='the commit the runs were made with (default: this checkout)')
    ap.add_argument('--figures', nargs='*', default=[], help="report figures to copy (e.g. runs/demo/*.png)")
    a = ap.parse_args()
    out, root = Path(a.out), Path(a.runs); out.mkdir(parents=True, exist_ok=True)
    runs, eps = collect(root)
    runs.to_csv(out/'runs.csv', index=False, float_format='%.4g'); eps.to_csv(out/'epochs.csv', index=False, float_format='%.4g')
    planned = [r['id'] for r in expand_runs(load_config(a.config))]
    missing = [r for r in planned if r not in set(runs.run)]
    st = [json.loads((root/r/'status.json').read_text()) for r in runs.run]
    starts = [datetime.fromisoformat(s['started']) for s in st if s.get('started')]
    ends = [datetime.fromisoformat(v['finished']) for s in st for v in s['stages'].values() if v.get('finished')]
    cpu = sum(v.get('cpu_s') or 0 for s in st for v in s['stages'].values())
    commit = a.commit or subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], capture_output=True, text=True).stdout.strip()
    for f in a.figures: shutil.copy(f, out/Path(f).name)
    lines = [f'# {Path(a.config).stem}: committed results', '',
             f'* command: `afd-sweep {a.config}` (runs in `{a.runs}/`), collected with `python tools/publish_results.py {a.config} --runs {a.runs} --out {a.out}`',
             f'* code: git commit `{commit}`', f"* hardware: {st[0].get('hardware') if st else '?'}; each run on one thread (OMP_NUM_THREADS=1), two runs side by side",
             f'* runs finished: {len(runs)} of {len(planned)}; kernel CPU time of their stages: {cpu/60:.0f} min',
             f"* wall time from the first start to the last finish: {(max(ends) - min(starts)).total_seconds()/60:.0f} min" if starts and ends else '* wall time: -',
             '', '## Clean / PGD-20 / AutoAttack (%), mean ± sd (seeds)', '', md_table(mean_sd(runs)) if len(runs) else '(no finished run)', '']
    if missing: lines += ['## Not finished when collected (run the same command again to resume)', ''] + [f'* {m}' for m in missing] + ['']
    (out/'README.md').write_text('\n'.join(lines))
    print('\n'.join(lines))

if __name__ == '__main__': main()
