"""Does a bf16 training attack (train_attack_dtype='bf16') change anything that matters? Two checks, fp32 against bf16:

  strength  PGD-10 success rate (the training attack: eps 8/255, step 0.003, random start, same start for both dtypes)
            against fixed models on the first N exact CIFAR-10 test images, per image, with McNemar's paired test:
            the natural ResNet-20 at eps 8/255 and 1/255, and the fp32 demo vAFT model of `finetune` seed 0 (waits for it) at 8/255
            and 2/255 (where its robust accuracy is not near 0, so the success rate is not saturated); eps <= 2/255 uses step eps/4.
  finetune  the demo's vAFT and AFD (official) runs (1000 images, 4 epochs = 32 steps; no per-epoch evaluation) with seeds 0 and 1, once with
            each attack dtype, then clean accuracy on the first N and fp32 PGD-20 accuracy on the first --n-pgd test images, paired per image.

  python results/bench/validate_bf16_attack.py finetune --seeds 0 --out results/bench/bf16_finetune_s0.json --work /tmp/x &
  python results/bench/validate_bf16_attack.py strength --out results/bench/bf16_strength.json --work /tmp/x &&
  python results/bench/validate_bf16_attack.py finetune --seeds 1 --out results/bench/bf16_finetune_s1.json --work /tmp/x
One thread each (OMP_NUM_THREADS=1)."""
import argparse, json, math, os, platform, sys, time
from pathlib import Path
import torch
from afd_nb.attacks import pgd
from afd_nb.data import get_dataset
from afd_nb.models import load_pretrained, build_model
from afd_nb.train import TrainConfig, fine_tune

torch.set_num_threads(1)
T0 = time.time()
DEMO = dict(dataset='cifar10', flavour='exact', arch='resnet20', checkpoint='pretrained', update_rule='official', n_train=1000,
            n_eval=0, eval_at_start=False, epochs=4, batch_size=128, lr=0.01, lr_schedule='afd', train_step_size=0.003, device='cpu')


def _dump(a, res):
    "Write what is done so far (a partial result survives a stopped job)."
    meta = dict(command='python ' + ' '.join(sys.argv), torch=torch.__version__, capability=torch.backends.cpu.get_cpu_capability(),
                threads=torch.get_num_threads(), wall_s=time.time() - T0, cpu_s=time.process_time(), load_avg=os.getloadavg())
    Path(a.out).write_text(json.dumps(dict(meta=meta, result=res), indent=1))


def mcnemar(a, b) -> dict:
    "Paired comparison of two per-image 0/1 vectors: rates, difference b - a, its SE and McNemar's exact two-sided p."
    a, b = a.bool(), b.bool(); n = len(a)
    n10, n01 = int((a & ~b).sum()), int((~a & b).sum())
    d = (n01 - n10) / n
    se = math.sqrt(max(n10 + n01 - (n01 - n10) ** 2 / n, 0)) / n
    k, m = min(n10, n01), n10 + n01
    p = min(1.0, 2 * sum(math.comb(m, i) for i in range(k + 1)) / 2 ** m) if m else 1.0
    return dict(n=n, rate_a=a.float().mean().item(), rate_b=b.float().mean().item(), only_a=n10, only_b=n01, diff=d, se=se, p=p)


def correct_after(model, x, y, dtype, eps, step, steps, seed, bs=250):
    "Per image: still classified correctly (fp32 forward) after PGD run with autocast `dtype` (same random start per seed)."
    out = []
    for i in range(0, len(x), bs):
        g = torch.Generator().manual_seed(seed + i)
        xa = pgd(model, x[i:i + bs], y[i:i + bs], eps=eps, step_size=step, steps=steps, generator=g, amp_dtype=dtype)
        with torch.no_grad(): out.append(model.eval()(xa).argmax(1) == y[i:i + bs])
    return torch.cat(out)


