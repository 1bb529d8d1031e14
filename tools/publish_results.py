"""Copy a sweep's report (finished or partly finished) into results/<name>/ for committing: report.md, its CSV tables
and PNG figures, and a README.md with the command, hardware, CPU and wall time, git commit and unfinished runs.

    python tools/publish_results.py configs/cpu-study.yaml --runs runs/cpu-study --out results/cpu-study \\
        --commit $(git rev-parse --short HEAD) --keep-runs

`--keep-runs` also copies every finished run's small files (settings, status, per-epoch metrics, final evaluation,
per-image correctness; no weights, no executed notebooks) into `<out>/runs/`, with the runs folder's absolute path
written as `--runs-as`, and lists the unfinished runs in `<out>/todo.txt`: a later session rebuilds the report from
`<out>/runs/` alone, or finishes the study from there; the report is made from those files, so it covers the
finished runs only. Anything below the line `NOTES_MARK` in an existing README.md
is kept: hand-written notes survive a republish.
"""
import argparse, json, shutil, subprocess, tempfile
from datetime import datetime
from pathlib import Path
from afd_nb.sweep import load_config, expand_runs
from afd_nb.report import write_report, progress

NOTES_MARK = '<!-- notes below this line are kept by tools/publish_results.py -->'
KEEP_SUFFIXES, KEEP_MAX_BYTES = ('.json', '.jsonl', '.npz', '.csv'), 2**20

def keep_runs(root:Path, out:Path, runs_as:str) -> list[str]:
    "Copy the small files of every finished run in `root` to `out`/runs/<id>/; return the ids copied."
    dest = out/'runs'
    finished = lambda d: {p.parent.name: st for p in sorted(d.glob('*/status.json'))
                          if (st := json.loads(p.read_text())).get('state') == 'done'}
    kept, status = set(finished(dest)), finished(root)
    done = list(status)
    if missing := sorted(kept - set(done)):
        raise SystemExit(f'{dest} holds finished runs that {root} lacks ({", ".join(missing[:3])}{" ..." if len(missing) > 3 else ""}): '
                         f'copy them in first (cp -r {dest}/. {root}/) so that the report covers them, then publish again')
    for rid in done:
        (dest/rid).mkdir(parents=True, exist_ok=True)
        olds = {str(root.resolve())} | {str(Path(v['params']['out_dir']).parent)   # the folder the run was made in, if since moved
                                        for v in status[rid].get('stages', {}).values()
                                        if (v.get('params') or {}).get('out_dir')}
        for f in sorted((root/rid).iterdir()):
            if not f.is_file() or f.suffix not in KEEP_SUFFIXES or f.stat().st_size > KEEP_MAX_BYTES: continue
            if f.suffix == '.npz': shutil.copy(f, dest/rid/f.name); continue
            text = f.read_text()
            for old in sorted(olds, key=len, reverse=True): text = text.replace(old, runs_as)
            (dest/rid/f.name).write_text(text)
    if (root/'sweep.json').exists(): shutil.copy(root/'sweep.json', dest/'sweep.json')
    return done

def busy_minutes(st:list[dict]) -> tuple[float, float]:
    "Wall time (min) during which at least one run was going, and from the first start to the last finish."
    spans = sorted((datetime.fromisoformat(s['started']), max(datetime.fromisoformat(v['finished']) for v in fin))
                   for s in st if s.get('started') and (fin := [v for v in s.get('stages', {}).values() if v.get('finished')]))
    if not spans: return 0.0, 0.0
    busy, (a, b) = 0.0, spans[0]
    for s, e in spans[1:]:
        if s > b: busy += (b - a).total_seconds(); a, b = s, e
        else: b = max(b, e)
    busy += (b - a).total_seconds()
    return busy / 60, (max(e for _, e in spans) - spans[0][0]).total_seconds() / 60

def finishing_lines(config:str, runs_as:str, out:str) -> list[str]:
    "How to finish a partly finished study from the files that `keep_runs` committed."
    return ['**Finishing the study.** `runs/` here holds every finished run\'s small files (settings, status, per-epoch '
            'metrics, final evaluation, per-image correctness), without weights or executed notebooks; the report above '
            'rebuilds from them alone (tested). `todo.txt` lists the runs not finished. To run them and rebuild the '
            'report from all runs:', '', '```',
            f'mkdir -p {runs_as} && cp -r {out}/runs/. {runs_as}/',
            f"afd-sweep {config} $(sed 's/^/--only /' {out}/todo.txt)",
            f'python tools/publish_results.py {config} --runs {runs_as} --out {out} --keep-runs', '```', '',
            '(`--only` keeps the sweep from rerunning the finished runs, whose weights are not here; `--dry-run` shows '
            'the selection first.)', '']

