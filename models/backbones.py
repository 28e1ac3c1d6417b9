"""Encoders shared by every model: one interface over torchvision's networks and timm's.

An encoder is an ``nn.Module`` whose ``forward(x)`` returns a list of feature maps,
highest resolution first, with two tuples read from the network when it is built
(never typed in), one entry per feature:

- ``out_channels``: the channels of each feature;
- ``strides``: how much smaller than the input each feature is (with dilation the
  strides stop growing: a ResNet at output stride 8 gives ``(2, 4, 8, 8, 8)``);

and ``pretrained_normalization``: the input ``(mean, std)`` its weights expect, or None;
``weights_notes``: what was unwrapped from its weights file (empty without one).
Decoders read these instead of hard-coding channel counts. Build one with
:func:`build_encoder`; a model's ``backbone`` argument is typed :data:`EncoderName`,
so a misspelled name is reported when the config is validated.

The torchvision encoders are registered in ``BACKBONES`` (``resnet50``, ``mobilenet_v2``...);
any timm model is reachable as ``"timm:<name>"`` (``"timm:convnext_tiny"``), with arguments of
``timm.create_model`` as ``{"type": "timm:vit_small_patch16_224", "args": {"dynamic_img_size": true}}``.

Weights files are read with ``torch.load(weights_only=True)`` (or safetensors); a training
checkpoint's ``state_dict``/``model`` entry and the ``module.``/``backbone.``/``encoder.``
prefixes of wrappers are unwrapped (one log line and one entry of the encoder's
``weights_notes`` say so), and a file that does not hold every tensor of the encoder, by
name and shape, is refused with a CheckpointError that counts what matched.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import os
import urllib.error
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any

import torch
from torch import nn
from torchvision import models as tvm

from utils.errors import CheckpointError, ConfigError
from utils.registry import BACKBONES, Check, did_you_mean, normalize_spec

_log = logging.getLogger(__name__)

OUTPUT_STRIDES = (8, 16, 32)
#: The RGB statistics (0-1 range) of ImageNet, which torchvision's weights were trained with.
IMAGENET_MEAN_STD = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
TIMM_PREFIX = "timm:"
# Side of the blank image run through a new encoder to read its channels and strides.
_PROBE_SIZE = 64


class Encoder(nn.Module):
    """Base of the torchvision encoders: the interface described in the module docstring."""

    out_channels: tuple[int, ...]
    strides: tuple[int, ...]
    pretrained_normalization: tuple[tuple[float, ...], tuple[float, ...]] | None = None

    def _read_shapes(self, in_channels: int) -> None:
        """Set ``out_channels`` and ``strides`` from one forward pass of a blank image.

        Eval mode and no_grad, so batch-norm statistics are not touched.
        """
        training = self.training
        self.eval()
        with torch.no_grad():
            feats = self(torch.zeros(1, in_channels, _PROBE_SIZE, _PROBE_SIZE))
        self.train(training)
        self.out_channels = tuple(f.shape[1] for f in feats)
        self.strides = tuple(_PROBE_SIZE // f.shape[-1] for f in feats)


def set_dilation(block: nn.Module, rate: int) -> None:
    """Give every spatial (k > 1) convolution of ``block`` dilation ``rate``, keeping the size."""
    for conv in block.modules():
        if isinstance(conv, nn.Conv2d) and conv.kernel_size[0] > 1:
            conv.dilation = (rate, rate)
            conv.padding = tuple(rate * (k - 1) // 2 for k in conv.kernel_size)


def dilate_stage(blocks: Sequence[nn.Module], previous: int, dilation: int) -> None:
    """Trade a stage's stride 2 for dilation, in place, keeping its weights.

    Follows torchvision's ``replace_stride_with_dilation``: the stride-2 convolutions
    (in the first block) get stride 1, the first block keeps the ``previous`` rate and
    every later block gets ``dilation``. Unlike torchvision's, it works for any block
    (BasicBlock, inverted residuals), so every encoder family dilates the same way.
    """
    for index, block in enumerate(blocks):
        for conv in block.modules():
            if isinstance(conv, nn.Conv2d) and conv.stride == (2, 2):
                conv.stride = (1, 1)
        set_dilation(block, previous if index == 0 else dilation)


def dilation_plan(stage_strides: Sequence[int], output_stride: int) -> list[tuple[int, int, int]]:
    """``(stage index, previous rate, rate)`` for every stage whose stride exceeds ``output_stride``.

    ``stage_strides`` are the strides the stages reach without dilation; each stage
    past ``output_stride`` doubles the rate instead of halving the resolution.
    """
    plan, rate = [], 1
    for index, stride in enumerate(stage_strides):
        if stride > output_stride:
            plan.append((index, rate, rate * 2))
            rate *= 2
    return plan


def _adapt_first_conv(net: nn.Module, in_channels: int) -> None:
    """Replace the first convolution by one taking ``in_channels`` inputs.

    Its RGB filters are spread over the new channels so a pretrained network
    keeps its response scale: one channel gets their sum (a grey image then looks
    like the same grey RGB image), more channels get them repeated in turn and
    scaled by ``3 / in_channels`` (the rule timm uses).
    """
    parent, name, conv = next((parent, name, child) for parent in net.modules()
                              for name, child in parent.named_children() if isinstance(child, nn.Conv2d))
    new = nn.Conv2d(in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                    conv.dilation, conv.groups, conv.bias is not None)
    with torch.no_grad():
        rgb = conv.weight
        if in_channels == 1:
            new.weight.copy_(rgb.sum(dim=1, keepdim=True))
        else:
            new.weight.copy_(rgb[:, [c % rgb.shape[1] for c in range(in_channels)]] * rgb.shape[1] / in_channels)
        if conv.bias is not None:
            new.bias.copy_(conv.bias)
    setattr(parent, name, new)


def weights_file(name: str, url: str, weights_path: str | None) -> str:
    """The local file of a torchvision network's ImageNet weights.

    ``weights_path`` when given; otherwise the torch hub cache
    (``$TORCH_HOME/hub/checkpoints``), downloading into it when the file is not
    there yet, as torchvision does. Without a network the ConfigError names the
    file, its URL and where to put it.
    """
    if weights_path is not None:
        if not os.path.isfile(weights_path):
            raise ConfigError(f"pretrained: weights_path {weights_path} does not exist")
        return weights_path
    file_name = os.path.basename(url)
    cache_path = os.path.join(torch.hub.get_dir(), "checkpoints", file_name)
    if not os.path.isfile(cache_path):
        os.makedirs(os.path.dirname(cache_path), exist_ok=True)
        try:
            torch.hub.download_url_to_file(url, cache_path, progress=False)
        except (urllib.error.URLError, OSError) as exc:
            raise ConfigError(f"pretrained: the {name} ImageNet weights are not in the torch hub cache and "
                              f"cannot be downloaded ({exc}). Get '{file_name}' ({url}) and put it at "
                              f"{cache_path}, or set weights_path in the model's args to where it is.") from exc
    return cache_path


#: Entries of a training checkpoint that hold the network's state dict, tried in this order.
WRAPPER_KEYS = ("state_dict", "model")
#: Prefixes wrappers put before a network's names: (Distributed)DataParallel, segmentation models.
WRAPPER_PREFIXES = ("module.", "backbone.", "encoder.")


def _one_line(exc: BaseException | str, limit: int = 300) -> str:
    """An error's text on one line, shortened to about ``limit`` characters."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = " ".join(lines) or type(exc).__name__
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _few(names: Sequence[str], count: int = 3) -> str:
    """``a, b, c and 4 more``."""
    shown = ", ".join(names[:count])
    return shown + (f" and {len(names) - count} more" if len(names) > count else "")


