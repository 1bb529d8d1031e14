"""GPU numerics. Tests marked `gpu` need a CUDA device: `make gpu-check` runs them (`pytest -m gpu`) as its stage 2;
without a GPU they skip, with the reason. `AFD_GPU_TEST_DEVICE=cpu` runs them on the CPU at toy size instead: a dry run
of every code path (the CPU-vs-device comparisons are then trivial), used by the CPU toy run of `afd_nb.gpucheck`.
`AFD_GPU_TEST_FLAVOUR` picks the CIFAR-10 data (default 'jpeg': the copy that travels to the GPU machine).

Unmarked tests here run everywhere: the float64-vs-bf16 toy that shows what the `official` rule computes under
autocast, and the refusal of that combination by `TrainConfig`.

Every tolerance is derived from the magnitudes involved, in one line beside it. Numbers that are measured rather than
asserted are printed (`pytest -rA` shows them; the GPU check keeps them in its log)."""
import copy, json, os, shutil
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

DEV = os.environ.get('AFD_GPU_TEST_DEVICE') or ('cuda' if torch.cuda.is_available() else None)
SMALL = DEV is not None and torch.device(DEV).type == 'cpu'      # dry run on a CPU: toy sizes, no compile, no bf16
FLAVOUR = os.environ.get('AFD_GPU_TEST_FLAVOUR', 'jpeg')
needs_device = pytest.mark.skipif(DEV is None, reason='needs a CUDA device: run by `make gpu-check` '
                                  '(AFD_GPU_TEST_DEVICE=cpu runs a CPU dry run)')


def gpu(f): return pytest.mark.gpu(needs_device(f))


def rel(a, b) -> float:
    "‖a − b‖ / ‖b‖ in float64."
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(scope='module')
def data():
    "Test and train images of the CIFAR-10 flavour that travels with the GPU check."
    from afd_nb.data import get_dataset
    return dict(test=get_dataset('cifar10', 'test', flavour=FLAVOUR, n=256), train=get_dataset('cifar10', 'train', flavour=FLAVOUR, n=2048))


def _head(ds, n: int):
    "The first n images of an ImageDataset, as an ImageDataset (fine_tune takes a dataset as given, whatever n_train says)."
    from afd_nb.data import ImageDataset
    return ImageDataset(ds.x[:n], ds.y[:n], ds.classes, ds.name, ds.split, ds.flavour, ds.source, subset=f'first {n}')


def _frozen(m):
    m = copy.deepcopy(m).eval()
    for p in m.parameters(): p.requires_grad_(False)
    return m


# ---------------------------------------------------------------- AMP and the official rule (runs everywhere; see notebook 15)
@pytest.mark.parametrize('dev', ['cpu', pytest.param('cuda', marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason='needs a CUDA device: run by `make gpu-check`')])])
def test_official_under_autocast_uses_pre_update_weights(dev):
    """Under bf16 autocast the forward saves bf16 *copies* of the weights, so the 2nd and 3rd backward of `official` see the
    pre-update weights: the step equals the 'stale' reference up to bf16 rounding and differs from the legacy semantics."""
    from afd_nb.gpucheck import official_semantics
    r = official_semantics(dev)
    print(dev, {k: f'{v:.2e}' for k, v in r.items()})
    u_bf16 = 2.0 ** -8                    # bf16 unit roundoff (8-bit significand)
    assert r['amp vs stale'] < 8 * u_bf16                            # a few roundings in each of the 4 layers' products
    assert r['stale vs legacy'] > 3 * 8 * u_bf16                     # lr chosen so the semantics differ well beyond that
    assert r['amp vs legacy'] > 8 * u_bf16                           # so autocast is not the legacy rule ...
    assert r['fp32 vs legacy'] < 1e-5                                # ... while plain fp32 is (u = 6e-8, sums of <= 64 terms)


