"""Saved tokenizers load under transformers 4.52.4 (the version SDAR's code pins) and under ours (5.x).

The 4.52.4 side runs in its own virtual environment, made once with pip in a cache directory
(``DIRL_TEST_CACHE``, default ``~/.cache/dirl-tests``); the test skips, saying why, when pip
cannot install it (no registry access). Oracle: every environment encodes the same texts to the
same ids as dirl, with the same mask / EOS ids and the same rendered chat template.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dirl.model.tokenizer import char_tokenizer, load_tokenizer

pytestmark = pytest.mark.integration
TRANSFORMERS_4 = "4.52.4"
TEXTS = ["Solve 3x + 5 = 11.", "<|MASK|><|MASK|> 12+34=46", "héllo wörld\n\tdone"]
MESSAGES = [{"role": "user", "content": "What is 2+2?"}]
PROBE = """
import json, sys
from transformers import AutoTokenizer
out = {}
for directory in sys.argv[2:]:
    tok = AutoTokenizer.from_pretrained(directory)
    out[directory] = {"ids": [tok.encode(t, add_special_tokens=False) for t in json.loads(sys.argv[1])["texts"]],
                      "mask": tok.convert_tokens_to_ids("<|MASK|>"), "eos": tok.eos_token_id,
                      "chat": tok.apply_chat_template(json.loads(sys.argv[1])["messages"], tokenize=False,
                                                      add_generation_prompt=True)}
print(json.dumps(out))
"""


def _venv_python() -> Path:
    """The Python of a venv with transformers==4.52.4 (made on first use); skips if pip fails."""
    cache = Path(os.environ.get("DIRL_TEST_CACHE", Path.home() / ".cache" / "dirl-tests"))
    venv = cache / f"venv-transformers-{TRANSFORMERS_4}"
    python = venv / "bin" / "python"
    marker = venv / "installed.txt"  # what was installed; a different list reinstalls
    requirements = [f"transformers=={TRANSFORMERS_4}", "jinja2"]  # jinja2: the chat template
    if marker.exists() and marker.read_text().split() == requirements:
        return python
    cache.mkdir(parents=True, exist_ok=True)
    steps = [[sys.executable, "-m", "venv", str(venv)], [str(python), "-m", "pip", "install", "-q", *requirements]]
    for step in steps:
        result = subprocess.run(step, check=False, capture_output=True, text=True, timeout=900)
        if result.returncode != 0:
            pytest.skip(f"cannot make a transformers=={TRANSFORMERS_4} venv ({' '.join(step[-2:])}): "
                        f"{(result.stderr or result.stdout).strip().splitlines()[-1:]}")
    marker.write_text("\n".join(requirements) + "\n")
    return python


def _expected(tok) -> dict:
    return {"ids": [tok.encode(t) for t in TEXTS], "mask": tok.mask_token_id, "eos": tok.eos_token_id,
            "chat": tok.apply_chat_template(MESSAGES)}


@pytest.fixture(scope="module")
def saved(sdar_dir, tmp_path_factory) -> dict[str, tuple[Path, dict]]:
    """Three tokenizers as dirl saves them: SDAR's unchanged (its files byte for byte), SDAR's with
    an added token (transformers' save, made portable), and the built-in char tokenizer."""
    root = tmp_path_factory.mktemp("tokenizers")
    sdar = load_tokenizer(sdar_dir)
    changed = load_tokenizer(sdar_dir)
    changed.hf.add_special_tokens({"additional_special_tokens": ["<|new_special|>"]})
    out = {}
    for name, tok in {"sdar": sdar, "sdar_changed": changed, "char": char_tokenizer()}.items():
        directory = root / name
        directory.mkdir()
        tok.save(directory)
        out[name] = (directory, _expected(tok))
    return out


def test_saved_tokenizers_load_under_transformers_4(saved):
    python = _venv_python()
    directories = [str(d) for d, _ in saved.values()]
    result = subprocess.run([str(python), "-c", PROBE, json.dumps({"texts": TEXTS, "messages": MESSAGES}),
                             *directories], check=False, capture_output=True, text=True, timeout=600,
                            env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    loaded = json.loads(result.stdout.strip().splitlines()[-1])
    for name, (directory, expected) in saved.items():
        assert loaded[str(directory)] == expected, name


def test_saved_tokenizers_load_under_our_transformers(saved):
    from transformers import AutoTokenizer

    for name, (directory, expected) in saved.items():
        tok = AutoTokenizer.from_pretrained(str(directory))
        got = {"ids": [tok.encode(t, add_special_tokens=False) for t in TEXTS],
               "mask": tok.convert_tokens_to_ids("<|MASK|>"), "eos": tok.eos_token_id,
               "chat": tok.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)}
        assert got == expected, name
