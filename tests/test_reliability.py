"""Reliability, round two (issue 11): no finished result destroyed, no poisoned checkpoint, one process per run
folder, and errors that name the setting. Each test failed on the code before. (Safe loading of a crafted .pt, item 1,
is tested with afd_nb.models in tests/test_models.py.)"""
import json, os, socket, subprocess, sys, time, warnings
from pathlib import Path
import pytest
import torch

import afd_nb.train as T
import afd_nb.checkpoint as C
from afd_nb.train import (TrainConfig, fine_tune, read_checkpoint, load_last_checkpoint, ConfigChangedError, CorruptCheckpointError,
                          FinishedRunError, NonFiniteLossError, RunDirError, RunLockedError, RunLock)

pytestmark = pytest.mark.usefixtures('one_thread')

# 2 steps of batch 16, one PGD step, no evaluation: each run takes seconds
TINY = dict(n_train=32, batch_size=16, epochs=1, n_eval=0, train_steps=1, ckpt_every_steps=1, deterministic=True, device='cpu')


def _files(d: Path) -> dict:
    "Every plain file directly in `d`: name -> bytes."
    return {p.name: p.read_bytes() for p in d.iterdir() if p.is_file()}


@pytest.fixture
def finished(tmp_path, cifar10_train, resnet20):
    "A finished tiny AFD run: its folder and its files' bytes."
    out = tmp_path / 'run'
    fine_tune(TrainConfig(**TINY, out_dir=str(out)), progress=False)
    assert (out / 'model_final.pt').exists()
    return out, _files(out)


# ---------------------------------------------------------------- 2. fresh=True checks everything before touching the old run
@pytest.mark.parametrize('bad', ['n_train', 'checkpoint'])
def test_failed_fresh_leaves_the_finished_run_untouched(bad, finished):
    from afd_nb.models import CheckpointMismatchError, pretrained_path
    out, before = finished
    kw = dict(n_train=40000) if bad == 'n_train' else dict(arch='resnet32', checkpoint=str(pretrained_path('resnet20')))
    err = ValueError if bad == 'n_train' else CheckpointMismatchError
    with pytest.raises(err) as e: fine_tune(TrainConfig(**{**TINY, **kw}, out_dir=str(out)), progress=False, fresh=True)
    if bad == 'n_train': assert 'TrainConfig.n_train=40000' in str(e.value) and '\n' not in str(e.value)
    assert _files(out) == before                                      # model_final.pt byte-identical, nothing added or removed
    assert not list(out.glob('.replaced-*'))


def test_fresh_keeps_the_old_run_until_the_new_one_has_a_checkpoint(finished, monkeypatch):
    out, before = finished
    real = T.afd_losses
    def nan_at_first_step(o, y, f):
        t = real(o, y, f); t['ce'] = t['ce'] * float('nan'); return t
    monkeypatch.setattr(T, 'afd_losses', nan_at_first_step)            # the new run fails before its first checkpoint
    with pytest.raises(NonFiniteLossError): fine_tune(TrainConfig(**{**TINY, 'lr': 0.01}, out_dir=str(out)), progress=False, fresh=True)
    kept, = out.glob('.replaced-*')
    assert _files(kept) == before                                     # the old run, complete, moved aside
    monkeypatch.undo()
    fine_tune(TrainConfig(**{**TINY, 'lr': 0.01}, out_dir=str(out)), progress=False, fresh=True)
    # this fresh run set aside only what the failed one left (and deleted that after its first checkpoint); the old run
    # was set aside by the failed run, so it stays until the user decides (issue 19: only the run that set it aside clears it)
    assert list(out.glob('.replaced-*')) == [kept] and _files(kept) == before
    assert read_checkpoint(out / 'ckpt_last.pt')['config']['lr'] == 0.01


