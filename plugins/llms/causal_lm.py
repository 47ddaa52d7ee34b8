"""``llm/hf-causal-lm``: a text-only transformers causal LM (Mistral, Llama, Qwen2, ...) as a PRS-Med backbone.

This module also holds what every transformers-based backbone here shares (tokenising with answer-only labels,
the forward pass returning the final-norm hidden states and the LM loss, and the KV-cache decode loop);
:mod:`prsmed_plugins.llms.llava` builds on it.

A text-only backbone has no image path: ``encode`` ignores ``images`` and removes the ``<image>`` placeholder from
prompts, so one prompt template serves every backbone. Its contract says ``image_size=0, image_tokens=0``.
"""

from __future__ import annotations

import inspect
import logging
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal, Sequence

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict

from prsmed.components import ComponentError, ComponentSpec, LLMContract, parse_options
from prsmed.interfaces import LLMBackbone, LLMInputs, LLMOutput
from prsmed.weights import load_strict, read_state_dict

from .tiny_tokenizer import TINY_TOKENIZER_DIR, VOCAB_SIZE as TINY_VOCAB_SIZE

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
IMAGE_PLACEHOLDER = "<image>"
TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DType = Literal["float32", "bfloat16", "float16"]

# A regex (PEFT full-matches it against each module's name) for the decoder layers' attention projections. The
# leading ``.*`` lets it match inside a larger model too (the composite holds the backbone as a submodule).
CAUSAL_LM_LORA_TARGETS = r".*\bmodel\.layers\.\d+\.self_attn\.(q_proj|k_proj|v_proj|o_proj)"

TINY_CAUSAL_LM_CONFIG: dict[str, Any] = {
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": TINY_VOCAB_SIZE,
    "max_position_embeddings": 1024,
    "rms_norm_eps": 1e-5,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "tie_word_embeddings": False,
}


# options -----------------------------------------------------------------------------------------------------------
def one_source(component: str, **sources: Any) -> str | None:
    given = [name for name, value in sources.items() if value is not None]
    if len(given) > 1:
        raise ComponentError(f"{component}: give only one of {', '.join(sources)}; got {', '.join(given)}")
    return given[0] if given else None


def is_local(path: str) -> bool:
    return Path(path).expanduser().exists()


def local_files_only(path: str) -> bool:
    # A path that exists is read offline; anything else is a Hub id the user named explicitly.
    return is_local(path)


def check_pretrained(component: str, pretrained: str) -> None:
    """Refuse a missing local path early instead of letting it be tried as a Hub id."""
    looks_like_path = (
        Path(pretrained).is_absolute() or pretrained.startswith((".", "~")) or pretrained.count("/") > 1
        or "\\" in pretrained
    )
    if looks_like_path and not is_local(pretrained):
        raise ComponentError(
            f"{component}: pretrained={pretrained!r} does not exist; expected a local model directory "
            f"(config.json + weights) or a Hub id of the form owner/name"
        )


def load_checkpoint(module: torch.nn.Module, checkpoint: str | None) -> None:
    if checkpoint is not None:
        load_strict(module, read_state_dict(checkpoint), source=str(checkpoint))


