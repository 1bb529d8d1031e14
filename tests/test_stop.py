"""Nothing finished is lost (issue 19, section 3): a run that fresh=True set aside is deleted only by that run; a full
disk while a checkpoint is written gives one line and a bit-identical rerun; SIGTERM and Ctrl-C stop at a step
boundary with a checkpoint, exit non-zero, and resume bit for bit."""
import errno, json, os, resource, signal, subprocess, sys
from pathlib import Path
import pytest
import torch

import afd_nb.train as T
from afd_nb.checkpoint import DiskFullError, read_checkpoint
from afd_nb.train import TrainConfig, fine_tune, RunInterrupted

pytestmark = pytest.mark.usefixtures('one_thread')

# 2 steps of batch 16, one PGD step, no evaluation: each run takes seconds
TINY = dict(n_train=32, batch_size=16, epochs=1, n_eval=0, train_steps=1, ckpt_every_steps=1, deterministic=True, device='cpu')
# 2 epochs of 4 steps, checkpoints only at the end of an epoch (or when stopped)
LONGER = dict(n_train=64, batch_size=16, epochs=2, n_eval=0, train_steps=1, deterministic=True, device='cpu')


def _weights(path: Path) -> dict:
    return torch.load(path, weights_only=True)['state_dict']


def _same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------- a run set aside is deleted only by the run that set it aside
def test_replaced_run_survives_a_crashed_fresh_run_and_a_plain_rerun(tmp_path, monkeypatch, capsys, cifar10_train, resnet20):
    out = tmp_path / 'run'
    fine_tune(TrainConfig(**TINY, out_dir=str(out)), progress=False)                      # finished run A
    a_final = (out / 'model_final.pt').read_bytes()

    def crash(*a, **k): raise RuntimeError('crashed before the first checkpoint')
    with monkeypatch.context() as m:                                                      # fresh=True rerun that crashes
        m.setattr(T, '_train_epoch', crash)
        with pytest.raises(RuntimeError, match='crashed'): fine_tune(TrainConfig(**TINY, out_dir=str(out)), progress=False, fresh=True)
    kept = list(out.glob('.replaced-*'))
    assert len(kept) == 1 and (kept[0] / 'model_final.pt').read_bytes() == a_final
    capsys.readouterr()

    fine_tune(TrainConfig(**TINY, out_dir=str(out)), progress=False)                      # plain rerun: starts over
    assert (out / 'model_final.pt').exists()
    assert list(out.glob('.replaced-*')) == kept and (kept[0] / 'model_final.pt').read_bytes() == a_final   # A is still there
    lines = [l for l in capsys.readouterr().out.splitlines() if kept[0].name in l]
    assert len(lines) == 1 and 'fresh=True' in lines[0] and f'mv {kept[0]}/* {out}/' in lines[0], lines

    fine_tune(TrainConfig(**TINY, out_dir=str(out)), progress=False, fresh=True)          # a fresh run deletes only its own
    assert list(out.glob('.replaced-*')) == kept and (kept[0] / 'model_final.pt').read_bytes() == a_final


# ---------------------------------------------------------------- disk full while a checkpoint is written
TORCH_FULL = RuntimeError('[enforce fail at inline_container.cc:672] . unexpected pos 3111808 vs 3111696')


@pytest.mark.parametrize('error', [TORCH_FULL, OSError(errno.ENOSPC, 'No space left on device')], ids=['torch', 'ENOSPC'])
def test_disk_full_at_a_checkpoint_then_bit_identical_rerun(tmp_path, monkeypatch, error, cifar10_train, resnet20):
    ref = fine_tune(TrainConfig(**TINY, out_dir=str(tmp_path / 'ref')), progress=False)
    out, real_save, calls = tmp_path / 'run', torch.save, []

    def save(obj, f, *a, **k):                       # the second checkpoint (end of the epoch) finds the disk full
        if isinstance(obj, dict) and obj.get('format') == T.CKPT_FORMAT: calls.append(obj['step'])
        if len(calls) == 2:
            f.write(b'PK' * 5000)                    # part of the archive is written, then the write fails
            raise error
        return real_save(obj, f, *a, **k)
    with monkeypatch.context() as m:
        m.setattr(torch, 'save', save)
        with pytest.raises(DiskFullError) as e: fine_tune(TrainConfig(**TINY, out_dir=str(out)), progress=False)
    msg = str(e.value)
    assert '\n' not in msg and str(out / 'ckpt_last.pt') in msg and f'Free space in {out}' in msg and 'rerun the same command' in msg
    assert not [p.name for p in out.iterdir() if '.tmp' in p.name]            # nothing partial left
    assert read_checkpoint(out / 'ckpt_last.pt')['step'] == 1                  # the last good checkpoint is intact
    assert not (out / 'model_final.pt').exists()
    r = fine_tune(TrainConfig(**TINY, out_dir=str(out)), progress=False)     # space again: the same command
    assert _same_weights(_weights(out / 'model_final.pt'), _weights(tmp_path / 'ref' / 'model_final.pt'))
    assert _same_weights(r['net'].state_dict(), ref['net'].state_dict())


FULL_CHILD = r'''
import json, resource, signal, sys, torch
torch.set_num_threads(1)
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)             # a write past the limit fails with EFBIG instead of killing
from afd_nb.train import TrainConfig, fine_tune
cfg = TrainConfig(**json.loads(sys.argv[1]))
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))   # no file may grow past 1 MiB: a checkpoint cannot be written
fine_tune(cfg, progress=False)
'''


