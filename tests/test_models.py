"""afd_nb.models: shapes and feature sizes, the forward contract, pretrained weights (strict load, accuracy),
checkpoint unwrapping and the mismatch messages, and the weight lookup / download errors."""
import argparse, os, shutil
import numpy as np
import pytest
import torch
import torch.nn as nn
from conftest import obtain
import afd_nb.download as DL
import afd_nb.models as M
from afd_nb.data import DataNotFoundError
from afd_nb.models import (ARCHS, CheckpointMismatchError, CheckpointReadError, UnsafeCheckpointError, build_model,
                           convert_legacy_checkpoint, load_checkpoint, load_pretrained, pretrained_path, safe_load)


@pytest.mark.parametrize('arch,opts,size,d', [
    ('resnet18', {}, 32, 512), ('resnet18', dict(stem_padding=1), 32, 512), ('resnet18', dict(pool='2x2'), 64, 2048),
    ('wrn34_10', {}, 32, 640), ('wrn34_10', dict(pool='2x2'), 64, 2560),
    ('resnet20', {}, 32, 64), ('resnet32', {}, 32, 64), ('resnet44', {}, 32, 64), ('resnet56', dict(normalize=False), 32, 64)])
def test_shapes_and_forward_contract(arch, opts, size, d):
    torch.manual_seed(0)
    m = build_model(arch, 7, **opts).eval()
    x = torch.rand(2, 3, size, size)
    with torch.no_grad(): f, z = m.features(x), m(x)
    assert f.shape == (2, d) and m.feature_dim == d and z.shape == (2, 7)
    assert torch.equal(z, m.classifier(f))                      # forward == classifier(features), nothing else
    assert (f >= 0).all()                                       # pooled post-ReLU features
    assert isinstance(m.classifier, nn.Linear) and m.classifier is getattr(m, 'fc' if arch == 'wrn34_10' else 'linear')
    assert (m.arch, m.num_classes, m.options) == (arch, 7, opts)
    head = nn.Linear(d, 3); m.classifier = head                  # replacing the head replaces linear/fc
    assert m.classifier is head and getattr(m, 'fc' if arch == 'wrn34_10' else 'linear') is head
    assert m(x).shape == (2, 3) and sum(p is head.weight for p in m.parameters()) == 1


def test_stem_padding():
    "The authors' ResNet-18 stem has padding 0 (32 -> 30 px); padding 1 keeps 32 px; same parameter shapes."
    x = torch.rand(1, 3, 32, 32)
    m0, m1 = build_model('resnet18'), build_model('resnet18', stem_padding=1)
    assert m0.conv1(x).shape[-2:] == (30, 30) and m1.conv1(x).shape[-2:] == (32, 32)
    assert {k: v.shape for k, v in m0.state_dict().items()} == {k: v.shape for k, v in m1.state_dict().items()}


def test_parameter_counts():
    "Counts of the original models (the akamaster checkpoints for resnet20..56; kuangliu ResNet-18; TRADES WRN-34-10)."
    expected = dict(resnet20=269_722, resnet32=464_154, resnet44=658_586, resnet56=853_018,
                    resnet18=11_173_962, wrn34_10=46_160_474)
    for arch, n in expected.items():
        with torch.device('meta'): m = build_model(arch, 10)
        assert sum(p.numel() for p in m.parameters()) == n, arch


