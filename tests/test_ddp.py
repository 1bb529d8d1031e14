"""Distributed fine-tuning: two gloo CPU processes against one process on the same global batch (notebook 12).

What is equal by construction is tested bit for bit: every rank holds the same weights and EMA, rank 0's checkpoint
holds them, only rank 0 writes, and with one process every hook is a no-op. What is equal only in exact arithmetic
(one process sums the batch in one order, two processes in another) is tested after one step against a tolerance
predicted by the step itself: the same step in float32 and float64 in one process gives the float32 rounding
Delta32; rounding scales with the unit roundoff, so float64 carries about 2^-29 Delta32, and two float64 runs that
differ in summation order are within 8 * 2^-29 * Delta32 (x2 for two runs, x4 for the spread of a maximum).
Several steps are not compared: PGD's sign() turns last-bit differences into different pixels (see notebook 12)."""
import builtins, copy, io, os
from types import SimpleNamespace
import pytest
import torch
import torch.nn as nn
from afd_nb.distributed import DistEnv, SyncBatchNorm2d, launch, rank, sync_batchnorm, unsync_batchnorm

pytestmark = pytest.mark.usefixtures('one_thread')

# AFD `official` (3 optimizers, 3 backward passes, EMA), one global batch of 21 images: split 11 + 10 over two ranks
CFG = dict(method='afd', update_rule='official', arch='resnet20', checkpoint='pretrained', n_train=21, batch_size=21,
           epochs=1, n_eval=0, eval_at_start=False, device='cpu')


def _fine_tune_rank(cfg, **kw):
    "fine_tune on this rank; on ranks > 0 any attempt to write a file raises (only rank 0 may write)."
    from afd_nb.train import fine_tune
    if rank() == 0: return fine_tune(cfg, **kw)
    real = builtins.open, io.open, os.replace, os.rename, torch.save
    def refuse(*a, **k): raise AssertionError(f'rank {rank()} wrote a file: only rank 0 may write')
    def read_only(file, mode='r', *a, **k):
        if set(mode) & set('wax+'): refuse()
        return real[0](file, mode, *a, **k)
    builtins.open = io.open = read_only
    os.replace = os.rename = torch.save = refuse
    try: return fine_tune(cfg, **kw)
    finally: builtins.open, io.open, os.replace, os.rename, torch.save = real


def _data(cifar10_train, dtype):
    x, y = cifar10_train.x[:21], cifar10_train.y[:21]
    return SimpleNamespace(x=x.to(dtype) / 255, y=y, classes=cifar10_train.classes)   # as the loader makes float32 from uint8


def _weights(r): return {k: v for k, v in r['net'].state_dict().items() if v.is_floating_point()}
def _ema(r): return {k: v for k, v in r['ema'].module.state_dict().items() if v.is_floating_point()}
def _max_diff(a, b): return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


@pytest.fixture(scope='module')
def one_process(cifar10_train, resnet20, tmp_path_factory):
    "The one-step run in one process, in float32 and float64, and the float32 rounding Delta32 between them."
    from afd_nb.train import fine_tune
    runs = {dt: fine_tune(dict(CFG, out_dir=str(tmp_path_factory.mktemp(str(dt)))), model=copy.deepcopy(resnet20).to(dt),
                          train_ds=_data(cifar10_train, dt), progress=False) for dt in (torch.float32, torch.float64)}
    d32 = _max_diff(_weights(runs[torch.float32]), _weights(runs[torch.float64]))
    return runs, d32


def test_two_processes_equal_one(cifar10_train, resnet20, one_process, tmp_path):
    runs, d32 = one_process
    one = runs[torch.float64]
    out = tmp_path / 'many'
    many = launch(_fine_tune_rank, 2, dict(CFG, out_dir=str(out)), model=copy.deepcopy(resnet20).double(),
                  train_ds=_data(cifar10_train, torch.float64), progress=False)
    ck = torch.load(out / 'ckpt_last.pt', weights_only=True)                      # written by rank 0
    assert ck['step'] == 1
    # by construction, bit for bit: both ranks hold the same weights and EMA, and rank 0 wrote exactly them
    assert all(torch.equal(v, _weights(many[1])[k]) for k, v in _weights(many[0]).items())
    assert all(torch.equal(v, _ema(many[1])[k]) for k, v in _ema(many[0]).items())
    assert all(torch.equal(ck['model'][k], v) for k, v in _weights(many[0]).items())
    # up to rounding: float64 rounding is ~2^-29 of the float32 rounding d32 of the same step; x2 two runs, x4 spread
    tol = 8 * 2.0**-29 * d32
    start = {'backbone.' + k: v for k, v in resnet20.state_dict().items() if v.is_floating_point()}
    moved = _max_diff({k: _weights(one)[k] for k in start}, start)
    assert moved > 1e6 * tol                                       # the step is far larger than the tolerance
    assert _max_diff(_weights(many[0]), _weights(one)) <= tol, (_max_diff(_weights(many[0]), _weights(one)), tol)
    assert _max_diff(_ema(many[0]), _ema(one)) <= tol


