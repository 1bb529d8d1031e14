"""Reliability of afd_nb.train (issue 5): kill -9 + resume is bit-exact, config changes are refused, atomic writes,
corrupt checkpoints fall back to the previous one, a NaN loss stops the run naming step and term."""
import json, os, signal, subprocess, sys, time, warnings
from pathlib import Path
import pytest
import torch

import afd_nb.train as T
from afd_nb.train import (TrainConfig, fine_tune, read_checkpoint, atomic_save, atomic_write_text, ConfigChangedError,
                          CorruptCheckpointError, NonFiniteLossError)


pytestmark = pytest.mark.usefixtures('one_thread')

# 6 steps per epoch, 2 epochs, a checkpoint after every step; deterministic CPU
RESUME = dict(n_train=96, batch_size=16, epochs=2, n_eval=16, eval_steps=2, eval_step_size=0.01, train_steps=2,
              ckpt_every_steps=1, deterministic=True, device='cpu', eval_at_start=False)
SMALL = dict(n_train=48, batch_size=16, epochs=1, n_eval=0, train_steps=1, ckpt_every_steps=1, deterministic=True, device='cpu')

SCRIPT = r'''
import json, sys, torch
torch.set_num_threads(1)
from afd_nb.train import TrainConfig, fine_tune
fine_tune(TrainConfig(**json.loads(sys.argv[1])), progress=False)
print('FINISHED')
'''


def _popen(cfg: dict, cwd):
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'MKL_NUM_THREADS': '1'}
    return subprocess.Popen([sys.executable, '-c', SCRIPT, json.dumps(cfg)], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(p, timeout=300):
    out, err = p.communicate(timeout=timeout)
    assert p.returncode == 0 and 'FINISHED' in out, err[-3000:]


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() if a[k].is_floating_point() else float(not torch.equal(a[k], b[k]))
               for k in a)


def test_kill9_then_resume_equals_uninterrupted(tmp_path, cifar10_train, resnet20):
    a, b = tmp_path / 'killed', tmp_path / 'straight'
    p = _popen({**RESUME, 'out_dir': str(a)}, tmp_path)
    ref = _popen({**RESUME, 'out_dir': str(b)}, tmp_path)          # the uninterrupted run, meanwhile
    t0 = time.time()
    while not (a / 'ckpt_prev.pt').exists():                        # appears when the 2nd checkpoint is written
        assert p.poll() is None, p.communicate()[1][-3000:]
        assert time.time() - t0 < 240, 'no second checkpoint within 240 s'
        time.sleep(0.002)
    p.send_signal(signal.SIGKILL); p.wait()
    assert p.returncode == -signal.SIGKILL
    assert not (a / 'model_final.pt').exists(), 'the run finished before it could be killed'
    killed_at = read_checkpoint(a / 'ckpt_last.pt')['step'] if (a / 'ckpt_last.pt').exists() else read_checkpoint(a / 'ckpt_prev.pt')['step']
    assert 1 <= killed_at < 12
    _finish(_popen({**RESUME, 'out_dir': str(a)}, tmp_path))      # the same command again: resumes
    _finish(ref)
    ca, cb = read_checkpoint(a / 'ckpt_last.pt'), read_checkpoint(b / 'ckpt_last.pt')
    assert ca['step'] == cb['step'] == 12 and ca['epoch'] == 2
    assert _max_diff(ca['model'], cb['model']) <= 1e-6
    assert _max_diff(ca['ema']['module'], cb['ema']['module']) <= 1e-6
    fa, fb = (torch.load(d / 'model_final.pt', weights_only=True)['state_dict'] for d in (a, b))
    assert _max_diff(fa, fb) <= 1e-6
    ha, hb = ([json.loads(l) for l in (d / 'metrics.jsonl').read_text().splitlines()] for d in (a, b))
    assert [h['epoch'] for h in ha] == [1, 2]
    for ra, rb in zip(ha, hb):
        assert ra['losses'] == pytest.approx(rb['losses'], rel=1e-6) and ra['pgd_acc'] == rb['pgd_acc']
        assert ra['gap'] == pytest.approx(rb['gap'], rel=1e-5)
    assert not list(a.glob('.*.tmp*'))