def read_weights(path: str) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The state dict a weights file holds, unwrapped from a training checkpoint, and what was unwrapped.

    ``torch.load(..., weights_only=True)`` (``argparse.Namespace``, which timm's training
    checkpoints hold, allowed), or safetensors for a ``.safetensors`` file. A checkpoint's
    ``state_dict`` or ``model`` entry is taken; entries that are not tensors are left out.
    A CheckpointError (one line) names the file when it cannot be read or holds no tensors.
    """
    try:
        if str(path).endswith(".safetensors"):
            from safetensors.torch import load_file
            obj = load_file(str(path), device="cpu")
        else:
            with torch.serialization.safe_globals([argparse.Namespace]):
                obj = torch.load(path, map_location="cpu", weights_only=True)
    # A corrupt file can fail in many ways (UnpicklingError, EOFError, KeyError, RuntimeError).
    except Exception as exc:
        reason = str(exc)
        if "WeightsUnpickler error:" in reason:  # the reason, without advice on loading unsafely
            reason = reason.split("WeightsUnpickler error:", 1)[1].split("Check the documentation")[0]
            reason = f"torch.load(weights_only=True) refuses it ({_one_line(reason.split(' Please use ')[0])})"
        raise CheckpointError(f"cannot read weights file {path}: {_one_line(reason)}") from exc
    taken = []
    while isinstance(obj, dict) and not all(isinstance(v, torch.Tensor) for v in obj.values()):
        key = next((k for k in WRAPPER_KEYS if isinstance(obj.get(k), dict)), None)
        if key is None:
            break
        taken.append(key)
        obj = obj[key]
    if not isinstance(obj, dict):
        raise CheckpointError(f"weights file {path} does not hold a state_dict (got {type(obj).__name__})")
    state = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if not state:
        raise CheckpointError(f"weights file {path} holds no tensors (its entries: {_few([str(k) for k in obj])}); "
                              f"a state_dict, or a checkpoint with one under {' or '.join(WRAPPER_KEYS)}, is "
                              "expected")
    return state, [f"took its {key!r} entry" for key in taken]


def strip_prefixes(state: dict[str, torch.Tensor], known: set[str],
                   normalize: Callable[[str], str] = lambda name: name) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Strip the wrapper prefixes (:data:`WRAPPER_PREFIXES`) that keep ``state``'s names from the network's.

    A prefix is stripped when every name carries it, or when the names that carry it,
    stripped, match more of the network's names (``known``, compared after ``normalize``)
    than the names do as they are; the names without it are then left out (the decoder
    of a segmentation checkpoint). Repeated, so ``module.backbone.`` is stripped too.
    Returns the state dict and what was done, for the log.
    """
    def score(names: Iterable[str]) -> int:
        return sum(normalize(name) in known for name in names)

    notes = []
    while True:
        current, best = score(state), None
        for prefix in WRAPPER_PREFIXES:
            sub = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
            if not sub:
                continue
            fit = score(sub)
            if (fit > current or (len(sub) == len(state) and fit >= current)) and (best is None or fit > best[1]):
                best = (prefix, fit, sub)
        if best is None:
            return state, notes
        prefix, _, sub = best
        left_out = len(state) - len(sub)
        notes.append(f"stripped {prefix!r} from its names"
                     + (f" (left out {left_out} tensor{'s' * (left_out != 1)} without it)" if left_out else ""))
        state = sub


