"""Bring your own weights: import a downloaded timm checkpoint as a catalogue backbone's ``file:`` weights.

PROTOCOL.md, "Backbones" (issue #26): without internet, ``weights: hub`` cannot be had, so the checkpoint is
downloaded elsewhere and imported here (docs/weights.md). ``add_weights`` reads it safely (safetensors, or
``torch.load(weights_only=True)``) through timm's own ``load_state_dict``, which unwraps the usual nestings
(``state_dict_ema``, ``model_ema``, ``state_dict``, ``model``) and DDP / ``torch.compile`` prefixes; checks
every key and shape against the catalogue's timm architecture (lenient only where timm is when the fine-tune
loads it with ``num_classes=0``: the classifier); writes ``models/<name>.safetensors``; tracks it with DVC;
and points ``backbones.<backbone>.weights`` in params.yaml at it, changing no other byte of that file.
"""

from __future__ import annotations

import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import safetensors.torch
import timm
import torch
import yaml
from timm.models import load_state_dict

from transferbench.atomic import atomic_path
from transferbench.config import BackboneSettings, ConfigError, Settings, build, load_settings, parse_params
from transferbench.errors import TransferbenchError
from transferbench.models.backbones import create_backbone, effective_img_size

CHECKPOINT_SUFFIXES = (".safetensors", ".pth", ".bin")
MODELS_DIR = "models"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_SHOWN = 10  # keys named per kind of mismatch


class WeightsImportError(TransferbenchError):
    """A checkpoint that cannot be imported: unreadable, or DVC or params.yaml refused the result."""


class CheckpointMismatchError(WeightsImportError):
    """A checkpoint's keys or shapes do not fit its backbone's architecture; the message names them."""


@dataclass(frozen=True)
class ImportedWeights:
    """What ``add_weights`` did (paths relative to the repository: the params file's directory)."""

    backbone: str
    model: str  # the timm model it matches
    source: Path
    target: Path
    weights: str  # the new ``weights:`` value, ``file:models/<name>.safetensors``
    previous: str
    tensors: int
    parameters: int
    existed: bool  # models/<name>.safetensors was there already, with these tensors
    dvc_file: Path | None  # None with ``dvc=False``


def read_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """The state dict in ``path``, read as timm reads pretrained files (never unpickling arbitrary objects)."""
    if path.suffix not in CHECKPOINT_SUFFIXES:
        raise WeightsImportError(f"{path}: expected a timm checkpoint ending in {', '.join(CHECKPOINT_SUFFIXES)}")
    if not path.is_file():
        raise WeightsImportError(f"{path}: no such file")
    try:
        state_dict = load_state_dict(str(path), weights_only=True)  # no arbitrary unpickling
    except Exception as exc:  # noqa: BLE001 -- safetensors, pickle and zip errors have no common base
        raise WeightsImportError(f"{path}: cannot read it as a checkpoint: {type(exc).__name__}: {exc}") from exc
    if not isinstance(state_dict, dict) or not state_dict:
        raise WeightsImportError(f"{path}: holds no state dict (a mapping of parameter names to tensors)")
    others = [k for k, v in state_dict.items() if not isinstance(v, torch.Tensor)]
    if others:
        raise WeightsImportError(f"{path}: {len(others)} entries are not tensors ({_names(others)}); "
                                 "expected a model's state dict")
    return state_dict


def check_architecture(state_dict: dict[str, torch.Tensor], model: str, *, source: Path) -> None:
    """Refuse ``state_dict`` unless it has exactly the keys and shapes of timm's ``model`` (default head and input
    size, as downloaded checkpoints are). The classifier may be absent or of another size: the fine-tune drops it."""
    try:
        with torch.device("meta"):  # shapes only: nothing allocated or initialised, even for paper-sized models
            net = timm.create_model(model, pretrained=False)
    except RuntimeError as exc:
        raise WeightsImportError(f"timm cannot build model {model!r}: {exc}") from exc
    expected = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    classifiers = net.pretrained_cfg.get("classifier") or ()
    lenient = {f"{c}.{p}" for c in ([classifiers] if isinstance(classifiers, str) else classifiers)
               for p in ("weight", "bias")}
    missing = [k for k in expected if k not in state_dict and k not in lenient]
    unexpected = sorted(k for k in state_dict if k not in expected and k not in lenient)
    shapes = [f"{k} (file {list(v.shape)}, model {list(expected[k])})" for k, v in state_dict.items()
              if k in expected and k not in lenient and tuple(v.shape) != expected[k]]
    if missing or unexpected or shapes:
        parts = [f"{len(found)} {kind}: {_names(found)}" for kind, found in
                 (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes)) if found]
        raise CheckpointMismatchError(
            f"{source} does not fit timm model {model!r} ({'; '.join(parts)}). Import a checkpoint of exactly this "
            f"architecture in timm's format (e.g. timm.create_model({model!r}, pretrained=True).state_dict(), or "
            "the model.safetensors of its Hugging Face hub repository)")


