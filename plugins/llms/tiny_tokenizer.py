"""The tiny tokenizer shipped with ``prsmed-tiny``: how it is made.

A Llama-style byte-fallback BPE (``▁`` marks a word start, unknown characters fall back to ``<0xNN>`` byte tokens)
with 1,024 entries, trained with the ``tokenizers`` library on position question/answer text generated below and on
the position vocabulary of reports (prsmed.data.vocabulary), so that words such as "superior", "aspect" or
"noted" are whole tokens a fine-tuned model can produce, not spelt out byte by byte (768 entries before revision
7 of the tiny weights, which spelt them out). Its
special ids follow LLaVA-Med's tokenizer: ``<unk>``=0 (also the pad), ``<s>``=1, ``</s>``=2, plus ``<image>``=3.

The shipped files under ``assets/tiny-tokenizer/`` are exactly what :func:`write_tiny_tokenizer` writes; the test
suite regenerates them and compares bytes. To rebuild them after changing the recipe::

    python -m prsmed_plugins.llms.tiny_tokenizer
"""

from __future__ import annotations

import itertools
import json
import string
from pathlib import Path

from prsmed.data.vocabulary import corpus_lines

UNK, BOS, EOS, IMAGE = "<unk>", "<s>", "</s>", "<image>"
SPECIAL_TOKENS = (UNK, BOS, EOS, IMAGE)
BYTE_TOKENS = tuple(f"<0x{i:02X}>" for i in range(256))
# 4 special + 256 byte tokens + 764 learned pieces; the tiny LLaVA preset's vocabulary has exactly this size.
VOCAB_SIZE = 1024
MODEL_MAX_LENGTH = 2048
TINY_TOKENIZER_DIR = Path(__file__).resolve().parent / "assets" / "tiny-tokenizer"
FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")

MODALITIES = ("CT", "MRI", "X-ray", "ultrasound", "endoscopy", "dermoscopy", "RGB", "colonoscopy", "mammography")
TARGETS = (
    "tumour", "tumor", "lesion", "polyp", "nodule", "mass", "abnormality", "cyst", "growth", "opacity",
    "infection", "region of interest",
)
ORGANS = ("brain", "breast", "lung", "chest", "skin", "colon", "liver", "kidney", "head", "abdomen")
ZONES = (
    "top left", "top right", "bottom left", "bottom right", "center", "centre", "upper left", "upper right",
    "lower left", "lower right", "left side", "right side", "middle",
)
NEARNESS = (
    "", ", near the center", ", close to the centre", ", far from the center", ", towards the edge",
    ", near the border", ", slightly off centre",
)
QUESTIONS = (
    "where is the {t} in this {m} scan?",
    "where is the {t} located in this {m} image?",
    "In this {m} scan, where can the {t} be seen?",
    "Which quadrant of this {m} image contains the {t}?",
    "Is a {t} visible in this {m}, and where?",
    "Identify the location of the {t} in this {m} image.",
    "Describe the position of the {t} in this {m} picture.",
    "Give the anatomical location of the {t} in this {m} of the {o}.",
    "Based on this image, provide the location of the {t}.",
    "Where is it located in the {m} of the {o}?",
    "Can you tell me where the {t} appears on this {m}?",
    "Please point out the {t} in the {o} {m}.",
    "What part of the {m} image shows the {t}?",
    "Locate the {t} in this {o} {m} slice.",
    "Looking at this {m}, which area has the {t}?",
    "Find the {t} and describe where it lies in the {m}.",
    "Which region of the {o} shows a {t} on this {m}?",
    "How would you describe the position of the {t}?",
    "Segment the {t} in this {m} and say where it is.",
    "Does this {m} of the {o} show a {t}? Where?",
)
ANSWERS = (
    "The {t} is in the {z} of the image{n}.",
    "It can be seen in the {z} area of the image{n}.",
    "The {z} quadrant contains the {t}{n}.",
    "Yes, the {t} lies in the {z} portion{n}.",
    "The {t} appears in the {z} region of the {o}{n}.",
    "It is located at the {z}{n}.",
    "There is a {t} in the {z} part of the scan{n}.",
    "The {t} is found in the {z}, and another in the {y}.",
    "One {t} is in the {z} and one is in the {y}.",
    "The {t} occupies the {z} of the {m} image{n}.",
    "You can see it in the {z}{n}.",
    "The abnormal area is at the {z} of the picture{n}.",
)
PROMPT_PHRASES = (
    "<image>\n### User: As a doctor, and you are seeing the image, {q}\n### Assistant: \n{a}",
    "<image>\n### User: {q} \n### Assistant: \n{a}",
    "### User: {q}\n### Assistant: {a}",
)
EXTRA_TEXT = (
    "The image shows no clear abnormality.",
    "No tumour is visible in this scan.",
    "The mask covers the lesion and its margin.",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 12 16 20 25 32 50 64 100 256 336 1024.",
    "Left, right, top, bottom, upper, lower, inner, outer, medial, lateral, anterior, posterior.",
    "Small, large, round, irregular, bright, dark, single, multiple, two, three.",
    "Patient, doctor, radiologist, report, finding, diagnosis, segmentation, mask, answer, question.",
)


