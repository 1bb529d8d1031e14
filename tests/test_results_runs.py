"""A committed study keeps its finished runs' small files (`tools/publish_results.py --keep-runs`): git must not ignore
them, publishing copies the right files with relative paths, and the committed report rebuilds from them alone."""
import json, re, shutil, subprocess, sys
from pathlib import Path
import numpy as np, pandas as pd, pytest
import matplotlib; matplotlib.use('Agg')

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT/'tools'))
import publish_results as P
from afd_nb.report import write_report
from afd_nb.sweep import load_config, expand_runs

KEPT = sorted(p.parent for p in (ROOT/'results').glob('*/runs/sweep.json'))


def test_git_keeps_the_committed_runs_and_ignores_the_working_ones():
    ign = lambda p: subprocess.run(['git', 'check-ignore', '-q', '--no-index', p], cwd=ROOT).returncode == 0
    assert not ign('results/cpu-study/runs/cifar10-resnet20-afd-s0/eval.json')
    assert not ign('results/cpu-study/runs/cifar10-resnet20-afd-s0/correct.npz')
    assert ign('runs/cpu-study-2/x/eval.json') and ign('results/cpu-study/runs/x/ckpt_last.pt')


def _run(root:Path, rid, state, made_in=None):
    "A fake run folder; `made_in`: the runs folder it was made in, when it has been copied since."
    d = root/rid; d.mkdir(parents=True); od = str(((made_in or root)/rid).resolve())
    (d/'status.json').write_text(json.dumps({'id': rid, 'state': state, 'out_dir': od,
                                             'stages': {'finetune': {'params': {'out_dir': od}}}}))
    (d/'params.json').write_text(json.dumps({'finetune': {'out_dir': od}}))
    np.savez(d/'correct.npz', clean=np.ones(3, bool))
    (d/'ckpt_last.pt').write_bytes(b'weights'); (d/'finetune.ipynb').write_text('{}')
    (d/'big.json').write_text('x' * (P.KEEP_MAX_BYTES + 1))


def test_keep_runs_copies_small_files_of_finished_runs_with_relative_paths(tmp_path):
    root, out = tmp_path/'work'/'runs'/'s', tmp_path/'results'/'s'
    _run(root, 'a-s0', 'done'); _run(root, 'a-s1', 'running'); (root/'sweep.json').write_text('{"name": "s"}')
    assert P.keep_runs(root, out, 'runs/s') == ['a-s0']
    assert sorted(f.name for f in (out/'runs'/'a-s0').iterdir()) == ['correct.npz', 'params.json', 'status.json']
    assert not (out/'runs'/'a-s1').exists() and (out/'runs'/'sweep.json').exists()
    st = json.loads((out/'runs'/'a-s0'/'status.json').read_text())
    assert st['out_dir'] == 'runs/s/a-s0' and str(tmp_path) not in (out/'runs'/'a-s0'/'params.json').read_text()
    assert np.load(out/'runs'/'a-s0'/'correct.npz')['clean'].all()


def test_keep_runs_rewrites_the_folder_a_copied_run_was_made_in(tmp_path):
    root, out = tmp_path/'copy'/'s', tmp_path/'out'
    _run(root, 'a-s0', 'done', made_in=tmp_path/'elsewhere'/'runs'/'s')
    P.keep_runs(root, out, 'runs/s')
    for f in (out/'runs'/'a-s0').glob('*.json'): assert str(tmp_path) not in f.read_text(), f.name
    assert json.loads((out/'runs'/'a-s0'/'params.json').read_text())['finetune']['out_dir'] == 'runs/s/a-s0'


def test_keep_runs_refuses_to_drop_committed_runs(tmp_path):
    "A republish from a runs folder that lacks a committed finished run would silently shrink the study."
    root, out = tmp_path/'runs', tmp_path/'out'
    _run(root, 'a-s0', 'done'); P.keep_runs(root, out, 'runs')
    shutil.rmtree(root/'a-s0'); _run(root, 'a-s1', 'done')
    with pytest.raises(SystemExit, match=r'holds finished runs that .* lacks \(a-s0\).*cp -r'): P.keep_runs(root, out, 'runs')


def test_a_committed_study_has_runs_to_rebuild_from():
    "The CPU study is committed with its runs (the first 12 runs of an earlier publish were lost for want of them)."
    assert ROOT/'results'/'cpu-study'/'runs' in KEPT


# float64 means and bootstrap summaries over at most ~1e4 numbers: a reordered sum moves them by at most n * eps
RTOL = 1e4 * np.finfo(np.float64).eps

@pytest.mark.parametrize('kept', KEPT, ids=lambda p: p.parent.name)
def test_the_committed_report_rebuilds_from_the_committed_runs(kept, tmp_path):
    out = kept.parent
    config = re.search(r'afd-sweep (configs/\S+\.yaml)', (out/'README.md').read_text()).group(1)
    cfg = load_config(ROOT/config)
    shutil.copytree(kept, tmp_path/'runs')
    write_report(tmp_path/'runs', cfg, expand_runs(cfg))
    for name in ('results.csv', 'claims.csv', 'claims_raw.csv', 'epochs.csv'):
        if not (out/name).exists(): continue
        got, want = pd.read_csv(tmp_path/'runs'/name), pd.read_csv(out/name)
        pd.testing.assert_frame_equal(got, want, check_exact=False, rtol=RTOL, obj=f'{out.name}/{name}')
    todo = (out/'todo.txt').read_text().split() if (out/'todo.txt').exists() else []
    done = {p.parent.name for p in kept.glob('*/status.json')}
    assert not done & set(todo) and len(done) + len(todo) == len(expand_runs(cfg))


def test_busy_minutes_leaves_out_the_pauses_between_sittings():
    "Wall time is counted while at least one run is going: overlapping runs once, a pause between two sittings not at all."
    def st(start, *ends): return dict(started=f'2026-01-01T{start}', stages={f's{i}': dict(finished=f'2026-01-01T{e}') for i, e in enumerate(ends)})
    runs = [st('10:00:00', '10:20:00', '10:30:00'), st('10:10:00', '10:40:00'),   # one sitting, 10:00-10:40
            st('13:00:00', '13:15:00'), dict(started='13:05:00', stages={}), {}]    # another, 13:00-13:15; unfinished runs add nothing
    assert P.busy_minutes(runs) == pytest.approx((40 + 15, 195), abs=1e-9)
    assert P.busy_minutes([]) == (0.0, 0.0)
