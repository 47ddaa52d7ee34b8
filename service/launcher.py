"""``prsmed serve``: settings to environment variables, then BentoML's own server in this process's place."""

from __future__ import annotations

import os
import sys

from .auth import load_token
from .config import ServiceConfig

LOOPBACK = ("127.0.0.1", "localhost", "::1")


class RefusedToServe(RuntimeError):
    """The settings would expose the service in a way the user did not ask for; the message says what to pass."""


def is_loopback(host: str) -> bool:
    return host in LOOPBACK or host.startswith("127.")


def check_exposure(config: ServiceConfig, token: str | None) -> None:
    """Serving beyond this machine with no token opens every route, fine-tuning jobs and dataset uploads included,
    to the whole network: refused unless the user says so (as Jupyter refuses to listen publicly without a
    password)."""
    if token is None and not is_loopback(config.host) and not config.allow_unauthenticated:
        raise RefusedToServe(
            f"refusing to serve on {config.host} without a token: every route, fine-tuning jobs and dataset uploads "
            f"included, would be open to anyone who can reach it. Pass --token-file FILE (or set PRSMED_API_TOKEN); "
            f"or, on a network you trust, --allow-unauthenticated")


def startup_lines(config: ServiceConfig, token: str | None) -> list[str]:
    """What the log says first: where each face of the service listens, and whether it asks for a token."""
    shown = "localhost" if config.host in ("0.0.0.0", "::") else config.host
    base = f"http://{shown}:{config.port}"
    grpc = {-1: "off (--grpc-port -1)", 0: "on a free port (named below)"}.get(config.grpc_port,
                                                                               f"{config.host}:{config.grpc_port}")
    if token is not None:
        auth = "authentication: on (Authorization: Bearer <token> on every route but /livez, /readyz, /metrics)"
    else:
        auth = ("authentication: OFF (no token): anyone who can reach " + f"{config.host}:{config.port} may use "
                "every route" + ("" if is_loopback(config.host) else ", as --allow-unauthenticated asked"))
    return [f"prsmed serve: model {config.model} on {config.device}",
            f"  REST  {base}/v1 (OpenAPI: {base}/docs.json)", f"  gRPC  {grpc}", f"  demo  {base}/ui", f"  {auth}",
            f"  data  {config.data_dir.resolve()}"]


def serve(config: ServiceConfig) -> None:
    token = load_token(config.token_file)
    check_exposure(config, token)
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
    print("\n".join(startup_lines(config, token)), file=sys.stderr, flush=True)
    os.execve(sys.executable, argv, env)
