"""``prsmed plan calibrate``: the planner's estimate against a measurement, configuration by configuration.

The configurations are small variants of prsmed-tiny (batch, precision, checkpointing, image size, text length, a
wider LLM), so each runs in seconds to a minute on two cores; ``--device cuda`` runs the same list on a GPU.
Time: the first configuration's measured step gives the machine's achieved FLOP/s; every other configuration's
step time is predicted from its FLOPs at that rate.
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass
from typing import Any

from prsmed.model.spec import ModelSpec
from prsmed.plan.estimate import CUDA_CONTEXT_GIB, GIB, Memory
from prsmed.plan.measure import measure
from prsmed.plan.simulate import simulate


@dataclass
class Config:
    name: str
    batch: int
    text_len: int = 40
    precision: str = "fp32"
    grad_checkpointing: bool = False
    image_size: int | None = None
    wide_llm: bool = False
    model: str = "prsmed-tiny"


CPU_CONFIGS = [
    Config("tiny b4", 4),
    Config("tiny b16", 16),
    Config("tiny b8 grad-ckpt", 8, grad_checkpointing=True),
    Config("tiny b8 bf16-autocast", 8, precision="bf16"),
    Config("tiny image-512 b4", 4, image_size=512),
    Config("tiny b8 text 160", 8, text_len=160),
    Config("wide-LLM b4", 4, wide_llm=True),
]


def config_spec(cfg: Config) -> ModelSpec:
    from prsmed.zoo import resolve_spec

    spec = resolve_spec(cfg.model, weights=False)
    if cfg.image_size is not None:
        spec.vision_encoder.options["img_size"] = cfg.image_size
    if cfg.wide_llm:
        # A text model 4x wider and twice as deep as the tiny one: another shape of LLM, with 9x its frozen weights.
        spec.llm.options = {**spec.llm.options, "text_config": {
            "hidden_size": 256, "intermediate_size": 1024, "num_hidden_layers": 4, "num_attention_heads": 8,
            "num_key_value_heads": 2}}
        spec.fusion_head.options["prompt_dim"] = 256
    return spec


def run(configs: list[Config] | None = None, *, device: str = "cpu", steps: int = 3) -> dict[str, Any]:
    configs = configs or CPU_CONFIGS
    results = []
    rate = None
    for cfg in configs:
        spec = config_spec(cfg)
        trace = simulate(spec, batch=cfg.batch, text_len=cfg.text_len, precision=cfg.precision,
                         grad_checkpointing=cfg.grad_checkpointing, device=device)
        memory = Memory.from_trace(trace, cfg.precision, device=device)
        # On a GPU the measurement is max_memory_allocated, which excludes the CUDA context; compare like with like.
        estimate = memory.total(cfg.batch) - (CUDA_CONTEXT_GIB * GIB if device == "cuda" else 0)
        measured = measure(spec, batch=cfg.batch, text_len=cfg.text_len, precision=cfg.precision,
                           grad_checkpointing=cfg.grad_checkpointing, steps=steps, device=device)
        step_s = statistics.median(measured["step_seconds"][1:] or measured["step_seconds"])
        flops = trace.flops_forward + trace.flops_backward
        if rate is None:
            rate = flops / step_s
        results.append({
            **asdict(cfg),
            "estimate_mib": round(estimate / 2**20, 1),
            "measured_mib": round(measured["peak_bytes"] / 2**20, 1),
            "measured_rss_mib": round(measured["peak_rss_bytes"] / 2**20, 1) if "peak_rss_bytes" in measured else None,
            "error_pct": round(100 * (estimate - measured["peak_bytes"]) / measured["peak_bytes"], 1),
            "parts_mib": {k: round(v * 1024, 1) for k, v in memory.parts_gib(cfg.batch).items()
                          if isinstance(v, float)},
            "flops_per_step": flops,
            "step_seconds": round(step_s, 3),
            "predicted_step_seconds": round(flops / rate, 3),
            "time_error_pct": round(100 * (flops / rate - step_s) / step_s, 1),
            "threads": measured["threads"],
        })
    return {"device": device, "achieved_gflops": round(rate / 1e9, 2) if rate else None, "configs": results}
