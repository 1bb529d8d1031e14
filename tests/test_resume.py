"""Reliability of afd_nb.train: `kill -9` at any moment (during training, while a checkpoint is written, while
metrics.jsonl is written, while model_final.pt is exported) and the same command again gives the uninterrupted run's
weights, EMA, optimizer state, metrics and final model bit for bit. That holds by construction on one machine and
build: deterministic=True, one thread, the same kernels, and every random draw a function of (seed, epoch, batch,
step). Also: config changes are refused, writes are atomic, a corrupt checkpoint falls back to the previous one,
a NaN loss stops the run naming step, term and the checkpoint to continue from.

These runs keep the plain path (TrainConfig's defaults: channels_last=False, compile=False, train_attack_dtype='fp32'),
whatever the demo and study configs choose: bit-identity is a property of one path on one machine."""
import json, os, signal, subprocess, sys, time, warnings
from pathlib import Path
import pytest
import torch

import afd_nb.train as T
from afd_nb.train import (TrainConfig, fine_tune, read_checkpoint, atomic_save, atomic_write_text, ConfigChangedError,
                          CorruptCheckpointError, NonFiniteLossError)


pytestmark = pytest.mark.usefixtures('one_thread')

# 4 steps per epoch, 2 epochs, a checkpoint after every step; deterministic CPU
RESUME = dict(n_train=64, batch_size=16, epochs=2, n_eval=8, eval_steps=1, eval_step_size=0.01, train_steps=1,
              ckpt_every_steps=1, deterministic=True, device='cpu', eval_at_start=False)
STEPS = 8
SMALL = dict(n_train=48, batch_size=16, epochs=1, n_eval=0, train_steps=1, ckpt_every_steps=1, deterministic=True, device='cpu')
TIMING = ('train_time', 'eval_time', 'images_per_s')            # wall-clock numbers: the only fields allowed to differ

# The child process. With AFD_TEST_STALL=name:n:marker it stops halfway through its n-th atomic write of `name`
# (half the bytes in the temporary file, fsynced), touches `marker` and waits to be killed there.
SCRIPT = r'''
import io, json, os, sys, time, torch
from pathlib import Path
torch.set_num_threads(1)
if os.environ.get('AFD_TEST_STALL'):
    import afd_nb.checkpoint as C, afd_nb.run_folder as R      # atomic_save (checkpoint) and atomic_write_text (run_folder)
    name, nth, marker = os.environ['AFD_TEST_STALL'].split(':', 2)
    real, seen = R._atomic_write, [0]
    def stalling(path, write):
        if Path(path).name == name:
            seen[0] += 1
            if seen[0] == int(nth):
                def halfway(f):
                    buf = io.BytesIO(); write(buf); data = buf.getvalue()
                    f.write(data[:len(data) // 2]); f.flush(); os.fsync(f.fileno())
                    Path(marker).touch(); time.sleep(3600)
                return real(path, halfway)
        return real(path, write)
    C._atomic_write = R._atomic_write = stalling
from afd_nb.train import TrainConfig, fine_tune
fine_tune(TrainConfig(**json.loads(sys.argv[1])), progress=False)
print('FINISHED')
'''


