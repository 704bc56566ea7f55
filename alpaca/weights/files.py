"""A model folder's weights, read and written one tensor at a time.

`weight_diff.py` works on models bigger than memory with these: `WeightReader` reads one tensor of a
folder's safetensors or `pytorch_model*.bin` files at a time (memory-mapped, single file or sharded
with an index), `model_layout` lists the tensors a model has without allocating it (its class built
on the meta device: names in `state_dict` order, shapes, tied aliases, embedding names), and
`SafetensorsWriter` writes tensors whose names and shapes are known in advance straight to disk, in
the files and index `save_pretrained` writes, so the peak memory is one tensor, not one model.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"
# save_pretrained's default shard size in transformers 5 (one file for models up to 50 GB)
DEFAULT_MAX_SHARD_SIZE = "50GB"
SAFETENSORS_DTYPES = {
    "float32": "F32",
    "float16": "F16",
    "bfloat16": "BF16",
    "float64": "F64",
    "int64": "I64",
    "int32": "I32",
    "int8": "I8",
    "uint8": "U8",
    "bool": "BOOL",
}
UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(size: int | str, flag: str = "--max_shard_size") -> int:
    """Bytes in a size such as 5GB, 500MB, 2GiB or a plain number (transformers' units: GB = 10**9)."""
    if isinstance(size, int) and not isinstance(size, bool):
        number, unit = size, ""
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(size))
        if not match or match.group(2).upper() not in UNITS:
            raise ValueError(f"{flag}={size!r}: give a size such as 5GB, 500MB or 2GiB")
        number, unit = float(match.group(1)), match.group(2).upper()
    value = int(number * UNITS[unit])
    if value <= 0:
        raise ValueError(f"{flag}={size!r} must be positive")
    return value


def local_model_folder(path: str, flag: str) -> Path:
    """`path` as a local folder: itself, or a hub id's snapshot in the Hugging Face cache (fetched when
    online, like `from_pretrained`; an error naming `flag` when offline and not cached)."""
    folder = Path(path).expanduser()
    if folder.is_dir():
        return folder
    from huggingface_hub import snapshot_download

    small = ["*.json", "*.model", "*.txt", "*.jinja"]
    try:
        snapshot = Path(snapshot_download(path, allow_patterns=small + ["*.safetensors"]))
        if not any(snapshot.glob("*.safetensors")):
            snapshot = Path(snapshot_download(path, allow_patterns=small + ["*.bin"]))
    except Exception as err:  # offline and not cached, unknown repo, gated repo, no network
        raise ValueError(
            f"{flag}={path!r}: not a local folder and it could not be fetched from the Hugging Face hub "
            f"({type(err).__name__}: {err}); download it first or give a local folder"
        ) from None
    return snapshot


def weight_files(folder: Path, flag: str) -> dict[str, Path]:
    """Tensor name -> the file holding it, for the weight files `from_pretrained` would read (safetensors
    first, then pytorch_model*.bin; single file or an index of shards)."""
    for single, index in (("model.safetensors", SAFETENSORS_INDEX), ("pytorch_model.bin", BIN_INDEX)):
        if (folder / index).is_file():
            try:
                weight_map = json.loads((folder / index).read_text(encoding="utf-8"))["weight_map"]
                mapping = {name: folder / file for name, file in weight_map.items()}
            except (ValueError, KeyError, TypeError, AttributeError) as err:
                raise ValueError(
                    f"{flag}={str(folder)!r}: {index} is not a valid shard index ({err})"
                ) from None
            for shard in sorted(set(mapping.values())):
                if not shard.is_file():
                    raise ValueError(
                        f"{flag}={str(folder)!r}: shard {shard.name} named in {index} is missing"
                    )
            return mapping
        if (folder / single).is_file():
            return {"": folder / single}  # names read from the file itself
    raise ValueError(
        f"{flag}={str(folder)!r} holds no model weights (model.safetensors, pytorch_model.bin or their "
        "sharded index)"
    )


TORCH_DTYPES = {code: name for name, code in SAFETENSORS_DTYPES.items()}


class SafetensorsFile:
    """One safetensors file, each tensor read with a plain file read into its own buffer. Unlike a
    memory map, nothing of the file stays resident after the tensor is freed, so reading a 27 GB file
    tensor by tensor keeps the process at one tensor's size (a memory map would count every page
    touched as resident until it is unmapped)."""

    def __init__(self, path: Path):
        self.path = path
        with open(path, "rb") as handle:
            length = int.from_bytes(handle.read(8), "little")
            header = json.loads(handle.read(length))
        self.data_start = 8 + length
        self.entries = {name: entry for name, entry in header.items() if name != "__metadata__"}
        self.shapes = {name: tuple(entry["shape"]) for name, entry in self.entries.items()}

    def read(self, name: str):
        import torch

        entry = self.entries[name]
        if entry["dtype"] not in TORCH_DTYPES:
            raise ValueError(f"tensor {name} has dtype {entry['dtype']}, which weight diffs do not handle")
        dtype = getattr(torch, TORCH_DTYPES[entry["dtype"]])
        begin, end = entry["data_offsets"]
        buffer = bytearray(end - begin)
        with open(self.path, "rb") as handle:
            handle.seek(self.data_start + begin)
            if handle.readinto(buffer) != len(buffer):
                raise ValueError(f"{self.path} ends inside tensor {name}: the file is truncated")
        if not buffer:
            return torch.empty(entry["shape"], dtype=dtype)
        return torch.frombuffer(buffer, dtype=dtype).reshape(entry["shape"])


