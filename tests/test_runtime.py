"""Process set-up: importing the library changes nothing; a command line starts JAX on the CPU where nothing
else could run, without libtpu's noise, and leaves any accelerator plugin to JAX; log lines reach stderr."""
import os
import subprocess
import sys

import pytest

from gpt2_jax.runtime import has_tpu_devices


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "TPU_SKIP_MDS_QUERY")}
    return {**env, **extra}


def _python(code: str, **env) -> subprocess.CompletedProcess:
    got = subprocess.run([sys.executable, "-c", code], env=_env(**env), capture_output=True, text=True, timeout=300)
    assert got.returncode == 0, got.stderr
    return got


def test_importing_the_library_changes_no_environment():
    """It used to set JAX_PLATFORMS=cpu unless it saw an NVIDIA or TPU device node, sending a ROCm GPU or any
    other accelerator to the CPU."""
    got = _python("import os, jax\nbefore = dict(os.environ)\n"
                  "import gpt2_jax, gpt2_jax.sharding, gpt2_jax.train.loop, gpt2_jax.sample.generate\n"
                  "assert dict(os.environ) == before, set(os.environ.items()) ^ set(before.items())\n"
                  "print(repr(jax.config.jax_platforms))\n")
    assert got.stdout.strip() in ("None", "''")


@pytest.mark.skipif(has_tpu_devices(), reason="a TPU VM: JAX must look for its chips")
def test_cli_starts_on_cpu_without_tpu_noise_and_still_compiles_for_tpu():
    code = ("from gpt2_jax.runtime import configure_platform\nprint(configure_platform())\n"
            "import jax\nprint(jax.devices()[0].platform)\n"
            "import sys; print('MARK', file=sys.stderr, flush=True)\n"
            "from jax.experimental import topologies\n"
            "print(len(topologies.get_topology_desc(platform='tpu', topology_name='v5e:2x2').devices))\n")
    got = _python(code)
    assert got.stdout.split() == ["cpu", "cpu", "4"]
    startup = got.stderr.split("MARK")[0]  # what JAX's start printed; the topology's libtpu may log after it
    assert "TPU" not in startup and "tpu" not in startup, startup


@pytest.mark.skipif(has_tpu_devices(), reason="a TPU VM: JAX must look for its chips")
def test_an_accelerator_plugin_or_an_explicit_platform_is_left_to_jax(tmp_path):
    """A PJRT plugin (here a stand-in `jax_plugins.xla_rocm` module, found as JAX finds plugins) means JAX may
    find a GPU: the platform is not forced to the CPU. Neither is an explicit JAX_PLATFORMS."""
    (tmp_path / "jax_plugins").mkdir()
    (tmp_path / "jax_plugins" / "xla_rocm.py").write_text("")
    code = ("import os\nfrom gpt2_jax import runtime\nprint(runtime.accelerator_plugins())\n"
            "print(runtime.configure_platform(), os.environ.get('JAX_PLATFORMS'))\n")
    got = _python(code, PYTHONPATH=os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    assert got.stdout.splitlines() == ["['xla_rocm']", "None None"]
    got = _python("from gpt2_jax import runtime\nprint(runtime.configure_platform())\n", JAX_PLATFORMS="cpu")
    assert got.stdout.split() == ["None"]


def test_cli_log_lines_reach_stderr():
    """train.py and the tools show the library's info lines (token-cache reuse, ...) and warnings."""
    code = ("import logging\nfrom gpt2_jax.runtime import run_cli\n"
            "def main():\n    logging.getLogger('gpt2_jax.data.x').info('tokens cached')\n"
            "    logging.getLogger('gpt2_jax.y').warning('step 4 skipped')\n"
            "    logging.getLogger('other').info('not ours')\n"
            "run_cli(main)\n")
    got = _python(code)
    assert got.stderr.splitlines() == ["tokens cached", "warning: step 4 skipped"]


def test_cli_log_lines_are_shown_once_after_absl_configures_the_root_logger():
    """Orbax logs through absl, which gives the root logger a handler (logging.basicConfig) on its first line:
    the library's lines then reached stderr twice, once as "INFO:gpt2_jax...:"."""
    code = ("import logging\nfrom gpt2_jax.runtime import run_cli\n"
            "def main():\n    from absl import logging as absl_logging\n    absl_logging.vlog(1, 'orbax-like')\n"
            "    logging.getLogger('gpt2_jax.train.loop').info('resumed')\n"
            "    logging.getLogger('gpt2_jax.y').warning('step 4 skipped')\n"
            "run_cli(main)\n")
    got = _python(code)
    assert got.stderr.splitlines() == ["resumed", "warning: step 4 skipped"]


def test_cli_logging_leaves_records_propagating_and_follows_stderr(capsys, caplog):
    """After a command line ran in this process (as tests do), the library's records still reach pytest's
    caplog (they propagate), and the handler writes to the stderr of the moment, not a closed one."""
    import io
    import logging
    import sys

    from gpt2_jax.runtime import configure_logging

    configure_logging()
    configure_logging()  # once per process: no second handler
    assert sum(getattr(h, "_gpt2_jax", False) for h in logging.getLogger().handlers) == 1
    old, sys.stderr = sys.stderr, io.StringIO()
    try:
        with caplog.at_level(logging.INFO, logger="gpt2_jax"):
            logging.getLogger("gpt2_jax.train.loop").warning("step 6 skipped")
            logging.getLogger("other").info("not ours")
        written = sys.stderr.getvalue()
    finally:
        sys.stderr = old
    assert [r.getMessage() for r in caplog.records if r.name.startswith("gpt2_jax")] == ["step 6 skipped"]
    assert written == "warning: step 6 skipped\n"