def _popen(cfg: dict, cwd, stall: str | None = None):
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'MKL_NUM_THREADS': '1'}
    env.pop('AFD_TEST_STALL', None)
    if stall: env['AFD_TEST_STALL'] = stall
    return subprocess.Popen([sys.executable, '-c', SCRIPT, json.dumps(cfg)], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(p, timeout=900):
    try: out, err = p.communicate(timeout=timeout)
    finally:
        if p.poll() is None: p.kill(); p.wait()
    assert p.returncode == 0 and 'FINISHED' in out, err[-3000:]


def _kill_when(p, ready, what: str, timeout=600):
    "SIGKILL `p` as soon as `ready()` holds."
    t0 = time.time()
    try:
        while not ready():
            assert p.poll() is None, p.communicate()[1][-3000:]
            assert time.time() - t0 < timeout, f'{what} did not happen within {timeout} s'
            time.sleep(0.002)
    finally:
        p.send_signal(signal.SIGKILL); p.wait()
    assert p.returncode == -signal.SIGKILL


def _tensors(obj, pre=''):
    "Every tensor in a nested structure, by path; other leaves as values."
    if isinstance(obj, dict): return {k2: v2 for k, v in obj.items() for k2, v2 in _tensors(v, f'{pre}/{k}').items()}
    if isinstance(obj, (list, tuple)): return {k2: v2 for i, v in enumerate(obj) for k2, v2 in _tensors(v, f'{pre}/{i}').items()}
    return {pre: obj}


def _same(a, b) -> bool:
    "Bit-identical: the same paths, every tensor torch.equal (dtype and shape included), every other leaf ==."
    ta, tb = _tensors(a), _tensors(b)
    return ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) if isinstance(ta[k], torch.Tensor) else ta[k] == tb[k] for k in ta)


def _metrics(d: Path) -> list:
    return [{k: v for k, v in json.loads(l).items() if k not in TIMING} for l in (d / 'metrics.jsonl').read_text().splitlines()]


def _assert_equals_reference(a: Path, ref: Path):
    "The resumed run `a` and the uninterrupted run `ref` agree bit for bit (same machine, build, threads; deterministic)."
    ca, cb = read_checkpoint(a / 'ckpt_last.pt'), read_checkpoint(ref / 'ckpt_last.pt')
    assert ca['step'] == cb['step'] == STEPS and ca['epoch'] == cb['epoch'] == 2
    for k in ('model', 'ema', 'optimizers', 'sums'): assert _same(ca[k], cb[k]), k
    for name in ('model_final.pt', 'model_final_raw.pt'):                     # the EMA and the raw weights
        assert _same(*(torch.load(d / name, weights_only=True)['state_dict'] for d in (a, ref))), name
    ma, mb = _metrics(a), _metrics(ref)
    assert [h['epoch'] for h in ma] == [1, 2] and ma == mb
    assert not list(a.glob('.*.tmp*')) and not (a / '.lock').exists()


@pytest.fixture(scope='module')
def reference(tmp_path_factory, cifar10_train, resnet20):
    "The uninterrupted run, in a child process like the killed ones."
    d = tmp_path_factory.mktemp('straight')
    _finish(_popen({**RESUME, 'out_dir': str(d / 'run')}, d))
    return d / 'run'


def test_kill9_during_training_then_resume_equals_uninterrupted(tmp_path, reference):
    a = tmp_path / 'killed'
    p = _popen({**RESUME, 'out_dir': str(a)}, tmp_path)
    _kill_when(p, lambda: (a / 'ckpt_prev.pt').exists(), 'a second checkpoint')   # killed during training, or writing checkpoint 3
    assert not (a / 'model_final.pt').exists(), 'the run finished before it could be killed'
    killed_at = read_checkpoint(a / 'ckpt_last.pt')['step'] if (a / 'ckpt_last.pt').exists() else read_checkpoint(a / 'ckpt_prev.pt')['step']
    assert 1 <= killed_at < STEPS
    _finish(_popen({**RESUME, 'out_dir': str(a)}, tmp_path))      # the same command again: resumes
    _assert_equals_reference(a, reference)


def test_kill9_while_writing_metrics_then_resume(tmp_path, reference):
    a, marker = tmp_path / 'killed', tmp_path / 'stalled'
    p = _popen({**RESUME, 'out_dir': str(a)}, tmp_path, stall=f'metrics.jsonl:1:{marker}')   # the end of epoch 1
    _kill_when(p, marker.exists, 'the first metrics write')
    assert not (a / 'metrics.jsonl').exists() and list(a.glob('.metrics.jsonl.tmp*'))     # only the half-written temporary
    assert read_checkpoint(a / 'ckpt_last.pt')['epoch'] == 1                                # epoch 1 was checkpointed just before
    _finish(_popen({**RESUME, 'out_dir': str(a)}, tmp_path))
    _assert_equals_reference(a, reference)