def test_amp_with_official_is_refused():
    "TrainConfig refuses amp with AFD's official rule, in one line that names the fix; the fast rule and other methods pass."
    from afd_nb.train import TrainConfig
    with pytest.raises(ValueError, match=r"TrainConfig\.amp=True: .*update_rule='official_fused'"):
        TrainConfig(method='afd', update_rule='official', amp=True, checkpoint=None).validate()
    TrainConfig(method='afd', update_rule='official_fused', amp=True, checkpoint=None).validate()
    TrainConfig(method='vaft', amp=True, checkpoint=None).validate()


def test_tf32_recorded_in_config_and_restored(cifar10_train, tmp_path):
    "fine_tune records TrainConfig.tf32 in config.json, applies it during the run and restores the switches afterwards."
    from afd_nb.train import TrainConfig, fine_tune
    from afd_nb.evaluate import tf32_flags
    before = tf32_flags()
    cfg = TrainConfig(method='vaft', arch='resnet20', checkpoint=None, n_train=16, batch_size=16, epochs=1, train_steps=1,
                      n_eval=0, device='cpu', tf32=not before['matmul'], out_dir=str(tmp_path / 'run'))
    fine_tune(cfg, train_ds=_head(cifar10_train, 16), progress=False)
    assert json.loads((tmp_path / 'run' / 'config.json').read_text())['tf32'] == (not before['matmul'])
    assert tf32_flags() == before


# ---------------------------------------------------------------- on the device
@gpu
def test_tf32_switches_take_effect():
    "TF32 off: float32 matmuls and convolutions are float32-accurate. On: matmuls are TF32 on Ampere or newer."
    from afd_nb.evaluate import use_tf32
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(512, 512, generator=g), torch.randn(512, 512, generator=g)
    x, w = torch.randn(8, 64, 16, 16, generator=g), torch.randn(64, 64, 3, 3, generator=g)
    ref_mm, ref_conv = a.double() @ b.double(), F.conv2d(x.double(), w.double(), padding=1)
    err = {}
    for on in (False, True):
        with use_tf32(on):
            err[on] = (rel(a.to(DEV) @ b.to(DEV), ref_mm), rel(F.conv2d(x.to(DEV), w.to(DEV), padding=1), ref_conv))
    print('relative error (matmul, conv): TF32 off', err[False], 'on', err[True])
    # TF32 rounds every input to u = 2^-11 = 4.9e-4, so a TF32 product is off by ~4e-4; fp32 (u = 6e-8) stays near 1e-6 even
    # with cuDNN's Winograd or FFT algorithms. The threshold 5e-5 (a tenth of TF32's u) separates the two.
    assert max(err[False]) < 5e-5
    if torch.device(DEV).type == 'cuda' and torch.cuda.get_device_capability(DEV)[0] >= 8:
        assert err[True][0] > 5e-5


@gpu
def test_pgd_matches_cpu_float64(data):
    "PGD-10 in float64 on the device and on the CPU steps every pixel the same way, up to sign ties of near-zero gradients."
    from afd_nb.models import build_model
    from afd_nb.attacks import pgd
    torch.manual_seed(0)
    n, arch = (8, 'resnet20') if SMALL else (32, 'resnet18')
    x, y = (t[:n] for t in data['test'].tensors())
    model = build_model(arch).double().eval()
    kw = dict(eps=8 / 255, step_size=2 / 255, steps=5 if SMALL else 10, random_start=False)
    xc = pgd(model, x.double(), y, **kw)
    xd = pgd(copy.deepcopy(model).to(DEV), x.double().to(DEV), y.to(DEV), **kw).cpu()
    frac = ((xc - xd).abs() > 1e-12).double().mean().item()
    x32 = pgd(copy.deepcopy(model).float().to(DEV), x.to(DEV), y.to(DEV), **kw).cpu()
    print(f'pixels that differ: float64 {frac:.2e}; float32 on the device vs float64 on the CPU '
          f'{((xc.float() - x32).abs() > 1e-6).double().mean().item():.2e}')
    # float64 gradients agree to ~1e-13 (u = 1.1e-16, sums of <= 4608 products, ~20 layers): a step differs only where a
    # gradient component is that close to zero, a rare tie; a wrong sign, projection or mode would change most pixels
    assert frac <= 1e-3
    assert (xc - x.double()).abs().max() <= 8 / 255 + 1e-12 and (xd - x.double()).abs().max() <= 8 / 255 + 1e-12


