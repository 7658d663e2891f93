"""Starting JAX through gpt2_jax on a machine without accelerators: no libtpu noise on stderr (the `tpu` extra
installs libtpu, which logs errors about the TPU it looks for), and compiling for a TPU topology still works."""
import glob
import os
import subprocess
import sys

import pytest

NO_ACCELERATOR = not (glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*") or glob.glob("/dev/nvidia[0-9]*"))


@pytest.mark.skipif(not NO_ACCELERATOR, reason="this machine has accelerator devices: JAX should look for them")
def test_no_tpu_noise_without_accelerators():
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "TPU_SKIP_MDS_QUERY")}
    code = ("import gpt2_jax, jax\n"
            "print(jax.devices()[0].platform)\n"
            "import sys; print('MARK', file=sys.stderr, flush=True)\n"
            "from jax.experimental import topologies\n"
            "print(len(topologies.get_topology_desc(platform='tpu', topology_name='v5e:2x2').devices))\n")
    got = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert got.returncode == 0, got.stderr
    assert got.stdout.split() == ["cpu", "4"]
    startup = got.stderr.split("MARK")[0]  # what JAX's start printed; the topology's libtpu may log after it
    assert "TPU" not in startup and "tpu" not in startup, startup
