"""Read a saved `torch.export` program (`.pt2`) without running anything it holds.

`torch.export.load` is not safe on a file from elsewhere; its own documentation
warns "uses pickle under the hood to load models. Never load data from an
untrusted source", and in torch 2.13 a `.pt2` archive can make it
* unpickle: weights and constants stored with `use_pickle` are read with
  `torch.load(weights_only=False)`, custom and opaque objects with pickle, and
  the example inputs fall back to `weights_only=False` when the safe load fails;
* load native code: an archive holding `data/aotinductor/` loads the compiled
  shared library in it;
* evaluate text: symbolic shape expressions go through `sympy.sympify` (which
  calls `eval`), and `.module()` runs the program's `guards_code` with `exec`.

`load_program` reads the archive itself and refuses all of that: tensors come
from raw bytes (never pickle), the example inputs are not read, no AOTInductor
entry is accepted, every shape expression must consist of symbol names,
numbers, operators and sympy's own function names, guard code is dropped, and
every graph node must call a torch operator (`torch.ops.*`) or, in a program
traced with dynamic sizes, integer arithmetic on sizes (the `operator` and
`torch.sym_*` functions torch's own deserializer accepts there). What remains is
handed to torch's JSON deserializer. The result maps onto jaxprune layers
(`converters.from_program`) and may be run (`.module()`).
"""
from __future__ import annotations

import io
import json
import logging
import operator
import re
import zipfile
from pathlib import Path

import torch
from torch._export.serde import schema
from torch._export.serde import serialize as _serialize
from torch._export.serde.serialize import (ExportedProgramDeserializer, _dict_to_dataclass,
                                           deserialize_scalar_type, deserialize_size,
                                           deserialize_storage_offset, deserialize_stride)
from torch.export.pt2_archive import constants as C

from jaxprune.errors import UserError

MODEL = "model"  # torch.export.save's name for the program it writes
# Names a shape expression may use: torch's sympy functions and sympy's constructors.
_SYMPY_NAMES = frozenset(
    {name for name, obj in vars(torch.utils._sympy.functions).items() if isinstance(obj, type)}
    | {"Symbol", "Integer", "Rational", "Float", "Eq", "Ne", "Lt", "Le", "Gt", "Ge", "And", "Or",
       "Not", "Add", "Mul", "Pow", "Abs", "oo", "true", "false", "True", "False", "None",
       "positive", "negative", "nonnegative", "nonpositive", "integer", "real", "finite",
       "zero", "nonzero", "even", "odd"})
_TOKEN = re.compile(r"'[A-Za-z_][A-Za-z0-9_]*'|[A-Za-z_][A-Za-z0-9_]*"
                    r"|[0-9]+(?:\.[0-9]+)?(?:[eE][-+]?[0-9]+)?|[-+*/%(),=<> ]")
# Size arithmetic of dynamic-shape programs (`h // 2 + 1`): pure functions on integers.
_SIZE_OPS = frozenset(getattr(_serialize, "_SYM_OPS", ())) | {operator.getitem}
_SYMBOL = re.compile(r"[a-z]+[0-9]+")  # s0, u3: the names torch gives symbolic sizes


def _refuse(path, why: str):
    raise UserError(f"{path}: {why}; jaxprune reads .pt2 files made by torch.export.save that "
                    f"hold plain tensors and ATen ops, and runs nothing else in them")


def _check_expression(path, text: str) -> None:
    """A shape expression is parsed with eval: only harmless tokens may reach it."""
    pos = 0
    for match in _TOKEN.finditer(text):
        if match.start() != pos:
            break
        token = match.group().strip("'")
        if token[:1].isalpha() or token[:1] == "_":
            if token not in _SYMPY_NAMES and not _SYMBOL.fullmatch(token):
                _refuse(path, f"a shape expression names {token!r}")
        pos = match.end()
    if pos != len(text):
        _refuse(path, f"a shape expression holds {text[pos:pos + 20]!r}")


def _expressions(tree):
    if isinstance(tree, dict):
        for key, value in tree.items():
            if key == "expr_str" and isinstance(value, str):
                yield value
            else:
                yield from _expressions(value)
    elif isinstance(tree, list):
        for value in tree:
            yield from _expressions(value)