# ---------------------------------------------------------------- 3. no non-finite checkpoint; resume from a finite one with a lower lr
def test_diverging_run_names_a_finite_checkpoint_and_resumes_with_lower_lr(tmp_path, cifar10_train, resnet20):
    out = tmp_path / 'run'
    cfg = dict(TINY, method='vaft', n_train=128, out_dir=str(out))       # 8 steps, a checkpoint after each
    with pytest.raises(NonFiniteLossError) as e: fine_tune(TrainConfig(**cfg, lr=1e6), progress=False)
    msg = str(e.value)
    assert "allow_changes=['lr']" in msg and '\n' not in msg
    named, step = msg.split('The last good checkpoint is ')[1].split(' (after step ', 1)
    step = int(step.split(')')[0])
    assert 1 <= step < e.value.step < 8
    for p in out.glob('ckpt_*.pt*'):                                  # every checkpoint on disk is finite (also one set aside)
        ck = read_checkpoint(p)
        assert C.nonfinite_entries(dict(model=ck['model'], ema=ck['ema'])) == [], p.name
    ck = load_last_checkpoint(out)                                    # what a rerun resumes from: the named checkpoint
    assert Path(ck['path']) == Path(named) and ck['step'] == step
    with pytest.raises(ConfigChangedError, match=r"allow_changes=\['lr'\]"): fine_tune(TrainConfig(**cfg, lr=0.01), progress=False)
    r = fine_tune(TrainConfig(**cfg, lr=0.01), progress=False, allow_changes=['lr'])
    assert r['history'][-1]['step'] == 8 and r['history'][-1]['config_changes'] == [dict(step=step, changes=['lr: 1000000.0 -> 0.01'])]
    final = torch.load(out / 'model_final.pt', weights_only=True)
    assert C.nonfinite_entries(final['state_dict']) == [] and final['config']['lr'] == 0.01


def test_failing_step_after_the_only_checkpoint_names_it_with_a_caveat(tmp_path, monkeypatch, cifar10_train, resnet20):
    "A NaN in the first step after the only checkpoint: nothing older to roll back to, so the error names it and says so."
    real, calls = T.afd_losses, []
    def poisoned(o, y, f):
        t = real(o, y, f); calls.append(1)
        if len(calls) == 4: t['align'] = t['align'] * float('nan')
        return t
    monkeypatch.setattr(T, 'afd_losses', poisoned)
    out = tmp_path / 'run'
    with pytest.raises(NonFiniteLossError) as e: fine_tune(TrainConfig(**{**TINY, 'n_train': 80, 'ckpt_every_steps': 3}, out_dir=str(out)), progress=False)
    assert (e.value.step, e.value.term) == (4, 'align')               # step 4 left from the step-3 checkpoint, the only one
    assert f"The last good checkpoint is {out / 'ckpt_last.pt'} (after step 3); the failing step started from it" in str(e.value)
    assert not (out / 'ckpt_last.pt.diverged').exists()