@dataclass
class Loaded:
    """What a weights file gave a network, for :func:`require_fit`.

    Attributes:
        source: the file, as the messages name it (``weights file /path/w.pth``).
        matched: the network's names that were loaded (same name and shape in the file).
        wrong_shape: ``{name: (shape in the file, shape in the network)}``.
        unused: the file's names the network has none of.
        foreign: those of them inside the network's modules (``layer1.2.conv1.weight`` where
            ``layer1`` has two blocks): a file of another network, not one with a part more.
        notes: what was unwrapped, for the log.
        extra: the file's tensors that the network has no place for but a head may use
            (VGG's classifier, which FCN-8s makes its fc6 and fc7).
    """

    source: str
    matched: set[str] = field(default_factory=set)
    wrong_shape: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = field(default_factory=dict)
    unused: list[str] = field(default_factory=list)
    foreign: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    extra: dict[str, torch.Tensor] = field(default_factory=dict)


def load_matching(net: nn.Module, state: dict[str, torch.Tensor], loaded: Loaded):
    """Load into ``net`` the tensors of ``state`` whose name and shape it has; record them in ``loaded``.

    Returns what ``load_state_dict`` returns (the network's names left out, for timm's log)."""
    own = net.state_dict(keep_vars=True)
    fits = {k: v for k, v in state.items() if k in own and tuple(own[k].shape) == tuple(v.shape)}
    loaded.matched |= set(fits)
    loaded.wrong_shape.update({k: (tuple(v.shape), tuple(own[k].shape)) for k, v in state.items()
                               if k in own and k not in fits})
    unused = [k for k in state if k not in own and not k.endswith("num_batches_tracked")]
    loaded.unused += unused
    modules = dict(net.named_modules())
    # The modules that hold tensors (their paths): a name more under one of them is another network's.
    holders = {".".join(parts[:i]) for parts in (k.split(".") for k in own) for i in range(1, len(parts))}

    def foreign(name: str) -> bool:
        parts = name.split(".")
        parent = ".".join(parts[:-1])
        if parent in modules and hasattr(modules[parent], parts[-1]):  # a buffer it does not save
            return False
        return any(".".join(parts[:i]) in holders for i in range(1, len(parts)))

    loaded.foreign += [k for k in unused if foreign(k)]
    return nn.Module.load_state_dict(net, fits, strict=False)


def require_fit(own: Iterable[str], loaded: Loaded, what: str) -> None:
    """A CheckpointError (one line) unless every one of the encoder's tensors ``own`` was loaded.

    ``num_batches_tracked`` counters are not weights and do not count. A file may hold
    more than the encoder (a classifier head): only the encoder's own tensors must be there.
    """
    own = [name for name in own if not name.endswith("num_batches_tracked")]
    missing = [name for name in own if name not in loaded.matched]
    if not missing and not loaded.foreign:
        return
    if not missing:
        raise CheckpointError(f"{loaded.source}: all {len(own)} tensors of {what} match by name and shape, but "
                              f"the file has {len(loaded.foreign)} more inside its modules "
                              f"({_few(loaded.foreign)}): it holds another network's weights. "
                              "Check weights_path and backbone")
    wrong = [name for name in missing if name in loaded.wrong_shape]
    absent = [name for name in missing if name not in loaded.wrong_shape]
    details = []
    if wrong:
        details.append("wrong shape: " + _few([f"{name} (file {loaded.wrong_shape[name]}, network "
                                               f"{tuple(loaded.wrong_shape[name][1])})" for name in wrong]))
    if absent:
        details.append("not in the file: " + _few(absent))
    if loaded.unused:
        details.append(f"the file has {len(loaded.unused)} other{'s' * (len(loaded.unused) != 1)}: "
                       + _few(loaded.unused))
    raise CheckpointError(f"{loaded.source}: {len(own) - len(missing)} of {len(own)} tensors of {what} match "
                          f"by name and shape ({'; '.join(details)}); it does not hold this network's weights. "
                          "Check weights_path and backbone")