class WeightReader:
    """The tensors of a model folder, read one at a time; nothing is loaded until asked for."""

    def __init__(self, folder: str | Path, flag: str):
        from alpaca.core.files import safetensors_problem, torch_file_problem

        self.folder, self.flag = Path(folder), flag
        mapping = weight_files(self.folder, flag)
        files = sorted(set(mapping.values()))
        for path in files:
            problem = (
                safetensors_problem(path)
                if path.suffix == ".safetensors"
                else torch_file_problem(path, check_crc_below=0)
            )
            if problem:
                raise ValueError(
                    f"{flag}={str(self.folder)!r}: cannot read the weights: {path} is {problem}; copy or "
                    "download it again"
                )
        self._handles: dict[Path, SafetensorsFile] = {}
        self._bin_path: Path | None = None
        self._bin_state: dict = {}
        self.files: dict[str, Path] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        for path in files:
            for name, shape in self._shapes_in(path).items():
                self.files[name], self.shapes[name] = path, shape
        if "" not in mapping:
            missing = sorted(set(mapping) - set(self.files))
            if missing:
                raise ValueError(
                    f"{flag}={str(self.folder)!r}: tensors named in the shard index are not in their files, "
                    f"e.g. {missing[:3]}; the folder is damaged"
                )

    def _safetensors(self, path: Path) -> SafetensorsFile:
        if path not in self._handles:
            self._handles[path] = SafetensorsFile(path)
        return self._handles[path]

    def _bin(self, path: Path) -> dict:
        """One pytorch_model*.bin shard (torch.save's zip format), memory-mapped; only the last one used
        is kept open."""
        import torch

        if self._bin_path != path:
            self._bin_state = {}
            self._bin_state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            self._bin_path = path
        return self._bin_state

    def _shapes_in(self, path: Path) -> dict[str, tuple[int, ...]]:
        if path.suffix == ".safetensors":
            return dict(self._safetensors(path).shapes)
        return {name: tuple(tensor.shape) for name, tensor in self._bin(path).items()}

    def get(self, name: str):
        """The tensor `name` as stored (dtype and all), on the CPU."""
        path = self.files[name]
        try:
            if path.suffix == ".safetensors":
                return self._safetensors(path).read(name)
            return self._bin(path)[name]
        except (OSError, RuntimeError, ValueError) as err:
            raise ValueError(f"{self.flag}: cannot read tensor {name} from {path}: {err}") from err

    def owns(self, name: str) -> bool:
        """Whether `get(name)` returns memory of its own (safetensors: read into a fresh buffer) rather
        than a view of a memory-mapped file (.bin)."""
        return self.files[name].suffix == ".safetensors"

    def close(self) -> None:
        self._handles.clear()
        self._bin_state, self._bin_path = {}, None


@dataclass
class ModelLayout:
    """The tensors of a model class, from its config alone: `keys` in `state_dict` order with tied tensors
    listed once (under their first name), each key's `aliases` (every name of that tensor), shapes, the
    keys of the input and output embeddings, and the class's base-model prefix."""

    keys: list[str]
    shapes: dict[str, tuple[int, ...]]
    aliases: dict[str, list[str]]
    input_embedding: str | None
    output_embedding: str | None
    prefix: str
    buffers: set[str] = field(default_factory=set)

    def spellings(self, key: str) -> list[str]:
        """Every name a weight file may give `key`'s tensor: each tied alias, with and without the
        base-model prefix (as `from_pretrained` accepts)."""
        names = []
        for alias in self.aliases[key]:
            names.append(alias)
            if self.prefix and alias.startswith(self.prefix + "."):
                names.append(alias[len(self.prefix) + 1 :])
            elif self.prefix:
                names.append(f"{self.prefix}.{alias}")
        return names

    def name_in(self, key: str, reader: WeightReader) -> str | None:
        """The name under which `reader`'s files hold `key`, or None."""
        return next((name for name in self.spellings(key) if name in reader.files), None)

    def file_names(self) -> set[str]:
        """Every name a weight file may give one of the model's tensors."""
        return {name for key in self.keys for name in self.spellings(key)}


