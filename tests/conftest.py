"""Shared fixtures. Data- and weight-dependent fixtures look in AFD_DATA / data/, download when
AFD_DOWNLOAD=1, and otherwise skip with the reason -- except in our CI (AFD_REQUIRE_DATA=1),
where a missing file is a failure, never a skip."""
import os
import pytest
import torch

REQUIRE = os.environ.get('AFD_REQUIRE_DATA') == '1'
DOWNLOAD = os.environ.get('AFD_DOWNLOAD') == '1'


def obtain(what: str, fn):
    "Return fn(download) -- or skip (fail under AFD_REQUIRE_DATA=1) with a printed reason if the data is missing."
    from afd_nb.data import DataNotFoundError
    try:
        return fn(DOWNLOAD)
    except (DataNotFoundError, OSError) as e:  # OSError: download failed (no network)
        msg = f'{what} not available: {e}'
        if REQUIRE: pytest.fail(msg + '\n(AFD_REQUIRE_DATA=1: data tests may not skip)')
        print(msg); pytest.skip(msg)


@pytest.fixture(scope='session')
def cifar10_test():
    "The exact CIFAR-10 test subset: official test[0:1000]."
    from afd_nb.data import get_dataset
    return obtain('CIFAR-10 exact test subset', lambda dl: get_dataset('cifar10', 'test', flavour='exact', download=dl))


@pytest.fixture(scope='session')
def cifar10_train():
    "The exact CIFAR-10 train subset: official train[0:4000]."
    from afd_nb.data import get_dataset
    return obtain('CIFAR-10 exact train subset', lambda dl: get_dataset('cifar10', 'train', flavour='exact', download=dl))


@pytest.fixture(scope='session')
def resnet20():
    "The naturally trained CIFAR-10 ResNet-20 (akamaster weights), in eval mode."
    from afd_nb.models import load_pretrained
    return obtain('ResNet-20 weights', lambda dl: load_pretrained('resnet20', download=dl)).eval()


@pytest.fixture(scope='module')
def one_thread():
    "Small convolutions: one thread is fastest and avoids oversubscribing a shared 2-core machine (restored after)."
    n = torch.get_num_threads(); torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
