"""One of N gloo processes (torchrun) loading a data folder as `nfnet-zoo finetune` does: it writes
which images it checked itself and the data it ended with, for tests/test_data.py.

argv: DATA_DIR OUT_DIR TAG [--not-shared]. With --not-shared the run-folder probe of finetune is
tried on a folder that only process 0 can see (each process gets its own copy of OUT_DIR/run).
"""
import json
import sys
from pathlib import Path

from accelerate import Accelerator
from accelerate.utils import gather_object

import nfnet_zoo.data.image_check as image_check
from nfnet_zoo import NFNetZooError
from nfnet_zoo_cli import exit_process
from nfnet_zoo.data import load_image_data

data_dir, out, tag = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
accelerator = Accelerator(cpu=True)
rank = accelerator.process_index
if "--not-shared" in sys.argv:
    from nfnet_zoo.training.run_folder import require_shared_run_folder as _require_shared_run_folder
    run = out / f"run-of-process-{rank}"  # what machines without a shared filesystem see
    run.mkdir(parents=True, exist_ok=True)
    try:
        _require_shared_run_folder(accelerator, run)
        result = {"error": None}
    except NFNetZooError as e:
        result = {"error": str(e)}
else:
    checked = []
    readable = image_check.is_readable

    def recording(raw, key, level):
        checked.append(key)
        return readable(raw, key, level)

    image_check.is_readable = recording
    data = load_image_data(data_dir, 0.2, "skip", 1, "full", rank, accelerator.num_processes, gather_object)
    result = {"checked": checked, "train": data.train, "val": data.val, "skipped": data.skipped}
(out / f"{tag}-{rank}.json").write_text(json.dumps(result))
accelerator.end_training()
exit_process(0)  # as nfnet-zoo does under torchrun: no interpreter teardown (it aborted 1 run in 5 to 8)