def model_layout(folder: str | Path, flag: str, trust_remote_code: bool = False) -> ModelLayout:
    """The layout of the model whose config is in `folder`, built on the meta device (no memory)."""
    from alpaca.modeling import empty_model

    model = empty_model(str(folder), flag, trust_remote_code=trust_remote_code)
    state = model.state_dict(keep_vars=True)
    first_name: dict[int, str] = {}
    aliases: dict[str, list[str]] = {}
    for name, tensor in state.items():
        owner = first_name.setdefault(id(tensor), name)
        aliases.setdefault(owner, []).append(name)
    keys = list(aliases)
    by_id = {id(state[key]): key for key in keys}
    inputs, outputs = model.get_input_embeddings(), model.get_output_embeddings()
    return ModelLayout(
        keys=keys,
        shapes={key: tuple(state[key].shape) for key in keys},
        aliases=aliases,
        input_embedding=by_id.get(id(inputs.weight)) if inputs is not None else None,
        output_embedding=by_id.get(id(outputs.weight)) if outputs is not None else None,
        prefix=model.base_model_prefix or "",
        buffers={name for name, _ in model.named_buffers()},
    )


def tensor_bytes(tensor):
    """A tensor's bytes as a buffer (C order, on the CPU) without copying a contiguous CPU tensor."""
    import torch

    return tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()


class SafetensorsWriter:
    """Writes tensors straight to `folder` in save_pretrained's files: `model.safetensors`, or shards
    `model-0000i-of-0000n.safetensors` plus `model.safetensors.index.json` when they pass
    `max_shard_size`. Names, shapes and dtypes are given up front (each file's header comes first);
    `write` then takes the tensors in that order, so only one is ever in memory."""

    def __init__(
        self, folder: str | Path, specs: list[tuple[str, tuple[int, ...], str]], max_shard_size: int
    ):
        self.folder = Path(folder)
        self.specs = [(name, tuple(shape), dtype) for name, shape, dtype in specs]
        shards, current, current_size = [], [], 0
        for spec in self.specs:
            size = self.nbytes(spec)
            if current and current_size + size > max_shard_size:
                shards.append(current)
                current, current_size = [], 0
            current.append(spec)
            current_size += size
        shards.append(current)
        count = len(shards)
        self.files = (
            ["model.safetensors"]
            if count == 1
            else [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]
        )
        self.shards = shards
        self.total_size = sum(self.nbytes(spec) for spec in self.specs)
        self._shard, self._position, self._handle = -1, 0, None

    @staticmethod
    def nbytes(spec) -> int:
        import math

        import torch

        _, shape, dtype = spec
        return math.prod(shape) * torch.empty(0, dtype=getattr(torch, dtype)).element_size()

    def _open_next_shard(self) -> None:
        self._finish_shard()
        self._shard += 1
        self._position = 0
        header, offset = {}, 0
        for name, shape, dtype in self.shards[self._shard]:
            end = offset + self.nbytes((name, shape, dtype))
            header[name] = {
                "dtype": SAFETENSORS_DTYPES[dtype],
                "shape": list(shape),
                "data_offsets": [offset, end],
            }
            offset = end
        header["__metadata__"] = {"format": "pt"}
        encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
        encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned, as safetensors writes it
        self._handle = open(self.folder / self.files[self._shard], "wb")
        self._handle.write(len(encoded).to_bytes(8, "little"))
        self._handle.write(encoded)

    def _finish_shard(self) -> None:
        if self._handle is not None:
            self._handle.flush()
            os.fsync(self._handle.fileno())
            self._handle.close()
            self._handle = None

    def write(self, name: str, tensor) -> None:
        """Write the next tensor; its name, shape and dtype must be the next ones of `specs`."""
        if self._handle is None or self._position == len(self.shards[self._shard]):
            if self._shard + 1 >= len(self.shards):
                raise ValueError(f"tensor {name} was not announced to the writer")
            self._open_next_shard()
        expected = self.shards[self._shard][self._position]
        got = (name, tuple(tensor.shape), str(tensor.dtype).removeprefix("torch."))
        if got != expected:
            raise ValueError(f"writer expected tensor {expected} next, got {got}")
        self._handle.write(memoryview(tensor_bytes(tensor)))
        self._position += 1

    def close(self) -> list[str]:
        """Finish the last file and write the index (for shards). Returns the file names written."""
        written = self._shard == len(self.shards) - 1 and self._position == len(self.shards[self._shard])
        if not written and self.specs:
            self._finish_shard()
            raise ValueError("the writer was closed before every announced tensor was written")
        self._finish_shard()
        if len(self.files) > 1:
            index = {
                "metadata": {"total_size": self.total_size},
                "weight_map": {
                    name: self.files[i] for i, shard in enumerate(self.shards) for name, _, _ in shard
                },
            }
            (self.folder / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        return list(self.files)

    def abort(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None