def strength(a):
    te = get_dataset('cifar10', 'test', flavour='exact', n=a.n); x, y = te.tensors('cpu')
    nat = load_pretrained('resnet20').eval()
    points = [('natural ResNet-20', lambda: nat, 8 / 255), ('natural ResNet-20', lambda: nat, 1 / 255)]
    robust = Path(a.work) / 'vaft_s0_fp32' / 'model_final.pt'     # the fp32 demo vAFT run of `finetune` (seed 0): a fixed robust model
    def load_robust():
        for _ in range(720):
            if robust.exists(): break
            time.sleep(5)
        ck = torch.load(robust, map_location='cpu'); m = build_model('resnet20', 10); m.load_state_dict(ck['state_dict']); return m.eval()
    robust_m = []
    get_robust = lambda: robust_m[0] if robust_m else robust_m.append(load_robust()) or robust_m[0]
    points += [('demo vAFT ResNet-20 (fp32 attack, seed 0)', get_robust, 8 / 255), ('demo vAFT ResNet-20 (fp32 attack, seed 0)', get_robust, 2 / 255)]
    rows = []
    for name, get, eps in points:
        m = get()
        with torch.no_grad(): clean = (m(x).argmax(1) == y)
        res = {}
        for dt in (None, torch.bfloat16):
            t0 = time.time(); res[dt] = correct_after(m, x, y, dt, eps, 0.003 if eps > 2 / 255 else eps / 4, 10, a.seed); res[str(dt) + '_s'] = time.time() - t0
        # success = the attack turns a correctly classified image into a wrong one; paired over the images classified correctly
        s32, s16 = (clean & ~res[None]), (clean & ~res[torch.bfloat16])
        r = dict(model=name, eps=f'{round(eps * 255)}/255', clean=clean.float().mean().item(), n_clean=int(clean.sum()),
                 fp32_s=res['None_s'], bf16_s=res['torch.bfloat16_s'], **mcnemar(s32[clean], s16[clean]))
        rows.append(r); print(json.dumps(r), flush=True); _dump(a, rows)
    return rows


def finetune(a):
    te = get_dataset('cifar10', 'test', flavour='exact', n=a.n); x, y = te.tensors('cpu')
    rows, per = [], {}
    for seed in a.seeds:
        for method in ('vaft', 'afd'):
            for dt in ('fp32', 'bf16'):
                out = Path(a.work) / f'{method}_s{seed}_{dt}'
                t0 = time.time()
                r = fine_tune(TrainConfig(**dict(DEMO, method=method, seed=seed, train_attack_dtype=dt, out_dir=str(out))), progress=False)
                ft_s = sum(h.get('train_time', 0) for h in r['history'])
                m = r['model'].eval()
                with torch.no_grad(): clean = m(x).argmax(1) == y
                rob = correct_after(m, x[:a.n_pgd], y[:a.n_pgd], None, 8 / 255, 0.003, 20, 2024)     # fp32 PGD-20, same starts for every model
                per[(seed, method, dt)] = (clean, rob)
                row = dict(seed=seed, method=method, attack=dt, train_s=ft_s, wall_s=time.time() - t0, clean=clean.float().mean().item(),
                           pgd20=rob.float().mean().item())
                rows.append(row); print(json.dumps(row), flush=True); _dump(a, dict(runs=rows))
    pairs = []
    for seed in a.seeds:
        for method in ('vaft', 'afd'):
            (c32, r32), (c16, r16) = per[(seed, method, 'fp32')], per[(seed, method, 'bf16')]
            pairs.append(dict(seed=seed, method=method, clean=mcnemar(c32, c16), pgd20=mcnemar(r32, r16)))
    return dict(runs=rows, pairs=pairs)


if __name__ == '__main__':
    p = argparse.ArgumentParser(); p.add_argument('what', choices=('strength', 'finetune')); p.add_argument('--out', required=True)
    p.add_argument('--work', required=True); p.add_argument('--n', type=int, default=1000); p.add_argument('--seed', type=int, default=0)
    p.add_argument('--seeds', type=int, nargs='+', default=[0, 1]); p.add_argument('--n-pgd', dest='n_pgd', type=int, default=500)
    a = p.parse_args()
    res = strength(a) if a.what == 'strength' else finetune(a)
    _dump(a, res)
