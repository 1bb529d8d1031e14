"""Distributed fine-tuning (issue 6 §3): two gloo CPU processes give the same weights as one process on the same
global batch, only rank 0 writes, and a single process is untouched by the distributed hooks."""
import copy
import torch
import torch.nn as nn
from afd_nb.distributed import DistEnv, SyncBatchNorm2d, check_equivalence, sync_batchnorm, unsync_batchnorm


def test_two_processes_equal_one(cifar10_train, resnet20):
    # AFD `official` (3 optimizers, 3 backward passes, EMA), global batch 21 split 11 + 10, two steps, float64
    cfg = dict(method='afd', update_rule='official', arch='resnet20', checkpoint='pretrained', batch_size=21, epochs=1,
               n_eval=0, eval_at_start=False)
    r = check_equivalence(cfg, nprocs=2, n=42)
    assert r['steps'] == 2
    assert r['moved'] > 1e-3                      # the runs trained: the comparison is not trivially true
    for k in ('params', 'ema', 'checkpoint', 'between_ranks'): assert r[k] < 1e-10, (k, r[k])
    assert r['losses'] < 1e-6


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


def test_torchrun_command_matches_one_process(tmp_path, cifar10_train, resnet20):
    # the real launcher: `torchrun -m afd_nb.ddp` (process group from torchrun's environment), one float32 step of vAFT
    import json, os, subprocess, sys
    from afd_nb.train import fine_tune
    cfg = dict(method='vaft', arch='resnet20', checkpoint='pretrained', n_train=21, batch_size=21, epochs=1, n_eval=0,
               eval_at_start=False, device='cpu')
    args = [f'{k}={str(v).lower() if isinstance(v, bool) else v}' for k, v in cfg.items()] + [f'out_dir={tmp_path / "two"}']
    r = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2', '-m', 'afd_nb.ddp', *args],
                       env=dict(os.environ, OMP_NUM_THREADS='1'), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    one = fine_tune(dict(cfg, out_dir=str(tmp_path / 'one')), progress=False)
    two = torch.load(tmp_path / 'two' / 'ckpt_last.pt', weights_only=True)
    diff = max((two['model'][k] - v).abs().max().item() for k, v in one['net'].state_dict().items() if v.is_floating_point())
    assert diff < 1e-4, diff                                          # float32, one step
    rows = [json.loads(l) for l in (tmp_path / 'two' / 'metrics.jsonl').read_text().splitlines()]
    assert [row['epoch'] for row in rows] == [1] and rows[0]['step'] == 1
    assert abs(rows[0]['losses']['ce'] - one['history'][-1]['losses']['ce']) < 1e-4 * abs(rows[0]['losses']['ce'])
