"""afd_nb.models: shapes and feature sizes, the forward contract, pretrained weights (strict load, accuracy),
checkpoint unwrapping and the mismatch messages, and the weight lookup / download errors."""
import shutil, urllib.error
import pytest
import torch
import torch.nn as nn
from conftest import obtain
import afd_nb.models as M
from afd_nb.data import DataNotFoundError
from afd_nb.models import (ARCHS, CheckpointMismatchError, build_model, load_checkpoint, load_pretrained,
                           pretrained_path)


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
    "Counts of the original models (data README for resnet20..56; kuangliu ResNet-18; TRADES WRN-34-10)."
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
    with torch.no_grad(): assert torch.allclose(m(x), raw((x - mean) / std), atol=1e-5)


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
    "The naturally trained ResNet-20 scores >= 91% on the exact CIFAR-10 test subset (official test[0:1000])."
    x, y = cifar10_test.tensors()
    assert len(y) == 1000 and 0 <= x.min() and x.max() <= 1
    assert not resnet20.training
    with torch.no_grad(): acc = torch.cat([resnet20(b).argmax(1) for b in x.split(500)]).eq(y).float().mean().item()
    print(f'resnet20 clean accuracy on {cifar10_test.describe()}: {acc:.2%}')
    assert acc >= 0.91


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
    with pytest.raises(RuntimeError, match='truncated or corrupt'): load_checkpoint(build_model('resnet20'), p)


# ---- finding and downloading weights ----

@pytest.fixture
def only_tmp_root(tmp_path, monkeypatch):
    "Make the weight lookup see only tmp_path (no $AFD_DATA, no repo data/)."
    monkeypatch.setattr(M, 'data_roots', lambda root=None: [tmp_path])
    return tmp_path


def test_missing_weights_message(only_tmp_root, monkeypatch):
    called = []
    monkeypatch.setattr(torch.hub, 'download_url_to_file', lambda *a, **k: called.append(a))
    with pytest.raises(DataNotFoundError) as e: pretrained_path('resnet20')
    msg = str(e.value)
    assert str(only_tmp_root / 'weights' / 'resnet20-12fca82f.th') in msg and 'AFD_DATA' in msg and 'download=True' in msg
    assert not called                                   # download=False never touches the network
    with pytest.raises(ValueError, match='no pretrained weights'): pretrained_path('resnet18')


def test_download_failure_is_clear(only_tmp_root, monkeypatch):
    def offline(url, dst, hash_prefix=None, progress=True): raise urllib.error.URLError('no network')
    monkeypatch.setattr(torch.hub, 'download_url_to_file', offline)
    with pytest.raises(DataNotFoundError) as e: load_pretrained('resnet32', download=True)
    msg = str(e.value)
    assert 'https://github.com/akamaster/pytorch_resnet_cifar10/raw/master/pretrained_models/resnet32-d509ac18.th' in msg
    assert 'failed' in msg and 'no network' in msg and str(only_tmp_root) in msg


def test_download_success_and_hash_check(only_tmp_root, monkeypatch, weight_paths):
    real = weight_paths['resnet20']
    calls = []
    def fake(url, dst, hash_prefix=None, progress=True):
        calls.append((url, hash_prefix)); shutil.copy(real, dst)
    monkeypatch.setattr(torch.hub, 'download_url_to_file', fake)
    p = pretrained_path('resnet20', download=True)
    assert p == only_tmp_root / 'weights' / 'resnet20-12fca82f.th' and p.is_file()
    assert calls == [(M.PRETRAINED_URL + 'resnet20-12fca82f.th', '12fca82f')]
    assert load_pretrained('resnet20') is not None and len(calls) == 1   # found locally the second time

    p.write_bytes(b'not a checkpoint')                                    # a corrupt local copy is not used
    with pytest.raises(DataNotFoundError, match='sha256 does not start with 12fca82f'): pretrained_path('resnet20')
    monkeypatch.setattr(torch.hub, 'download_url_to_file', lambda url, dst, **k: open(dst, 'wb').write(b'junk'))
    with pytest.raises(DataNotFoundError, match='sha256'): pretrained_path('resnet20', download=True)
