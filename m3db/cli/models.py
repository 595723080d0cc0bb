"""The command line's models: your own --model (and --adapter), the bundled decoder to train,
and the checks on their arguments that run before anything loads.

Every mistake a user can make with --model ends here as an M3DBError naming the flag and the
fix, never a traceback from transformers, safetensors or gguf (main prints `error: ...`).
"""

import copy
import importlib
import os
import sys

from ..errors import DependencyError, InvalidInputError, M3DBError, SpecMismatchError

# a reference is at most this many tokens (the memory settings' reference_length), so keeping
# more tokens per head than this keeps nothing more
MAX_TOKENS_PER_HEAD = 128


def say(text) -> None:
    """A line for the user on stderr (stdout holds the result)."""
    print(text, file=sys.stderr, flush=True)


def adapter_settings(adapter):
    """The memory settings a reader adapter file was trained for (its header), as
    `MemorySettings`, so that an adapter trained with --layers or --tokens-per-head reads with
    what it learnt instead of being refused for not matching the sparse mode's defaults."""
    from ..model.adapter import AdapterError, read_header
    from ..model.settings import MemorySettings

    if not os.path.isfile(adapter):
        return None  # from_pretrained names the missing file
    try:
        saved = read_header(adapter).get("settings") or {}
    except AdapterError as e:
        raise InvalidInputError(f"--adapter {adapter}: {e}") from e
    if not saved.get("memory_layers"):
        return None  # an adapter from before headers named settings: the sparse mode's
    fields = {k: saved[k] for k in ("tokens_per_head", "reference_prefix", "position_policy") if k in saved}
    return MemorySettings(memory_layers=tuple(saved["memory_layers"]), **fields)


def own_model(path, memory_mode=None, adapter=None, device="cpu"):
    """An HFMemoryModel loaded from a local folder or GGUF file, its errors as m3db's. adapter: a
    reader adapter file for it, which means the sparse mode, in the settings it was trained for."""
    if adapter is not None and memory_mode not in (None, "sparse"):
        raise InvalidInputError(f"--adapter reads the sparse memory mode, not --memory-mode {memory_mode}")
    mode = "sparse" if adapter is not None else (memory_mode or "dense")
    try:
        from ..bindings.transformers import HFMemoryModel
    except ImportError as e:
        raise DependencyError(f"--model needs the transformers extra ({e}): pip install 'm3db[transformers]'") from e
    settings = adapter_settings(adapter) if adapter is not None else None
    say(f"loading {path} through transformers ...")
    try:
        return HFMemoryModel.from_pretrained(path, memory_mode=mode, adapter=adapter, device=device, settings=settings)
    except (M3DBError, OSError, KeyboardInterrupt, MemoryError):
        raise
    except (ValueError, NotImplementedError) as e:
        if "reshape" not in str(e):
            raise InvalidInputError(f"--model {path}: {e}") from e
        raise _unreadable(path, e) from e  # a truncated GGUF's tensor data
    except Exception as e:  # noqa: BLE001 (struct.error, SafetensorError, ...: a damaged file)
        raise _unreadable(path, e) from e


def _unreadable(path, e) -> InvalidInputError:
    kind = type(e).__name__
    kind = f"{type(e).__module__}.{kind}" if kind == "error" else kind  # struct.error, not "error"
    return InvalidInputError(
        f"--model {path}: could not read the weights ({kind}: {e}); is the file complete? Copy or download it again"
    )


def model_from(args, memory_mode=None):
    """The model that --model (and --adapter) name, or None for the bundled one."""
    adapter = getattr(args, "adapter", None)
    if adapter is not None and not args.model:
        raise InvalidInputError(
            "--adapter needs --model: it is a reader adapter for your own model (the bundled decoder reads "
            "its bundled adapter in the sparse mode by itself)"
        )
    return own_model(args.model, memory_mode, adapter) if args.model else None


def explain_mismatch(error: SpecMismatchError, path, model, adapter) -> M3DBError:
    """A clearer error when your own model built the knowledge base in another memory mode:
    the same weights (fingerprint) with other memory settings means its sparse mode (or dense
    mode), which needs (or must not have) the reader adapter it was built with."""
    from ..database import connect

    if model is None:
        return error
    try:
        with connect(path, read_only=True) as peek:
            spec = peek.spec
    except (M3DBError, OSError):
        return error
    if spec.model_fingerprint != model.fingerprint:
        return error
    built = f"memory_layers {list(spec.memory_layers)}, tokens_per_head {spec.tokens_per_head}"
    if adapter is None:
        return InvalidInputError(
            f"{path} was built by this model in its sparse memory mode ({built}), which reads through a reader "
            "adapter: pass --adapter with the one it was built with (--model PATH --adapter RUN/adapter.safetensors)"
        )
    return InvalidInputError(
        f"{path} was built by this model with other memory settings ({built}) than --adapter {adapter} was "
        "trained for: pass the adapter it was built with (or none, for a dense knowledge base)"
    )


