"""Copy a sweep's report (finished or partly finished) into results/<name>/ for committing: report.md, its CSV tables
and PNG figures, and a README.md with the command, hardware, CPU and wall time, git commit and unfinished runs.

    python tools/publish_results.py configs/cpu-study.yaml --runs runs/cpu-study --out results/cpu-study \\
        --commit $(git rev-parse --short HEAD)
"""
import argparse, json, shutil, subprocess
from datetime import datetime
from pathlib import Path
from afd_nb.sweep import load_config, expand_runs
from afd_nb.report import write_report, progress

def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('config'); ap.add_argument('--runs', required=True); ap.add_argument('--out', required=True)
    ap.add_argument('--commit', default=None, help='the commit the runs were made with (default: this checkout)')
    ap.add_argument('--runs-as', default=None, help='how README.md names the runs folder (default: --runs as given)')
    a = ap.parse_args()
    cfg, root, out = load_config(a.config), Path(a.runs), Path(a.out)
    runs = expand_runs(cfg)
    report = write_report(root, cfg, runs)
    out.mkdir(parents=True, exist_ok=True)
    for f in [report] + sorted(root.glob('*.csv')) + sorted(root.glob('*.png')): shutil.copy(f, out/f.name)
    st = [json.loads(p.read_text()) for p in sorted(root.glob('*/status.json'))]
    done = [s for s in st if s.get('state') == 'done']
    starts = [datetime.fromisoformat(s['started']) for s in st if s.get('started')]
    ends = [datetime.fromisoformat(v['finished']) for s in st for v in s.get('stages', {}).values() if v.get('finished')]
    cpu = sum(v.get('cpu_s') or 0 for s in done for v in s['stages'].values())
    per = {k: sum(s['stages'].get(k, {}).get('cpu_s') or 0 for s in done) / max(len(done), 1) for k in ('finetune', 'evaluate')}
    commit = a.commit or subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], capture_output=True, text=True).stdout.strip()
    todo = progress(root, runs); todo = todo[todo.state != 'done']
    lines = [f"# {cfg.get('name', root.name)}: committed results", '',
             f'* command: `afd-sweep {a.config}` (runs in `{a.runs_as or a.runs}/`); this folder: `python tools/publish_results.py {a.config} --runs {a.runs_as or a.runs} --out {a.out}`',
             f'* code: git commit `{commit}`',
             f"* hardware: {done[0].get('hardware') if done else '?'}; each run on one thread (OMP_NUM_THREADS=1), two runs side by side",
             f'* runs finished: {len(done)} of {len(runs)}; kernel CPU time of their stages: {cpu / 60:.0f} min'
             + (f" ({cpu / 60 / len(done):.1f} min per run: fine-tuning {per['finetune'] / 60:.1f}, evaluation {per['evaluate'] / 60:.1f})" if done else ''),
             (f'* wall time from the first start to the last finish: {(max(ends) - min(starts)).total_seconds() / 60:.0f} min'
              if starts and ends else '* wall time: -'),
             '* `report.md`: tables (mean ± sd over seeds), the verdict on each claim, per-epoch figures; CSVs: the same data', '']
    if len(todo): lines += ['Not finished when collected (run the same command again to resume):', ''] + [f'* `{r.run_id}`: {r.state}' for r in todo.itertuples()] + ['']
    (out/'README.md').write_text('\n'.join(lines))
    print('\n'.join(lines))

if __name__ == '__main__': main()
