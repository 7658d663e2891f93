"""gpt2_jax/aot/slices.py: TPU topologies' compile-only devices and their chips."""
import jax
import pytest

from gpt2_jax.aot import slices
from gpt2_jax.errors import GPT2JaxError

pytest.importorskip("libtpu", reason='libtpu is not installed (pip install -e ".[tpu]"); CI installs it')


def test_one_chip_and_pod_topologies():
    """A one-chip slice (smaller than libtpu's default 2x2 host) and a 16-chip one, one device a chip."""
    one, pod = slices.topology_devices("v5e:1x1"), slices.topology_devices("v5e:4x4")
    assert (len(one), len(pod)) == (1, 16)
    assert slices.chip_of(one[0]).name == "v5e"


def test_one_line_errors():
    with pytest.raises(GPT2JaxError, match="devices per chip"):
        slices.topology_devices("v4:2x2x1")
    with pytest.raises(GPT2JaxError, match="unknown TPU topology 'v9x:2x2'"):
        slices.topology_devices("v9x:2x2")
