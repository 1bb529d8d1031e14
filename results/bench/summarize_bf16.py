"""Tables of the bf16 training-attack validation: bf16_validation.md and bf16_validation.csv from the JSON files that
validate_bf16_attack.py wrote (whatever parts of it have finished).   python results/bench/summarize_bf16.py"""
import csv, json
from pathlib import Path

HERE = Path(__file__).parent


def _load(name):
    p = HERE / name
    return json.loads(p.read_text()) if p.exists() else None


def main():
    md, rows = [], []
    st = _load('bf16_strength.json')
    if st:
        m = st['meta']
        md += [f"**Attack strength** (`{m['command']}`; torch {m['torch']}, capability {m['capability']}, {m['threads']} thread; "
               f"load average {[round(v, 1) for v in m['load_avg']]} at the end). PGD-10, the training attack (step 0.003; eps/4 at eps <= 2/255), "
               'random start shared by both dtypes; success = a correctly classified test image is misclassified after the attack '
               '(fp32 forward); paired over the images the model classifies correctly; McNemar exact two-sided p.', '',
               '| model | eps | clean | n | success fp32 | success bf16 | only fp32 | only bf16 | bf16 − fp32 (± SE) | p |',
               '|---|---|---:|---:|---:|---:|---:|---:|---:|---:|']
        for r in st['result']:
            md.append(f"| {r['model']} | {r['eps']} | {100 * r['clean']:.1f}% | {r['n']} | {100 * r['rate_a']:.1f}% | {100 * r['rate_b']:.1f}% | "
                      f"{r['only_a']} | {r['only_b']} | {100 * r['diff']:+.1f} ± {100 * r['se']:.1f} pp | {r['p']:.2f} |")
            rows.append(dict(check='strength', model=r['model'], eps=r['eps'], n=r['n'], fp32=r['rate_a'], bf16=r['rate_b'],
                             only_fp32=r['only_a'], only_bf16=r['only_b'], diff=r['diff'], se=r['se'], p=r['p']))
    runs, pairs, metas = [], [], []
    for f in sorted(HERE.glob('bf16_finetune_s*.json')):
        d = json.loads(f.read_text()); metas.append(d['meta'])
        res = d['result']
        runs += res['runs'] if isinstance(res, dict) else []
        pairs += res.get('pairs', []) if isinstance(res, dict) else []
    if runs:
        md += ['', '**The method\'s outcome**: the demo\'s vAFT and AFD (official) fine-tunes (1000 images, 4 epochs = 32 steps of 128), '
               'fp32 against bf16 training attack, same seed; clean accuracy on the first 1000 exact test images, fp32 PGD-20 '
               '(step 0.003, the same random starts for every model) on the first 500; McNemar per pair. '
               + '; '.join(f"`{m['command']}` (load {[round(v, 1) for v in m['load_avg']]})" for m in metas), '',
               '| seed | method | attack | clean | PGD-20 |', '|---:|---|---|---:|---:|']
        for r in runs:
            md.append(f"| {r['seed']} | {r['method']} | {r['attack']} | {100 * r['clean']:.1f}% | {100 * r['pgd20']:.1f}% |")
    if pairs:
        md += ['', '| seed | method | clean: bf16 − fp32 (± SE), p | PGD-20: bf16 − fp32 (± SE), p |', '|---:|---|---:|---:|']
        for p in pairs:
            c, g = p['clean'], p['pgd20']
            md.append(f"| {p['seed']} | {p['method']} | {100 * c['diff']:+.1f} ± {100 * c['se']:.1f} pp, {c['p']:.2f} | "
                      f"{100 * g['diff']:+.1f} ± {100 * g['se']:.1f} pp, {g['p']:.2f} |")
            for k in ('clean', 'pgd20'):
                q = p[k]
                rows.append(dict(check=f'finetune {k}', model=f"{p['method']} seed {p['seed']}", eps='8/255', n=q['n'], fp32=q['rate_a'],
                                 bf16=q['rate_b'], only_fp32=q['only_a'], only_bf16=q['only_b'], diff=q['diff'], se=q['se'], p=q['p']))
    (HERE / 'bf16_validation.md').write_text('\n'.join(md) + '\n')
    with open(HERE / 'bf16_validation.csv', 'w', newline='') as f:
        w = csv.DictWriter(f, ['check', 'model', 'eps', 'n', 'fp32', 'bf16', 'only_fp32', 'only_bf16', 'diff', 'se', 'p']); w.writeheader(); w.writerows(rows)
    print('\n'.join(md))


if __name__ == '__main__': main()