def _note(encoder: nn.Module, loaded: Loaded) -> None:
    """Log what was unwrapped from the file in one line and keep it in ``encoder.weights_notes``."""
    if loaded.notes:
        note = f"{loaded.source}: {', '.join(loaded.notes)}"
        encoder.weights_notes.append(note)
        _log.info(note)


def load_state(net: nn.Module, path: str, unused: tuple[str, ...] = ()) -> Loaded:
    """Load the weights file ``path`` into ``net`` by name and shape; what was loaded, for :func:`require_fit`.

    The file is unwrapped (:func:`read_weights`, :func:`strip_prefixes`); tensors of the
    ``unused`` prefixes (a classifier the encoder has no use for) are not reported as unused.
    """
    state, notes = read_weights(path)
    state, stripped = strip_prefixes(state, set(net.state_dict()))
    loaded = Loaded(f"weights file {path}", notes=notes + stripped)
    load_matching(net, state, loaded)
    if unused:
        loaded.unused = [k for k in loaded.unused if not k.startswith(unused)]
        loaded.foreign = [k for k in loaded.foreign if not k.startswith(unused)]
        loaded.extra = {k: v for k, v in state.items() if k.startswith(unused)}
    return loaded


class ResNetEncoder(Encoder):
    """A torchvision ResNet/ResNeXt without its classifier: stem, layer1 ... layer4.

    Module names are torchvision's, so its state dicts map one to one.

    Shape:
        ``(N, C, H, W)`` -> five maps at strides ``(2, 4, 8, 16, 32)`` (OS 32),
        ``(2, 4, 8, 16, 16)`` (OS 16) or ``(2, 4, 8, 8, 8)`` (OS 8).
    """

    def __init__(self, net: tvm.ResNet, output_stride: int, in_channels: int) -> None:
        super().__init__()
        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4
        for index, previous, rate in dilation_plan((4, 8, 16, 32), output_stride):
            dilate_stage(list(getattr(self, f"layer{index + 1}")), previous, rate)
        self._read_shapes(in_channels)

    def stages(self) -> list[nn.Sequential]:
        """layer1 ... layer4, the stages made of residual blocks."""
        return [self.layer1, self.layer2, self.layer3, self.layer4]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        stem = self.relu(self.bn1(self.conv1(x)))
        feats = [stem, self.layer1(self.maxpool(stem))]
        for layer in (self.layer2, self.layer3, self.layer4):
            feats.append(layer(feats[-1]))
        return feats


class FeaturesEncoder(Encoder):
    """A torchvision network whose ``features`` is a plain sequence (MobileNets, VGG).

    The stages are found from the network: a module that halves the resolution
    starts a new stage. MobileNets end a stage with the last block before the next
    downsampling (``tap="before"``, as their inverted residuals downsample first);
    VGG's stages end with their max-pool (``tap="after"``: pool1 ... pool5).

    Shape:
        ``(N, C, H, W)`` -> five maps at strides ``(2, 4, 8, 16, 32)`` at OS 32.
    """

    def __init__(self, features: nn.Sequential, output_stride: int, in_channels: int, tap: str) -> None:
        super().__init__()
        self.features = features
        starts = self._downsamplers(in_channels)
        stage_ends = starts[1:] + [len(features)]
        for index, previous, rate in dilation_plan([2 ** (i + 1) for i in range(len(starts))], output_stride):
            dilate_stage(list(features[starts[index]:stage_ends[index]]), previous, rate)
        self.taps = starts if tap == "after" else [end - 1 for end in stage_ends]
        self._read_shapes(in_channels)

    def _downsamplers(self, in_channels: int) -> list[int]:
        """Indices of the modules of ``features`` that halve the resolution."""
        self.eval()
        x, starts = torch.zeros(1, in_channels, _PROBE_SIZE, _PROBE_SIZE), []
        with torch.no_grad():
            for index, module in enumerate(self.features):
                size = x.shape[-1]
                x = module(x)
                if x.shape[-1] < size:
                    starts.append(index)
        self.train()
        return starts

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = []
        for index, module in enumerate(self.features):
            x = module(x)
            if index in self.taps:
                feats.append(x)
        return feats


#: Arguments of timm.create_model that an encoder sets from its own arguments: not encoder args.
RESERVED_TIMM_ARGS = {"features_only": "the encoder (always true)", "pretrained": "pretrained",
                      "in_chans": "in_channels", "output_stride": "output_stride",
                      "pretrained_cfg": "weights_path", "pretrained_cfg_overlay": "weights_path",
                      "checkpoint_path": "weights_path", "cache_dir": "weights_path"}


def _timm_names(name: str) -> str:
    """A name of a timm network's state dict as it reads before ``features_only`` flattens its
    sequences (``layers_0.blocks`` -> ``layers.0.blocks``): how file and network names are compared."""
    return name.replace("_", ".")