def _afd_run(dis, teacher, rule='official', **cfg):
    from afd_nb.train import METHODS, Run, TrainConfig
    c = TrainConfig(method='afd', update_rule=rule, arch='resnet20', checkpoint=None, **cfg).resolved()
    return Run(c, dis, teacher, METHODS['afd'].optimizers(dis, c))


@gpu
def test_official_float64_matches_cpu(data):
    "Three `official` AFD steps (LegacySGD, in-place updates under autograd) in float64: device and CPU agree to 1e-9."
    from afd_nb.models import build_model
    from afd_nb.disentangle import Disentangled
    from afd_nb.train import METHODS
    torch.manual_seed(0)
    n, steps = (8, 2) if SMALL else (64, 3)
    x, y = (t[:n] for t in data['test'].tensors())
    base = build_model('resnet20').double()
    dis0 = Disentangled(copy.deepcopy(base))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for D in (dis0.D1, dis0.D2): D.weight.add_(0.05 * torch.randn(D.weight.shape, generator=g, dtype=torch.float64))
    out = {}
    for dev in ('cpu', DEV):
        dis = copy.deepcopy(dis0).to(dev)
        run = _afd_run(dis, _frozen(base).to(dev), train_steps=0)       # no attack: the update rule alone
        for _ in range(steps): METHODS['afd'].step(run, x.double().to(dev), y.to(dev))
        out[dev] = torch.cat([v.double().flatten().cpu() for v in dis.state_dict().values() if v.is_floating_point()])
    start = torch.cat([v.double().flatten() for v in dis0.state_dict().values() if v.is_floating_point()])
    r = ((out[DEV] - out['cpu']).norm() / (out['cpu'] - start).norm()).item()
    print(f'float64 official, {steps} steps: |device - cpu| / |update| = {r:.2e}')
    assert r < 1e-9        # u = 1.1e-16; sums of <= 4608 products and BN reductions of 65536: ~1e-12 per op, 3 steps of ~20 layers


@gpu
def test_amp_channels_last_steps_lower_the_loss(data):
    """Natural steps, then vAFT and AFD (official_fused) steps under bf16 autocast with channels_last lower the loss of a
    fixed batch (the CPU dry run uses fp32: bf16 is emulated and slow there)."""
    from afd_nb.models import build_model
    from afd_nb.disentangle import Disentangled
    from afd_nb.train import METHODS, Run, TrainConfig
    import afd_nb.baselines, afd_nb.pretrain  # noqa: F401  (register vaft, natural)
    torch.manual_seed(0)
    arch, n, steps = ('resnet20', 16, (6, 4)) if SMALL else ('resnet18', 128, (40, 20))
    amp = not SMALL
    x, y = (t[:n].to(DEV) for t in data['train'].tensors())
    x = x.contiguous(memory_format=torch.channels_last)

    def train(method, start, k):
        m = METHODS[method]
        cfg = TrainConfig(method=method, update_rule='official_fused', arch=arch, amp=amp, channels_last=True,
                          checkpoint=None, train_steps=2 if SMALL else 10).resolved().validate()
        net = (Disentangled(copy.deepcopy(start)) if m.disentangle else copy.deepcopy(start)).to(DEV).to(memory_format=torch.channels_last)
        run = Run(cfg, net, _frozen(start).to(DEV) if m.needs_teacher else None, m.optimizers(net, cfg),
                  amp_dtype=torch.bfloat16 if amp else None)
        losses = []
        for s in range(k):
            run.gen = torch.Generator(device=DEV).manual_seed(s)
            v = m.step(run, x, y); run.step += 1
            losses.append(sum(w * v[t] for t, w in m.weights(cfg).items()))
        assert all(p.dtype == torch.float32 for p in net.parameters())   # autocast leaves the master weights in fp32
        return net.backbone if m.disentangle else net, losses

    nat, ln = train('natural', build_model(arch), steps[0])
    res = dict(natural=ln, **{m: train(m, nat, steps[1])[1] for m in ('vaft', 'afd')})
    print({k: [round(v, 3) for v in l] for k, l in res.items()})
    ratio = lambda l: sum(l[-3:]) / sum(l[:3])
    for k, l in res.items():
        assert all(map(lambda v: v == v and abs(v) < float('inf'), l)), (k, l)
        # a step that does not learn leaves the loss of a fixed batch flat (ratio ~1); the CPU dry run is too short for AFT
        if k == 'natural' or not SMALL: assert ratio(l) < 0.75, (k, ratio(l), l)