def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('config'); ap.add_argument('--runs', required=True); ap.add_argument('--out', required=True)
    ap.add_argument('--commit', default=None, help='the commit the runs were made with (default: this checkout)')
    ap.add_argument('--runs-as', default=None, help='how README.md names the runs folder (default: --runs as given)')
    ap.add_argument('--keep-runs', action='store_true', help="copy the finished runs' small files to <out>/runs/ and write <out>/todo.txt")
    a = ap.parse_args()
    cfg, root, out = load_config(a.config), Path(a.runs), Path(a.out)
    runs_as = a.runs_as or a.runs
    runs = expand_runs(cfg)
    out.mkdir(parents=True, exist_ok=True)
    tmp = tempfile.TemporaryDirectory()
    if a.keep_runs:   # the report is made from the kept files alone, so that it rebuilds from them exactly
        keep_runs(root, out, runs_as)
        src = Path(tmp.name)/'runs'; shutil.copytree(out/'runs', src)
    else: src = root
    report = write_report(src, cfg, runs)
    for f in [report] + sorted(src.glob('*.csv')) + sorted(src.glob('*.png')): shutil.copy(f, out/f.name)
    st = [json.loads(p.read_text()) for p in sorted(src.glob('*/status.json'))]
    done = [s for s in st if s.get('state') == 'done']
    busy, span = busy_minutes(st)
    cpu = sum(v.get('cpu_s') or 0 for s in done for v in s['stages'].values())
    per = {k: sum(s['stages'].get(k, {}).get('cpu_s') or 0 for s in done) / max(len(done), 1) for k in ('finetune', 'evaluate')}
    hw = sorted({s.get('hardware') or '?' for s in done}) or ['?']
    commit = a.commit or subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], capture_output=True, text=True).stdout.strip()
    todo = progress(src, runs); todo = todo[todo.state != 'done']
    lines = [f"# {cfg.get('name', root.name)}: committed results", '',
             f'* command: `afd-sweep {a.config}` (runs in `{runs_as}/`); this folder: `python tools/publish_results.py {a.config} --runs {runs_as} --out {a.out}'
             + (' --keep-runs`' if a.keep_runs else '`'),
             f'* code: git commit `{commit}`',
             f"* hardware: {'; '.join(hw)}; each run on one thread (OMP_NUM_THREADS=1), two runs side by side",
             f'* runs finished: {len(done)} of {len(runs)}; kernel CPU time of their stages: {cpu / 60:.0f} min'
             + (f" ({cpu / 60 / len(done):.1f} min per run: fine-tuning {per['finetune'] / 60:.1f}, evaluation {per['evaluate'] / 60:.1f})" if done else ''),
             (f'* wall time from the first start to the last finish: {span:.0f} min' if span and span - busy < 1 else
              f'* wall time with at least one run going: {busy:.0f} min (from the first start to the last finish: {span:.0f} min, with pauses)'
              if span else '* wall time: -'),
             '* `report.md`: tables (mean ± sd over seeds), the verdict on each claim, per-epoch figures; CSVs: the same data', '']
    if a.keep_runs:
        (out/'todo.txt').write_text(''.join(f'{r}\n' for r in todo.run_id)) if len(todo) else (out/'todo.txt').unlink(missing_ok=True)
    if len(todo):
        lines += ['Not finished when collected (' + ('the runs in `todo.txt`; this folder keeps no weights, so finish them as '
                  '*Finishing the study* below says' if a.keep_runs else 'run the same command again to resume') + '):', '']
        lines += [f'* `{r.run_id}`: {r.state}' for r in todo.itertuples()] + ['']
        if a.keep_runs: lines += finishing_lines(a.config, runs_as, a.out)
    readme = out/'README.md'
    old = readme.read_text() if readme.exists() else ''
    text = '\n'.join(lines) + (f'\n{NOTES_MARK}{old.split(NOTES_MARK, 1)[1]}' if NOTES_MARK in old else '')
    readme.write_text(text); tmp.cleanup()
    print(text)

if __name__ == '__main__': main()