@contextlib.contextmanager
def _recording_timm_loads() -> Iterator[list[tuple[dict[int, str], Loaded]]]:
    """Within: timm's ``load_pretrained`` loads only the tensors that fit by name and shape, and says which.

    timm loads non-strictly whenever ``features_only`` drops a classifier, so a file of other
    names loads nothing without an error. Here its final state dict (after timm's own
    conversions: the model's checkpoint filter, the first convolution's channels) is loaded
    by :func:`load_matching` instead, and each load is recorded as ``({id(tensor): name}, Loaded)``
    over the whole network, before ``features_only`` keeps a part of it under other names:
    the tensors are the same objects, so :func:`_require_timm_fit` finds them by identity.
    """
    from timm.models import _builder

    records: list[tuple[dict[int, str], Loaded]] = []
    original = getattr(_builder, "load_pretrained", None)
    if original is None:  # another timm layout: loads go unchecked (_require_timm_fit says so)
        yield records
        return

    def load_pretrained(model: nn.Module, *args, **kwargs) -> None:
        loaded = Loaded("")
        names = {id(t): k for k, t in model.state_dict(keep_vars=True).items()}

        def load_state_dict(state_dict, strict=True, assign=False):
            return load_matching(model, dict(state_dict), loaded)

        model.load_state_dict = load_state_dict
        try:
            original(model, *args, **kwargs)
        finally:
            del model.load_state_dict
        records.append((names, loaded))

    _builder.load_pretrained = load_pretrained
    try:
        yield records
    finally:
        _builder.load_pretrained = original


def _require_timm_fit(encoder: nn.Module, net: nn.Module, records: list, source: str, what: str) -> None:
    """:func:`require_fit` for a timm network: its tensors, by identity, among what timm loaded."""
    if not records:  # a model with a loader of its own (timm's custom_load): nothing to check it by
        _log.warning(f"{source}: timm loaded {what} by a loader of its own; which tensors it set is not known")
        return
    names, loaded = records[-1]
    loaded.source = source
    own = {k: v for k, v in net.state_dict(keep_vars=True).items() if not k.endswith("num_batches_tracked")}
    require_fit([names.get(id(t), k) for k, t in own.items()], loaded, what)
    _note(encoder, loaded)


def create_timm_features(encoder: nn.Module, name: str, pretrained: bool, weights_path: str | None,
                         in_channels: int, **args) -> nn.Module:
    """``timm.create_model(name, features_only=True, ...)`` with the framework's errors, for every timm encoder.

    Pretrained weights come from timm's cache (downloaded into it when online) or from the local
    file ``weights_path`` (unwrapped as :func:`read_weights` and :func:`strip_prefixes` say, then
    converted by timm as its own files are). Either is refused unless it sets every tensor of the
    network (see :func:`require_fit`). Sets ``out_channels``, ``strides``,
    ``pretrained_normalization`` and ``weights_notes`` on ``encoder`` from the network's
    ``feature_info`` and ``pretrained_cfg``; returns the network.
    """
    import timm  # imported on demand: it takes seconds and most runs do not need it

    args = {"features_only": True, "in_chans": in_channels, **args}
    encoder.weights_notes = []
    what = f"timm model '{name}'"
    source, notes = f"timm's pretrained weights of '{name}'", []
    if pretrained and weights_path is not None:
        if not os.path.isfile(weights_path):
            raise ConfigError(f"pretrained: weights_path {weights_path} does not exist")
        state, notes = read_weights(weights_path)
        if any(k.startswith(WRAPPER_PREFIXES) for k in state):
            with torch.device("meta"):  # the network's names, for free
                probe = timm.create_model(name, pretrained=False, **args)
            state, stripped = strip_prefixes(state, {_timm_names(k) for k in probe.state_dict()}, _timm_names)
            notes += stripped
        args["pretrained_cfg_overlay"] = {"state_dict": state}
        source = f"weights file {weights_path}"
    try:
        with _recording_timm_loads() as records:
            net = timm.create_model(name, pretrained=pretrained, **args)
    except Exception as exc:  # timm and huggingface_hub raise many types for a missing or bad file
        if weights_path is not None:
            raise CheckpointError(f"cannot load weights file {weights_path} into {what}: {_one_line(exc)}") from exc
        from huggingface_hub.constants import HF_HUB_CACHE
        raise ConfigError(f"pretrained: the weights of timm model '{name}' are not in timm's cache "
                          f"({HF_HUB_CACHE}) and cannot be downloaded ({type(exc).__name__}: {_one_line(exc)}). "
                          f"Download them on a machine with a network (timm.create_model('{name}', "
                          f"pretrained=True) fills that cache) and copy the cache over, or set "
                          f"weights_path in the model's args to a local weights file.") from exc
    finally:
        args.pop("pretrained_cfg_overlay", None)
    # timm keeps the configuration it loaded from, our state dict included, on the network: drop it.
    for module in net.modules():
        for attr in ("pretrained_cfg", "default_cfg"):
            if isinstance(getattr(module, attr, None), dict):
                getattr(module, attr).pop("state_dict", None)
    if pretrained:
        for record in records:
            record[1].notes = notes
        _require_timm_fit(encoder, net, records, source, what)
    encoder.out_channels = tuple(net.feature_info.channels())
    encoder.strides = tuple(net.feature_info.reduction())
    cfg = net.pretrained_cfg
    encoder.pretrained_normalization = ((tuple(cfg["mean"]), tuple(cfg["std"]))
                                        if pretrained and in_channels == 3 else None)
    return net


