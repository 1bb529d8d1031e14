"""afd_nb: a notebook-first reproduction of AFD, adversarial fine-tuning via feature disentanglement
(Zhou et al., "Mitigating Feature Gap for Adversarial Robustness by Feature Disentanglement", AAAI 2025).

The modules are exported from the notebooks in nbs/ and follow the paper: data, models, attacks, gap (the
feature gap), disentangle (D1, D2 and the fold), losses, train (the fine-tuning loop), baselines (vAFT,
AFT+RGKD, ARREST, TRADES), evaluate (Clean, PGD-20, AutoAttack), pretrain; sweep and report run grids of the
experiment notebooks and summarise them (the `afd-sweep` command).

Each module is imported on first use, so `import afd_nb` is instant and `afd_nb.train.fine_tune` loads only
what it needs.
"""
__version__ = "0.1.0"

def __getattr__(name):
    "Import the submodule `name` on first access (`afd_nb.train`, `afd_nb.evaluate`, ...)."
    import importlib, pathlib
    if not name.startswith('_') and (pathlib.Path(__file__).parent/f'{name}.py').is_file():
        return importlib.import_module(f'{__name__}.{name}')
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')

def __dir__():
    import pathlib
    return sorted(set(globals()) | {p.stem for p in pathlib.Path(__file__).parent.glob('[!_]*.py')})
