"""The demo's Gradio Blocks: **Ask**, **Fine-tune** and **Adapters** tabs over a :mod:`.backends` backend.

Every handler takes plain values and returns plain values, so ``gradio_client`` can call each one by its API name
(``/ask``, ``/start_job``, ``/job_status``, ``/cancel_job``, ``/list_adapters``, ``/load_adapter``,
``/pull_adapter``, ``/push_adapter``).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import gradio as gr
import numpy as np
from PIL import Image

from .backends import Backend

EXAMPLES = Path(__file__).parent / "examples"
BASE = "(base model)"
QUESTIONS = [
    "Where is the lesion in this image?",
    "Which part of the image contains the abnormality?",
    "Can you tell me the location of the tumour?",
    "Where is the polyp located?",
]


SCAN_TYPES = [".dcm", ".dicom", ".nii", ".nii.gz", ".gz"]


def example_images() -> list[str]:
    return sorted(str(p) for p in EXAMPLES.glob("*.png"))


def read_scan(scan, slice_: str | None) -> np.ndarray:
    """The RGB slice of a DICOM or NIfTI upload the model will see (``slice_``: "z=42", "frame=3"; empty for the
    reader's default, the middle slice or the first frame)."""
    from prsmed.data.readers import ImageReadError, read_image

    path = scan if isinstance(scan, str) else scan.name
    choice = (slice_ or "").strip()
    try:
        return np.asarray(read_image(f"{path}#{choice}" if choice else path))
    except (ImageReadError, OSError) as e:
        raise gr.Error(str(e)) from e


def overlay(image: np.ndarray, mask: np.ndarray, color=(255, 64, 32), alpha: float = 0.45) -> np.ndarray:
    from prsmed.infer.postprocess import overlay as draw

    return np.asarray(draw(Image.fromarray(image), mask, color=color, alpha=alpha))


def agreement_text(result) -> str:
    said = ", ".join(result.zones_from_text) or "no zone"
    seen = ", ".join(result.zones) or "no lesion"
    if result.consistent:
        return f"yes: the answer and the mask both say {seen}"
    return f"no: the answer says {said}, the mask shows {seen}"


def _rgb(image: np.ndarray) -> np.ndarray:
    if image.ndim == 2:
        return np.stack([image] * 3, axis=-1)
    return image[..., :3]


def build_demo(backend: Backend | Callable[[], Backend], *, title: str = "PRS-Med") -> gr.Blocks:
    """The Blocks app. ``backend`` may be a callable returning it, for a service whose model loads later."""
    get = backend if callable(backend) and not hasattr(backend, "predict") else (lambda: backend)

    def ask(image, question, adapter, scan=None, slice_=""):
        if scan is not None:  # a DICOM or NIfTI file is asked about in place of the picture
            image = read_scan(scan, slice_)
        if image is None:
            raise gr.Error("Upload an image, a DICOM or NIfTI file, or pick an example first.")
        if not question or not question.strip():
            raise gr.Error("Type a question.")
        t0 = time.perf_counter()
        try:
            result = get().predict(image, question, None if adapter in (None, "", BASE) else adapter)
        except Exception as e:  # the backend's message says what was wrong with the input; show it, keep the page
            raise gr.Error(str(e)) from e
        timings = {k: round(v, 1) for k, v in result.timings_ms.items()}
        timings["round_trip"] = round((time.perf_counter() - t0) * 1000, 1)
        shown = overlay(_rgb(np.asarray(image)), np.asarray(result.mask, dtype=bool))
        return shown, result.answer, result.zone, agreement_text(result), timings

    def adapter_names():
        try:
            return [BASE] + [a["name"] for a in get().adapters()]
        except Exception:
            return [BASE]

    def refresh_adapters():
        return gr.update(choices=adapter_names())

    def list_adapters():
        rows = [[a["name"], a["base_model"], a.get("created_at", ""), "yes" if a.get("resident") else "",
                 ", ".join(f"{k} {v:.3f}" for k, v in (a.get("metrics") or {}).items() if isinstance(v, float))]
                for a in get().adapters()]
        return rows

    def load_adapter(name):
        if not name:
            raise gr.Error("Type an adapter name.")
        try:
            info = get().load_adapter(name.strip())
        except Exception as e:
            raise gr.Error(str(e)) from e
        return f"Loaded {info['name']} (base {info['base_model']}).", list_adapters()

    def pull_adapter(ref, hf_token):
        if not ref or not ref.strip():
            raise gr.Error("Type a Hub reference: owner/name or owner/name@revision.")
        try:
            info = get().pull(ref.strip(), hf_token or None)
        except Exception as e:
            raise gr.Error(str(e)) from e
        return f"Pulled {ref.strip()} as **{info['name']}** (verified; base {info['base_model']}).", list_adapters()

    def push_adapter(name, repo_id, private, hf_token):
        if not name or not repo_id:
            raise gr.Error("Type the adapter's name and the Hub repository (owner/name).")
        try:
            out = get().push(name.strip(), repo_id.strip(), bool(private), hf_token or None)
        except Exception as e:
            raise gr.Error(str(e)) from e
        return f"Pushed {name.strip()} to {out['repo_id']}@{out['revision']} (commit {out['commit'][:12]})."

    def plan(model, precision, batch_size, grad_ckpt, epochs, dataset_size):
        options = {"model": model, "precision": precision, "grad_checkpointing": bool(grad_ckpt),
                   "epochs": int(epochs), "dataset_size": int(dataset_size)}
        if batch_size:
            options["batch_size"] = int(batch_size)
        try:
            report = get().plan(options)
        except Exception as e:
            raise gr.Error(str(e)) from e
        return _plan_summary(report), _plan_rows(report)

    def start_job(dataset, epochs, lr, name):
        if not getattr(get(), "can_finetune", False):
            raise gr.Error("Fine-tuning needs a server: start `prsmed serve` and open its /ui, or run "
                           "`prsmed demo --url URL`.")
        if dataset is None:
            raise gr.Error("Upload a dataset zip (the authors' layout or a manifest.jsonl).")
        path = dataset if isinstance(dataset, str) else dataset.name
        try:
            job = get().start_job(path, int(epochs), float(lr), name or None)
        except Exception as e:
            raise gr.Error(str(e)) from e
        return job["id"], _status(job), _empty_curve(), []

    def job_status(job_id, points):
        """The job's state line and its loss curve; ``points`` ([step, loss] pairs so far) lives in the session."""
        points = [tuple(p) for p in points or []]
        if not job_id:
            return gr.update(), gr.update(), points
        job = get().job(job_id)
        if job.get("loss") is not None and job.get("step") and (not points or points[-1][0] != job["step"]):
            points.append((job["step"], job["loss"]))
        return _status(job), _curve(points), points

    def cancel_job(job_id):
        if not job_id:
            raise gr.Error("No job to cancel.")
        return _status(get().cancel(job_id))

    with gr.Blocks(title=title) as demo:
        gr.Markdown(f"# {title}: where is the lesion?\nResearch use only; not for diagnosis.")
        with gr.Tab("Ask"):
            with gr.Row():
                with gr.Column():
                    image = gr.Image(type="numpy", label="Image", image_mode="RGB", elem_id="image")
                    with gr.Accordion("Or a DICOM or NIfTI file", open=False):
                        scan = gr.File(label="DICOM or NIfTI (asked about in place of the image)",
                                       file_types=SCAN_TYPES, elem_id="scan")
                        slice_ = gr.Textbox(value="", label="Slice or frame", elem_id="slice",
                                            placeholder="z=42 for a NIfTI slice, frame=3 for a DICOM frame; "
                                                        "empty: the middle slice, the first frame")
                    question = gr.Textbox(label="Question", value=QUESTIONS[0])
                    adapter = gr.Dropdown(label="Adapter", choices=[BASE], value=BASE, allow_custom_value=True)
                    with gr.Row():
                        ask_btn = gr.Button("Ask", variant="primary", elem_id="ask")
                        refresh = gr.Button("Refresh adapters")
                    gr.Examples(example_images(), inputs=image, label="Examples")
                    gr.Examples(QUESTIONS, inputs=question, label="Questions")
                with gr.Column():
                    shown = gr.Image(label="Mask over the image", elem_id="overlay", interactive=False, format="png")
                    answer = gr.Textbox(label="Answer", elem_id="answer")
                    zone = gr.Textbox(label="Zone of the mask")
                    agree = gr.Textbox(label="Do the answer and the mask agree?")
                    timings = gr.JSON(label="Timings (ms)")
            ask_btn.click(ask, [image, question, adapter, scan, slice_], [shown, answer, zone, agree, timings],
                          api_name="ask")
            refresh.click(refresh_adapters, None, adapter, api_name=False)
        with gr.Tab("Fine-tune"):
            with gr.Row():
                with gr.Column():
                    dataset = gr.File(label="Dataset zip", file_types=[".zip"])
                    epochs = gr.Number(label="Epochs", value=3, precision=0, minimum=1)
                    lr = gr.Number(label="Learning rate", value=1e-4)
                    name = gr.Textbox(label="Adapter name (optional)")
                    with gr.Row():
                        start = gr.Button("Start", variant="primary")
                        cancel = gr.Button("Cancel", variant="stop")
                with gr.Column():
                    job_id = gr.Textbox(label="Job", interactive=False)
                    status = gr.Markdown()
                    curve = gr.LinePlot(_empty_curve(), x="step", y="loss", label="Training loss")
            points = gr.State([])
            timer = gr.Timer(2.0)
            start.click(start_job, [dataset, epochs, lr, name], [job_id, status, curve, points], api_name="start_job")
            cancel.click(cancel_job, job_id, status, api_name="cancel_job")
            timer.tick(job_status, [job_id, points], [status, curve, points], api_name="job_status",
                       show_progress="hidden")
        with gr.Tab("Adapters"):
            table = gr.Dataframe(headers=["name", "base model", "created", "resident", "metrics"],
                                 interactive=False)
            with gr.Row():
                to_load = gr.Textbox(label="Adapter name")
                load_btn = gr.Button("Load")
                list_btn = gr.Button("Refresh")
            loaded = gr.Markdown()
            gr.Markdown("**Hugging Face Hub.** A token typed here is sent with that one request and not kept.")
            with gr.Row():
                hub_ref = gr.Textbox(label="Pull: owner/name[@revision]")
                hub_token = gr.Textbox(label="Hub token (private repositories)", type="password")
                pull_btn = gr.Button("Pull")
            with gr.Row():
                push_name = gr.Textbox(label="Push: adapter name")
                push_repo = gr.Textbox(label="to repository owner/name")
                push_private = gr.Checkbox(label="private", value=True)
                push_btn = gr.Button("Push")
            pushed = gr.Markdown()
            load_btn.click(load_adapter, to_load, [loaded, table], api_name="load_adapter")
            list_btn.click(list_adapters, None, table, api_name="list_adapters")
            pull_btn.click(pull_adapter, [hub_ref, hub_token], [loaded, table], api_name="pull_adapter")
            push_btn.click(push_adapter, [push_name, push_repo, push_private, hub_token], pushed,
                           api_name="push_adapter")
        with gr.Tab("Plan"):
            gr.Markdown("How much GPU memory a training run needs, which cloud GPU fits it and what it costs "
                        "(`prsmed plan`). The first plan of the 7B model simulates its step, about a minute.")
            with gr.Row():
                plan_model = gr.Dropdown(PLAN_MODELS, value=PLAN_MODELS[0], label="Model")
                plan_precision = gr.Dropdown(["bf16", "fp16", "fp32", "4bit"], value="bf16", label="Precision")
                plan_batch = gr.Number(value=8, precision=0, label="Effective batch")
                plan_ckpt = gr.Checkbox(label="Gradient checkpointing")
            with gr.Row():
                plan_epochs = gr.Number(value=20, precision=0, label="Epochs")
                plan_rows = gr.Number(value=21040, precision=0, label="Training rows")
                plan_btn = gr.Button("Plan", variant="primary")
            plan_summary = gr.Markdown()
            plan_table = gr.Dataframe(headers=PLAN_HEADERS, interactive=False)
            plan_btn.click(plan, [plan_model, plan_precision, plan_batch, plan_ckpt, plan_epochs, plan_rows],
                           [plan_summary, plan_table], api_name="plan")
        demo.load(refresh_adapters, None, adapter, api_name=False)
    return demo


PLAN_MODELS = ["prsmed-llava-med-7b", "prsmed-sam-vit-b", "prsmed-tiny"]
PLAN_HEADERS = ["platform", "GPU", "VRAM GB", "fits", "batch x accum", "GB", "hours", "$ on-demand", "$ spot", "notes"]


def _plan_summary(report: dict) -> str:
    m = report["memory_gb"]
    return (f"**{report['model']}**: training at batch {m['batch']} needs **{m['total']} GB** (frozen weights "
            f"{m['frozen_weights']}, trained + AdamW + gradients "
            f"{round(m['trained_weights'] + m['optimizer_states'] + m['gradients'], 3)}, activations "
            f"{m['activations_per_sample']}/sample, overhead {m['overhead']}); inference {m['inference']} GB.\n\n"
            f"{report['recommendation']}")


def _plan_rows(report: dict) -> list[list]:
    rows = []
    for r in report["rows"]:
        notes = r["why"] or ""
        rows.append([r["platform"] or "-", r["gpu_label"], r["vram_gb"], "yes" if r["fits"] else "no",
                     f"{r['recommended_batch']} x {r['grad_accum']}" if r["fits"] else "-", r["memory_gb"],
                     r["hours"], r["cost_usd"], r["cost_usd_spot"], notes])
    return rows


def _status(job: dict) -> str:
    parts = [f"**{job['state']}**", f"step {job.get('step', 0)}"
             + (f"/{job['total_steps']}" if job.get("total_steps") else "")]
    if job.get("loss") is not None:
        parts.append(f"loss {job['loss']:.4f}")
    if job.get("eta_s") is not None and job["state"] == "running":
        parts.append(f"ETA {int(job['eta_s'])} s")
    if job.get("adapter"):
        parts.append(f"adapter **{job['adapter']}** (pick it in the Ask tab)")
    if job.get("error"):
        parts.append(f"error: {job['error']}")
    return " · ".join(parts)


def _empty_curve():
    import pandas as pd

    return pd.DataFrame({"step": pd.Series(dtype="int64"), "loss": pd.Series(dtype="float64")})


def _curve(points):
    import pandas as pd

    return pd.DataFrame(points, columns=["step", "loss"]) if points else _empty_curve()