def _timm_args(args: dict[str, Any]) -> dict[str, Any]:
    """Encoder args from a JSON config, as timm takes them: lists become tuples (``img_size``)."""
    return {k: tuple(v) if isinstance(v, list) else v for k, v in args.items()}


class TimmEncoder(nn.Module):
    """Any timm model through ``features_only=True``; channels and strides from its ``feature_info``.

    Pretrained weights come from timm's own cache (the Hugging Face hub cache),
    downloaded into it when online; ``weights_path`` loads a local file instead.
    ``in_channels`` and ``output_stride`` are passed to timm, which adapts the
    first convolution and dilates where the architecture allows it (only when the
    network's features go coarser than ``output_stride``: a ViT's are all at 16).
    ``args`` are further arguments of ``timm.create_model`` (``img_size``,
    ``dynamic_img_size``, ``out_indices``...).

    Features that timm gives channels-last (Swin, MambaOut: ``output_fmt`` NHWC) are
    returned channels-first like every encoder's, as views.
    """

    def __init__(self, name: str, output_stride: int, pretrained: bool, weights_path: str | None,
                 in_channels: int, args: dict[str, Any] | None = None) -> None:
        super().__init__()
        import timm  # imported on demand: it takes seconds and most runs do not need it

        self.name = name
        args = _timm_args(args or {})
        given = f" and args {args}" if args else ""
        dilation: dict[str, int] = {}
        errors = (ValueError, TypeError, AssertionError, RuntimeError, NotImplementedError, KeyError)
        try:  # a bad combination (output stride, channels, args) is found on the meta device, for free
            with torch.device("meta"):
                probe = timm.create_model(name, pretrained=False, features_only=True, in_chans=in_channels, **args)
        except errors as exc:
            raise ConfigError(f"timm model '{name}' cannot be built with in_channels {in_channels}{given}: "
                              f"{_one_line(exc)}") from exc
        reached = max(probe.feature_info.reduction())
        if reached > output_stride:  # dilated by timm, where the network allows it
            dilation = {"output_stride": output_stride}
            try:
                with torch.device("meta"):
                    timm.create_model(name, pretrained=False, features_only=True, in_chans=in_channels,
                                      **dilation, **args)
            except errors as exc:
                raise ConfigError(f"timm model '{name}' cannot be built with output_stride {output_stride}: its "
                                  f"features reach stride {reached} and timm cannot dilate it ({_one_line(exc)}); "
                                  f"set output_stride to {reached}") from exc
        self.net = create_timm_features(self, name, pretrained, weights_path, in_channels, **dilation, **args)
        self.channels_last = str(getattr(self.net, "output_fmt", "NCHW")) in ("NHWC", "Format.NHWC")

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        try:
            feats = self.net(x)
        except AssertionError as exc:  # timm's patch embedding of a network built for one input size
            if "doesn't match model" not in str(exc):
                raise
            raise ConfigError(
                f"timm model '{self.name}' was built for one input size and got a {x.shape[-2]}x{x.shape[-1]} "
                f"input ({exc}): give the backbone the timm argument dynamic_img_size to take any size "
                f'("backbone": {{"type": "timm:{self.name}", "args": {{"dynamic_img_size": true}}}}), or '
                "img_size [height, width] for another fixed one") from exc
        if self.channels_last:
            return [f.permute(0, 3, 1, 2) for f in feats]
        return list(feats)


def _vgg16_bn_features(weights: None = None) -> nn.Module:
    """torchvision's VGG16-BN without its classifier: 120M parameters an encoder would drop.

    Its ``features`` are torchvision's (same layers, names and initialisation).
    """
    net = nn.Module()
    net.features = tvm.vgg.make_layers(tvm.vgg.cfgs["D"], batch_norm=True)
    for conv in net.features.modules():
        if isinstance(conv, nn.Conv2d):
            nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(conv.bias)
    return net