def _tensors(path, archive: zipfile.ZipFile, root: str, folder: str, config_file: str,
             prefix: str) -> dict[str, torch.Tensor]:
    """The tensors a payload config lists, from their raw bytes."""
    name = root + config_file
    if name not in archive.namelist():
        _refuse(path, f"it has no {config_file}")
    config = _dict_to_dataclass(schema.PayloadConfig, json.loads(archive.read(name)))
    out = {}
    for fqn, meta in config.config.items():
        if meta.use_pickle or not meta.path_name.startswith(prefix) or meta.tensor_meta is None:
            _refuse(path, f"'{fqn}' is stored as a Python object (pickle)")
        tm = meta.tensor_meta
        dtype = deserialize_scalar_type(tm.dtype)
        data = bytearray(archive.read(root + folder + meta.path_name))
        flat = torch.frombuffer(data, dtype=dtype) if data else torch.zeros(0, dtype=dtype)
        tensor = torch.as_strided(flat, deserialize_size(tm.sizes), deserialize_stride(tm.strides),
                                  deserialize_storage_offset(tm.storage_offset))
        out[fqn] = torch.nn.Parameter(tensor, requires_grad=False) if meta.is_param else tensor
    return out


def load_program(path: str | Path) -> "torch.export.ExportedProgram":
    """The `torch.export.ExportedProgram` saved in `path`, read without pickle, native code
    or evaluated text (see the module doc); a UserError naming what the file holds
    otherwise."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"model.source not found: {path} (a .pt2 file from torch.export.save)")
    try:
        archive = zipfile.ZipFile(io.BytesIO(path.read_bytes()))
    except zipfile.BadZipFile:
        _refuse(path, "it is not a .pt2 archive (not a zip file)")
    names = archive.namelist()
    roots = {n.split("/", 1)[0] + "/" for n in names if "/" in n}
    if len(roots) != 1:
        _refuse(path, "it is not a .pt2 archive (no single top folder)")
    root = roots.pop()
    fmt = root + C.ARCHIVE_FORMAT_PATH
    if fmt not in names or archive.read(fmt).decode() != C.ARCHIVE_FORMAT_VALUE:
        _refuse(path, "it is not a .pt2 archive (no archive_format 'pt2')")
    if any(n.startswith(root + C.AOTINDUCTOR_DIR) for n in names):
        _refuse(path, "it holds AOTInductor native code")
    model_file = root + C.MODELS_FILENAME_FORMAT.format(MODEL)
    if model_file not in names:
        _refuse(path, f"it holds no program named '{MODEL}'")
    raw = json.loads(archive.read(model_file))
    for text in _expressions(raw):
        _check_expression(path, text)
    raw["guards_code"] = []  # Python source that .module() would exec
    serialized = _dict_to_dataclass(schema.ExportedProgram, raw)
    weights = _tensors(path, archive, root, C.WEIGHTS_DIR,
                       C.WEIGHTS_CONFIG_FILENAME_FORMAT.format(MODEL), C.WEIGHT_FILENAME_PREFIX)
    constants = _tensors(path, archive, root, C.CONSTANTS_DIR,
                         C.CONSTANTS_CONFIG_FILENAME_FORMAT.format(MODEL),
                         C.TENSOR_CONSTANT_FILENAME_PREFIX)
    # a program traced with dynamic sizes may list symbols of sizes the tracer derived and
    # then dropped; torch warns about each ("did not appear in the graph"), harmlessly
    quiet = logging.getLogger(_serialize.__name__)
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        program = ExportedProgramDeserializer().deserialize(serialized, weights, constants, None)
    except Exception as e:  # a version mismatch or a damaged description
        _refuse(path, f"torch cannot read its program ({type(e).__name__}: "
                      f"{str(e).splitlines()[0] if str(e) else ''})")
    finally:
        quiet.setLevel(level)
    for node in program.graph.nodes:
        if node.op == "get_attr" or (node.op == "call_function" and not (
                isinstance(node.target, torch._ops.OpOverload) or node.target in _SIZE_OPS)):
            _refuse(path, f"graph node '{node.name}' calls {node.target}, not a torch operator")
    return program
