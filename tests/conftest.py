import pytest, torch

@pytest.fixture(autouse=True, scope='module')
def one_thread():
    "Tiny tensors: one intra-op thread avoids OpenMP spin-waits that make each op ~100x slower on a busy machine."
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
