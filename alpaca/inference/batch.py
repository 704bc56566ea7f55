"""Batch generation: instructions from a JSON / JSONL file to a JSON list in AlpacaEval's format.

AlpacaEval scores a list of `{"instruction", "output", "generator"}` records. The output file is
rewritten atomically after every batch, so a crash loses at most one batch, and a rerun with the same
files skips the records already written.
"""

from __future__ import annotations

import json
from pathlib import Path

from alpaca.core.files import read_json_values, write_json_atomic
from alpaca.core.locks import locks_output
from alpaca.inference.decoding import DecodingSettings
from alpaca.inference.generation import ResponseGenerator


def read_instructions(input_file: str) -> list[dict]:
    """Read and check the records of a JSON list or a JSONL file (`instruction`, optional `input`),
    detected as for training data (`alpaca.core.files.read_json_values`).

    Raises a ValueError naming the file and the record (JSON list index, or JSONL line) at fault.
    """
    path = Path(input_file).expanduser()
    if not path.is_file():
        raise ValueError(f"--input_file={input_file!r}: no such file")
    flag = f"--input_file={input_file!r}"
    values = read_json_values(path, flag)
    for index, (record, line) in enumerate(values):
        place = f"record {index}" if line is None else f"record {index} (line {line})"
        check_record(record, f"{flag}, {place}")
    if not values:
        raise ValueError(f"{flag} holds no records")
    return [record for record, _ in values]


def read_utf8(path: Path, flag: str) -> str:
    """The file's text; bytes that are not UTF-8 are an error naming the file and the byte offset."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(
            f"{flag} is not UTF-8 text (byte {err.start}: {err.reason}); save it as UTF-8"
        ) from err


def check_output_file(output_file: str) -> None:
    """Raise a ValueError, before any model loads, when `output_file` cannot be a JSON file."""
    path = Path(output_file).expanduser()
    if path.is_dir():
        raise ValueError(
            f"--output_file={output_file!r} is a folder; give a file name, e.g. {output_file.rstrip('/')}/outputs.json"
        )
    blocking = next((parent for parent in path.parents if parent.exists()), None)
    if blocking is not None and not blocking.is_dir():
        raise ValueError(f"--output_file={output_file!r}: {str(blocking)!r} is a file, not a folder")


def check_record(record, place: str) -> None:
    """Raise a ValueError unless `record` is an object with a non-empty `instruction` string, or a
    conversation (`messages`, OpenAI form, ending with a user message; checked with the prompt)."""
    if not isinstance(record, dict):
        raise ValueError(f"{place}: expected an object with an 'instruction', got {type(record).__name__}")
    if "messages" in record:
        if not isinstance(record["messages"], list) or not record["messages"]:
            raise ValueError(f"{place}: 'messages' must be a non-empty list of {{role, content}} turns")
        return
    instruction = record.get("instruction")
    if not isinstance(instruction, str) or not instruction.strip():
        raise ValueError(f"{place}: 'instruction' must be a non-empty string, got {instruction!r}")
    if record.get("input") is not None and not isinstance(record["input"], str):
        raise ValueError(f"{place}: 'input' must be a string, got {type(record['input']).__name__}")


def output_record(record: dict, output: str, generator_name: str) -> dict:
    """AlpacaEval's record: the source fields (a reference `output` replaced) plus ours."""
    result = {key: value for key, value in record.items() if key not in ("output", "generator")}
    result.update(output=output, generator=generator_name)
    return result


def read_finished(output_file: str, records: list[dict]) -> list[dict]:
    """The records already in `output_file`, checked to be a prefix of this run's input."""
    path = Path(output_file).expanduser()
    if not path.is_file():
        return []
    try:
        finished = json.loads(read_utf8(path, f"--output_file={output_file!r}"))
    except json.JSONDecodeError as err:
        raise ValueError(
            f"--output_file={output_file!r} exists but is not valid JSON ({err}); move it away to start over"
        ) from err
    if not isinstance(finished, list) or len(finished) > len(records):
        raise ValueError(
            f"--output_file={output_file!r} exists but is not a list of at most {len(records)} outputs "
            "for this input file; move it away or pick another --output_file"
        )
    for index, (done, record) in enumerate(zip(finished, records)):
        same = isinstance(done, dict) and all(
            (done.get(key) or "") == (record.get(key) or "") for key in ("instruction", "input", "messages")
        )
        if not same or "output" not in done:
            raise ValueError(
                f"--output_file={output_file!r}, record {index} does not match record {index} of the input "
                "file; it holds outputs for other instructions. Move it away or pick another --output_file"
            )
    return finished


def prompt_of(generator: ResponseGenerator, record: dict, index: int) -> str:
    """The checked prompt of one record: a conversation in the model's trained format, or an
    instruction (and input) in its prompt template."""
    if "messages" in record:
        return generator.prompt_for_messages(record["messages"], index=index)
    return generator.prompt_for(record["instruction"], record.get("input"), index=index)


@locks_output("--output_file", lambda arguments: arguments["output_file"])
def run_batch(
    generator: ResponseGenerator,
    input_file: str,
    output_file: str,
    settings: DecodingSettings,
    batch_size: int = 8,
    generator_name: str = "",
    progress: bool = True,
) -> list[dict]:
    """Generate for every record of `input_file` in batches and write `output_file`; return its records.

    Every prompt is checked (empty instruction, length limit) before the first batch, so a bad record
    stops the run at once rather than an hour in. `generator_name` defaults to the generator's label
    (base model, plus adapter when there is one).
    """
    from tqdm.auto import tqdm

    if batch_size < 1:
        raise ValueError(f"--batch_size must be at least 1, got {batch_size}")
    check_output_file(output_file)
    records = read_instructions(input_file)
    prompts = [prompt_of(generator, record, index) for index, record in enumerate(records)]
    results = read_finished(output_file, records)
    name = generator_name or generator.name
    # The resolved settings beside the outputs, so a result file says how it was made.
    config_path = Path(output_file).expanduser().with_suffix(".config.json")
    write_json_atomic(
        config_path,
        {
            "input_file": input_file,
            "generator": name,
            **generator.source,
            "batch_size": batch_size,
            "decoding": dict(settings.__dict__),
            "stop_strings": list(generator.stop_strings),
        },
    )
    if settings.seed is not None:
        import torch

        # One seed for the run: batches after it draw from the same RNG stream.
        torch.manual_seed(settings.seed)
        settings = DecodingSettings(**{**settings.__dict__, "seed": None})
    with tqdm(
        total=len(records), initial=len(results), desc="generating", unit="record", disable=not progress
    ) as bar:
        for start in range(len(results), len(records), batch_size):
            batch = records[start : start + batch_size]
            if any("messages" in r for r in batch):
                replies = generator.replies_to_prompts(prompts[start : start + batch_size], settings)
                outputs = [reply.text for reply in replies]
            else:
                outputs = generator.generate_batch(
                    [(r["instruction"], r.get("input")) for r in batch], settings
                )
            results.extend(output_record(r, output, name) for r, output in zip(batch, outputs))
            write_json_atomic(output_file, results)
            bar.update(len(batch))
    if not Path(output_file).expanduser().is_file():
        write_json_atomic(output_file, results)
    return results