def set_weights(params_text: str, backbone: str, value: str) -> str:
    """``params_text`` with ``backbones.<backbone>.weights`` set to ``value`` and every other character kept.

    The value's own characters are replaced in place (or the key added to the entry), so that comments, flow
    style and line wrapping survive: a YAML round-trip dump reflows them."""
    root = yaml.compose(params_text)
    key, entry = _item(root, "backbones", "params")
    if entry is None:
        raise ConfigError("params has no 'backbones' section")
    key, entry = _item(entry, backbone, "backbones")
    if entry is None:
        raise ConfigError(f"backbones.{backbone}: no such backbone in the catalogue")
    if not isinstance(entry, yaml.MappingNode) or entry.start_mark.index < key.end_mark.index:
        raise ConfigError(f"backbones.{backbone}: not a mapping of its own (a YAML alias?); set weights by hand")
    key, node = _item(entry, "weights", f"backbones.{backbone}")
    if node is not None:
        if not isinstance(node, yaml.ScalarNode) or node.start_mark.index < key.end_mark.index:
            raise ConfigError(f"backbones.{backbone}.weights: not a plain value (a YAML alias?); set it by hand")
        quote = node.style if node.style in ("'", '"') else ""
        return params_text[:node.start_mark.index] + quote + value + quote + params_text[node.end_mark.index:]
    if entry.flow_style:  # {model: ..., family: ...}
        close = params_text.rindex("}", 0, entry.end_mark.index)
        return params_text[:close] + f", weights: {value}" + params_text[close:]
    first = entry.value[0][0].start_mark
    line = first.index - first.column
    return params_text[:line] + " " * first.column + f"weights: {value}\n" + params_text[line:]


def add_weights(params: str | Path, backbone: str, checkpoint: str | Path, *, name: str | None = None,
                dvc: bool = True) -> ImportedWeights:
    """Import ``checkpoint`` as ``backbone``'s weights: check it, write ``models/<name>.safetensors`` next to
    ``params``, ``dvc add`` it, point the catalogue entry at it. Nothing is written unless the checks pass, and
    params.yaml changes last, only to a file the settings loader accepts."""
    params, source = Path(params), Path(checkpoint).expanduser()
    settings = load_settings(params)
    entry = settings.backbone(backbone)
    name = name or backbone
    if not _NAME.fullmatch(name):
        raise WeightsImportError(f"--name {name!r}: use letters, digits, '.', '_' and '-' only")
    root = params.resolve().parent
    target = Path(MODELS_DIR) / f"{name}.safetensors"
    weights = f"file:{target.as_posix()}"
    if dvc and not (root / ".dvc").is_dir():
        raise WeightsImportError(f"{root} is not a DVC repository (no .dvc/ there): run `dvc init` in it first, "
                                 "or pass --no-dvc and version the file yourself")
    _validated(set_weights(params.read_text(), backbone, weights), params, backbone, weights)

    state_dict = read_checkpoint(source)
    check_architecture(state_dict, entry.model, source=source)
    _check_loadable(entry, source, img_size=effective_img_size(entry, settings.finetune.img_size))

    existed = (root / target).exists()
    if existed and not _holds(root / target, state_dict):
        # never overwrite weights that runs may have used: the old file is kept until the user removes it
        raise WeightsImportError(f"{target} already holds other weights: import these under another --name, or "
                                 f"remove it first (`dvc remove {target}.dvc` and delete the file; DVC's cache "
                                 "keeps the old version)")
    with atomic_path(root / target) as tmp:
        safetensors.torch.save_file(_storable(state_dict), str(tmp),
                                    metadata={"format": "pt", "timm_model": entry.model, "source": source.name})
    dvc_file = _dvc_add(root, target) if dvc else None
    with atomic_path(params) as tmp:
        tmp.write_text(_validated(set_weights(params.read_text(), backbone, weights), params, backbone, weights))
        load_settings(tmp)  # what every stage will read: never leave a params file they refuse
    return ImportedWeights(backbone=backbone, model=entry.model, source=source, target=target, weights=weights,
                           previous=entry.weights, tensors=len(state_dict),
                           parameters=sum(v.numel() for v in state_dict.values()), existed=existed, dvc_file=dvc_file)