def test_real_short_write_of_torch_save_is_recognised(tmp_path, cifar10_train, resnet20):
    "torch.save's own error when its file cannot grow (RLIMIT_FSIZE: no root needed) becomes DiskFullError."
    out = tmp_path / 'run'
    p = subprocess.run([sys.executable, '-c', FULL_CHILD, json.dumps({**TINY, 'out_dir': str(out)})], capture_output=True,
                       text=True, timeout=600, env={**os.environ, 'OMP_NUM_THREADS': '1'})
    last = p.stderr.strip().splitlines()[-1]
    assert p.returncode != 0 and last.startswith('afd_nb.run_folder.DiskFullError: ') and 'unexpected pos' in last and str(out / 'ckpt_last.pt') in last, p.stderr[-2000:]
    assert not [q.name for q in out.iterdir() if '.tmp' in q.name] and not (out / 'ckpt_last.pt').exists()


# ---------------------------------------------------------------- SIGTERM and Ctrl-C
CHILD = r'''
import json, sys, torch
torch.set_num_threads(1)
import afd_nb.train as T
cfg, wait_at = json.loads(sys.argv[1]), int(sys.argv[2])
_gen = T._step_generator
def gen(seed, step, dev):                    # before step `wait_at`: say so, and wait for a line on stdin
    if step == wait_at: print(f'STEP {step}', flush=True); sys.stdin.readline()
    return _gen(seed, step, dev)
T._step_generator = gen
T.fine_tune(T.TrainConfig(**cfg), progress=False)
print('FINISHED', flush=True)
'''


def _child(cfg: dict, wait_at: int = -1):
    return subprocess.Popen([sys.executable, '-c', CHILD, json.dumps(cfg), str(wait_at)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, 'OMP_NUM_THREADS': '1'})


@pytest.mark.parametrize('sig', [signal.SIGTERM, signal.SIGINT], ids=['SIGTERM', 'SIGINT'])
def test_signal_stops_at_a_step_boundary_and_resumes_bit_identically(tmp_path, sig, cifar10_train, resnet20):
    ref = _child({**LONGER, 'out_dir': str(tmp_path / 'ref')})
    o, err = ref.communicate(timeout=600)
    assert ref.returncode == 0 and 'FINISHED' in o, err[-2000:]

    out = tmp_path / 'run'
    p = _child({**LONGER, 'out_dir': str(out)}, wait_at=2)         # waits before its third step (epoch 1, batch 3 of 4)
    try:
        assert p.stdout.readline().strip() == 'STEP 2', p.communicate()[1][-2000:]
        p.send_signal(sig)                                          # arrives while the step is about to run
        o, err = p.communicate('go\n', timeout=600)
    finally:
        if p.poll() is None: p.kill(); p.wait()
    assert p.returncode == 128 + sig, (p.returncode, err[-2000:])
    assert 'FINISHED' not in o and 'Traceback' not in err, err[-2000:]
    stop = [l for l in err.splitlines() if 'stopped in' in l]
    assert stop == [f'{sig.name}: stopped in epoch 1/2 after step 3 (batch 3 of 4); checkpoint {out / "ckpt_last.pt"} written. '
                    'Run the same command again to resume.'], err[-2000:]
    ck = read_checkpoint(out / 'ckpt_last.pt')
    assert (ck['epoch'], ck['batch'], ck['step']) == (0, 3, 3)       # the step that was running was finished, not lost
    assert not (out / '.lock').exists()

    again = _child({**LONGER, 'out_dir': str(out)})                 # the same command
    o, err = again.communicate(timeout=600)
    assert again.returncode == 0 and 'FINISHED' in o, err[-2000:]
    assert _same_weights(_weights(out / 'model_final.pt'), _weights(tmp_path / 'ref' / 'model_final.pt'))
    last = [torch.load(d / 'ckpt_last.pt', weights_only=True) for d in (out, tmp_path / 'ref')]
    assert _same_weights(last[0]['model'], last[1]['model'])         # the raw weights too, not only the exported EMA


def test_signal_handlers_are_restored_and_the_exception_says_where(tmp_path, monkeypatch, cifar10_train, resnet20):
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    fine_tune(TrainConfig(**TINY, out_dir=str(tmp_path / 'done')), progress=False)
    assert {s: signal.getsignal(s) for s in before} == before
    _gen = T._step_generator
    def gen(seed, step, dev):                                       # Ctrl-C during the first step
        if step == 0: os.kill(os.getpid(), signal.SIGINT)
        return _gen(seed, step, dev)
    monkeypatch.setattr(T, '_step_generator', gen)
    with pytest.raises(RunInterrupted) as e: fine_tune(TrainConfig(**TINY, out_dir=str(tmp_path / 'stopped')), progress=False)
    assert (e.value.code, e.value.signal, e.value.epoch, e.value.step) == (130, signal.SIGINT, 1, 1)
    assert isinstance(e.value, SystemExit) and not isinstance(e.value, Exception)   # `except Exception` does not swallow it
    assert e.value.path == str(tmp_path / 'stopped' / 'ckpt_last.pt') and read_checkpoint(e.value.path)['step'] == 1
    assert {s: signal.getsignal(s) for s in before} == before