def corpus() -> list[str]:
    """The training text, generated deterministically (no randomness, fixed order)."""
    lines: list[str] = []
    for i, (q, m, t) in enumerate(itertools.product(QUESTIONS, MODALITIES, TARGETS)):
        lines.append(q.format(t=t, m=m, o=ORGANS[i % len(ORGANS)]))
    for i, (a, z, n) in enumerate(itertools.product(ANSWERS, ZONES, NEARNESS)):
        lines.append(
            a.format(
                t=TARGETS[i % len(TARGETS)], z=z, n=n, o=ORGANS[i % len(ORGANS)],
                m=MODALITIES[i % len(MODALITIES)], y=ZONES[(i + 3) % len(ZONES)],
            )
        )
    for i, p in enumerate(PROMPT_PHRASES * 40):
        q = QUESTIONS[i % len(QUESTIONS)].format(t=TARGETS[i % 7], m=MODALITIES[i % 9], o=ORGANS[i % 10])
        a = ANSWERS[i % len(ANSWERS)].format(
            t=TARGETS[i % 5], z=ZONES[i % 13], n=NEARNESS[i % 7], o=ORGANS[i % 10], m=MODALITIES[i % 9],
            y=ZONES[(i + 5) % 13],
        )
        lines.append(p.format(q=q, a=a))
    lines.extend(EXTRA_TEXT * 5)
    lines.extend(corpus_lines())
    return lines


def build_tokenizer():
    """Train the BPE and lay its vocabulary out as ``specials, <0x00>..<0xFF>, learned pieces``."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    draft = Tokenizer(models.BPE(unk_token=UNK))
    draft.pre_tokenizer = pre_tokenizer
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE - len(BYTE_TOKENS),
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=list(string.ascii_letters + string.digits + string.punctuation),
        show_progress=False,
    )
    draft.train_from_iterator(corpus(), trainer=trainer)
    trained = json.loads(draft.to_str())["model"]

    vocab: dict[str, int] = {}
    for token in (*SPECIAL_TOKENS, *BYTE_TOKENS):
        vocab[token] = len(vocab)
    for token, _ in sorted(trained["vocab"].items(), key=lambda kv: kv[1]):
        if token not in vocab:
            vocab[token] = len(vocab)
    if len(vocab) != VOCAB_SIZE:
        raise RuntimeError(f"the tiny tokenizer recipe produced {len(vocab)} entries, expected {VOCAB_SIZE}")
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in trained["merges"]]

    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=UNK, byte_fallback=True, fuse_unk=True))
    tok.pre_tokenizer = pre_tokenizer
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, 1)]
    )
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    return tok


def _config_files() -> dict[str, dict]:
    special_map = {
        "bos_token": BOS, "eos_token": EOS, "unk_token": UNK, "pad_token": UNK,
        "additional_special_tokens": [IMAGE],
    }
    config = {
        **special_map,
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": MODEL_MAX_LENGTH,
        "padding_side": "right",
        "clean_up_tokenization_spaces": False,
    }
    return {"tokenizer_config.json": config, "special_tokens_map.json": special_map}


def write_tiny_tokenizer(out_dir: str | Path) -> Path:
    """Write ``tokenizer.json``, ``tokenizer_config.json`` and ``special_tokens_map.json`` into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    build_tokenizer().save(str(out / "tokenizer.json"), pretty=True)
    for name, content in _config_files().items():
        (out / name).write_text(json.dumps(content, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return out


def load_tiny_tokenizer():
    """The shipped tiny tokenizer as a transformers fast tokenizer (offline)."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(str(TINY_TOKENIZER_DIR), local_files_only=True)


if __name__ == "__main__":
    print(write_tiny_tokenizer(TINY_TOKENIZER_DIR))
