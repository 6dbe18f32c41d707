"""A byte-level BPE tokenizer trained locally (offline, deterministic) with ChatML specials.

Only the ``tokenizers`` library is used (no transformers import), so building is fast; the
files written are what ``transformers.AutoTokenizer`` (4.x and 5.x) and vLLM load.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tokenizers import Tokenizer

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>", "<|pad|>"]
# Like Qwen3: <think>/</think> are added tokens that decoding keeps (not "special").
NON_SPECIAL_ADDED = ("<think>", "</think>")
EOS_TOKEN = "<|im_end|>"
PAD_TOKEN = "<|pad|>"

# ChatML, as used by Qwen/SmolLM chat models. `add_generation_prompt` opens the assistant turn.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

_COMMON = [
    "the",
    "of",
    "and",
    "to",
    "in",
    "is",
    "you",
    "that",
    "it",
    "he",
    "was",
    "for",
    "on",
    "are",
    "as",
    "with",
    "his",
    "they",
    "at",
    "be",
    "this",
    "have",
    "from",
    "or",
    "one",
    "had",
    "by",
    "word",
    "but",
    "not",
    "what",
    "all",
    "were",
    "we",
    "when",
    "your",
    "can",
    "said",
    "there",
    "use",
    "an",
    "each",
    "which",
    "she",
    "do",
    "how",
    "their",
    "if",
    "will",
    "up",
    "other",
    "about",
    "out",
    "many",
    "then",
    "them",
    "these",
    "so",
    "some",
    "her",
    "would",
    "make",
    "like",
    "him",
    "into",
    "time",
    "has",
    "look",
    "two",
    "more",
    "write",
    "go",
    "see",
    "number",
    "no",
    "way",
    "could",
    "people",
    "my",
    "than",
    "first",
    "water",
    "been",
    "call",
    "who",
    "oil",
    "its",
    "now",
    "find",
    "long",
    "down",
    "day",
    "did",
    "get",
    "come",
    "made",
    "may",
    "part",
    "question",
    "answer",
    "model",
    "train",
    "loss",
    "weight",
    "token",
    "assistant",
    "user",
    "system",
    "hello",
    "world",
    "yes",
    "please",
    "thank",
    "paris",
    "france",
    "capital",
    "city",
    "learn",
    "data",
    "step",
    "rate",
    "value",
]
_SYLLABLES = [a + b for a in "bcdfghjklmnprstvwz" for b in "aeiou"] + ["th", "ch", "sh", "qu", "x"]


def _corpus(lines: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    n_words = max(200, lines // 2)
    invented = sorted({"".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(1, 4))) for _ in range(n_words)})
    words = _COMMON + invented
    out: list[str] = []
    for i in range(lines):
        sent = " ".join(rng.choice(words) for _ in range(rng.randint(3, 14)))
        if rng.random() < 0.3:
            sent = sent.capitalize()
        sent += rng.choice([".", "?", "!", ",", ":", ""])
        if rng.random() < 0.2:
            sent += f" {rng.randint(0, 10 ** rng.randint(1, 6))}"
        if i % 10 == 0:
            sent = f"<|im_start|>user\n{sent}<|im_end|>\n<|im_start|>assistant\n{sent[::-1]}<|im_end|>"
        out.append(sent)
    return out


def train_tokenizer(vocab_size: int, corpus_lines: int, seed: int) -> Tokenizer:
    """A ``tokenizers.Tokenizer``; special tokens get ids 0..5 in :data:`SPECIAL_TOKENS` order."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(corpus_lines, seed), trainer=trainer)
    spec = json.loads(tok.to_str())
    for added in spec["added_tokens"]:
        if added["content"] in NON_SPECIAL_ADDED:
            added["special"] = False
    return Tokenizer.from_str(json.dumps(spec))


def save_tokenizer(tok: Tokenizer, out_dir: Path, max_length: int) -> None:
    """Write ``tokenizer.json``, ``tokenizer_config.json`` and ``chat_template.jinja``."""
    out = Path(out_dir)
    tok.save(str(out / "tokenizer.json"))
    extra = ["<|endoftext|>", "<|im_start|>"]
    cfg = {
        # transformers 5 maps this to TokenizersBackend; 4.x loads it as is.
        "tokenizer_class": "PreTrainedTokenizerFast",
        "backend": "tokenizers",
        "clean_up_tokenization_spaces": False,
        "eos_token": EOS_TOKEN,
        "pad_token": PAD_TOKEN,
        "bos_token": None,
        "unk_token": None,
        "extra_special_tokens": extra,  # transformers 5
        "additional_special_tokens": extra,  # transformers 4
        "model_max_length": max_length,
        "chat_template": CHAT_TEMPLATE,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    (out / "chat_template.jinja").write_text(CHAT_TEMPLATE)


def make_portable(out_dir: Path, max_length: int) -> None:
    """Rewrite a transformers-5 ``tokenizer_config.json`` so transformers 4.x and vLLM load it
    too: a classic class name, the chat template inline, no machine-local flags."""
    out = Path(out_dir)
    cfg_path = out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    for key in ("is_local", "local_files_only"):
        cfg.pop(key, None)
    cfg["model_max_length"] = max_length
    extra = cfg.get("extra_special_tokens")
    if isinstance(extra, list) and "additional_special_tokens" not in cfg:
        cfg["additional_special_tokens"] = extra
    template = out / "chat_template.jinja"
    if "chat_template" not in cfg and template.is_file():
        cfg["chat_template"] = template.read_text()
    cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")