# transformers compatibility ----------------------------------------------------------------------------------------
@lru_cache(maxsize=None)
def _cache_argument(forward_owner: type) -> str:
    # transformers 5.2x renamed ``past_key_values`` to ``cache``; accept both spellings.
    params = inspect.signature(forward_owner.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _output_cache(output: Any) -> Any:
    for name in ("cache", "past_key_values"):
        value = getattr(output, name, None)
        if value is not None:
            return value
    return None


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy averaged over the supervised (label != -100) positions, computed in float32."""
    shift_logits = logits[:, :-1].float()
    shift_labels = labels[:, 1:].to(logits.device)
    count = (shift_labels != IGNORE_INDEX).sum()
    if count == 0:
        return shift_logits.sum() * 0.0
    total = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1),
        ignore_index=IGNORE_INDEX, reduction="sum",
    )
    return total / count


def pick_next_token(
    logits: torch.Tensor, *, do_sample: bool, temperature: float, top_p: float, generator: torch.Generator | None
) -> torch.Tensor:
    logits = logits.float()
    if not do_sample:
        return logits.argmax(dim=-1)
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 when sampling, got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # Keep the smallest prefix whose mass reaches top_p; the most likely token always stays.
        drop = (sorted_probs.cumsum(dim=-1) - sorted_probs) >= top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


# the shared backbone -----------------------------------------------------------------------------------------------
class HFBackbone(LLMBackbone):
    """A transformers ``*ForCausalLM``-style model (``base_model`` + output embeddings) behind the PRS-Med interface.

    Subclasses with an image path override :meth:`_image_ids` and :meth:`preprocess_images`.
    """

    lora_target_modules = CAUSAL_LM_LORA_TARGETS

    def __init__(
        self, model: torch.nn.Module, contract: LLMContract, *, tokenizer_path: str | None, missing_tokenizer: str
    ) -> None:
        super().__init__()
        self.model = model
        self.contract = contract
        self._tokenizer = None
        self._tokenizer_path = tokenizer_path
        self._missing_tokenizer = missing_tokenizer

    def output_layer(self) -> torch.nn.Module | None:
        return self.model.get_output_embeddings()

    def text_model(self) -> torch.nn.Module | None:
        getter = getattr(self.model, "get_decoder", None)
        return getter() if callable(getter) else None

    # tokenizer ----------------------------------------------------------------------------------------------------
    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = self._load_tokenizer()
        return self._tokenizer

    def _load_tokenizer(self):
        if self._tokenizer_path is None:
            raise ComponentError(self._missing_tokenizer)
        from transformers import AutoTokenizer

        path = self._tokenizer_path
        try:
            tok = AutoTokenizer.from_pretrained(path, local_files_only=local_files_only(path))
        except (OSError, ValueError) as e:
            raise ComponentError(
                f"could not load a tokenizer from {path} ({str(e).splitlines()[0]}); expected a directory with "
                f"tokenizer.json (or tokenizer.model) and tokenizer_config.json. {self._missing_tokenizer}"
            ) from e
        if len(tok) > self.contract.vocab_size:
            raise ComponentError(
                f"the tokenizer at {path} has {len(tok)} tokens but the model's vocabulary has only "
                f"{self.contract.vocab_size} rows; is it the tokenizer of another model?"
            )
        if tok.eos_token_id is None:
            raise ComponentError(f"the tokenizer at {path} has no EOS token; answers and generation need one")
        return tok

    @property
    def pad_token_id(self) -> int:
        tok = self.tokenizer
        for candidate in (tok.pad_token_id, tok.unk_token_id, tok.eos_token_id):
            if candidate is not None:
                return int(candidate)
        return 0

    def eos_token_ids(self) -> set[int]:
        ids = {int(self.tokenizer.eos_token_id)}
        extra = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        if isinstance(extra, int):
            ids.add(extra)
        elif isinstance(extra, (list, tuple)):
            ids.update(int(i) for i in extra)
        return ids

    # image path (none here) ---------------------------------------------------------------------------------------
    def _image_ids(self) -> list[int] | None:
        """Token ids that stand for one image in the sequence, or None for a text-only backbone."""
        return None

    def preprocess_images(self, images: Sequence[Any]) -> torch.Tensor | None:
        return None

    # encode -------------------------------------------------------------------------------------------------------
    def _prompt_ids(self, prompt: str) -> list[int]:
        tok = self.tokenizer
        ids: list[int] = [] if tok.bos_token_id is None else [int(tok.bos_token_id)]
        image_ids = self._image_ids()
        pieces = prompt.split(IMAGE_PLACEHOLDER)
        for i, piece in enumerate(pieces):
            if i > 0 and image_ids is not None:
                ids.extend(image_ids)
            # Each text piece is tokenised on its own, as LLaVA does around its image sentinel.
            if piece:
                ids.extend(tok.encode(piece, add_special_tokens=False))
        return ids

    def encode(
        self,
        prompts: Sequence[str],
        images: Sequence[Any] | None = None,
        answers: Sequence[str] | None = None,
        *,
        padding_side: str = "right",
    ) -> LLMInputs:
        if isinstance(prompts, str):
            raise TypeError("prompts must be a sequence of strings, not a single string")
        if len(prompts) == 0:
            raise ValueError("encode needs at least one prompt")
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        if answers is not None and len(answers) != len(prompts):
            raise ValueError(f"got {len(prompts)} prompts but {len(answers)} answers")
        has_image_path = self._image_ids() is not None
        if has_image_path:
            self._check_placeholders(prompts, images)
        pixel_values = self.preprocess_images(images) if (has_image_path and images is not None) else None

        eos = int(self.tokenizer.eos_token_id)
        rows: list[tuple[list[int], list[int]]] = []
        for i, prompt in enumerate(prompts):
            ids = self._prompt_ids(prompt)
            labels = [IGNORE_INDEX] * len(ids)
            if answers is not None:
                answer_ids = self.tokenizer.encode(answers[i], add_special_tokens=False) + [eos]
                ids = ids + answer_ids
                labels = labels + answer_ids
            rows.append((ids, labels))

        length = max(len(ids) for ids, _ in rows)
        pad = self.pad_token_id
        input_ids = torch.full((len(rows), length), pad, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
        label_tensor = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long)
        for r, (ids, labels) in enumerate(rows):
            span = slice(length - len(ids), length) if padding_side == "left" else slice(0, len(ids))
            input_ids[r, span] = torch.tensor(ids, dtype=torch.long)
            attention_mask[r, span] = 1
            label_tensor[r, span] = torch.tensor(labels, dtype=torch.long)
        return LLMInputs(
            input_ids=input_ids,
            attention_mask=attention_mask,
            pixel_values=pixel_values,
            labels=label_tensor if answers is not None else None,
        )

    def _check_placeholders(self, prompts: Sequence[str], images: Sequence[Any] | None) -> None:
        counts = [p.count(IMAGE_PLACEHOLDER) for p in prompts]
        if images is None:
            if any(counts):
                raise ValueError(
                    f"prompts contain the {IMAGE_PLACEHOLDER} placeholder but no images were given; pass one image "
                    f"per prompt or remove the placeholder"
                )
            return
        if len(images) != len(prompts):
            raise ValueError(f"got {len(prompts)} prompts but {len(images)} images; give one image per prompt")
        wrong = [i for i, c in enumerate(counts) if c != 1]
        if wrong:
            raise ValueError(
                f"each prompt must contain the {IMAGE_PLACEHOLDER} placeholder exactly once when images are given; "
                f"prompt {wrong[0]} has it {counts[wrong[0]]} times"
            )

    # forward ------------------------------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.model.get_input_embeddings().weight.device

    def _run(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        *,
        pixel_values: torch.Tensor | None = None,
        cache: Any = None,
        use_cache: bool = False,
    ) -> tuple[torch.Tensor, Any]:
        """One pass of the base model: (final-norm hidden states, cache)."""
        core = self.model.base_model
        kwargs: dict[str, Any] = {
            "input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids,
            "use_cache": use_cache,
        }
        if pixel_values is not None:
            kwargs["pixel_values"] = pixel_values
        if cache is not None:
            kwargs[_cache_argument(type(core))] = cache
        out = core(**kwargs)
        return out.last_hidden_state, (_output_cache(out) if use_cache else None)

    def forward(self, inputs: LLMInputs, *, use_cache: bool = False) -> LLMOutput:  # type: ignore[override]
        device = self.device
        input_ids = inputs.input_ids.to(device)
        attention_mask = inputs.attention_mask.to(device)
        # Positions count real tokens only, so a left-padded row starts at 0 as in transformers' generate.
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        pixel_values = None
        if inputs.pixel_values is not None:
            pixel_values = inputs.pixel_values.to(device=device, dtype=self._pixel_dtype())
        hidden, cache = self._run(
            input_ids, attention_mask, position_ids, pixel_values=pixel_values, use_cache=use_cache
        )
        logits = self.model.get_output_embeddings()(hidden)
        loss = causal_lm_loss(logits, inputs.labels) if inputs.labels is not None else None
        return LLMOutput(
            hidden_states=hidden, attention_mask=attention_mask, logits=logits, loss=loss, past_key_values=cache
        )

    def _pixel_dtype(self) -> torch.dtype:
        return self.model.get_input_embeddings().weight.dtype

    # generation ---------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate_from(
        self,
        prefill: LLMOutput,
        *,
        max_new_tokens: int = 64,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        generator: torch.Generator | None = None,
    ) -> list[str]:
        """Decode from ``prefill`` (``forward(inputs, use_cache=True)``) and return the answers as text."""
        rows = self.generate_tokens_from(
            prefill, max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature, top_p=top_p,
            generator=generator,
        )
        return [self.tokenizer.decode(row, skip_special_tokens=True) for row in rows]

    @torch.no_grad()
    def generate_tokens_from(
        self,
        prefill: LLMOutput,
        *,
        max_new_tokens: int = 64,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        generator: torch.Generator | None = None,
    ) -> list[list[int]]:
        """The token ids :meth:`generate_from` decodes: per row, the new tokens up to (not including) EOS.

        The first token comes from the prefill's last logits; each later one is one cached step, so the prompt is
        never re-run. The prefill's KV cache is extended in place and so consumed: ``prefill.past_key_values`` is
        set to None, and generating again needs a new prefill. Left padding is what transformers' ``generate``
        uses; a right-padded prefill works too, since positions and the mask skip the padding. A ``generator``
        for sampling must live on the model's device.
        """
        if prefill.past_key_values is None:
            raise ValueError(
                "the prefill has no KV cache: run forward(inputs, use_cache=True) first (a prefill's cache is "
                "consumed by generation, so each generation needs its own prefill)"
            )
        if prefill.logits is None:
            raise ValueError("the prefill has no logits; it must come from this backbone's forward()")
        cache, prefill.past_key_values = prefill.past_key_values, None
        mask = prefill.attention_mask.long()
        batch, length = mask.shape
        last = length - 1 - mask.flip(1).argmax(dim=1)
        next_logits = prefill.logits[torch.arange(batch, device=mask.device), last]
        positions = mask.sum(dim=1)
        eos_ids = torch.tensor(sorted(self.eos_token_ids()), device=mask.device)
        pad = self.pad_token_id
        done = torch.zeros(batch, dtype=torch.bool, device=mask.device)
        steps: list[torch.Tensor] = []
        head = self.model.get_output_embeddings()
        for step in range(max_new_tokens):
            token = pick_next_token(
                next_logits, do_sample=do_sample, temperature=temperature, top_p=top_p, generator=generator
            )
            # Finished rows keep receiving the pad token, as in transformers' generate; they are cut below.
            token = torch.where(done, torch.full_like(token, pad), token)
            steps.append(token)
            done = done | torch.isin(token, eos_ids)
            if bool(done.all()) or step == max_new_tokens - 1:
                break
            mask = torch.cat([mask, mask.new_ones(batch, 1)], dim=1)
            hidden, cache = self._run(token[:, None], mask, positions[:, None], cache=cache, use_cache=True)
            positions = positions + 1
            next_logits = head(hidden[:, -1])
        if not steps:
            return [[] for _ in range(batch)]
        eos = set(eos_ids.tolist())
        rows = []
        for row in torch.stack(steps, dim=1).tolist():
            cut = next((i for i, t in enumerate(row) if t in eos), len(row))
            rows.append(row[:cut])
        return rows


# llm/hf-causal-lm --------------------------------------------------------------------------------------------------
class CausalLMOptions(BaseModel):
    """Options of ``llm/hf-causal-lm``."""

    model_config = ConfigDict(extra="forbid")

    pretrained: str | None = None
    config: dict[str, Any] | None = None
    model_type: str | None = None
    preset: Literal["tiny"] | None = None
    dtype: DType = "float32"
    checkpoint: str | None = None
    tokenizer: str | None = None


COMPONENT = "llm/hf-causal-lm"


def _options(options: dict[str, Any]) -> CausalLMOptions:
    opts = parse_options(COMPONENT, CausalLMOptions, options)
    source = one_source(COMPONENT, pretrained=opts.pretrained, config=opts.config, preset=opts.preset)
    if source is None:
        opts = opts.model_copy(update={"preset": "tiny"})
    if opts.model_type is not None and opts.config is None:
        raise ComponentError(f"{COMPONENT}: model_type only applies with config=...; got model_type without config")
    if opts.config is not None and opts.model_type is None and "model_type" not in opts.config:
        raise ComponentError(
            f"{COMPONENT}: config=... needs model_type (e.g. 'mistral', 'llama', 'qwen2'), as an option or a key"
        )
    return opts


def _hf_config(opts: CausalLMOptions):
    from transformers import AutoConfig

    if opts.pretrained is not None:
        check_pretrained(COMPONENT, opts.pretrained)
        try:
            return AutoConfig.from_pretrained(opts.pretrained, local_files_only=local_files_only(opts.pretrained))
        except (OSError, ValueError) as e:
            raise ComponentError(
                f"{COMPONENT}: cannot read a model config from pretrained={opts.pretrained!r} "
                f"({str(e).splitlines()[0]})"
            ) from e
    raw = dict(TINY_CAUSAL_LM_CONFIG) if opts.preset == "tiny" else dict(opts.config or {})
    model_type = opts.model_type or raw.pop("model_type")
    raw.pop("model_type", None)
    try:
        return AutoConfig.for_model(model_type, **raw)
    except (ValueError, TypeError, KeyError) as e:
        raise ComponentError(f"{COMPONENT}: invalid config for model_type {model_type!r}: {e}") from e


def _contract_from(config: Any, dtype: str) -> LLMContract:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return LLMContract(dtype=dtype, hidden_size=int(text.hidden_size), vocab_size=int(text.vocab_size))


def causal_lm_contract(**options: Any) -> LLMContract:
    opts = _options(options)
    return _contract_from(_hf_config(opts), opts.dtype)


def build_causal_lm(**options: Any) -> "CausalLMBackbone":
    from transformers import AutoModelForCausalLM

    opts = _options(options)
    config = _hf_config(opts)
    contract = _contract_from(config, opts.dtype)
    dtype = TORCH_DTYPES[opts.dtype]
    if opts.pretrained is not None:
        try:
            model = AutoModelForCausalLM.from_pretrained(
                opts.pretrained, dtype=dtype, local_files_only=local_files_only(opts.pretrained)
            )
        except OSError as e:
            raise ComponentError(
                f"{COMPONENT}: cannot load weights from pretrained={opts.pretrained!r} ({str(e).splitlines()[0]}); "
                f"expected a transformers model directory (config.json + *.safetensors) or a Hub id"
            ) from e
    else:
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    if opts.tokenizer is not None:
        tokenizer_path: str | None = opts.tokenizer
    elif opts.pretrained is not None:
        tokenizer_path = opts.pretrained
    elif opts.preset == "tiny":
        tokenizer_path = str(TINY_TOKENIZER_DIR)
    else:
        tokenizer_path = None
    backbone = CausalLMBackbone(
        model, contract, tokenizer_path=tokenizer_path,
        missing_tokenizer=f"{COMPONENT} built from config=... has no tokenizer: pass tokenizer=PATH (a directory "
        f"with tokenizer.json), e.g. {TINY_TOKENIZER_DIR}",
    )
    load_checkpoint(backbone, opts.checkpoint)
    return backbone


class CausalLMBackbone(HFBackbone):
    """A text-only causal LM: images are ignored and ``<image>`` placeholders are removed from prompts."""

    def _prompt_ids(self, prompt: str) -> list[int]:
        return super()._prompt_ids(prompt.replace(IMAGE_PLACEHOLDER, ""))


SPEC = ComponentSpec(
    kind="llm",
    name="hf-causal-lm",
    build=build_causal_lm,
    contract=causal_lm_contract,
    description=(
        "a text-only transformers causal LM (Mistral, Llama, Qwen2, ...); no image path; options: "
        "pretrained, config + model_type, preset ('tiny'), dtype, checkpoint, tokenizer"
    ),
)
