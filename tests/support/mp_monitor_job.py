"""Run by tests/test_monitor.py under `accelerate launch`: probe one fixed tiny model at step 4 and exit."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for `support`

from accelerate import Accelerator
from diffusers import DDPMScheduler

from memwatch.frontends.monitor import MemorizationMonitor
from support.models import FAST_MONITOR as FAST
from support.models import tiny_unet

train_dir, holdout_dir, out = sys.argv[1:4]
acc = Accelerator(cpu=True)
model = acc.prepare(tiny_unet())
monitor = MemorizationMonitor(
    acc,
    {
        **FAST,
        "probes": {**FAST["probes"], "membership": {**FAST["probes"]["membership"], "every": 4}},
        "run_name": "mp",
    },
    reference=train_dir,
    holdout=holdout_dir,
    output_dir=out,
)
monitor.step(4, model, DDPMScheduler(num_train_timesteps=1000))
monitor.close()
acc.wait_for_everyone()
acc.end_training()  # as a training script ends: destroys the process group before the interpreter exits