def test_changed_config_is_refused_unless_fresh(tmp_path, cifar10_train, resnet20):
    out = tmp_path / 'run'
    cfg = TrainConfig(**SMALL, out_dir=str(out))
    fine_tune(cfg, progress=False)
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    with pytest.raises(ConfigChangedError) as e:
        fine_tune(TrainConfig(**{**SMALL, 'epochs': 2, 'lr': 0.01}, out_dir=str(out)), progress=False)
    msg = str(e.value)
    assert 'epochs: 1 -> 2' in msg and 'lr: 0.025 -> 0.01' in msg and 'fresh=True' in msg and '\n' not in msg
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before          # nothing touched
    fine_tune(TrainConfig(**{**SMALL, 'device': 'auto', 'ckpt_every_steps': 2}, out_dir=str(out)), progress=False)  # runtime fields may differ
    r = fine_tune(TrainConfig(**{**SMALL, 'epochs': 2, 'lr': 0.01}, out_dir=str(out)), progress=False, fresh=True)
    assert [h['epoch'] for h in r['history']] == [0, 1, 2] and read_checkpoint(out / 'ckpt_last.pt')['step'] == 6


def test_truncated_checkpoint_falls_back_to_previous(tmp_path, cifar10_train, resnet20):
    out = tmp_path / 'run'
    cfg = TrainConfig(**SMALL, out_dir=str(out))
    fine_tune(cfg, progress=False)
    want = read_checkpoint(out / 'ckpt_last.pt')
    assert want['step'] == 3 and read_checkpoint(out / 'ckpt_prev.pt')['step'] == 2
    raw = (out / 'ckpt_last.pt').read_bytes()
    (out / 'ckpt_last.pt').write_bytes(raw[: len(raw) * 2 // 3])                 # a half-written disk block
    with pytest.warns(UserWarning, match=r'ckpt_last\.pt is truncated or corrupt.*using ckpt_prev\.pt'):
        fine_tune(cfg, progress=False)                                         # redoes step 3 from the step-2 checkpoint
    got = read_checkpoint(out / 'ckpt_last.pt')
    assert got['step'] == 3 and (out / 'ckpt_last.pt.corrupt').exists()
    assert max((got['model'][k].double() - want['model'][k].double()).abs().max().item() for k in want['model']) <= 1e-6
    # both generations unreadable: a clear error, not a silent restart
    for name in ('ckpt_last.pt', 'ckpt_prev.pt'):
        b = bytearray((out / name).read_bytes()); b[len(b) // 2] ^= 0xFF; (out / name).write_bytes(b)   # flipped bits
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        with pytest.raises(CorruptCheckpointError, match='fresh=True'): fine_tune(cfg, progress=False)


@pytest.mark.parametrize('bad', [float('nan'), float('inf')])
def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(bad, tmp_path, monkeypatch, cifar10_train, resnet20):
    real, calls = T.afd_losses, []
    def poisoned(out, y, f_t):
        terms = real(out, y, f_t)
        calls.append(1)
        if len(calls) == 3: terms['sep'] = terms['sep'] * bad
        return terms
    monkeypatch.setattr(T, 'afd_losses', poisoned)
    out = tmp_path / 'run'
    with pytest.raises(NonFiniteLossError) as e:
        fine_tune(TrainConfig(**{**SMALL, 'n_train': 80}, out_dir=str(out)), progress=False)
    assert (e.value.step, e.value.term, e.value.epoch) == (3, 'sep', 1)
    assert 'step 3' in str(e.value) and 'sep' in str(e.value) and 'ckpt_last.pt' in str(e.value)
    ck = read_checkpoint(out / 'ckpt_last.pt')                                  # intact, from before the bad step
    assert ck['step'] == 2 and all(torch.isfinite(v).all() for v in ck['model'].values() if v.is_floating_point())
    assert not (out / 'model_final.pt').exists()


def test_atomic_writes_leave_old_file_on_crash(tmp_path, monkeypatch):
    p = tmp_path / 'f.pt'
    atomic_save({'a': torch.ones(3)}, p)
    atomic_write_text(tmp_path / 'm.jsonl', 'old\n')
    def crash(obj, f): f.write(b'PARTIAL'); raise KeyboardInterrupt('killed mid-write')
    monkeypatch.setattr(torch, 'save', crash)
    with pytest.raises(KeyboardInterrupt): atomic_save({'a': torch.zeros(3)}, p)
    monkeypatch.undo()
    assert torch.equal(torch.load(p, weights_only=True)['a'], torch.ones(3))
    assert [q.name for q in tmp_path.iterdir() if q.name.startswith('.')] == []
    atomic_write_text(tmp_path / 'm.jsonl', 'new\n')
    assert (tmp_path / 'm.jsonl').read_text() == 'new\n'
