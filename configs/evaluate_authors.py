"""The authors' robustness evaluation, as an `e2rnas evaluate` preset.

``DARTS/test_adv.py`` at commit 9b66e4d of github.com/yuezhixiong/NAS-
Benchmark (`config_lib.set_authors_evaluation`, docs/fidelity.md): FGSM (one
step of eps) and PGD-10 (step eps/4), both WITHOUT random start, at eps
1/255 and 2/255 (their ``--epsilon`` runs), on the whole CIFAR-10 test set.
Our default evaluation (configs/train_cifar10.py) adds MIM, eps 8/255 and a
random PGD start.

Run (on a model retrained with configs/train_cifar10.py):

    e2rnas evaluate --config=configs/evaluate_authors.py --checkpoint=runs/train

Expected: evaluation.json / evaluation.md with clean, FGSM and PGD accuracy
at 1/255 and 2/255; PGD <= FGSM <= clean (the sanity checks).
"""

from e2rnas_tf import config_lib


def get_config():
    c = config_lib.train_config()
    c.data.name = "cifar10"
    config_lib.set_authors_evaluation(c.evaluate)
    c.lock()
    return c
