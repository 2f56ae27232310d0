"""A node agent on a CPU tool host must not pay for torch: neither the CLI nor the daemons import
it until a torch replica or a trained predictor is actually used."""

import subprocess
import sys


def test_cli_and_daemons_do_not_import_torch():
    code = (
        "import sys, swarmx.cli.main, swarmx.daemon.node, swarmx.daemon.scheduler, "
        "swarmx.models.online; print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
