__version__ = "0.1.0"
"afd_nb: AFD (adversarial fine-tuning via feature disentanglement), exported from the notebooks in nbs/."
# `import afd_nb` gives the whole method; each module is also importable on its own.
from . import data, models, attacks, gap, disentangle, losses, train, baselines, evaluate, pretrain  # noqa: F401,E402