def _item(mapping: yaml.Node, key: str, where: str) -> tuple[yaml.Node | None, yaml.Node | None]:
    if not isinstance(mapping, yaml.MappingNode):
        raise ConfigError(f"{where}: expected a mapping")
    return next(((k, v) for k, v in mapping.value if isinstance(k, yaml.ScalarNode) and k.value == key),
                (None, None))


def _validated(text: str, params: Path, backbone: str, weights: str) -> str:
    """``text`` if it is a valid params file whose ``backbone`` now has ``weights``."""
    try:
        settings = build(Settings, parse_params(text))
    except ConfigError as exc:
        raise ConfigError(f"{params} with backbones.{backbone}.weights: {weights} would be invalid: {exc}") from exc
    if settings.backbone(backbone).weights != weights:
        raise ConfigError(f"{params}: could not set backbones.{backbone}.weights to {weights}; set it by hand")
    return text


def _check_loadable(entry: BackboneSettings, source: Path, *, img_size: int) -> None:
    """Load ``source`` as the fine-tune will (timm's pretrained path, at the catalogue's input size, which may
    resample position embeddings), so a checkpoint timm cannot adapt is refused now rather than mid-study."""
    try:
        create_backbone(entry.model_copy(update={"weights": f"file:{source.resolve()}"}), img_size=img_size)
    except (RuntimeError, ValueError) as exc:
        raise CheckpointMismatchError(f"{source}: timm cannot load it into {entry.model!r} at img_size {img_size}: "
                                      f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from exc


def _holds(path: Path, state_dict: dict[str, torch.Tensor]) -> bool:
    """Whether the safetensors file ``path`` holds exactly ``state_dict`` (an unreadable one holds nothing)."""
    try:
        held = safetensors.torch.load_file(path)
    except Exception:  # noqa: BLE001 -- a truncated or foreign file: not these weights
        return False
    return held.keys() == state_dict.keys() and all(
        v.dtype == state_dict[k].dtype and torch.equal(v, state_dict[k]) for k, v in held.items())


def _storable(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous tensors, none sharing memory with another (safetensors refuses tied or strided views)."""
    seen: set[int] = set()
    out = {}
    for key, tensor in state_dict.items():
        tensor = tensor.detach().contiguous()
        pointer = tensor.untyped_storage().data_ptr()
        out[key] = tensor.clone() if pointer in seen and tensor.numel() else tensor
        seen.add(pointer)
    return out


def _dvc_add(root: Path, target: Path) -> Path:
    done = subprocess.run([sys.executable, "-m", "dvc", "add", target.as_posix()], cwd=root, capture_output=True,
                          text=True, check=False)
    if done.returncode != 0:
        detail = " ".join(line.strip() for line in (done.stderr or done.stdout).splitlines() if line.strip())
        raise WeightsImportError(f"`dvc add {target}` failed in {root} (exit {done.returncode}): "
                                 f"{detail[:1000] or 'no output'}. {target} is written but not tracked and "
                                 "params.yaml is unchanged: fix that and run the command again, or pass --no-dvc")
    return target.with_name(target.name + ".dvc")


def _names(keys: list[str]) -> str:
    shown = ", ".join(keys[:_SHOWN])
    return shown + (f", ... ({len(keys) - _SHOWN} more)" if len(keys) > _SHOWN else "")
