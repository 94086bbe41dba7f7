import pytest
import torch


@pytest.fixture
def float64_default():
    """Build tensors with float64 as the default dtype, restored afterwards (no leak between tests).

    Use per module with ``pytestmark = pytest.mark.usefixtures("float64_default")``.
    """
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)
