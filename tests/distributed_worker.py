"""One process of test_distributed.py's two-process run: join the run, then the loop of
`unclip-jax train` on the config, recording which examples this process fed to its train steps.

    python tests/distributed_worker.py PORT PROCESS_ID WORKDIR CONFIG [OVERRIDES...]

Writes WORKDIR/fed_{PROCESS_ID}.json (per step, the ids of the host batch's examples, see
`example_id`) and prints `RESULT {json}` with the process topology and the last step.
"""

import dataclasses
import hashlib
import json
import logging
import pathlib
import sys

import numpy as np


def example_id(image: np.ndarray) -> str:
    """An example as the hash of its image bytes ([S, S, 3] float32, as the train step gets it)."""
    return hashlib.sha1(np.ascontiguousarray(image, np.float32).tobytes()).hexdigest()[:16]


class RecordedBatches:
    """A kind's data iterator that records the example ids of every host batch it hands out.

    The loop takes one batch per step (the first also compiles the step), so `fed[s]` is what
    step s + 1 trained on."""

    def __init__(self, batches, fed: list[list[str]]):
        self.batches, self.fed = batches, fed

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        batch = next(self.batches)
        images = batch["images"] if "images" in batch else batch["image"]  # CLIP's, the others'
        self.fed.append([example_id(image) for image in images])
        return batch

    def get_state(self):
        return self.batches.get_state()

    def set_state(self, state) -> None:
        self.batches.set_state(state)


def recording(kind, make_data=None):
    """(kind whose data is recorded, the list of per-step ids it fills). `make_data` replaces
    kind.data (same signature) before recording."""
    fed: list[list[str]] = []
    make_data = make_data or kind.data

    def data(global_batch, process_index, process_count):
        return RecordedBatches(make_data(global_batch, process_index, process_count), fed)

    return dataclasses.replace(kind, data=data), fed


def main(port: str, process_id: str, workdir: str, config_name: str, *overrides: str) -> None:
    from unclip_jax.parallel import distributed

    pid = int(process_id)
    distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=pid)
    import jax

    logging.basicConfig(level=logging.INFO,
                        format=f"[p{pid}] %(relativeCreated)d %(name)s: %(message)s")  # fmt: skip
    logging.getLogger("absl").setLevel(logging.WARNING)
    from unclip_jax import config_utils
    from unclip_jax.train.kinds import get_kind
    from unclip_jax.train.loop import train

    config = config_utils.load_config(config_name, list(overrides))
    kind, fed = recording(get_kind(config, workdir))
    summary = train(config, workdir, kind=kind)
    (pathlib.Path(workdir) / f"fed_{pid}.json").write_text(json.dumps(fed))
    print("RESULT " + json.dumps({"process": jax.process_index(), "count": jax.process_count(),
          "devices": jax.device_count(), "local": jax.local_device_count(),
          "step": summary["step"]}))  # fmt: skip


if __name__ == "__main__":
    main(*sys.argv[1:])
