"""BentoML's own path to many machines: `bentoml build` makes a Bento from bentofile.yaml (offline), and `bentoml
serve` runs that Bento, which answers a prediction. The container step (`bentoml containerize`) needs Docker and is
documented, not run here."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from samples import png_bytes
from serving import free_port, predict

ROOT = Path(__file__).resolve().parent.parent
BENTOML = Path(sys.executable).parent / "bentoml"


@pytest.mark.slow
def test_a_built_bento_serves_predictions(tmp_path):
    env = {**os.environ, "BENTOML_HOME": str(tmp_path / "bentoml"), "BENTOML_DO_NOT_TRACK": "True",
           "PRSMED_SERVE_DATA_DIR": str(tmp_path / "data"), "PRSMED_SERVE_GRPC_PORT": "-1", "OMP_NUM_THREADS": "1"}
    built = subprocess.run([str(BENTOML), "build", "-o", "tag"], cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=300)
    assert built.returncode == 0, built.stderr[-3000:]
    tag = built.stdout.strip().splitlines()[-1].removeprefix("__tag__:")
    assert tag.startswith("prsmed:")
    (bento,) = (tmp_path / "bentoml" / "bentos" / "prsmed").glob("*/bento.yaml")
    meta = yaml.safe_load(bento.read_text())
    assert meta["service"] == "prsmed_service.app:PrsMed"
    src = bento.parent / "src"
    assert (src / "constraints.txt").is_file() and (src / "service" / "bento_setup.sh").is_file()
    assert not (src / "tests").exists() and not (src / "runs").exists()

    port = free_port()
    log = open(tmp_path / "serve.log", "wb")
    proc = subprocess.Popen([str(BENTOML), "serve", tag, "--port", str(port)], cwd=tmp_path, env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the Bento did not become ready"
            try:
                if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        r = predict(url, png_bytes())
        assert r.status_code == 200, r.text
        assert r.json()["answer"] and r.json()["zone"]
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(60)
        log.close()
