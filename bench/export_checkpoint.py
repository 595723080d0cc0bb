"""Write the adapter of a training run's last checkpoint, while the run goes on.

`model/train.py` writes `adapter.safetensors` when a run ends; a long run (hours on a CPU)
checkpoints every few steps. This reads `checkpoint.safetensors` + `checkpoint.json` of RUN_DIR
and writes an adapter file of those weights (its metadata names the step), so bench/heldout.py
can measure the run so far (`--memory-adapter OUT`) without stopping it.

    python bench/export_checkpoint.py RUN_DIR OUT.safetensors
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from m3db.model.adapter import ReaderAdapter  # noqa: E402
from m3db.model.memory_model import MemoryModel  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run")
    ap.add_argument("out")
    args = ap.parse_args()
    from safetensors.torch import load_file

    # copy both files first: the run may replace them while they are read
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("checkpoint.json", "checkpoint.safetensors"):
            shutil.copy(os.path.join(args.run, name), os.path.join(tmp, name))
        with open(os.path.join(tmp, "checkpoint.json")) as f:
            state = json.load(f)
        tensors = load_file(os.path.join(tmp, "checkpoint.safetensors"))
    cfg = state["config"]
    base = MemoryModel.load(adapter=None)
    if state["model"] != base.fingerprint:
        raise SystemExit(f"{args.run} was trained for another model ({state['model'][:23]}...)")
    adapter = ReaderAdapter(
        base.decoder.cfg,
        base_fingerprint=base.fingerprint,
        rank=cfg["rank"],
        alpha=cfg["alpha"],
        settings=state["settings"],
    )
    adapter.load_state_dict({k[len("adapter.") :]: v for k, v in tensors.items() if k.startswith("adapter.")})
    adapter.eval().requires_grad_(False)
    adapter.save(args.out, extra={"config": cfg, "steps": state["step"], "checkpoint_of": os.path.basename(args.run)})
    print(f"wrote {args.out}: step {state['step']} of {cfg['steps']}")


if __name__ == "__main__":
    main()