def test_kill9_while_exporting_model_final_then_resume(tmp_path, reference):
    a, marker = tmp_path / 'killed', tmp_path / 'stalled'
    p = _popen({**RESUME, 'out_dir': str(a)}, tmp_path, stall=f'model_final.pt:1:{marker}')
    _kill_when(p, marker.exists, 'the export of model_final.pt')
    assert not (a / 'model_final.pt').exists() and list(a.glob('.model_final.pt.tmp*'))
    _finish(_popen({**RESUME, 'out_dir': str(a)}, tmp_path))      # finds the finished checkpoint, exports
    _assert_equals_reference(a, reference)


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


def test_checkpoint_without_ema_is_refused_in_one_line(tmp_path, cifar10_train, resnet20):
    "A run started before every method tracked an EMA (its checkpoint holds none) is not resumed as if it had one."
    out = tmp_path / 'old'
    fine_tune(TrainConfig(**{**SMALL, 'epochs': 2}, method='vaft', ema=False, out_dir=str(out)), progress=False)
    ck = read_checkpoint(out / 'ckpt_last.pt')
    assert ck['ema'] is None and ck['config']['ema'] is False and not (out / 'model_final_raw.pt').exists()
    ck['config']['epochs'] = 3                                                # an unfinished run of the old kind
    T.save_checkpoint({k: v for k, v in ck.items() if k not in ('path', 'digest')}, out)
    (out / 'model_final.pt').unlink(); (out / 'ckpt_prev.pt').unlink()
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    with pytest.raises(ConfigChangedError) as e:
        fine_tune(TrainConfig(**{**SMALL, 'epochs': 3}, method='vaft', out_dir=str(out)), progress=False)   # ema: the default, True
    msg = str(e.value)
    assert 'holds no weight EMA' in msg and 'ema=False' in msg and 'fresh=True' in msg and '\n' not in msg
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before          # nothing touched
    r = fine_tune(TrainConfig(**{**SMALL, 'epochs': 3}, method='vaft', ema=False, out_dir=str(out)), progress=False)
    assert [h['epoch'] for h in r['history']] == [0, 1, 2, 3] and 'raw' not in r['history'][-1] and r['model_raw'] is None


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
    assert _same(got['model'], want['model']) and _same(got['ema'], want['ema'])   # same process, deterministic: bit-identical
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
    msg = str(e.value)
    assert 'step 3' in msg and 'sep' in msg and 'ckpt_prev.pt (after step 1)' in msg and 'set aside as ckpt_last.pt.diverged' in msg
    # step 3 started from the step-2 checkpoint, so that state is not trusted; step 2 left the step-1 one finitely
    assert read_checkpoint(out / 'ckpt_last.pt.diverged')['step'] == 2 and not (out / 'ckpt_last.pt').exists()
    ck = read_checkpoint(out / 'ckpt_prev.pt')                                  # intact, and what a rerun resumes from
    assert ck['step'] == 1 and all(torch.isfinite(v).all() for v in ck['model'].values() if v.is_floating_point())
    assert T.load_last_checkpoint(out)['step'] == 1
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


def test_changed_training_attack_dtype_is_refused(tmp_path, cifar10_train, resnet20):
    "The attack precision is a setting of the run: a resume with another train_attack_dtype is refused, naming it."
    out = tmp_path / 'run'
    fine_tune(TrainConfig(**SMALL, out_dir=str(out)), progress=False)
    with pytest.raises(ConfigChangedError, match=r"train_attack_dtype: 'fp32' -> 'bf16'"):
        fine_tune(TrainConfig(**SMALL, train_attack_dtype='bf16', out_dir=str(out)), progress=False)
    assert json.loads((out / 'config.json').read_text())['train_attack_dtype'] == 'fp32'