def _torchvision(make: Callable[..., nn.Module], imagenet: tvm.WeightsEnum, wrap: Callable,
                 output_strides: tuple[int, ...], name: str | None = None,
                 unused: tuple[str, ...] = (), classifier: tuple[str, ...] = ()) -> Callable[..., Encoder]:
    """A builder of one torchvision encoder: network, ImageNet weights, channel adaptation, wrapper.

    ``unused``: prefixes of the weights file's tensors that the network has no place for (a
    classifier it drops); ``classifier``: those of them the encoder keeps, when built with
    ``keep_classifier``, as ``classifier_state`` for a head that can use them (FCN-8s).
    """
    def build(output_stride: int = 32, pretrained: bool = False, weights_path: str | None = None,
              in_channels: int = 3, keep_classifier: bool = False) -> Encoder:
        if output_stride not in output_strides:
            raise ConfigError(f"output_stride {output_stride} is not available for {name}: choose "
                              f"{' or '.join(map(str, output_strides))}")
        net = make(weights=None)
        loaded = load_state(net, weights_file(name, imagenet.url, weights_path), unused) if pretrained else None
        if in_channels != 3:
            _adapt_first_conv(net, in_channels)
        encoder = wrap(net, output_stride, in_channels)
        encoder.weights_notes = []
        if loaded is not None:
            require_fit(encoder.state_dict(), loaded, f"torchvision's {name}")
            _note(encoder, loaded)
            if keep_classifier and classifier:
                encoder.classifier_state = {k: v for k, v in loaded.extra.items() if k.startswith(classifier)}
                encoder.classifier_source = loaded.source
        # ImageNet's RGB statistics say nothing about other channels: the data set's are used then.
        encoder.pretrained_normalization = IMAGENET_MEAN_STD if pretrained and in_channels == 3 else None
        return encoder

    name = name or make.__name__
    build.__name__ = name
    build.__doc__ = f"torchvision's {name} as an encoder; see :func:`build_encoder`."
    build.keeps_classifier = bool(classifier)
    return build


def _mobilenet(net: nn.Module, output_stride: int, in_channels: int) -> FeaturesEncoder:
    return FeaturesEncoder(net.features, output_stride, in_channels, tap="before")


def _vgg(net: nn.Module, output_stride: int, in_channels: int) -> FeaturesEncoder:
    return FeaturesEncoder(net.features, output_stride, in_channels, tap="after")


for _make, _weights, _wrap, _strides in [
    (tvm.resnet18, tvm.ResNet18_Weights.IMAGENET1K_V1, ResNetEncoder, OUTPUT_STRIDES),
    (tvm.resnet34, tvm.ResNet34_Weights.IMAGENET1K_V1, ResNetEncoder, OUTPUT_STRIDES),
    (tvm.resnet50, tvm.ResNet50_Weights.IMAGENET1K_V1, ResNetEncoder, OUTPUT_STRIDES),
    (tvm.resnet101, tvm.ResNet101_Weights.IMAGENET1K_V1, ResNetEncoder, OUTPUT_STRIDES),
    (tvm.resnet152, tvm.ResNet152_Weights.IMAGENET1K_V1, ResNetEncoder, OUTPUT_STRIDES),
    (tvm.resnext50_32x4d, tvm.ResNeXt50_32X4D_Weights.IMAGENET1K_V1, ResNetEncoder, OUTPUT_STRIDES),
    (tvm.resnext101_32x8d, tvm.ResNeXt101_32X8D_Weights.IMAGENET1K_V1, ResNetEncoder, OUTPUT_STRIDES),
    (tvm.mobilenet_v2, tvm.MobileNet_V2_Weights.IMAGENET1K_V1, _mobilenet, OUTPUT_STRIDES),
    (tvm.mobilenet_v3_large, tvm.MobileNet_V3_Large_Weights.IMAGENET1K_V1, _mobilenet, OUTPUT_STRIDES),
]:
    BACKBONES.register(_torchvision(_make, _weights, _wrap, _strides), name=_make.__name__)
# VGG has no residual stages to dilate without changing what its weights compute: stride 32 only.
BACKBONES.register(_torchvision(_vgg16_bn_features, tvm.VGG16_BN_Weights.IMAGENET1K_V1, _vgg, (32,),
                                name="vgg16_bn", unused=("classifier.",),
                                classifier=("classifier.0.", "classifier.3.")), name="vgg16_bn")


def encoder_spec(backbone: str | dict) -> tuple[str, dict[str, Any]]:
    """``(name, args)`` of a ``backbone`` value: a name, or ``{"type": name, "args": {...}}``."""
    if isinstance(backbone, dict):
        return backbone["type"], dict(backbone.get("args") or {})
    return backbone, {}


def _check_name(name: str, path: str) -> None:
    if name.startswith(TIMM_PREFIX):
        import timm

        model = name[len(TIMM_PREFIX):]
        choices = timm.list_models()
        if model.split(".")[0] not in choices:  # a pretrained tag may follow: convnext_tiny.fb_in1k
            raise ConfigError(f"{path}: unknown timm model '{model}'.{did_you_mean(model, choices)} "
                              "timm.list_models() lists them")
        return
    if name not in BACKBONES:
        raise ConfigError(f"{path}: unknown backbone '{name}'.{did_you_mean(name, BACKBONES.names())} "
                          f"Available: {', '.join(BACKBONES.names())}, or '{TIMM_PREFIX}<name>' for any "
                          "timm model")