@gpu
def test_ema_and_checkpoint_round_trip_to_cpu(data, tmp_path):
    "A run on the device writes CPU checkpoints equal to its state; the exported model gives the same logits on the CPU; the run resumes on the CPU."
    from afd_nb.models import build_model, load_checkpoint
    from afd_nb.train import TrainConfig, fine_tune, read_checkpoint
    nt, bs = (32, 16) if SMALL else (128, 64)
    kw = dict(method='afd', update_rule='official_fused', arch='resnet20', checkpoint=None, n_train=nt, batch_size=bs, epochs=2,
              train_steps=2, n_eval=32, eval_steps=2, seed=0)
    tr, te = _head(data['train'], nt), data['test']
    r = fine_tune(TrainConfig(device=DEV, out_dir=str(tmp_path / 'dev'), **kw), train_ds=tr, eval_ds=te, progress=False)
    ck = read_checkpoint(tmp_path / 'dev' / 'ckpt_last.pt')
    ema = {k: v.detach().cpu() for k, v in r['ema'].module.state_dict().items()}
    assert all(v.device.type == 'cpu' for v in ck['ema']['module'].values())
    assert ck['ema']['module'].keys() == ema.keys() and all(torch.equal(ck['ema']['module'][k], ema[k]) for k in ema)
    assert all(torch.equal(v, r['net'].state_dict()[k].cpu()) for k, v in ck['model'].items())
    plain = load_checkpoint(build_model('resnet20'), tmp_path / 'dev' / 'model_final.pt').eval()
    x = te.tensors()[0][:32]
    with torch.no_grad(): z_cpu, z_dev = plain(x), r['model'].eval()(x.to(DEV)).cpu()
    d = ((z_cpu - z_dev).abs().max() / z_dev.abs().max()).item()
    print(f'exported model, CPU vs device logits: max |Δz| / max |z| = {d:.2e}')
    assert d < 1e-3        # fp32, TF32 off: ~1e-6 per layer (u = 6e-8, sums of <= 576 products) over 20 layers, 30x margin
    # resume the device's epoch-1 checkpoint on the CPU
    (tmp_path / 'cpu').mkdir()
    shutil.copy(tmp_path / 'dev' / 'ckpt_prev.pt', tmp_path / 'cpu' / 'ckpt_last.pt')
    rc = fine_tune(TrainConfig(device='cpu', out_dir=str(tmp_path / 'cpu'), **kw), train_ds=tr, eval_ds=te, progress=False)
    assert [h['epoch'] for h in rc['history']] == [0, 1, 2] and rc['history'][:2] == r['history'][:2]
    assert rc['history'][2]['loss'] == rc['history'][2]['loss']        # finite, not NaN


