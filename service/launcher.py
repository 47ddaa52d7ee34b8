"""``prsmed serve``: settings to environment variables, then BentoML's own server in this process's place."""

from __future__ import annotations

import os
import sys

from .config import ServiceConfig


def serve(config: ServiceConfig) -> None:
    config.data_dir.mkdir(parents=True, exist_ok=True)
    # Options given on the command line win; the rest may come from PRSMED_SERVE_* variables already set.
    given = {k: v for k, v in config.to_env().items() if k[len("PRSMED_SERVE_"):].lower() in config.model_fields_set}
    env = {**{k: v for k, v in config.to_env().items() if k not in os.environ}, **os.environ, **given}
    # The data dir is resolved now: BentoML may change the worker's working directory.
    env["PRSMED_SERVE_DATA_DIR"] = str(config.data_dir.resolve())
    # No usage reports leave the machine, and BentoML's own state (its store, its temporary files) goes under the
    # data dir, not the home directory.
    env.setdefault("BENTOML_DO_NOT_TRACK", "True")
    env.setdefault("BENTOML_HOME", str((config.data_dir / "bentoml").resolve()))
    # The demo at /ui: no analytics calls, and its uploads and outputs under the data dir, not /tmp/gradio.
    env.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    env.setdefault("GRADIO_TEMP_DIR", str((config.data_dir / "gradio").resolve()))
    if config.token_file is not None:
        env["PRSMED_SERVE_TOKEN_FILE"] = str(config.token_file.resolve())
    # Without a limit, uvicorn waits on SIGTERM for every open connection to end, and an event stream or a browser
    # on /ui never does: the server would outlive any orchestrator's grace period and be killed before it could
    # checkpoint its jobs.
    # Every setting is validated here, so a bad PRSMED_SERVE_* value is refused before BentoML starts.
    grace = ServiceConfig.from_env(env).shutdown_grace_s
    argv = [sys.executable, "-m", "bentoml", "serve", "prsmed_service.app:PrsMed", "--host", config.host,
            "--port", str(config.port), "--timeout-graceful-shutdown", str(grace)]
    os.execve(sys.executable, argv, env)
