"""Run by test_monitor under `accelerate launch`: probe one fixed tiny model at step 4 and exit."""

import sys

from accelerate import Accelerator
from diffusers import DDPMScheduler
from test_monitor import FAST
from tinymodels import tiny_unet

from memwatch.monitor import MemorizationMonitor

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