def test_save_checkpoint_refuses_nonfinite_weights(tmp_path):
    w = {'w': torch.tensor([1.0, float('inf')])}
    with pytest.raises(C.NonFiniteCheckpointError, match='model/w'): C.save_checkpoint(dict(format=C.CKPT_FORMAT, model=w), tmp_path)
    with pytest.raises(C.NonFiniteCheckpointError, match='ema/module/w'):
        C.save_checkpoint(dict(format=C.CKPT_FORMAT, model={'w': torch.ones(2)}, ema=dict(module=w, updates=3)), tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_allow_changes_only_takes_safe_fields(tmp_path):
    cfg = TrainConfig(**TINY, out_dir=str(tmp_path / 'x'))
    with pytest.raises(ValueError, match="'lrr' is not a setting \\(did you mean 'lr'\\?\\)"): fine_tune(cfg, progress=False, allow_changes=['lrr'])
    with pytest.raises(ValueError, match="'batch_size' cannot change mid-run; the settings safe to change when resuming are lr"):
        fine_tune(cfg, progress=False, allow_changes=['batch_size'])
    assert not (tmp_path / 'x').exists()                               # refused before anything was created


# ---------------------------------------------------------------- 4. unreadable checkpoints: refuse on every rerun; model_final.pt is never overwritten
def test_unreadable_checkpoints_are_refused_on_every_rerun(finished):
    out, before = finished
    for name in ('ckpt_last.pt', 'ckpt_prev.pt'):
        b = bytearray((out / name).read_bytes()); b[len(b) // 2] ^= 0xFF; (out / name).write_bytes(b)
    damaged = _files(out)
    for attempt in range(3):                                          # the first rerun and every later one
        with pytest.raises(CorruptCheckpointError, match='fresh=True'): fine_tune(TrainConfig(**TINY, out_dir=str(finished[0])), progress=False)
        assert _files(out) == damaged
    assert damaged['model_final.pt'] == before['model_final.pt']
    fine_tune(TrainConfig(**TINY, out_dir=str(out)), progress=False, fresh=True)   # the user decides
    read_checkpoint(out / 'ckpt_last.pt')


def test_finished_model_without_checkpoint_is_not_overwritten(finished):
    out, before = finished
    for name in ('ckpt_last.pt', 'ckpt_prev.pt'): (out / name).unlink()
    with pytest.raises(FinishedRunError, match='fresh=True'): fine_tune(TrainConfig(**TINY, out_dir=str(out)), progress=False)
    assert (out / 'model_final.pt').read_bytes() == before['model_final.pt']


def test_rerun_of_a_finished_run_does_not_rewrite_model_final(finished):
    out, before = finished
    stamp = (out / 'model_final.pt').stat().st_mtime_ns
    r = fine_tune(TrainConfig(**TINY, out_dir=str(out)), progress=False)
    assert (out / 'model_final.pt').stat().st_mtime_ns == stamp and (out / 'model_final.pt').read_bytes() == before['model_final.pt']
    sd = torch.load(out / 'model_final.pt', weights_only=True)['state_dict']
    assert all(torch.equal(v, sd[k]) for k, v in r['model'].state_dict().items())   # the returned model is the saved one


def test_corrupt_set_aside_files_without_checkpoint_are_refused(tmp_path):
    (tmp_path / 'ckpt_last.pt.corrupt').write_bytes(b'garbage')      # left by an older version of the loader
    with pytest.raises(CorruptCheckpointError, match='set aside earlier'): load_last_checkpoint(tmp_path)


# ---------------------------------------------------------------- 5. one process per run folder
HOLD = r'''
import sys, time
from afd_nb.checkpoint import RunLock
with RunLock(sys.argv[1]):
    print('LOCKED', flush=True); time.sleep(120)
'''

def test_second_process_is_refused_with_the_holders_name(tmp_path, cifar10_train, resnet20):
    out = tmp_path / 'run'; out.mkdir()
    holder = subprocess.Popen([sys.executable, '-c', HOLD, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == 'LOCKED'
        with pytest.raises(RunLockedError) as e: fine_tune(TrainConfig(**TINY, out_dir=str(out)), progress=False)
        msg = str(e.value)
        assert f'process {holder.pid} on {socket.gethostname()}' in msg and 'choose another out_dir' in msg and '\n' not in msg
        assert sorted(p.name for p in out.iterdir()) == ['.lock']     # the refused run wrote nothing
    finally:
        holder.kill(); holder.wait()


def test_two_fine_tunes_on_one_folder(tmp_path, cifar10_train, resnet20):
    "Two real runs at once: the second is refused while the first runs, and the first finishes normally."
    out = tmp_path / 'run'
    # the first run holds its lock inside fine_tune and waits, before its first epoch, until the test writes a line to its
    # stdin: the second run is tried while the first certainly runs, however loaded the machine is
    code = ('import json, sys, torch\ntorch.set_num_threads(1)\nimport afd_nb.train as T\n_epoch = T._train_epoch\n'
            'def held(*a, **k):\n    print("TRAINING", flush=True); sys.stdin.readline(); return _epoch(*a, **k)\n'
            'T._train_epoch = held\n'
            'T.fine_tune(T.TrainConfig(**json.loads(sys.argv[1])), progress=False)\nprint("FINISHED")')
    first = subprocess.Popen([sys.executable, '-c', code, json.dumps({**TINY, 'out_dir': str(out)})], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, 'OMP_NUM_THREADS': '1'})
    try:
        line = first.stdout.readline()
        assert line.strip() == 'TRAINING', first.communicate()[1][-2000:]
        assert (out / '.lock').exists()
        with pytest.raises(RunLockedError, match=f'process {first.pid}'): fine_tune(TrainConfig(**TINY, out_dir=str(out)), progress=False)
        o, err = first.communicate('go\n', timeout=600)
    finally:
        if first.poll() is None: first.kill(); first.wait()
    assert first.returncode == 0 and 'FINISHED' in o, err[-2000:]
    assert not (out / '.lock').exists()


def test_stale_lock_of_a_dead_process_is_taken_over(tmp_path):
    dead = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])
    start = C._proc_stat(dead.pid)
    dead.kill(); dead.wait()
    (tmp_path / '.lock').write_text(json.dumps(dict(pid=dead.pid, host=socket.gethostname(), start=start[19] if start else None)))
    with pytest.warns(UserWarning, match=f'taking over the lock of process {dead.pid}'):
        with RunLock(tmp_path) as lk: assert json.loads(lk.path.read_text())['pid'] == os.getpid()
    assert not (tmp_path / '.lock').exists()
    (tmp_path / '.lock').write_text(json.dumps(dict(pid=1, host='another-host', start=None)))   # cannot be checked from here
    with pytest.raises(RunLockedError, match='another-host'): RunLock(tmp_path).acquire()


# ---------------------------------------------------------------- 6a. unknown model_options key
@pytest.mark.parametrize('checkpoint', ['pretrained', None])
def test_unknown_model_option_is_refused(checkpoint, tmp_path):
    cfg = TrainConfig(**TINY, model_options={'normalise': False}, checkpoint=checkpoint, out_dir=str(tmp_path / 'x'))
    with pytest.raises(ValueError) as e: fine_tune(cfg, progress=False)
    msg = str(e.value)
    assert msg.startswith('TrainConfig.model_options=') and "did you mean 'normalize'" in msg and '\n' not in msg
    assert not (tmp_path / 'x').exists()


def test_known_model_option_is_honoured_with_pretrained_weights(tmp_path, cifar10_train, resnet20):
    r = fine_tune(TrainConfig(**{**TINY, 'epochs': 1}, model_options={'normalize': False}, out_dir=str(tmp_path / 'x')), progress=False)
    assert isinstance(r['model'].normalize, torch.nn.Identity) and r['model'].options == {'normalize': False}


# ---------------------------------------------------------------- 7. errors that name the setting
def test_out_dir_errors_name_the_setting(tmp_path):
    f = tmp_path / 'a_file'; f.write_text('x')
    for out, why in ((f, 'is a file'), (f / 'run', 'which is a file')):
        with pytest.raises(RunDirError) as e: fine_tune(TrainConfig(**TINY, out_dir=str(out)), progress=False)
        assert str(e.value).startswith(f"TrainConfig.out_dir='{out}'") and why in str(e.value) and '\n' not in str(e.value)
    if os.geteuid() == 0:                                             # root writes anywhere a mode allows: use a read-only file system
        if not Path('/sys').is_dir(): pytest.skip('no read-only /sys to test an unwritable out_dir as root')
        ro = Path('/sys/afd_nb_test_run')
    else:
        ro = tmp_path / 'ro'; ro.mkdir(); ro.chmod(0o500)
    with pytest.raises(RunDirError, match=r"TrainConfig\.out_dir=.*cannot be written \(PermissionError"):
        fine_tune(TrainConfig(**TINY, out_dir=str(ro / 'run')), progress=False)


def test_typo_in_a_keyword_offers_the_closest_names():
    with pytest.raises(TypeError, match="TrainConfig has no setting 'n_trian'; did you mean 'n_train'"): TrainConfig(n_trian=100)
    with pytest.raises(TypeError, match="'lr_shedule'; did you mean 'lr_schedule'"): fine_tune(dict(TINY, lr_shedule='afd'))
    with pytest.raises(TypeError, match='valid settings: dataset, flavour'): TrainConfig(zzzz=1)
    with pytest.raises(ValueError, match="did you mean 'official_fused'"): TrainConfig(update_rule='oficial_fused').validate()
