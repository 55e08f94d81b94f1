"""The server's stages, synthesis and training, as objects: what runs each and what each leaves in the run
directory.

A stage is an entry function ``run(run_dir, cfg) -> summary``, run the same way in one process or in
each process of a launch. Its module is also its command (``python -m <module> RUN_DIR``), which is how
:mod:`oscar_server.stages.launcher` starts it in child processes. The stage writes its summary (a
dataclass) to ``<run dir>/stages/<name>-summary.json`` and its settings record (resume safety,
:mod:`oscar_server.stages.fingerprint`) to ``<run dir>/stages/<name>.json``; :meth:`Stage.read_summary` reads the
summary back, however the stage ran.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Generic

from oscar_common.config import OscarConfig
from oscar_server.run_dir import RunDirectory
from oscar_server.stages import synthesize, train
from oscar_server.stages.fingerprint import stage_summary_path
from oscar_server.stages.summary import SummaryT


@dataclass(frozen=True)
class Stage(Generic[SummaryT]):
    name: str  # as in stages/<name>.json and stages/<name>-summary.json
    run: Callable[[RunDirectory, OscarConfig], SummaryT]  # the stage in this process (or as its share of a launch)
    summary_type: type[SummaryT]

    @property
    def module(self) -> str:
        """The module whose ``python -m <module> RUN_DIR`` runs the stage: the entry function's own."""
        return self.run.__module__

    def summary_path(self, run_dir: RunDirectory) -> Path:
        return stage_summary_path(run_dir.root, self.name)

    def read_summary(self, run_dir: RunDirectory) -> SummaryT:
        """The summary the stage's last run wrote."""
        path = self.summary_path(run_dir)
        if not path.exists():
            raise FileNotFoundError(f"{path} does not exist: the {self.name} stage has not finished in "
                                    f"{run_dir.root} (run it: python -m {self.module} {run_dir.root})")
        return self.summary_type.from_dict(json.loads(path.read_text()))


SYNTHESIS = Stage(synthesize.STAGE, synthesize.synthesize_run, synthesize.SynthesisSummary)
TRAINING = Stage(train.STAGE, train.train_run, train.TrainingSummary)