def check_train_arguments(args):
    """--layers as a tuple (or None) after checking what `m3db train` was given, before any model
    loads: a mistake found after minutes of loading and evaluating wastes them."""
    layers = layers_of(args.layers) if args.layers else None
    if args.minutes is not None and args.minutes <= 0:
        raise InvalidInputError(f"--minutes {args.minutes}: expected a positive number of minutes")
    if not 1 <= args.tokens_per_head <= MAX_TOKENS_PER_HEAD:
        raise InvalidInputError(
            f"--tokens-per-head {args.tokens_per_head}: expected 1..{MAX_TOKENS_PER_HEAD} "
            f"(a reference is at most {MAX_TOKENS_PER_HEAD} tokens)"
        )
    for flag, value in (("--steps", args.steps), ("--batch-size", args.batch_size), ("--eval-every", args.eval_every)):
        if value < 1:
            raise InvalidInputError(f"{flag} {value}: expected a positive whole number")
    if not args.lr > 0:
        raise InvalidInputError(f"--lr {args.lr}: expected a positive learning rate, e.g. 1e-3")
    if args.rank < 1:
        raise InvalidInputError(f"--rank {args.rank}: expected a positive whole number, e.g. 8")
    return layers


def layers_of(text):
    """'0-14' or '0,5,10' -> a tuple of layer numbers."""
    out = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        try:
            span = range(int(lo), int(hi) + 1) if hi else [int(lo)]
        except ValueError:
            raise InvalidInputError(f"--layers {text!r}: expected ranges and numbers such as 0-14 or 0,5,10") from None
        if not span:  # 3-1 would silently mean no layers, and the default would stand in
            raise InvalidInputError(f"--layers {text!r}: the range {part} is empty; write it low-high, e.g. 1-3")
        out.extend(span)
    return tuple(out)


def bundled_for_training(layers, tokens_per_head, device):
    """The bundled decoder in the memory settings to train for, on `device`."""
    from ..knowledge.bundled import bundled
    from ..model.memory_model import MemoryModel
    from ..model.settings import MemorySettings

    base, _ = bundled()
    layers = layers or MemorySettings.sparse(base.decoder.cfg.n_layer).memory_layers
    settings = MemorySettings(memory_layers=layers, tokens_per_head=tokens_per_head)
    # a copy of the shared bundled decoder moves to the device, never the shared one
    decoder = copy.deepcopy(base.decoder).to(device) if device.type != "cpu" else base.decoder
    return MemoryModel(decoder, base.tokenizer, fingerprint=base.fingerprint, settings=settings)


def training_device(name: str):
    """--device as a torch device, refused clearly when this machine has no such device."""
    import torch

    try:
        device = torch.device(name)
    except RuntimeError:
        raise InvalidInputError(f"--device {name!r}: expected cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InvalidInputError(f"--device {name}: this machine has no CUDA GPU that torch can use; train on cpu")
    if device.type not in ("cpu", "cuda"):
        raise InvalidInputError(f"--device {name!r}: expected cpu, cuda or cuda:N")
    return device


def load_model(spec_text, adapter=None):
    """(model, embedder) that --model (and --adapter) name; either may be None (the bundled one)."""
    if adapter is not None and (spec_text is None or not os.path.exists(spec_text)):
        raise InvalidInputError(
            "--adapter needs --model PATH: it is a reader adapter for your own model, a checkpoint folder or "
            ".gguf file (a MODULE:FUNCTION factory attaches its own adapter)"
        )
    if spec_text is None:
        return None, None
    if os.path.exists(spec_text):  # what `m3db build --model PATH` built with: the same model here
        return own_model(spec_text, adapter=adapter), None
    module_name, sep, attr = spec_text.partition(":")
    if not sep or not module_name or not attr:
        raise InvalidInputError(
            f"--model {spec_text!r}: no such file or folder; expected a transformers model (a local checkpoint "
            "folder or a .gguf file) or MODULE:FUNCTION (like my_models:load)"
        )
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise InvalidInputError(f"--model {spec_text!r}: cannot load {attr} from {module_name}: {e}") from e
    try:
        made = factory()
    except (M3DBError, KeyboardInterrupt):
        raise
    except Exception as e:  # noqa: BLE001 (the user's code: any failure is theirs to read)
        raise InvalidInputError(
            f"--model {spec_text!r}: {module_name}.{attr}() raised {type(e).__name__}: {e}; "
            "run it in Python to see the traceback, or pass --debug"
        ) from e
    return tuple(made) if isinstance(made, (tuple, list)) else (made, None)