def check_encoder_name(backbone: str | dict, path: str) -> None:
    """Config validation of a ``backbone`` argument.

    A registered name or ``timm:<model>``; or, to pass arguments to ``timm.create_model``,
    ``{"type": "timm:<model>", "args": {...}}`` (``img_size``, ``dynamic_img_size``...).
    The arguments an encoder sets itself (:data:`RESERVED_TIMM_ARGS`) are refused, as are
    arguments for the torchvision and HRNet encoders, which take none.
    """
    if not isinstance(backbone, dict):
        _check_name(backbone, path)
        return
    spec = normalize_spec(backbone, path)
    _check_name(spec["type"], f"{path}.type")
    if spec["args"] and not spec["type"].startswith(TIMM_PREFIX):
        raise ConfigError(f"{path}.args: arguments are only for timm backbones ('{TIMM_PREFIX}<name>'), which "
                          f"pass them to timm.create_model; '{spec['type']}' takes none")
    for key in spec["args"]:
        if key in RESERVED_TIMM_ARGS:
            raise ConfigError(f"{path}.args.{key}: set by the encoder from the model's argument "
                              f"{RESERVED_TIMM_ARGS[key]}; remove it from the backbone's args")


#: The type of a model's ``backbone`` argument, checked when the config is validated: a name, or
#: ``{"type": "timm:<model>", "args": {...}}`` with arguments of ``timm.create_model``.
EncoderName = Annotated[str | dict[str, Any], Check(check_encoder_name)]
#: The same for models whose ``backbone`` may be null (an encoder of their own).
OptionalEncoderName = Annotated[str | dict[str, Any] | None,
                                Check(lambda name, path: name is None or check_encoder_name(name, path))]


def build_encoder(name: EncoderName, *, output_stride: int = 32, pretrained: bool = False,
                  weights_path: str | None = None, in_channels: int = 3,
                  keep_classifier: bool = False) -> nn.Module:
    """Build an encoder.

    Args:
        name: a registered torchvision encoder (``resnet50``, ``mobilenet_v3_large``,
            ``vgg16_bn``...) or ``"timm:<model>"``; or ``{"type": "timm:<model>", "args": {...}}``
            to pass arguments to ``timm.create_model`` (``{"dynamic_img_size": true}`` lets a
            ViT or a Swin take any input size).
        output_stride: 8, 16 or 32 where the network allows it (by dilation); others
            are a ConfigError naming the choices.
        pretrained: load ImageNet weights: torchvision's from the torch hub cache
            (``$TORCH_HOME/hub/checkpoints``), timm's from its Hugging Face cache;
            downloaded into that cache when missing and the machine is online.
        weights_path: a local weights file to load instead of the cache (a torchvision
            classification state dict, or a timm checkpoint; a training checkpoint's
            ``state_dict``/``model`` entry and ``module.``/``backbone.``/``encoder.`` prefixes
            are unwrapped). A file that does not hold every tensor of the encoder is refused.
        in_channels: image channels; the first convolution is adapted when not 3.
        keep_classifier: keep, as ``classifier_state``, the pretrained fully connected layers
            that a head can reuse (VGG16-BN's ``classifier.0`` and ``classifier.3``, which
            FCN-8s makes its fc6 and fc7); the other encoders have none.

    Returns:
        The encoder (see the module docstring for its interface); its ``weights_notes`` list
        what was unwrapped from the weights file (also logged).
    """
    check_encoder_name(name, "backbone")
    name, args = encoder_spec(name)
    if weights_path is not None and not pretrained:
        raise ConfigError("weights_path is set but pretrained is false; set pretrained to true to load "
                          "it, or remove weights_path")
    if in_channels < 1:
        raise ConfigError(f"in_channels must be at least 1, got {in_channels}")
    if name.startswith(TIMM_PREFIX):
        return TimmEncoder(name[len(TIMM_PREFIX):], output_stride, pretrained, weights_path, in_channels, args)
    build = BACKBONES.get(name, "backbone")
    keep = {"keep_classifier": True} if keep_classifier and getattr(build, "keeps_classifier", False) else {}
    return build(output_stride=output_stride, pretrained=pretrained, weights_path=weights_path,
                 in_channels=in_channels, **keep)


def feature_at_stride(encoder: nn.Module, stride: int, or_coarser: bool = False) -> int:
    """Index of the ``encoder`` feature that a decoder takes at ``stride`` (4: the 1/4-resolution one).

    By default the last feature at exactly ``stride`` (the deepest, where a dilated
    encoder has several): the skip a decoder fuses at that resolution (DeepLabV3+'s
    stride-4 one, FCN-8s's stride-8 and 16 ones); a ConfigError if there is none.
    With ``or_coarser`` the first feature at ``stride`` or coarser: where a pyramid
    that starts at that resolution starts (FPN, UPerNet and GCN from stride 4, so a
    stem's stride-2 map is left out), its first feature when all are coarser.
    """
    strides = tuple(encoder.strides)
    if or_coarser and strides[-1] >= stride:
        return next(index for index, s in enumerate(strides) if s >= stride)
    if stride not in strides:
        raise ConfigError(f"the decoder needs a stride-{stride} feature, but this backbone's features have "
                          f"strides {strides}; use a backbone (or output_stride) that has one")
    return len(strides) - 1 - strides[::-1].index(stride)