def _reduce_rank(grads, weights):
    "This rank's parameters holding the gradients grads[rank], after all_reduce_grads with weight weights[rank]."
    from afd_nb.distributed import all_reduce_grads
    ps = [nn.Parameter(torch.zeros_like(g)) for g in grads[rank()]]
    for p, g in zip(ps, grads[rank()]): p.grad = g.clone()
    all_reduce_grads(ps, weights[rank()])
    return [p.grad for p in ps]


def test_gradient_all_reduce_is_exact():
    "The all-reduce itself rounds nothing away that one process would keep: bit for bit, by construction."
    g = torch.Generator().manual_seed(0)
    a = [torch.randn(3, 5, generator=g), torch.randn(7, generator=g)]
    b = [torch.randn(3, 5, generator=g), torch.randn(7, generator=g)]
    # identical shards, weights 1/2: 2^-1 g + 2^-1 g = g exactly (halving and doubling are exact in binary floating point)
    same = launch(_reduce_rank, 2, [a, a], [0.5, 0.5])
    # shards of 11 and 10 images: every rank gets fl(fl(w0 g0) + fl(w1 g1)), one correctly rounded sum of two terms
    # (which commutes), so exactly what one process computes from the same two weighted gradients
    w = [11 / 21, 10 / 21]
    mixed = launch(_reduce_rank, 2, [a, b], w)
    want = [ga * w[0] + gb * w[1] for ga, gb in zip(a, b)]
    for r in range(2):
        assert all(torch.equal(x, y) for x, y in zip(same[r], a))
        assert all(torch.equal(x, y) for x, y in zip(mixed[r], want))


def test_single_process_hooks_are_no_ops(resnet20, cifar10_train):
    dd = DistEnv()
    x, y = cifar10_train.tensors()
    x = x[:8]
    net = copy.deepcopy(resnet20).train()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(0)
    state = g.get_state()
    assert dd.prepare(net) is net and not any(isinstance(m, SyncBatchNorm2d) for m in net.modules())
    assert dd.sync_optimizers({'sgd': opt})['sgd'] is opt and not opt._optimizer_step_pre_hooks
    assert dd.begin_step(x, g) == 8 and torch.equal(g.get_state(), state)   # generator untouched
    terms = {'ce': torch.tensor(1.5)}
    assert dd.mean_terms(terms) is terms


def test_sync_batchnorm_switches_in_place_and_back(resnet20):
    resnet20 = copy.deepcopy(resnet20)
    bns = [m for m in resnet20.modules() if type(m) is nn.BatchNorm2d]
    params = [p for m in bns for p in m.parameters()]
    sd = resnet20.state_dict()
    sync_batchnorm(resnet20)
    assert all(type(m) is SyncBatchNorm2d for m in bns)                    # same module objects, new class
    assert [p for m in bns for p in m.parameters()] == params and resnet20.state_dict().keys() == sd.keys()
    unsync_batchnorm(resnet20)
    assert all(type(m) is nn.BatchNorm2d for m in bns)


def test_torchrun_command(tmp_path, resnet20):
    """The real launcher, `torchrun -m afd_nb.ddp` (process group from torchrun's environment), float32, one step.

    This checks the command, not the numbers: in float32 one step of two processes and one step of one process can
    differ by as much as the float32 rounding Delta32 of the step (0.11 in notebook 12, as large as the step itself,
    because PGD's sign() turns a last-bit difference into a full step in a pixel), so no weight comparison with one
    process is meaningful here. The equivalence is tested in float64 above."""
    import json, subprocess, sys
    args = [f'{k}={str(v).lower() if isinstance(v, bool) else v}' for k, v in CFG.items()] + [f'out_dir={tmp_path / "two"}']
    r = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2', '-m', 'afd_nb.ddp', *args],
                       env=dict(os.environ, OMP_NUM_THREADS='1'), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    two = torch.load(tmp_path / 'two' / 'ckpt_last.pt', weights_only=True)
    assert two['step'] == 1
    start = {'backbone.' + k: v for k, v in resnet20.state_dict().items() if v.is_floating_point()}
    assert all(torch.isfinite(two['model'][k]).all() for k in start)
    assert any(not torch.equal(two['model'][k], v) for k, v in start.items())     # it trained the pretrained model
    rows = [json.loads(l) for l in (tmp_path / 'two' / 'metrics.jsonl').read_text().splitlines()]
    assert [row['epoch'] for row in rows] == [1] and rows[0]['step'] == 1         # one metrics file, written once
