"""The ``prsmed`` command."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from prsmed.components import ComponentError

app = typer.Typer(help="PRS-Med: position-reasoning segmentation in medical imaging.", no_args_is_help=True)
plugins_app = typer.Typer(help="Installed plugins and their components.", no_args_is_help=True)
zoo_app = typer.Typer(help="Named model presets.", no_args_is_help=True)
convert_app = typer.Typer(help="Convert checkpoints from other layouts.", no_args_is_help=True)
app.add_typer(plugins_app, name="plugins")
app.add_typer(zoo_app, name="zoo")
app.add_typer(convert_app, name="convert")


def _mount_commands() -> None:
    # Each family's commands live beside the code they drive; importing them is cheap (no torch at import).
    from prsmed.cloud.cli import launch_app
    from prsmed.data.cli import data_app
    from prsmed.eval.cli import eval_command, eval_masks_command
    from prsmed.infer.cli import predict_command
    from prsmed.plan.cli import plan_app
    from prsmed.train.cli import train

    app.add_typer(data_app, name="data")
    app.command("train")(train)
    app.command("eval")(eval_command)
    app.command("eval-masks")(eval_masks_command)
    app.command("predict")(predict_command)
    app.add_typer(plan_app, name="plan")
    app.add_typer(launch_app, name="launch")


_mount_commands()

console = Console()


def _fail(message: str, code: int = 2) -> None:
    from rich.markup import escape

    # Escaped: a message quotes paths and commands ("prsmed[serve]") that are not markup.
    Console(stderr=True).print(f"[red]error:[/red] {escape(message)}", highlight=False)
    raise typer.Exit(code)


@plugins_app.command("list")
def plugins_list(as_json: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """Each plugin's name, version, source distribution and components."""
    from prsmed.registry import get_registry

    plugins = get_registry().plugins()
    if as_json:
        rows = [
            {"name": p.name, "version": p.version, "distribution": p.distribution, "builtin": p.builtin, "components": p.components}
            for p in plugins
        ]
        print(json.dumps(rows, indent=2))
        return
    table = Table("plugin", "version", "distribution", "components")
    for p in plugins:
        table.add_row(p.name, p.version, p.distribution + (" (built-in)" if p.builtin else ""), "\n".join(p.components))
    console.print(table)


@zoo_app.command("list")
def zoo_list(pattern: str = typer.Argument("*", help="Shell-style filter, e.g. 'prsmed-*7b'.")) -> None:
    """The zoo's presets."""
    from prsmed.zoo import PRESETS, list_presets

    table = Table("name", "revision", "description")
    for name in list_presets(pattern):
        p = PRESETS[name]
        table.add_row(name, p.spec.revision, p.description)
    console.print(table)


