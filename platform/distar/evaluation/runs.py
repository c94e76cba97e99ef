"""Evaluation runs in MLflow: one per model, linked to its model version, and found again by promote.py."""

from __future__ import annotations

import math
import time
import uuid
import warnings
from collections.abc import Sequence
from pathlib import Path

from distar.evaluation.subjects import Subject
from distar.tracking import store
from distar.tracking.runs import end_with_error, git_commit, run_link

KIND = "evaluation"
TAG_KIND, TAG_ID, TAG_URI = "distar.kind", "distar.evaluation_id", "distar.model_uri"
TAG_MODEL, TAG_VERSION = "distar.registered_model", "distar.model_version"
VERSION_TAG_RUN = "distar.evaluation_run"  # on a model version: its latest evaluation run
PREFIX, RATIO_PREFIX = "eval/", "eval/ratio/"


def new_evaluation_id() -> str:
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"


class EvaluationRuns:
    """The MLflow side of one invocation: a run per subject, finished together once the ratios
    are known; a failure ends every open run FAILED with the error as a tag."""

    def __init__(self, where: store.Store, experiment: str, evaluation_id: str, params: dict[str, str], prompts: list[str], prompt_source: str):
        import mlflow
        import pandas as pd

        self.uri, self.evaluation_id, self.params = where.uri, evaluation_id, params
        self.experiment_id = store.connect(where, experiment)  # also where registry URIs resolve and models load from
        self.client, self.open_runs = where.client(), []
        self.prompts = prompts
        with warnings.catch_warnings():  # "the source can be interpreted in multiple ways": a path or a name, either is fine
            warnings.simplefilter("ignore")
            self.dataset = mlflow.data.from_pandas(pd.DataFrame({"prompt": prompts}), source=store.redact(prompt_source),
                                                   name=Path(prompt_source).name or prompt_source)

    def start(self, subject: Subject) -> str:
        tags = {TAG_KIND: KIND, TAG_ID: self.evaluation_id, TAG_URI: store.redact(subject.uri), TAG_MODEL: subject.name,
                TAG_VERSION: subject.version, "distar.training_run": subject.training_run, "mlflow.source.git.commit": git_commit()}
        run = self.client.create_run(self.experiment_id, run_name=f"eval {subject.label}", tags={k: v for k, v in tags.items() if v})
        subject.run_id = run.info.run_id
        self.open_runs.append(subject.run_id)
        params = dict(self.params, model=store.redact(subject.uri))
        if subject.diffusion:
            params.update(steps=str(subject.diffusion[0]), cfg=f"{subject.diffusion[1]:g}")
        from mlflow.entities import Param

        self.client.log_batch(subject.run_id, params=[Param(k, v) for k, v in params.items()])
        self.client.log_text(subject.run_id, "\n".join(self.prompts) + "\n", "prompts.txt")
        return subject.run_id

    def log_metrics(self, subject: Subject, metrics: dict[str, float]) -> None:
        """Into the subject's run, tied to its logged model and to the prompt set when it has one."""
        import mlflow

        finite = {k: float(v) for k, v in metrics.items() if math.isfinite(v)}
        if finite:
            mlflow.log_metrics(finite, run_id=subject.run_id, model_id=subject.model_id, dataset=self.dataset, synchronous=True)

    def log_images(self, subject: Subject, images, columns: int = 8) -> None:
        from distar.images import grid

        self.client.log_image(subject.run_id, grid(images[: 4 * columns], columns), "samples.png")

    def finish(self, subjects: Sequence[Subject], table: str) -> None:
        for s in subjects:
            self.client.log_text(s.run_id, table, "evaluation.md")
            self.client.set_terminated(s.run_id, "FINISHED")
            self.open_runs.remove(s.run_id)
            if s.name and s.version:
                self.client.set_model_version_tag(s.name, s.version, VERSION_TAG_RUN, s.run_id)
                self.client.set_model_version_tag(s.name, s.version, TAG_ID, self.evaluation_id)

    def link(self, run_id: str) -> str:
        return run_link(self.uri, self.experiment_id, run_id)

    def __enter__(self) -> EvaluationRuns:
        return self

    def __exit__(self, kind, error, tb) -> None:
        if kind is not None:
            for run_id in self.open_runs:
                end_with_error(self.client, run_id, kind, error)


def evaluation_runs(client, name: str, version: str) -> list:
    """Finished evaluation runs of one model version, newest first, across experiments."""
    from mlflow.entities import ViewType

    experiments = [e.experiment_id for e in client.search_experiments(view_type=ViewType.ACTIVE_ONLY)]
    found = []
    for i in range(0, len(experiments), 100):
        found += client.search_runs(
            experiments[i : i + 100],
            filter_string=f"tags.`{TAG_KIND}` = '{KIND}' and tags.`{TAG_MODEL}` = '{_quote(name)}' and tags.`{TAG_VERSION}` = '{_quote(version)}' "
            "and attributes.status = 'FINISHED'",
            order_by=["attributes.start_time DESC"],
            max_results=200,
        )
    return sorted(found, key=lambda r: r.info.start_time, reverse=True)


def _quote(text: str) -> str:
    return str(text).replace("'", "\\'")


def latest_pair(new: list, old: list) -> tuple:
    """The newest run of each list, preferring a pair from the same evaluation (same prompts,
    seeds and machine, so their timings compare). Either may be None."""
    ids_old = {r.data.tags.get(TAG_ID): r for r in reversed(old)}  # newest wins
    for run in new:
        match = ids_old.get(run.data.tags.get(TAG_ID))
        if match is not None:
            return run, match
    return (new[0] if new else None), (old[0] if old else None)


def raw_metrics(run) -> dict[str, float]:
    """eval/<metric> of a run (no ratios), keyed by metric."""
    return {k.removeprefix(PREFIX): v for k, v in run.data.metrics.items() if k.startswith(PREFIX) and not k.startswith(RATIO_PREFIX)}
