"""Load and validate data rows from local files, saved HF datasets or built-in synthetic tasks.

Sources (nothing is ever downloaded; anything else is a ``DataError``):

* ``*.jsonl`` - one JSON object per line, blank lines skipped;
* ``*.json`` - a list of objects (or a ``{split: [rows]}`` object; JSON Lines also accepted,
  since ``datasets.Dataset.to_json`` writes lines);
* ``*.parquet``;
* a directory written by ``datasets.save_to_disk`` (a ``DatasetDict`` needs ``split`` unless it
  has exactly one split);
* ``task:<name>[:<split>]`` - a built-in synthetic task from ``dirl.data.tasks``;
* in memory: a list of dicts or a ``datasets.Dataset`` (rows are named ``row <i>``).

Row formats (``dirl.data.chat``): ``question`` (+ ``answer``/``solution``/``response``), OpenAI
``messages``, ShareGPT ``conversations`` (turned into ``messages`` on load) and TRL's ``prompt``
(+ ``completion`` for SFT), each a string or a list of messages.

Every row is validated before it is returned, so a bad file fails at load time with a message
``<file>:<where>: <problem with field>``, where ``<where>`` is the 1-based line number for JSON
Lines and ``row <i>`` (0-based row index) for JSON lists, parquet and saved datasets.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from dirl.data.chat import as_messages, normalize_row, validate_messages
from dirl.data.tasks import SPLITS, get_task
from dirl.data.limits import check_row_bounds, max_line_bytes, parse_json, too_long
from dirl.data.templates import DataError, render_prompt

__all__ = [
    "load_rows", "load_sft_rows", "load_prompt_rows", "check_fields",
    "validate_sft_row", "validate_prompt_row", "sft_response", "to_sft_messages", "to_prompt_messages",
    "reward_prompt", "parse_task_source", "task_of", "Source",
]

TASK_PREFIX = "task:"
SFT_RESPONSE_FIELDS = ("response", "solution", "answer")  # first present one is the SFT target
PROMPT_FIELDS = ("question", "answer")  # RL and eval need the reference answer
RowCheck = Callable[[Mapping[str, Any], str], None]
Source = str | Path | Sequence[Mapping[str, Any]] | Any  # a path / task:<name>, a list of dicts, a datasets.Dataset


# ----------------------------------------------------------------------------- validation

def _check_value(value: Any, field: str, where: str) -> None:
    """Reject null or empty values of a field the caller relies on."""
    if value is None:
        raise DataError(f"{where}: field '{field}' is null")
    if isinstance(value, str) and not value.strip():
        raise DataError(f"{where}: field '{field}' is empty")
    if isinstance(value, (list, tuple, dict)) and not value:
        raise DataError(f"{where}: field '{field}' is empty")


def check_fields(row: Any, where: str, required: Sequence[str]) -> None:
    """Check that ``row`` is an object holding every ``required`` field with a non-empty value."""
    if not isinstance(row, Mapping):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    for field in required:
        if field not in row:
            have = ", ".join(row) or "no fields"
            raise DataError(f"{where}: missing field '{field}' (row has: {have})")
        _check_value(row[field], field, where)
    if "question" in required and not isinstance(row["question"], str):
        kind = type(row["question"]).__name__
        raise DataError(f"{where}: field 'question' must be a string, got {kind}")


def validate_sft_row(row: Any, where: str) -> None:
    """Check an SFT row: ``messages``, ``prompt`` + ``completion``, or ``question`` plus one of
    response/solution/answer."""
    if isinstance(row, Mapping) and "messages" in row:
        validate_messages(row["messages"], where)
        return
    if isinstance(row, Mapping) and "prompt" in row and "completion" in row:
        _prompt_completion_messages(row, where)
        return
    check_fields(row, where, ("question",))
    present = [f for f in SFT_RESPONSE_FIELDS if f in row]
    if not present:
        have = ", ".join(row)
        raise DataError(
            f"{where}: missing field 'answer' (or 'solution'/'response') (row has: {have})"
        )
    _check_value(row[present[0]], present[0], where)
    if isinstance(row[present[0]], list) and not all(isinstance(x, str) for x in row[present[0]]):
        raise DataError(f"{where}: field '{present[0]}' must be a string or a list of strings")


def validate_prompt_row(row: Any, where: str, required: Sequence[str] = ()) -> None:
    """Check an RL / eval prompt row: a TRL ``prompt`` or ``messages`` row needs only a usable
    prompt; a ``question`` row needs every ``required`` field."""
    if isinstance(row, Mapping) and "question" not in row and ("prompt" in row or "messages" in row):
        to_prompt_messages(row, "plain", where)
        return
    check_fields(row, where, required)


def _prompt_completion_messages(row: Mapping[str, Any], where: str) -> list[dict[str, str]]:
    messages = (as_messages(row["prompt"], "user", where, "prompt")
                + as_messages(row["completion"], "assistant", where, "completion"))
    validate_messages(messages, where, "completion")
    return messages


# ----------------------------------------------------------------------------- conversion

def sft_response(row: Mapping[str, Any]) -> str:
    """The SFT target text of a question row: ``response``, else ``solution``, else ``answer``.

    A list of solutions (e.g. OlympiadBench) is joined with blank lines.
    """
    for field in SFT_RESPONSE_FIELDS:
        if field in row and row[field] is not None:
            value = row[field]
            return "\n\n".join(value) if isinstance(value, list) else str(value)
    raise DataError(f"row has no {'/'.join(SFT_RESPONSE_FIELDS)} field (row has: {', '.join(row)})")


def to_sft_messages(row: Mapping[str, Any], template: str) -> list[dict[str, str]]:
    """Chat messages for SFT: [user prompt rendered with ``template``, assistant response].

    Rows already in ``messages`` (or ``prompt`` + ``completion``) form are returned as copies of
    their turns (the template is not applied: their user text is assumed final).
    """
    where = f"row {row.get('id', '?')}"
    validate_sft_row(row, where)
    if "messages" in row:
        return [{"role": t["role"], "content": t["content"]} for t in row["messages"]]
    if "prompt" in row and "completion" in row:
        return _prompt_completion_messages(row, where)
    return [
        {"role": "user", "content": render_prompt(template, row)},
        {"role": "assistant", "content": sft_response(row)},
    ]


def to_prompt_messages(row: Mapping[str, Any], template: str, where: str | None = None) -> list[dict[str, str]]:
    """Chat messages for RL rollouts / eval: the prompt only, without any assistant turn.

    A TRL ``prompt`` column is the prompt (a string: one user turn); for ``messages`` rows it is
    every turn before the first assistant turn; ``question`` rows are rendered with ``template``.
    """
    where = where or f"row {row.get('id', '?')}"
    if "question" not in row and "prompt" in row:
        return as_messages(row["prompt"], "user", where, "prompt")
    if "question" not in row and "messages" in row:
        validate_messages(row["messages"], where, need_assistant=False)
        turns = []
        for t in row["messages"]:
            if t["role"] == "assistant":
                break
            turns.append({"role": t["role"], "content": t["content"]})
        if not turns:
            raise DataError(f"{where}: field 'messages' starts with an assistant turn: no prompt")
        return turns
    return [{"role": "user", "content": render_prompt(template, row)}]


def reward_prompt(row: Mapping[str, Any], template: str) -> str | list[dict[str, str]]:
    """The ``prompts`` entry a TRL reward gets for ``row``: the row's own ``prompt`` (a string, or
    messages for a conversational row), the prompt turns of a ``messages`` row, else the rendered
    question text."""
    if "question" not in row and "prompt" in row:
        return row["prompt"]
    messages = to_prompt_messages(row, template)
    if "question" not in row and "messages" in row:
        return messages
    return "\n\n".join(m["content"] for m in messages)


# ----------------------------------------------------------------------------- readers

def _read_jsonl(path: Path) -> Iterator[tuple[str, Any]]:
    """Yield (where, row) per non-blank line; invalid UTF-8 or JSON, or a line over the size cap,
    is a DataError naming the line (a long line is never read whole)."""
    cap = max_line_bytes()
    with path.open("rb") as fh:
        for lineno in itertools.count(1):
            raw = fh.readline(cap + 1)
            if not raw:
                return
            where = f"{path}:{lineno}"
            if len(raw) > cap and not (len(raw) == cap + 1 and raw.endswith(b"\n")):
                raise too_long(where, cap)
            line = _decode(raw.removeprefix(b"\xef\xbb\xbf") if lineno == 1 else raw, where)
            if not line.strip():
                continue
            yield where, parse_json(line, where)


def _decode(raw: bytes, where: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        newlines = raw.count(b"\n", 0, exc.start)  # a whole file: name the line too
        line_hint = f":{newlines + 1}" if newlines else ""
        raise DataError(f"{where}{line_hint}: not UTF-8 text (byte {raw[exc.start]:#04x} at offset "
                        f"{exc.start}); save the file as UTF-8") from None


def _read_json(path: Path, split: str | None) -> Iterator[tuple[str, Any]]:
    """Yield rows of a JSON list file (or ``{split: [...]}``); fall back to JSON Lines."""
    text = _decode(path.read_bytes().removeprefix(b"\xef\xbb\xbf"), str(path))
    if not text.lstrip().startswith(("[", "{")) or _looks_like_lines(text):
        yield from _read_jsonl(path)
        return
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}:{exc.lineno}: invalid JSON ({exc})") from None
    except (RecursionError, ValueError):
        data = parse_json(text, str(path))  # the same failure, as a DataError
    if isinstance(data, dict):
        lists = {k: v for k, v in data.items() if isinstance(v, list)}
        key = split if split in lists else (next(iter(lists)) if len(lists) == 1 else None)
        if key is None:
            raise DataError(
                f"{path}: expected a list of rows or {{split: [rows]}} "
                f"(split={split!r}, keys: {', '.join(data)})"
            )
        data = lists[key]
    for i, row in enumerate(data):
        yield f"{path}:row {i}", row


def _looks_like_lines(text: str) -> bool:
    """True when a .json file is really JSON Lines (several top-level objects, one per line)."""
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if len(lines) < 2 or not lines[0].lstrip().startswith("{"):
        return False
    try:
        json.loads(lines[0])
    except json.JSONDecodeError:
        return False
    return True


def _read_parquet(path: Path) -> Iterator[tuple[str, Any]]:
    """Yield rows of a parquet file (Python values, as written)."""
    import pyarrow.parquet as pq  # heavy import, only when needed

    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises several types for corrupt files
        raise DataError(f"{path}: cannot read parquet ({exc})") from None
    for i, row in enumerate(table.to_pylist()):
        yield f"{path}:row {i}", row


def _read_saved_dataset(path: Path, split: str | None) -> Iterator[tuple[str, Any]]:
    """Yield rows of a ``datasets.save_to_disk`` directory (Dataset or DatasetDict)."""
    import datasets  # heavy import, only when needed

    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as exc:  # FileNotFoundError or datasets' own errors for non-dataset dirs
        raise DataError(f"{path}: not a dataset saved with datasets.save_to_disk ({exc})") from None
    if isinstance(ds, datasets.DatasetDict):
        names = list(ds)
        if split is None and len(names) == 1:
            split = names[0]
        if split not in ds:
            raise DataError(
                f"{path}: choose a split with split=... (has: {', '.join(names)}; asked: {split})"
            )
        ds = ds[split]
    for i, row in enumerate(ds.to_list()):
        yield f"{path}:row {i}", row


def parse_task_source(source: str | Path) -> tuple[str, str | None] | None:
    """``task:<name>[:<split>]`` -> ``(name, split or None)``; any other source -> None.

    The one parser of task sources (loaders, trainers and ``dirl eval`` all use it)."""
    source = str(source)
    if not source.startswith(TASK_PREFIX):
        return None
    parts = source[len(TASK_PREFIX):].split(":")
    if len(parts) > 2 or not parts[0]:
        raise DataError(f"bad task source '{source}': use task:<name>[:<split>]")
    return parts[0], (parts[1] if len(parts) == 2 else None)


def task_of(source: str | Path):
    """The :class:`~dirl.data.tasks.Task` a ``task:`` source names (``DataError`` if unknown), else None."""
    parsed = parse_task_source(source)
    if parsed is None:
        return None
    try:
        return get_task(parsed[0])
    except ValueError as exc:
        raise DataError(str(exc)) from None


def _task_rows(
    source: str, split: str | None, limit: int | None, seed: int
) -> Iterator[tuple[str, Any]]:
    """Yield rows of ``task:<name>[:<split>]`` (``limit`` rows, else the task's default size)."""
    _name, spec_split = parse_task_source(source)
    if spec_split and split and spec_split != split:
        raise DataError(
            f"task source '{source}' names split '{spec_split}' but split='{split}' was passed"
        )
    split = spec_split or split or "train"
    if split not in SPLITS:
        raise DataError(f"task source '{source}': unknown split '{split}', use one of {SPLITS}")
    task = task_of(source)
    num = task.default_size[split] if limit is None else limit
    for row in task.generate(split, num, seed=seed):
        yield f"{source}:{row['id']}", row


def _iter_source(
    source: str, split: str | None, limit: int | None, seed: int
) -> Iterator[tuple[str, Any]]:
    """Dispatch a source string to its reader; non-local, non-task sources are an error."""
    if parse_task_source(source) is not None:
        return _task_rows(source, split, limit, seed)
    path = Path(source).expanduser()
    if path.is_dir():
        return _read_saved_dataset(path, split)
    if not path.is_file():
        raise DataError(
            f"data source '{source}' is not a local file, a saved-dataset directory or task:<name>; "
            "downloading from a hub is not supported (save the data locally first)"
        )
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return _read_jsonl(path)
    if suffix == ".json":
        return _read_json(path, split)
    if suffix == ".parquet":
        return _read_parquet(path)
    raise DataError(f"{path}: unsupported file type '{suffix}' (use .jsonl, .json or .parquet)")


# ----------------------------------------------------------------------------- public loaders

def _iter_memory(rows: Any) -> Iterator[tuple[str, Any]]:
    """Rows of an in-memory source: a ``datasets.Dataset`` or a sequence of dicts."""
    if hasattr(rows, "to_list") and hasattr(rows, "column_names"):  # datasets.Dataset
        rows = rows.to_list()
    if not isinstance(rows, Sequence) or isinstance(rows, (str, bytes)):
        raise DataError(f"a dataset must be a path, task:<name>, a list of dicts or a datasets.Dataset, "
                        f"got {type(rows).__name__}")
    for i, row in enumerate(rows):
        yield f"row {i}", row


def _load(source: Source, split: str | None, limit: int | None, seed: int, check: RowCheck) -> list[dict]:
    """Read every row of ``source``, validate it with ``check``, then apply ``limit``."""
    if limit is not None and limit < 0:
        raise DataError(f"limit must be >= 0, got {limit}")
    rows: list[dict] = []
    in_memory = not isinstance(source, (str, Path))
    # Validate the whole file (not only the first ``limit`` rows) so a broken file fails early.
    cap = max_line_bytes()
    # A task's rows are generated here, not read: only outside data needs the size and depth bounds.
    generated = not in_memory and parse_task_source(str(source)) is not None
    for where, row in (_iter_memory(source) if in_memory else _iter_source(str(source), split, limit, seed)):
        if not generated:
            check_row_bounds(row, where, cap)
        row = normalize_row(row, where)
        check(row, where)
        rows.append(dict(row))
    if not rows and limit != 0:
        raise DataError(f"{source}: holds no rows (an empty file or split)")
    return rows if limit is None else rows[:limit]


def load_rows(source: Source, *, split: str | None = None, limit: int | None = None,
              required: Sequence[str] = (), seed: int = 0) -> list[dict]:
    """Load validated rows from ``source`` (see the module docstring for the accepted sources).

    ``split`` picks a split of a saved ``DatasetDict``, a ``{split: rows}`` JSON file or a task;
    a plain file is a single split and ignores it. ``required`` fields must be present and
    non-empty. ``seed`` only matters for ``task:`` sources.
    """
    return _load(
        source, split, limit, seed, lambda row, where: check_fields(row, where, required)
    )


def load_sft_rows(source: Source, *, split: str | None = None, limit: int | None = None,
                  seed: int = 0) -> list[dict]:
    """Load rows usable for SFT: ``messages`` form or question + response/solution/answer."""
    return _load(source, split, limit, seed, validate_sft_row)


def load_prompt_rows(source: Source, *, split: str | None = None, limit: int | None = None,
                     required: Sequence[str] = PROMPT_FIELDS, seed: int = 0) -> list[dict]:
    """Load rows usable as RL / eval prompts: ``question`` rows need the ``required`` fields
    (by default ``question`` and ``answer``); TRL ``prompt`` and ``messages`` rows a usable prompt."""
    return _load(source, split, limit, seed, lambda row, where: validate_prompt_row(row, where, required))