@gpu
def test_autoattack_64_images(data, tmp_path):
    """The evaluator on the device: standard AutoAttack on 64 images of a briefly trained model, TF32 off and recorded;
    at ε = 0 every attack of the ensemble runs on every correct image and changes nothing."""
    from afd_nb.train import TrainConfig, fine_tune
    from afd_nb.evaluate import evaluate, AA_STANDARD
    n = 8 if SMALL else 64
    cfg = TrainConfig(method='natural', arch='resnet20', checkpoint=None, n_train=256 if SMALL else 2048, batch_size=128,
                      epochs=1 if SMALL else 3, lr=0.1, n_eval=0, device=DEV, out_dir=str(tmp_path / 'nat'))
    model = fine_tune(cfg, train_ds=_head(data['train'], cfg.n_train), progress=False)['model']
    x, y = data['test'].tensors()
    aa = dict(aa_version='custom', aa_attacks=['apgd-ce']) if SMALL else {}
    r = evaluate(model, x, y, n=n, device=DEV, progress=False, **aa)
    r0 = evaluate(model, x, y, n=n, eps=0, device=DEV, progress=False,
                  **(dict(aa_version='custom', aa_attacks=AA_STANDARD, aa_n_target_classes=1, aa_n_queries=20) if SMALL else {}))
    rc = evaluate(model, x, y, n=n, autoattack=False, device='cpu', progress=False)
    print({k: r[k] for k in ('Clean', 'PGD', 'AA')}, r['seconds'], 'eps=0:', {k: r0[k] for k in ('Clean', 'PGD', 'AA')}, r0['seconds'],
          'rescore:', r['aa_rescore'], r0['aa_rescore'])
    one = 100 / n                                                    # one image, in percent
    assert r['config']['tf32'] == dict(matmul=False, cudnn=False) and r['config']['device'].startswith(torch.device(DEV).type)
    assert r['AA'] <= r['PGD'] + one and r['PGD'] <= r['Clean']      # AA is the stronger attack, up to PGD's random start
    assert r0['AA'] == r0['Clean'] == r0['PGD']
    assert abs(rc['Clean'] - r['Clean']) <= one                      # fp32 logits agree to ~1e-5: only a near-tie can flip


@gpu
def test_compile_official_fused_and_joint(data, tmp_path):
    "torch.compile with the single-backward rules: same losses and accuracies as eager (no attack in training: smooth)."
    if SMALL: pytest.skip('compile is checked on CUDA only: inductor takes minutes to compile on a small CPU')
    from afd_nb.train import TrainConfig, fine_tune
    import time
    for rule in ('official_fused', 'joint'):
        h = {}
        for comp in (False, True):
            cfg = TrainConfig(method='afd', update_rule=rule, arch='resnet20', checkpoint=None, n_train=256, batch_size=128,
                              epochs=1, train_steps=0, ema=False, n_eval=64, eval_steps=5, compile=comp, device=DEV,
                              out_dir=str(tmp_path / f'{rule}-{comp}'))
            t0 = time.time()
            h[comp] = fine_tune(cfg, train_ds=_head(data['train'], 256), eval_ds=data['test'], progress=False)['history'][-1]
            print(f'{rule} compile={comp}: {time.time() - t0:.1f} s, loss {h[comp]["loss"]:.6f}, '
                  f'clean {h[comp]["clean_acc"]:.4f}, pgd {h[comp]["pgd_acc"]:.4f}')
        # fp32, TF32 off: fused kernels reorder sums (~1e-6 relative per op); two SGD steps keep the loss within 1e-4
        assert abs(h[True]['loss'] - h[False]['loss']) <= 1e-4 * abs(h[False]['loss'])
        assert abs(h[True]['clean_acc'] - h[False]['clean_acc']) <= 1 / 64 and abs(h[True]['pgd_acc'] - h[False]['pgd_acc']) <= 2 / 64