@zoo_app.command("show")
def zoo_show(name: str, as_json: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """Parameter counts per component, computed without loading weights."""
    from prsmed.zoo import describe

    try:
        info = describe(name)
    except ComponentError as e:
        _fail(str(e))
    if as_json:
        print(json.dumps(info, indent=2))
        return
    console.print(f"[bold]{info['name']}[/bold] (revision {info['revision']}): {info['description']}")
    table = Table("component", "name", "parameters", "trainable")
    by = info["params"]["by_component"]
    spec = info["spec"]
    for comp, c in by.items():
        label = spec[comp]["name"] if comp in spec and isinstance(spec[comp], dict) else ""
        parts = [f"LoRA {c['lora']:,}"] if "lora" in c else []
        if c.get("image_tower"):
            parts.append(f"image tower {c['image_tower']:,}")
        if c.get("output_layer"):
            parts.append(f"output layer {c['output_layer']:,}")
        extra = f" ({', '.join(parts)})" if parts else ""
        table.add_row(comp, label, f"{c['total']:,}", f"{c['trainable']:,}{extra}")
    table.add_row("total", "", f"{info['params']['total']:,}", f"{info['params']['trainable']:,}")
    console.print(table)
    for w in info["weights"]:
        console.print(f"weights for {w['component']}: {w['path']} ({'present' if w['present'] else 'missing'})")
    record = info.get("weights_record")
    if record is not None:
        if "revision" in record:
            console.print(f"weights: revision {record['revision']}, identity {record['identity'][:12]} "
                          f"({record['path']})", highlight=False)
            console.print(f"trained on: {record['trained_on']}", highlight=False)
            console.print(f"intended use: {record['intended_use']}", highlight=False)
        for problem in record["problems"]:
            console.print(f"[red]weights record problem:[/red] {problem}; rebuild the weights "
                          f"(`prsmed zoo build {info['name']}`) or reinstall prsmed", highlight=False)
    elif info["weights"]:
        console.print("weights identity: sampled from the files above when the model is built (docs/hub.md)")
    tune = dict(info["finetune_defaults"])
    lora = tune.pop("lora", None)
    console.print("fine-tuning defaults: " + ", ".join(f"{k} {v}" for k, v in tune.items() if v is not None)
                  + (f"; LoRA r{lora['r']}/alpha {lora['alpha']}/dropout {lora['dropout']} on {lora['targets']}"
                     if lora else ""), highlight=False)


@zoo_app.command("build")
def zoo_build(
    name: str = typer.Argument(..., help="The preset to build; only prsmed-tiny has a recipe."),
    work_dir: Path = typer.Option(Path("runs/prsmed-tiny-recipe"), "--work-dir", help="Data and checkpoints go here."),
    assets: Optional[Path] = typer.Option(
        None, "--assets", help="Where to write the weights (default: the installed package's assets)."
    ),
    epochs: Optional[int] = typer.Option(None, "--epochs", min=1,
                                         help="Epochs of the joint stage (default: the recipe's, 7)."),
    max_steps: Optional[int] = typer.Option(None, "--max-steps", min=1),
    n_images: int = typer.Option(3000, "--n-images", min=60),
) -> None:
    """Rebuild a preset's shipped weights from scratch (synthetic data, tower stage, joint stage)."""
    import logging

    from prsmed.zoo.recipe import RecipeConfig, build_tiny

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if name != "prsmed-tiny":
        _fail(f"only prsmed-tiny has a build recipe; {name!r} uses published weights (see `prsmed zoo show {name}`)")
    chosen = {"epochs": epochs} if epochs is not None else {}
    summary = build_tiny(work_dir, RecipeConfig(max_steps=max_steps, n_images=n_images, **chosen),
                         assets_dir=assets)
    console.print_json(json.dumps(summary, default=str))


@convert_app.command("llava-med")
def convert_llava_med(
    src: Path = typer.Argument(..., help="A LLaVA-Med v1.5 checkpoint in its original layout (model_type llava_mistral)."),
    dst: Optional[Path] = typer.Argument(None, help="Where to write the transformers-layout checkpoint (or --to)."),
    to: Optional[Path] = typer.Option(None, "--to", help="Where to write it, as prsmed convert prsmed-authors."),
    vision_tower: Optional[Path] = typer.Option(
        None, "--vision-tower", help="Local CLIP tower directory (default: the one named in the source config)."
    ),
    tokenizer: Optional[Path] = typer.Option(
        None, "--tokenizer", help="Directory with a tokenizer.json, when SRC has only the SentencePiece model."
    ),
) -> None:
    """Convert an original-layout LLaVA-Med checkpoint into transformers' LLaVA layout."""
    from prsmed_plugins.converters.llava_med import convert_llava_med as convert

    if (dst is None) == (to is None):
        _fail("name where to write the checkpoint once: --to DIR (or the second argument)")
    dst = dst or to
    try:
        convert(src, dst, vision_tower_dir=vision_tower, tokenizer_dir=tokenizer)
    except (ComponentError, ValueError, OSError) as e:
        _fail(str(e))
    console.print(f"wrote {dst}")


@convert_app.command("prsmed-authors")
def convert_prsmed_authors_command(
    src: str = typer.Argument(..., help="The authors' checkpoint folder (llm_seg_<epoch>/), or a Hub id owner/name."),
    to: Path = typer.Option(..., "--to", help="Where to write the adapter bundle."),
    model: str = typer.Option("prsmed-llava-med-7b", "--model", help="The model it is for (a zoo name or a spec "
                              "JSON file)."),
    revision: Optional[str] = typer.Option(None, "--revision", help="Hub revision, with a Hub id."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing bundle at --to."),
) -> None:
    """Import the PRS-Med authors' trained checkpoint as a verified adapter bundle for the paper's model."""
    from prsmed_plugins.converters.prsmed_authors import convert_prsmed_authors

    try:
        manifest = convert_prsmed_authors(src, to, model=model, overwrite=overwrite, revision=revision)
    except (ComponentError, ValueError, OSError) as e:
        _fail(str(e))
    console.print(f"wrote {to}: {', '.join(['lora', *manifest.parts])} for {manifest.base.name}; use it with "
                  f"--adapter {to}", highlight=False)


@app.command("serve")
def serve(
    model: str = typer.Option("prsmed-tiny", "--model", help="Zoo preset to serve."),
    host: str = typer.Option("127.0.0.1", "--host", help="Interface for REST and gRPC (0.0.0.0 for all)."),
    port: int = typer.Option(3000, "--port", help="REST port."),
    grpc_port: int = typer.Option(50051, "--grpc-port", help="gRPC port (0: any free port, -1: no gRPC)."),
    data_dir: Path = typer.Option(Path(".prsmed"), "--data-dir", help="Adapters, datasets, jobs and their database."),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda, cuda:1, ..."),
    token_file: Optional[Path] = typer.Option(None, "--token-file",
                                              help="File with the API token (else $PRSMED_API_TOKEN; none: open)."),
    public_predict: bool = typer.Option(False, "--public-predict", help="Leave POST /v1/predict open to all."),
    allow_unauthenticated: bool = typer.Option(False, "--allow-unauthenticated", help="Serve on an interface other "
                                               "than loopback without a token (refused otherwise)."),
    max_queue: int = typer.Option(8, "--max-queue", help="Fine-tuning jobs that may wait; more get 429."),
    job_threads: Optional[int] = typer.Option(None, "--job-threads", help="CPU threads per training job."),
) -> None:
    """Start the service: REST on --port, gRPC on --grpc-port, fine-tuning jobs, on one warm model."""
    from prsmed.extras import MissingExtra, require

    try:
        require("serve")
        from prsmed_service.config import ServiceConfig
        from prsmed_service.launcher import RefusedToServe
        from prsmed_service.launcher import serve as launch
    except MissingExtra as e:
        _fail(str(e))
    except ImportError as e:
        _fail(f"the service cannot start ({e}); install it with pip install 'prsmed[serve]' and the SDK beside it "
              f"(in a checkout: pip install -e ./sdk -e '.[serve]', or make serve)")
    if token_file is not None and not token_file.is_file():
        _fail(f"--token-file {token_file} does not exist")
    from pydantic import ValidationError

    try:
        launch(ServiceConfig(model=model, host=host, port=port, grpc_port=grpc_port, data_dir=data_dir,
                             device=device, token_file=token_file, public_predict=public_predict,
                             allow_unauthenticated=allow_unauthenticated, max_queue=max_queue,
                             job_threads=job_threads))
    except RefusedToServe as e:
        _fail(str(e))
    except ValidationError as e:
        from prsmed.validation import validation_problems

        _fail(f"invalid service setting (a --option or a PRSMED_SERVE_* variable): {validation_problems(e)}")
    except ValueError as e:  # an empty token file
        _fail(str(e))


@app.command("push")
def push_command(
    bundle: Path = typer.Argument(..., help="Adapter bundle directory (e.g. RUN/adapter)."),
    repo_id: str = typer.Argument(..., help="Hub model repository, owner/name."),
    private: bool = typer.Option(False, "--private", help="Create the repository private."),
    revision: Optional[str] = typer.Option(None, "--revision", help="Branch to commit to (created from main)."),
    commit_message: Optional[str] = typer.Option(None, "--commit-message", help="Commit message."),
) -> None:
    """Upload an adapter bundle to the Hugging Face Hub (token: HF_TOKEN or the saved login; never printed)."""
    from prsmed.hub import HubError, push
    from prsmed.model.bundle import BundleError

    try:
        out = push(bundle, repo_id, private=private, revision=revision, commit_message=commit_message)
    except (HubError, BundleError, ValueError) as e:
        _fail(str(e), 1)
    console.print(f"pushed {bundle} to {out['repo_id']}@{out['revision']} (commit {out['commit'][:12]}): {out['url']}")


@app.command("pull")
def pull_command(
    ref: str = typer.Argument(..., help="owner/name[@revision] or hf://owner/name[@revision]."),
    to: Optional[Path] = typer.Option(None, "--to", help="Install the bundle here instead of the adapter store."),
    store: Path = typer.Option(Path(".prsmed/adapters"), "--adapter-dir", "--store",
                               help="The adapter store, as prsmed predict and prsmed demo name it."),
    model: Optional[str] = typer.Option(None, "--model", help="Refuse an adapter made for another base model."),
    force: bool = typer.Option(False, "--overwrite", "--force",
                               help="Download again and replace the installed copy."),
    allow_other_base_weights: bool = typer.Option(
        False, "--allow-other-base-weights", help="Install an adapter trained on other base weights, or written "
        "before they were recorded (loading it then needs the same flag)."),
) -> None:
    """Download an adapter from the Hub, verify every file and the base model, and install it."""
    from prsmed.hub import HubError, HubRef, pull
    from prsmed.model.bundle import BundleError

    try:
        hub_ref = HubRef.parse(ref)
        dest = pull(hub_ref, to or store / hub_ref.store_name, expect_model=model, force=force,
                    allow_other_base_weights=allow_other_base_weights)
    except (HubError, BundleError, ValueError) as e:
        _fail(str(e), 1)
    source = dest / "hub_source.json"
    commit = json.loads(source.read_text()).get("commit", "")[:12] if source.is_file() else ""
    console.print(f"installed {hub_ref} (commit {commit}) at {dest}; use it as --adapter {dest.name if to is None else dest}")


@app.command("demo")
def demo(
    url: Optional[str] = typer.Option(None, "--url", help="A running server (prsmed serve); else a model in-process."),
    token: Optional[str] = typer.Option(None, "--token", envvar="PRSMED_API_TOKEN", show_envvar=True,
                                        help="The server's API token (with --url)."),
    model: str = typer.Option("prsmed-tiny", "--model", help="Zoo preset, in-process mode."),
    adapter_dir: Path = typer.Option(Path(".prsmed/adapters"), "--adapter-dir", help="Adapters, in-process mode."),
    device: str = typer.Option("cpu", "--device", help="In-process mode: cpu, cuda, ..."),
    host: str = typer.Option("127.0.0.1", "--host", help="Interface for the demo page."),
    port: int = typer.Option(7860, "--port", help="Port for the demo page."),
) -> None:
    """The Gradio demo alone: against a server through the SDK (--url; fine-tuning included), or on a model in this
    process (asking only). A server already shows the same demo at /ui."""
    import os

    from prsmed.extras import MissingExtra, require

    try:
        require("demo")
    except MissingExtra as e:
        _fail(str(e))
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    from prsmed_demo import ClientBackend, LocalBackend, build_demo

    if url:
        from prsmed_sdk import Client

        client = Client(url, token=token)
        if not client.ready():
            _fail(f"no ready PRS-Med server at {url}; start one with `prsmed serve` (or drop --url)")
        backend = ClientBackend(client)
    else:
        from prsmed.infer import Predictor

        backend = LocalBackend(Predictor(model, device=device, adapter_dir=adapter_dir), model)
    console.print(f"demo on http://{host}:{port} ({backend.describe()})")
    build_demo(backend).launch(server_name=host, server_port=port, show_error=True, footer_links=[])


def main() -> None:
    try:
        app()
    except ComponentError as e:  # a clear message, not a traceback
        Console(stderr=True).print(f"[red]error:[/red] {e}", highlight=False)
        sys.exit(2)


if __name__ == "__main__":
    main()