def test_normalisation_inside_cifar_resnets():
    m = build_model('resnet20')
    assert not any('normalize' in k or 'mean' == k.split('.')[-1] for k in m.state_dict())   # not in the state dict
    x = torch.rand(2, 3, 32, 32)
    mean, std = torch.tensor(M.IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(M.IMAGENET_STD).view(1, 3, 1, 1)
    raw = build_model('resnet20', normalize=False); raw.load_state_dict(m.state_dict())
    m.eval(); raw.eval()
    with torch.no_grad(): assert torch.equal(m(x), raw((x - mean) / std))   # the same ops on the same tensors: equal by construction


def test_bad_build_arguments():
    with pytest.raises(ValueError, match='unknown arch .resnet19.; valid: resnet18, wrn34_10, resnet20'): build_model('resnet19')
    with pytest.raises(ValueError, match='does not take option'): build_model('resnet20', pool='2x2')
    with pytest.raises(ValueError, match='pool'): build_model('resnet18', pool='max')
    with pytest.raises(ValueError, match='num_classes'): build_model('resnet18', 0)
    assert set(ARCHS) == {'resnet18', 'wrn34_10', 'resnet20', 'resnet32', 'resnet44', 'resnet56'}


# ---- pretrained weights ----

@pytest.fixture(scope='module')
def weight_paths():
    return {a: obtain(f'{a} weights', lambda dl, a=a: pretrained_path(a, download=dl)) for a in M.PRETRAINED}


def test_pretrained_load_strictly(weight_paths):
    for arch, p in weight_paths.items():
        raw = torch.load(p, map_location='cpu', weights_only=True)['state_dict']
        assert all(k.startswith('module.') for k in raw)
        m = load_checkpoint(build_model(arch), p)
        sd = m.state_dict()
        assert set(sd) - {k[7:] for k in raw} <= {k for k in sd if k.endswith('num_batches_tracked')}
        assert all(torch.equal(sd[k[7:]], v) for k, v in raw.items())


def test_pretrained_resnet20_accuracy(resnet20, cifar10_test):
    """The naturally trained ResNet-20 gets 915 of the exact CIFAR-10 test subset (official test[0:1000]) right, as an
    independent NumPy re-implementation does; on another CPU only predictions with a top-2 margin below the rounding
    bound can flip."""
    x, y = cifar10_test.tensors()
    assert len(y) == 1000 and 0 <= x.min() and x.max() <= 1
    assert not resnet20.training
    with torch.no_grad(): z = torch.cat([resnet20(b) for b in x.split(500)])
    top2 = z.topk(2, 1).values
    right = z.argmax(1).eq(y)
    # float32 eps x largest |logit| x the longest dot product in the network (3*3*64 terms): a generous rounding bound
    delta = torch.finfo(torch.float32).eps * z.abs().max() * 576
    fragile = int(((top2[:, 0] - top2[:, 1] < delta) & right).sum())
    print(f'resnet20 on {cifar10_test.describe()}: {int(right.sum())} correct; {fragile} correct with margin < {delta:.1e}')
    assert int(right.sum()) >= 915 - fragile


# ---- load_checkpoint ----

def test_load_checkpoint_unwraps_and_strips(tmp_path):
    torch.manual_seed(1)
    src = build_model('resnet20')
    for wrap in [lambda sd: {'state_dict': {'module.' + k: v for k, v in sd.items()}, 'best_prec1': 90.0},
                 lambda sd: {'model': {'module._orig_mod.' + k: v for k, v in sd.items()}},
                 lambda sd: sd]:
        torch.save(wrap(src.state_dict()), tmp_path / 'ck.pt')
        for ck in (tmp_path / 'ck.pt', str(tmp_path / 'ck.pt'), wrap(src.state_dict())):
            dst = build_model('resnet20')
            assert load_checkpoint(dst, ck) is dst
            assert all(torch.equal(a, b) for a, b in zip(src.state_dict().values(), dst.state_dict().values()))


def _params(m): return [p.detach().clone() for p in m.parameters()]


def test_mismatch_num_classes():
    dst = build_model('resnet18', 10); before = _params(dst)
    with pytest.raises(CheckpointMismatchError) as e: load_checkpoint(dst, build_model('resnet18', 100).state_dict())
    assert str(e.value) == ('checkpoint has 100 classes (linear.weight [100, 512]) but the model has 10; '
                            'wrong --num_classes or --arch?')
    assert all(torch.equal(a, b) for a, b in zip(before, _params(dst)))   # nothing half-loaded
    with pytest.raises(CheckpointMismatchError, match=r'has 200 classes \(fc.weight \[200, 640\]\) but the model has 10'):
        with torch.device('meta'): ck, m = build_model('wrn34_10', 200).state_dict(), build_model('wrn34_10', 10)
        load_checkpoint(m, ck)


def test_mismatch_arch(weight_paths):
    with pytest.raises(CheckpointMismatchError) as e: load_checkpoint(build_model('resnet32'), weight_paths['resnet20'])
    msg = str(e.value)
    assert 'does not fit a resnet32' in msg and 'missing' in msg and 'looks like a resnet20 with 10 classes' in msg
    assert msg.endswith('wrong --arch?')
    with pytest.raises(CheckpointMismatchError, match='does not fit a resnet20.*unexpected.*looks like a resnet56'):
        load_checkpoint(build_model('resnet20'), weight_paths['resnet56'])
    with pytest.raises(CheckpointMismatchError, match="looks like a resnet18 with 100 classes"):
        load_checkpoint(build_model('resnet20'), build_model('resnet18', 100).state_dict())
    with pytest.raises(CheckpointMismatchError, match='2048-d features .* wrong pool option'):
        load_checkpoint(build_model('resnet18'), build_model('resnet18', pool='2x2').state_dict())
    with pytest.raises(CheckpointMismatchError, match='not a state dict'):
        load_checkpoint(build_model('resnet20'), {'epoch': 3, 'lr': 0.1})


def test_wrn_ignores_trades_sub_block1():
    with torch.device('meta'):
        src, dst = build_model('wrn34_10', 10), build_model('wrn34_10', 10)
    sd = dict(src.state_dict()); sd['sub_block1.layer.0.conv1.weight'] = torch.zeros(160, 16, 3, 3, device='meta')
    load_checkpoint(dst, sd)


def test_truncated_checkpoint_is_reported(tmp_path, weight_paths):
    p = tmp_path / 'trunc.th'
    p.write_bytes(weight_paths['resnet20'].read_bytes()[:5000])
    with pytest.raises(CheckpointReadError, match='truncated or corrupt'): load_checkpoint(build_model('resnet20'), p)
    torch.save(build_model('resnet20').state_dict(), tmp_path / 'new.pt')
    (tmp_path / 'cut.pt').write_bytes((tmp_path / 'new.pt').read_bytes()[:-2000])          # zip format, end cut off
    with pytest.raises(CheckpointReadError, match='truncated or corrupt'): load_checkpoint(build_model('resnet20'), tmp_path / 'cut.pt')
    with pytest.raises(FileNotFoundError, match='does not exist'): load_checkpoint(build_model('resnet20'), tmp_path / 'nope.pt')


# ---- reading checkpoint files safely ----

class _Payload:
    "Unpickling this calls os.makedirs(marker): a stand-in for any code a crafted checkpoint could run."
    def __init__(self, marker): self.marker = str(marker)
    def __reduce__(self): return (os.makedirs, (self.marker,))


def _crafted(path, marker, legacy=False):
    "A checkpoint that holds a valid resnet20 state dict and a payload; `legacy`: the pre-1.6 (non-zip) format."
    torch.save({'state_dict': build_model('resnet20').state_dict(), 'extra': _Payload(marker)}, path,
               _use_new_zipfile_serialization=not legacy)
    return path


@pytest.mark.parametrize('legacy', [False, True])
def test_crafted_checkpoint_is_refused_and_its_payload_never_runs(tmp_path, legacy):
    marker = tmp_path / 'payload-ran'
    evil = _crafted(tmp_path / 'evil.pt', marker, legacy)
    with pytest.raises(UnsafeCheckpointError) as e: load_checkpoint(build_model('resnet20'), evil)
    msg = str(e.value)
    assert f'refusing to load {evil}: it needs posix.makedirs' in msg or 'it needs os.makedirs' in msg or 'nt.makedirs' in msg
    assert 'convert_legacy_checkpoint' in msg and len(msg.splitlines()) == 1
    assert not marker.exists()
    with pytest.raises(UnsafeCheckpointError): safe_load(evil)
    assert not marker.exists()
    # the test can fail: the same file, unpickled fully, does run its payload
    torch.load(evil, weights_only=False)
    assert marker.exists()


def test_crafted_checkpoint_in_a_training_config_is_refused(tmp_path, cifar10_train):
    from afd_nb.train import TrainConfig, fine_tune
    marker = tmp_path / 'payload-ran'
    evil = _crafted(tmp_path / 'evil.pt', marker)
    cfg = TrainConfig(n_train=32, batch_size=16, epochs=1, n_eval=0, train_steps=1, device='cpu', checkpoint=str(evil),
                      out_dir=str(tmp_path / 'run'))
    with pytest.raises(UnsafeCheckpointError): fine_tune(cfg, train_ds=cifar10_train, progress=False)
    assert not marker.exists()


def test_text_file_as_checkpoint(tmp_path):
    p = tmp_path / 'run.yaml'; p.write_text('arch: resnet20\nepochs: 3\n')
    with pytest.raises(CheckpointReadError) as e: load_checkpoint(build_model('resnet20'), p)
    assert str(e.value) == (f"{p} is not a PyTorch checkpoint: it starts with b'arch', not with the zip or pickle header "
                            "that torch.save writes")
    (tmp_path / 'empty.pt').write_bytes(b'')
    with pytest.raises(CheckpointReadError, match='not a PyTorch checkpoint'): safe_load(tmp_path / 'empty.pt')


def test_our_own_files_load_safely(tmp_path, weight_paths):
    "The akamaster files, and state dicts saved whole or wrapped with metadata, need nothing beyond a weights-only load."
    for p in weight_paths.values(): assert isinstance(safe_load(p)['best_prec1'], float)
    sd = build_model('resnet20').state_dict()
    torch.save(dict(state_dict=sd, arch='resnet20', num_classes=10, options={}, ema=True, config=dict(lr=0.1, eps=8 / 255, n_gap=None,
                    model_options={}, flavour=None)), tmp_path / 'final.pt')
    assert safe_load(tmp_path / 'final.pt')['config']['eps'] == 8 / 255
    load_checkpoint(build_model('resnet20'), tmp_path / 'final.pt')


def test_legacy_conversion(tmp_path):
    net = build_model('resnet20')
    legacy = tmp_path / 'legacy.pt'
    torch.save({'state_dict': net.state_dict(), 'args': argparse.Namespace(lr=0.1, arch='resnet20', milestones=[100, 150]),
                'best_acc': np.float64(91.5), 'epoch': np.int64(200), 'hist': np.arange(3.0)}, legacy)
    with pytest.raises(UnsafeCheckpointError, match='it needs argparse.Namespace'): load_checkpoint(build_model('resnet20'), legacy)
    out = convert_legacy_checkpoint(legacy, tmp_path / 'legacy.safe.pt')
    ck = safe_load(out)
    assert ck['args'] == {'lr': 0.1, 'arch': 'resnet20', 'milestones': [100, 150]}
    assert type(ck['best_acc']) is float and ck['best_acc'] == 91.5 and type(ck['epoch']) is int and ck['epoch'] == 200
    assert torch.equal(ck['hist'], torch.arange(3.0, dtype=torch.float64))
    m = load_checkpoint(build_model('resnet20'), out)
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), net.state_dict().values()))
    # a whole pickled model becomes its state dict; objects that are not plain data are dropped with a warning
    torch.save({'model': net, 'sched': torch.optim.lr_scheduler.StepLR(torch.optim.SGD(net.parameters(), 0.1), 10)}, tmp_path / 'whole.pt')
    with pytest.warns(UserWarning, match=r'dropped 1 value.*sched \(torch.optim.lr_scheduler.StepLR\)'):
        out2 = convert_legacy_checkpoint(tmp_path / 'whole.pt', tmp_path / 'whole.safe.pt')
    assert set(safe_load(out2)) == {'model'}
    load_checkpoint(build_model('resnet20'), out2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ['legacy.pt', 'legacy.safe.pt', 'whole.pt', 'whole.safe.pt']


# ---- finding and downloading weights (the local-server tests of every download are in test_download.py) ----

def test_missing_weights_message(fresh_data, monkeypatch, http_server, weight_paths):
    srv = http_server(weight_paths['resnet20'].parent)
    monkeypatch.setenv('AFD_MIRROR', srv.url)
    monkeypatch.setenv('AFD_DOWNLOAD', '0')
    with pytest.raises(DataNotFoundError) as e: pretrained_path('resnet20')
    msg = str(e.value)
    first = msg.splitlines()[0]
    assert first.startswith('resnet20 weights: not found, and downloads are off')
    assert M.PRETRAINED_URL + 'resnet20-12fca82f.th' in first and f'put it in {fresh_data/"weights"}{os.sep} ' in first
    assert str(fresh_data / 'weights' / 'resnet20-12fca82f.th') + ': not found' in msg
    assert srv.requests == []                                           # downloads off: nothing was asked for
    with pytest.raises(DataNotFoundError): pretrained_path('resnet20', download=False)
    with pytest.raises(ValueError, match='no pretrained weights'): pretrained_path('resnet18')


def test_weights_found_fetched_and_checked(fresh_data, monkeypatch, http_server, weight_paths):
    srv = http_server(weight_paths['resnet20'].parent)
    monkeypatch.setenv('AFD_MIRROR', srv.url)
    p = pretrained_path('resnet20')                                     # download=None: fetched
    assert p == fresh_data / 'weights' / 'resnet20-12fca82f.th' and p.read_bytes() == weight_paths['resnet20'].read_bytes()
    assert load_pretrained('resnet20') is not None and srv.requests == ['/resnet20-12fca82f.th']   # found the second time
    p.write_bytes(b'not a checkpoint')                                  # a damaged local copy is never used ...
    with pytest.raises(DataNotFoundError, match='fails its checksum'): pretrained_path('resnet20', download=False)
    assert pretrained_path('resnet20') == p and p.read_bytes() == weight_paths['resnet20'].read_bytes()   # ... but replaced
    assert len(srv.requests) == 2
    monkeypatch.setenv('AFD_MIRROR', 'http://127.0.0.1:9')              # nothing listens there
    with pytest.raises(DataNotFoundError) as e: load_pretrained('resnet32')
    msg = str(e.value)
    assert msg.startswith('resnet32 weights: not found, and the download failed: could not fetch resnet32-d509ac18.th')
    assert M.PRETRAINED_URL + 'resnet32-d509ac18.th' in msg and 'Connection refused' in msg
    assert sorted(os.listdir(fresh_data / 'weights')) == ['resnet20-12fca82f.th']
